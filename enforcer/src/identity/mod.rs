//! Workload identity: SPIFFE IDs, the CA hierarchy, X.509-SVIDs, trust bundles, the SVID
//! cache, the rustls verifiers that enforce the SPIFFE rules on every mTLS handshake, and
//! JWT-SVIDs (the trust domain's signing key, JWT bundles, validation).
#![forbid(unsafe_code)]

mod bundle;
mod ca;
mod cache;
mod jwt;
mod pem;
mod spiffe_id;
mod store;
mod svid;
mod tls;
mod verify;
mod x509;

pub use bundle::{BundleError, TrustBundle, TrustBundleSet};
pub use ca::{
    CaError, CaKind, CertificateAuthority, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_ROOT_VALIDITY,
    NODE_FILE_STEM, ROOT_FILE_STEM,
};
pub use cache::{CacheConfig, CacheError, Clock, Refreshed, SvidCache, SvidIssuer, SystemClock};
pub use jwt::{
    DEFAULT_JWT_SVID_TTL, JWT_KEY_FILE, JwtAuthority, JwtBundle, JwtBundleSet, JwtError, JwtSvid,
    MAX_TOKEN_LEN, ValidatedJwt, validate_jwt_svid,
};
pub(crate) use pem::read_file;
pub use pem::{
    PemError, encode_certificates, encode_private_key, parse_certificates, parse_private_key,
    write_private, write_public,
};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::StoreError;
pub(crate) use store::{BUNDLE_PEM, load_or_init};
pub use svid::{DEFAULT_SVID_TTL, SvidError, X509Svid};
pub(crate) use tls::server_config_with_resolver;
pub use tls::{client_config, server_config};
pub use verify::{PeerAuthorizer, PeerRole, SvidVerifyError, peer_spiffe_id, verify_svid_chain};
pub use x509::provider;

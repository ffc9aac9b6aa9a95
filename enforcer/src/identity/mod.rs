//! Workload identity: SPIFFE IDs, the CA hierarchy, X.509-SVIDs, trust bundles, the SVID
//! cache and the rustls verifiers that enforce the SPIFFE rules on every mTLS handshake.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod cache;
pub mod pem;
pub mod spiffe_id;
pub mod store;
pub mod svid;
pub mod tls;
pub mod verify;
pub mod x509;

pub use bundle::{BundleError, TrustBundle, TrustBundleSet};
pub use ca::{CaError, CaKind, CertificateAuthority};
pub use cache::{CacheConfig, CacheError, Clock, SvidCache, SvidIssuer, SystemClock};
pub use pem::PemError;
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::{NodePki, StoreError, load_or_init};
pub use svid::{SvidError, X509Svid};
pub use tls::{client_config, server_config, server_config_with_resolver};
pub use verify::{
    PeerAuthorizer, PeerRole, SpiffeClientVerifier, SpiffeServerVerifier, VerifyError,
    peer_spiffe_id, verify_svid_chain,
};

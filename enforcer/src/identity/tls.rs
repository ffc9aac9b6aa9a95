//! The TLS 1.3 configurations of identity mTLS: a workload presents its X.509-SVID and checks
//! its peer with the SPIFFE verifiers of [`verify`](super::verify), on the ring provider.

use std::sync::Arc;

use super::{
    bundle::TrustBundleSet,
    svid::X509Svid,
    verify::{PeerAuthorizer, SpiffeClientVerifier, SpiffeServerVerifier},
    x509::provider,
};

/// A TLS 1.3 server config presenting `svid` and requiring client SVIDs that verify against
/// `bundles` and that `clients` allows.
pub fn server_config(
    svid: &X509Svid,
    bundles: Arc<TrustBundleSet>,
    clients: PeerAuthorizer,
) -> Result<rustls::ServerConfig, rustls::Error> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles, clients)))
        .with_single_cert(svid.chain().to_vec(), svid.private_key())
}

/// A TLS 1.3 server config that picks the certificate per connection with `resolver` (e.g.
/// the SVID of the workload owning the destination port) and verifies clients as
/// [`server_config`] does.
pub(crate) fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    bundles: Arc<TrustBundleSet>,
    clients: PeerAuthorizer,
) -> Result<rustls::ServerConfig, rustls::Error> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles, clients)))
        .with_cert_resolver(resolver))
}

/// A TLS 1.3 client config presenting `svid` and accepting servers whose SVID verifies
/// against `bundles` and that `servers` allows. The `ServerName` passed to rustls is not
/// checked; any valid name (e.g. `spiffe`) will do.
pub fn client_config(
    svid: &X509Svid,
    bundles: Arc<TrustBundleSet>,
    servers: PeerAuthorizer,
) -> Result<rustls::ClientConfig, rustls::Error> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, servers)))
        .with_client_auth_cert(svid.chain().to_vec(), svid.private_key())
}

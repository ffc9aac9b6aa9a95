//! Verification of peer X.509-SVIDs and the rustls verifiers built on it (TLS 1.3 only).
//!
//! Both verifiers follow rustls's `WebPkiClientVerifier` / `WebPkiServerVerifier`: path
//! building, signatures, validity and EKU through `webpki::EndEntityCert::verify_for_usage`
//! with the ring provider's algorithms, handshake signatures through
//! `rustls::crypto::verify_tls13_signature`. What they change:
//! - the trust anchors are chosen per peer: the bundle of the trust domain named by the leaf's
//!   SPIFFE ID, never the union of all bundles (a federated CA cannot mint IDs of our domain);
//! - the leaf is first checked against X509-SVID.md 5.2 (one URI SAN, a workload SPIFFE ID,
//!   cA=false, critical `KeyUsage` with digitalSignature and without keyCertSign/cRLSign, EKU
//!   serverAuth+clientAuth when present);
//! - the server verifier ignores the TLS server name (SVIDs carry no DNS name) and instead
//!   checks the server's SPIFFE ID with a [`PeerAuthorizer`];
//! - revocation lists are not consulted (SVIDs are short-lived); TLS 1.2 is refused.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    PeerIncompatible, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, ring},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{
    bundle::TrustBundleSet,
    spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain},
    x509::asn1_to_system_time,
};

/// Why a peer's SVID was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SvidVerifyError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    EmptyChain,
    /// The leaf is not valid DER X.509 (or an extension is malformed or repeated).
    #[error("leaf certificate is malformed: {0}")]
    Malformed(String),
    /// X509-SVID.md 2: exactly one URI SAN is required.
    #[error("leaf has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("leaf URI SAN is not a valid SPIFFE ID")]
    SpiffeId(#[source] SpiffeIdError),
    /// X509-SVID.md 3.1: leaf SPIFFE IDs have a path.
    #[error("leaf SPIFFE ID `{0}` has no path")]
    NoPath(SpiffeId),
    /// X509-SVID.md 4.1: a leaf has cA=false.
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    /// X509-SVID.md 4.3: `KeyUsage` must be present.
    #[error("leaf has no KeyUsage extension")]
    MissingKeyUsage,
    /// X509-SVID.md 4.3: `KeyUsage` must be critical.
    #[error("leaf KeyUsage extension is not critical")]
    KeyUsageNotCritical,
    /// X509-SVID.md 4.3: leaves set digitalSignature.
    #[error("leaf KeyUsage lacks digitalSignature")]
    NoDigitalSignature,
    /// X509-SVID.md 4.3 and 5.2: leaves must not set keyCertSign or cRLSign.
    #[error("leaf KeyUsage sets keyCertSign or cRLSign")]
    SigningKeyUsage,
    /// X509-SVID.md 4.4: when present, EKU has both serverAuth and clientAuth.
    #[error("leaf extended key usage lacks serverAuth or clientAuth")]
    ExtendedKeyUsage,
    /// The leaf's validity starts after the verification time.
    #[error("leaf is not valid before {not_before:?}")]
    NotYetValid {
        /// Start of the leaf's validity.
        not_before: SystemTime,
    },
    /// The leaf's validity ended before the verification time.
    #[error("leaf expired at {not_after:?}")]
    Expired {
        /// End of the leaf's validity.
        not_after: SystemTime,
    },
    /// No bundle is trusted for the leaf's trust domain.
    #[error("no trust bundle for trust domain `{0}`")]
    UnknownTrustDomain(TrustDomain),
    /// The chain does not verify to the trust domain's bundle (foreign CA, bad signature, ...).
    #[error("certificate chain does not verify against the bundle of `{trust_domain}`")]
    Chain {
        /// The trust domain whose bundle was used.
        trust_domain: TrustDomain,
        /// webpki's error.
        #[source]
        source: webpki::Error,
    },
    /// The peer is authenticated but not the one this connection expects.
    #[error("peer `{0}` is not authorized for this connection")]
    Unauthorized(SpiffeId),
}

/// What a leaf certificate says about itself once it passed the X509-SVID leaf rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeafFacts {
    /// The SPIFFE ID in its only URI SAN.
    pub spiffe_id: SpiffeId,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Checks a leaf certificate against X509-SVID.md 5.2 and the profile rules, without chain or
/// time checks.
pub(super) fn inspect_leaf(der: &CertificateDer<'_>) -> Result<LeafFacts, SvidVerifyError> {
    let malformed = |e: &dyn std::fmt::Display| SvidVerifyError::Malformed(e.to_string());
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| malformed(&e))?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|e| malformed(&e))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(SvidVerifyError::UriSanCount(uris.len()));
    };
    let spiffe_id: SpiffeId = uri.parse().map_err(SvidVerifyError::SpiffeId)?;
    if !spiffe_id.is_workload() {
        return Err(SvidVerifyError::NoPath(spiffe_id));
    }
    if cert
        .basic_constraints()
        .map_err(|e| malformed(&e))?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidVerifyError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| malformed(&e))?
        .ok_or(SvidVerifyError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(SvidVerifyError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidVerifyError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidVerifyError::SigningKeyUsage);
    }
    if let Some(eku) = cert.extended_key_usage().map_err(|e| malformed(&e))?
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(SvidVerifyError::ExtendedKeyUsage);
    }
    Ok(LeafFacts {
        spiffe_id,
        not_before: asn1_to_system_time(cert.validity().not_before.timestamp()),
        not_after: asn1_to_system_time(cert.validity().not_after.timestamp()),
    })
}

/// Which side of the connection the verified peer is, for the EKU check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (checked for clientAuth).
    Client,
    /// The peer is a TLS server (checked for serverAuth).
    Server,
}

/// Verifies a peer's chain (leaf first) at `now` against the bundle of the leaf's trust
/// domain and returns the authenticated SPIFFE ID.
pub fn verify_svid_chain(
    bundles: &TrustBundleSet,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidVerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidVerifyError::EmptyChain)?;
    verify_leaf(bundles, leaf, intermediates, now, role)
}

/// The body of [`verify_svid_chain`], shared with the rustls verifiers.
fn verify_leaf(
    bundles: &TrustBundleSet,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: SystemTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidVerifyError> {
    let facts = inspect_leaf(leaf)?;
    if now < facts.not_before {
        return Err(SvidVerifyError::NotYetValid {
            not_before: facts.not_before,
        });
    }
    if now > facts.not_after {
        return Err(SvidVerifyError::Expired {
            not_after: facts.not_after,
        });
    }
    let trust_domain = facts.spiffe_id.trust_domain();
    let bundle = bundles
        .get(&trust_domain)
        .ok_or_else(|| SvidVerifyError::UnknownTrustDomain(trust_domain.clone()))?;
    let chain_err = |source| SvidVerifyError::Chain {
        trust_domain: trust_domain.clone(),
        source,
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(chain_err)?;
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    end_entity
        .verify_for_usage(
            algorithms().all,
            bundle.anchors(),
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            usage,
            None,
            None,
        )
        .map_err(chain_err)?;
    Ok(facts.spiffe_id)
}

/// Which authenticated peers a connection accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuthorizer {
    /// Any SPIFFE ID that verifies against a trusted bundle (policy decides later).
    Any,
    /// Exactly this ID.
    Exactly(SpiffeId),
    /// One of these IDs.
    OneOf(Vec<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl PeerAuthorizer {
    /// Whether `id` is acceptable.
    #[must_use]
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exactly(expected) => expected == id,
            Self::OneOf(ids) => ids.contains(id),
            Self::TrustDomain(td) => id.trust_domain_str() == td.as_str(),
        }
    }
}

/// Signature algorithms used for chains and handshake signatures, taken once from ring.
static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
    LazyLock::new(|| ring::default_provider().signature_verification_algorithms);

/// The signature algorithms (a cheap copy of static tables).
fn algorithms() -> WebPkiSupportedAlgorithms {
    *ALGORITHMS
}

/// Converts rustls's verification time to `SystemTime`.
fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Maps a verification failure to the rustls error (and so the TLS alert) that fits it; the
/// SPIFFE-specific ones travel as `CertificateError::Other` holding the [`SvidVerifyError`].
fn to_rustls(err: SvidVerifyError) -> rustls::Error {
    let cert_err = match err {
        SvidVerifyError::Expired { .. } => CertificateError::Expired,
        SvidVerifyError::NotYetValid { .. } => CertificateError::NotValidYet,
        SvidVerifyError::Chain {
            source: webpki::Error::UnknownIssuer,
            ..
        } => CertificateError::UnknownIssuer,
        SvidVerifyError::Chain {
            source: webpki::Error::InvalidSignatureForPublicKey,
            ..
        } => CertificateError::BadSignature,
        SvidVerifyError::Unauthorized(_) => CertificateError::ApplicationVerificationFailure,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// What both verifiers share: the bundles, the authorizer and the signature algorithms.
#[derive(Debug)]
struct SpiffeVerifier {
    bundles: Arc<TrustBundleSet>,
    authorizer: PeerAuthorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    fn new(bundles: Arc<TrustBundleSet>, authorizer: PeerAuthorizer) -> Self {
        Self {
            bundles,
            authorizer,
            algorithms: algorithms(),
        }
    }

    /// The SPIFFE rules, the chain to the peer's trust domain, then the authorizer.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<(), rustls::Error> {
        let id = verify_leaf(
            &self.bundles,
            end_entity,
            intermediates,
            system_time(now),
            role,
        )
        .map_err(to_rustls)?;
        if self.authorizer.allows(&id) {
            Ok(())
        } else {
            Err(to_rustls(SvidVerifyError::Unauthorized(id)))
        }
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// TLS 1.2 is never offered or accepted.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        PeerIncompatible::Tls12NotOfferedOrEnabled,
    ))
}

/// Server-side verifier of client SVIDs: mandatory client auth, SPIFFE rules, per-trust-domain
/// anchors, then the [`PeerAuthorizer`].
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier(SpiffeVerifier);

impl SpiffeClientVerifier {
    /// A verifier trusting `bundles` and accepting the clients `authorizer` allows.
    #[must_use]
    pub(super) fn new(bundles: Arc<TrustBundleSet>, authorizer: PeerAuthorizer) -> Self {
        Self(SpiffeVerifier::new(bundles, authorizer))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, PeerRole::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// Client-side verifier of server SVIDs: SPIFFE rules, per-trust-domain anchors, then the
/// [`PeerAuthorizer`] in place of the DNS name check.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier(SpiffeVerifier);

impl SpiffeServerVerifier {
    /// A verifier trusting `bundles` and accepting the servers `authorizer` allows.
    #[must_use]
    pub(super) fn new(bundles: Arc<TrustBundleSet>, authorizer: PeerAuthorizer) -> Self {
        Self(SpiffeVerifier::new(bundles, authorizer))
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, PeerRole::Server)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// The SPIFFE ID of the peer of a connection whose handshake completed with one of this
/// module's verifiers (which already authenticated it).
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, SvidVerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(SvidVerifyError::EmptyChain)?;
    Ok(inspect_leaf(leaf)?.spiffe_id)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };

    use super::*;
    use crate::identity::{
        bundle::TrustBundle,
        ca::{CertificateAuthority, DEFAULT_ROOT_VALIDITY},
    };

    const HOUR: Duration = Duration::from_hours(1);

    /// A trust domain's root and node CA, and the bundles trusting `example.org` and
    /// `other.org`.
    struct Pki {
        node: CertificateAuthority,
        other_root: CertificateAuthority,
        bundles: TrustBundleSet,
        now: SystemTime,
    }

    fn pki() -> Pki {
        let now = SystemTime::now();
        let root = CertificateAuthority::new_root(
            &"example.org".parse().expect("td"),
            DEFAULT_ROOT_VALIDITY,
            now,
        )
        .expect("root");
        let node = root.issue_intermediate("n1", 24 * HOUR, now).expect("node");
        let other_root = CertificateAuthority::new_root(
            &"other.org".parse().expect("td"),
            DEFAULT_ROOT_VALIDITY,
            now,
        )
        .expect("other root");
        let mut bundles = TrustBundleSet::new();
        for ca in [&root, &other_root] {
            bundles.insert(
                TrustBundle::new(ca.trust_domain().clone(), vec![ca.certificate().clone()])
                    .expect("bundle"),
            );
        }
        Pki {
            node,
            other_root,
            bundles,
            now,
        }
    }

    /// The parameters `issue_svid` uses, for `uri`.
    fn good_params(uri: &str, now: SystemTime) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().expect("ia5"))];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - Duration::from_mins(1)).into();
        params.not_after = (now + HOUR).into();
        params
    }

    /// A chain (leaf, then the issuer's chain) for a leaf built from `params`.
    fn chain(
        issuer: &CertificateAuthority,
        params: &CertificateParams,
    ) -> Vec<CertificateDer<'static>> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = params.signed_by(&key, issuer.issuer()).expect("sign");
        let mut chain = vec![leaf.der().clone()];
        chain.extend(issuer.chain_for_leaves().iter().cloned());
        chain
    }

    /// Builds a leaf for `spiffe://example.org/web` with `edit` applied and verifies it.
    fn verify_edited(
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Result<SpiffeId, SvidVerifyError> {
        let pki = pki();
        let mut params = good_params("spiffe://example.org/web", pki.now);
        edit(&mut params);
        verify_svid_chain(
            &pki.bundles,
            &chain(&pki.node, &params),
            pki.now,
            PeerRole::Client,
        )
    }

    #[test]
    fn a_well_formed_svid_verifies_for_both_roles() {
        let pki = pki();
        let id: SpiffeId = "spiffe://example.org/web".parse().expect("id");
        let svid = pki.node.issue_svid(&id, HOUR, pki.now).expect("svid");
        for role in [PeerRole::Client, PeerRole::Server] {
            let got = verify_svid_chain(&pki.bundles, svid.chain(), pki.now, role).expect("valid");
            assert_eq!(got, id);
        }
        let edited = verify_edited(|_| {}).expect("the test's baseline leaf is valid");
        assert_eq!(edited.as_str(), "spiffe://example.org/web");
    }

    #[test]
    fn rejects_an_empty_chain() {
        let pki = pki();
        let err =
            verify_svid_chain(&pki.bundles, &[], pki.now, PeerRole::Client).expect_err("empty");
        assert!(matches!(err, SvidVerifyError::EmptyChain), "{err:?}");
    }

    #[test]
    fn rejects_a_leaf_without_uri_san() {
        let err = verify_edited(|p| {
            p.subject_alt_names =
                vec![SanType::DnsName("web.example.org".try_into().expect("dns"))];
        })
        .expect_err("no URI SAN");
        assert!(matches!(err, SvidVerifyError::UriSanCount(0)), "{err:?}");
    }

    #[test]
    fn rejects_a_leaf_with_two_uri_sans() {
        let err = verify_edited(|p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://example.org/db".try_into().expect("ia5"),
            ));
        })
        .expect_err("two URI SANs");
        assert!(matches!(err, SvidVerifyError::UriSanCount(2)), "{err:?}");
    }

    #[test]
    fn rejects_a_uri_san_that_is_not_a_spiffe_id() {
        let err = verify_edited(|p| {
            p.subject_alt_names = vec![SanType::URI(
                "https://example.org/web".try_into().expect("ia5"),
            )];
        })
        .expect_err("not spiffe");
        assert!(
            matches!(err, SvidVerifyError::SpiffeId(SpiffeIdError::WrongScheme)),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_a_leaf_id_without_path() {
        let err = verify_edited(|p| {
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://example.org".try_into().expect("ia5"),
            )];
        })
        .expect_err("no path");
        assert!(matches!(err, SvidVerifyError::NoPath(_)), "{err:?}");
    }

    #[test]
    fn rejects_a_ca_certificate_as_leaf() {
        let err = verify_edited(|p| {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        })
        .expect_err("CA leaf");
        assert!(matches!(err, SvidVerifyError::LeafIsCa), "{err:?}");
    }

    #[test]
    fn rejects_a_leaf_without_key_usage() {
        let err = verify_edited(|p| p.key_usages.clear()).expect_err("no KU");
        assert!(matches!(err, SvidVerifyError::MissingKeyUsage), "{err:?}");
    }

    #[test]
    fn rejects_a_non_critical_key_usage() {
        let err = verify_edited(|p| {
            p.key_usages.clear();
            // KeyUsage (2.5.29.15) = BIT STRING digitalSignature, marked non-critical.
            let mut ku =
                CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
            ku.set_criticality(false);
            p.custom_extensions.push(ku);
        })
        .expect_err("non-critical KU");
        assert!(
            matches!(err, SvidVerifyError::KeyUsageNotCritical),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_a_key_usage_without_digital_signature() {
        let err = verify_edited(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment])
            .expect_err("no digitalSignature");
        assert!(
            matches!(err, SvidVerifyError::NoDigitalSignature),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_a_leaf_key_usage_with_cert_sign() {
        let err = verify_edited(|p| {
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        })
        .expect_err("keyCertSign");
        assert!(matches!(err, SvidVerifyError::SigningKeyUsage), "{err:?}");
        let err = verify_edited(|p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        })
        .expect_err("cRLSign");
        assert!(matches!(err, SvidVerifyError::SigningKeyUsage), "{err:?}");
    }

    #[test]
    fn rejects_an_eku_without_both_auth_purposes() {
        let err =
            verify_edited(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth])
                .expect_err("server only");
        assert!(matches!(err, SvidVerifyError::ExtendedKeyUsage), "{err:?}");
    }

    #[test]
    fn rejects_an_expired_leaf() {
        let err = verify_edited(|p| {
            let now = SystemTime::now();
            p.not_before = (now - 3 * HOUR).into();
            p.not_after = (now - HOUR).into();
        })
        .expect_err("expired");
        assert!(matches!(err, SvidVerifyError::Expired { .. }), "{err:?}");
    }

    #[test]
    fn rejects_a_leaf_not_yet_valid() {
        let err = verify_edited(|p| {
            let now = SystemTime::now();
            p.not_before = (now + HOUR).into();
            p.not_after = (now + 2 * HOUR).into();
        })
        .expect_err("not yet valid");
        assert!(
            matches!(err, SvidVerifyError::NotYetValid { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_an_unknown_trust_domain() {
        let pki = pki();
        let params = good_params("spiffe://unknown.org/web", pki.now);
        let err = verify_svid_chain(
            &pki.bundles,
            &chain(&pki.node, &params),
            pki.now,
            PeerRole::Client,
        )
        .expect_err("unknown trust domain");
        assert!(
            matches!(&err, SvidVerifyError::UnknownTrustDomain(td) if td.as_str() == "unknown.org"),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_a_chain_to_a_foreign_ca() {
        let pki = pki();
        let params = good_params("spiffe://example.org/web", pki.now);
        // An untrusted root claiming the same trust domain.
        let rogue =
            CertificateAuthority::new_root(&"example.org".parse().expect("td"), HOUR, pki.now)
                .expect("rogue");
        let err = verify_svid_chain(
            &pki.bundles,
            &chain(&rogue, &params),
            pki.now,
            PeerRole::Client,
        )
        .expect_err("rogue root");
        // The rogue root has the trusted root's subject name, so webpki finds the trusted
        // anchor by name and then rejects the signature.
        assert!(
            matches!(
                err,
                SvidVerifyError::Chain {
                    source: webpki::Error::InvalidSignatureForPublicKey,
                    ..
                }
            ),
            "{err:?}"
        );
        // A federated root may not mint identities of another trust domain.
        let err = verify_svid_chain(
            &pki.bundles,
            &chain(&pki.other_root, &params),
            pki.now,
            PeerRole::Client,
        )
        .expect_err("federated root, wrong trust domain");
        assert!(
            matches!(
                err,
                SvidVerifyError::Chain {
                    source: webpki::Error::UnknownIssuer,
                    ..
                }
            ),
            "{err:?}"
        );
        // Without the intermediate the leaf does not chain either.
        let leaf_only = chain(&pki.node, &params)[..1].to_vec();
        let err = verify_svid_chain(&pki.bundles, &leaf_only, pki.now, PeerRole::Client)
            .expect_err("missing intermediate");
        assert!(matches!(err, SvidVerifyError::Chain { .. }), "{err:?}");
    }

    #[test]
    fn rustls_verifiers_report_the_spiffe_reason_and_authorize() {
        let pki = pki();
        let bundles = Arc::new(pki.bundles.clone());
        let mut params = good_params("spiffe://example.org/web", pki.now);
        params.key_usages.clear();
        let bad = chain(&pki.node, &params);
        let now = UnixTime::since_unix_epoch(
            pki.now
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("epoch"),
        );
        let verifier = SpiffeClientVerifier::new(Arc::clone(&bundles), PeerAuthorizer::Any);
        let err = verifier
            .verify_client_cert(&bad[0], &bad[1..], now)
            .expect_err("no KU");
        let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = err
        else {
            panic!("unexpected error {err:?}");
        };
        assert!(
            matches!(
                inner.downcast_ref::<SvidVerifyError>(),
                Some(SvidVerifyError::MissingKeyUsage)
            ),
            "{inner:?}"
        );

        let id: SpiffeId = "spiffe://example.org/web".parse().expect("id");
        let good = pki.node.issue_svid(&id, HOUR, pki.now).expect("svid");
        let name = ServerName::try_from("spiffe").expect("name");
        let expect_db = SpiffeServerVerifier::new(
            Arc::clone(&bundles),
            PeerAuthorizer::Exactly("spiffe://example.org/db".parse().expect("id")),
        );
        let err = expect_db
            .verify_server_cert(&good.chain()[0], &good.chain()[1..], &name, &[], now)
            .expect_err("wrong server");
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        );
        let expect_td =
            SpiffeServerVerifier::new(bundles, PeerAuthorizer::TrustDomain(id.trust_domain()));
        expect_td
            .verify_server_cert(&good.chain()[0], &good.chain()[1..], &name, &[], now)
            .expect("same trust domain");
    }
}

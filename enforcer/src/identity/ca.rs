//! The CA hierarchy: a self-signed trust-domain root and per-node intermediates (ECDSA P-256),
//! created with rcgen or loaded from an existing PKI's PEM files.
//!
//! Both carry the trust domain's own SPIFFE ID (`spiffe://TD`, no path) as their only URI SAN,
//! as X509-SVID.md 3.2 asks of signing certificates, and a critical `KeyUsage` with
//! `keyCertSign` and `cRLSign`.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{
    pem::{self, PemError},
    spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain},
    x509::{asn1_to_system_time, random_serial, to_whole_seconds, uri_san},
};

/// Default validity of a root CA.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_hours(365 * 24);
/// Default validity of a node intermediate CA.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_hours(30 * 24);
/// How far before "now" issued certificates start, to absorb clock skew between nodes.
pub(super) const BACKDATE: Duration = Duration::from_mins(1);

/// File name stem of the root CA in a state directory (`root.pem`, `root.key`).
pub const ROOT_FILE_STEM: &str = "root";
/// File name stem of the node intermediate CA in a state directory (`node.pem`, `node.key`).
pub const NODE_FILE_STEM: &str = "node";

/// Why a CA could not be created, loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to generate a key or sign a certificate.
    #[error("failed to {action}")]
    Generate {
        /// What was being done.
        action: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Reading PEM input or writing files failed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The CA certificate is not valid DER X.509.
    #[error("{what}: certificate {index} is not valid X.509: {reason}")]
    Certificate {
        /// What was being loaded.
        what: String,
        /// 0-based position of the certificate in the PEM file.
        index: usize,
        /// The parser's description.
        reason: String,
    },
    /// The private key is not a PKCS#8 ECDSA P-256 key.
    #[error("{what}: private key is not a PKCS#8 ECDSA P-256 key")]
    Key {
        /// What was being loaded.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("{what}: private key does not match the certificate's public key")]
    KeyMismatch {
        /// What was being loaded.
        what: String,
    },
    /// The certificate is not a signing certificate (cA=true and keyCertSign).
    #[error("{what}: certificate is not a CA (needs basicConstraints cA=true and keyCertSign)")]
    NotACa {
        /// What was being loaded.
        what: String,
    },
    /// The certificate does not carry exactly one URI SAN naming a trust domain.
    #[error("{what}: CA certificate must carry one URI SAN `spiffe://<trust domain>`: {reason}")]
    NoTrustDomain {
        /// What was being loaded.
        what: String,
        /// What was found instead.
        reason: String,
    },
    /// The certificate's URI SAN is not a valid SPIFFE ID.
    #[error("{what}: URI SAN is not a valid SPIFFE ID")]
    BadSpiffeId {
        /// What was being loaded.
        what: String,
        /// The parse error.
        #[source]
        source: SpiffeIdError,
    },
    /// The CA expired (or is not valid yet) at the time it was asked to sign.
    #[error("CA certificate for {trust_domain} is not valid at the requested time")]
    Expired {
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
}

/// Whether a CA is the trust domain's root or an intermediate below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// Self-signed; its certificate goes into the trust bundle.
    Root,
    /// Signed by another CA; its certificate travels in every SVID chain it issues.
    Intermediate,
}

/// A signing authority of one trust domain: certificate, key, and the chain up to the root.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    kind: CaKind,
    /// This CA's certificate, then its issuers up to (excluding) the self-signed root.
    chain: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("kind", &self.kind)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a self-signed root for `trust_domain`, valid from `now` (backdated) for
    /// `validity`.
    pub fn new_root(
        trust_domain: &TrustDomain,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = generate_key()?;
        let not_before = now - BACKDATE;
        let not_after = now + validity;
        let params = ca_params(
            trust_domain,
            "enforcer root CA",
            BasicConstraints::Unconstrained,
            not_before,
            not_after,
        )?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                action: "self-sign the root CA certificate",
                source,
            })?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            kind: CaKind::Root,
            chain: vec![cert.der().clone()],
            issuer: Issuer::new(params, key),
            not_before: to_whole_seconds(not_before),
            not_after: to_whole_seconds(not_after),
        })
    }

    /// Issues an intermediate CA for one node (cA=true, pathLen 0), valid for `validity` but
    /// never beyond this CA's own expiry. `node` goes into the subject common name only.
    pub fn issue_intermediate(
        &self,
        node: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (not_before, not_after) = self.window(now, validity)?;
        let key = generate_key()?;
        let mut params = ca_params(
            &self.trust_domain,
            &format!("enforcer node CA {node}"),
            BasicConstraints::Constrained(0),
            not_before,
            not_after,
        )?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Generate {
                action: "sign the node intermediate CA certificate",
                source,
            })?;
        let mut chain = vec![cert.der().clone()];
        if self.kind == CaKind::Intermediate {
            chain.extend(self.chain.iter().cloned());
        }
        Ok(Self {
            trust_domain: self.trust_domain.clone(),
            kind: CaKind::Intermediate,
            chain,
            issuer: Issuer::new(params, key),
            not_before: to_whole_seconds(not_before),
            not_after: to_whole_seconds(not_after),
        })
    }

    /// Loads a CA from PEM: `cert_pem` holds the CA certificate first, optionally followed by
    /// its issuers; `key_pem` holds its PKCS#8 P-256 key. `what` names the source in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, CaError> {
        Self::from_labelled_pem(cert_pem, what, key_pem, what)
    }

    /// [`CertificateAuthority::from_pem`] with separate names for the certificate and the key
    /// in error messages (their file paths, when loaded from files).
    fn from_labelled_pem(
        cert_pem: &str,
        what: &str,
        key_pem: &str,
        key_what: &str,
    ) -> Result<Self, CaError> {
        let certs = pem::parse_certificates(cert_pem, what)?;
        let key_der = pem::parse_private_key(key_pem, key_what)?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Key {
                what: key_what.to_owned(),
                source,
            })?;
        let (_, cert) = X509Certificate::from_der(&certs[0]).map_err(|e| CaError::Certificate {
            what: what.to_owned(),
            index: 0,
            reason: e.to_string(),
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                what: what.to_owned(),
            });
        }
        let signs = cert
            .key_usage()
            .ok()
            .flatten()
            .is_some_and(|ku| ku.value.key_cert_sign());
        if !cert.is_ca() || !signs {
            return Err(CaError::NotACa {
                what: what.to_owned(),
            });
        }
        let trust_domain = ca_trust_domain(&cert, what)?;
        let self_signed = cert.subject() == cert.issuer();
        let not_before = asn1_to_system_time(cert.validity().not_before.timestamp());
        let not_after = asn1_to_system_time(cert.validity().not_after.timestamp());
        // Keep the issuers that travel in SVID chains: everything but self-signed roots.
        let mut chain = vec![certs[0].clone()];
        for (index, der) in certs.iter().enumerate().skip(1) {
            let (_, parsed) = X509Certificate::from_der(der).map_err(|e| CaError::Certificate {
                what: what.to_owned(),
                index,
                reason: e.to_string(),
            })?;
            if parsed.subject() != parsed.issuer() {
                chain.push(der.clone());
            }
        }
        let issuer =
            Issuer::from_ca_cert_der(&certs[0], key).map_err(|source| CaError::Generate {
                action: "read the CA certificate's subject and key identifier",
                source,
            })?;
        Ok(Self {
            trust_domain,
            kind: if self_signed {
                CaKind::Root
            } else {
                CaKind::Intermediate
            },
            chain: if self_signed {
                vec![certs[0].clone()]
            } else {
                chain
            },
            issuer,
            not_before,
            not_after,
        })
    }

    /// Loads `<stem>.pem` and `<stem>.key` from `dir` (e.g. `root` or `node`).
    pub fn load(dir: &Path, stem: &str) -> Result<Self, CaError> {
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        let cert = pem::read_file(&cert_path)?;
        let key = pem::read_file(&key_path)?;
        Self::from_labelled_pem(
            &cert,
            &cert_path.display().to_string(),
            &key,
            &key_path.display().to_string(),
        )
    }

    /// Writes `<stem>.pem` (this CA's chain, 0644) and `<stem>.key` (PKCS#8, 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), CaError> {
        pem::write_private(&dir.join(format!("{stem}.key")), &self.key_pem())?;
        pem::write_public(&dir.join(format!("{stem}.pem")), &self.chain_pem())?;
        Ok(())
    }

    /// The trust domain this CA signs for.
    #[must_use]
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Root or intermediate.
    #[must_use]
    pub fn kind(&self) -> CaKind {
        self.kind
    }

    /// This CA's own certificate.
    #[must_use]
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The certificates that follow a leaf it issues: this CA's, then further intermediates;
    /// empty for a root (the root itself is in the peer's bundle, not in the chain).
    #[must_use]
    pub fn chain_for_leaves(&self) -> &[CertificateDer<'static>] {
        match self.kind {
            CaKind::Root => &[],
            CaKind::Intermediate => &self.chain,
        }
    }

    /// This CA's certificate (and intermediates above it) as PEM.
    #[must_use]
    pub fn chain_pem(&self) -> String {
        pem::encode_certificates(&self.chain)
    }

    /// The private key as PKCS#8 PEM.
    #[must_use]
    pub fn key_pem(&self) -> String {
        pem::encode_private_key(&PrivatePkcs8KeyDer::from(self.issuer.key().serialize_der()))
    }

    /// Start of the CA certificate's validity.
    #[must_use]
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the CA certificate's validity; nothing it issues outlives it.
    #[must_use]
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The rcgen issuer, for signing leaves in the `svid` module.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The validity window of something issued at `now` for `validity`: backdated by
    /// [`BACKDATE`] and clamped to this CA's own validity.
    pub(crate) fn window(
        &self,
        now: SystemTime,
        validity: Duration,
    ) -> Result<(SystemTime, SystemTime), CaError> {
        if now < self.not_before || now >= self.not_after {
            return Err(CaError::Expired {
                trust_domain: self.trust_domain.clone(),
            });
        }
        let not_before = (now - BACKDATE).max(self.not_before);
        let not_after = (now + validity).min(self.not_after);
        Ok((not_before, not_after))
    }
}

/// Generates a fresh ECDSA P-256 key.
fn generate_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Generate {
        action: "generate an ECDSA P-256 key",
        source,
    })
}

/// Certificate parameters shared by roots and intermediates.
fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    constraints: BasicConstraints,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.subject_alt_names =
        vec![
            uri_san(&trust_domain.id()).map_err(|source| CaError::Generate {
                action: "encode the trust domain's URI SAN",
                source,
            })?,
        ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// The trust domain named by a CA certificate's single `spiffe://TD` URI SAN.
pub(crate) fn ca_trust_domain(
    cert: &X509Certificate<'_>,
    what: &str,
) -> Result<TrustDomain, CaError> {
    let no_td = |reason: String| CaError::NoTrustDomain {
        what: what.to_owned(),
        reason,
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| no_td(format!("unreadable SAN extension: {e}")))?
        .ok_or_else(|| no_td("no SAN extension".to_owned()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(no_td(format!("{} URI SANs", uris.len())));
    };
    let id: SpiffeId = uri.parse().map_err(|source| CaError::BadSpiffeId {
        what: what.to_owned(),
        source,
    })?;
    if id.is_workload() {
        return Err(no_td(format!("`{id}` has a path")));
    }
    Ok(id.trust_domain())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn td() -> TrustDomain {
        "example.org".parse().expect("valid trust domain")
    }

    #[test]
    fn root_and_intermediate_carry_the_signing_certificate_profile() {
        let now = SystemTime::now();
        let root = CertificateAuthority::new_root(&td(), DEFAULT_ROOT_VALIDITY, now).expect("root");
        let node = root
            .issue_intermediate("node-1", DEFAULT_INTERMEDIATE_VALIDITY, now)
            .expect("node");
        for (ca, path_len) in [(&root, None), (&node, Some(0))] {
            let (_, cert) = X509Certificate::from_der(ca.certificate()).expect("parses");
            let bc = cert.basic_constraints().expect("bc").expect("present");
            assert!(bc.value.ca);
            assert_eq!(bc.value.path_len_constraint, path_len);
            let ku = cert.key_usage().expect("ku").expect("present");
            assert!(ku.critical);
            assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
            assert!(!ku.value.digital_signature());
            assert_eq!(ca_trust_domain(&cert, "t").expect("td"), td());
        }
        assert_eq!(root.kind(), CaKind::Root);
        assert_eq!(node.kind(), CaKind::Intermediate);
        assert!(root.chain_for_leaves().is_empty());
        assert_eq!(
            node.chain_for_leaves(),
            std::slice::from_ref(node.certificate())
        );
        let year = root
            .not_after()
            .duration_since(root.not_before())
            .expect("order");
        assert_eq!(year, DEFAULT_ROOT_VALIDITY + BACKDATE);
    }

    #[test]
    fn intermediates_never_outlive_the_root() {
        let now = SystemTime::now();
        let day = Duration::from_hours(24);
        let root = CertificateAuthority::new_root(&td(), day, now).expect("root");
        let node = root.issue_intermediate("n", 10 * day, now).expect("node");
        assert_eq!(node.not_after(), root.not_after());
        let err = root
            .issue_intermediate("n", day, now + 2 * day)
            .expect_err("expired root");
        assert!(matches!(err, CaError::Expired { .. }), "{err:?}");
    }

    #[test]
    fn write_then_load_round_trips_with_private_keys_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let root = CertificateAuthority::new_root(&td(), DEFAULT_ROOT_VALIDITY, now).expect("root");
        let node = root
            .issue_intermediate("n", DEFAULT_INTERMEDIATE_VALIDITY, now)
            .expect("node");
        root.write(dir.path(), ROOT_FILE_STEM).expect("write root");
        node.write(dir.path(), NODE_FILE_STEM).expect("write node");
        let mode = std::fs::metadata(dir.path().join("root.key"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let root2 = CertificateAuthority::load(dir.path(), ROOT_FILE_STEM).expect("load root");
        let node2 = CertificateAuthority::load(dir.path(), NODE_FILE_STEM).expect("load node");
        assert_eq!(root2.kind(), CaKind::Root);
        assert_eq!(node2.kind(), CaKind::Intermediate);
        assert_eq!(root2.certificate(), root.certificate());
        assert_eq!(node2.chain_for_leaves(), node.chain_for_leaves());
        assert_eq!(node2.not_after(), node.not_after());
        assert_eq!(node2.trust_domain(), &td());
        // The loaded intermediate can still sign.
        node2
            .issue_intermediate("deeper", Duration::from_mins(1), now)
            .expect("signs");
    }

    #[test]
    fn bad_pem_inputs_are_named() {
        let now = SystemTime::now();
        let root = CertificateAuthority::new_root(&td(), DEFAULT_ROOT_VALIDITY, now).expect("root");
        let other =
            CertificateAuthority::new_root(&td(), DEFAULT_ROOT_VALIDITY, now).expect("other");
        let err = CertificateAuthority::from_pem(&root.chain_pem(), &other.key_pem(), "root.pem")
            .expect_err("wrong key");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("root.pem"), "{err}");

        let err = CertificateAuthority::from_pem(&root.chain_pem(), "junk", "root.pem")
            .expect_err("no key");
        assert!(
            matches!(err, CaError::Pem(PemError::NoPrivateKey { .. })),
            "{err:?}"
        );

        let junk_cert = pem::encode("CERTIFICATE", b"not der");
        let err = CertificateAuthority::from_pem(&junk_cert, &root.key_pem(), "root.pem")
            .expect_err("bad cert");
        assert!(
            matches!(err, CaError::Certificate { index: 0, .. }),
            "{err:?}"
        );

        let leaf = root
            .issue_svid(
                &"spiffe://example.org/w".parse().expect("id"),
                Duration::from_mins(5),
                now,
            )
            .expect("svid");
        let err = CertificateAuthority::from_pem(&leaf.chain_pem(), &leaf.key_pem(), "leaf.pem")
            .expect_err("a leaf is not a CA");
        assert!(matches!(err, CaError::NotACa { .. }), "{err:?}");

        // A CA from a foreign PKI without the trust domain's URI SAN.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let bare = params.self_signed(&key).expect("self-signed");
        let err = CertificateAuthority::from_pem(&bare.pem(), &key.serialize_pem(), "ext.pem")
            .expect_err("no SAN");
        assert!(matches!(err, CaError::NoTrustDomain { .. }), "{err:?}");
        assert!(err.to_string().contains("no SAN extension"), "{err}");

        let junk_key = pem::encode("PRIVATE KEY", b"not a key");
        let err = CertificateAuthority::from_pem(&root.chain_pem(), &junk_key, "root.pem")
            .expect_err("bad key");
        assert!(matches!(err, CaError::Key { .. }), "{err:?}");
    }
}

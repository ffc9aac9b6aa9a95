//! X.509-SVID issuance and loading, per X509-SVID.md: exactly one URI SAN (the workload's
//! SPIFFE ID), cA=false, critical `KeyUsage` with digitalSignature only, EKU serverAuth and
//! clientAuth, a random serial, backdated by [`ca::BACKDATE`](super::ca::BACKDATE), never
//! outliving its issuer.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{
    ca::{CaError, CertificateAuthority},
    pem::{self, PemError},
    spiffe_id::SpiffeId,
    verify::{self, SvidVerifyError},
    x509::{self, random_serial},
};

/// Default lifetime of a workload SVID.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_hours(1);

/// Why an SVID could not be issued or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// Leaf SVIDs need a SPIFFE ID with a path (X509-SVID.md 3.1).
    #[error("`{0}` has no path; only workload IDs get leaf SVIDs")]
    NotAWorkload(SpiffeId),
    /// The ID belongs to another trust domain than the issuing CA.
    #[error("`{id}` is outside the CA's trust domain `{ca_trust_domain}`")]
    ForeignTrustDomain {
        /// The requested ID.
        id: SpiffeId,
        /// The CA's trust domain.
        ca_trust_domain: String,
    },
    /// The issuing CA cannot sign now (expired or not yet valid).
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rcgen failed to generate the key or sign the certificate.
    #[error("failed to {action} for the SVID")]
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
    /// The loaded leaf certificate breaks an X509-SVID rule.
    #[error("{what}: leaf certificate is not a valid X509-SVID")]
    Leaf {
        /// What was being loaded.
        what: String,
        /// The rule it breaks.
        #[source]
        source: SvidVerifyError,
    },
    /// The loaded private key is not a PKCS#8 P-256 key or does not match the leaf.
    #[error("{what}: private key is not the leaf's PKCS#8 ECDSA P-256 key")]
    KeyMismatch {
        /// What was being loaded.
        what: String,
    },
}

/// An X.509-SVID: the leaf, the intermediates that chain it to the trust bundle, and its key.
#[derive(Debug)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    /// Leaf first, then intermediates (never the root).
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl CertificateAuthority {
    /// Issues an X.509-SVID for the workload `id`, valid from `now` minus
    /// [`ca::BACKDATE`](super::ca::BACKDATE) for `ttl`, cut short at this CA's expiry.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<X509Svid, SvidError> {
        if !id.is_workload() {
            return Err(SvidError::NotAWorkload(id.clone()));
        }
        if id.trust_domain_str() != self.trust_domain().as_str() {
            return Err(SvidError::ForeignTrustDomain {
                id: id.clone(),
                ca_trust_domain: self.trust_domain().to_string(),
            });
        }
        let (not_before, not_after) = self.window(now, ttl)?;
        let generate = |action| move |source| SvidError::Generate { action, source };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(generate("generate an ECDSA P-256 key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain().as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![x509::uri_san(id).map_err(generate("encode the URI SAN"))?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, self.issuer())
            .map_err(generate("sign the certificate"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain_for_leaves().iter().cloned());
        Ok(X509Svid {
            spiffe_id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: x509::to_whole_seconds(not_before),
            not_after: x509::to_whole_seconds(not_after),
        })
    }
}

impl X509Svid {
    /// Loads an SVID from PEM (leaf first, then intermediates) and its PKCS#8 key, checking
    /// the leaf against the X509-SVID rules and the key against the leaf.
    pub fn from_pem(chain_pem: &str, key_pem: &str, what: &str) -> Result<Self, SvidError> {
        let chain = pem::parse_certificates(chain_pem, what)?;
        let key = pem::parse_private_key(key_pem, what)?;
        let leaf = verify::inspect_leaf(&chain[0]).map_err(|source| SvidError::Leaf {
            what: what.to_owned(),
            source,
        })?;
        let mismatch = || SvidError::KeyMismatch {
            what: what.to_owned(),
        };
        let pair = KeyPair::from_pkcs8_der_and_sign_algo(&key, &PKCS_ECDSA_P256_SHA256)
            .map_err(|_| mismatch())?;
        let (_, cert) = X509Certificate::from_der(&chain[0]).map_err(|_| mismatch())?;
        if cert.public_key().subject_public_key.data.as_ref() != pair.public_key_raw() {
            return Err(mismatch());
        }
        Ok(Self {
            spiffe_id: leaf.spiffe_id,
            chain,
            key,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// Writes `<stem>.pem` (chain, 0644) and `<stem>.key` (PKCS#8, 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), SvidError> {
        pem::write_private(&dir.join(format!("{stem}.key")), &self.key_pem())?;
        pem::write_public(&dir.join(format!("{stem}.pem")), &self.chain_pem())?;
        Ok(())
    }

    /// The workload's SPIFFE ID.
    #[must_use]
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// Leaf first, then intermediates; what a TLS endpoint presents.
    #[must_use]
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key, in the form rustls takes it.
    #[must_use]
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The chain and signing key in the form rustls certificate resolvers hand out.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let provider = x509::provider();
        Ok(Arc::new(CertifiedKey::from_der(
            self.chain.clone(),
            self.private_key(),
            &provider,
        )?))
    }

    /// The chain as PEM.
    #[must_use]
    pub fn chain_pem(&self) -> String {
        pem::encode_certificates(&self.chain)
    }

    /// The private key as PKCS#8 PEM.
    #[must_use]
    pub fn key_pem(&self) -> String {
        pem::encode_private_key(&self.key)
    }

    /// Start of the leaf's validity (already backdated).
    #[must_use]
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    #[must_use]
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{BACKDATE, DEFAULT_ROOT_VALIDITY};

    fn node(now: SystemTime) -> CertificateAuthority {
        let td = "example.org".parse().expect("td");
        CertificateAuthority::new_root(&td, DEFAULT_ROOT_VALIDITY, now)
            .expect("root")
            .issue_intermediate("n", Duration::from_hours(2), now)
            .expect("node")
    }

    #[test]
    fn issued_svids_follow_the_x509_svid_profile() {
        let now = SystemTime::now();
        let ca = node(now);
        let id: SpiffeId = "spiffe://example.org/web".parse().expect("id");
        let svid = ca.issue_svid(&id, DEFAULT_SVID_TTL, now).expect("svid");
        assert_eq!(svid.chain().len(), 2);
        assert_eq!(&svid.chain()[1], ca.certificate());
        let (_, leaf) = X509Certificate::from_der(&svid.chain()[0]).expect("parses");
        assert!(
            !leaf
                .basic_constraints()
                .expect("bc")
                .expect("present")
                .value
                .ca
        );
        let ku = leaf.key_usage().expect("ku").expect("present");
        assert!(ku.critical);
        assert_eq!(ku.value.flags, 1, "digitalSignature only");
        let eku = leaf.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert_eq!(leaf.raw_serial().len(), 16);
        let facts = verify::inspect_leaf(&svid.chain()[0]).expect("valid leaf");
        assert_eq!(facts.spiffe_id, id);
        assert_eq!(
            svid.not_after()
                .duration_since(svid.not_before())
                .expect("order"),
            DEFAULT_SVID_TTL + BACKDATE
        );
        let other = ca.issue_svid(&id, DEFAULT_SVID_TTL, now).expect("svid");
        let (_, other) = X509Certificate::from_der(&other.chain()[0]).expect("parses");
        assert_ne!(leaf.raw_serial(), other.raw_serial());
    }

    #[test]
    fn svids_never_outlive_the_issuer_and_need_a_workload_id() {
        let now = SystemTime::now();
        let ca = node(now);
        let id: SpiffeId = "spiffe://example.org/web".parse().expect("id");
        let svid = ca
            .issue_svid(&id, Duration::from_hours(24), now)
            .expect("svid");
        assert_eq!(svid.not_after(), ca.not_after());
        let err = ca
            .issue_svid(&ca.trust_domain().id(), DEFAULT_SVID_TTL, now)
            .expect_err("no path");
        assert!(matches!(err, SvidError::NotAWorkload(_)), "{err:?}");
        let foreign: SpiffeId = "spiffe://other.org/web".parse().expect("id");
        let err = ca
            .issue_svid(&foreign, DEFAULT_SVID_TTL, now)
            .expect_err("foreign");
        assert!(
            matches!(err, SvidError::ForeignTrustDomain { .. }),
            "{err:?}"
        );
        let err = ca
            .issue_svid(&id, DEFAULT_SVID_TTL, now + Duration::from_secs(7201))
            .expect_err("expired CA");
        assert!(
            matches!(err, SvidError::Ca(CaError::Expired { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn pem_round_trip_checks_the_key() {
        let now = SystemTime::now();
        let ca = node(now);
        let id: SpiffeId = "spiffe://example.org/db".parse().expect("id");
        let svid = ca.issue_svid(&id, DEFAULT_SVID_TTL, now).expect("svid");
        let back =
            X509Svid::from_pem(&svid.chain_pem(), &svid.key_pem(), "svid.pem").expect("loads");
        assert_eq!(back.spiffe_id(), &id);
        assert_eq!(back.chain(), svid.chain());
        assert_eq!(back.not_after(), svid.not_after());
        let certified = back.certified_key().expect("usable by rustls");
        assert_eq!(certified.cert, svid.chain());
        let other = ca.issue_svid(&id, DEFAULT_SVID_TTL, now).expect("svid");
        let err = X509Svid::from_pem(&svid.chain_pem(), &other.key_pem(), "svid.pem")
            .expect_err("wrong key");
        assert!(matches!(err, SvidError::KeyMismatch { .. }), "{err:?}");
        let err =
            X509Svid::from_pem(&ca.chain_pem(), &svid.key_pem(), "ca.pem").expect_err("CA as leaf");
        assert!(matches!(err, SvidError::Leaf { .. }), "{err:?}");
    }
}

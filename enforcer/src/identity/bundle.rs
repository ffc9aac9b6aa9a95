//! Trust bundles: the CA certificates each trust domain's SVIDs chain to, as PEM and as
//! SPIFFE bundle JSON (a JWK set, `SPIFFE_Trust_Domain_and_Bundle.md` and X509-SVID.md 6), for
//! one trust domain or several at once (federation).

use std::{collections::BTreeMap, time::Duration};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rustls_pki_types::{CertificateDer, TrustAnchor};
use serde::{Deserialize, Serialize};
use x509_parser::{
    prelude::{FromDer as _, X509Certificate},
    public_key::PublicKey,
};

use super::{
    ca::{self, CaError},
    pem::{self, PemError},
    spiffe_id::{SpiffeIdError, TrustDomain},
};

/// The JWK `use` value of X509-SVID authorities.
const X509_SVID_USE: &str = "x509-svid";

/// Why a trust bundle could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The PEM input is malformed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The JSON document does not parse or has the wrong shape.
    #[error("{what}: invalid SPIFFE bundle JSON at line {line}, column {column}")]
    Json {
        /// What was being read.
        what: String,
        /// 1-based line of the error (0 when writing).
        line: usize,
        /// 1-based column of the error (0 when writing).
        column: usize,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON field has a bad value; `field` is a path such as `keys[2].x5c[0]`.
    #[error("{what}: `{field}`: {reason}")]
    Field {
        /// What was being read.
        what: String,
        /// Where in the document.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A federated document names an invalid trust domain.
    #[error("{what}: invalid trust domain `{name}`")]
    TrustDomain {
        /// What was being read.
        what: String,
        /// The name as written.
        name: String,
        /// Why it is invalid.
        #[source]
        source: SpiffeIdError,
    },
    /// An authority certificate is not a parseable X.509 CA certificate.
    #[error("{what}: authority {index} is not an X.509 CA certificate: {reason}")]
    Authority {
        /// What was being read.
        what: String,
        /// 0-based position of the certificate in the input.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// In federated PEM, a CA certificate does not name its trust domain in a URI SAN.
    #[error("{what}: authority {index} does not name its trust domain")]
    UnnamedAuthority {
        /// What was being read.
        what: String,
        /// 0-based position of the certificate in the input.
        index: usize,
        /// Why the trust domain could not be read.
        #[source]
        source: CaError,
    },
    /// The authority's public key cannot be expressed as a JWK by this implementation.
    #[error("authority {index}: public key type not supported in a JWK (EC P-256/P-384, RSA)")]
    UnsupportedKey {
        /// 0-based position of the certificate in the bundle.
        index: usize,
    },
}

/// The X.509 authorities of one trust domain, with the bundle metadata SPIFFE defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
    /// The authorities in the form webpki verifies against, prepared once per bundle.
    anchors: Vec<TrustAnchor<'static>>,
    refresh_hint: Option<Duration>,
    sequence: Option<u64>,
}

/// One SPIFFE bundle document (a JWK set plus SPIFFE parameters).
#[derive(Serialize, Deserialize)]
struct BundleDoc {
    keys: Vec<Jwk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
}

/// One JWK entry; unknown members are ignored on input.
#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    usage: Option<String>,
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

impl TrustBundle {
    /// A bundle of `authorities` (CA certificates) for `trust_domain`; each must parse as an
    /// X.509 certificate with cA=true.
    pub fn new(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        Self::build(trust_domain, authorities, "trust bundle")
    }

    /// Checks every authority and prepares its trust anchor; `what` names the source.
    fn build(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
        what: &str,
    ) -> Result<Self, BundleError> {
        let mut anchors = Vec::with_capacity(authorities.len());
        for (index, der) in authorities.iter().enumerate() {
            check_authority(der, index, what)?;
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| BundleError::Authority {
                    what: what.to_owned(),
                    index,
                    reason: format!("unusable as a trust anchor: {e}"),
                })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            trust_domain,
            authorities,
            anchors,
            refresh_hint: None,
            sequence: None,
        })
    }

    /// Reads the CA certificates of `trust_domain` from PEM.
    pub fn from_pem(
        trust_domain: TrustDomain,
        input: &str,
        what: &str,
    ) -> Result<Self, BundleError> {
        Self::build(trust_domain, pem::parse_certificates(input, what)?, what)
    }

    /// The authorities as concatenated PEM certificates.
    #[must_use]
    pub fn to_pem(&self) -> String {
        pem::encode_certificates(&self.authorities)
    }

    /// Reads a SPIFFE bundle JSON document for `trust_domain`. Entries whose `use` is not
    /// `x509-svid`, or whose `x5c` is missing or empty, are ignored (X509-SVID.md 6.2).
    pub fn from_json(
        trust_domain: TrustDomain,
        input: &str,
        what: &str,
    ) -> Result<Self, BundleError> {
        let doc: BundleDoc = serde_json::from_str(input).map_err(|source| BundleError::Json {
            what: what.to_owned(),
            line: source.line(),
            column: source.column(),
            source,
        })?;
        Self::from_doc(trust_domain, doc, what, "")
    }

    /// Writes the SPIFFE bundle JSON document (pretty-printed).
    pub fn to_json(&self) -> Result<String, BundleError> {
        let doc = self.to_doc()?;
        serde_json::to_string_pretty(&doc).map_err(|source| BundleError::Json {
            what: format!("bundle of {}", self.trust_domain),
            line: source.line(),
            column: source.column(),
            source,
        })
    }

    /// The trust domain whose authorities these are.
    #[must_use]
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates.
    #[must_use]
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// The authorities as webpki trust anchors.
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// How often consumers should poll for a new bundle (`spiffe_refresh_hint`).
    #[must_use]
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// The bundle's version (`spiffe_sequence`).
    #[must_use]
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// Sets the refresh hint published in JSON.
    pub fn set_refresh_hint(&mut self, hint: Option<Duration>) {
        self.refresh_hint = hint;
    }

    /// Sets the sequence number published in JSON.
    pub fn set_sequence(&mut self, sequence: Option<u64>) {
        self.sequence = sequence;
    }

    /// Converts a parsed document; `prefix` names its place in an enclosing document.
    fn from_doc(
        trust_domain: TrustDomain,
        doc: BundleDoc,
        what: &str,
        prefix: &str,
    ) -> Result<Self, BundleError> {
        let mut authorities = Vec::new();
        for (i, jwk) in doc.keys.into_iter().enumerate() {
            if jwk.usage.as_deref() != Some(X509_SVID_USE) {
                continue;
            }
            let Some(first) = jwk.x5c.and_then(|x5c| x5c.into_iter().next()) else {
                continue;
            };
            let field = format!("{prefix}keys[{i}].x5c[0]");
            let der = STANDARD
                .decode(first.as_bytes())
                .map_err(|e| BundleError::Field {
                    what: what.to_owned(),
                    field: field.clone(),
                    reason: format!("not base64: {e}"),
                })?;
            let der = CertificateDer::from(der);
            check_authority(&der, i, what).map_err(|e| BundleError::Field {
                what: what.to_owned(),
                field,
                reason: e.to_string(),
            })?;
            authorities.push(der);
        }
        let mut bundle = Self::build(trust_domain, authorities, what)?;
        bundle.refresh_hint = doc.spiffe_refresh_hint.map(Duration::from_secs);
        bundle.sequence = doc.spiffe_sequence;
        Ok(bundle)
    }

    /// Builds the JSON document.
    fn to_doc(&self) -> Result<BundleDoc, BundleError> {
        let keys = self
            .authorities
            .iter()
            .enumerate()
            .map(|(index, der)| jwk_for(der, index))
            .collect::<Result<_, _>>()?;
        Ok(BundleDoc {
            keys,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
            spiffe_sequence: self.sequence,
        })
    }
}

/// The bundles of every trust domain a node trusts: its own and the federated ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundleSet {
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

impl TrustBundleSet {
    /// An empty set (trusts nothing).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }

    /// The bundle of `trust_domain`, if trusted.
    #[must_use]
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundle of the trust domain called `name`, if trusted.
    #[must_use]
    pub fn get_by_name(&self, name: &str) -> Option<&TrustBundle> {
        self.bundles
            .values()
            .find(|b| b.trust_domain.as_str() == name)
    }

    /// All bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values()
    }

    /// Reads CA certificates of several trust domains from one PEM input; each certificate's
    /// URI SAN (`spiffe://TD`) says which trust domain it belongs to.
    pub fn from_pem(input: &str, what: &str) -> Result<Self, BundleError> {
        let mut by_domain: BTreeMap<TrustDomain, Vec<CertificateDer<'static>>> = BTreeMap::new();
        for (index, der) in pem::parse_certificates(input, what)?
            .into_iter()
            .enumerate()
        {
            let cert = check_authority(&der, index, what)?;
            let td = ca::ca_trust_domain(&cert, what).map_err(|source| {
                BundleError::UnnamedAuthority {
                    what: what.to_owned(),
                    index,
                    source,
                }
            })?;
            by_domain.entry(td).or_default().push(der);
        }
        let mut set = Self::new();
        for (td, authorities) in by_domain {
            set.insert(TrustBundle::build(td, authorities, what)?);
        }
        Ok(set)
    }

    /// Every authority of every trust domain as PEM.
    #[must_use]
    pub fn to_pem(&self) -> String {
        self.bundles.values().map(TrustBundle::to_pem).collect()
    }

    /// Reads a JSON object mapping trust domain names to SPIFFE bundle documents.
    pub fn from_json(input: &str, what: &str) -> Result<Self, BundleError> {
        let docs: BTreeMap<String, BundleDoc> =
            serde_json::from_str(input).map_err(|source| BundleError::Json {
                what: what.to_owned(),
                line: source.line(),
                column: source.column(),
                source,
            })?;
        let mut set = Self::new();
        for (name, doc) in docs {
            let td: TrustDomain = name.parse().map_err(|source| BundleError::TrustDomain {
                what: what.to_owned(),
                name: name.clone(),
                source,
            })?;
            let prefix = format!("{name}.");
            set.insert(TrustBundle::from_doc(td, doc, what, &prefix)?);
        }
        Ok(set)
    }

    /// Writes the JSON object mapping trust domain names to SPIFFE bundle documents.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let docs = self
            .bundles
            .iter()
            .map(|(td, b)| Ok((td.as_str(), b.to_doc()?)))
            .collect::<Result<BTreeMap<_, _>, BundleError>>()?;
        serde_json::to_string_pretty(&docs).map_err(|source| BundleError::Json {
            what: "federated bundle".to_owned(),
            line: source.line(),
            column: source.column(),
            source,
        })
    }
}

/// Parses `der` and checks it is a CA certificate.
fn check_authority<'a>(
    der: &'a CertificateDer<'_>,
    index: usize,
    what: &str,
) -> Result<X509Certificate<'a>, BundleError> {
    let bad = |reason: String| BundleError::Authority {
        what: what.to_owned(),
        index,
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    if !cert.is_ca() {
        return Err(bad("basicConstraints cA is not true".to_owned()));
    }
    Ok(cert)
}

/// The JWK describing one authority, with its certificate in `x5c`.
fn jwk_for(der: &CertificateDer<'_>, index: usize) -> Result<Jwk, BundleError> {
    let unsupported = || BundleError::UnsupportedKey { index };
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| unsupported())?;
    let mut jwk = Jwk {
        usage: Some(X509_SVID_USE.to_owned()),
        kty: String::new(),
        crv: None,
        x: None,
        y: None,
        n: None,
        e: None,
        x5c: Some(vec![STANDARD.encode(der)]),
    };
    match cert.public_key().parsed().map_err(|_| unsupported())? {
        PublicKey::EC(point) => {
            let (crv, len) = match point.data().len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                _ => return Err(unsupported()),
            };
            let data = point.data();
            "EC".clone_into(&mut jwk.kty);
            jwk.crv = Some(crv.to_owned());
            jwk.x = Some(URL_SAFE_NO_PAD.encode(&data[1..=len]));
            jwk.y = Some(URL_SAFE_NO_PAD.encode(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            "RSA".clone_into(&mut jwk.kty);
            jwk.n = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)));
            jwk.e = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)));
        }
        _ => return Err(unsupported()),
    }
    Ok(jwk)
}

/// Drops the leading zero octets of a DER integer (JWK wants the unsigned big-endian value).
fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::identity::ca::{CertificateAuthority, DEFAULT_ROOT_VALIDITY};

    fn root(td: &str) -> CertificateAuthority {
        CertificateAuthority::new_root(
            &td.parse().expect("td"),
            DEFAULT_ROOT_VALIDITY,
            SystemTime::now(),
        )
        .expect("root")
    }

    #[test]
    fn json_round_trips_with_spiffe_parameters() {
        let (a, b) = (root("example.org"), root("example.org"));
        let mut bundle = TrustBundle::new(
            a.trust_domain().clone(),
            vec![a.certificate().clone(), b.certificate().clone()],
        )
        .expect("bundle");
        bundle.set_refresh_hint(Some(Duration::from_mins(5)));
        bundle.set_sequence(Some(7));
        let json = bundle.to_json().expect("json");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let key = &value["keys"][0];
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert!(key.get("kid").is_none());
        assert_eq!(key["x5c"].as_array().expect("x5c").len(), 1);
        assert_eq!(value["spiffe_refresh_hint"], 300);
        assert_eq!(value["spiffe_sequence"], 7);
        let back =
            TrustBundle::from_json(bundle.trust_domain().clone(), &json, "b.json").expect("reads");
        assert_eq!(back, bundle);
    }

    #[test]
    fn json_ignores_other_uses_and_empty_x5c_and_names_bad_fields() {
        let a = root("example.org");
        let td = a.trust_domain().clone();
        let cert = STANDARD.encode(a.certificate());
        let json = format!(
            r#"{{"keys":[{{"use":"jwt-svid","kty":"EC","kid":"k"}},
                {{"use":"x509-svid","kty":"EC"}},
                {{"use":"x509-svid","kty":"EC","x5c":[]}},
                {{"use":"x509-svid","kty":"EC","x5c":["{cert}","ignored"]}}]}}"#
        );
        let bundle = TrustBundle::from_json(td.clone(), &json, "b.json").expect("reads");
        assert_eq!(bundle.authorities(), std::slice::from_ref(a.certificate()));
        assert_eq!(bundle.refresh_hint(), None);

        let bad = r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["@@@"]}]}"#;
        let err = TrustBundle::from_json(td.clone(), bad, "b.json").expect_err("bad base64");
        assert!(err.to_string().contains("keys[0].x5c[0]"), "{err}");
        let not_cert = format!(
            r#"{{"keys":[{{"use":"x509-svid","kty":"EC","x5c":["{}"]}}]}}"#,
            STANDARD.encode(b"xx")
        );
        let err = TrustBundle::from_json(td.clone(), &not_cert, "b.json").expect_err("not a cert");
        assert!(err.to_string().contains("keys[0].x5c[0]"), "{err}");
        let err = TrustBundle::from_json(td, "{\"keys\": 3}", "b.json").expect_err("bad shape");
        assert!(
            matches!(
                err,
                BundleError::Json {
                    line: 1,
                    column: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("line 1, column 10"), "{err}");
    }

    #[test]
    fn federated_sets_round_trip_as_pem_and_json() {
        let (a, b) = (root("a.example"), root("b.example"));
        let pem = format!("{}{}", a.chain_pem(), b.chain_pem());
        let set = TrustBundleSet::from_pem(&pem, "bundle.pem").expect("pem");
        assert_eq!(set.iter().count(), 2);
        assert_eq!(
            set.get_by_name("a.example").expect("a").authorities(),
            std::slice::from_ref(a.certificate())
        );
        assert_eq!(
            set.get(b.trust_domain()).expect("b").authorities(),
            std::slice::from_ref(b.certificate())
        );
        assert_eq!(
            TrustBundleSet::from_pem(&set.to_pem(), "again").expect("pem"),
            set
        );
        let json = set.to_json().expect("json");
        assert_eq!(
            TrustBundleSet::from_json(&json, "fed.json").expect("json"),
            set
        );

        let err =
            TrustBundleSet::from_json(r#"{"Bad":{"keys":[]}}"#, "fed.json").expect_err("bad td");
        assert!(matches!(err, BundleError::TrustDomain { .. }), "{err:?}");
        let bad = r#"{"x.org":{"keys":[{"use":"x509-svid","kty":"EC","x5c":["!"]}]}}"#;
        let err = TrustBundleSet::from_json(bad, "fed.json").expect_err("bad cert");
        assert!(err.to_string().contains("x.org.keys[0].x5c[0]"), "{err}");
    }

    #[test]
    fn leaf_certificates_are_not_authorities() {
        let a = root("example.org");
        let svid = a
            .issue_svid(
                &"spiffe://example.org/w".parse().expect("id"),
                Duration::from_mins(1),
                SystemTime::now(),
            )
            .expect("svid");
        let err = TrustBundle::from_pem(a.trust_domain().clone(), &svid.chain_pem(), "b.pem")
            .expect_err("leaf");
        assert!(
            matches!(err, BundleError::Authority { index: 0, .. }),
            "{err:?}"
        );
    }
}

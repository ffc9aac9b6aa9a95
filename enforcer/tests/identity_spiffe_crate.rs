//! Interop with the `spiffe` crate (the Rust SPIFFE library, X.509 types only): it parses the
//! SVIDs and bundles the identity module issues and reports the same SPIFFE IDs, and it agrees
//! with our parser on which SPIFFE ID strings are valid.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::time::{Duration, SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use enforcer::identity::{
    CertificateAuthority, DEFAULT_ROOT_VALIDITY, DEFAULT_SVID_TTL, SpiffeId, TrustBundle,
    TrustDomain, X509Svid, parse_certificates, parse_private_key,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A root and a node CA of `example.org`, and the root's bundle.
fn pki() -> (CertificateAuthority, CertificateAuthority, TrustBundle) {
    let now = SystemTime::now();
    let td: TrustDomain = "example.org".parse().expect("td");
    let root = CertificateAuthority::new_root(&td, DEFAULT_ROOT_VALIDITY, now).expect("root");
    let node = root
        .issue_intermediate("node-1", Duration::from_hours(2), now)
        .expect("node");
    let bundle = TrustBundle::new(td, vec![root.certificate().clone()]).expect("bundle");
    (root, node, bundle)
}

/// Concatenated DER, the form `spiffe` parses chains and bundles from.
fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// Parses `svid` with the `spiffe` crate, from its PEM form as written to disk.
fn parse_with_spiffe_crate(svid: &X509Svid) -> spiffe::X509Svid {
    let chain = parse_certificates(&svid.chain_pem(), "svid").expect("our PEM");
    let key = parse_private_key(&svid.key_pem(), "svid").expect("our key PEM");
    spiffe::X509Svid::parse_from_der(&concat(&chain), key.secret_pkcs8_der())
        .unwrap_or_else(|e| panic!("spiffe crate rejects the SVID of {}: {e}", svid.spiffe_id()))
}

#[test]
fn spiffe_crate_parses_our_svids_and_reports_the_same_id() {
    let (_, node, _) = pki();
    for id in [
        "spiffe://example.org/web",
        "spiffe://example.org/ns/prod/sa/web-1",
        "spiffe://example.org/a.b_c-d/0123456789",
    ] {
        let ours: SpiffeId = id.parse().expect("id");
        let svid = node
            .issue_svid(&ours, DEFAULT_SVID_TTL, SystemTime::now())
            .expect("svid");
        let theirs = parse_with_spiffe_crate(&svid);
        assert_eq!(theirs.spiffe_id().to_string(), ours.as_str());
        assert_eq!(
            theirs.spiffe_id().trust_domain_name(),
            ours.trust_domain_str()
        );
        assert_eq!(theirs.spiffe_id().path(), ours.path());
        let chain: Vec<&[u8]> = theirs
            .cert_chain()
            .iter()
            .map(spiffe::Certificate::as_bytes)
            .collect();
        let expected: Vec<&[u8]> = svid.chain().iter().map(AsRef::as_ref).collect();
        assert_eq!(chain, expected, "leaf then intermediate, unchanged");
        let PrivateKeyDer::Pkcs8(key) = svid.private_key() else {
            panic!("our SVID keys are PKCS#8");
        };
        assert_eq!(theirs.private_key().as_bytes(), key.secret_pkcs8_der());
    }
}

#[test]
fn spiffe_crate_reads_our_ca_certificates_as_trust_domain_ids() {
    let (root, node, _) = pki();
    for ca in [&root, &node] {
        let id = spiffe::cert::spiffe_id_from_der(ca.certificate()).expect("URI SAN");
        assert_eq!(id.to_string(), "spiffe://example.org");
        assert_eq!(id.path(), "");
    }
    // And it refuses a CA certificate where a leaf belongs, as the X509-SVID rules say.
    let key = parse_private_key(&node.key_pem(), "node.key").expect("key");
    let err = spiffe::X509Svid::parse_from_der(node.certificate(), key.secret_pkcs8_der())
        .expect_err("a CA is not a leaf SVID");
    assert!(
        matches!(
            err,
            spiffe::X509SvidError::LeafCertificateHasCaFlag
                | spiffe::X509SvidError::LeafCertificateMissingDigitalSignature
        ),
        "{err:?}"
    );
}

#[test]
fn spiffe_crate_parses_our_bundles_as_pem_and_json() {
    let (root, _, bundle) = pki();
    let td = spiffe::TrustDomain::new(bundle.trust_domain().as_str()).expect("trust domain");
    assert_eq!(td.to_string(), bundle.trust_domain().as_str());

    let from_pem = spiffe::X509Bundle::parse_from_der(
        td.clone(),
        &concat(&parse_certificates(&bundle.to_pem(), "bundle.pem").expect("PEM")),
    )
    .expect("spiffe crate parses the PEM bundle");

    let doc: serde_json::Value =
        serde_json::from_str(&bundle.to_json().expect("to_json")).expect("JSON");
    let x5c: Vec<Vec<u8>> = doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|key| key["use"] == "x509-svid")
        .map(|key| {
            let [cert] = key["x5c"].as_array().expect("x5c").as_slice() else {
                panic!("one certificate per x509-svid key: {key}");
            };
            STANDARD
                .decode(cert.as_str().expect("string"))
                .expect("base64")
        })
        .collect();
    let refs: Vec<&[u8]> = x5c.iter().map(Vec::as_slice).collect();
    let from_json = spiffe::X509Bundle::from_x509_authorities(td.clone(), &refs)
        .expect("spiffe crate parses the JSON bundle's authorities");

    for theirs in [&from_pem, &from_json] {
        assert_eq!(theirs.trust_domain(), &td);
        let authorities: Vec<&[u8]> = theirs
            .authorities()
            .iter()
            .map(spiffe::Certificate::as_bytes)
            .collect();
        assert_eq!(authorities, [root.certificate().as_ref()]);
    }
}

#[test]
fn spiffe_crate_and_our_parser_agree_on_spiffe_ids() {
    let long_path = format!("spiffe://example.org/{}", "a".repeat(2000));
    for text in [
        "spiffe://example.org",
        "spiffe://example.org/",
        "spiffe://example.org/ns/prod",
        "spiffe://example.org/a/./b",
        "spiffe://example.org/a/../b",
        "spiffe://example.org//a",
        "spiffe://example.org/a%20b",
        "spiffe://example.org/a?q",
        "spiffe://example.org/a#f",
        "spiffe://example.org/A-Z_a.z~0",
        "spiffe://ex_am-ple.0rg/a",
        "spiffe://example.org:8080/a",
        "spiffe://user@example.org/a",
        "spiffe:///a",
        "https://example.org/a",
        "example.org/a",
        "",
        long_path.as_str(),
    ] {
        let ours = text.parse::<SpiffeId>();
        let theirs = spiffe::SpiffeId::new(text);
        match (&ours, &theirs) {
            (Ok(ours), Ok(theirs)) => assert_eq!(theirs.to_string(), ours.as_str(), "{text}"),
            (Err(_), Err(_)) => {}
            _ => panic!("disagree on {text:?}: ours {ours:?}, spiffe crate {theirs:?}"),
        }
    }
}

#[test]
fn spiffe_crate_lowercases_what_we_reject() {
    // SPIFFE-ID.md allows only the lowercase scheme and lowercase trust domain characters; we
    // reject anything else, while the spiffe crate lowercases it. Neither yields a different
    // ID for the same accepted input.
    for text in ["spiffe://Example.org/a", "SPIFFE://example.org/a"] {
        assert!(text.parse::<SpiffeId>().is_err(), "we accept {text}");
        let theirs = spiffe::SpiffeId::new(text).expect("spiffe crate lowercases");
        assert_eq!(theirs.to_string(), "spiffe://example.org/a");
    }
}

//! Interop with OpenSSL: certificates the identity module writes must verify with
//! `openssl verify` and carry the X509-SVID extensions `openssl x509 -text` shows.
//! Needs the `openssl` command; without it the tests fail rather than pass silently.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use enforcer::{
    identity::{
        CertificateAuthority, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_ROOT_VALIDITY,
        DEFAULT_SVID_TTL, NODE_FILE_STEM, ROOT_FILE_STEM, TrustBundle, TrustBundleSet, X509Svid,
        encode_certificates, write_public,
    },
    testing::{openssl, output_text, x509_text},
};

/// Writes root, node and a workload SVID into `dir` as the daemon's state dir would hold them.
fn write_pki(dir: &Path) -> (CertificateAuthority, CertificateAuthority, X509Svid) {
    let now = SystemTime::now();
    let td = "example.org".parse().expect("td");
    let root = CertificateAuthority::new_root(&td, DEFAULT_ROOT_VALIDITY, now).expect("root");
    let node = root
        .issue_intermediate("node-1", DEFAULT_INTERMEDIATE_VALIDITY, now)
        .expect("node");
    let leaf = node
        .issue_svid(
            &"spiffe://example.org/ns/prod/web".parse().expect("id"),
            DEFAULT_SVID_TTL,
            now,
        )
        .expect("svid");
    root.write(dir, ROOT_FILE_STEM).expect("write root");
    node.write(dir, NODE_FILE_STEM).expect("write node");
    leaf.write(dir, "leaf").expect("write leaf");
    let bundle = TrustBundle::new(td, vec![root.certificate().clone()]).expect("bundle");
    write_public(&dir.join("bundle.pem"), &bundle.to_pem()).expect("write bundle");
    // The leaf alone, for `openssl verify`, which reads only the first certificate.
    write_public(
        &dir.join("leaf-only.pem"),
        &encode_certificates(&leaf.chain()[..1]),
    )
    .expect("write leaf only");
    (root, node, leaf)
}

#[test]
fn openssl_verifies_the_chain_for_tls_client_and_server_purposes() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    for purpose in ["sslclient", "sslserver"] {
        let out = openssl(
            dir.path(),
            &[
                "verify",
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                "node.pem",
                "-purpose",
                purpose,
                "-x509_strict",
                "leaf-only.pem",
            ],
        );
        assert!(
            out.status.success(),
            "openssl verify ({purpose}) failed:\n{}",
            output_text(&out)
        );
        assert!(
            output_text(&out).contains("leaf-only.pem: OK"),
            "{}",
            output_text(&out)
        );
    }
    // Without the intermediate the chain is incomplete.
    let out = openssl(
        dir.path(),
        &["verify", "-CAfile", "bundle.pem", "leaf-only.pem"],
    );
    assert!(
        !out.status.success(),
        "verified without the intermediate:\n{}",
        output_text(&out)
    );
}

#[test]
fn openssl_shows_the_x509_svid_extensions() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    let show = |file: &str| x509_text(dir.path(), file);
    let leaf = show("leaf-only.pem");
    for expected in [
        "X509v3 Key Usage: critical\nDigital Signature\n",
        "X509v3 Extended Key Usage:\nTLS Web Server Authentication, TLS Web Client Authentication",
        "X509v3 Basic Constraints: critical\nCA:FALSE",
        "X509v3 Subject Alternative Name:\nURI:spiffe://example.org/ns/prod/web\n",
        "Public Key Algorithm: id-ecPublicKey",
        "NIST CURVE: P-256",
    ] {
        assert!(leaf.contains(expected), "leaf lacks {expected:?}:\n{leaf}");
    }
    let node = show("node.pem");
    for expected in [
        "X509v3 Key Usage: critical\nCertificate Sign, CRL Sign\n",
        "X509v3 Basic Constraints: critical\nCA:TRUE, pathlen:0",
        "URI:spiffe://example.org\n",
    ] {
        assert!(node.contains(expected), "node lacks {expected:?}:\n{node}");
    }
    let root = show("root.pem");
    for expected in [
        "X509v3 Key Usage: critical\nCertificate Sign, CRL Sign\n",
        "X509v3 Basic Constraints: critical\nCA:TRUE\n",
        "URI:spiffe://example.org\n",
    ] {
        assert!(root.contains(expected), "root lacks {expected:?}:\n{root}");
    }
}

#[test]
fn openssl_reads_the_keys_and_they_match_the_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    for (cert, key) in [
        ("root.pem", "root.key"),
        ("node.pem", "node.key"),
        ("leaf.pem", "leaf.key"),
    ] {
        let from_cert = openssl(dir.path(), &["x509", "-in", cert, "-noout", "-pubkey"]);
        let from_key = openssl(dir.path(), &["pkey", "-in", key, "-pubout"]);
        assert!(
            from_cert.status.success() && from_key.status.success(),
            "{}{}",
            output_text(&from_cert),
            output_text(&from_key)
        );
        assert_eq!(
            from_cert.stdout, from_key.stdout,
            "{key} does not match {cert}"
        );
    }
}

#[test]
fn openssl_written_pki_loads_back() {
    // A root made by openssl (an existing PKI) is accepted as a CA and can sign SVIDs that
    // chain to it.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ext.key",
            "-out",
            "ext.pem",
            "-days",
            "2",
            "-subj",
            "/O=ext/CN=ext root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectAltName=URI:spiffe://ext.example",
        ],
    );
    assert!(
        out.status.success(),
        "openssl req failed:\n{}",
        output_text(&out)
    );
    let ca = CertificateAuthority::load(dir.path(), "ext").expect("load openssl root");
    assert_eq!(ca.trust_domain().as_str(), "ext.example");
    let svid = ca
        .issue_svid(
            &"spiffe://ext.example/w".parse().expect("id"),
            Duration::from_mins(10),
            SystemTime::now(),
        )
        .expect("issue");
    let bundles: TrustBundleSet = TrustBundleSet::from_pem(
        &std::fs::read_to_string(dir.path().join("ext.pem")).expect("read"),
        "ext.pem",
    )
    .expect("bundle");
    let id = enforcer::identity::verify_svid_chain(
        &bundles,
        svid.chain(),
        SystemTime::now(),
        enforcer::identity::PeerRole::Client,
    )
    .expect("chains to the openssl root");
    assert_eq!(id.as_str(), "spiffe://ext.example/w");
}

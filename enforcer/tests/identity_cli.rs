//! `enforcer ca`, `enforcer svid` and `enforcer bundle`, run as the binary in a temp dir: the
//! files they write, their modes, `openssl verify` on the result, and errors on bad input.
//! Needs the `openssl` command; without it the tests fail rather than pass silently.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests run the binary, not every dependency"
)]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
};

use enforcer::{
    identity::{TrustBundle, X509Svid, encode_certificates, write_public},
    testing::{openssl, output_text, x509_text},
};

/// Runs the `enforcer` binary with `args` in `dir`.
fn enforcer(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .current_dir(dir)
        .env_remove("ENFORCER_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `enforcer {}`: {e}", args.join(" ")))
}

/// Runs `enforcer` and panics with its output unless it succeeds.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = enforcer(dir, args);
    assert!(
        out.status.success(),
        "`enforcer {}` failed:\n{}",
        args.join(" "),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `enforcer`, expects it to fail, and returns its stderr.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = enforcer(dir, args);
    assert!(
        !out.status.success(),
        "`enforcer {}` succeeded:\n{}",
        args.join(" "),
        output_text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `ca init` -> `ca issue-node` -> `svid issue` in `dir`, into `ca/`, `node/` and `web/`.
fn issue_all(dir: &Path) {
    ok(
        dir,
        &["ca", "init", "--trust-domain", "example.org", "--dir", "ca"],
    );
    ok(
        dir,
        &[
            "ca",
            "issue-node",
            "--ca",
            "ca",
            "--node",
            "node-1",
            "--out",
            "node",
            "--ttl",
            "2h",
        ],
    );
    ok(
        dir,
        &[
            "svid",
            "issue",
            "--ca",
            "node",
            "--id",
            "spiffe://example.org/ns/prod/web",
            "--out",
            "web",
            "--ttl",
            "30m",
        ],
    );
}

#[test]
fn init_issue_node_and_svid_write_files_openssl_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    issue_all(dir);
    for (file, expected) in [
        ("ca/root.pem", 0o644),
        ("ca/root.key", 0o600),
        ("node/node.pem", 0o644),
        ("node/node.key", 0o600),
        ("node/bundle.pem", 0o644),
        ("web/svid.pem", 0o644),
        ("web/key.pem", 0o600),
        ("web/bundle.pem", 0o644),
    ] {
        assert_eq!(mode(&dir.join(file)), expected, "{file}");
    }
    let read = |file: &str| fs::read_to_string(dir.join(file)).expect("read");
    assert_eq!(read("node/bundle.pem"), read("ca/root.pem"));
    assert_eq!(read("web/bundle.pem"), read("ca/root.pem"));

    let svid = X509Svid::from_pem(&read("web/svid.pem"), &read("web/key.pem"), "web/svid.pem")
        .expect("svid.pem and key.pem load as an SVID");
    assert_eq!(
        svid.spiffe_id().as_str(),
        "spiffe://example.org/ns/prod/web"
    );
    assert_eq!(svid.chain().len(), 2, "leaf then intermediate");
    assert_eq!(
        encode_certificates(&svid.chain()[1..]),
        read("node/node.pem")
    );
    let ttl = svid
        .not_after()
        .duration_since(svid.not_before())
        .expect("order");
    assert_eq!(ttl.as_secs(), 31 * 60, "30m plus the 1m backdate");

    write_public(
        &dir.join("web/leaf.pem"),
        &encode_certificates(&svid.chain()[..1]),
    )
    .expect("write leaf");
    let out = openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "web/bundle.pem",
            "-untrusted",
            "node/node.pem",
            "-x509_strict",
            "web/leaf.pem",
        ],
    );
    assert!(
        out.status.success(),
        "openssl verify:\n{}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("web/leaf.pem: OK"),
        "{}",
        output_text(&out)
    );

    let show = |file: &str| x509_text(dir, file);
    let root = show("ca/root.pem");
    for expected in [
        "X509v3 Basic Constraints: critical\nCA:TRUE\n",
        "X509v3 Key Usage: critical\nCertificate Sign, CRL Sign\n",
        "URI:spiffe://example.org\n",
    ] {
        assert!(root.contains(expected), "root lacks {expected:?}:\n{root}");
    }
    let node = show("node/node.pem");
    for expected in [
        "X509v3 Basic Constraints: critical\nCA:TRUE, pathlen:0",
        "X509v3 Key Usage: critical\nCertificate Sign, CRL Sign\n",
        "URI:spiffe://example.org\n",
        "CN = enforcer node CA node-1",
    ] {
        assert!(node.contains(expected), "node lacks {expected:?}:\n{node}");
    }
}

#[test]
fn root_validity_defaults_to_one_year_and_ttl_sets_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    ok(
        dir,
        &["ca", "init", "--trust-domain", "a.org", "--dir", "a"],
    );
    ok(
        dir,
        &[
            "ca",
            "init",
            "--trust-domain",
            "b.org",
            "--dir",
            "b",
            "--ttl",
            "90s",
        ],
    );
    let check = |file: &str, seconds: u64| {
        let out = openssl(
            dir,
            &[
                "x509",
                "-in",
                file,
                "-noout",
                "-checkend",
                &seconds.to_string(),
            ],
        );
        out.status.success()
    };
    let year = 365 * 24 * 3600;
    assert!(
        check("a/root.pem", year - 60),
        "a/root.pem ends before a year"
    );
    assert!(
        !check("a/root.pem", year + 60),
        "a/root.pem outlives a year"
    );
    assert!(check("b/root.pem", 30), "b/root.pem ends within 30s");
    assert!(!check("b/root.pem", 120), "b/root.pem outlives 90s");
}

#[test]
fn bundle_show_prints_pem_and_spiffe_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    issue_all(dir);
    let root = fs::read_to_string(dir.join("ca/root.pem")).expect("read");
    assert_eq!(ok(dir, &["bundle", "show", "--bundle", "web"]), root);
    assert_eq!(
        ok(
            dir,
            &[
                "bundle",
                "show",
                "--format",
                "pem",
                "--bundle",
                "node/bundle.pem"
            ]
        ),
        root
    );
    let json = ok(
        dir,
        &["bundle", "show", "--format", "spiffe", "--bundle", "web"],
    );
    let td = "example.org".parse().expect("td");
    let parsed = TrustBundle::from_json(td, &json, "stdout").expect("SPIFFE bundle JSON");
    assert_eq!(parsed.to_pem(), root);
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(doc["keys"][0]["use"], "x509-svid");

    let err = fails(dir, &["bundle", "show", "--bundle", "web/key.pem"]);
    assert!(err.contains("web/key.pem: no CERTIFICATE"), "{err}");
    let err = fails(dir, &["bundle", "show", "--bundle", "missing.pem"]);
    assert!(err.contains("failed to read missing.pem"), "{err}");
    let err = fails(
        dir,
        &["bundle", "show", "--format", "jwks", "--bundle", "web"],
    );
    assert!(err.contains("invalid value 'jwks' for '--format"), "{err}");
}

#[test]
fn an_openssl_made_root_issues_nodes_and_svids() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fs::create_dir(dir.join("ext")).expect("mkdir");
    let out = openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ext/root.key",
            "-out",
            "ext/root.pem",
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
    assert!(out.status.success(), "openssl req:\n{}", output_text(&out));
    ok(
        dir,
        &[
            "ca",
            "issue-node",
            "--ca",
            "ext",
            "--node",
            "n",
            "--out",
            "node",
        ],
    );
    ok(
        dir,
        &[
            "svid",
            "issue",
            "--ca",
            "node",
            "--id",
            "spiffe://ext.example/w",
            "--out",
            "w",
        ],
    );
    let svid = X509Svid::from_pem(
        &fs::read_to_string(dir.join("w/svid.pem")).expect("read"),
        &fs::read_to_string(dir.join("w/key.pem")).expect("read"),
        "w/svid.pem",
    )
    .expect("loads");
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://ext.example/w");
}

#[test]
fn bad_input_fails_with_a_message_naming_the_problem_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    issue_all(dir);
    let before = fs::read_to_string(dir.join("ca/root.key")).expect("read");

    let id = "svid issue --ca node --out x --id";
    let cases = [
        (
            "ca init --dir x --trust-domain Example.org".to_owned(),
            "invalid value 'Example.org' for '--trust-domain",
        ),
        (
            "ca init --dir x --trust-domain spiffe://a.org".to_owned(),
            "invalid value 'spiffe://a.org' for '--trust-domain",
        ),
        (
            "ca init --dir ca --trust-domain example.org".to_owned(),
            "ca/root.pem already exists",
        ),
        (
            "ca init --dir x --trust-domain a.org --ttl 1y".to_owned(),
            "unknown unit `y`",
        ),
        (
            "ca init --dir x --trust-domain a.org --ttl 0s".to_owned(),
            "must be greater than zero",
        ),
        (
            "ca issue-node --ca nope --node n --out x".to_owned(),
            "failed to read nope/root.pem",
        ),
        (
            "ca issue-node --ca node --node n --out x".to_owned(),
            "failed to read node/root.pem",
        ),
        (
            format!("ca issue-node --ca ca --out x --node {}", "n".repeat(65)),
            "invalid node name",
        ),
        (
            "ca issue-node --ca ca --node n --out x --ttl 10".to_owned(),
            "`10` has no unit",
        ),
        (
            format!("{id} example.org/w"),
            "invalid value 'example.org/w' for '--id",
        ),
        (
            format!("{id} spiffe://example.org/a/../b"),
            "invalid value 'spiffe://example.org/a/../b' for '--id",
        ),
        (format!("{id} spiffe://example.org"), "has no path"),
        (
            format!("{id} spiffe://other.org/w"),
            "outside the CA's trust domain",
        ),
        (
            "svid issue --ca missing --out x --id spiffe://example.org/w".to_owned(),
            "failed to read missing/node.pem",
        ),
        (
            "svid issue --ca ca --out x --id spiffe://example.org/w".to_owned(),
            "failed to read ca/node.pem",
        ),
        (
            format!("{id} spiffe://example.org/w --ttl h"),
            "expected a whole number",
        ),
    ];
    for (command, expected) in &cases {
        let args: Vec<&str> = command.split_whitespace().collect();
        let err = fails(dir, &args);
        assert!(
            err.contains(expected),
            "`enforcer {command}`: expected {expected:?} in:\n{err}"
        );
    }
    let err = fails(
        dir,
        &["ca", "issue-node", "--ca", "ca", "--node", "", "--out", "x"],
    );
    assert!(err.contains("invalid node name ``"), "{err}");
    assert!(!dir.join("x").exists(), "a failed command created x/");
    assert_eq!(
        fs::read_to_string(dir.join("ca/root.key")).expect("read"),
        before,
        "ca init replaced an existing root key"
    );
}

#[test]
fn a_bundle_from_another_root_or_a_corrupt_key_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    issue_all(dir);
    let issue_w: Vec<&str> = "svid issue --ca node --out x --id spiffe://example.org/w"
        .split_whitespace()
        .collect();
    ok(
        dir,
        &[
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--dir",
            "ca2",
        ],
    );
    fs::copy(dir.join("ca2/root.pem"), dir.join("node/bundle.pem")).expect("copy");
    let err = fails(dir, &issue_w);
    assert!(
        err.contains("node/node.pem does not chain to node/bundle.pem"),
        "{err}"
    );
    assert!(!dir.join("x").exists(), "a failed command created x/");

    // An error in the CA's key names the key file.
    fs::write(dir.join("node/node.key"), "garbage").expect("write");
    let err = fails(dir, &issue_w);
    assert!(err.contains("node/node.key"), "{err}");
    assert!(err.contains("PRIVATE KEY"), "{err}");
    assert!(!dir.join("x").exists(), "a failed command created x/");
}

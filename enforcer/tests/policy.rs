//! The policy language: validation errors with locations, semantics, compilation, diffs, and
//! the checked-in policies.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, process::Command};

use enforcer::{
    attest::Sha256Digest,
    identity::SpiffeId,
    kernel::PolicyAction,
    policy::{self, Authorizer, Diagnostic, IdentityNumbers, Policy, Severity, compile},
    testing::demo_policy,
};

fn parse(text: &str) -> Result<Policy, Vec<Diagnostic>> {
    policy::parse("p.toml", text.as_bytes()).map(|(policy, _)| policy)
}

fn errors(text: &str) -> Vec<String> {
    match policy::parse("p.toml", text.as_bytes()) {
        Ok(_) => panic!("expected errors in:\n{text}"),
        Err(diagnostics) => diagnostics.iter().map(ToString::to_string).collect(),
    }
}

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

const HEAD: &str = "trust_domain = \"example.org\"\n";

/// `policies/demo.toml` with its placeholders filled in, by the function the demo fills it with.
fn filled_demo() -> String {
    let filled = demo_policy(
        "/enforcer-demo",
        (
            [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)],
            "10.88.2.0/24",
        ),
        Sha256Digest([0; 32]),
    );
    assert!(
        !filled
            .lines()
            .any(|l| !l.starts_with('#') && l.contains('@')),
        "an unfilled placeholder:\n{filled}"
    );
    filled
}

#[test]
fn every_checked_in_policy_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files = vec![root.join("default.toml")];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for file in &files {
        if let Err(diagnostics) = policy::load(file) {
            panic!("{}: {diagnostics:#?}", file.display());
        }
    }
    assert!(files.len() >= 5);
    // The demo's policy is a template (see its header): valid once filled in.
    if let Err(diagnostics) = parse(&filled_demo()) {
        panic!("policies/demo.toml: {diagnostics:#?}");
    }
    let default = parse(policy::DEFAULT_POLICY).unwrap();
    assert!(
        default.enroll.is_empty(),
        "the default policy must enroll nothing"
    );
}

#[test]
fn policy_check_prints_every_problem_with_its_location() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let output = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .current_dir(&fixtures)
        .args(["policy", "check", "bad-policy.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let got = String::from_utf8(output.stdout).unwrap();
    let want = std::fs::read_to_string(fixtures.join("bad-policy.expected")).unwrap();
    assert_eq!(got, want, "golden output differs; got:\n{got}");
}

#[test]
fn policy_check_passes_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo.toml");
    std::fs::write(&demo, filled_demo()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["policy", "check"])
        .arg(&demo)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(": ok (3 workloads, 2 rules, 0 egress, 0 warnings)"),
        "{text}"
    );
}

#[test]
fn each_validation_error_is_located() {
    let cases: &[(&str, &str)] = &[
        ("", "p.toml:1:1: error: missing `trust_domain`"),
        (
            "trust_domain = 5\n",
            "p.toml:1:16: error: trust domain: expected a string",
        ),
        (
            "trust_domain = \"a b\"\n",
            "p.toml:1:16: error: invalid trust domain `a b`",
        ),
        (
            "trust_domain = \"x\"\nfoo = 1\n",
            "p.toml:2:1: error: unknown key `foo`",
        ),
        (
            "trust_domain = \"x\"\n[[workload]]\nid = \"spiffe://x/a\"\nselectors = []\n",
            "p.toml:4:13: error: a workload needs at least one selector",
        ),
        (
            "trust_domain = \"x\"\n[[workload]]\nid = \"spiffe://y/a\"\nselectors = [\"pid:1\"]\n",
            "p.toml:3:6: error: workload spiffe://y/a is not in this node's trust domain x",
        ),
        (
            "trust_domain = \"x\"\n[[workload]]\nselectors = [\"pid:1\"]\n",
            "p.toml:2:1: error: [[workload]] is missing `id`",
        ),
        (
            "trust_domain = \"x\"\n[[egress]]\ncidr = \"10.0.0.0/33\"\n",
            "p.toml:3:8: error: invalid CIDR `10.0.0.0/33`: prefix length `33` is not 0 to 32",
        ),
        (
            "trust_domain = \"x\"\n[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"sctp\"\n",
            "p.toml:4:12: error: invalid protocol `sctp`: expected \"tcp\", \"udp\" or \"icmp\"",
        ),
        (
            "trust_domain = \"x\"\n[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"icmp\"\nports = [8]\n",
            "p.toml:5:9: error: icmp has no ports",
        ),
        (
            "trust_domain = \"x\"\n[[peer]]\naddress = \"10.0.0.1\"\nport = 70000\n",
            "p.toml:4:8: error: port: expected an integer from 1 to 65535",
        ),
        (
            "trust_domain = \"x\"\nenroll = [\"/\"]\n",
            "p.toml:2:11: error: refusing to enroll the root cgroup",
        ),
        (
            "trust_domain = \"x\"\n[[allow]]\nfrom = \"spiffe://x/a?q\"\nto = \"spiffe://x\"\n",
            "p.toml:3:8: error: invalid SPIFFE ID pattern `spiffe://x/a?q`",
        ),
        (
            "trust_domain = \"x\"\n[[deny]]\nfrom = \"spiffe://x\"\nto = \"spiffe://x\"\naudit = \"yes\"\n",
            "p.toml:5:9: error: audit: expected true or false",
        ),
        (
            "trust_domain = \"x\"\n[[workload]]\nid = \"spiffe://x/a\"\nselectors = [\"pid:1\"]\n\
             [[allow]]\nfrom = \"spiffe://x/a\"\nto = \"spiffe://x/a\"\n\
             [[deny]]\nfrom = \"spiffe://x/a\"\nto = \"spiffe://x/a\"\n",
            "p.toml:8:1: error: contradicts the rule at line 5",
        ),
        ("trust_domain = \"x\"\n[broken\n", "p.toml:2:"),
    ];
    for (text, want) in cases {
        let got = errors(text);
        assert!(
            got.iter().any(|line| line.starts_with(want)),
            "{text:?}: wanted a line starting with {want:?}, got {got:#?}"
        );
    }
}

#[test]
fn cgroup_paths_the_kernel_would_never_match_are_refused_at_the_entry() {
    let why = "is not a cgroup path as the kernel writes one (`/a/b`: no `//`, `.`, `..` or trailing `/`)";
    for (path, problem) in [
        ("/a//b", "it contains `//`"),
        ("/a/./b", "it contains a `.` component"),
        ("/a/../b", "it contains a `..` component"),
        ("/a/b/", "it ends in `/`"),
        ("a/b", "it is not an absolute path"),
    ] {
        assert_eq!(
            errors(&format!("{HEAD}enroll = [\"/ok\", \"{path}\"]\n")),
            [format!(
                "p.toml:2:18: error: enroll entry `{path}` {why}: {problem}"
            )],
            "{path}"
        );
        let text = format!(
            "{HEAD}[[workload]]\nid = \"spiffe://example.org/web\"\n\
             selectors = [\"pid:1\", \"cgroup:path:{path}\"]\n"
        );
        assert_eq!(
            errors(&text),
            [format!(
                "p.toml:4:23: error: invalid selector `cgroup:path:{path}`: selector `cgroup:path`: \
                 `{path}` is not a cgroup path as the kernel writes one: {problem}"
            )],
            "{path}"
        );
    }
    // The root: refused as an enrollment, the widest prefix as a selector.
    assert_eq!(
        errors(&format!("{HEAD}enroll = [\"/\"]\n")),
        ["p.toml:2:11: error: refusing to enroll the root cgroup: it would enroll every process"]
    );
    let policy = parse(&format!(
        "{HEAD}enroll = [\"/a/b\"]\n[[workload]]\nid = \"spiffe://example.org/web\"\n\
         selectors = [\"cgroup:path:/\"]\n"
    ))
    .unwrap();
    assert_eq!(policy.enroll, ["/a/b"]);
}

#[test]
fn duplicate_peers_are_refused_naming_both_entries() {
    let peers = |a: &str, b: &str| {
        format!("{HEAD}[[peer]]\naddress = \"{a}\"\n[[peer]]\naddress = \"{b}\"\nport = 16000\n")
    };
    for (first, second) in [
        ("10.0.0.1", "10.0.0.1"),
        ("10.0.0.1", "::ffff:10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fd00::1", "fd00:0::1"),
    ] {
        assert_eq!(
            errors(&peers(first, second)),
            [format!(
                "p.toml:5:11: error: duplicate peer: address `{}` names the same node as \
                 address `{}` of the [[peer]] at line 3",
                second.parse::<std::net::IpAddr>().unwrap(),
                first.parse::<std::net::IpAddr>().unwrap(),
            )],
            "{first} {second}"
        );
    }
    let policy = parse(&peers("10.0.0.1", "10.0.0.2")).unwrap();
    assert_eq!(policy.peers.len(), 2);
}

#[test]
fn rules_naming_no_workload_warn_but_pass() {
    let text = format!(
        "{HEAD}[[workload]]\nid = \"spiffe://example.org/a\"\nselectors = [\"pid:1\"]\n\
         [[allow]]\nfrom = \"spiffe://example.org/a\"\nto = \"spiffe://example.org/ghost\"\n"
    );
    let (_, warnings) = policy::parse("p.toml", text.as_bytes()).unwrap();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].severity, Severity::Warning);
    assert!(
        warnings[0].message.contains("names no workload"),
        "{}",
        warnings[0]
    );
}

#[test]
fn bad_input_is_refused_cleanly() {
    let invalid_utf8 = b"trust_domain = \"x\"\n# \xff\xfe\n";
    let got = policy::parse("p.toml", invalid_utf8).unwrap_err();
    assert_eq!(
        got[0].to_string(),
        "p.toml:2:3: error: invalid UTF-8 (a policy file is UTF-8 text)"
    );

    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert!(policy::parse("p.toml", &binary).is_err());

    // Cut inside a string: the file ends in the middle of a value.
    let demo = filled_demo();
    let truncated = &demo[..demo.find("selectors = [").unwrap() + 20];
    assert!(policy::parse("p.toml", truncated.as_bytes()).is_err());

    let huge = vec![b'#'; policy::MAX_POLICY_BYTES + 1];
    let got = policy::parse("p.toml", &huge).unwrap_err();
    assert!(got[0].message.contains("byte limit"), "{}", got[0]);

    let deep = format!("{HEAD}x = {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert!(policy::parse("p.toml", deep.as_bytes()).is_err());
}

/// A policy exercising every pattern kind, audit and ports.
const SEMANTICS: &str = r#"
trust_domain = "example.org"

[[workload]]
id = "spiffe://example.org/web"
selectors = ["pid:1"]

[[workload]]
id = "spiffe://example.org/api"
selectors = ["pid:2"]

[[workload]]
id = "spiffe://example.org/ns/db/primary"
selectors = ["pid:3"]

[[workload]]
id = "spiffe://example.org/admin"
selectors = ["pid:4"]

[[allow]]
from = "spiffe://example.org/web"
to = "spiffe://example.org/api"

[[deny]]
from = "spiffe://example.org/web"
to = "spiffe://example.org/api"
ports = [22]

[[allow]]
from = "spiffe://example.org/api"
to = "spiffe://example.org/ns/db/*"
ports = [5432]

[[allow]]
from = "spiffe://partner.example.net"
to = "spiffe://example.org/api"
ports = [443]

[[allow]]
from = "spiffe://example.org/*"
to = "spiffe://example.org/admin"

[[deny]]
from = "spiffe://example.org/api"
to = "spiffe://example.org/admin"
audit = true
"#;

#[test]
fn semantics_table() {
    let policy = parse(SEMANTICS).unwrap();
    let authorizer = Authorizer::new(&policy);
    // (src, dst, port, allowed, audited, rule)
    let cases = [
        ("web", "api", 80, true, false, Some(1)),
        ("web", "api", 22, false, false, Some(2)),
        ("api", "web", 80, false, false, None),
        ("api", "ns/db/primary", 5432, true, false, Some(3)),
        ("api", "ns/db/primary", 5433, false, false, None),
        ("web", "admin", 1, true, false, Some(5)),
        ("api", "admin", 1, true, true, Some(6)),
    ];
    for (src, dst, port, allowed, audited, rule) in cases {
        let decision = authorizer.decide(
            &id(&format!("spiffe://example.org/{src}")),
            &id(&format!("spiffe://example.org/{dst}")),
            port,
        );
        assert_eq!(
            (decision.allowed, decision.audited, decision.rule),
            (allowed, audited, rule),
            "{src} -> {dst}:{port}"
        );
    }
    let partner = id("spiffe://partner.example.net/billing");
    assert!(
        authorizer
            .decide(&partner, &id("spiffe://example.org/api"), 443)
            .allowed
    );
    assert!(
        !authorizer
            .decide(&partner, &id("spiffe://example.org/api"), 80)
            .allowed
    );
    let other = id("spiffe://other.example.net/x");
    assert!(
        !authorizer
            .decide(&other, &id("spiffe://example.org/api"), 443)
            .allowed
    );

    // Global audit mode lets the default deny through, flagged.
    let audit = parse(&SEMANTICS.replace(
        "trust_domain = \"example.org\"",
        "trust_domain = \"example.org\"\nmode = \"audit\"",
    ))
    .unwrap();
    let decision = Authorizer::new(&audit).decide(
        &id("spiffe://example.org/api"),
        &id("spiffe://example.org/web"),
        80,
    );
    assert_eq!(
        (decision.allowed, decision.audited, decision.rule),
        (true, true, None)
    );
}

#[test]
fn the_kernel_table_decides_like_the_authorizer() {
    let policy = parse(SEMANTICS).unwrap();
    let compiled = compile(&policy, None, 3);
    let authorizer = Authorizer::new(&policy);
    assert_eq!(compiled.table.version, 3);
    let lookup = |src: u32, dst: u32, port: u16| {
        let entry = |p: Option<u16>| {
            compiled
                .table
                .rules
                .iter()
                .find(|r| r.src_id == src && r.dst_id == dst && r.port == p)
        };
        entry(Some(port)).or_else(|| entry(None))
    };
    for (src, src_no) in compiled.numbers.iter() {
        for (dst, dst_no) in compiled.numbers.iter() {
            for port in [1, 22, 80, 443, 5432, 5433] {
                let decision = authorizer.decide(src, dst, port);
                let kernel = lookup(src_no, dst_no, port);
                let (allowed, audited, rule) = match kernel {
                    Some(entry) => match entry.action {
                        PolicyAction::Allow => (true, false, Some(entry.rule)),
                        PolicyAction::Deny => (false, false, Some(entry.rule)),
                        PolicyAction::Audit => (true, true, Some(entry.rule)),
                    },
                    None => (false, false, None),
                };
                assert_eq!(
                    (decision.allowed, decision.audited, decision.rule),
                    (allowed, audited, rule),
                    "{src} -> {dst}:{port}"
                );
            }
        }
    }
}

#[test]
fn identity_numbers_are_stable_across_reloads() {
    let first = IdentityNumbers::assign(None, [&id("spiffe://x/a"), &id("spiffe://x/b")]);
    let second = IdentityNumbers::assign(Some(&first), [&id("spiffe://x/b"), &id("spiffe://x/c")]);
    assert_eq!(
        first.get(&id("spiffe://x/b")),
        second.get(&id("spiffe://x/b"))
    );
    let numbers: BTreeSet<u32> = first.iter().map(|(_, n)| n).collect();
    let c = second.get(&id("spiffe://x/c")).unwrap();
    assert!(!numbers.contains(&c), "a retired number must not be reused");
    assert!(!numbers.contains(&0));
}

#[test]
fn diff_lists_added_removed_and_changed() {
    let old = parse(SEMANTICS).unwrap();
    let new_text = SEMANTICS
        .replace("ports = [22]", "ports = [22, 23]")
        .replace("selectors = [\"pid:4\"]", "selectors = [\"pid:5\"]")
        + "\n[[egress]]\ncidr = \"10.0.0.0/8\"\n";
    let new = parse(&new_text).unwrap();
    let lines: Vec<String> = policy::diff(&old, &new)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "~ workload spiffe://example.org/admin [pid:4] -> [pid:5]",
            "+ deny spiffe://example.org/web -> spiffe://example.org/api on ports 22,23",
            "- deny spiffe://example.org/web -> spiffe://example.org/api on ports 22",
            "+ egress tcp 10.0.0.0/8 on any port",
        ]
    );
}

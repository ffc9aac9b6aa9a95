//! `policies/demo.toml`, the demo's policy template, filled in for one node: shared by the
//! demo, which enforces it, and the policy tests, which check that the template stays valid.

use std::net::Ipv4Addr;

use crate::attest::Sha256Digest;

/// The template; its header describes the placeholders.
const TEMPLATE: &str = include_str!("../../../policies/demo.toml");

/// The template filled in for a node with scope cgroup `scope`, mesh peers `peers` (node A,
/// node B), node B's pod network `pods_b` (`10.88.2.0/24`) and web's binary pinned to
/// `web_sha256`. Comment lines stay as they are (they name
/// the placeholders); panics if the template no longer uses a placeholder or uses an unknown
/// one.
#[must_use]
pub fn demo_policy(
    scope: &str,
    (peers, pods_b): ([Ipv4Addr; 2], &str),
    web_sha256: Sha256Digest,
) -> String {
    let values = [
        ("@SCOPE@", scope.to_owned()),
        ("@NODE_A@", peers[0].to_string()),
        ("@NODE_B@", peers[1].to_string()),
        ("@PODS_B@", pods_b.to_owned()),
        ("@WEB_SHA256@", web_sha256.to_string()),
    ];
    let is_comment = |line: &str| line.trim_start().starts_with('#');
    for (placeholder, _) in &values {
        assert!(
            TEMPLATE
                .lines()
                .any(|line| !is_comment(line) && line.contains(placeholder)),
            "policies/demo.toml no longer uses {placeholder}"
        );
    }
    let mut filled = String::new();
    for line in TEMPLATE.lines() {
        let mut line = line.to_owned();
        if !is_comment(&line) {
            for (placeholder, value) in &values {
                line = line.replace(placeholder, value);
            }
            assert!(
                !line.contains('@'),
                "policies/demo.toml: unknown placeholder in `{line}`"
            );
        }
        filled.push_str(&line);
        filled.push('\n');
    }
    filled
}

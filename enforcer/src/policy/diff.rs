//! What changes between two policies: workloads, rules, egress, peers, enrollment, mode.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use super::model::{Mode, Policy};

/// One difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Present only in the new policy.
    Added(String),
    /// Present only in the old policy.
    Removed(String),
    /// Present in both, different.
    Changed(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added(what) => write!(f, "+ {what}"),
            Self::Removed(what) => write!(f, "- {what}"),
            Self::Changed(what) => write!(f, "~ {what}"),
        }
    }
}

/// Every difference from `old` to `new`, grouped by kind, each group sorted.
#[must_use]
pub fn diff(old: &Policy, new: &Policy) -> Vec<Change> {
    let mut changes = Vec::new();
    if old.trust_domain != new.trust_domain {
        changes.push(Change::Changed(format!(
            "trust domain {} -> {}",
            old.trust_domain, new.trust_domain
        )));
    }
    if old.mode != new.mode {
        let name = |mode| match mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        };
        changes.push(Change::Changed(format!(
            "mode {} -> {}",
            name(old.mode),
            name(new.mode)
        )));
    }
    let workloads = |policy: &Policy| -> BTreeMap<String, String> {
        policy
            .workloads
            .iter()
            .map(|w| {
                let selectors: Vec<String> = w.selectors.iter().map(ToString::to_string).collect();
                (w.id.to_string(), selectors.join(" "))
            })
            .collect()
    };
    let (old_w, new_w) = (workloads(old), workloads(new));
    for (id, selectors) in &new_w {
        match old_w.get(id) {
            None => changes.push(Change::Added(format!("workload {id} [{selectors}]"))),
            Some(before) if before != selectors => changes.push(Change::Changed(format!(
                "workload {id} [{before}] -> [{selectors}]"
            ))),
            Some(_) => {}
        }
    }
    for (id, selectors) in &old_w {
        if !new_w.contains_key(id) {
            changes.push(Change::Removed(format!("workload {id} [{selectors}]")));
        }
    }
    set_changes(
        &mut changes,
        old.rules.iter().map(ToString::to_string),
        new.rules.iter().map(ToString::to_string),
    );
    set_changes(
        &mut changes,
        old.egress.iter().map(ToString::to_string),
        new.egress.iter().map(ToString::to_string),
    );
    set_changes(
        &mut changes,
        old.peers.iter().map(peer_line),
        new.peers.iter().map(peer_line),
    );
    set_changes(
        &mut changes,
        old.enroll.iter().map(|c| format!("enroll {c}")),
        new.enroll.iter().map(|c| format!("enroll {c}")),
    );
    changes
}

/// A peer as the diff names it: address, port, and the workload networks behind it.
fn peer_line(peer: &super::Peer) -> String {
    let cidrs: Vec<String> = peer
        .cidrs
        .iter()
        .map(|net| format!("{}/{}", net.network, net.prefix_len))
        .collect();
    if cidrs.is_empty() {
        format!("peer {}:{}", peer.address, peer.port)
    } else {
        format!(
            "peer {}:{} cidrs {}",
            peer.address,
            peer.port,
            cidrs.join(",")
        )
    }
}

fn set_changes(
    changes: &mut Vec<Change>,
    old: impl Iterator<Item = String>,
    new: impl Iterator<Item = String>,
) {
    let old: BTreeSet<String> = old.collect();
    let new: BTreeSet<String> = new.collect();
    changes.extend(new.difference(&old).cloned().map(Change::Added));
    changes.extend(old.difference(&new).cloned().map(Change::Removed));
}

#[cfg(test)]
mod tests {
    use super::diff;
    use crate::policy::{Policy, parse};

    fn policy(egress: &str) -> Policy {
        let text = format!("trust_domain = \"example.org\"\n{egress}");
        parse("p.toml", text.as_bytes()).unwrap().0
    }

    fn lines(old: &Policy, new: &Policy) -> Vec<String> {
        diff(old, new).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_egress_protocol_change_is_shown() {
        let tcp = policy("[[egress]]\ncidr = \"192.0.2.53\"\nports = [53]\n");
        let udp = policy("[[egress]]\ncidr = \"192.0.2.53\"\nprotocol = \"udp\"\nports = [53]\n");
        let icmp = policy("[[egress]]\ncidr = \"192.0.2.53\"\nprotocol = \"icmp\"\n");
        assert_eq!(
            lines(&tcp, &udp),
            [
                "+ egress udp 192.0.2.53/32 on ports 53",
                "- egress tcp 192.0.2.53/32 on ports 53",
            ]
        );
        assert_eq!(
            lines(&udp, &icmp),
            [
                "+ egress icmp 192.0.2.53/32",
                "- egress udp 192.0.2.53/32 on ports 53",
            ]
        );
    }

    #[test]
    fn an_explicit_default_protocol_is_no_change() {
        let implicit = policy("[[egress]]\ncidr = \"192.0.2.53\"\nports = [53]\n");
        let explicit =
            policy("[[egress]]\ncidr = \"192.0.2.53\"\nprotocol = \"tcp\"\nports = [53]\n");
        assert!(lines(&implicit, &explicit).is_empty());
    }
}

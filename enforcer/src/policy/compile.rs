//! Compiling a policy: identity numbers, the kernel's tables, and the userspace authorizer.
//!
//! Evaluation, the same in the kernel and in the authorizer, for a flow (source ID,
//! destination ID, port):
//! 1. a matching `deny` rule refuses it (an `audit` deny, or global audit mode, only reports);
//! 2. otherwise a matching `allow` rule permits it;
//! 3. otherwise it is refused (default deny between enrolled workloads).
//!
//! A rule matches when its `from` names the source, its `to` names the destination and its
//! ports cover the port. When several rules match, the first in file order is reported.
//!
//! Egress entries become one kernel entry per (entry, port), each with its protocol; an ICMP
//! entry has no port.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};

use super::model::{Action, IdPattern, Mode, Policy, Ports, Protocol, Rule};
use crate::{
    identity::SpiffeId,
    kernel::{EgressEntry, IpProtocol, PolicyAction, PolicyMode, PolicyRule, PolicyTable},
};

/// Identity numbers: the kernel's names for SPIFFE IDs, stable across reloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityNumbers {
    numbers: BTreeMap<SpiffeId, u32>,
    next: u32,
}

impl IdentityNumbers {
    /// Numbers for `ids`: an ID that had a number keeps it; new IDs get numbers never used
    /// before (so a number the kernel may still hold never names another identity).
    #[must_use]
    pub fn assign<'a>(
        previous: Option<&Self>,
        ids: impl IntoIterator<Item = &'a SpiffeId>,
    ) -> Self {
        let mut next = previous.map_or(1, |p| p.next.max(1));
        let mut numbers = BTreeMap::new();
        for id in ids {
            let number = previous
                .and_then(|p| p.numbers.get(id).copied())
                .unwrap_or_else(|| {
                    let number = next;
                    next += 1;
                    number
                });
            numbers.insert(id.clone(), number);
        }
        Self { numbers, next }
    }

    /// The number of `id`.
    #[must_use]
    pub fn get(&self, id: &SpiffeId) -> Option<u32> {
        self.numbers.get(id).copied()
    }

    /// Every (ID, number).
    pub fn iter(&self) -> impl Iterator<Item = (&SpiffeId, u32)> {
        self.numbers.iter().map(|(id, number)| (id, *number))
    }
}

/// The verdict on one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the flow may proceed (true also for denied flows in audit mode).
    pub allowed: bool,
    /// The flow would be denied, but audit mode let it through.
    pub audited: bool,
    /// The deciding rule, `None` for the default deny.
    pub rule: Option<u32>,
}

/// Userspace authorization, the same decisions as the kernel's table, for any IDs (also IDs
/// of other trust domains, which the kernel never sees).
#[derive(Clone, Debug)]
pub struct Authorizer {
    mode: Mode,
    /// Rules whose both sides are exact IDs, by from, then to.
    exact: HashMap<SpiffeId, HashMap<SpiffeId, Vec<Rule>>>,
    /// Every other rule, in file order.
    patterned: Vec<Rule>,
}

impl Authorizer {
    /// An authorizer for `policy`.
    #[must_use]
    pub fn new(policy: &Policy) -> Self {
        let mut exact: HashMap<SpiffeId, HashMap<SpiffeId, Vec<Rule>>> = HashMap::new();
        let mut patterned = Vec::new();
        for rule in &policy.rules {
            match (&rule.from, &rule.to) {
                (IdPattern::Exact(from), IdPattern::Exact(to)) => exact
                    .entry(from.clone())
                    .or_default()
                    .entry(to.clone())
                    .or_default()
                    .push(rule.clone()),
                _ => patterned.push(rule.clone()),
            }
        }
        Self {
            mode: policy.mode,
            exact,
            patterned,
        }
    }

    /// Decide the flow `src` -> `dst` on `port`.
    #[must_use]
    pub fn decide(&self, src: &SpiffeId, dst: &SpiffeId, port: u16) -> Decision {
        let exact = self
            .exact
            .get(src)
            .and_then(|by_dst| by_dst.get(dst))
            .map_or(&[][..], Vec::as_slice);
        let matching = exact.iter().chain(self.patterned.iter()).filter(|rule| {
            rule.ports.covers(port) && rule.from.matches(src) && rule.to.matches(dst)
        });
        let mut allow: Option<u32> = None;
        let mut deny: Option<&Rule> = None;
        for rule in matching {
            match rule.action {
                Action::Deny if deny.is_none_or(|d| rule.number < d.number) => deny = Some(rule),
                Action::Allow if allow.is_none_or(|a| rule.number < a) => allow = Some(rule.number),
                _ => {}
            }
        }
        match (deny, allow) {
            (Some(rule), _) => self.denied(Some(rule.number), rule.audit),
            (None, Some(rule)) => Decision {
                allowed: true,
                audited: false,
                rule: Some(rule),
            },
            (None, None) => self.denied(None, false),
        }
    }

    fn denied(&self, rule: Option<u32>, rule_audit: bool) -> Decision {
        let audited = rule_audit || self.mode == Mode::Audit;
        Decision {
            allowed: audited,
            audited,
            rule,
        }
    }
}

/// A policy compiled for the kernel.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// Numbers of the policy's workload IDs.
    pub numbers: IdentityNumbers,
    /// The (source, destination, port) table for the kernel.
    pub table: PolicyTable,
    /// Plaintext egress permissions, one per (entry, port).
    pub egress: Vec<EgressEntry>,
    /// The mesh's networks: each peer's address (as a full-length network) and its workload
    /// networks (`cidrs`); flows to them always go through the tunnel.
    pub peers: Vec<(std::net::IpAddr, u8)>,
}

/// Compile `policy` as version `version`, keeping the identity numbers of `previous`.
#[must_use]
pub fn compile(policy: &Policy, previous: Option<&IdentityNumbers>, version: u64) -> Compiled {
    let numbers = IdentityNumbers::assign(previous, policy.workloads.iter().map(|w| &w.id));
    let workloads: Vec<(&SpiffeId, u32)> = policy
        .workloads
        .iter()
        .filter_map(|w| numbers.get(&w.id).map(|n| (&w.id, n)))
        .collect();
    let by_id: HashMap<&SpiffeId, u32> = workloads.iter().copied().collect();

    // For each (src, dst): the first deny and first allow per port key (None = any port).
    let mut cells: BTreeMap<(u32, u32), BTreeMap<Option<u16>, Cell>> = BTreeMap::new();
    for rule in &policy.rules {
        let sources: Vec<u32> = matching(&workloads, &by_id, &rule.from);
        if sources.is_empty() {
            continue;
        }
        let destinations: Vec<u32> = matching(&workloads, &by_id, &rule.to);
        let keys: Vec<Option<u16>> = match &rule.ports {
            Ports::Any => vec![None],
            Ports::List(ports) => ports.iter().copied().map(Some).collect(),
        };
        for &src in &sources {
            for &dst in &destinations {
                let ports = cells.entry((src, dst)).or_default();
                for key in &keys {
                    ports.entry(*key).or_default().add(rule);
                }
            }
        }
    }

    let mut rules = Vec::new();
    for ((src_id, dst_id), ports) in &cells {
        let any = ports.get(&None).copied().unwrap_or_default();
        for (port, cell) in ports {
            // A port-specific entry shadows the any-port entry in the kernel, so it carries
            // the any-port rules too (deny still overrides allow).
            let merged = if port.is_some() {
                cell.merge(any)
            } else {
                *cell
            };
            if let Some((action, rule)) = merged.verdict() {
                rules.push(PolicyRule {
                    src_id: *src_id,
                    dst_id: *dst_id,
                    port: *port,
                    action,
                    rule,
                });
            }
        }
    }

    let egress = policy
        .egress
        .iter()
        .enumerate()
        .flat_map(|(index, entry)| {
            let rule = u32::try_from(index + 1).unwrap_or(u32::MAX);
            let protocol = match entry.protocol {
                Protocol::Tcp => IpProtocol::Tcp,
                Protocol::Udp => IpProtocol::Udp,
                Protocol::Icmp => IpProtocol::Icmp,
            };
            let ports: Vec<Option<u16>> = match (entry.protocol, &entry.ports) {
                (Protocol::Icmp, _) | (_, Ports::Any) => vec![None],
                (_, Ports::List(ports)) => ports.iter().copied().map(Some).collect(),
            };
            ports.into_iter().map(move |port| EgressEntry {
                network: entry.network,
                prefix_len: entry.prefix_len,
                protocol,
                port,
                rule,
            })
        })
        .collect();

    Compiled {
        numbers,
        table: PolicyTable {
            version,
            mode: match policy.mode {
                Mode::Enforce => PolicyMode::Enforce,
                Mode::Audit => PolicyMode::Audit,
            },
            rules,
        },
        egress,
        peers: policy
            .peers
            .iter()
            .flat_map(|peer| {
                let full = if peer.address.is_ipv4() { 32 } else { 128 };
                std::iter::once((peer.address, full))
                    .chain(peer.cidrs.iter().map(|net| (net.network, net.prefix_len)))
            })
            .collect(),
    }
}

/// The numbers of the workloads `pattern` names: one lookup for an exact ID, a scan otherwise.
fn matching(
    workloads: &[(&SpiffeId, u32)],
    by_id: &HashMap<&SpiffeId, u32>,
    pattern: &IdPattern,
) -> Vec<u32> {
    if let IdPattern::Exact(id) = pattern {
        return by_id.get(id).copied().into_iter().collect();
    }
    workloads
        .iter()
        .filter(|(id, _)| pattern.matches(id))
        .map(|&(_, number)| number)
        .collect()
}

/// The first deny and first allow rule for one (source, destination, port key).
#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    deny: Option<(u32, bool)>,
    allow: Option<u32>,
}

impl Cell {
    fn add(&mut self, rule: &Rule) {
        match rule.action {
            Action::Deny if self.deny.is_none_or(|(n, _)| rule.number < n) => {
                self.deny = Some((rule.number, rule.audit));
            }
            Action::Allow if self.allow.is_none_or(|n| rule.number < n) => {
                self.allow = Some(rule.number);
            }
            _ => {}
        }
    }

    fn merge(self, other: Self) -> Self {
        let deny = match (self.deny, other.deny) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let allow = match (self.allow, other.allow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self { deny, allow }
    }

    fn verdict(self) -> Option<(PolicyAction, u32)> {
        match (self.deny, self.allow) {
            (Some((rule, true)), _) => Some((PolicyAction::Audit, rule)),
            (Some((rule, false)), _) => Some((PolicyAction::Deny, rule)),
            (None, Some(rule)) => Some((PolicyAction::Allow, rule)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compile;
    use crate::{
        kernel::{EgressEntry, IpProtocol},
        policy::parse,
    };

    #[test]
    fn egress_entries_carry_their_protocol_and_icmp_has_no_port() {
        let text = r#"
trust_domain = "example.org"
[[egress]]
cidr = "198.51.100.0/24"
ports = [443, 80]
[[egress]]
cidr = "192.0.2.53"
protocol = "udp"
ports = [53]
[[egress]]
cidr = "2001:db8::/32"
protocol = "icmp"
[[egress]]
cidr = "203.0.113.0/24"
protocol = "udp"
[[peer]]
address = "192.0.2.10"
"#;
        let (policy, _) = parse("p.toml", text.as_bytes()).unwrap();
        let compiled = compile(&policy, None, 1);
        let entry = |network: &str, prefix_len, protocol, port, rule| EgressEntry {
            network: network.parse().unwrap(),
            prefix_len,
            protocol,
            port,
            rule,
        };
        assert_eq!(
            compiled.egress,
            [
                entry("198.51.100.0", 24, IpProtocol::Tcp, Some(80), 1),
                entry("198.51.100.0", 24, IpProtocol::Tcp, Some(443), 1),
                entry("192.0.2.53", 32, IpProtocol::Udp, Some(53), 2),
                entry("2001:db8::", 32, IpProtocol::Icmp, None, 3),
                entry("203.0.113.0", 24, IpProtocol::Udp, None, 4),
            ]
        );
        assert_eq!(
            compiled.peers,
            [("192.0.2.10".parse::<std::net::IpAddr>().unwrap(), 32)]
        );
    }
}

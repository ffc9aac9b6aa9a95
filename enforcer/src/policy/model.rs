//! The policy as the rest of the daemon sees it, after parsing and validation.
#![forbid(unsafe_code)]

use std::{fmt, net::IpAddr};

use crate::{
    attest::Selector,
    identity::{SpiffeId, TrustDomain},
};

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The trust domain of this node's workloads.
    pub trust_domain: TrustDomain,
    /// Global mode.
    pub mode: Mode,
    /// cgroup v2 paths (relative to the cgroup2 mount, as `/proc/<pid>/cgroup` writes them)
    /// whose processes are enrolled, with everything below them.
    pub enroll: Vec<String>,
    /// Workload entries, in file order.
    pub workloads: Vec<Workload>,
    /// `allow` and `deny` rules, in file order.
    pub rules: Vec<Rule>,
    /// Plaintext egress permitted to destinations outside the mesh.
    pub egress: Vec<Egress>,
    /// Nodes that run the tunnel.
    pub peers: Vec<Peer>,
}

/// Global or per-rule enforcement mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Denied flows fail.
    #[default]
    Enforce,
    /// Denied flows are let through and reported (dry run).
    Audit,
}

/// A SPIFFE ID and the selectors a process must satisfy, all of them, to get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The identity.
    pub id: SpiffeId,
    /// Every selector must hold (SPIRE semantics).
    pub selectors: Vec<Selector>,
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Permit the flow.
    Allow,
    /// Refuse the flow (overrides any allow).
    Deny,
}

/// Destination ports a rule or egress entry covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ports {
    /// Every port.
    Any,
    /// Only these (sorted, without duplicates).
    List(Vec<u16>),
}

impl Ports {
    /// Whether `port` is covered.
    #[must_use]
    pub fn covers(&self, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::List(ports) => ports.binary_search(&port).is_ok(),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any port"),
            Self::List(ports) => {
                let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
                write!(f, "ports {}", ports.join(","))
            }
        }
    }
}

/// Which SPIFFE IDs a rule side names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdPattern {
    /// Exactly this ID: `spiffe://td/path`.
    Exact(SpiffeId),
    /// This path and everything below it: `spiffe://td/path/*`.
    Prefix(SpiffeId),
    /// Every ID of the trust domain: `spiffe://td` or `spiffe://td/*`.
    TrustDomain(TrustDomain),
}

impl IdPattern {
    /// Whether `id` is named by this pattern.
    #[must_use]
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::Prefix(prefix) => {
                prefix.trust_domain_str() == id.trust_domain_str()
                    && id
                        .path()
                        .strip_prefix(prefix.path())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::TrustDomain(domain) => id.trust_domain_str() == domain.as_str(),
        }
    }

    /// The name of the trust domain the pattern lies in.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        match self {
            Self::Exact(id) | Self::Prefix(id) => id.trust_domain_str(),
            Self::TrustDomain(domain) => domain.as_str(),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix(id) => write!(f, "{id}/*"),
            Self::TrustDomain(domain) => write!(f, "spiffe://{domain}/*"),
        }
    }
}

/// One `allow` or `deny` rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// 1-based number in file order (allow and deny counted together), stamped on events.
    pub number: u32,
    /// Allow or deny.
    pub action: Action,
    /// Source identities.
    pub from: IdPattern,
    /// Destination identities.
    pub to: IdPattern,
    /// Destination ports.
    pub ports: Ports,
    /// A deny rule in audit mode reports instead of refusing.
    pub audit: bool,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {} -> {} on {}", self.from, self.to, self.ports)?;
        if self.audit {
            f.write_str(" (audit)")?;
        }
        Ok(())
    }
}

/// The IP protocol an egress entry permits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP, the default (and the only protocol the tunnel carries).
    #[default]
    Tcp,
    /// UDP (DNS to a resolver, for instance).
    Udp,
    /// ICMP, or `ICMPv6` for IPv6 networks; it has no ports.
    Icmp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        })
    }
}

/// Plaintext egress to a network outside the mesh. It never applies to a mesh peer's address
/// (flows to peers always go through the tunnel) nor to a local enrolled workload's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Egress {
    /// The network address (host bits zero).
    pub network: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// The protocol permitted.
    pub protocol: Protocol,
    /// Destination ports (always [`Ports::Any`] for ICMP, which has none).
    pub ports: Ports,
}

impl Egress {
    /// Whether `ip` lies in this entry's network (see [`Network::contains`]).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        Network {
            network: self.network,
            prefix_len: self.prefix_len,
        }
        .contains(ip)
    }
}

/// A network: an address with its host bits zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Network {
    /// The network address.
    pub network: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl Network {
    /// Whether `ip` lies in this network. Only the same address family matches, and an
    /// IPv4-mapped IPv6 address (or network) counts as the IPv4 one, as in the tunnel.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (network, prefix_len) = match self.network {
            IpAddr::V6(v6) if self.prefix_len >= 96 => v6
                .to_ipv4_mapped()
                .map_or((self.network, self.prefix_len), |v4| {
                    (IpAddr::V4(v4), self.prefix_len - 96)
                }),
            _ => (self.network, self.prefix_len),
        };
        match (ip.to_canonical(), network) {
            (IpAddr::V4(ip), IpAddr::V4(net)) => {
                masked(u128::from(ip.to_bits()), prefix_len, 32) == u128::from(net.to_bits())
            }
            (IpAddr::V6(ip), IpAddr::V6(net)) => {
                masked(ip.to_bits(), prefix_len, 128) == net.to_bits()
            }
            _ => false,
        }
    }
}

/// `bits` (an address `width` bits wide) with everything after the first `prefix_len` bits
/// cleared.
fn masked(bits: u128, prefix_len: u8, width: u32) -> u128 {
    let prefix = u32::from(prefix_len).min(width);
    if prefix == 0 {
        return 0;
    }
    let host_bits = width - prefix;
    (bits >> host_bits) << host_bits
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (network, prefix_len) = (self.network, self.prefix_len);
        match self.protocol {
            Protocol::Icmp => write!(f, "egress icmp {network}/{prefix_len}"),
            protocol => write!(
                f,
                "egress {protocol} {network}/{prefix_len} on {}",
                self.ports
            ),
        }
    }
}

/// A node that runs the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Its address.
    pub address: IpAddr,
    /// Its inbound tunnel port.
    pub port: u16,
    /// The workload addresses it serves (its containers' and pods' networks): a destination
    /// there is tunnelled to the peer's inbound listener at the destination's own address.
    pub cidrs: Vec<Network>,
}

impl Peer {
    /// Where the tunnel dials for a destination at `ip`, when this peer serves it: the peer's
    /// own inbound listener for its address, the inbound port at `ip` itself for an address of
    /// its `cidrs` (the listener in that workload's namespace).
    #[must_use]
    pub fn dial_for(&self, ip: IpAddr) -> Option<std::net::SocketAddr> {
        let ip = ip.to_canonical();
        if self.address.to_canonical() == ip {
            Some(std::net::SocketAddr::new(self.address, self.port))
        } else if self.cidrs.iter().any(|net| net.contains(ip)) {
            Some(std::net::SocketAddr::new(ip, self.port))
        } else {
            None
        }
    }
}

/// Default inbound port of the tunnel.
pub(crate) const DEFAULT_PEER_PORT: u16 = 15008;

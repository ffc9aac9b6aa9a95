//! The policy as the tunnel consults it: authorization between SPIFFE IDs, the mesh peers,
//! plaintext TCP egress, and the version stamped on every record.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use super::{Authorizer, Decision, Egress, Peer, Policy, Protocol};
use crate::identity::SpiffeId;

/// The policy as the tunnel consults it: authorization, mesh peers, plaintext TCP egress, and
/// the version stamped on every record.
#[derive(Clone, Debug)]
pub struct PolicyView {
    /// The policy version.
    pub version: u64,
    authorizer: Authorizer,
    peers: Vec<Peer>,
    /// The TCP egress entries only: the tunnel routes TCP connections, and UDP and ICMP egress
    /// is the kernel's alone.
    egress: Vec<Egress>,
}

impl PolicyView {
    /// The view of `policy` as version `version`.
    #[must_use]
    pub fn new(policy: &Policy, version: u64) -> Self {
        Self {
            version,
            authorizer: Authorizer::new(policy),
            peers: policy.peers.clone(),
            egress: policy
                .egress
                .iter()
                .filter(|egress| egress.protocol == Protocol::Tcp)
                .cloned()
                .collect(),
        }
    }

    /// Decide the flow `src` -> `dst` on `port`.
    #[must_use]
    pub fn decide(&self, src: &SpiffeId, dst: &SpiffeId, port: u16) -> Decision {
        self.authorizer.decide(src, dst, port)
    }

    /// Where the tunnel dials for a destination at `ip`: the inbound address of the mesh peer
    /// at `ip`, or the inbound port at `ip` itself when a peer's `cidrs` hold it (a peer's own
    /// address wins over another's networks).
    #[must_use]
    pub fn peer(&self, ip: IpAddr) -> Option<SocketAddr> {
        self.peer_serving(ip)?.dial_for(ip)
    }

    /// The address of the mesh peer `ip` belongs to (see [`peer`](Self::peer)).
    #[must_use]
    pub fn peer_of(&self, ip: IpAddr) -> Option<IpAddr> {
        self.peer_serving(ip).map(|peer| peer.address)
    }

    /// The peer at `ip`, else the first whose `cidrs` hold it.
    fn peer_serving(&self, ip: IpAddr) -> Option<&Peer> {
        let ip = ip.to_canonical();
        let at = |peer: &&Peer| peer.address.to_canonical() == ip;
        let serves = |peer: &&Peer| peer.cidrs.iter().any(|net| net.contains(ip));
        self.peers
            .iter()
            .find(at)
            .or_else(|| self.peers.iter().find(serves))
    }

    /// The first TCP egress entry (in file order) that permits plaintext to `dst`.
    #[must_use]
    pub fn egress(&self, dst: SocketAddr) -> Option<&Egress> {
        self.egress
            .iter()
            .find(|egress| egress.ports.covers(dst.port()) && egress.contains(dst.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    fn view(text: &str) -> PolicyView {
        let (policy, _) = parse("t.toml", text.as_bytes()).unwrap_or_else(|d| panic!("{d:?}"));
        PolicyView::new(&policy, 7)
    }

    #[test]
    fn a_destination_in_a_peers_networks_is_dialled_at_its_own_address() {
        let view = view(
            r#"
trust_domain = "example.org"
[[peer]]
address = "10.0.0.2"
cidrs = ["10.88.2.0/24", "fd88:2::/64"]
[[peer]]
address = "10.88.2.1"
port = 16000
"#,
        );
        let dial = |ip: &str| view.peer(ip.parse().unwrap());
        assert_eq!(dial("10.88.2.7"), Some("10.88.2.7:15008".parse().unwrap()));
        assert_eq!(
            dial("::ffff:10.88.2.7"),
            Some("10.88.2.7:15008".parse().unwrap())
        );
        assert_eq!(
            dial("fd88:2::9"),
            Some("[fd88:2::9]:15008".parse().unwrap())
        );
        // A peer's own address wins over another peer's networks.
        assert_eq!(dial("10.88.2.1"), Some("10.88.2.1:16000".parse().unwrap()));
        assert_eq!(dial("10.88.3.7"), None);

        let peer_of = |ip: &str| view.peer_of(ip.parse().unwrap());
        assert_eq!(peer_of("10.88.2.7"), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(peer_of("fd88:2::9"), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(peer_of("10.88.2.1"), Some("10.88.2.1".parse().unwrap()));
        assert_eq!(peer_of("10.88.3.7"), None);
    }

    #[test]
    fn peers_and_egress_are_found() {
        let view = view(
            r#"
trust_domain = "example.org"
[[peer]]
address = "10.0.0.2"
[[peer]]
address = "fd00::2"
port = 16000
[[egress]]
cidr = "192.168.0.0/16"
ports = [443]
[[egress]]
cidr = "0.0.0.0/0"
ports = [53]
[[egress]]
cidr = "2001:db8::/32"
protocol = "udp"
ports = [53]
[[egress]]
cidr = "198.51.100.0/24"
protocol = "icmp"
"#,
        );
        assert_eq!(
            view.peer("10.0.0.2".parse().unwrap()),
            Some("10.0.0.2:15008".parse().unwrap())
        );
        assert_eq!(
            view.peer("::ffff:10.0.0.2".parse().unwrap()),
            Some("10.0.0.2:15008".parse().unwrap())
        );
        assert_eq!(
            view.peer("fd00::2".parse().unwrap()),
            Some("[fd00::2]:16000".parse().unwrap())
        );
        assert_eq!(view.peer("10.0.0.3".parse().unwrap()), None);
        assert!(view.egress("192.168.4.5:443".parse().unwrap()).is_some());
        assert!(view.egress("192.168.4.5:80".parse().unwrap()).is_none());
        assert!(view.egress("8.8.8.8:53".parse().unwrap()).is_some());
        // Covered by the udp and icmp entries, but they permit no TCP.
        assert!(view.egress("[2001:db8::1]:53".parse().unwrap()).is_none());
        assert!(view.egress("198.51.100.7:80".parse().unwrap()).is_none());
        assert_eq!(view.version, 7);
    }
}

//! Conversions between `std::net` addresses and the 16-byte, word-wise form the eBPF programs
//! use (IPv4 as v4-mapped IPv6, each `u32` word holding network-order bytes).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use enforcer_ebpf::SockKey;

/// The kernel's word form of `ip`.
#[must_use]
pub(super) fn to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let octets = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The address behind a kernel word form; v4-mapped addresses come back as IPv4.
#[must_use]
pub(crate) fn from_words(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The kernel key for a socket address.
#[must_use]
pub(super) fn sock_key(addr: SocketAddr) -> SockKey {
    SockKey {
        addr: to_words(addr.ip()),
        port: addr.port(),
        pad: 0,
    }
}

/// The socket address behind a kernel key.
#[must_use]
pub(super) fn socket_addr(key: &SockKey) -> SocketAddr {
    SocketAddr::new(from_words(key.addr), key.port)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::{from_words, sock_key, socket_addr, to_words};

    #[test]
    fn ipv4_is_mapped_in_network_order() {
        let words = to_words(Ipv4Addr::LOCALHOST.into());
        assert_eq!(words[0], 0);
        assert_eq!(words[1], 0);
        assert_eq!(words[2], 0xffff_u32.to_be());
        assert_eq!(words[3], u32::from(Ipv4Addr::LOCALHOST).to_be());
    }

    #[test]
    fn round_trips() {
        for text in ["10.1.2.3:80", "[fd00:e5::1]:443", "[::1]:1", "0.0.0.0:0"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_addr(&sock_key(addr)), addr, "{text}");
        }
        assert_eq!(
            from_words([0; 4]),
            "::".parse::<std::net::IpAddr>().unwrap()
        );
    }
}

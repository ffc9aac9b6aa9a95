//! Closing a connection from outside its process: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`,
//! the request `ss -K` sends. The kernel finds the socket by its addresses in the network
//! namespace the netlink socket was made in, checks its cookie (so a later socket on the same
//! addresses is never hit), and aborts it: its process gets `ECONNABORTED`, the peer a reset.
//! Needs `CAP_NET_ADMIN` and a kernel built with `CONFIG_INET_DIAG_DESTROY`
//! ([`SockDestroyer::supported`] asks the kernel).
//!
//! The request is written here byte by byte (`nlmsghdr` + `inet_diag_req_v2`, 72 bytes): the
//! netlink crates build `SOCK_DIAG_BY_FAMILY` dumps but not this message.
#![forbid(unsafe_code)]

use std::{
    io::{self, Read as _},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU32, Ordering},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::KernelFlow;

/// `SOCK_DESTROY` (`linux/sock_diag.h`).
const SOCK_DESTROY: u16 = 21;
/// `NLMSG_ERROR`: the kernel's answer (an errno, 0 for success).
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST | NLM_F_ACK`.
const REQUEST_WITH_ACK: u16 = 1 | 4;
/// Bytes of `nlmsghdr`.
const HEADER_BYTES: usize = 16;
/// Bytes of the whole request.
const REQUEST_BYTES: usize = HEADER_BYTES + 56;

/// Errors of closing a socket.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// The netlink socket could not be made, or the request sent or answered.
    #[error("sock_diag request failed")]
    Io(#[from] io::Error),
    /// The kernel refused the request.
    #[error("the kernel refused SOCK_DESTROY")]
    Refused(#[source] io::Error),
    /// The flow's client socket has no local address yet (its SYN was never built).
    #[error("the connection has no local address yet")]
    Unbound,
}

/// A `NETLINK_SOCK_DIAG` socket of one network namespace (the one it was made in).
pub struct SockDestroyer {
    socket: Socket,
    sequence: AtomicU32,
}

impl SockDestroyer {
    /// A destroyer for the calling thread's network namespace.
    pub fn new() -> io::Result<Self> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::DGRAM.cloexec(),
            Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
        )?;
        Ok(Self {
            socket,
            sequence: AtomicU32::new(1),
        })
    }

    /// Whether the kernel closes sockets on request (`CONFIG_INET_DIAG_DESTROY`, and the
    /// capability): asks it to close a socket that does not exist.
    pub fn supported(&self) -> Result<bool, DestroyError> {
        let nowhere = SocketAddr::from(([127, 0, 0, 1], 0));
        match self.request(false, nowhere, nowhere, 0) {
            Err(DestroyError::Refused(error)) if error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(true)
            }
            Err(DestroyError::Refused(error)) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Ok(false)
            }
            Err(error) => Err(error),
            Ok(()) => Ok(true),
        }
    }

    /// Close `flow`'s client socket (it must live in this destroyer's namespace). A socket
    /// that is already gone is not an error.
    pub fn destroy(&self, flow: &KernelFlow) -> Result<(), DestroyError> {
        let local = flow.local.ok_or(DestroyError::Unbound)?;
        match self.request(flow.ipv6_socket, local, flow.dst, flow.cookie) {
            Err(DestroyError::Refused(error)) if error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            other => other,
        }
    }

    fn request(
        &self,
        ipv6: bool,
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
    ) -> Result<(), DestroyError> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let message = destroy_request(sequence, ipv6, local, remote, cookie);
        self.socket.send(&message)?;
        let mut answer = [0u8; 512];
        loop {
            let len = (&self.socket).read(&mut answer)?;
            if let Some(result) = parse_ack(&answer[..len], sequence) {
                return result;
            }
        }
    }
}

/// The `SOCK_DESTROY` request for the socket `local` -> `remote` with `cookie`.
fn destroy_request(
    sequence: u32,
    ipv6: bool,
    local: SocketAddr,
    remote: SocketAddr,
    cookie: u64,
) -> [u8; REQUEST_BYTES] {
    let mut message = [0u8; REQUEST_BYTES];
    let len = u32::try_from(REQUEST_BYTES).unwrap_or(u32::MAX);
    message[0..4].copy_from_slice(&len.to_ne_bytes());
    message[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
    message[6..8].copy_from_slice(&REQUEST_WITH_ACK.to_ne_bytes());
    message[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // nlmsg_pid stays 0: the kernel.
    let request = &mut message[HEADER_BYTES..];
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    request[0] = u8::try_from(family).unwrap_or_default();
    request[1] = u8::try_from(libc::IPPROTO_TCP).unwrap_or_default();
    // idiag_ext and the pad stay 0; every state:
    request[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network byte order.
    request[8..10].copy_from_slice(&local.port().to_be_bytes());
    request[10..12].copy_from_slice(&remote.port().to_be_bytes());
    request[12..28].copy_from_slice(&address_bytes(local.ip(), ipv6));
    request[28..44].copy_from_slice(&address_bytes(remote.ip(), ipv6));
    // idiag_if stays 0 (any); the cookie as two native-endian halves, low first.
    let low = u32::try_from(cookie & u64::from(u32::MAX)).unwrap_or_default();
    let high = u32::try_from(cookie >> 32).unwrap_or_default();
    request[48..52].copy_from_slice(&low.to_ne_bytes());
    request[52..56].copy_from_slice(&high.to_ne_bytes());
    message
}

/// An address as `inet_diag_sockid` holds it: IPv4 in the first 4 bytes for an IPv4 socket,
/// 16 bytes (IPv4 v4-mapped) for an IPv6 one.
fn address_bytes(ip: IpAddr, ipv6: bool) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match (ip, ipv6) {
        (IpAddr::V4(v4), false) => bytes[..4].copy_from_slice(&v4.octets()),
        (IpAddr::V4(v4), true) => bytes = v4.to_ipv6_mapped().octets(),
        (IpAddr::V6(v6), _) => bytes = v6.octets(),
    }
    bytes
}

/// The result an `NLMSG_ERROR` answer to `sequence` carries; `None` for any other message.
fn parse_ack(bytes: &[u8], sequence: u32) -> Option<Result<(), DestroyError>> {
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let kind = bytes
        .get(4..6)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)?;
    if kind != NLMSG_ERROR || u32_at(8)? != sequence {
        return None;
    }
    let code = i32::from_ne_bytes(bytes.get(16..20)?.try_into().ok()?);
    Some(if code == 0 {
        Ok(())
    } else {
        Err(DestroyError::Refused(io::Error::from_raw_os_error(-code)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_request_names_the_socket_by_addresses_and_cookie() {
        let local: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let message = destroy_request(7, false, local, remote, 0x1122_3344_5566_7788);
        assert_eq!(u32::from_ne_bytes(message[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(message[4..6].try_into().unwrap()), 21);
        assert_eq!(u16::from_ne_bytes(message[6..8].try_into().unwrap()), 1 | 4);
        assert_eq!(u32::from_ne_bytes(message[8..12].try_into().unwrap()), 7);
        let request = &message[16..];
        assert_eq!((request[0], request[1]), (2, 6), "AF_INET, TCP");
        assert_eq!(&request[8..10], &40000_u16.to_be_bytes());
        assert_eq!(&request[10..12], &8080_u16.to_be_bytes());
        assert_eq!(&request[12..16], &[10, 0, 0, 1]);
        assert_eq!(&request[16..28], &[0; 12]);
        assert_eq!(&request[28..32], &[10, 0, 0, 2]);
        assert_eq!(
            u32::from_ne_bytes(request[48..52].try_into().unwrap()),
            0x5566_7788
        );
        assert_eq!(
            u32::from_ne_bytes(request[52..56].try_into().unwrap()),
            0x1122_3344
        );
    }

    #[test]
    fn an_ipv6_socket_names_an_ipv4_peer_v4_mapped() {
        let local: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        let message = destroy_request(1, true, local, remote, 1);
        let request = &message[16..];
        assert_eq!(request[0], 10, "AF_INET6");
        assert_eq!(
            &request[12..28],
            &"::ffff:10.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            &request[28..44],
            &"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }

    fn ack(sequence: u32, code: i32) -> Vec<u8> {
        let mut bytes = vec![0u8; 36];
        bytes[0..4].copy_from_slice(&36_u32.to_ne_bytes());
        bytes[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        bytes[16..20].copy_from_slice(&code.to_ne_bytes());
        bytes
    }

    #[test]
    fn the_answer_to_our_request_says_whether_the_kernel_closed_it() {
        assert!(matches!(parse_ack(&ack(3, 0), 3), Some(Ok(()))));
        assert!(matches!(
            parse_ack(&ack(3, -libc::ENOENT), 3),
            Some(Err(DestroyError::Refused(error))) if error.raw_os_error() == Some(libc::ENOENT)
        ));
        assert!(
            parse_ack(&ack(4, 0), 3).is_none(),
            "another request's answer"
        );
        assert!(parse_ack(&[0; 10], 3).is_none(), "truncated");
    }
}

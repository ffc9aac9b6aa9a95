//! Binding a hop to its workload's address without taking a port at bind time.
//!
//! A hop is bound to the destination's own address first (see [`super::net`]), which proves
//! the destination is on this node. A plain `bind(addr, 0)` would also pick a source port
//! then, before the destination is known: such a port must be free of every socket bound to
//! it, `TIME_WAIT` ones included, so each hop that closes first (its client did) takes a port
//! for 60 s, and once one parity of the ephemeral range is used up every bind scans the range.
//! With `IP_BIND_ADDRESS_NO_PORT` the kernel keeps the address and picks the port at
//! `connect()`, where only the four-tuple must be unique: the whole range serves every
//! workload address and port, and a `TIME_WAIT` port is taken over where the kernel's
//! `tcp_tw_reuse` allows it (by default, loopback four-tuples).
//!
//! Neither socket2 nor rustix offers the option, hence the one `setsockopt` here.
#![expect(
    unsafe_code,
    reason = "setsockopt(IP_BIND_ADDRESS_NO_PORT), which no safe wrapper offers"
)]

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _},
};

use tokio::net::TcpSocket;

/// Binds `socket` to `ip` with its port left to `connect()`.
pub(super) fn bind_address(socket: &TcpSocket, addr: SocketAddr) -> io::Result<()> {
    defer_port(socket)?;
    socket.bind(SocketAddr::new(addr.ip(), 0))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on `socket` (IPv4 or IPv6: the option is read for both).
fn defer_port(socket: &impl AsFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>())
        .expect("the size of an int fits a socklen_t");
    // SAFETY: the descriptor is borrowed from a live socket for the call, and `on` is a live
    // int whose size is passed as the option's length; the kernel only reads it.
    let result = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            len,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[tokio::test]
    async fn a_bound_hop_has_no_port_until_it_connects() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let target = listener.local_addr().unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        bind_address(&socket, target).unwrap();
        let bound = socket.local_addr().unwrap();
        assert_eq!(
            (bound.ip(), bound.port()),
            (target.ip(), 0),
            "bound to the address only"
        );
        let stream = socket.connect(target).await.unwrap();
        let local = stream.local_addr().unwrap();
        assert_eq!(local.ip(), target.ip());
        assert_ne!(local.port(), 0, "the port is picked at connect()");
    }

    #[tokio::test]
    async fn an_ipv6_hop_defers_its_port_too() {
        let Ok(listener) = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await else {
            panic!("this test needs IPv6 on loopback (::1)");
        };
        let target = listener.local_addr().unwrap();
        let socket = TcpSocket::new_v6().unwrap();
        bind_address(&socket, target).unwrap();
        assert_eq!(socket.local_addr().unwrap().port(), 0);
        socket.connect(target).await.unwrap();
    }
}

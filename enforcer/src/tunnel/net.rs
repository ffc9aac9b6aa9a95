//! Socket plumbing shared by both tunnel sides: connecting with a timeout, the kernel's tag on
//! every socket the tunnel opens (see [`SocketTagger`]), `TCP_NODELAY` and keepalive, and
//! aborting with a reset.
//!
//! A hop to a local workload is bound to the destination address before it connects: binding
//! an address that is not this node's fails, so a hop can never leave the node (the tunnel is
//! never a relay), whatever the services table says; its port is picked only at `connect()`
//! (see [`super::hop`]).
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, os::fd::AsFd, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use super::{
    hbone::Refusal,
    hop,
    state::{LocalOwner, Namespace, SocketTagger},
};

/// What a connection the tunnel opens is for.
#[derive(Clone, Copy, Debug)]
pub(super) enum Dial<'a> {
    /// A hop to this local workload, made in its network namespace.
    Hop(&'a LocalOwner),
    /// A connection made in this namespace: to a peer node from the node's own
    /// ([`Namespace::HOME`]), to a plaintext egress destination from the client's, so it
    /// leaves with the client's own routes and addresses and its loopback is its own.
    Out(Namespace),
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The destination refused or reset it, or is unreachable.
    #[error("failed to connect to {addr}")]
    Refused {
        /// The destination.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The destination did not answer in time.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The destination.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// A hop's destination is not an address of this node.
    #[error("{addr} is not an address of this node")]
    NotLocal {
        /// The destination.
        addr: SocketAddr,
    },
    /// The socket could not be set up (created, bound or tagged).
    #[error("failed to set up a socket to {addr}")]
    Socket {
        /// The destination.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    /// How a tunnel endpoint reports this failure to its client.
    #[must_use]
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Refused { .. } => Refusal::UpstreamRefused,
            Self::Timeout { .. } => Refusal::UpstreamTimeout,
            Self::NotLocal { .. } => Refusal::NoSuchWorkload,
            Self::Socket { .. } => Refusal::Unavailable,
        }
    }
}

/// Connect to `addr` within `timeout`, the socket tagged for the kernel by `tags` as `dial`
/// says (a hop is also bound to `addr`'s IP first, see the module comment). Hops to local
/// workloads pass no `keepalive`: the kernel reports a local peer's death at once.
pub(super) async fn connect(
    addr: SocketAddr,
    dial: Dial<'_>,
    tags: &dyn SocketTagger,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<TcpStream, ConnectError> {
    let socket_err = |source| ConnectError::Socket { addr, source };
    let socket = match dial {
        Dial::Hop(owner) => tags.socket_in(owner.netns, addr),
        Dial::Out(netns) => tags.socket_in(netns, addr),
    }
    .map_err(socket_err)?;
    match dial {
        Dial::Hop(owner) => {
            hop::bind_address(&socket, addr).map_err(|error| match error.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => ConnectError::NotLocal { addr },
                _ => socket_err(error),
            })?;
            tags.hop(socket.as_fd(), &owner.id).map_err(socket_err)?;
        }
        Dial::Out(_) => tags.own(socket.as_fd()).map_err(socket_err)?,
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Refused { addr, source })?;
    tune(&stream, keepalive).map_err(socket_err)?;
    Ok(stream)
}

/// Turn off Nagle (the tunnel forwards what it reads at once) and enable keepalive probes
/// after `keepalive` of silence, on a connected socket or on a listener (whose accepted
/// sockets inherit both, sparing a system call or five per connection).
pub(super) fn tune(socket: &impl AsFd, keepalive: Option<Duration>) -> io::Result<()> {
    let socket = SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle / 3)
                .with_retries(3),
        )?;
    }
    Ok(())
}

/// Close `stream` with a reset, so the peer sees a prompt failure rather than an orderly end.
pub(super) fn reset(stream: TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, with a FIN.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

//! Socket plumbing shared by both tunnel sides: connecting with a timeout (and the tunnel mark
//! for hops to local workloads), `TCP_NODELAY` and keepalive, and aborting with a reset.
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, os::fd::AsFd, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use super::hbone::Refusal;

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
    /// The socket could not be set up (e.g. setting the mark needs `CAP_NET_ADMIN`).
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
            Self::Socket { .. } => Refusal::Unavailable,
        }
    }
}

/// Connect to `addr` within `timeout`; a non-zero `mark` is set as `SO_MARK` first (the proof
/// the kernel's ingress rule asks of tunnel traffic to local workloads). Hops to local
/// workloads pass no `keepalive`: the kernel reports a local peer's death at once.
pub async fn connect(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<TcpStream, ConnectError> {
    let socket_err = |source| ConnectError::Socket { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(socket_err)?;
    if mark != 0 {
        SockRef::from(&socket).set_mark(mark).map_err(socket_err)?;
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
pub fn tune(socket: &impl AsFd, keepalive: Option<Duration>) -> io::Result<()> {
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
pub fn reset(stream: TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, with a FIN.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

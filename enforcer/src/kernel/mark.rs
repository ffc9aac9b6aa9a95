//! The tunnel mark: how the daemon's sockets to local workloads prove where they come from.
//!
//! The ingress hook lets TCP reach an enrolled workload's port only when the packet carries the
//! configured `SO_MARK`. Setting a mark needs `CAP_NET_ADMIN`, so no unprivileged process can
//! forge it, whatever address it binds.
#![forbid(unsafe_code)]

use std::{
    io,
    net::{SocketAddr, TcpStream},
};

use socket2::{Domain, SockRef, Socket, Type};

/// Connect to `dst` from a socket marked with `mark` (the daemon's side of a local hop).
pub fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    SockRef::from(&socket).set_mark(mark)?;
    socket.connect(&dst.into())?;
    Ok(socket.into())
}

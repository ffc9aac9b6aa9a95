//! Who is calling: the process at the other end of a Workload API connection, pinned when the
//! connection is accepted.
//!
//! The kernel records the peer's credentials at `connect()`. Where it also hands out a pidfd
//! for that peer (`SO_PEERPIDFD`, Linux 6.5), the caller is pinned exactly: the pidfd names
//! the process that connected, and as long as it has not exited, its pid names that process
//! and no other, so facts read by pid and confirmed by the pidfd afterwards are the caller's.
//! On older kernels the pid from `SO_PEERCRED` is pinned with `pidfd_open` at accept: a
//! caller that exits and whose pid is reused between its `connect()` and the daemon's accept
//! would be mistaken for the new process (see the README's Limits). The pid is the one the
//! daemon's pid namespace gives the process, also for a caller in a container's.

use std::{
    future::Future as _,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    net::sockopt::socket_peercred,
    process::{PidfdFlags, pidfd_open},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
};
use tonic::transport::server::Connected;

use super::{authority::AuthorityFix, limits::ConnectionSlot};

/// How the caller was pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// The kernel's pidfd of the peer that connected (`SO_PEERPIDFD`).
    PeerPidfd,
    /// `pidfd_open` of the peer's pid at accept (kernels without `SO_PEERPIDFD`).
    PidAtAccept,
}

/// The process at the other end of one connection.
#[derive(Debug)]
pub struct Caller {
    pid: u32,
    uid: u32,
    pidfd: OwnedFd,
    pinning: Pinning,
    /// The image of the process the connection serves, as the first identification saw it
    /// (the kernel's image generation): a connection serves that image and no later one.
    image: OnceLock<u64>,
}

impl Caller {
    /// The peer of the connected Unix socket `socket`, pinned by a pidfd.
    pub(crate) fn of(socket: BorrowedFd<'_>) -> io::Result<Self> {
        let cred = socket_peercred(socket)?;
        let pid = cred.pid.as_raw_nonzero().get().cast_unsigned();
        let uid = cred.uid.as_raw();
        match peer_pidfd(socket) {
            Ok(pidfd) => Ok(Self {
                pid,
                uid,
                pidfd,
                pinning: Pinning::PeerPidfd,
                image: OnceLock::new(),
            }),
            Err(error) if error.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                Self::pinned_at_accept(socket)
            }
            Err(error) => Err(error),
        }
    }

    /// The peer of `socket` pinned the way kernels without `SO_PEERPIDFD` allow: a pidfd of
    /// the pid `SO_PEERCRED` names, opened now.
    fn pinned_at_accept(socket: BorrowedFd<'_>) -> io::Result<Self> {
        let cred = socket_peercred(socket)?;
        Ok(Self {
            pid: cred.pid.as_raw_nonzero().get().cast_unsigned(),
            uid: cred.uid.as_raw(),
            pidfd: pidfd_open(cred.pid, PidfdFlags::empty())?,
            pinning: Pinning::PidAtAccept,
            image: OnceLock::new(),
        })
    }

    /// The caller's pid, in the daemon's pid namespace.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The caller's uid when it connected.
    #[must_use]
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// How the caller was pinned.
    #[must_use]
    pub fn pinning(&self) -> Pinning {
        self.pinning
    }

    /// Whether `image` is the image this connection serves: the first image asked about
    /// becomes it (the daemon asks when it admits the connection), so a connection opened by
    /// one image never serves the image an exec made of the process later, whoever holds the
    /// connection by then.
    #[must_use]
    pub fn is_image(&self, image: u64) -> bool {
        *self.image.get_or_init(|| image) == image
    }

    /// Whether the pinned process still runs: while it does, its pid names it and no other.
    #[must_use]
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        poll(&mut fds, Some(&Timespec::default())).is_ok_and(|ready| ready == 0)
    }
}

/// `getsockopt(SO_PEERPIDFD)`: a pidfd of the process that connected `socket`.
fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `socket` is a valid descriptor for the call; `fd` and `len` are live locals of
    // the size the kernel writes for this option (one int).
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &raw mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new descriptor `fd` that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An accepted connection with its caller, as the gRPC server reads it: the caller rides in
/// each request's extensions, the requests' `:authority` is made one h2 accepts, and the
/// connection's slot in the limits is freed when it closes.
#[derive(Debug)]
pub(crate) struct CallerStream {
    stream: AuthorityFix<UnixStream>,
    caller: std::sync::Arc<Caller>,
    /// When the connection ends, whatever is going on (a caller without an identity).
    end: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: ConnectionSlot,
}

impl CallerStream {
    /// The caller.
    pub(crate) fn caller(&self) -> &std::sync::Arc<Caller> {
        &self.caller
    }

    /// Ends the connection (reads see its end) after `lifetime`.
    pub(crate) fn end_after(&mut self, lifetime: std::time::Duration) {
        self.end = Some(Box::pin(tokio::time::sleep(lifetime)));
    }

    /// Waits until the caller has sent something (or closed the connection).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.stream.get_ref().readable().await
    }

    /// `stream`, whose peer is `caller`, holding `slot`.
    pub(crate) fn new(
        stream: UnixStream,
        caller: std::sync::Arc<Caller>,
        slot: ConnectionSlot,
    ) -> Self {
        Self {
            stream: AuthorityFix::new(stream),
            caller,
            end: None,
            _slot: slot,
        }
    }
}

impl Connected for CallerStream {
    type ConnectInfo = std::sync::Arc<Caller>;

    fn connect_info(&self) -> Self::ConnectInfo {
        std::sync::Arc::clone(&self.caller)
    }
}

impl AsyncRead for CallerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(end) = &mut self.end
            && end.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream.get_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream.get_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream.get_mut()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream.get_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.get_ref().is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[tokio::test]
    async fn the_peer_of_a_socket_pair_is_this_process_pinned_by_its_pidfd() {
        let (a, _b) = UnixStream::pair().expect("socket pair");
        let caller = Caller::of(a.as_fd()).expect("peer credentials");
        assert_eq!(caller.pid(), std::process::id());
        assert_eq!(caller.uid(), rustix::process::getuid().as_raw());
        assert!(caller.alive());
        let expected = match peer_pidfd(a.as_fd()) {
            Err(error) if error.raw_os_error() == Some(libc::ENOPROTOOPT) => Pinning::PidAtAccept,
            _ => Pinning::PeerPidfd,
        };
        assert_eq!(caller.pinning(), expected);
        let fallback = Caller::pinned_at_accept(a.as_fd()).expect("SO_PEERCRED and pidfd_open");
        assert_eq!(fallback.pid(), std::process::id());
        assert!(fallback.alive());
        assert_eq!(fallback.pinning(), Pinning::PidAtAccept);
    }

    #[test]
    fn a_caller_that_exited_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("a child process");
        let pidfd = pidfd_open(
            rustix::process::Pid::from_child(&child),
            PidfdFlags::empty(),
        )
        .expect("pidfd of the child");
        child.wait().expect("reaped");
        let caller = Caller {
            pid: child.id(),
            uid: 0,
            pidfd,
            pinning: Pinning::PidAtAccept,
            image: OnceLock::new(),
        };
        assert!(!caller.alive());
        assert!(caller.is_image(7), "the first image asked about");
        assert!(caller.is_image(7));
        assert!(!caller.is_image(8), "a later image");
    }
}

//! Network namespaces as the daemon serves them: named as the eBPF programs see them, by the
//! namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14), and entered the way Istio ztunnel's
//! in-pod mode does (`setns(CLONE_NEWNET)` around the one call that makes a socket, then
//! straight back): a socket belongs to the namespace it was made in for its whole life, and
//! any thread may drive it afterwards.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// The cookie of the network namespace `socket` lives in.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits a socklen_t");
    // SAFETY: `socket` is an open descriptor for the whole call, and the kernel writes at most
    // `len` bytes into `cookie`, a u64 that lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A network namespace held open: while a `Netns` lives, so does the namespace.
#[derive(Debug)]
pub struct Netns {
    file: OwnedFd,
    inode: u64,
    cookie: u64,
}

impl Netns {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let inode = file.metadata()?.ino();
        Ok(Self {
            file: file.into(),
            inode,
            cookie: probe_cookie()?,
        })
    }

    /// The namespace process `pid` lives in; `home` is the caller's own, to come back to.
    pub fn of_process(pid: u32, home: &Self) -> io::Result<Self> {
        let file = File::open(format!("/proc/{pid}/ns/net"))?;
        let inode = file.metadata()?.ino();
        let mut netns = Self {
            file: file.into(),
            inode,
            cookie: 0,
        };
        netns.cookie = netns.run(home, probe_cookie)??;
        Ok(netns)
    }

    /// The namespace's inode (what `/proc/<pid>/ns/net` links to).
    #[must_use]
    pub const fn inode(&self) -> u64 {
        self.inode
    }

    /// The namespace's cookie, as the eBPF programs name it.
    #[must_use]
    pub const fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The inode of the user namespace that owns this namespace (`NS_GET_USERNS`).
    pub fn owner_user_namespace(&self) -> io::Result<u64> {
        // SAFETY: `file` is an open namespace descriptor for the whole call; the ioctl takes
        // no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::NS_GET_USERNS) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned `fd`, open and owned by nobody else.
        let owner = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(owner.metadata()?.ino())
    }

    /// Run `work` on the calling thread inside this namespace, then move the thread back to
    /// `home`. Meant for the calls that make sockets; `work` must not block. Should the move
    /// back fail, the process aborts: a thread left in a workload's namespace would make the
    /// daemon's next sockets there.
    pub fn run<T>(&self, home: &Self, work: impl FnOnce() -> T) -> io::Result<T> {
        if self.cookie == home.cookie && self.cookie != 0 {
            return Ok(work());
        }
        move_into_link_name_space(self.file.as_fd(), Some(LinkNameSpaceType::Network))?;
        let _back = GoHome(home);
        Ok(work())
    }
}

/// The cookie of the calling thread's namespace, read from a socket made for the purpose.
fn probe_cookie() -> io::Result<u64> {
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    netns_cookie(probe.as_fd())
}

/// Moves the thread back to its namespace when dropped, also while `work` unwinds.
struct GoHome<'a>(&'a Netns);

impl Drop for GoHome<'_> {
    fn drop(&mut self) {
        if let Err(error) =
            move_into_link_name_space(self.0.file.as_fd(), Some(LinkNameSpaceType::Network))
        {
            tracing::error!(%error, "failed to return to the daemon's network namespace; aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsFd as _};

    use super::{Netns, netns_cookie};

    #[test]
    fn sockets_of_one_namespace_share_its_cookie() {
        let one = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let two = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let first = netns_cookie(one.as_fd()).expect("getsockopt");
        assert_eq!(first, netns_cookie(two.as_fd()).expect("getsockopt"));
        assert_ne!(first, 0, "a namespace cookie is never zero");
        assert_eq!(Netns::current().expect("own namespace").cookie(), first);
    }

    #[test]
    fn running_in_the_own_namespace_runs_in_place() {
        let home = Netns::current().expect("own namespace");
        let again = Netns::current().expect("own namespace");
        assert_eq!(home.inode(), again.inode());
        let cookie = again
            .run(&home, || {
                let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
                netns_cookie(probe.as_fd()).expect("getsockopt")
            })
            .expect("run");
        assert_eq!(cookie, home.cookie());
    }
}

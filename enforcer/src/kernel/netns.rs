//! The network namespace a socket lives in, named as the eBPF programs see it: the
//! namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// The cookie of the network namespace `socket` lives in; `None` on kernels that do not name
/// namespaces to user space (before 5.14).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<Option<u64>> {
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
        return Ok(Some(cookie));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOPROTOOPT) {
        Ok(None)
    } else {
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsFd as _};

    use super::netns_cookie;

    #[test]
    fn sockets_of_one_namespace_share_its_cookie() {
        let one = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let two = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let first = netns_cookie(one.as_fd()).expect("getsockopt");
        assert_eq!(first, netns_cookie(two.as_fd()).expect("getsockopt"));
        assert_ne!(first, Some(0), "a namespace cookie is never zero");
    }
}

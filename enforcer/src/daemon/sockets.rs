//! Which TCP addresses a process listens on, from procfs: the socket inodes among its open
//! files, looked up in its network namespace's `/proc/<pid>/net/tcp` and `tcp6` tables.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use crate::kernel::from_words;

/// The `st` column of a listening socket.
const TCP_LISTEN: &str = "0A";

/// One listening socket of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Listener {
    /// The address it listens on.
    pub(crate) addr: SocketAddr,
    /// Its socket inode.
    pub(crate) inode: u64,
    /// A descriptor number of it in the process.
    pub(crate) fd: i32,
}

/// The listening sockets of `pid`; empty when the process is gone or its files are unreadable.
#[must_use]
pub(crate) fn listeners_of(pid: u32) -> Vec<Listener> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            found.extend(listeners(&text).into_iter().filter_map(|(addr, inode)| {
                inodes.get(&inode).map(|&fd| Listener { addr, inode, fd })
            }));
        }
    }
    found.sort_unstable_by_key(|listener| (listener.addr, listener.inode));
    found.dedup_by_key(|listener| (listener.addr, listener.inode));
    found
}

/// The sockets among `pid`'s open files: inode -> a descriptor number.
fn socket_inodes(pid: u32) -> HashMap<u64, i32> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(entry.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((inode, fd))
        })
        .collect()
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` table: (local address, inode).
#[must_use]
pub(crate) fn listeners(table: &str) -> Vec<(SocketAddr, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&TCP_LISTEN) {
                return None;
            }
            let addr = parse_addr(fields.get(1)?)?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((addr, inode))
        })
        .collect()
}

/// An address as the tables write it: the IP as 32-bit words in host order, then `:` and the
/// port, all in hex.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut words = Vec::with_capacity(4);
    for chunk in ip.as_bytes().chunks(8) {
        words.push(u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?);
    }
    let ip = match words[..] {
        [word] => IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes())),
        [a, b, c, d] => from_words([a, b, c, d]),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listening_sockets_with_their_inodes() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n   \
             1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1\n   \
             2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0\n";
        assert_eq!(
            listeners(table),
            [
                ("127.0.0.1:15001".parse().expect("addr"), 111),
                ("0.0.0.0:8080".parse().expect("addr"), 333),
            ]
        );
    }

    #[test]
    fn parses_ipv6_and_v4_mapped_addresses() {
        assert_eq!(
            parse_addr("00000000000000000000000001000000:1F90"),
            Some("[::1]:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(parse_addr("zz:1"), None);
        assert_eq!(parse_addr("0100007F"), None);
    }

    #[test]
    fn a_missing_process_listens_nowhere() {
        assert!(listeners_of(u32::MAX).is_empty());
    }

    #[test]
    fn finds_its_own_listener_with_a_descriptor() {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let found = listeners_of(std::process::id());
        let mine = found
            .iter()
            .find(|l| l.addr == addr)
            .unwrap_or_else(|| panic!("{addr} not among {found:?}"));
        assert_eq!(mine.fd, listener.as_raw_fd());
    }
}

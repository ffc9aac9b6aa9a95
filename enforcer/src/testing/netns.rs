//! Named network namespaces and veth links between them.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::{next_serial, run_checked, unique_name};

/// A network namespace created with `ip netns add` for one test, deleted when the last clone
/// is dropped. Starts with only `lo`, which is up.
///
/// Deleting the namespace also deletes the veth ends inside it. Processes inside are not
/// killed: that is the job of their [`Spawned`](super::Spawned) guard, which keeps the
/// namespace alive until it has done so.
#[derive(Debug, Clone)]
#[must_use = "the network namespace is deleted as soon as the guard is dropped"]
pub struct Netns {
    named: Arc<NamedNetns>,
}

impl Netns {
    /// Creates the namespace `enf-<pid>-<n>-<hint>` and brings its loopback up.
    pub fn new(hint: &str) -> Self {
        let name = unique_name(hint);
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let netns = Self {
            named: Arc::new(NamedNetns { name }),
        };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The name `ip netns` knows the namespace by.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.named.name
    }

    /// The namespace file `ip netns` keeps: `/run/netns/NAME`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.name())
    }

    /// Run `work` on a thread that has entered the namespace, and return what it returns:
    /// sockets it creates live in the namespace (and stay there when handed back).
    pub fn within<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let netns = File::open(&path).unwrap_or_else(|error| {
                        panic!("failed to open {}: {error}", path.display())
                    });
                    move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
                        .unwrap_or_else(|error| {
                            panic!("failed to enter {}: {error}", path.display())
                        });
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The command prefix that runs a program inside: `ip netns exec NAME`.
    #[must_use]
    pub fn exec_args(&self) -> Vec<String> {
        ["ip", "netns", "exec", self.name()]
            .map(str::to_owned)
            .to_vec()
    }

    /// Runs the command `args` inside the namespace to completion, panicking with its stderr
    /// if it fails.
    pub fn run(&self, args: &[&str]) {
        run_checked(
            Command::new("ip")
                .args(["netns", "exec", self.name()])
                .args(args),
        );
    }

    /// Runs `ip -n NAME <args>`, cheaper than [`run`](Self::run) for configuring the namespace.
    fn ip(&self, args: &[&str]) {
        run_checked(Command::new("ip").args(["-n", self.name()]).args(args));
    }
}

/// A namespace name registered with `ip netns`; deleting it is the whole point of the type.
#[derive(Debug)]
struct NamedNetns {
    name: String,
}

impl Drop for NamedNetns {
    /// Runs `ip netns del`, warning instead of panicking, which could abort an unwinding test.
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: `ip netns del {}` failed ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => eprintln!(
                "warning: failed to run `ip netns del {}`: {error}",
                self.name
            ),
        }
    }
}

/// One end of a veth link made by [`connect_nodes`]: a namespace and its addresses on the link.
#[derive(Debug, Clone)]
pub struct Node {
    netns: Netns,
    ifname: String,
    addr4: Ipv4Addr,
    addr6: Ipv6Addr,
}

impl Node {
    /// The namespace this end lives in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The name of the veth interface inside [`netns`](Self::netns).
    #[must_use]
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The IPv4 address of this end (`10.231.X.1` or `.2`, prefix length 24).
    #[must_use]
    pub fn addr4(&self) -> Ipv4Addr {
        self.addr4
    }

    /// The IPv6 address of this end (`fd00:e5:X::1` or `::2`, prefix length 64).
    #[must_use]
    pub fn addr6(&self) -> Ipv6Addr {
        self.addr6
    }
}

/// The inode of the namespace file at `path` (`/proc/<pid>/ns/<kind>`, or a bind mount of
/// one): what tells two namespaces apart.
pub fn ns_inode(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("failed to stat {}: {error}", path.display()))
        .ino()
}

/// Joins `a` and `b` with a veth pair and returns both ends, addressed and up.
///
/// The ends are created directly inside the namespaces, so nothing ever appears in the root
/// namespace. Each pair gets its own subnet `10.231.X.0/24` and `fd00:e5:X::/64`, `a` taking
/// `.1`/`::1` and `b` `.2`/`::2`; X counts pairs in this process, modulo 256. IPv6 addresses
/// skip duplicate address detection so they are usable at once.
pub fn connect_nodes(a: &Netns, b: &Netns) -> (Node, Node) {
    static NEXT_SUBNET: AtomicU8 = AtomicU8::new(0);
    let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
    let (name_a, name_b) = veth_names();
    run_checked(Command::new("ip").args([
        "link",
        "add",
        &name_a,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &name_b,
        "netns",
        b.name(),
    ]));
    (
        configure(a, name_a, subnet, 1),
        configure(b, name_b, subnet, 2),
    )
}

fn configure(netns: &Netns, ifname: String, subnet: u8, host: u8) -> Node {
    let addr4 = Ipv4Addr::new(10, 231, subnet, host);
    let addr6 = Ipv6Addr::new(0xfd00, 0xe5, subnet.into(), 0, 0, 0, 0, host.into());
    netns.ip(&["addr", "add", &format!("{addr4}/24"), "dev", &ifname]);
    netns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{addr6}/64"),
        "dev",
        &ifname,
        "nodad",
    ]);
    netns.ip(&["link", "set", &ifname, "up"]);
    Node {
        netns: netns.clone(),
        ifname,
        addr4,
        addr6,
    }
}

/// Names for the two ends of a new veth pair, `ev<pid % 10000><n>a` and `…b`: interface names
/// are limited to 15 bytes, too short for [`unique_name`].
fn veth_names() -> (String, String) {
    let stem = format!("ev{}{}", std::process::id() % 10_000, next_serial());
    assert!(stem.len() < 15, "veth name {stem}a is longer than 15 bytes");
    (format!("{stem}a"), format!("{stem}b"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_in_ifnamsiz() {
        let (a, b) = veth_names();
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert!(a.starts_with("ev") && a.ends_with('a'), "{a}");
        assert_eq!(a[..a.len() - 1], b[..b.len() - 1]);
        assert_ne!(veth_names(), veth_names());
    }
}

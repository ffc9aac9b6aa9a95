//! The privileged test harness: scratch cgroups, network namespaces joined by veth links, and
//! workload processes placed in them. Real library code, reused by every integration test,
//! example and benchmark.
//!
//! Every guard removes what it created when it is dropped, also while a failing test unwinds.
//! Drop order does not matter: a [`Spawned`] process keeps the [`ScratchCgroup`] and [`Netns`]
//! it was placed in alive until it has killed and reaped its process, a child cgroup keeps its
//! parent, and a [`Node`] keeps its namespace. Declaring guards in the order they are needed
//! (cgroup and netns first, processes after) reads best and tears down in reverse.
//!
//! Tests that touch kernel state call [`require_root`] first and hold [`serial`] throughout,
//! since that state is global:
//!
//! ```no_run
//! use enforcer::testing::{ScratchCgroup, Spawn, require_root, serial};
//!
//! require_root();
//! let _serial = serial();
//! let cgroup = ScratchCgroup::new("doc");
//! let sleeper = Spawn::new("sleep").arg("30").cgroup(&cgroup).spawn();
//! assert_eq!(cgroup.procs(), [sleeper.pid()]);
//! ```
//!
//! Names start with `enf-<pid>-` (veth links with `ev`), so leftovers of a run that was killed
//! outright can be found and removed by name.

#![forbid(unsafe_code)]

mod cgroup;
mod client;
mod container;
mod daemon;
mod datapath;
mod demo_policy;
mod mesh;
mod netns;
mod netns_tunnel;
mod openssl;
mod process;
mod workload_api;

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

pub use cgroup::ScratchCgroup;
pub use client::{Persona, WorkloadClient};
pub use container::{
    CgroupLayout, Container, ContainerBuilder, ContainerProcess, Pod, PodNetwork,
    cgroup_hierarchies, route_pod_networks,
};
pub use daemon::{DaemonNode, NodeSetup};
pub use datapath::ScratchDatapath;
pub use demo_policy::demo_policy;
pub use mesh::{
    MeshListeners, MeshNode, TableOrigins, TableWorkloads, TestPki, policy as test_policy,
};
pub use netns::{Netns, Node, connect_nodes, ns_inode};
pub use netns_tunnel::{INBOUND_PORT, OUTBOUND_PORT, TunnelNode, mesh_policy, wait_for_listener};
pub use openssl::{openssl, output_text, x509_text};
pub use process::{Spawn, Spawned, cpu_time, fd_count, rss_kib, set_affinity};
pub use workload_api::{
    HandedConnection, PYSPIFFE_VENV, PublicDir, SYSTEM_PYTHON, as_uid, pyspiffe_python,
};

use crate::report::report;

/// Panics unless the test runs as root: a privileged test that cannot run must fail, not pass.
pub fn require_root() {
    let status = fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|error| panic!("failed to read /proc/self/status: {error}"));
    let uid = parse_effective_uid(&status)
        .unwrap_or_else(|| panic!("no Uid line in /proc/self/status:\n{status}"));
    assert!(
        uid == 0,
        "this privileged test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF); \
         run it as root, e.g. `sudo cargo xtask test` (effective uid is {uid})"
    );
}

/// Takes the process-wide lock that keeps kernel-touching tests from running concurrently.
///
/// Cargo runs test binaries one after another, so a lock per process is enough. A test that
/// panicked while holding it poisons it; the next test still gets it, since every guard cleaned
/// up during that panic.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A name no other object of this test process has: `enf-<pid>-<counter>-<hint>`.
///
/// Characters of `hint` other than ASCII letters, digits, `-` and `_` become `_`, and it is cut
/// to 24 characters, so the name is safe as a cgroup directory and a netns name.
#[must_use]
pub fn unique_name(hint: &str) -> String {
    let hint: String = hint
        .chars()
        .take(24)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("enf-{}-{}-{hint}", std::process::id(), next_serial())
}

/// The next value of the process-wide counter that keeps generated names unique.
fn next_serial() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The effective uid from the text of `/proc/<pid>/status` (`Uid: real effective saved fs`).
fn parse_effective_uid(status: &str) -> Option<u32> {
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `command` to completion, panicking with its stderr if it cannot start or fails.
fn run_checked(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("failed to start {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_pid_and_hint_and_differ() {
        let first = unique_name("web");
        let second = unique_name("web");
        let prefix = format!("enf-{}-", std::process::id());
        assert!(first.starts_with(&prefix), "{first}");
        assert!(first.ends_with("-web"), "{first}");
        assert_ne!(first, second);
    }

    #[test]
    fn unique_names_are_safe_path_components() {
        let name = unique_name("../a b/c");
        assert!(name.ends_with("-___a_b_c"), "{name}");
        let long = unique_name(&"x".repeat(100));
        assert!(long.ends_with(&format!("-{}", "x".repeat(24))), "{long}");
    }

    #[test]
    fn parses_effective_uid() {
        let status =
            "Name:\tcargo\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn serial_survives_a_poisoning_panic() {
        let poisoner = std::thread::spawn(|| {
            let _serial = serial();
            panic!("deliberate panic while holding the lock");
        });
        assert!(poisoner.join().is_err());
        drop(serial());
    }
}

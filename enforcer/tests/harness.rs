//! Privileged tests of the test harness itself (`enforcer::testing`) and of the cgroup and
//! bpffs helpers it builds on. Run as root, one at a time:
//! `cargo test -p enforcer --test harness -- --test-threads=1`.

#![expect(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of the package but uses only the library"
)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use enforcer::kernel::{CgroupError, cgroup_id, cgroup2_mount, ensure_bpffs, is_bpffs};
use enforcer::testing::{
    Netns, Node, ScratchCgroup, Spawn, Spawned, connect_nodes, require_root, serial, unique_name,
};

/// Generous bound for anything that should happen "at once" on a loaded CI machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one TCP connection on `argv[1]` (any free port), prints the port, answers the line
/// it receives with `echo <line>`, then prints the peer's address.
const ECHO_SERVER: &str = r#"
import socket, sys
addr = sys.argv[1]
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as server:
    server.bind((addr, 0))
    server.listen(1)
    print(server.getsockname()[1], flush=True)
    conn, peer = server.accept()
    with conn:
        line = conn.makefile().readline()
        conn.sendall(("echo " + line).encode())
    print(peer[0], flush=True)
"#;

/// Connects to `argv[1]` port `argv[2]`, sends `hello`, prints the answer.
const ECHO_CLIENT: &str = r#"
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(b"hello\n")
    print(conn.makefile().readline().strip(), flush=True)
"#;

#[test]
fn spawned_process_runs_in_its_scratch_cgroup() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-cg");
    let sleeper = Spawn::new("sleep").arg("30").cgroup(&cgroup).spawn();

    assert_eq!(cgroup.procs(), [sleeper.pid()]);
    let relative = cgroup
        .path()
        .strip_prefix(cgroup2_mount().expect("cgroup2 is mounted"))
        .expect("scratch cgroups live under the cgroup2 mount");
    let membership = fs::read_to_string(format!("/proc/{}/cgroup", sleeper.pid()))
        .expect("the workload is alive");
    let expected = format!("0::/{}", relative.display());
    assert!(
        membership.lines().any(|line| line == expected),
        "/proc/{}/cgroup does not name {expected}:\n{membership}",
        sleeper.pid()
    );
    assert_becomes_program(&sleeper, "sleep");
    assert_eq!(cgroup.procs(), [sleeper.pid()], "exec kept the pid");
}

#[test]
fn child_cgroups_nest_and_have_their_own_ids() {
    require_root();
    let _serial = serial();
    let parent = ScratchCgroup::new("harness-parent");
    let child = parent.child("leaf");
    assert_eq!(child.path(), parent.path().join("leaf"));
    let sleeper = Spawn::new("sleep").arg("30").cgroup(&child).spawn();

    assert_eq!(child.procs(), [sleeper.pid()]);
    assert!(
        parent.procs().is_empty(),
        "cgroup.procs lists direct members only"
    );
    assert_ne!(parent.id(), child.id());
    let inode = fs::metadata(child.path()).expect("child exists").ino();
    assert_eq!(child.id(), inode);
    assert!(
        child.open().metadata().expect("opened directory").is_dir(),
        "open() gives the cgroup directory"
    );
}

#[test]
fn cgroup_id_rejects_paths_that_are_not_cgroups() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-id");
    let procs = cgroup.path().join("cgroup.procs");
    assert!(matches!(
        cgroup_id(&procs),
        Err(CgroupError::NotADirectory { path }) if path == procs
    ));
    let tmp = std::env::temp_dir();
    assert!(matches!(
        cgroup_id(&tmp),
        Err(CgroupError::NotOnCgroup2 { path, .. }) if path == tmp
    ));
    let missing = cgroup.path().join("missing");
    let error = cgroup_id(&missing).expect_err("no such cgroup");
    assert!(error.to_string().contains("missing"), "{error}");
}

#[test]
fn spawned_process_runs_in_its_netns() {
    require_root();
    let _serial = serial();
    let netns = Netns::new("harness-ns");
    let sleeper = Spawn::new("sleep").arg("30").netns(&netns).spawn();

    let ours = fs::read_link("/proc/self/ns/net").expect("own netns");
    let theirs = net_namespace_of(sleeper.pid());
    assert_ne!(
        ours, theirs,
        "the workload is still in our network namespace"
    );
    let named = fs::metadata(Path::new("/run/netns").join(netns.name()))
        .expect("ip netns add created the name")
        .ino();
    assert_eq!(
        theirs,
        PathBuf::from(format!("net:[{named}]")),
        "the workload is in a namespace other than {}",
        netns.name()
    );
    assert_becomes_program(&sleeper, "sleep");
}

#[test]
fn spawned_process_runs_in_cgroup_and_netns_together() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-both");
    let netns = Netns::new("harness-both");
    let sleeper = Spawn::new("sleep")
        .arg("30")
        .cgroup(&cgroup)
        .netns(&netns)
        .spawn();

    assert_eq!(cgroup.procs(), [sleeper.pid()]);
    assert_ne!(
        net_namespace_of(sleeper.pid()),
        fs::read_link("/proc/self/ns/net").expect("own netns")
    );
    assert_becomes_program(&sleeper, "sleep");
    assert_eq!(cgroup.procs(), [sleeper.pid()], "exec kept the pid");
}

#[test]
fn connected_nodes_talk_tcp_over_ipv4_and_ipv6() {
    require_root();
    let _serial = serial();
    let client_ns = Netns::new("harness-client");
    let server_ns = Netns::new("harness-server");
    let (client, server) = connect_nodes(&client_ns, &server_ns);

    assert_eq!(client.addr4().octets()[..2], [10, 231]);
    assert_eq!(client.addr4().octets()[..3], server.addr4().octets()[..3]);
    assert_eq!(
        client.addr6().segments()[..4],
        server.addr6().segments()[..4]
    );
    assert_eq!(client.addr6().segments()[..2], [0xfd00, 0xe5]);
    assert_echo(
        &client,
        &server,
        &client.addr4().to_string(),
        &server.addr4().to_string(),
    );
    assert_echo(
        &client,
        &server,
        &client.addr6().to_string(),
        &server.addr6().to_string(),
    );
}

#[test]
fn veth_ends_never_appear_in_the_root_netns() {
    require_root();
    let _serial = serial();
    let left = Netns::new("harness-left");
    let right = Netns::new("harness-right");
    let (a, b) = connect_nodes(&left, &right);
    let (c, _) = connect_nodes(&left, &right);

    assert_ne!(a.addr4(), c.addr4(), "each pair has its own subnet");
    for node in [&a, &b, &c] {
        assert!(
            !Path::new("/sys/class/net").join(node.ifname()).exists(),
            "{} is in the root network namespace",
            node.ifname()
        );
    }
    left.run(&["ip", "link", "show", "dev", a.ifname()]);
    right.run(&["ip", "link", "show", "dev", b.ifname()]);
}

#[test]
fn guards_remove_everything_when_dropped() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-drop");
    let child = cgroup.child("leaf");
    let netns = Netns::new("harness-drop");
    let peer = Netns::new("harness-drop-peer");
    let (node, _) = connect_nodes(&netns, &peer);
    let sleeper = Spawn::new("sleep")
        .arg("30")
        .cgroup(&child)
        .netns(&netns)
        .spawn();
    let created = Created::record(&[&cgroup, &child], &[&netns, &peer], &sleeper);

    drop((sleeper, node, peer, netns, child, cgroup));
    created.assert_gone();
}

#[test]
fn drop_order_does_not_matter() {
    require_root();
    let _serial = serial();
    let parent = ScratchCgroup::new("harness-order");
    let child = parent.child("leaf");
    let netns = Netns::new("harness-order");
    let sleeper = Spawn::new("sleep")
        .arg("30")
        .cgroup(&child)
        .netns(&netns)
        .spawn();
    let created = Created::record(&[&parent, &child], &[&netns], &sleeper);

    drop((parent, child, netns));
    assert!(created.cgroups.iter().all(|path| path.exists()));
    assert!(netns_names().contains(&created.netns[0]));
    assert!(
        Path::new(&format!("/proc/{}", created.pid)).exists(),
        "the process outlived its cgroup guards"
    );
    drop(sleeper);
    created.assert_gone();
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    require_root();
    let _serial = serial();
    let mut created = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let cgroup = ScratchCgroup::new("harness-panic");
        let netns = Netns::new("harness-panic");
        let sleeper = Spawn::new("sleep")
            .arg("30")
            .cgroup(&cgroup)
            .netns(&netns)
            .spawn();
        created = Some(Created::record(&[&cgroup], &[&netns], &sleeper));
        panic!("deliberate panic with live guards");
    }));

    assert!(outcome.is_err());
    created.expect("guards were created").assert_gone();
}

#[test]
fn cgroup_guard_kills_processes_left_behind() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-orphans");
    let mut parent = Spawn::new("sh")
        .args(["-c", "sleep 30 & sleep 30 & echo forked; wait"])
        .cgroup(&cgroup)
        .spawn();
    assert_eq!(parent.read_line(TIMEOUT).as_deref(), Some("forked"));
    parent.kill();
    assert_eq!(cgroup.procs().len(), 2, "the two orphaned sleeps remain");
    let path = cgroup.path().to_owned();

    drop((parent, cgroup));
    assert!(!path.exists(), "{} was not removed", path.display());
}

#[test]
fn spawned_process_talks_over_stdio() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-stdio");
    let mut cat = Spawn::new("cat").stdin_piped().cgroup(&cgroup).spawn();
    cat.write_line("ping");
    assert_eq!(cat.read_line(TIMEOUT).as_deref(), Some("ping"));
    assert_eq!(cat.read_line(Duration::from_millis(50)), None);

    let mut failing = Spawn::new("sh")
        .args(["-c", "echo \"oops $GREETING\" >&2; exit 3"])
        .env("GREETING", "hi")
        .spawn();
    let status = failing.wait_timeout(TIMEOUT).expect("sh exits");
    assert_eq!(status.code(), Some(3));
    wait_for(
        || failing.stderr().contains("oops hi"),
        "stderr to be captured",
    );
}

#[test]
fn failed_placement_panics_with_the_wrappers_stderr() {
    require_root();
    let _serial = serial();
    let cgroup = ScratchCgroup::new("harness-gone");
    fs::remove_dir(cgroup.path()).expect("removing the empty cgroup behind the guard's back");

    let outcome = panic::catch_unwind(|| Spawn::new("sleep").arg("30").cgroup(&cgroup).spawn());
    let payload = outcome.expect_err("placement into a missing cgroup must fail");
    let message = payload
        .downcast_ref::<String>()
        .expect("the panic carries a formatted message");
    assert!(message.contains("was not placed"), "{message}");
    assert!(
        message.contains("cgroup.procs"),
        "stderr is missing: {message}"
    );
}

#[test]
fn ensure_bpffs_mounts_once_and_accepts_subdirectories() {
    require_root();
    let _serial = serial();
    let mount = TempMount::new();
    assert!(
        !is_bpffs(&mount.dir),
        "a fresh directory in /tmp is not bpffs"
    );

    ensure_bpffs(&mount.dir).expect("mounting bpffs");
    assert!(is_bpffs(&mount.dir));
    assert_eq!(mount.bpf_mounts(), 1);

    ensure_bpffs(&mount.dir).expect("already mounted");
    let inside = mount.dir.join("enforcer");
    ensure_bpffs(&inside).expect("directory inside bpffs");
    assert!(is_bpffs(&inside));
    assert_eq!(mount.bpf_mounts(), 1, "nothing was mounted a second time");
}

/// What a test created, recorded so it can check that all of it is gone afterwards.
struct Created {
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
    pid: u32,
}

impl Created {
    fn record(cgroups: &[&ScratchCgroup], netns: &[&Netns], process: &Spawned) -> Self {
        Self {
            cgroups: cgroups
                .iter()
                .map(|cgroup| cgroup.path().to_owned())
                .collect(),
            netns: netns.iter().map(|netns| netns.name().to_owned()).collect(),
            pid: process.pid(),
        }
    }

    fn assert_gone(&self) {
        for path in &self.cgroups {
            assert!(!path.exists(), "cgroup {} was left behind", path.display());
        }
        let listed = netns_names();
        for name in &self.netns {
            assert!(!listed.contains(name), "netns {name} was left behind");
        }
        let comm = fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        assert_ne!(
            comm.trim(),
            "sleep",
            "process {} was left running",
            self.pid
        );
    }
}

/// A directory in the temp dir for a bpffs mount; unmounted and removed when dropped.
struct TempMount {
    dir: PathBuf,
}

impl TempMount {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("bpffs"));
        fs::create_dir(&dir).expect("creating the mount point");
        Self { dir }
    }

    /// How many bpf filesystems are mounted exactly at or below this directory.
    fn bpf_mounts(&self) -> usize {
        let dir = self.dir.to_str().expect("temp dir is UTF-8");
        fs::read_to_string("/proc/self/mountinfo")
            .expect("mount table")
            .lines()
            .filter(|line| line.contains(" - bpf "))
            .filter(|line| {
                line.split(' ')
                    .nth(4)
                    .is_some_and(|point| point.starts_with(dir))
            })
            .count()
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        while self.bpf_mounts() > 0 {
            let status = Command::new("umount").arg(&self.dir).status();
            if !status.is_ok_and(|status| status.success()) {
                eprintln!("warning: failed to unmount {}", self.dir.display());
                return;
            }
        }
        if let Err(error) = fs::remove_dir(&self.dir) {
            eprintln!("warning: failed to remove {}: {error}", self.dir.display());
        }
    }
}

/// Runs the echo server on `server` and the client on `client`, talking to `server_addr`, and
/// checks both sides of the exchange.
fn assert_echo(client: &Node, server: &Node, client_addr: &str, server_addr: &str) {
    let listener = Spawn::new("python3")
        .args(["-c", ECHO_SERVER, server_addr])
        .netns(server.netns())
        .spawn();
    let port = listener
        .read_line(TIMEOUT)
        .unwrap_or_else(|| panic!("echo server did not start: {}", listener.stderr()));
    let mut caller = Spawn::new("python3")
        .args(["-c", ECHO_CLIENT, server_addr, &port])
        .netns(client.netns())
        .spawn();
    assert_eq!(
        caller.read_line(TIMEOUT).as_deref(),
        Some("echo hello"),
        "client stderr: {}",
        caller.stderr()
    );
    assert!(
        caller
            .wait_timeout(TIMEOUT)
            .is_some_and(|status| status.success()),
        "client stderr: {}",
        caller.stderr()
    );
    assert_eq!(
        listener.read_line(TIMEOUT).as_deref(),
        Some(client_addr),
        "server stderr: {}",
        listener.stderr()
    );
}

/// Waits until `pid` has `exec`ed `program`, proving the spawned pid is the workload's own.
fn assert_becomes_program(process: &Spawned, program: &str) {
    let comm = format!("/proc/{}/comm", process.pid());
    wait_for(
        || fs::read_to_string(&comm).is_ok_and(|name| name.trim() == program),
        &format!("{comm} to read {program}"),
    );
}

fn net_namespace_of(pid: u32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/net")).expect("the workload is alive")
}

/// The names `ip netns list` shows.
fn netns_names() -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(output.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

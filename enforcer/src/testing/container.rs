//! Containers run by a real OCI runtime (`runc`) on pod networks wired the way the CNI
//! `bridge` and `loopback` plugins wire them.
//!
//! Follows the CNI bridge plugin: one Linux bridge per node holding the gateway address of the
//! node's pod subnet (`10.88.N.1/24`, `fd88:N::1/64`), IP forwarding on in the node, and per
//! pod a network namespace with `lo` up, a veth whose inside end is `eth0` with the pod's
//! address (`10.88.N.K`, `fd88:N::K`) and default routes via the gateway, and whose other end
//! is a port of the bridge. Follows a container runtime in what it hands `runc`: an OCI bundle
//! that joins the pod's namespace by `path` (`linux.namespaces`), with a `cgroupsPath` shaped
//! as docker, podman or the kubelet would shape it ([`CgroupLayout`]). What it changes:
//! - everything lives in namespaces and cgroups the test made: the bridge in a node namespace
//!   ([`Netns`]), the containers' cgroups below a [`ScratchCgroup`] (runc's cgroupfs driver,
//!   no systemd);
//! - the pod's veth end is created as `eth0` right inside the pod's namespace (the plugin
//!   creates it in the host namespace, then moves and renames it), so it never appears in a
//!   namespace the harness did not make;
//! - there is no image: the rootfs is an empty directory with the host's `/usr`, `/lib`,
//!   `/lib64`, `/bin`, `/sbin` and `/etc` bind-mounted read-only (those that are symlinks on
//!   the host, as on merged-`/usr` Debian, become the same symlinks), so the host's `python3`,
//!   `curl` and `sh` run inside; over those go the container's own `/etc/hosts`,
//!   `/etc/hostname` and `/etc/resolv.conf`, as a runtime writes them;
//! - runc keeps its state in a directory of the container's own (`runc --root`), so tests
//!   never see, nor collide with, containers of a system runc.
//!
//! What runc 1.1.5 (Debian 12) does that the guards account for:
//! - it joins the container's cgroup in every v1 hierarchy and in the unified one (`0::`), and
//!   `runc delete` removes the container's own directory in each but leaves the parents it
//!   created. A [`Container`] removes exactly the directories that did not exist before it was
//!   started, deepest first; containers that share a parent directory (the containers of a
//!   pod, the pods of a quality-of-service class) share its removal, which the last one does;
//! - on a pure cgroup v2 host it enables every available controller in `cgroup.subtree_control`
//!   of each ancestor of the container's cgroup, so the parent cgroup handed to
//!   [`Container::builder`] can hold no process of its own afterwards (put other processes in
//!   a sibling child cgroup); there it also attaches its device filter, a `BPF_CGROUP_DEVICE`
//!   program, to the container's cgroup (on the hybrid layout the v1 `devices` controller does
//!   that job).
//!
//! ```no_run
//! use enforcer::testing::{CgroupLayout, Container, Netns, PodNetwork, ScratchCgroup};
//!
//! let node = Netns::new("node");
//! let network = PodNetwork::new(&node);
//! let pod = network.attach("web");
//! let scope = ScratchCgroup::new("scope");
//! let web = Container::builder(&pod, &scope)
//!     .layout(CgroupLayout::Kubernetes)
//!     .args(["python3", "-m", "http.server", "8080"])
//!     .start();
//! web.wait_for_listener(8080);
//! node.run(&["curl", "-sf", &format!("http://{}:8080/", web.addr4())]);
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::cgroup::remove_within;
use super::{Netns, Node, ScratchCgroup, Spawn, Spawned, next_serial, run_checked, unique_name};
use crate::attest::parse_cgroup_v2;
use crate::kernel::cgroup2_mount;
use crate::report::report;

/// How long starting a container, an exec'd process or a listener, or stopping a container,
/// may take before the harness gives up: runc and python take seconds under qemu's TCG.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The host directories bind-mounted read-only into every container (or recreated as the
/// symlinks they are on the host); those the host lacks are left out.
const HOST_DIRS: [&str; 6] = ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"];
/// `PATH` inside a container, as `runc spec` and docker set it.
const CONTAINER_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The capabilities docker and containerd give a container's root user by default.
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
/// Paths `runc spec` masks in a container.
const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];
/// Paths `runc spec` makes read-only in a container.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A node's pod network: a Linux bridge `enf<pid>br<N>` in the node's namespace, holding the
/// gateway addresses `10.88.N.1/24` and `fd88:N::1/64`, with IP forwarding on in the node.
/// Removed, with the routes [`route_pod_networks`] added in the node, when the last clone and
/// the last [`Pod`] attached to it are dropped.
///
/// `N` counts pod networks in this process (1 to 255, then around again), so networks alive at
/// the same time have distinct subnets and can be routed to each other.
#[derive(Debug, Clone)]
#[must_use = "the bridge is deleted as soon as the guard is dropped"]
pub struct PodNetwork {
    bridge: Arc<Bridge>,
}

impl PodNetwork {
    /// Creates the bridge in `node`, addresses it, and turns on IPv4 and IPv6 forwarding there
    /// (left on until the namespace is deleted), as the CNI bridge plugin does.
    pub fn new(node: &Netns) -> Self {
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);
        let subnet = match NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) {
            0 => NEXT_SUBNET.fetch_add(1, Ordering::Relaxed),
            subnet => subnet,
        };
        let bridge = Arc::new(Bridge {
            node: node.clone(),
            name: bridge_name(std::process::id(), subnet),
            subnet,
            next_host: AtomicU8::new(2),
            routes: Mutex::new(Vec::new()),
        });
        let name = &bridge.name;
        ip(
            node,
            &[
                format!("link add {name} type bridge"),
                format!("addr add {}/24 dev {name}", bridge.addr4(1)),
                format!("addr add {}/64 dev {name} nodad", bridge.addr6(1)),
                format!("link set {name} up"),
            ],
        );
        node.run(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        Self { bridge }
    }

    /// The node namespace the bridge lives in.
    pub fn node(&self) -> &Netns {
        &self.bridge.node
    }

    /// The bridge's interface name in [`node`](Self::node).
    #[must_use]
    pub fn bridge(&self) -> &str {
        &self.bridge.name
    }

    /// The pods' IPv4 subnet, `10.88.N.0/24`.
    #[must_use]
    pub fn subnet4(&self) -> String {
        format!("{}/24", self.bridge.addr4(0))
    }

    /// The pods' IPv6 subnet, `fd88:N::/64`.
    #[must_use]
    pub fn subnet6(&self) -> String {
        format!("{}/64", self.bridge.addr6(0))
    }

    /// The bridge's IPv4 address, the pods' default gateway: `10.88.N.1`.
    #[must_use]
    pub fn gateway4(&self) -> Ipv4Addr {
        self.bridge.addr4(1)
    }

    /// The bridge's IPv6 address, the pods' default gateway: `fd88:N::1`.
    #[must_use]
    pub fn gateway6(&self) -> Ipv6Addr {
        self.bridge.addr6(1)
    }

    /// Creates a pod on this network: a namespace `enf-<pid>-<n>-<hint>` with the next free
    /// addresses `10.88.N.K/24` and `fd88:N::K/64` (K from 2), wired as the CNI bridge and
    /// loopback plugins wire it.
    pub fn attach(&self, hint: &str) -> Pod {
        let host = self.bridge.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(
            (2..255).contains(&host),
            "pod network {} has no free address left",
            self.subnet4()
        );
        let netns = Netns::new(hint);
        let host_veth = pod_veth_name();
        run_checked(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &host_veth,
            "netns",
            self.node().name(),
        ]));
        // From here on, dropping the pod deletes the veth and the namespace.
        let pod = Pod {
            inner: Arc::new(PodInner {
                netns,
                uid: random_pod_uid(),
                addr4: self.bridge.addr4(host),
                addr6: self.bridge.addr6(host),
                host_veth,
                network: self.clone(),
            }),
        };
        ip(
            self.node(),
            &[format!(
                "link set {} master {} up",
                pod.host_veth(),
                self.bridge()
            )],
        );
        ip(
            pod.netns(),
            &[
                format!("addr add {}/24 dev eth0", pod.addr4()),
                format!("addr add {}/64 dev eth0 nodad", pod.addr6()),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", self.gateway4()),
                format!("route add ::/0 via {}", self.gateway6()),
            ],
        );
        pod
    }

    /// Adds routes in this network's node to `other`'s pod subnets via `via`, the address of
    /// `other`'s node on a link to this node (see [`connect_nodes`](super::connect_nodes)).
    /// They are deleted with this network.
    pub fn route_to(&self, other: &PodNetwork, via: &Node) {
        assert_eq!(
            via.netns().name(),
            other.node().name(),
            "the route to {} must go via an address of its node",
            other.subnet4()
        );
        self.bridge
            .add_route(&other.subnet4(), &via.addr4().to_string());
        self.bridge
            .add_route(&other.subnet6(), &via.addr6().to_string());
    }
}

/// Routes `a`'s and `b`'s pod subnets to each other over `link`, the two ends of a
/// [`connect_nodes`](super::connect_nodes) link between `a`'s node and `b`'s node (in that
/// order): what a cluster's network gives every pair of nodes.
pub fn route_pod_networks(a: &PodNetwork, b: &PodNetwork, link: &(Node, Node)) {
    let (a_end, b_end) = link;
    assert_eq!(
        a_end.netns().name(),
        a.node().name(),
        "the first end of the link must be in the first network's node"
    );
    a.route_to(b, b_end);
    b.route_to(a, a_end);
}

/// The bridge of a [`PodNetwork`]; deleting it is the whole point of the type.
#[derive(Debug)]
struct Bridge {
    node: Netns,
    name: String,
    subnet: u8,
    /// The host part of the next pod's addresses.
    next_host: AtomicU8,
    /// The routes added in the node (`<destination> via <gateway>`), for deleting them.
    routes: Mutex<Vec<String>>,
}

impl Bridge {
    fn addr4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, self.subnet, host)
    }

    fn addr6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd88, self.subnet.into(), 0, 0, 0, 0, 0, host.into())
    }

    fn add_route(&self, destination: &str, via: &str) {
        let route = format!("{destination} via {via}");
        ip(&self.node, &[format!("route add {route}")]);
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(route);
    }
}

impl Drop for Bridge {
    /// Deletes the routes and the bridge, warning instead of panicking, which could abort an
    /// unwinding test.
    fn drop(&mut self) {
        let routes = self
            .routes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let mut commands: Vec<String> = routes
            .iter()
            .map(|route| format!("route del {route}"))
            .collect();
        commands.push(format!("link del {}", self.name));
        ip_or_warn(&self.node, &commands);
    }
}

/// A pod sandbox: its own network namespace attached to a [`PodNetwork`], and a pod uid.
/// Containers started in it share both, as the containers of a Kubernetes pod do. The veth and
/// the namespace are deleted when the last clone, and the last [`Container`] in it, are gone.
#[derive(Debug, Clone)]
#[must_use = "the pod's namespace is deleted as soon as the guard is dropped"]
pub struct Pod {
    inner: Arc<PodInner>,
}

impl Pod {
    /// The pod's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.inner.netns
    }

    /// The pod uid (a random UUID), which the Kubernetes [`CgroupLayout`]s put in the path.
    #[must_use]
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    /// The pod's IPv4 address on `eth0`, `10.88.N.K`.
    #[must_use]
    pub fn addr4(&self) -> Ipv4Addr {
        self.inner.addr4
    }

    /// The pod's IPv6 address on `eth0`, `fd88:N::K`.
    #[must_use]
    pub fn addr6(&self) -> Ipv6Addr {
        self.inner.addr6
    }

    /// The name of the veth end on the node's bridge, in the node's namespace.
    #[must_use]
    pub fn host_veth(&self) -> &str {
        &self.inner.host_veth
    }

    /// The network the pod is attached to.
    pub fn network(&self) -> &PodNetwork {
        &self.inner.network
    }
}

/// What a [`Pod`] holds; dropping it deletes the veth, then the namespace.
#[derive(Debug)]
struct PodInner {
    netns: Netns,
    uid: String,
    addr4: Ipv4Addr,
    addr6: Ipv6Addr,
    host_veth: String,
    /// Keeps the bridge until the veth is gone.
    network: PodNetwork,
}

impl Drop for PodInner {
    /// Deletes the veth pair by its end on the bridge (its `eth0` end goes with it).
    fn drop(&mut self) {
        ip_or_warn(
            self.network.node(),
            &[format!("link del {}", self.host_veth)],
        );
    }
}

/// Where a container's cgroup goes below the parent cgroup, shaped as a runtime shapes it.
/// `<id>` is the container id, `<uid>` the [`Pod::uid`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CgroupLayout {
    /// docker with the systemd driver: `system.slice/docker-<id>.scope`.
    #[default]
    Docker,
    /// docker with the cgroupfs driver: `docker/<id>`.
    DockerCgroupfs,
    /// podman with the systemd driver: `machine.slice/libpod-<id>.scope`.
    Podman,
    /// The kubelet with the systemd driver and containerd, a `BestEffort` pod (the uid's `-`
    /// written as `_`): `kubepods.slice/kubepods-besteffort.slice/`
    /// `kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
    Kubernetes,
    /// The kubelet with the cgroupfs driver, a `BestEffort` pod:
    /// `kubepods/besteffort/pod<uid>/<id>`.
    KubernetesCgroupfs,
}

impl CgroupLayout {
    /// The path components below the parent cgroup for container `id` in pod `pod_uid`.
    fn components(self, id: &str, pod_uid: &str) -> Vec<String> {
        match self {
            Self::Docker => vec!["system.slice".into(), format!("docker-{id}.scope")],
            Self::DockerCgroupfs => vec!["docker".into(), id.into()],
            Self::Podman => vec!["machine.slice".into(), format!("libpod-{id}.scope")],
            Self::Kubernetes => vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_")),
                format!("cri-containerd-{id}.scope"),
            ],
            Self::KubernetesCgroupfs => vec![
                "kubepods".into(),
                "besteffort".into(),
                format!("pod{pod_uid}"),
                id.into(),
            ],
        }
    }
}

/// Builder for a [`Container`]: what it runs, as whom, and where its cgroup goes.
#[derive(Debug)]
#[must_use = "a ContainerBuilder does nothing until .start() is called"]
pub struct ContainerBuilder {
    pod: Pod,
    parent: ScratchCgroup,
    layout: CgroupLayout,
    args: Vec<String>,
    env: Vec<String>,
    uid: u32,
    gid: u32,
}

impl ContainerBuilder {
    /// Adds one argument to the command line (the first is the program, looked up in `PATH`
    /// inside the container). The default command is `sleep infinity`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments to the command line.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable; `PATH` is always set.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Runs the container's processes as `uid` and `gid` instead of root. A user other than
    /// root has no capabilities in the container, as with docker.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Shapes the cgroup path as `layout` does (default [`CgroupLayout::Docker`]).
    pub fn layout(mut self, layout: CgroupLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Writes the bundle, runs `runc run --detach`, and returns once the container's init
    /// process has become the command and is in its cgroup (checked in `/proc/<pid>/cgroup`).
    ///
    /// Panics, with runc's and the container's stderr, if runc is missing or the container
    /// cannot start; whatever was created is removed.
    pub fn start(mut self) -> Container {
        if self.args.is_empty() {
            self.args = vec!["sleep".into(), "infinity".into()];
        }
        let id = random_container_id();
        let components = self.layout.components(&id, self.pod.uid());
        let mount = cgroup2_mount().unwrap_or_else(|error| panic!("{}", report(&error)));
        let relative = format!("{}/{}", self.parent.policy_path(), components.join("/"));
        let bundle = tempfile::Builder::new()
            .prefix(&format!("{}-", unique_name("bundle")))
            .tempdir()
            .unwrap_or_else(|error| panic!("failed to create a container bundle: {error}"));
        let runc_root = bundle.path().join("runc");
        fs::create_dir(&runc_root)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", runc_root.display()));
        let symlinks = make_rootfs(bundle.path());
        let etc_files = write_etc_files(bundle.path(), hostname(&id), &self.pod);
        let config = self.config(&id, &relative, &symlinks, &etc_files);
        let config_path = bundle.path().join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        fs::write(&config_path, text)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", config_path.display()));
        let dirs = cgroup_hierarchies()
            .iter()
            .filter_map(|hierarchy| claim_cgroup_dirs(hierarchy, &relative))
            .collect();
        let mut container = Container {
            id,
            args: self.args,
            runc_root,
            pid: 0,
            start_time: 0,
            cgroup: mount.join(relative.trim_start_matches('/')),
            relative,
            bundle,
            _dirs: dirs,
            _parent: self.parent,
            pod: self.pod,
        };
        container.run_detached();
        container
    }

    /// The OCI runtime configuration (`config.json`) of container `id`, whose cgroup is
    /// `cgroups_path`, whose rootfs holds `symlinks` (so binds are made only of the rest of
    /// [`HOST_DIRS`]), and which sees `etc_files` (destination, source) over the host's.
    fn config(
        &self,
        id: &str,
        cgroups_path: &str,
        symlinks: &[&str],
        etc_files: &[(&str, PathBuf)],
    ) -> Value {
        let mut env = vec![CONTAINER_PATH.to_owned()];
        env.extend(self.env.iter().cloned());
        let capabilities: &[&str] = if self.uid == 0 {
            &DEFAULT_CAPABILITIES
        } else {
            &[]
        };
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                               "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777"]}),
        ];
        for dir in HOST_DIRS {
            if !symlinks.contains(&dir) && Path::new(dir).is_dir() {
                mounts.push(json!({"destination": dir, "type": "bind", "source": dir,
                                   "options": ["rbind", "ro", "nosuid", "nodev"]}));
            }
        }
        for (destination, source) in etc_files {
            mounts.push(
                json!({"destination": destination, "type": "bind", "source": source,
                               "options": ["rbind", "ro", "nosuid", "nodev"]}),
            );
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": self.uid, "gid": self.gid},
                "args": self.args,
                "env": env,
                "cwd": "/",
                "capabilities": {
                    "bounding": DEFAULT_CAPABILITIES,
                    "effective": capabilities,
                    "permitted": capabilities,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            },
            "root": {"path": "rootfs", "readonly": false},
            "hostname": hostname(id),
            "mounts": mounts,
            "linux": {
                "cgroupsPath": cgroups_path,
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                    {"type": "network", "path": self.pod.netns().path()},
                ],
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "maskedPaths": MASKED_PATHS,
                "readonlyPaths": READONLY_PATHS,
            },
        })
    }
}

/// A container run by `runc` in a [`Pod`], its cgroup below a [`ScratchCgroup`]. Dropping it
/// kills it (`runc delete --force`), removes the cgroup directories runc leaves, and its
/// bundle and runc state; it keeps its pod and parent cgroup alive until then.
///
/// Its init process's stdout and stderr go to files in the bundle ([`stdout`](Self::stdout),
/// [`stderr`](Self::stderr)), and so do runc's own messages when it starts the container.
#[derive(Debug)]
#[must_use = "the container is killed as soon as the guard is dropped"]
pub struct Container {
    id: String,
    args: Vec<String>,
    runc_root: PathBuf,
    pid: u32,
    /// The init process's start time (clock ticks after boot): with the pid, its unique name.
    start_time: u64,
    cgroup: PathBuf,
    relative: String,
    // The guards below are dropped in this order, after `drop` has deleted the container.
    bundle: TempDir,
    /// The container's cgroup directory in each hierarchy, if this container created it.
    _dirs: Vec<Arc<CreatedDir>>,
    _parent: ScratchCgroup,
    pod: Pod,
}

impl Container {
    /// Starts building a container in `pod` whose cgroup goes below `parent`.
    pub fn builder(pod: &Pod, parent: &ScratchCgroup) -> ContainerBuilder {
        ContainerBuilder {
            pod: pod.clone(),
            parent: parent.clone(),
            layout: CgroupLayout::default(),
            args: Vec::new(),
            env: Vec::new(),
            uid: 0,
            gid: 0,
        }
    }

    /// The container id: 64 lowercase hex digits, as docker and containerd make them; runc
    /// knows the container by it too.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host pid of the container's init process (from `runc state`).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The init process's start time in clock ticks after boot (field 22 of `/proc/<pid>/stat`):
    /// with [`pid`](Self::pid), a name of the process that is never reused.
    #[must_use]
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The pod the container runs in.
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// The network namespace file the container joined, `/run/netns/<pod's netns>`.
    #[must_use]
    pub fn netns(&self) -> PathBuf {
        self.pod.netns().path()
    }

    /// The pod's IPv4 address.
    #[must_use]
    pub fn addr4(&self) -> Ipv4Addr {
        self.pod.addr4()
    }

    /// The pod's IPv6 address.
    #[must_use]
    pub fn addr6(&self) -> Ipv6Addr {
        self.pod.addr6()
    }

    /// The container's cgroup v2 directory, where runc placed its init process.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The container's cgroup path as `/proc/<pid>/cgroup` and policies write it: relative to
    /// the cgroup2 mount, with a leading `/`. This is the `cgroupsPath` given to runc.
    #[must_use]
    pub fn cgroup_path(&self) -> &str {
        &self.relative
    }

    /// The container's cgroup directory in every cgroup hierarchy ([`cgroup_hierarchies`]),
    /// v2 first; runc creates them all.
    #[must_use]
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_hierarchies()
            .iter()
            .map(|hierarchy| hierarchy.join(self.relative.trim_start_matches('/')))
            .collect()
    }

    /// The OCI bundle directory: `config.json`, `rootfs/`, the `stdout` and `stderr` files, and
    /// runc's state directory.
    #[must_use]
    pub fn bundle(&self) -> &Path {
        self.bundle.path()
    }

    /// The directory runc keeps this container's state in (`runc --root`).
    #[must_use]
    pub fn runc_root(&self) -> &Path {
        &self.runc_root
    }

    /// What the init process (and runc, while starting it) printed on stdout so far.
    #[must_use]
    pub fn stdout(&self) -> String {
        self.log("stdout")
    }

    /// What the init process (and runc, while starting it) printed on stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.log("stderr")
    }

    /// The container's status as `runc state` reports it: `running`, `stopped`, …
    #[must_use]
    pub fn status(&self) -> String {
        let state = self.state();
        state["status"]
            .as_str()
            .unwrap_or_else(|| panic!("runc state of {} has no status: {state}", self.id))
            .to_owned()
    }

    /// Runs `args` in the container (`runc exec`) to completion and returns its output.
    #[must_use]
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut command = self.runc();
        command
            .arg("exec")
            .arg(&self.id)
            .args(args)
            .stdin(Stdio::null());
        command
            .output()
            .unwrap_or_else(|error| panic!("failed to run {command:?}: {}", missing_runc(&error)))
    }

    /// Runs `args` in the container to completion and returns its stdout, panicking with its
    /// stderr if it fails.
    #[must_use]
    pub fn exec_stdout(&self, args: &[&str]) -> String {
        let output = self.exec(args);
        assert!(
            output.status.success(),
            "{args:?} in container {} failed ({}): {}",
            self.id,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `args` in the container (`runc exec`) and returns once it runs, for a second
    /// process that lives alongside init. Its stdout and stderr are read as a [`Spawned`]'s.
    pub fn spawn_exec(&self, args: &[&str]) -> ContainerProcess {
        let pid_file = self.bundle().join(format!("exec-{}.pid", next_serial()));
        let runc = Spawn::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&self.id)
            .args(args)
            .spawn();
        let mut process = ContainerProcess {
            pidfd: None,
            pid: 0,
            description: format!("{args:?} in container {}", self.id),
            runc,
        };
        let pid = process.wait_for_pid_file(&pid_file);
        let pidfd = Pid::from_raw(pid.try_into().unwrap_or(0))
            .and_then(|raw| pidfd_open(raw, PidfdFlags::empty()).ok());
        // A pid that was reused at once would not be in the container's cgroup.
        if pidfd.is_none() || cgroup_v2_path(pid).as_deref() != Some(self.relative.as_str()) {
            process.fail(&format!("is not process {pid} in cgroup {}", self.relative));
        }
        process.pid = pid;
        process.pidfd = pidfd;
        process
    }

    /// Waits until a TCP socket in the container's network namespace listens on `port`,
    /// panicking with the container's output if none does in time or the container stops.
    pub fn wait_for_listener(&self, port: u16) {
        let tables = ["tcp", "tcp6"].map(|table| format!("/proc/{}/net/{table}", self.pid));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let listening = tables.iter().any(|table| {
                fs::read_to_string(table).is_ok_and(|text| {
                    crate::daemon::listeners(&text)
                        .iter()
                        .any(|(addr, _)| addr.port() == port)
                })
            });
            if listening {
                return;
            }
            if Instant::now() >= deadline || !self.init_alive() {
                self.fail(&format!("does not listen on port {port}"));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the container's init with SIGKILL (`runc kill`), which ends every process in the
    /// container, and waits until runc reports it stopped.
    pub fn kill(&self) {
        run_checked(self.runc().args(["kill", &self.id, "KILL"]));
        let deadline = Instant::now() + TIMEOUT;
        while self.status() != "stopped" {
            assert!(
                Instant::now() < deadline,
                "container {} did not stop within {TIMEOUT:?} of SIGKILL",
                self.id
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `runc --root <this container's state directory>`.
    fn runc(&self) -> Command {
        let mut command = Command::new("runc");
        command.arg("--root").arg(&self.runc_root);
        command
    }

    /// `runc state` as JSON.
    fn state(&self) -> Value {
        let text = run_checked(self.runc().args(["state", &self.id]));
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("runc state printed no JSON ({error}): {text}"))
    }

    /// Runs the container detached and checks it is where it should be.
    fn run_detached(&mut self) {
        let stdout = self.create_log("stdout");
        let stderr = self.create_log("stderr");
        let pid_file = self.bundle().join("init.pid");
        let mut command = self.runc();
        command
            .args(["run", "--detach", "--pid-file"])
            .arg(&pid_file)
            .arg("--bundle")
            .arg(self.bundle())
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let status = command
            .status()
            .unwrap_or_else(|error| panic!("failed to run {command:?}: {}", missing_runc(&error)));
        if !status.success() {
            self.fail(&format!("did not start ({status})"));
        }
        let pid = fs::read_to_string(&pid_file).unwrap_or_default();
        self.pid = pid.trim().parse().unwrap_or(0);
        self.start_time = start_time(self.pid).unwrap_or_else(|| {
            self.fail(&format!(
                "has no init process ({} says {pid:?})",
                pid_file.display()
            ))
        });
        self.wait_for_command();
        let placed = cgroup_v2_path(self.pid);
        if placed.as_deref() != Some(self.relative.as_str()) {
            self.fail(&format!(
                "runs in cgroup {placed:?}, not in {}",
                self.relative
            ));
        }
    }

    /// Waits until init has `exec`ed the command: until then it is `runc init`.
    fn wait_for_command(&self) {
        let expected: Vec<u8> = self
            .args
            .iter()
            .flat_map(|arg| [arg.as_bytes(), b"\0"].concat())
            .collect();
        let path = format!("/proc/{}/cmdline", self.pid);
        let deadline = Instant::now() + TIMEOUT;
        while fs::read(&path).ok().as_deref() != Some(expected.as_slice()) {
            if Instant::now() >= deadline || !self.init_alive() {
                self.fail(&format!("did not become {:?}", self.args));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether init is still the process started and not a zombie.
    fn init_alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|stat| {
                let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
                let alive = !matches!(*fields.first()?, "Z" | "X");
                Some(alive && fields.get(19)?.parse::<u64>().ok()? == self.start_time)
            })
            .unwrap_or(false)
    }

    fn create_log(&self, name: &str) -> File {
        let path = self.bundle().join(name);
        File::create(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()))
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.bundle().join(name)).unwrap_or_default()
    }

    /// Panics with `problem` and what the container printed.
    fn fail(&self, problem: &str) -> ! {
        panic!(
            "container {} ({:?} in pod {}) {problem}; stdout:\n{}\nstderr:\n{}",
            self.id,
            self.args,
            self.pod.netns().name(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Container {
    /// Kills and deletes the container, warning instead of panicking, which could abort an
    /// unwinding test. `runc delete --force` sends init SIGKILL and waits for it to exit, as
    /// `runc kill` and a wait would, then deletes (a runc call costs seconds under qemu's TCG;
    /// a container that never started is no error). The fields then remove the cgroup
    /// directories, the bundle and runc's state.
    fn drop(&mut self) {
        match self.runc().args(["delete", "--force", &self.id]).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: `runc delete --force {}` failed ({}): {}",
                self.id,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => eprintln!(
                "warning: failed to run `runc delete --force {}`: {error}",
                self.id
            ),
        }
    }
}

/// A second process in a container, started by [`Container::spawn_exec`]; dropping it kills
/// it with SIGKILL (through a pidfd, so never another process) and reaps its `runc exec`.
#[derive(Debug)]
#[must_use = "the process is killed as soon as the guard is dropped"]
pub struct ContainerProcess {
    pidfd: Option<OwnedFd>,
    pid: u32,
    description: String,
    /// `runc exec`, which waits for the process and passes its stdio through.
    runc: Spawned,
}

impl ContainerProcess {
    /// The process's host pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next line the process prints on stdout; `None` if none comes within `timeout`.
    #[must_use]
    pub fn read_line(&self, timeout: Duration) -> Option<String> {
        self.runc.read_line(timeout)
    }

    /// What the process (and `runc exec`) printed on stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.runc.stderr()
    }

    /// Waits up to `timeout` for the process to exit; `runc exec` exits as it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.runc.wait_timeout(timeout)
    }

    /// Waits for runc to write the process's pid to `path`.
    fn wait_for_pid_file(&mut self, path: &Path) -> u32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(pid) = fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse().ok())
            {
                return pid;
            }
            if Instant::now() >= deadline || self.runc.wait_timeout(Duration::ZERO).is_some() {
                self.fail("did not start");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn fail(&mut self, problem: &str) -> ! {
        let status = self.runc.wait_timeout(Duration::from_secs(1));
        panic!(
            "{} {problem} (runc exec: {status:?}); stderr:\n{}",
            self.description,
            self.stderr()
        )
    }
}

impl Drop for ContainerProcess {
    /// Kills the process; the [`Spawned`] `runc exec` is killed and reaped after.
    fn drop(&mut self) {
        if let Some(pidfd) = &self.pidfd {
            match pidfd_send_signal(pidfd, Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(error) => eprintln!("warning: failed to kill {}: {error}", self.description),
            }
            // runc exec exits once it has reaped the process.
            let _ = self.runc.wait_timeout(TIMEOUT);
        }
    }
}

/// The mount point of every cgroup hierarchy of this system, from `/proc/self/mountinfo`: the
/// unified (v2) one first, then the v1 ones, each once.
#[must_use]
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|error| panic!("failed to read /proc/self/mountinfo: {error}"));
    let v2 = cgroup2_mount().unwrap_or_else(|error| panic!("{}", report(&error)));
    let mut hierarchies = vec![v2];
    for mount in cgroup_v1_mounts(&mountinfo) {
        if !hierarchies.contains(&mount) {
            hierarchies.push(mount);
        }
    }
    hierarchies
}

/// The mount points of the cgroup v1 hierarchies in the text of `/proc/self/mountinfo`, in
/// order. Mounts of a part of a hierarchy (root other than `/`) are left out: runc places
/// cgroups relative to a hierarchy's root.
fn cgroup_v1_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, filesystem) = line.split_once(" - ")?;
            let mut fields = mount.split(' ');
            let root = fields.nth(3)?;
            let point = fields.next()?;
            (filesystem.split(' ').next()? == "cgroup" && root == "/").then(|| PathBuf::from(point))
        })
        .collect()
}

/// A cgroup directory created by runc for the harness's containers; dropping the last
/// reference removes it, then (through `_parent`) the directories above it that the harness
/// also caused.
#[derive(Debug)]
struct CreatedDir {
    path: PathBuf,
    _parent: Option<Arc<CreatedDir>>,
}

impl Drop for CreatedDir {
    /// Removes the directory, retrying while it is busy (runc may be finishing), warning
    /// instead of panicking, which could abort an unwinding test.
    fn drop(&mut self) {
        if let Err(error) = remove_within(&self.path, TIMEOUT) {
            eprintln!(
                "warning: failed to remove cgroup {}: {error}",
                self.path.display()
            );
        }
    }
}

/// Claims, in the hierarchy mounted at `hierarchy`, the directories of `relative` (a cgroup
/// path with a leading `/`) that runc is about to create, before it creates them: those that
/// do not exist yet, or that another live container claimed. Returns the deepest, which holds
/// the ones above it; `None` if every directory already exists and is no container's.
fn claim_cgroup_dirs(hierarchy: &Path, relative: &str) -> Option<Arc<CreatedDir>> {
    static CLAIMED: LazyLock<Mutex<HashMap<PathBuf, Weak<CreatedDir>>>> =
        LazyLock::new(Mutex::default);
    let mut claimed = CLAIMED.lock().unwrap_or_else(PoisonError::into_inner);
    claimed.retain(|_, dir| dir.strong_count() > 0);
    let mut path = hierarchy.to_owned();
    let mut deepest: Option<Arc<CreatedDir>> = None;
    for component in relative
        .split('/')
        .filter(|component| !component.is_empty())
    {
        path.push(component);
        if let Some(dir) = claimed.get(&path).and_then(Weak::upgrade) {
            deepest = Some(dir);
        } else if path.exists() {
            deepest = None;
        } else {
            let dir = Arc::new(CreatedDir {
                path: path.clone(),
                _parent: deepest.take(),
            });
            claimed.insert(path.clone(), Arc::downgrade(&dir));
            deepest = Some(dir);
        }
    }
    deepest
}

/// Creates `<bundle>/rootfs`, world-searchable so any user the container runs as can use it,
/// holding the [`HOST_DIRS`] that are symlinks on the host as the same symlinks. Returns those.
fn make_rootfs(bundle: &Path) -> Vec<&'static str> {
    let rootfs = bundle.join("rootfs");
    fs::create_dir(&rootfs)
        .and_then(|()| fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755)))
        .unwrap_or_else(|error| panic!("failed to create {}: {error}", rootfs.display()));
    let mut symlinks = Vec::new();
    for dir in HOST_DIRS {
        if let Ok(target) = fs::read_link(dir) {
            let link = rootfs.join(dir.trim_start_matches('/'));
            symlink(&target, &link).unwrap_or_else(|error| {
                panic!("failed to create symlink {}: {error}", link.display())
            });
            symlinks.push(dir);
        }
    }
    symlinks
}

/// A container's host name: the first 12 digits of its id, as docker names it.
fn hostname(id: &str) -> &str {
    &id[..12]
}

/// Writes the container's own `/etc/hosts` (naming `hostname` with the pod's addresses, as
/// docker and the kubelet write it), `/etc/hostname` and `/etc/resolv.conf` into the bundle,
/// and returns (destination, source) for each file the host's `/etc` has, so the bind mount
/// has a mount point in the read-only `/etc`.
///
/// The pod networks have no DNS server, so `resolv.conf` names the pod's own loopback, where
/// nothing answers: a lookup fails at once instead of waiting for the host's resolver, which
/// the pod cannot reach. Python's `http.server`, which looks up its own name, needs both.
fn write_etc_files(bundle: &Path, hostname: &str, pod: &Pod) -> Vec<(&'static str, PathBuf)> {
    let files = [
        (
            "/etc/hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 {}\t{hostname}\n{}\t{hostname}\n",
                pod.addr4(),
                pod.addr6()
            ),
        ),
        ("/etc/hostname", format!("{hostname}\n")),
        (
            "/etc/resolv.conf",
            "# No DNS server on the test pod network: lookups fail at once.\n\
             nameserver 127.0.0.1\n"
                .to_owned(),
        ),
    ];
    files
        .into_iter()
        .filter(|(destination, _)| Path::new(destination).exists())
        .map(|(destination, text)| {
            let source = bundle.join(format!("etc-{}", &destination["/etc/".len()..]));
            fs::write(&source, text)
                .unwrap_or_else(|error| panic!("failed to write {}: {error}", source.display()));
            (destination, source)
        })
        .collect()
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`).
fn cgroup_v2_path(pid: u32) -> Option<String> {
    parse_cgroup_v2(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()
}

/// A random container id: 64 lowercase hex digits.
fn random_container_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// A random pod uid: a version 4 UUID, as the API server makes them.
fn random_pod_uid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// The bridge of pod network `subnet` of process `pid`: `enf<pid>br<subnet>`, at most 15 bytes
/// (pids are below 2^22, seven digits).
fn bridge_name(pid: u32, subnet: u8) -> String {
    let name = format!("enf{pid}br{subnet}");
    assert!(
        name.len() <= 15,
        "bridge name {name} is longer than 15 bytes"
    );
    name
}

/// A name for a pod's veth end on the bridge, `ev<pid % 10000><n>p` (see `connect_nodes`).
fn pod_veth_name() -> String {
    let name = format!("ev{}{}p", std::process::id() % 10_000, next_serial());
    assert!(name.len() <= 15, "veth name {name} is longer than 15 bytes");
    name
}

/// Runs the `ip` `commands` (without the leading `ip`) in `netns`, panicking with the
/// failing command and its error if one fails.
fn ip(netns: &Netns, commands: &[String]) {
    ip_batch(netns, commands, false).unwrap_or_else(|error| panic!("{error}"));
}

/// Runs every one of the `ip` `commands` in `netns` even if some fail, warning about those:
/// for `Drop`.
fn ip_or_warn(netns: &Netns, commands: &[String]) {
    if let Err(error) = ip_batch(netns, commands, true) {
        eprintln!("warning: {error}");
    }
}

/// Runs `commands` through one `ip -n <netns> -batch -`: one process for all of them, which
/// counts under qemu's TCG, where each process start takes a good part of a second. With
/// `force`, `ip` goes on after a failing command.
fn ip_batch(netns: &Netns, commands: &[String], force: bool) -> Result<(), String> {
    let mut command = Command::new("ip");
    command.args(["-n", netns.name()]);
    if force {
        command.arg("-force");
    }
    command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let describe = || format!("`ip -n {} -batch -` of {commands:?}", netns.name());
    let mut child = command
        .spawn()
        .map_err(|error| format!("failed to run {}: {error}", describe()))?;
    let script = commands.join("\n") + "\n";
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child
        .wait_with_output()
        .map_err(|error| format!("failed to wait for {}: {error}", describe()))?;
    match (written, output.status.success()) {
        (Ok(()), true) => Ok(()),
        (written, _) => Err(format!(
            "{} failed ({}{}): {}",
            describe(),
            output.status,
            written
                .err()
                .map_or(String::new(), |error| format!(", stdin: {error}")),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// `error` from starting runc, with how to install runc if that is what is wrong.
fn missing_runc(error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::NotFound {
        format!(
            "{error}: runc is not installed; `cargo xtask setup` installs it (Debian package runc)"
        )
    } else {
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904b825dc642cb6eb9a060e54bf";
    const POD: &str = "0c3e2e7a-8f1a-4d0b-9b9e-1f2a3b4c5d6e";

    #[test]
    fn layouts_shape_paths_as_their_runtimes_do() {
        let path = |layout: CgroupLayout| layout.components(ID, POD).join("/");
        assert_eq!(
            path(CgroupLayout::Docker),
            format!("system.slice/docker-{ID}.scope")
        );
        assert_eq!(path(CgroupLayout::DockerCgroupfs), format!("docker/{ID}"));
        assert_eq!(
            path(CgroupLayout::Podman),
            format!("machine.slice/libpod-{ID}.scope")
        );
        assert_eq!(
            path(CgroupLayout::Kubernetes),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0c3e2e7a_8f1a_4d0b_9b9e_1f2a3b4c5d6e.slice/\
                 cri-containerd-{ID}.scope"
            )
        );
        assert_eq!(
            path(CgroupLayout::KubernetesCgroupfs),
            format!("kubepods/besteffort/pod{POD}/{ID}")
        );
    }

    #[test]
    fn ids_and_uids_have_the_runtimes_shapes() {
        let id = random_container_id();
        assert_eq!(id.len(), 64);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(id, random_container_id());
        let uid = random_pod_uid();
        let groups: Vec<&str> = uid.split('-').collect();
        assert_eq!(
            groups.iter().map(|group| group.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{uid}"
        );
        assert!(groups[2].starts_with('4'), "version 4: {uid}");
        assert!("89ab".contains(&groups[3][..1]), "RFC 4122 variant: {uid}");
    }

    #[test]
    fn interface_names_fit_in_ifnamsiz() {
        assert_eq!(bridge_name(4_194_304, 255), "enf4194304br255");
        let veth = pod_veth_name();
        assert!(veth.len() <= 15 && veth.starts_with("ev") && veth.ends_with('p'));
    }

    #[test]
    fn finds_the_v1_hierarchies_in_mountinfo() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:29 /docker /mnt/cpu rw,relatime - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup_v1_mounts(mountinfo),
            [
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/systemd")
            ]
        );
    }

    #[test]
    fn claims_only_missing_directories_and_removes_them_deepest_first_when_unused() {
        let hierarchy = tempfile::tempdir().expect("a temporary directory");
        let root = hierarchy.path();
        fs::create_dir(root.join("scope")).expect("mkdir");
        let first = claim_cgroup_dirs(root, "/scope/slice/a").expect("a and slice are missing");
        let second = claim_cgroup_dirs(root, "/scope/slice/b").expect("b is missing");
        // What runc would create.
        for leaf in ["a", "b"] {
            fs::create_dir_all(root.join("scope/slice").join(leaf)).expect("mkdir");
        }
        drop(first);
        assert!(!root.join("scope/slice/a").exists());
        assert!(root.join("scope/slice").exists(), "still used by b");
        drop(second);
        assert!(!root.join("scope/slice").exists());
        assert!(root.join("scope").exists(), "existed before: not ours");
        assert!(
            claim_cgroup_dirs(root, "/scope").is_none(),
            "nothing to claim when everything exists"
        );
    }
}

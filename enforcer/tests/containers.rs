//! Privileged tests of the container harness (`enforcer::testing::{PodNetwork, Pod,
//! Container}`): real runc containers on pod networks wired as the CNI bridge plugin wires
//! them. Run as root, one at a time, with runc installed (`cargo xtask setup`):
//! `cargo test -p enforcer --test containers -- --test-threads=1`.

#![expect(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of the package but uses only the library"
)]

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use enforcer::attest::{AttestOptions, Attestor, ProcessFacts};
use enforcer::testing::{
    CgroupLayout, Container, Netns, Pod, PodNetwork, ScratchCgroup, cgroup_hierarchies,
    connect_nodes, ns_inode, require_root, route_pod_networks, serial,
};

/// Generous bound for anything that should happen "at once" on a loaded CI machine, or in
/// the vm tier under qemu's TCG.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The port the test web servers listen on.
const PORT: u16 = 8080;
/// What `python3 -m http.server` serves for `/` (the container's root directory).
const LISTING: &str = "Directory listing for /";

/// A container in `pod` serving its root directory over HTTP on [`PORT`], on every IPv4 and
/// IPv6 address (`--bind ::` makes a dual-stack socket), listening when returned.
fn web_server(pod: &Pod, parent: &ScratchCgroup, layout: CgroupLayout) -> Container {
    let web = Container::builder(pod, parent)
        .layout(layout)
        .args(["python3", "-m", "http.server", &PORT.to_string()])
        .args(["--bind", "::"])
        .start();
    web.wait_for_listener(PORT);
    web
}

/// The URL of the web server at `host` (an IPv4 or IPv6 address).
fn url(host: impl std::fmt::Display) -> String {
    let host = host.to_string();
    if host.contains(':') {
        format!("http://[{host}]:{PORT}/")
    } else {
        format!("http://{host}:{PORT}/")
    }
}

/// The command line of a `curl` that fetches `url`, giving up after five seconds.
fn curl_args(url: &str) -> [&str; 7] {
    ["curl", "-sS", "-g", "--max-time", "5", "--", url]
}

/// Fetches `url` with curl from inside `netns`.
fn curl_in_netns(netns: &Netns, url: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .args(curl_args(url))
        .output()
        .expect("running curl in a namespace")
}

/// Fetches `url` with curl from inside `container`.
fn curl_in_container(container: &Container, url: &str) -> Output {
    container.exec(&curl_args(url))
}

/// Asserts that `output` is a successful fetch of the server's directory listing.
fn assert_served(output: &Output, what: &str) {
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && body.contains(LISTING),
        "{what}: curl {} with body {body:?} and stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Attests `container`'s init process as the daemon would.
fn attest(container: &Container) -> ProcessFacts {
    Attestor::new(AttestOptions::default())
        .attest_fresh(container.pid())
        .unwrap_or_else(|error| panic!("failed to attest {}: {error}", container.pid()))
}

/// The paths of `/proc/<pid>/cgroup`, one per hierarchy (v1 `N:controllers:path` and `0::path`).
fn cgroup_lines(pid: u32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|error| panic!("failed to read /proc/{pid}/cgroup: {error}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The start time of `pid` in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `start_time` still runs (a zombie does not).
fn runs(pid: u32, start_time: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
        fields.first().is_some_and(|state| *state != "Z")
            && fields.get(19) == Some(&start_time.to_string().as_str())
    })
}

/// The names `ip -o link` lists in `netns`.
fn links(netns: &Netns) -> String {
    let output = Command::new("ip")
        .args(["-n", netns.name(), "-o", "link", "show"])
        .output()
        .expect("running ip link");
    assert!(output.status.success(), "ip link show failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Everything the harness creates outside the test process for some pods and containers,
/// recorded while they live, to check it is all gone once they are dropped.
#[derive(Debug, Default)]
struct Footprint {
    netns: Vec<PathBuf>,
    /// Container cgroup directories and their parents up to the scratch cgroup, every hierarchy.
    cgroup_dirs: Vec<PathBuf>,
    runc_roots: Vec<PathBuf>,
    bundles: Vec<PathBuf>,
    /// (pid, start time) of each container's init.
    processes: Vec<(u32, u64)>,
}

impl Footprint {
    fn add_pod(&mut self, pod: &Pod) {
        self.netns.push(pod.netns().path());
    }

    fn add_container(&mut self, container: &Container, scope: &ScratchCgroup) {
        let scope = scope.policy_path();
        for leaf in container.cgroup_dirs() {
            let top = leaf
                .ancestors()
                .find(|dir| dir.ends_with(scope.trim_start_matches('/')))
                .unwrap_or_else(|| panic!("{} is not below {scope}", leaf.display()))
                .to_owned();
            for dir in leaf.ancestors().take_while(|dir| *dir != top) {
                self.cgroup_dirs.push(dir.to_owned());
            }
            self.cgroup_dirs.push(top);
        }
        self.runc_roots.push(container.runc_root().to_owned());
        self.bundles.push(container.bundle().to_owned());
        self.processes
            .push((container.pid(), container.start_time()));
    }

    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.netns
            .iter()
            .chain(&self.cgroup_dirs)
            .chain(&self.runc_roots)
            .chain(&self.bundles)
    }

    fn assert_present(&self) {
        for path in self.files() {
            assert!(path.exists(), "{} does not exist", path.display());
        }
        for (pid, start_time) in &self.processes {
            assert!(runs(*pid, *start_time), "container init {pid} does not run");
        }
    }

    fn assert_gone(&self) {
        let left: Vec<_> = self.files().filter(|path| path.exists()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let namespaces = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("running ip netns list");
        let namespaces = String::from_utf8_lossy(&namespaces.stdout);
        for netns in &self.netns {
            let name = netns.file_name().expect("a netns file").to_string_lossy();
            assert!(!namespaces.contains(&*name), "netns {name} is still listed");
        }
        // The init processes were orphaned when runc exited; their reaper may take a moment.
        let deadline = Instant::now() + TIMEOUT;
        while let Some((pid, _)) = self.processes.iter().find(|(pid, time)| runs(*pid, *time)) {
            assert!(Instant::now() < deadline, "container init {pid} still runs");
            thread::sleep(Duration::from_millis(10));
        }
        assert_no_bundles();
    }
}

/// Asserts that no bundle directory of this process is left in the temporary directory.
fn assert_no_bundles() {
    let prefix = format!("enf-{}-", std::process::id());
    let left: Vec<_> = fs::read_dir(std::env::temp_dir())
        .expect("reading the temporary directory")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix) && name.contains("-bundle-"))
        .collect();
    assert!(left.is_empty(), "bundles left behind: {left:?}");
}

#[test]
fn containers_run_in_their_own_pods_and_serve_over_the_bridge() {
    require_root();
    let _serial = serial();
    let node = Netns::new("ctr-node");
    let network = PodNetwork::new(&node);
    let scope = ScratchCgroup::new("ctr-scope");
    let web_pod = network.attach("web");
    let client_pod = network.attach("client");
    let web = web_server(&web_pod, &scope, CgroupLayout::Docker);
    let client = Container::builder(&client_pod, &scope)
        .user(65534, 65534)
        .env("GREETING", "hello")
        .start();

    let web_netns = ns_inode(format!("/proc/{}/ns/net", web.pid()));
    let client_netns = ns_inode(format!("/proc/{}/ns/net", client.pid()));
    assert_eq!(web_netns, ns_inode(web.netns()), "joined the pod's netns");
    assert_eq!(client_netns, ns_inode(client.netns()));
    assert_ne!(web_netns, ns_inode("/proc/self/ns/net"));
    assert_ne!(web_netns, client_netns);
    assert_ne!(
        ns_inode(format!("/proc/{}/ns/pid", web.pid())),
        ns_inode("/proc/self/ns/pid"),
        "a container has its own pid namespace"
    );

    let expected = scope
        .path()
        .join("system.slice")
        .join(format!("docker-{}.scope", web.id()));
    assert_eq!(web.cgroup(), expected);
    assert_eq!(
        web.cgroup_path(),
        format!(
            "{}/system.slice/docker-{}.scope",
            scope.policy_path(),
            web.id()
        )
    );
    let procs = fs::read_to_string(web.cgroup().join("cgroup.procs")).expect("the cgroup exists");
    assert_eq!(procs.trim(), web.pid().to_string());
    // runc joins the same path in every hierarchy, v1 and v2 alike.
    let lines = cgroup_lines(web.pid());
    assert_eq!(lines.len(), cgroup_hierarchies().len(), "{lines:?}");
    for line in &lines {
        assert!(
            line.ends_with(&format!(":{}", web.cgroup_path())),
            "{lines:?}"
        );
    }

    let hostname = &web.id()[..12];
    assert_eq!(web.exec_stdout(&["hostname"]).trim(), hostname);
    let hosts = web.exec_stdout(&["getent", "ahostsv4", hostname]);
    assert!(hosts.contains(&web.addr4().to_string()), "{hosts}");

    // The small `sleep` is attested rather than python: hashing is slow in a debug build
    // under qemu's TCG.
    let facts = attest(&client);
    assert_eq!(facts.container.container_id.as_deref(), Some(client.id()));
    assert_eq!(facts.container.pod_uid, None);
    assert_eq!(facts.cgroup, client.cgroup_path());
    assert_eq!(facts.netns, client_netns);
    assert_eq!((facts.uid, facts.gid), (65534, 65534));

    for address in [url(web.addr4()), url(web.addr6())] {
        assert_served(
            &curl_in_netns(&node, &address),
            &format!("node to {address}"),
        );
        assert_served(
            &curl_in_container(&client, &address),
            &format!("client container to {address}"),
        );
    }
    assert_eq!(
        client
            .exec_stdout(&["sh", "-c", "echo $(id -u) $GREETING"])
            .trim(),
        "65534 hello",
        "exec runs as the container's user, with its environment"
    );

    web.kill();
    assert_eq!(web.status(), "stopped");
    let refused = curl_in_netns(&node, &url(web.addr4()));
    assert!(
        !refused.status.success(),
        "a killed server still answers: {refused:?}"
    );
}

#[test]
fn every_layout_places_the_container_where_its_runtime_would() {
    require_root();
    let _serial = serial();
    let node = Netns::new("ctr-layouts");
    let network = PodNetwork::new(&node);
    let scope = ScratchCgroup::new("ctr-layouts");
    let pod = network.attach("layouts");
    let pod_ = pod.uid().replace('-', "_");
    let layouts = [
        (
            CgroupLayout::Docker,
            "system.slice/docker-{id}.scope",
            false,
        ),
        (CgroupLayout::DockerCgroupfs, "docker/{id}", false),
        (
            CgroupLayout::Podman,
            "machine.slice/libpod-{id}.scope",
            false,
        ),
        (
            CgroupLayout::Kubernetes,
            concat!(
                "kubepods.slice/kubepods-besteffort.slice/",
                "kubepods-besteffort-pod{pod_}.slice/cri-containerd-{id}.scope"
            ),
            true,
        ),
        (
            CgroupLayout::KubernetesCgroupfs,
            "kubepods/besteffort/pod{pod}/{id}",
            true,
        ),
    ];
    let containers: Vec<_> = layouts
        .iter()
        .map(|&(layout, _, _)| Container::builder(&pod, &scope).layout(layout).start())
        .collect();

    for (container, (layout, shape, in_pod)) in containers.iter().zip(layouts) {
        let below = shape
            .replace("{id}", container.id())
            .replace("{pod_}", &pod_)
            .replace("{pod}", pod.uid());
        let expected = format!("{}/{below}", scope.policy_path());
        assert_eq!(container.cgroup_path(), expected, "{layout:?}");
        assert!(
            cgroup_lines(container.pid()).contains(&format!("0::{expected}")),
            "{layout:?}: {:?}",
            cgroup_lines(container.pid())
        );
        let facts = attest(container);
        assert_eq!(
            facts.container.container_id.as_deref(),
            Some(container.id()),
            "{layout:?}"
        );
        assert_eq!(
            facts.container.pod_uid.as_deref(),
            in_pod.then_some(pod.uid()),
            "{layout:?}"
        );
    }
}

#[test]
fn containers_of_a_pod_share_its_network_and_slice_but_not_pids() {
    require_root();
    let _serial = serial();
    let node = Netns::new("ctr-pod");
    let network = PodNetwork::new(&node);
    let scope = ScratchCgroup::new("ctr-pod");
    let pod = network.attach("pod");
    let web = Container::builder(&pod, &scope)
        .layout(CgroupLayout::Kubernetes)
        .args(["python3", "-m", "http.server", &PORT.to_string()])
        .args(["--bind", "127.0.0.1"])
        .start();
    web.wait_for_listener(PORT);
    let sidecar = Container::builder(&pod, &scope)
        .layout(CgroupLayout::Kubernetes)
        .start();

    assert_eq!(
        ns_inode(format!("/proc/{}/ns/net", web.pid())),
        ns_inode(format!("/proc/{}/ns/net", sidecar.pid()))
    );
    assert_ne!(
        ns_inode(format!("/proc/{}/ns/pid", web.pid())),
        ns_inode(format!("/proc/{}/ns/pid", sidecar.pid()))
    );
    assert_eq!(web.cgroup().parent(), sidecar.cgroup().parent());
    assert_served(
        &curl_in_container(&sidecar, &url("127.0.0.1")),
        "sidecar to the pod's loopback",
    );
    let from_node = curl_in_netns(&node, &url(pod.addr4()));
    assert!(
        !from_node.status.success(),
        "a server on the pod's loopback is not reachable from the node: {from_node:?}"
    );

    let mut second = sidecar.spawn_exec(&["sh", "-c", "echo ready; exec sleep infinity"]);
    assert_eq!(second.read_line(TIMEOUT).as_deref(), Some("ready"));
    let mut procs: Vec<u32> = fs::read_to_string(sidecar.cgroup().join("cgroup.procs"))
        .expect("the cgroup exists")
        .lines()
        .map(|line| line.parse().expect("a pid"))
        .collect();
    procs.sort_unstable();
    let mut expected = vec![sidecar.pid(), second.pid()];
    expected.sort_unstable();
    assert_eq!(procs, expected);
    assert_eq!(
        ns_inode(format!("/proc/{}/ns/pid", second.pid())),
        ns_inode(format!("/proc/{}/ns/pid", sidecar.pid()))
    );
    assert_eq!(second.wait_timeout(Duration::from_millis(100)), None);
    drop(second);
    let procs = fs::read_to_string(sidecar.cgroup().join("cgroup.procs")).expect("cgroup");
    assert_eq!(procs.trim(), sidecar.pid().to_string());
    assert_eq!(sidecar.status(), "running");
}

#[test]
fn dropped_containers_leave_nothing_behind() {
    require_root();
    let _serial = serial();
    let mut footprint = Footprint::default();
    {
        let node = Netns::new("ctr-drop");
        let scope = ScratchCgroup::new("ctr-drop");
        let network = PodNetwork::new(&node);
        let pod = network.attach("drop-k8s");
        let other_pod = network.attach("drop-docker");
        footprint.add_pod(&pod);
        footprint.add_pod(&other_pod);
        // Two containers share the pod's slice; the first to go must not take it along.
        let first = Container::builder(&pod, &scope)
            .layout(CgroupLayout::Kubernetes)
            .start();
        let second = Container::builder(&pod, &scope)
            .layout(CgroupLayout::Kubernetes)
            .start();
        let third = web_server(&other_pod, &scope, CgroupLayout::Docker);
        for container in [&first, &second, &third] {
            footprint.add_container(container, &scope);
            let list = Command::new("runc")
                .arg("--root")
                .arg(container.runc_root())
                .args(["list", "--quiet"])
                .output()
                .expect("running runc list");
            assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), container.id());
        }
        footprint.assert_present();
        let bridge = network.bridge().to_owned();
        let veths = [pod.host_veth().to_owned(), other_pod.host_veth().to_owned()];
        assert!(links(&node).contains(&bridge));

        drop(first);
        assert!(
            second.cgroup().exists(),
            "the shared pod slice outlives the first container"
        );
        assert_eq!(second.status(), "running");
        drop((second, third, pod, other_pod, network));
        let left = links(&node);
        assert!(!left.contains(&bridge), "bridge {bridge} left: {left}");
        for veth in veths {
            assert!(!left.contains(&veth), "veth {veth} left: {left}");
        }
        let children: Vec<_> = fs::read_dir(scope.path())
            .expect("the scope exists")
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name())
            .collect();
        assert!(
            children.is_empty(),
            "cgroups left below the scope: {children:?}"
        );
    }
    footprint.assert_gone();
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    require_root();
    let _serial = serial();
    let mut footprint = Footprint::default();
    let mut node_path = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let node = Netns::new("ctr-panic");
        node_path = Some(node.path());
        let scope = ScratchCgroup::new("ctr-panic");
        let network = PodNetwork::new(&node);
        let pod = network.attach("panic");
        footprint.add_pod(&pod);
        let web = web_server(&pod, &scope, CgroupLayout::KubernetesCgroupfs);
        footprint.add_container(&web, &scope);
        let second = web.spawn_exec(&["sleep", "infinity"]);
        let second_start = start_time(second.pid()).expect("the exec'd process runs");
        footprint.processes.push((second.pid(), second_start));
        panic!("deliberate panic with a live container");
    }));

    // The panic is the deliberate one, after everything was made (not a failure on the way).
    let payload = outcome.expect_err("the test body panics");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"deliberate panic with a live container")
    );
    footprint.assert_gone();
    let node_path = node_path.expect("the node was created");
    assert!(!node_path.exists(), "{} left behind", node_path.display());
}

#[test]
fn a_container_that_cannot_start_says_why_and_leaves_nothing_behind() {
    require_root();
    let _serial = serial();
    let node = Netns::new("ctr-fail");
    let network = PodNetwork::new(&node);
    let scope = ScratchCgroup::new("ctr-fail");
    let pod = network.attach("fail");

    let outcome = panic::catch_unwind(|| {
        Container::builder(&pod, &scope)
            .args(["no-such-program", "--flag"])
            .start()
    });
    let payload = outcome.expect_err("a missing program cannot start");
    let message = payload
        .downcast_ref::<String>()
        .expect("the panic carries a formatted message");
    assert!(message.contains("did not start"), "{message}");
    assert!(
        message.contains("no-such-program"),
        "runc's error is missing: {message}"
    );

    for hierarchy in cgroup_hierarchies() {
        let top = hierarchy.join(scope.policy_path().trim_start_matches('/'));
        let children: Vec<_> = fs::read_dir(&top)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.path())
            .collect();
        assert!(children.is_empty(), "cgroups left: {children:?}");
        assert!(
            hierarchy == scope.path().parent().expect("below the mount") || !top.exists(),
            "{} left behind",
            top.display()
        );
    }
    assert_no_bundles();
}

#[test]
fn containers_on_two_nodes_reach_each_other_once_routed() {
    require_root();
    let _serial = serial();
    let node_a = Netns::new("ctr-node-a");
    let node_b = Netns::new("ctr-node-b");
    let link = connect_nodes(&node_a, &node_b);
    let network_a = PodNetwork::new(&node_a);
    let network_b = PodNetwork::new(&node_b);
    assert_ne!(network_a.subnet4(), network_b.subnet4());
    let scope = ScratchCgroup::new("ctr-nodes");
    let pod_a = network_a.attach("on-a");
    let pod_b = network_b.attach("on-b");
    let web_a = web_server(&pod_a, &scope, CgroupLayout::Kubernetes);
    let web_b = web_server(&pod_b, &scope, CgroupLayout::Kubernetes);

    let unrouted = curl_in_container(&web_a, &url(web_b.addr4()));
    assert!(
        !unrouted.status.success(),
        "node A has no route to node B's pods yet: {unrouted:?}"
    );

    route_pod_networks(&network_a, &network_b, &link);
    for (from, to) in [(&web_a, &web_b), (&web_b, &web_a)] {
        for address in [url(to.addr4()), url(to.addr6())] {
            assert_served(
                &curl_in_container(from, &address),
                &format!("{} to {address}", from.addr4()),
            );
        }
    }
    // Routed, not translated: the server saw the client pod's own address.
    let deadline = Instant::now() + TIMEOUT;
    while !web_b.stderr().contains(&web_a.addr4().to_string()) {
        assert!(
            Instant::now() < deadline,
            "web_b did not log a request from {}:\n{}",
            web_a.addr4(),
            web_b.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

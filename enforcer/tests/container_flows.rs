//! Containers as workloads: real `runc` containers, each in its own network namespace on a
//! CNI-style pod network (bridge + veth), inside two node namespaces joined by veth, with one
//! real `enforcer run` per node. Each daemon serves the namespaces its containers live in, the
//! way it serves its own; every check goes through what a container does (`runc exec` of
//! curl or python) and what an operator sees (the CLI).
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Output,
    time::Duration,
};

use enforcer::{
    attest::Sha256Digest,
    audit::AuditRecord,
    testing::{
        CgroupLayout, Container, DaemonNode, INBOUND_PORT, Netns, Node, OUTBOUND_PORT, PodNetwork,
        ScratchCgroup, TestPki, connect_nodes, ns_inode, require_root, route_pod_networks, serial,
        wait_for_listener,
    },
};
use rustix::process::Signal;
use sha2::{Digest as _, Sha256};

const TD: &str = "pods.test";
/// The port the containers' servers listen on.
const PORT: u16 = 8080;

/// A server answering every GET with the container's hostname (its id's first 12 digits),
/// bound to the address given as its argument (`::` takes IPv4 too).
const HOSTNAME_SERVER: &str = r#"
import http.server, socket, sys
class Hostname(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
Server((sys.argv[1], 8080), Hostname).serve_forever()
"#;

/// `web` may reach `api`; `db` may not; `x` and `y` each reach themselves; `host` (a process
/// of the node itself) and `api` reach each other.
const RULES: &str = r#"
[[allow]]
from = "spiffe://pods.test/web"
to = "spiffe://pods.test/api"
ports = [8080]

[[deny]]
from = "spiffe://pods.test/db"
to = "spiffe://pods.test/api"

[[allow]]
from = "spiffe://pods.test/x"
to = "spiffe://pods.test/x"

[[allow]]
from = "spiffe://pods.test/y"
to = "spiffe://pods.test/y"

[[allow]]
from = "spiffe://pods.test/host"
to = "spiffe://pods.test/api"

[[allow]]
from = "spiffe://pods.test/api"
to = "spiffe://pods.test/host"

[[allow]]
from = "spiffe://pods.test/pinned"
to = "spiffe://pods.test/api"
ports = [8080]

[[egress]]
cidr = "0.0.0.0/0"
ports = [9000]
"#;
/// The port plaintext egress is permitted to (anywhere outside the mesh).
const EGRESS_PORT: u16 = 9000;
/// A server that answers one connection with the address it came from, then exits: `python3
/// -c PEER_ECHO <address> <port>`.
const PEER_ECHO: &str = "import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, (ip, _) = s.accept()
c.sendall(ip.encode())
c.close()
";

/// The workloads: one cgroup below the scope each (containers go below theirs).
const WORKLOADS: [&str; 7] = ["web", "db", "api", "x", "y", "host", "pinned"];
/// The workload that is also pinned by binary: a copy of [`CURL`] at `/client` in its
/// container.
const PINNED: &str = "pinned";
/// Debian's curl (`cargo xtask setup` installs it), the binary `pinned` is pinned to.
const CURL: &str = "/usr/bin/curl";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// A node's policy: its scope enrolled, one workload per cgroup below it, both nodes as mesh
/// peers serving their pod networks (the same peers in every node's policy, the node itself
/// among them), then `rules`.
fn policy(scope: &str, nodes: [(IpAddr, &PodNetwork); 2], rules: &str) -> String {
    let mut text = format!("trust_domain = \"{TD}\"\nenroll = [\"{scope}\"]\n");
    for name in WORKLOADS {
        let _ = write!(
            text,
            "[[workload]]\nid = \"{}\"\nselectors = [\"cgroup:path:{scope}/{name}\"",
            id(name)
        );
        if name == PINNED {
            let curl = fs::read(CURL).unwrap_or_else(|error| panic!("{CURL}: {error}"));
            let digest = Sha256Digest(Sha256::digest(curl).into());
            let _ = write!(text, ", \"unix:sha256:{digest}\"");
        }
        text.push_str("]\n");
    }
    for (address, pods) in nodes {
        let _ = write!(
            text,
            "[[peer]]\naddress = \"{address}\"\nport = {INBOUND_PORT}\ncidrs = [\"{}\", \"{}\"]\n",
            pods.subnet4(),
            pods.subnet6()
        );
    }
    text.push_str(rules);
    text
}

/// One node: its daemon, its pod network and the workload cgroups below its scope.
struct PodNode {
    daemon: DaemonNode,
    pods: PodNetwork,
    cgroups: Vec<(&'static str, ScratchCgroup)>,
}

impl PodNode {
    fn cgroup(&self, name: &str) -> &ScratchCgroup {
        &self
            .cgroups
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no workload cgroup {name}"))
            .1
    }

    /// A container of workload `name` in a pod of its own, running `args` (default: sleep),
    /// once the daemon serves its network namespace.
    fn container(&self, name: &str, args: &[&str]) -> Container {
        let pod = self.pods.attach(name);
        let container = Container::builder(&pod, self.cgroup(name))
            .args(args.iter().copied())
            .start();
        self.wait_served(&container);
        container
    }

    /// A container of workload `name` whose server answers with its hostname on `bind`.
    fn server(&self, name: &str, bind: &str) -> Container {
        let container = self.container(name, &["python3", "-c", HOSTNAME_SERVER, bind]);
        container.wait_for_listener(PORT);
        container
    }

    /// The inodes of the workload namespaces the daemon serves now.
    fn served(&self) -> BTreeSet<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&self.daemon.cli_ok(&["status", "--json"])).expect("status");
        status["listeners"]["namespaces"]
            .as_array()
            .expect("a namespaces list")
            .iter()
            .map(|ns| ns["inode"].as_u64().expect("an inode"))
            .collect()
    }

    fn wait_served(&self, container: &Container) {
        let inode = netns_inode(container.pid());
        self.daemon.wait_until(
            &format!("{}'s namespace to be served", container.id()),
            |_| self.served().contains(&inode),
        );
    }
}

/// Two nodes with routed pod networks, one daemon each (most tests use node `a` alone).
struct Cluster {
    a: PodNode,
    b: PodNode,
    _link: (Node, Node),
}

impl Cluster {
    /// Node `a`'s policy with `rules`: like every node's, it names both nodes as peers (one
    /// policy file for the whole mesh).
    fn policy_of_a(&self, rules: &str) -> String {
        let (a, b) = (&self.a, &self.b);
        let nodes = [
            (IpAddr::from(a.daemon.link().addr4()), &a.pods),
            (IpAddr::from(b.daemon.link().addr4()), &b.pods),
        ];
        policy(a.daemon.scope_path(), nodes, rules)
    }

    fn new(rules: &str) -> Self {
        require_root();
        let link = connect_nodes(&Netns::new("pnode-a"), &Netns::new("pnode-b"));
        let pods_a = PodNetwork::new(link.0.netns());
        let pods_b = PodNetwork::new(link.1.netns());
        route_pod_networks(&pods_a, &pods_b, &link);
        let pki = TestPki::new(TD);
        let (addr_a, addr_b) = (IpAddr::from(link.0.addr4()), IpAddr::from(link.1.addr4()));
        let nodes = [(addr_a, &pods_a), (addr_b, &pods_b)];
        let daemon_a = DaemonNode::start(binary(), &link.0, "a", &pki.root, |scope| {
            policy(scope, nodes, rules)
        });
        let daemon_b = DaemonNode::start(binary(), &link.1, "b", &pki.root, |scope| {
            policy(scope, nodes, rules)
        });
        let node = |daemon: DaemonNode, pods: PodNetwork| {
            let cgroups = WORKLOADS
                .iter()
                .map(|&name| (name, daemon.scope().child(name)))
                .collect();
            PodNode {
                daemon,
                pods,
                cgroups,
            }
        };
        Self {
            a: node(daemon_a, pods_a),
            b: node(daemon_b, pods_b),
            _link: link,
        }
    }
}

/// `curl` inside `container` (a new process of its cgroup and namespaces): its output.
fn curl(container: &Container, url: &str) -> Output {
    container.exec(&curl_args(url))
}

/// Put a copy of `source` at `/client` in `container`, replacing what was there (a new inode,
/// as an image update or an attacker's swap makes).
fn install_client(container: &Container, source: &str) {
    let client = container.bundle().join("rootfs/client");
    let staged = client.with_extension("new");
    fs::copy(source, &staged).unwrap_or_else(|error| panic!("copy {source}: {error}"));
    fs::rename(&staged, &client).expect("swap the client binary");
}

/// A curl command line that gives up within seconds.
fn curl_args(url: &str) -> [&str; 7] {
    [
        "curl",
        "-sS",
        "--connect-timeout",
        "3",
        "--max-time",
        "10",
        url,
    ]
}

fn url(addr: impl Into<IpAddr>) -> String {
    format!("http://{}/", SocketAddr::new(addr.into(), PORT))
}

fn assert_answered_by(node: &PodNode, output: &Output, server: &Container) {
    assert!(
        output.status.success(),
        "curl failed ({}): {}\nnode {}'s denials: {:#?}\nits log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        node.daemon.link().netns().name(),
        node.daemon.flows(&["--verdict", "deny"]),
        node.daemon.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        server.id()[..12],
        "the wrong server answered"
    );
}

fn assert_refused(output: &Output) {
    assert!(
        !output.status.success(),
        "curl succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(output.stdout.is_empty(), "no byte may arrive");
}

/// The inode of process `pid`'s network namespace.
fn netns_inode(pid: u32) -> u64 {
    ns_inode(format!("/proc/{pid}/ns/net"))
}

/// The open record of an allowed flow from `src` to `dst` (container ids), as `node` wrote it
/// on `side` (`outbound`, `inbound`, or `kernel` for a same-node flow that went direct).
fn flow_between(node: &PodNode, side: &str, src: &Container, dst: &Container) -> AuditRecord {
    flow_from_any(node, &[side], src, dst)
}

/// [`flow_between`] on whichever of `sides` carried it.
fn flow_from_any(node: &PodNode, sides: &[&str], src: &Container, dst: &Container) -> AuditRecord {
    node.daemon.wait_for_record(
        &format!("an allowed {sides:?} flow {} -> {}", src.id(), dst.id()),
        |r| {
            sides.contains(&r.source.as_str())
                && r.event.as_str() == "open"
                && r.verdict.as_str() == "allow"
                && r.src.container_id.as_deref() == Some(src.id())
                && r.dst.container_id.as_deref() == Some(dst.id())
        },
    )
}

#[test]
fn containers_on_one_node_reach_each_other_as_policy_says() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "::");
    let web = a.container("web", &[]);
    let db = a.container("db", &[]);

    assert_answered_by(a, &curl(&web, &url(api.addr4())), &api);
    assert_answered_by(a, &curl(&web, &url(api.addr6())), &api);
    // A fresh curl is attested when it connects (through the daemon), or went direct if a
    // rescan saw it first.
    let record = flow_from_any(a, &["outbound", "kernel"], &web, &api);
    assert_eq!(record.src.spiffe_id.as_deref(), Some(id("web").as_str()));
    assert_eq!(record.dst.spiffe_id.as_deref(), Some(id("api").as_str()));

    assert_refused(&curl(&db, &url(api.addr4())));
    a.daemon.wait_for_record("db's refusal", |r| {
        r.verdict.as_str() == "deny"
            && r.src.container_id.as_deref() == Some(db.id())
            && r.dst.spiffe_id.as_deref() == Some(id("api").as_str())
    });
    let workloads = a.daemon.cli_ok(&["workloads"]);
    assert!(workloads.contains(&web.id()[..12]), "{workloads}");
}

/// A client that waits for the daemon's next rescans (every 2 s) to know it before it fetches
/// `sys.argv[1]` and prints the answer.
const KNOWN_FETCH: &str = "import sys, time, urllib.request
time.sleep(5)
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end='')
";

#[test]
fn known_containers_on_one_node_talk_direct_authorized_in_the_kernel() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "::");
    let web = a.container("web", &[]);

    let output = web.exec(&["python3", "-c", KNOWN_FETCH, &url(api.addr4())]);
    assert_answered_by(a, &output, &api);
    // Across the two containers' namespaces, over the pod bridge, with no daemon in the path.
    let open = flow_between(a, "kernel", &web, &api);
    assert_eq!(open.src.spiffe_id.as_deref(), Some(id("web").as_str()));
    assert_eq!(open.dst.spiffe_id.as_deref(), Some(id("api").as_str()));
    assert_eq!(
        open.dst.addr,
        Some(SocketAddr::new(api.addr4().into(), PORT).to_string())
    );
    assert!(
        a.daemon.flows(&[]).iter().all(|r| {
            !(r.source.as_str() == "outbound" && r.src.container_id.as_deref() == Some(web.id()))
        }),
        "the tunnel never carried web's flow: {:#?}",
        a.daemon.flows(&[])
    );
}

#[test]
fn a_container_and_a_host_process_reach_each_other() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "0.0.0.0");
    let node_addr = a.daemon.link().addr4();
    let host_server = a
        .daemon
        .spawn(a.cgroup("host"), "python3")
        .args(["-c", HOSTNAME_SERVER])
        .arg(node_addr.to_string())
        .spawn();
    enforcer::testing::wait_for_listener(&host_server, PORT);

    // Host process -> container.
    let mut fetch = a
        .daemon
        .spawn(a.cgroup("host"), "curl")
        .args(["-sS", "--max-time", "10"])
        .arg(url(api.addr4()))
        .spawn();
    let status = fetch
        .wait_timeout(Duration::from_secs(30))
        .expect("curl hung");
    assert!(
        status.success(),
        "host -> container failed: {}",
        fetch.stderr()
    );
    assert_eq!(
        fetch.read_line(Duration::from_secs(1)).as_deref(),
        Some(&api.id()[..12])
    );
    // Container -> host process (its hostname is the node's: it shares the host's uts).
    let output = curl(&api, &url(node_addr));
    assert!(
        output.status.success(),
        "container -> host failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    a.daemon.wait_for_record("api -> host", |r| {
        r.verdict.as_str() == "allow"
            && r.src.container_id.as_deref() == Some(api.id())
            && r.dst.spiffe_id.as_deref() == Some(id("host").as_str())
    });
}

#[test]
fn two_containers_on_the_same_address_and_port_never_collide() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    // Each listens on its own loopback, and the next pair on every address: same keys but
    // for the namespace.
    let x = a.server("x", "127.0.0.1");
    let y = a.server("y", "127.0.0.1");
    assert_answered_by(a, &curl(&x, "http://127.0.0.1:8080/"), &x);
    assert_answered_by(a, &curl(&y, "http://127.0.0.1:8080/"), &y);
    let x_any = a.server("x", "0.0.0.0");
    let y_any = a.server("y", "0.0.0.0");
    assert_answered_by(a, &curl(&x_any, &url(x_any.addr4())), &x_any);
    assert_answered_by(a, &curl(&y_any, &url(y_any.addr4())), &y_any);
    // x may not reach y.
    assert_refused(&curl(&x_any, &url(y_any.addr4())));
}

#[test]
fn plaintext_to_a_container_is_dropped_and_its_daemon_ports_are_reserved() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "0.0.0.0");
    // From the node itself, unenrolled.
    let mut bypass = a
        .daemon
        .spawn(&ScratchCgroup::new("outside"), "curl")
        .args(["-sS", "--connect-timeout", "2", "--max-time", "3"])
        .arg(url(api.addr4()))
        .spawn();
    let status = bypass
        .wait_timeout(Duration::from_secs(20))
        .expect("curl hung");
    assert!(
        !status.success(),
        "plaintext from the node reached the container"
    );
    // From a container nobody enrolled (a sibling of the scope).
    let outsider_cgroup = ScratchCgroup::new("outsider");
    let outsider = Container::builder(&a.pods.attach("outsider"), &outsider_cgroup).start();
    assert_refused(&curl(&outsider, &url(api.addr4())));
    a.daemon
        .wait_for_record("the drop of plaintext to api, naming its container", |r| {
            r.verdict.as_str() == "drop"
                && r.dst.addr == Some(format!("{}:{PORT}", api.addr4()))
                && r.dst.container_id.as_deref() == Some(api.id())
        });

    // A workload may not take the daemon's ports in its namespace.
    for port in [OUTBOUND_PORT, INBOUND_PORT] {
        let bind = api.exec(&[
            "python3",
            "-c",
            &format!("import socket; socket.socket().bind(('0.0.0.0', {port}))"),
        ]);
        assert!(!bind.status.success(), "a workload bound port {port}");
        assert!(
            String::from_utf8_lossy(&bind.stderr).contains("PermissionError"),
            "{}",
            String::from_utf8_lossy(&bind.stderr)
        );
    }
    a.daemon.wait_for_record("the reserved-port refusal", |r| {
        r.reason == "reserved-port" && r.src.container_id.as_deref() == Some(api.id())
    });
}

#[test]
fn a_container_that_exits_releases_its_namespace_and_leaks_nothing() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let fds = || {
        fs::read_dir(format!("/proc/{}/fd", a.daemon.pid()))
            .expect("the daemon's fds")
            .count()
    };
    // One cycle first: whatever the daemon opens once (SVIDs, pools) is not a leak.
    drop(a.container("web", &[]));
    a.daemon
        .wait_until("the namespace to be released", |_| a.served().is_empty());
    let before = fds();
    for _ in 0..20 {
        let web = a.container("web", &[]);
        let inode = netns_inode(web.pid());
        drop(web);
        a.daemon.wait_until("the namespace to be released", |_| {
            !a.served().contains(&inode)
        });
    }
    assert!(a.served().is_empty());
    let after = fds();
    assert!(
        after <= before,
        "the daemon holds {after} descriptors after 20 containers, {before} before"
    );
}

#[test]
fn containers_on_two_nodes_go_through_mtls_and_both_trails_name_both() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let (a, b) = (&cluster.a, &cluster.b);
    let api = b.server("api", "0.0.0.0");
    let web = a.container("web", &[]);
    let db = a.container("db", &[]);

    assert_answered_by(a, &curl(&web, &url(api.addr4())), &api);
    let outbound = flow_between(a, "outbound", &web, &api);
    let inbound = flow_between(b, "inbound", &web, &api);
    assert_eq!(outbound.dst.spiffe_id, inbound.dst.spiffe_id);
    assert_eq!(inbound.src.spiffe_id.as_deref(), Some(id("web").as_str()));

    assert_refused(&curl(&db, &url(api.addr4())));
    a.daemon.wait_for_record("db's refusal", |r| {
        r.verdict.as_str() == "deny" && r.src.container_id.as_deref() == Some(db.id())
    });
}

#[test]
fn a_binary_swapped_inside_a_container_loses_its_identity() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let (a, b) = (&cluster.a, &cluster.b);
    let api = b.server("api", "0.0.0.0");
    let pinned = a.container(PINNED, &[]);
    install_client(&pinned, CURL);
    let target = url(api.addr4());
    let mut args = curl_args(&target);
    args[0] = "/client";
    assert_answered_by(a, &pinned.exec(&args), &api);

    // Same path, same cgroup, same container: another binary.
    install_client(&pinned, "/usr/bin/python3");
    let impostor = pinned.exec(&[
        "/client",
        "-c",
        &format!(
            "import urllib.request\nprint(urllib.request.urlopen('{}', timeout=10).read())",
            url(api.addr4())
        ),
    ]);
    assert!(
        !impostor.status.success(),
        "the impostor was answered: {}",
        String::from_utf8_lossy(&impostor.stdout)
    );
    a.daemon.wait_for_record("the impostor's refusal", |r| {
        r.verdict.as_str() == "deny"
            && r.reason == "no-identity"
            && r.src.container_id.as_deref() == Some(pinned.id())
    });
}

#[test]
fn the_daemons_plaintext_dial_for_a_container_stays_in_its_namespace() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    // An unenrolled server on the node's own loopback, outside the mesh: the plaintext egress
    // entry covers its port.
    let mut host_server = a
        .daemon
        .spawn(&ScratchCgroup::new("egress-server"), "python3")
        .args(["-c", PEER_ECHO, "127.0.0.1", &EGRESS_PORT.to_string()])
        .spawn();
    wait_for_listener(&host_server, EGRESS_PORT);
    // In a container: a listener of no identity (python3 where only the pinned curl is
    // `pinned`) on the same port of the container's own loopback, and a client of identity
    // `pinned`. The kernel redirects the client (the destination is a local listener); the
    // daemon finds no identity there and falls back to the egress entry.
    let pinned = a.container(PINNED, &[]);
    install_client(&pinned, CURL);
    let _nobody = pinned.spawn_exec(&[
        "python3",
        "-c",
        PEER_ECHO,
        "127.0.0.1",
        &EGRESS_PORT.to_string(),
    ]);
    pinned.wait_for_listener(EGRESS_PORT);
    let target = format!("http://127.0.0.1:{EGRESS_PORT}/");
    let mut args = curl_args(&target);
    args[0] = "/client";
    let output = pinned.exec(&args);
    assert!(
        !output.status.success(),
        "the container's client was answered: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    // The dial was made in the container's namespace, where the ingress hook protects the
    // listener of no identity from it: refused, and the node's loopback was never reached.
    let record = a
        .daemon
        .wait_for_record("the client's egress attempt", |r| {
            r.source.as_str() == "outbound"
                && r.src.container_id.as_deref() == Some(pinned.id())
                && r.dst.addr.as_deref() == Some(&format!("127.0.0.1:{EGRESS_PORT}"))
        });
    assert_eq!(record.verdict.as_str(), "deny", "{record:?}");
    assert!(
        host_server
            .wait_timeout(Duration::from_millis(100))
            .is_none(),
        "the node's loopback server answered a container's connection"
    );
}

#[test]
fn a_workload_namespace_never_takes_an_address_it_does_not_own() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let (a, b) = (&cluster.a, &cluster.b);
    let api_a = a.server("api", "0.0.0.0");
    let api_b = b.server("api", "0.0.0.0");
    let web = a.container("web", &[]);
    // A server that configures the address of another container on its node, of a container
    // on the peer node, and of the node itself (as its root could, given CAP_NET_ADMIN).
    let squatter = a.server("y", "0.0.0.0");
    let stolen = [
        IpAddr::from(api_a.addr4()),
        IpAddr::from(api_b.addr4()),
        IpAddr::from(a.daemon.link().addr4()),
    ];
    for ip in stolen {
        squatter
            .pod()
            .netns()
            .run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    a.daemon
        .wait_until("the daemon to refuse the three addresses", |daemon| {
            let log = daemon.log();
            stolen
                .iter()
                .all(|ip| log.contains(&format!("ip={ip} refused=")))
        });
    // The peer's container is still the peer's; the address two containers configure is
    // nobody's: refused, never the squatter's.
    assert_answered_by(a, &curl(&web, &url(api_b.addr4())), &api_b);
    assert_refused(&curl(&web, &url(api_a.addr4())));
}

#[test]
fn a_network_namespace_made_without_the_nodes_root_is_never_served() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "0.0.0.0");
    // An enrolled process escapes into a network namespace of its own, in a user namespace
    // of its own (what any user can do where unprivileged user namespaces are allowed).
    let escapee = a
        .daemon
        .spawn(a.cgroup("x"), "unshare")
        .args(["-Urn", "sh", "-c"])
        .arg(format!(
            "curl -sS --max-time 3 {} >/dev/null 2>&1; echo \"exit=$?\"; sleep 30",
            url(api.addr4())
        ))
        .spawn();
    let line = escapee
        .read_line(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no answer; stderr:\n{}", escapee.stderr()));
    assert_ne!(
        line, "exit=0",
        "a connect from the escaped namespace went through"
    );
    a.daemon.wait_until("the refusal to serve it", |daemon| {
        daemon.log().contains("belongs to another user namespace")
    });
    a.daemon
        .wait_for_record("the connect refused as not served", |r| {
            r.reason == "namespace-not-served"
        });
    assert!(
        !a.served().contains(&netns_inode(escapee.pid())),
        "the daemon serves the escaped namespace"
    );
}

#[test]
fn the_daemon_restarted_serves_running_containers_again_and_a_killed_one_fails_closed() {
    let _serial = serial();
    let mut cluster = Cluster::new(RULES);
    let api = cluster.a.server("api", "0.0.0.0");
    let web = cluster.a.container("web", &[]);
    assert_answered_by(&cluster.a, &curl(&web, &url(api.addr4())), &api);

    cluster.a.daemon.signal(Signal::KILL);
    cluster
        .a
        .daemon
        .wait(Duration::from_secs(10))
        .expect("the killed daemon exited");
    assert_refused(&curl(&web, &url(api.addr4())));

    cluster.a.daemon.restart();
    cluster.a.wait_served(&web);
    cluster.a.wait_served(&api);
    assert_answered_by(&cluster.a, &curl(&web, &url(api.addr4())), &api);
}

#[test]
fn a_reload_closes_an_open_container_flow_the_new_policy_denies() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    let api = a.server("api", "0.0.0.0");
    let web = a.container("web", &[]);
    // A connection that stays open: a python client that connects, then waits for the far
    // end to close it (the server never writes first). Through the daemon, the tunnel resets
    // it; direct, the kernel aborts it (ECONNABORTED).
    let client = web.spawn_exec(&[
        "python3",
        "-c",
        &format!(
            "import socket\ns = socket.create_connection(('{}', {PORT}))\n\
             print('connected', flush=True)\ns.settimeout(60)\n\
             try:\n    print('closed' if s.recv(1) == b'' else 'data', flush=True)\n\
             except (ConnectionResetError, ConnectionAbortedError):\n    \
             print('closed', flush=True)",
            api.addr4()
        ),
    ]);
    assert_eq!(
        client.read_line(Duration::from_secs(20)).as_deref(),
        Some("connected"),
        "{}",
        client.stderr()
    );
    // Through the daemon, or direct once the daemon knows the client (a rescan, every 2 s).
    flow_from_any(a, &["outbound", "kernel"], &web, &api);
    let denied = RULES.replace(
        "[[allow]]\nfrom = \"spiffe://pods.test/web\"",
        "[[deny]]\nfrom = \"spiffe://pods.test/web\"",
    );
    let file = a.daemon.dir().join("next.toml");
    fs::write(&file, cluster.policy_of_a(&denied)).expect("write the next policy");
    let reloaded = a
        .daemon
        .cli_ok(&["policy", "reload", file.to_str().expect("a UTF-8 path")]);
    assert!(reloaded.contains("version"), "{reloaded}");
    a.daemon.wait_for_record("the revocation", |r| {
        r.reason == "revoked" && r.src.container_id.as_deref() == Some(web.id())
    });
    assert_eq!(
        client.read_line(Duration::from_secs(20)).as_deref(),
        Some("closed"),
        "{}",
        client.stderr()
    );
}

#[test]
fn container_and_pod_selectors_match_the_runtimes_cgroup_paths() {
    let _serial = serial();
    let cluster = Cluster::new(RULES);
    let a = &cluster.a;
    // `other` has no entry: these containers get an identity only from the selectors below.
    let other = a.daemon.scope().child("other");
    let layouts = [
        CgroupLayout::Docker,
        CgroupLayout::DockerCgroupfs,
        CgroupLayout::Podman,
        CgroupLayout::Kubernetes,
        CgroupLayout::KubernetesCgroupfs,
    ];
    let containers: Vec<Container> = layouts
        .iter()
        .map(|&layout| {
            Container::builder(&a.pods.attach("sel"), &other)
                .layout(layout)
                .start()
        })
        .collect();
    let mut entries = String::new();
    for (n, container) in containers.iter().enumerate() {
        let selector = if n < 3 {
            format!("container:id:{}", container.id())
        } else {
            format!("k8s:pod-uid:{}", container.pod().uid())
        };
        let _ = write!(
            entries,
            "[[workload]]\nid = \"{}\"\nselectors = [\"{selector}\"]\n",
            id(&format!("selected-{n}"))
        );
    }
    let file = a.daemon.dir().join("selectors.toml");
    let text = cluster.policy_of_a(RULES);
    let (head, rest) = text.split_at(text.find("[[peer]]").expect("a peer entry"));
    fs::write(&file, format!("{head}{entries}{rest}")).expect("write the policy");
    let reloaded = a
        .daemon
        .cli_ok(&["policy", "reload", file.to_str().expect("a UTF-8 path")]);
    assert!(reloaded.contains("version"), "{reloaded}");
    for (n, container) in containers.iter().enumerate() {
        let wanted = id(&format!("selected-{n}"));
        a.daemon
            .wait_until(&format!("{:?} to be {wanted}", layouts[n]), |node| {
                let workloads: serde_json::Value =
                    serde_json::from_str(&node.cli_ok(&["workloads", "--json"]))
                        .expect("workloads");
                workloads.as_array().expect("a list").iter().any(|w| {
                    w["pid"].as_u64() == Some(u64::from(container.pid()))
                        && w["spiffe_id"].as_str() == Some(wanted.as_str())
                        && w["container_id"].as_str() == Some(container.id())
                })
            });
    }
}

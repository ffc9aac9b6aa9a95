//! What serving containers costs: real `runc` containers on CNI-style pod networks in two node
//! namespaces, one real `enforcer run` per node (the harness of `tests/container_flows.rs`).
//!
//! - **ready**: from a container's start (runc returned, its command runs) until the daemon's
//!   outbound listener is up in its namespace (a listening socket on `127.0.0.1:15001` in
//!   the container's own `/proc/<pid>/net/tcp`); 20 containers one after another;
//! - **memory and descriptors**: the daemon's RSS and open descriptors with 50 sleeping
//!   containers served, against none, per namespace;
//! - **throughput**: iperf3 from a container on node A to a container on node B, against the
//!   same between two host processes of the same nodes, both through the tunnel, in
//!   alternating rounds of the same run;
//! - **latency**: 1-byte request/response round trips on one connection (a python3 client and
//!   echo server, the same on both paths), container -> container against host -> host, in
//!   alternating rounds: the p50 the container path adds.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

#[path = "common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::median;
use enforcer::testing::{
    Container, DaemonNode, Netns, OUTBOUND_PORT, PodNetwork, TestPki, connect_nodes, fd_count,
    require_root, route_pod_networks, rss_kib, wait_for_listener,
};

const TD: &str = "bench.containers";
const PORT: u16 = 5201;
const READY_SAMPLES: usize = 20;
const SERVED_CONTAINERS: usize = 50;
const ROUNDS: usize = 3;
const IPERF_SECONDS: &str = "4";
const ECHO_PORT: u16 = 7000;
/// An echo server: `python3 -c ECHO <address> <port>`.
const ECHO: &str = "import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(64):
        c.sendall(d)
    c.close()
";
/// `python3 -c ROUND_TRIPS <address> <port>`: 200 warm-up and 2,000 timed 1-byte round trips
/// on one connection; prints the p50 and p99 in microseconds.
const ROUND_TRIPS: &str = "import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = []
for _ in range(2200):
    start = time.perf_counter_ns()
    s.sendall(b'x')
    if s.recv(1) != b'x':
        sys.exit('echo mismatch')
    t.append(time.perf_counter_ns() - start)
t = sorted(t[200:])
print(t[len(t) // 2] / 1e3, t[len(t) * 99 // 100] / 1e3)
";

fn policy(scope: &str, peer: IpAddr, peer_pods: &PodNetwork) -> String {
    let mut text = format!("trust_domain = \"{TD}\"\nenroll = [\"{scope}\"]\n");
    for name in ["client", "server", "idle"] {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://{TD}/{name}\"\nselectors = [\"cgroup:path:{scope}/{name}\"]\n"
        );
    }
    let _ = write!(
        text,
        "[[peer]]\naddress = \"{peer}\"\ncidrs = [\"{}\"]\n\
         [[allow]]\nfrom = \"spiffe://{TD}/client\"\nto = \"spiffe://{TD}/server\"\n",
        peer_pods.subnet4()
    );
    text
}

fn main() {
    require_root();
    let binary = Path::new(env!("CARGO_BIN_EXE_enforcer"));
    let link = connect_nodes(&Netns::new("bench-a"), &Netns::new("bench-b"));
    let pods_a = PodNetwork::new(link.0.netns());
    let pods_b = PodNetwork::new(link.1.netns());
    route_pod_networks(&pods_a, &pods_b, &link);
    let pki = TestPki::new(TD);
    let (addr_a, addr_b) = (IpAddr::from(link.0.addr4()), IpAddr::from(link.1.addr4()));
    let a = DaemonNode::start(binary, &link.0, "a", &pki.root, |scope| {
        policy(scope, addr_b, &pods_b)
    });
    let b = DaemonNode::start(binary, &link.1, "b", &pki.root, |scope| {
        policy(scope, addr_a, &pods_a)
    });
    println!("enforcer bench containers: runc containers, one daemon per node namespace");
    ready(&a, &pods_a);
    footprint(&a, &pods_a);
    across_nodes((&a, &pods_a), (&b, &pods_b), addr_b);
}

/// Time from a container's start to its outbound listener.
fn ready(node: &DaemonNode, pods: &PodNetwork) {
    let idle = node.scope().child("idle");
    let mut samples = Vec::new();
    for n in 0..READY_SAMPLES {
        let container = Container::builder(&pods.attach(&format!("ready{n}")), &idle).start();
        let started = Instant::now();
        wait_served(&container, Duration::from_micros(500));
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "  ready: container start -> listeners up, {READY_SAMPLES} containers: p50 {:.1} ms, \
         p99 (the slowest) {:.1} ms, fastest {:.1} ms",
        median(&samples),
        samples[samples.len() - 1],
        samples[0]
    );
}

/// Wait, polling every `poll`, until the daemon's outbound listener (`127.0.0.1`, the
/// redirect port) is up in `container`'s namespace, as its `/proc/<pid>/net/tcp` shows it.
fn wait_served(container: &Container, poll: Duration) {
    let listening = format!("0100007F:{OUTBOUND_PORT:04X} 00000000:0000 0A");
    let table = format!("/proc/{}/net/tcp", container.pid());
    let started = Instant::now();
    while !fs::read_to_string(&table).is_ok_and(|text| text.contains(&listening)) {
        assert!(
            started.elapsed() < Duration::from_mins(1),
            "the daemon never served container {}",
            container.id()
        );
        std::thread::sleep(poll);
    }
}

/// The daemon's RSS (KiB) and open descriptors.
fn usage(node: &DaemonNode) -> (u64, usize) {
    (rss_kib(node.pid()), fd_count(node.pid()))
}

/// RSS and descriptors per served namespace.
fn footprint(node: &DaemonNode, pods: &PodNetwork) {
    let idle = node.scope().child("idle");
    std::thread::sleep(Duration::from_secs(1));
    let (rss0, fds0) = usage(node);
    let containers: Vec<Container> = (0..SERVED_CONTAINERS)
        .map(|n| Container::builder(&pods.attach(&format!("idle{n}")), &idle).start())
        .collect();
    for container in &containers {
        wait_served(container, Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss1, fds1) = usage(node);
    drop(containers);
    #[expect(clippy::cast_precision_loss, reason = "figures for display")]
    let per = |delta: u64| delta as f64 / SERVED_CONTAINERS as f64;
    println!(
        "  footprint: {SERVED_CONTAINERS} namespaces served: RSS {rss0} -> {rss1} KiB \
         ({:.0} KiB each), descriptors {fds0} -> {fds1} ({:.1} each)",
        per(rss1.saturating_sub(rss0)),
        per(u64::try_from(fds1.saturating_sub(fds0)).unwrap_or(0)),
    );
}

/// iperf3's received bits per second from its JSON report.
fn bits_per_second(json: &str) -> f64 {
    let report: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|error| panic!("iperf3 printed no report ({error}): {json}"));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in iperf3's report: {json}"))
}

/// Container -> container against host -> host, both across the nodes through the tunnel:
/// throughput, then latency.
fn across_nodes(a: (&DaemonNode, &PodNetwork), b: (&DaemonNode, &PodNetwork), host_b: IpAddr) {
    let (client_cg, server_cg) = (a.0.scope().child("client"), b.0.scope().child("server"));
    let server = Container::builder(&b.1.attach("srv"), &server_cg)
        .args(["iperf3", "-s", "-p", &PORT.to_string()])
        .start();
    server.wait_for_listener(PORT);
    let client = Container::builder(&a.1.attach("cli"), &client_cg).start();
    // The host processes of the same workloads: in child cgroups (runc may enable controllers
    // on the containers' parents, which then hold no process of their own).
    let (host_client_cg, host_server_cg) = (client_cg.child("host"), server_cg.child("host"));
    let host_server =
        b.0.spawn(&host_server_cg, "iperf3")
            .args([
                "-s",
                "-B",
                &host_b.to_string(),
                "-p",
                &(PORT + 1).to_string(),
            ])
            .spawn();
    wait_for_listener(&host_server, PORT + 1);
    let mut containers = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..ROUNDS {
        let output = client.exec(&[
            "iperf3",
            "-c",
            &server.addr4().to_string(),
            "-p",
            &PORT.to_string(),
            "-t",
            IPERF_SECONDS,
            "-J",
        ]);
        containers.push(bits_per_second(&String::from_utf8_lossy(&output.stdout)) / 1e9);
        let report = tempfile::NamedTempFile::new().expect("a report file");
        let mut host =
            a.0.spawn(&host_client_cg, "iperf3")
                .args(["-c", &host_b.to_string(), "-p", &(PORT + 1).to_string()])
                .args(["-t", IPERF_SECONDS, "-J", "--logfile"])
                .arg(report.path())
                .spawn();
        host.wait_timeout(Duration::from_mins(1))
            .expect("iperf3 finished");
        let json = fs::read_to_string(report.path()).expect("iperf3's report");
        hosts.push(bits_per_second(&json) / 1e9);
    }
    let (container, host) = (median(&containers), median(&hosts));
    println!(
        "  throughput across nodes through the tunnel, {ROUNDS} alternating rounds: container -> \
         container {container:.2} Gbit/s {containers:.2?}, host -> host {host:.2} Gbit/s \
         {hosts:.2?}; ratio {:.2}",
        container / host
    );

    let _echo = server.spawn_exec(&["python3", "-c", ECHO, "0.0.0.0", &ECHO_PORT.to_string()]);
    server.wait_for_listener(ECHO_PORT);
    let host_echo =
        b.0.spawn(&host_server_cg, "python3")
            .args([
                "-c",
                ECHO,
                &host_b.to_string(),
                &(ECHO_PORT + 1).to_string(),
            ])
            .spawn();
    wait_for_listener(&host_echo, ECHO_PORT + 1);
    let (mut containers, mut hosts) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let answer = client.exec_stdout(&[
            "python3",
            "-c",
            ROUND_TRIPS,
            &server.addr4().to_string(),
            &ECHO_PORT.to_string(),
        ]);
        containers.push(round_trip_p50(&answer));
        let host =
            a.0.spawn(&host_client_cg, "python3")
                .args(["-c", ROUND_TRIPS, &host_b.to_string()])
                .arg((ECHO_PORT + 1).to_string())
                .spawn();
        let answer = host
            .read_line(Duration::from_mins(1))
            .unwrap_or_else(|| panic!("no round trips; stderr:\n{}", host.stderr()));
        hosts.push(round_trip_p50(&answer));
    }
    let (container, host) = (median(&containers), median(&hosts));
    println!(
        "  latency across nodes through the tunnel, 1-byte round trips, {ROUNDS} alternating \
         rounds: container -> container p50 {container:.0} us {containers:.0?}, host -> host \
         p50 {host:.0} us {hosts:.0?}; the container path adds {:.0} us",
        container - host
    );
}

/// The p50 (microseconds) of a `ROUND_TRIPS` answer.
fn round_trip_p50(answer: &str) -> f64 {
    answer
        .split_whitespace()
        .next()
        .and_then(|p50| p50.parse().ok())
        .unwrap_or_else(|| panic!("bad round-trip answer {answer:?}"))
}

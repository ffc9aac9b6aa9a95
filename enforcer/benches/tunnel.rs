//! `cargo xtask bench tunnel`: what the mTLS tunnel costs between two nodes.
//!
//! Two network namespaces joined by a veth link are the nodes A (client side) and B (server
//! side). Each node has its own datapath, attached to a scope cgroup this program creates, and
//! its own tunnel node process (this binary re-executed with `--node`, so its RSS is the
//! node's alone) reading the pinned maps through `KernelSources`. Three paths from a client in
//! A to a server in B, alternated round by round:
//! - `direct`: an unenrolled client to an unenrolled server, plain TCP over the veth;
//! - `tunnel`: an enrolled client's `connect()` to B's enrolled server is redirected by the
//!   kernel into A's outbound listener, carried over TLS 1.3 mTLS and HTTP/2 CONNECT to B's
//!   inbound listener, which connects to the server with a hop tagged for the server's identity
//!   (the server's ingress rule drops plaintext that bypasses the tunnel, checked first);
//! - `stunnel`: `stunnel4` in A and in B doing mTLS with SVIDs of the same test PKI
//!   (`verifyChain`, `requireCert`, TLS 1.3 only), in front of the unenrolled server.
//!
//! Figures: single-stream throughput, request/response latency on one persistent connection,
//! new-connection rate (warm pool, then a node with the pool disabled: cold mTLS), and the
//! nodes' RSS idle and with 1,000 idle tunnelled connections. Prints medians and medians of
//! per-round ratios against the targets; asserts no timing, only that the setup is what it
//! claims (plaintext that bypasses the tunnel is dropped, every path echoes). Needs root.
//!
//! Clients, servers and nodes are all this binary: `--serve`, `--node`, `--child` and
//! `--hold` select the role.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime},
};

use enforcer::{
    attest::{AttestOptions, Attestor, cgroup_relative_path},
    daemon::{KernelSources, Namespaces},
    identity::{
        CacheConfig, CertificateAuthority, SpiffeId, SvidCache, SystemClock, TrustBundleSet,
    },
    kernel::{DaemonConfig, ListenerSlot, Maps, SocketTags, cgroup2_mount, netns_cookie},
    policy::{Compiled, InForce, Policy, PolicySnapshot, apply, compile, parse},
    testing::{
        Netns, ScratchCgroup, ScratchDatapath, Spawn, Spawned, TestPki, connect_nodes,
        require_root, rss_kib,
    },
    tunnel::{LogSink, Namespace, RecordSink, Tunnel, TunnelConfig, TunnelParts},
};

use common::median;

/// Rounds of the warm comparison (each path once per round per figure).
const ROUNDS: usize = 7;
/// Rounds of the cold connection rate against direct.
const COLD_ROUNDS: usize = 3;
/// How long one throughput stream sends.
const STREAM_FOR: Duration = Duration::from_secs(2);
/// Write size of the throughput stream.
const CHUNK: usize = 64 * 1024;
/// Timed request/response exchanges per latency run, after the warm-up ones.
const PINGS: usize = 5_000;
/// Untimed exchanges first.
const WARMUP_PINGS: usize = 500;
/// Size of one request and of its response.
const PING_BYTES: usize = 64;
/// How long one connection-rate run opens connections.
const CONNECT_FOR: Duration = Duration::from_secs(1);
/// Idle tunnelled connections held open for the memory figure.
const IDLE_CONNECTIONS: usize = 1_000;
const TD: &str = "bench.enforcer.local";
/// B's enrolled server (reachable only through the tunnel).
const SERVICE_PORT: u16 = 7001;
/// B's unenrolled server (the direct and stunnel baselines).
const PLAIN_PORT: u16 = 7002;
/// stunnel's server side on B's veth address, and its client side on A's loopback.
const STUNNEL_SERVER_PORT: u16 = 7443;
const STUNNEL_CLIENT_PORT: u16 = 7444;
/// Each node's outbound listener (on its loopback) and inbound listener (on its veth address).
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15008;
/// The policy file both nodes load, in the work directory.
const POLICY_FILE: &str = "policy.toml";
/// Bound on any child's answer.
const ANSWER: Duration = Duration::from_mins(1);

/// The first byte a client sends: what the server does with the connection.
const MODE_SINK: u8 = b's';
const MODE_ECHO: u8 = b'e';

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--serve") => serve(&args[1]),
        Some("--node") => node(&NodeArgs::parse(&args[1..])),
        Some("--child") => child(&args[1], &args[2]),
        Some("--hold") => hold(&args[1]),
        _ => bench(),
    }
}

/// The parent: build the testbed, measure, print the table.
fn bench() {
    require_root();
    let work = tempfile::tempdir().expect("temporary directory");
    let mut testbed = Testbed::new(work.path());
    println!(
        "tunnel benchmark: nodes {} and {} over veth; {ROUNDS} rounds, paths alternating",
        testbed.a, testbed.b
    );
    testbed.check_paths();
    let fresh = testbed.fresh;
    let warm = testbed.rss();
    let holding = testbed.rss_holding_idle_connections();
    let figures = testbed.rounds();
    let after = testbed.rss();
    let cold = testbed.cold_rounds();
    drop(testbed);
    let memory = Memory {
        fresh,
        warm,
        holding,
        after,
    };
    print!("{}", report(&figures, &cold, memory));
}

/// Both nodes and everything running on them. Fields drop in order: processes first, then
/// the datapaths, cgroups and namespaces they ran in.
struct Testbed {
    tunnel_a: Spawned,
    tunnel_b: Spawned,
    _servers: [Spawned; 2],
    _stunnels: [Spawned; 2],
    datapath_a: ScratchDatapath,
    _datapath_b: ScratchDatapath,
    web: ScratchCgroup,
    plain_client: ScratchCgroup,
    ns_a: Netns,
    a: IpAddr,
    b: IpAddr,
    exe: PathBuf,
    work: PathBuf,
    /// Node RSS right after both started.
    fresh: (u64, u64),
}

impl Testbed {
    /// Namespaces, cgroups, datapaths and policy; then servers, tunnel nodes and stunnel.
    fn new(work: &Path) -> Self {
        write_pki(&TestPki::new(TD), work);
        let ns_a = Netns::new("tun-a");
        let ns_b = Netns::new("tun-b");
        let (node_a, node_b) = connect_nodes(&ns_a, &ns_b);
        for netns in [&ns_a, &ns_b] {
            // Connection-rate runs open thousands of connections to one destination.
            netns.run(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
            netns.run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"]);
        }
        let (a, b) = (IpAddr::V4(node_a.addr4()), IpAddr::V4(node_b.addr4()));
        let scope_a = ScratchCgroup::new("tun-scope-a");
        let scope_b = ScratchCgroup::new("tun-scope-b");
        let (web, api) = (scope_a.child("web"), scope_b.child("api"));
        let datapath_a = ScratchDatapath::install_in(&scope_a, &ns_a, |_| {});
        let mut datapath_b = ScratchDatapath::install_in(&scope_b, &ns_b, |_| {});
        let compiled = install_policy(work, &web, &api, (a, b), [&datapath_a, &datapath_b]);

        let exe = std::env::current_exe().expect("current exe");
        let serve = |addr: SocketAddr, cgroup: &ScratchCgroup| {
            start(
                Spawn::new(&exe)
                    .args(["--serve", &addr.to_string()])
                    .cgroup(cgroup)
                    .netns(&ns_b),
            )
        };
        let service = SocketAddr::new(b, SERVICE_PORT);
        let servers = [
            serve(service, &api),
            serve(SocketAddr::new(b, PLAIN_PORT), &scope_b.child("plain")),
        ];
        // The kernel recorded the server's listening socket; give its owner the identity.
        let api_number = compiled.numbers.get(&id("api")).expect("api has a number");
        let maps = datapath_b.maps_mut();
        let generation = maps.generation(servers[0].pid()).expect("generation");
        maps.set_identity(servers[0].pid(), api_number, generation)
            .expect("set the server's identity");

        let stunnels = start_stunnels(work, (&ns_a, &ns_b), b);
        let warm_age = TunnelConfig::default().pool_max_age;
        let mut testbed = Self {
            tunnel_a: start_node(&exe, &node_args(work, "a", &ns_a, &datapath_a, a, warm_age)),
            tunnel_b: start_node(&exe, &node_args(work, "b", &ns_b, &datapath_b, b, warm_age)),
            _servers: servers,
            _stunnels: stunnels,
            datapath_a,
            _datapath_b: datapath_b,
            web,
            plain_client: scope_a.child("plain"),
            ns_a,
            a,
            b,
            exe,
            work: work.to_owned(),
            fresh: (0, 0),
        };
        testbed.fresh = testbed.rss();
        testbed
    }

    /// The three paths, in the order the figures index them.
    fn routes(&self) -> [Route<'_>; 3] {
        [
            Route {
                name: "direct",
                cgroup: &self.plain_client,
                target: SocketAddr::new(self.b, PLAIN_PORT).to_string(),
            },
            Route {
                name: "tunnel",
                cgroup: &self.web,
                target: self.service().to_string(),
            },
            Route {
                name: "stunnel",
                cgroup: &self.plain_client,
                target: format!("127.0.0.1:{STUNNEL_CLIENT_PORT}"),
            },
        ]
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::new(self.b, SERVICE_PORT)
    }

    /// Runs a `--child` in A, in `cgroup`, and returns its answer line.
    fn child(&self, cgroup: &ScratchCgroup, mode: &str, target: &str) -> String {
        let child = Spawn::new(&self.exe)
            .args(["--child", mode, target])
            .cgroup(cgroup)
            .netns(&self.ns_a)
            .spawn();
        child.read_line(ANSWER).unwrap_or_else(|| {
            panic!(
                "child {mode} {target} gave no answer; stderr:\n{}",
                child.stderr()
            )
        })
    }

    /// The nodes' RSS in KiB (A, B).
    fn rss(&self) -> (u64, u64) {
        (rss_kib(self.tunnel_a.pid()), rss_kib(self.tunnel_b.pid()))
    }

    /// Plaintext that bypasses the tunnel must be dropped, and every path must echo.
    fn check_paths(&self) {
        let bypass = self.child(&self.plain_client, "bypass", &self.service().to_string());
        println!("plaintext from A straight to B's enrolled server: {bypass}");
        assert_eq!(bypass, "dropped", "the ingress rule must drop the bypass");
        for route in &self.routes() {
            let answer = self.child(route.cgroup, "probe", &route.target);
            println!("{} path to {}: {answer}", route.name, route.target);
        }
    }

    /// The nodes' RSS while [`IDLE_CONNECTIONS`] idle tunnelled connections are open.
    fn rss_holding_idle_connections(&self) -> (u64, u64) {
        let hold = Spawn::new(&self.exe)
            .args(["--hold", &self.service().to_string()])
            .cgroup(&self.web)
            .netns(&self.ns_a)
            .spawn();
        let opened = hold
            .read_line(ANSWER)
            .unwrap_or_else(|| panic!("the holder opened nothing; stderr:\n{}", hold.stderr()));
        assert_eq!(opened, "open", "holder: {}", hold.stderr());
        thread::sleep(Duration::from_secs(1));
        self.rss()
    }

    /// [`ROUNDS`] rounds; in each, every figure for every path, paths alternating.
    fn rounds(&self) -> Figures {
        let routes = self.routes();
        let mut figures = Figures::default();
        for _ in 0..ROUNDS {
            for (index, route) in routes.iter().enumerate() {
                let answer = self.child(route.cgroup, "stream", &route.target);
                figures.stream[index].push(parse_rate(&answer));
            }
            for (index, route) in routes.iter().enumerate() {
                let answer = self.child(route.cgroup, "ping", &route.target);
                let (p50, p99) = parse_latency(&answer);
                figures.p50[index].push(p50);
                figures.p99[index].push(p99);
            }
            for (index, route) in routes.iter().enumerate() {
                let answer = self.child(route.cgroup, "connect", &route.target);
                figures.connect[index].push(parse_rate(&answer));
            }
        }
        figures
    }

    /// Restarts node A with the pool disabled (every flow dials its own TLS connection),
    /// then measures connection rates: (cold tunnel, direct) per round.
    fn cold_rounds(&mut self) -> Cold {
        let args = node_args(
            &self.work,
            "a",
            &self.ns_a,
            &self.datapath_a,
            self.a,
            Duration::ZERO,
        );
        self.tunnel_a.kill();
        self.tunnel_a = start_node(&self.exe, &args);
        let [direct, tunnel, _] = self.routes();
        let mut cold = Cold::default();
        for _ in 0..COLD_ROUNDS {
            let answer = self.child(direct.cgroup, "connect", &direct.target);
            cold.direct.push(parse_rate(&answer));
            let answer = self.child(tunnel.cgroup, "connect", &tunnel.target);
            cold.tunnel.push(parse_rate(&answer));
        }
        cold
    }
}

/// Writes the policy both nodes load and applies it to both datapaths; returns its
/// compilation.
fn install_policy(
    work: &Path,
    web: &ScratchCgroup,
    api: &ScratchCgroup,
    (a, b): (IpAddr, IpAddr),
    datapaths: [&ScratchDatapath; 2],
) -> Compiled {
    let mount = cgroup2_mount().expect("cgroup2 mount");
    let relative = |cgroup: &ScratchCgroup| {
        cgroup_relative_path(&mount, cgroup.path()).expect("scratch cgroup below the mount")
    };
    let text = policy_text(&relative(web), &relative(api), a, b);
    fs::write(work.join(POLICY_FILE), &text).expect("write the policy");
    let policy = parse_policy(&text);
    let compiled = compile(&policy, None, 1);
    for datapath in datapaths {
        let mut maps = Maps::open(&datapath.pin_dir().join("maps")).expect("open maps");
        apply(&mut maps, &policy, &compiled, &mount).expect("apply the policy");
    }
    compiled
}

/// What node `name` (in `netns`, with `datapath`, inbound on `ip`) is started with.
fn node_args(
    work: &Path,
    name: &str,
    netns: &Netns,
    datapath: &ScratchDatapath,
    ip: IpAddr,
    pool_max_age: Duration,
) -> NodeArgs {
    NodeArgs {
        name: name.to_owned(),
        netns: netns.name().to_owned(),
        pins: datapath.pin_dir().to_owned(),
        policy: work.join(POLICY_FILE),
        pki: work.to_owned(),
        inbound: SocketAddr::new(ip, INBOUND_PORT),
        pool_max_age,
    }
}

/// stunnel's server end in B (in front of the unenrolled server) and client end in A.
fn start_stunnels(work: &Path, (ns_a, ns_b): (&Netns, &Netns), b: IpAddr) -> [Spawned; 2] {
    let server = SocketAddr::new(b, STUNNEL_SERVER_PORT);
    [
        start_stunnel(
            ns_b,
            work,
            "server",
            &[
                "client = no",
                &format!("accept = {server}"),
                &format!("connect = {}", SocketAddr::new(b, PLAIN_PORT)),
                "requireCert = yes",
            ],
        ),
        start_stunnel(
            ns_a,
            work,
            "client",
            &[
                "client = yes",
                &format!("accept = 127.0.0.1:{STUNNEL_CLIENT_PORT}"),
                &format!("connect = {server}"),
            ],
        ),
    ]
}

/// One way from a client in A to a server in B.
struct Route<'a> {
    name: &'static str,
    cgroup: &'a ScratchCgroup,
    target: String,
}

/// Per-round figures, indexed like the paths (direct, tunnel, stunnel).
#[derive(Default)]
struct Figures {
    stream: [Vec<f64>; 3],
    p50: [Vec<f64>; 3],
    p99: [Vec<f64>; 3],
    connect: [Vec<f64>; 3],
}

/// Connection rates per round with node A's pool disabled.
#[derive(Default)]
struct Cold {
    tunnel: Vec<f64>,
    direct: Vec<f64>,
}

/// Node RSS in KiB (node A, node B) at four moments.
#[derive(Clone, Copy)]
struct Memory {
    fresh: (u64, u64),
    warm: (u64, u64),
    holding: (u64, u64),
    after: (u64, u64),
}

const DIRECT: usize = 0;
const TUNNEL: usize = 1;
const STUNNEL: usize = 2;

/// The table the README quotes, then the per-round figures behind its medians.
fn report(figures: &Figures, cold: &Cold, memory: Memory) -> String {
    let mut rows = traffic_rows(figures, cold);
    rows.extend(memory_rows(memory));
    let mut out = String::from("\n| `cargo xtask bench tunnel` | figure |\n|---|---|\n");
    for row in rows {
        let _ = writeln!(out, "| {row} |");
    }
    let rounds = |values: &[Vec<f64>; 3], f: fn(f64, f64) -> f64| {
        let each: Vec<String> = values[TUNNEL]
            .iter()
            .zip(&values[DIRECT])
            .map(|(&x, &y)| format!("{:.2}", f(x, y)))
            .collect();
        each.join(" ")
    };
    let _ = writeln!(out, "\nper round, tunnel against direct:");
    let _ = writeln!(
        out,
        "  throughput ratio  {}",
        rounds(&figures.stream, ratio)
    );
    let _ = writeln!(out, "  added p50 (µs)    {}", rounds(&figures.p50, minus));
    let _ = writeln!(out, "  added p99 (µs)    {}", rounds(&figures.p99, minus));
    let _ = writeln!(
        out,
        "  connection ratio  {}",
        rounds(&figures.connect, ratio)
    );
    out
}

/// Table rows for throughput, latency and connection rates.
fn traffic_rows(figures: &Figures, cold: &Cold) -> Vec<String> {
    let stream = medians(&figures.stream).map(|bytes| bytes * 8.0 / 1e9);
    let vs_direct = per_round(&figures.stream, TUNNEL, DIRECT, ratio);
    let vs_stunnel = per_round(&figures.stream, TUNNEL, STUNNEL, ratio);
    let (p50, p99) = (medians(&figures.p50), medians(&figures.p99));
    let added50 = per_round(&figures.p50, TUNNEL, DIRECT, minus);
    let added99 = per_round(&figures.p99, TUNNEL, DIRECT, minus);
    let connect = medians(&figures.connect);
    let connect_ratio = per_round(&figures.connect, TUNNEL, DIRECT, ratio);
    let cold_ratios: Vec<f64> = cold
        .tunnel
        .iter()
        .zip(&cold.direct)
        .map(|(&x, &y)| x / y)
        .collect();
    vec![
        format!(
            "single-stream throughput, tunnel / direct | {:.2} / {:.2} Gbit/s: **ratio {vs_direct:.2}** (target >= 0.45) {}",
            stream[TUNNEL],
            stream[DIRECT],
            verdict(vs_direct >= 0.45)
        ),
        format!(
            "single-stream throughput, tunnel / stunnel4 mTLS | {:.2} / {:.2} Gbit/s: **ratio {vs_stunnel:.2}** (target >= 1.5) {}",
            stream[TUNNEL],
            stream[STUNNEL],
            verdict(vs_stunnel >= 1.5)
        ),
        format!(
            "request/response p50, tunnel / direct / stunnel4 | {:.1} / {:.1} / {:.1} µs: **added {added50:.1} µs** (target <= 20) {}",
            p50[TUNNEL],
            p50[DIRECT],
            p50[STUNNEL],
            verdict(added50 <= 20.0)
        ),
        format!(
            "request/response p99, tunnel / direct / stunnel4 | {:.1} / {:.1} / {:.1} µs: **added {added99:.1} µs** (target <= 60) {}",
            p99[TUNNEL],
            p99[DIRECT],
            p99[STUNNEL],
            verdict(added99 <= 60.0)
        ),
        format!(
            "request/response p50 added by stunnel4 | {:.1} µs",
            per_round(&figures.p50, STUNNEL, DIRECT, minus)
        ),
        format!(
            "new connections/s (connect + 16-byte exchange + close), warm pool / direct | {:.0} / {:.0}: **ratio {connect_ratio:.2}** (target >= 0.5) {}",
            connect[TUNNEL],
            connect[DIRECT],
            verdict(connect_ratio >= 0.5)
        ),
        format!(
            "new connections/s, stunnel4 (a TLS handshake each) | {:.0}",
            connect[STUNNEL]
        ),
        format!(
            "new connections/s, cold mTLS (pool disabled) / direct | {:.0} / {:.0}: ratio {:.2}",
            median(&cold.tunnel),
            median(&cold.direct),
            median(&cold_ratios)
        ),
    ]
}

/// Table rows for the nodes' memory.
fn memory_rows(memory: Memory) -> Vec<String> {
    let mib = |kib: u64| to_f64(kib) / 1024.0;
    let per_thousand = |holding: u64, warm: u64| {
        mib(holding.saturating_sub(warm)) * 1000.0 / to_f64(IDLE_CONNECTIONS as u64)
    };
    let thousand = (
        per_thousand(memory.holding.0, memory.warm.0),
        per_thousand(memory.holding.1, memory.warm.1),
    );
    let idle = mib(memory.warm.0.max(memory.warm.1));
    vec![
        format!(
            "node RSS idle, after one flow, node A / node B | {:.1} / {:.1} MB (target <= 15) {}",
            mib(memory.warm.0),
            mib(memory.warm.1),
            verdict(idle <= 15.0)
        ),
        format!(
            "node RSS per 1,000 idle tunnelled connections, node A / node B | {:.1} / {:.1} MB (target <= 8) {}",
            thousand.0,
            thousand.1,
            verdict(thousand.0.max(thousand.1) <= 8.0)
        ),
        format!(
            "node RSS at start / after the whole run, node A / node B | {:.1} / {:.1} MB, {:.1} / {:.1} MB",
            mib(memory.fresh.0),
            mib(memory.fresh.1),
            mib(memory.after.0),
            mib(memory.after.1)
        ),
    ]
}

/// The median over rounds of `f(path of, path to)`.
fn per_round(values: &[Vec<f64>; 3], of: usize, to: usize, f: fn(f64, f64) -> f64) -> f64 {
    let each: Vec<f64> = values[of]
        .iter()
        .zip(&values[to])
        .map(|(&x, &y)| f(x, y))
        .collect();
    median(&each)
}

/// The median of each path's figures.
fn medians(values: &[Vec<f64>; 3]) -> [f64; 3] {
    values.each_ref().map(|each| median(each))
}

fn ratio(x: f64, y: f64) -> f64 {
    x / y
}

fn minus(x: f64, y: f64) -> f64 {
    x - y
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// The policy both nodes load: `web` (in A) may reach `api` (in B) on the service port.
fn policy_text(web: &str, api: &str, a: IpAddr, b: IpAddr) -> String {
    let mut text = format!("trust_domain = \"{TD}\"\nenroll = [\"{web}\", \"{api}\"]\n");
    for (name, cgroup) in [("web", web), ("api", api)] {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://{TD}/{name}\"\nselectors = [\"cgroup:path:{cgroup}\"]\n"
        );
    }
    let _ = write!(
        text,
        "[[allow]]\nfrom = \"spiffe://{TD}/web\"\nto = \"spiffe://{TD}/api\"\nports = [{SERVICE_PORT}]\n"
    );
    for peer in [a, b] {
        let _ = write!(
            text,
            "[[peer]]\naddress = \"{peer}\"\nport = {INBOUND_PORT}\n"
        );
    }
    text
}

fn parse_policy(text: &str) -> Policy {
    parse("policy.toml", text.as_bytes())
        .unwrap_or_else(|diagnostics| panic!("invalid bench policy: {diagnostics:?}"))
        .0
}

fn id(name: &str) -> SpiffeId {
    format!("spiffe://{TD}/{name}").parse().expect("SPIFFE ID")
}

/// Writes the trust bundle, a CA per node, and SVIDs for the stunnel ends (`client` as
/// `web` from node A's CA, `server` as `api` from node B's).
fn write_pki(pki: &TestPki, dir: &Path) {
    let now = SystemTime::now();
    fs::write(dir.join("bundle.pem"), pki.bundles.to_pem()).expect("write the bundle");
    for (node, end, workload) in [("a", "client", "web"), ("b", "server", "api")] {
        let ca = pki.node_ca_at(node, now);
        ca.write(dir, &format!("node-{node}"))
            .expect("write a node CA");
        let svid = ca
            .issue_svid(&id(workload), Duration::from_hours(1), now)
            .expect("issue an SVID");
        fs::write(dir.join(format!("{end}.pem")), svid.chain_pem()).expect("write a chain");
        fs::write(dir.join(format!("{end}.key")), svid.key_pem()).expect("write a key");
    }
}

/// Starts `spawn` and waits for its `ready` line.
fn start(spawn: Spawn) -> Spawned {
    let spawned = spawn.spawn();
    match spawned.read_line(ANSWER) {
        Some(line) if line == "ready" => spawned,
        line => panic!(
            "expected `ready`, got {line:?}; stderr:\n{}",
            spawned.stderr()
        ),
    }
}

/// Starts a node process. It is not started inside its namespace (`ip netns exec` would
/// give it a `/sys` without the bpffs holding the pins): it enters the namespace itself.
fn start_node(exe: &Path, args: &NodeArgs) -> Spawned {
    start(Spawn::new(exe).arg("--node").args(args.to_args()))
}

/// Starts `stunnel4` in `netns` as the `end` (`client` or `server`) of the mTLS path, with
/// that end's SVID; `service` lines complete its service section.
fn start_stunnel(netns: &Netns, dir: &Path, end: &str, service: &[&str]) -> Spawned {
    let path = dir.join(format!("stunnel-{end}.conf"));
    let mut config = String::from("foreground = yes\npid =\ndebug = 3\n[bench]\n");
    for line in [
        format!("cert = {}", dir.join(format!("{end}.pem")).display()),
        format!("key = {}", dir.join(format!("{end}.key")).display()),
        format!("CAfile = {}", dir.join("bundle.pem").display()),
        "verifyChain = yes".to_owned(),
        "sslVersionMin = TLSv1.3".to_owned(),
        "socket = l:TCP_NODELAY=1".to_owned(),
        "socket = r:TCP_NODELAY=1".to_owned(),
    ]
    .iter()
    .map(String::as_str)
    .chain(service.iter().copied())
    {
        config.push_str(line);
        config.push('\n');
    }
    fs::write(&path, config).expect("write the stunnel configuration");
    Spawn::new("stunnel4").arg(&path).netns(netns).spawn()
}

fn parse_rate(answer: &str) -> f64 {
    answer
        .strip_prefix("rate ")
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("bad rate answer {answer:?}"))
}

fn parse_latency(answer: &str) -> (f64, f64) {
    let mut words = answer.split_whitespace();
    let mut field = |name: &str| {
        (words.next() == Some(name))
            .then(|| words.next()?.parse().ok())
            .flatten()
            .unwrap_or_else(|| panic!("bad latency answer {answer:?}"))
    };
    (field("p50"), field("p99"))
}

/// A client run, printing one answer line:
/// - `bypass`: whether a plain connection to `target` is dropped (`dropped`) or not (`open`);
/// - `probe`: one echo exchange, retried for a few seconds while the path comes up (`ok`);
/// - `stream`: one stream sent for [`STREAM_FOR`] (`rate <bytes/s>` the server received);
/// - `ping`: request/response on one connection (`p50 <µs> p99 <µs>`);
/// - `connect`: connect + 16-byte exchange + close for [`CONNECT_FOR`] (`rate <per s>`).
fn child(mode: &str, target: &str) {
    let target: SocketAddr = target.parse().expect("target address");
    let answer = match mode {
        "bypass" => match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(_) => "open".to_owned(),
            Err(_) => "dropped".to_owned(),
        },
        "probe" => probe(target),
        "stream" => format!("rate {}", stream(target)),
        "ping" => {
            let (p50, p99) = ping(target);
            format!("p50 {p50} p99 {p99}")
        }
        "connect" => format!("rate {}", connect_rate(target)),
        other => panic!("unknown child mode {other}"),
    };
    println!("{answer}");
}

fn probe(target: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match exchange(target) {
            Ok(()) => return "ok".to_owned(),
            Err(error) if Instant::now() < deadline => {
                eprintln!("probe {target}: {error}; retrying");
                thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("path to {target} does not work: {error}"),
        }
    }
}

/// Connect, send the echo mode byte and 15 bytes, read them back, close.
fn exchange(target: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    let mut message = [b'x'; 16];
    message[0] = MODE_ECHO;
    stream.write_all(&message)?;
    let mut reply = [0u8; 15];
    stream.read_exact(&mut reply)?;
    if reply == message[1..] {
        Ok(())
    } else {
        Err(io::Error::other("echo mismatch"))
    }
}

/// Bytes per second the server received from one stream.
fn stream(target: SocketAddr) -> f64 {
    let mut stream = TcpStream::connect(target).expect("connect");
    stream.write_all(&[MODE_SINK]).expect("mode");
    let chunk = vec![0x5a_u8; CHUNK];
    let start = Instant::now();
    while start.elapsed() < STREAM_FOR {
        stream.write_all(&chunk).expect("send");
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).expect("read the count");
    to_f64(u64::from_le_bytes(count)) / start.elapsed().as_secs_f64()
}

/// p50 and p99 of request/response round trips on one connection, in µs.
fn ping(target: SocketAddr) -> (f64, f64) {
    let mut stream = TcpStream::connect(target).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(&[MODE_ECHO]).expect("mode");
    let request = [0x5a_u8; PING_BYTES];
    let mut reply = [0u8; PING_BYTES];
    let mut samples = Vec::with_capacity(PINGS);
    for index in 0..WARMUP_PINGS + PINGS {
        let start = Instant::now();
        stream.write_all(&request).expect("send");
        stream.read_exact(&mut reply).expect("receive");
        if index >= WARMUP_PINGS {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

/// Connections per second, each a connect, a 16-byte exchange and a close.
fn connect_rate(target: SocketAddr) -> f64 {
    let start = Instant::now();
    let mut count = 0u32;
    while start.elapsed() < CONNECT_FOR {
        exchange(target).expect("exchange");
        count += 1;
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

/// Opens [`IDLE_CONNECTIONS`] connections to `target`, one echo exchange each, prints `open`
/// and keeps them until killed.
fn hold(target: &str) {
    let target: SocketAddr = target.parse().expect("target address");
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(target).expect("connect");
        let mut message = [b'x'; 16];
        message[0] = MODE_ECHO;
        stream.write_all(&message).expect("send");
        let mut reply = [0u8; 15];
        stream.read_exact(&mut reply).expect("receive");
        held.push(stream);
    }
    println!("open");
    // Bounded: the parent kills this process long before.
    thread::sleep(ANSWER);
}

/// The server: on `addr`, prints `ready`, then serves each connection on its own thread by
/// its first byte: [`MODE_SINK`] reads to the end and answers the byte count (little-endian
/// u64); [`MODE_ECHO`] echoes until the end.
fn serve(addr: &str) {
    let listener = TcpListener::bind(addr).expect("bind");
    println!("ready");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            let _ = handle(stream);
        });
    }
}

fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    let mut buffer = vec![0u8; CHUNK];
    match mode[0] {
        MODE_SINK => {
            let mut total = 0u64;
            loop {
                match stream.read(&mut buffer)? {
                    0 => break,
                    read => total += read as u64,
                }
            }
            stream.write_all(&total.to_le_bytes())
        }
        MODE_ECHO => loop {
            match stream.read(&mut buffer)? {
                0 => return Ok(()),
                read => stream.write_all(&buffer[..read])?,
            }
        },
        _ => Ok(()),
    }
}

/// What a `--node` process is given.
struct NodeArgs {
    /// `a` or `b`: names the node's CA (`node-<name>` in `pki`) and its SPIFFE ID.
    name: String,
    /// The network namespace the node enters (an `ip netns` name).
    netns: String,
    /// The node's datapath pin directory.
    pins: PathBuf,
    /// The policy file.
    policy: PathBuf,
    /// Where the bundle and the node CAs are.
    pki: PathBuf,
    /// The inbound listener's address (the outbound one is `127.0.0.1:OUTBOUND_PORT`).
    inbound: SocketAddr,
    /// The pool's `pool_max_age` (zero disables pooling).
    pool_max_age: Duration,
}

impl NodeArgs {
    fn to_args(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.netns.clone(),
            self.pins.display().to_string(),
            self.policy.display().to_string(),
            self.pki.display().to_string(),
            self.inbound.to_string(),
            self.pool_max_age.as_millis().to_string(),
        ]
    }

    fn parse(args: &[String]) -> Self {
        let [name, netns, pins, policy, pki, inbound, max_age] = args else {
            panic!("--node needs NAME NETNS PINS POLICY PKI INBOUND POOL_MAX_AGE_MS, got {args:?}");
        };
        Self {
            name: name.clone(),
            netns: netns.clone(),
            pins: pins.into(),
            policy: policy.into(),
            pki: pki.into(),
            inbound: inbound.parse().expect("inbound address"),
            pool_max_age: Duration::from_millis(max_age.parse().expect("pool max age")),
        }
    }
}

/// A tunnel node as the daemon would run it: the pinned maps for redirect records and
/// services, attestation of redirected clients against the policy's workload entries, SVIDs
/// from the node's CA, flow records to the log. Opens the pinned maps, enters its network
/// namespace, sets the datapath's daemon config to its own pid and outbound listener, prints
/// `ready`, and serves until killed.
fn node(args: &NodeArgs) {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let text = fs::read_to_string(&args.policy).expect("read the policy");
    let policy = PolicySnapshot::fixed(InForce::compile(
        args.policy.display().to_string(),
        text.as_str(),
        parse_policy(&text),
        None,
        1,
    ));
    let node_ca = CertificateAuthority::load(&args.pki, &format!("node-{}", args.name))
        .expect("load the node CA");
    let bundle_path = args.pki.join("bundle.pem");
    let bundles = TrustBundleSet::from_pem(
        &fs::read_to_string(&bundle_path).expect("read the bundle"),
        &bundle_path.display().to_string(),
    )
    .expect("parse the bundle");
    let mut maps = Maps::open(&args.pins.join("maps")).expect("open the pinned maps");
    let tags = SocketTags::open(&args.pins.join("maps")).expect("open the socket tags");
    enter_netns(&args.netns);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let outbound = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND_PORT))
            .await
            .expect("bind the outbound listener");
        let inbound = tokio::net::TcpListener::bind(args.inbound)
            .await
            .expect("bind the inbound listener");
        maps.set_listener(ListenerSlot::Outbound4, outbound.as_fd())
            .expect("register the outbound listener");
        maps.set_listener(ListenerSlot::Inbound4, inbound.as_fd())
            .expect("register the inbound listener");
        maps.set_config(&DaemonConfig {
            outbound_v4: Some(Ipv4Addr::LOCALHOST),
            outbound_v6: None,
            outbound_port: OUTBOUND_PORT,
            inbound_port: args.inbound.port(),
            netns_cookie: netns_cookie(inbound.as_fd()).expect("read the namespace cookie"),
            kernel_flows: false,
        })
        .expect("set the daemon config");
        let home = enforcer::kernel::Netns::current().expect("open the node's namespace");
        let local = [(args.inbound.ip(), home.cookie())];
        maps.replace_local_addrs(&local)
            .and_then(|()| maps.replace_served(&[home.cookie()]))
            .expect("set the node's address");
        let namespaces = Arc::new(Namespaces::new(home));
        namespaces.set_addrs(local);
        let sources = Arc::new(KernelSources::new(
            Arc::new(Mutex::new(maps)),
            tags,
            Arc::new(Attestor::new(AttestOptions::default())),
            policy.clone(),
            (namespaces, OUTBOUND_PORT),
        ));
        let tunnel = Tunnel::new(TunnelParts {
            config: TunnelConfig {
                pool_max_age: args.pool_max_age,
                ..TunnelConfig::default()
            },
            node_id: format!("spiffe://{TD}/enforcer/node/{}", args.name)
                .parse()
                .expect("node ID"),
            bundles: Arc::new(bundles),
            svids: Arc::new(SvidCache::new(SystemClock, node_ca, CacheConfig::default())),
            workloads: Arc::clone(&sources) as _,
            origins: Arc::clone(&sources) as _,
            records: Arc::new(LogSink) as Arc<dyn RecordSink>,
            tags: sources,
            policy,
        })
        .expect("build the tunnel");
        let _outbound = tunnel.serve_outbound(outbound, Namespace::HOME);
        let _inbound = tunnel.serve_inbound(inbound, Namespace::HOME);
        println!("ready");
        std::future::pending::<()>().await;
    });
}

/// Moves this thread, before it starts any other, into the network namespace `name`; threads
/// started later inherit it.
fn enter_netns(name: &str) {
    let path = Path::new("/run/netns").join(name);
    let netns = fs::File::open(&path)
        .unwrap_or_else(|error| panic!("failed to open {}: {error}", path.display()));
    rustix::thread::move_into_link_name_space(
        netns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|error| panic!("failed to enter {}: {error}", path.display()));
}

#[expect(clippy::cast_precision_loss, reason = "figures for display")]
fn to_f64(value: u64) -> f64 {
    value as f64
}

//! `cargo xtask bench tunnel`: what the mTLS tunnel costs between two nodes, and on one.
//!
//! Two network namespaces joined by a veth link are the nodes A (client side) and B (server
//! side). Each node has its own datapath, attached to a scope cgroup this program creates, and
//! its own tunnel node process (this binary re-executed with `--node`, so its RSS and CPU time
//! are the node's alone) reading the pinned maps through `KernelSources`. Three paths from a
//! client in A to a server in B, alternated round by round:
//! - `direct`: an unenrolled client to an unenrolled server, plain TCP over the veth;
//! - `tunnel`: an enrolled client's `connect()` to B's enrolled server is redirected by the
//!   kernel into A's outbound listener, carried over TLS 1.3 mTLS and HTTP/2 CONNECT to B's
//!   inbound listener, which connects to the server with a hop tagged for the server's identity
//!   (the server's ingress rule drops plaintext that bypasses the tunnel, checked first);
//! - `stunnel`: `stunnel4` in A and in B doing mTLS with SVIDs of the same test PKI
//!   (`verifyChain`, `requireCert`, TLS 1.3 only), in front of the unenrolled server.
//!
//! And paths between two workloads of node B ([`Testbed::local_routes`], in the same rounds):
//! - `direct`: an unenrolled client to the unenrolled server;
//! - `proxied`: a client in B's enrolled scope, given its identity number in B's kernel maps as
//!   the daemon's registrar does, to B's enrolled server: its `connect()` is redirected into
//!   B's outbound listener, which carries it to the server with a hop (the tunnel's same-node
//!   route, and the fallback of any shortcut the kernel takes).
//!
//! Figures: single-stream throughput; request/response latency on one persistent connection,
//! each run twice: as the processes fall, and with the client, the server, both nodes and
//! stunnel4 pinned to one CPU (on a small VM a wake-up across CPUs costs tens of µs, so the
//! unpinned figure is bimodal: the pinned one measures the code); the CPU time the nodes (and
//! stunnel4's two processes) spend per round trip; new-connection rates (warm pool, then a
//! node with the pool disabled: cold mTLS); the nodes' RSS idle and with 1,000 idle tunnelled
//! connections. Prints medians, with the range over the rounds in brackets, and medians of
//! per-round ratios against the targets; asserts no timing, only that the setup is what it
//! claims (plaintext that bypasses the tunnel is dropped, every path echoes, and a path is
//! redirected into its node's outbound listener exactly when it says so). Needs root.
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
    io::{self, BufRead as _, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant, SystemTime},
};

use enforcer::{
    attest::{AttestOptions, Attestor, cgroup_relative_path},
    daemon::{KernelSources, Namespaces},
    identity::{
        CacheConfig, CertificateAuthority, SpiffeId, SvidCache, SystemClock, TrustBundleSet,
    },
    kernel::{Counter, DaemonConfig, ListenerSlot, Maps, SocketTags, cgroup2_mount, netns_cookie},
    policy::{Compiled, InForce, Policy, PolicySnapshot, apply, compile, parse},
    testing::{
        Netns, ScratchCgroup, ScratchDatapath, Spawn, Spawned, TestPki, connect_nodes, cpu_time,
        require_root, rss_kib, set_affinity,
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
/// The CPU every process of a pinned request/response run is pinned to.
const PIN_CPU: usize = 0;
/// How long one connection-rate run opens connections.
const CONNECT_FOR: Duration = Duration::from_secs(1);
/// Idle tunnelled connections held open for the memory figure.
const IDLE_CONNECTIONS: usize = 1_000;
const TD: &str = "bench.enforcer.local";
/// B's enrolled server (reachable only through the tunnel or B's outbound listener).
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

/// What a child prints when it is placed and waits for [`GO`]; a `ping` child prints [`WARM`]
/// after its warm-up exchanges and waits for [`GO`] again before the timed ones.
const READY: &str = "ready";
const WARM: &str = "warm";
const GO: &str = "go";

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
    let started = Instant::now();
    let work = tempfile::tempdir().expect("temporary directory");
    let mut testbed = Testbed::new(work.path());
    println!(
        "tunnel benchmark: nodes {} and {} over veth; {ROUNDS} rounds, paths alternating; \
         pinned runs on CPU {PIN_CPU}",
        testbed.a, testbed.b
    );
    testbed.check_paths();
    let fresh = testbed.fresh;
    let warm = testbed.rss();
    let holding = testbed.rss_holding_idle_connections();
    let (across, local) = testbed.rounds();
    let after = testbed.rss();
    let cold = testbed.cold_rounds();
    drop(testbed);
    let memory = Memory {
        fresh,
        warm,
        holding,
        after,
    };
    print!("{}", report(&across, &local, &cold, memory));
    println!("\nbench run time: {:.0} s", started.elapsed().as_secs_f64());
}

/// The node a client runs on.
#[derive(Clone, Copy, Debug)]
enum On {
    A,
    B,
}

/// Both nodes and everything running on them. Fields drop in order: processes first, then
/// the maps, datapaths, cgroups and namespaces they ran in.
struct Testbed {
    tunnel_a: Spawned,
    tunnel_b: Spawned,
    /// B's enrolled server, then its unenrolled one.
    servers: [Spawned; 2],
    /// stunnel's server end (in B), then its client end (in A).
    stunnels: [Spawned; 2],
    /// Node B's maps: clients' identities, and B's daemon config as a path needs it.
    maps_b: Mutex<Maps>,
    datapath_a: ScratchDatapath,
    datapath_b: ScratchDatapath,
    /// A's enrolled client cgroup, and its unenrolled one.
    web: ScratchCgroup,
    plain_client: ScratchCgroup,
    /// B's enrolled client cgroup (beside the server's), and its unenrolled one (the
    /// unenrolled server's, and the same-node direct client's).
    local: ScratchCgroup,
    plain_b: ScratchCgroup,
    /// The identity number of B's enrolled client.
    local_number: u32,
    ns_a: Netns,
    ns_b: Netns,
    /// Node B's namespace cookie (its daemon config names it).
    cookie_b: u64,
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
        let (web, api, local) = (
            scope_a.child("web"),
            scope_b.child("api"),
            scope_b.child("local"),
        );
        let plain_b = scope_b.child("plain");
        let datapath_a = ScratchDatapath::install_in(&scope_a, &ns_a, |_| {});
        let datapath_b = ScratchDatapath::install_in(&scope_b, &ns_b, |_| {});
        let workloads = [("web", &web), ("api", &api), ("local", &local)];
        let compiled = install_policy(work, &workloads, (a, b), [&datapath_a, &datapath_b]);
        let number = |name: &str| {
            compiled
                .numbers
                .get(&id(name))
                .unwrap_or_else(|| panic!("{name} has no identity number"))
        };
        let mut maps_b = Maps::open(&datapath_b.pin_dir().join("maps")).expect("open B's maps");

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
            serve(SocketAddr::new(b, PLAIN_PORT), &plain_b),
        ];
        // The kernel recorded the server's listening socket; give its owner the identity.
        stamp(&mut maps_b, servers[0].pid(), number("api"));

        let stunnels = start_stunnels(work, (&ns_a, &ns_b), b);
        let warm_age = TunnelConfig::default().pool_max_age;
        let cookie_b = datapath_b.netns_cookie();
        let mut testbed = Self {
            tunnel_a: start_node(&exe, &node_args(work, "a", &ns_a, &datapath_a, a, warm_age)),
            tunnel_b: start_node(&exe, &node_args(work, "b", &ns_b, &datapath_b, b, warm_age)),
            servers,
            stunnels,
            maps_b: Mutex::new(maps_b),
            datapath_a,
            datapath_b,
            web,
            plain_client: scope_a.child("plain"),
            local,
            plain_b,
            local_number: number("local"),
            ns_a,
            ns_b,
            cookie_b,
            a,
            b,
            exe,
            work: work.to_owned(),
            fresh: (0, 0),
        };
        // What the parent writes as B's base config is what node B wrote for itself.
        let written = testbed.maps_b().config().expect("read B's config");
        testbed.configure_b(base_config);
        let rewritten = testbed.maps_b().config().expect("read B's config");
        assert_eq!(
            rewritten, written,
            "the bench's base config for B is node B's own"
        );
        testbed.fresh = testbed.rss();
        testbed
    }

    /// The three paths from A to B, in the order the figures index them ([`DIRECT`],
    /// [`TUNNEL`], [`STUNNEL`]).
    fn routes(&self) -> [Route<'_>; 3] {
        [
            Route::new("direct", On::A, &self.plain_client, self.plain_target()),
            Route {
                redirected: true,
                carriers: vec![
                    ("node A", self.tunnel_a.pid()),
                    ("node B", self.tunnel_b.pid()),
                ],
                ..Route::new("tunnel", On::A, &self.web, self.service())
            },
            Route {
                carriers: vec![
                    ("stunnel4 client", self.stunnels[1].pid()),
                    ("stunnel4 server", self.stunnels[0].pid()),
                ],
                ..Route::new(
                    "stunnel4",
                    On::A,
                    &self.plain_client,
                    SocketAddr::from((Ipv4Addr::LOCALHOST, STUNNEL_CLIENT_PORT)),
                )
            },
        ]
    }

    /// The paths between two workloads of node B, `direct` first (the one the others are
    /// compared with): `proxied` through B's outbound listener and hop (B's base config, kernel
    /// flows off: the fallback), and `kernel`, the same pair with kernel flows switched on in
    /// B's config for its runs only: direct, authorized in the kernel.
    fn local_routes(&self) -> Vec<Route<'_>> {
        let proxied = || Route {
            known: Some(self.local_number),
            redirected: true,
            carriers: vec![("node B", self.tunnel_b.pid())],
            ..Route::new("proxied", On::B, &self.local, self.service())
        };
        vec![
            Route::new("direct", On::B, &self.plain_b, self.plain_target()),
            proxied(),
            Route {
                name: "kernel",
                config_b: |config| config.kernel_flows = true,
                redirected: false,
                ..proxied()
            },
        ]
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::new(self.b, SERVICE_PORT)
    }

    fn plain_target(&self) -> SocketAddr {
        SocketAddr::new(self.b, PLAIN_PORT)
    }

    fn netns(&self, on: On) -> &Netns {
        match on {
            On::A => &self.ns_a,
            On::B => &self.ns_b,
        }
    }

    fn datapath(&self, on: On) -> &ScratchDatapath {
        match on {
            On::A => &self.datapath_a,
            On::B => &self.datapath_b,
        }
    }

    fn maps_b(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps_b.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes node B's daemon config: the one node B writes for itself, edited by `edit`.
    fn configure_b(&self, edit: fn(&mut DaemonConfig)) {
        let mut config = daemon_config(INBOUND_PORT, self.cookie_b);
        edit(&mut config);
        self.maps_b()
            .set_config(&config)
            .expect("write B's daemon config");
    }

    /// The long-lived processes: both nodes, both servers, both stunnel4 ends.
    fn processes(&self) -> [u32; 6] {
        [
            self.tunnel_a.pid(),
            self.tunnel_b.pid(),
            self.servers[0].pid(),
            self.servers[1].pid(),
            self.stunnels[0].pid(),
            self.stunnels[1].pid(),
        ]
    }

    /// Every thread of the long-lived processes and of `child` on CPU `cpu`, or, with
    /// `None`, on every CPU again.
    fn pin(&self, child: Option<u32>, cpu: Option<usize>) {
        for pid in self.processes().into_iter().chain(child) {
            set_affinity(pid, cpu);
        }
    }

    /// Starts a `--child` in `mode` on `route` and, once it is placed: writes B's config as
    /// the route needs it, gives the client its identity number if the route says so, pins
    /// it and every long-lived process to `cpu` if given, then lets it go.
    fn start_child(&self, route: &Route<'_>, mode: &str, cpu: Option<usize>) -> Spawned {
        self.configure_b(route.config_b);
        let mut child = Spawn::new(&self.exe)
            .args(["--child", mode, &route.target.to_string()])
            .cgroup(route.cgroup)
            .netns(self.netns(route.node))
            .stdin_piped()
            .spawn();
        expect_line(&child, READY);
        if let Some(number) = route.known {
            let On::B = route.node else {
                panic!("{}: only B's clients are given identities", route.name)
            };
            stamp(&mut self.maps_b(), child.pid(), number);
        }
        if cpu.is_some() {
            self.pin(Some(child.pid()), cpu);
        }
        child.write_line(GO);
        child
    }

    /// Runs a `--child` in `mode` on `route`, unpinned, and returns its answer line.
    fn child(&self, route: &Route<'_>, mode: &str) -> String {
        let child = self.start_child(route, mode, None);
        answer(&child, &format!("{} {mode}", route.name))
    }

    /// One request/response run on `route`, with every process on [`PIN_CPU`] if `pinned`:
    /// p50 and p99 in µs, and the CPU time each of the route's carriers spent per timed round
    /// trip, in µs.
    fn ping(&self, route: &Route<'_>, pinned: bool) -> (f64, f64, Vec<f64>) {
        let cpu = pinned.then_some(PIN_CPU);
        let mut child = self.start_child(route, "ping", cpu);
        expect_line(&child, WARM);
        if pinned {
            // Threads started for the connection inherited the mask; this catches any other.
            self.pin(Some(child.pid()), cpu);
        }
        let used = || -> Vec<Duration> {
            route
                .carriers
                .iter()
                .map(|&(_, pid)| cpu_time(pid))
                .collect()
        };
        let before = used();
        child.write_line(GO);
        let line = answer(&child, &format!("{} ping", route.name));
        let after = used();
        if pinned {
            self.pin(None, None);
        }
        let (p50, p99) = parse_latency(&line);
        let per_trip = before
            .iter()
            .zip(&after)
            .map(|(before, after)| {
                after.saturating_sub(*before).as_secs_f64() * 1e6 / to_f64(PINGS as u64)
            })
            .collect();
        (p50, p99, per_trip)
    }

    /// The nodes' RSS in KiB (A, B).
    fn rss(&self) -> (u64, u64) {
        (rss_kib(self.tunnel_a.pid()), rss_kib(self.tunnel_b.pid()))
    }

    /// Plaintext that bypasses the tunnel must be dropped; every path must echo, and be
    /// redirected into its client's node's outbound listener exactly when it says so.
    fn check_paths(&self) {
        let bypass = Route::new("bypass", On::A, &self.plain_client, self.service());
        let answer = self.child(&bypass, "bypass");
        println!("plaintext from A straight to B's enrolled server: {answer}");
        assert_eq!(answer, "dropped", "the ingress rule must drop the bypass");
        let across = self.routes();
        let local = self.local_routes();
        let all = across
            .iter()
            .map(|route| ("A to B", route))
            .chain(local.iter().map(|route| ("on B", route)));
        for (group, route) in all {
            let maps = self.datapath(route.node).maps();
            let redirects = || maps.counter(Counter::Redirect).expect("redirect counter");
            let before = redirects();
            let answer = self.child(route, "probe");
            let redirected = redirects() > before;
            println!(
                "{group}, {} path to {}: {answer}, {}",
                route.name,
                route.target,
                if redirected {
                    "redirected to the outbound listener"
                } else {
                    "not redirected"
                }
            );
            assert_eq!(
                redirected, route.redirected,
                "{group}, {} path: redirected into the node's outbound listener",
                route.name
            );
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

    /// [`ROUNDS`] rounds; in each, every figure for every path, paths alternating: first the
    /// paths from A to B, then those on B. Returns the figures of each, indexed like
    /// [`routes`](Self::routes) and [`local_routes`](Self::local_routes).
    fn rounds(&self) -> (Vec<PathFigures>, Vec<PathFigures>) {
        let across = self.routes();
        let local = self.local_routes();
        let mut across_figures: Vec<PathFigures> = across.iter().map(PathFigures::new).collect();
        let mut local_figures: Vec<PathFigures> = local.iter().map(PathFigures::new).collect();
        for round in 1..=ROUNDS {
            let start = Instant::now();
            self.round(&across, &mut across_figures, true);
            self.round(&local, &mut local_figures, false);
            eprintln!(
                "round {round} of {ROUNDS}: {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
        (across_figures, local_figures)
    }

    /// One round over `routes`: throughput, request/response unpinned then pinned, and with
    /// `connect` the connection rate; each figure for every path before the next figure.
    fn round(&self, routes: &[Route<'_>], figures: &mut [PathFigures], connect: bool) {
        for (figures, route) in figures.iter_mut().zip(routes) {
            figures
                .stream
                .push(parse_rate(&self.child(route, "stream")));
        }
        for pinned in [false, true] {
            for (figures, route) in figures.iter_mut().zip(routes) {
                let (p50, p99, cpu) = self.ping(route, pinned);
                let rr = &mut figures.rr[usize::from(pinned)];
                rr.p50.push(p50);
                rr.p99.push(p99);
                for (each, used) in rr.cpu.iter_mut().zip(cpu) {
                    each.push(used);
                }
            }
        }
        if connect {
            for (figures, route) in figures.iter_mut().zip(routes) {
                figures
                    .connect
                    .push(parse_rate(&self.child(route, "connect")));
            }
        }
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
            cold.direct
                .push(parse_rate(&self.child(&direct, "connect")));
            cold.tunnel
                .push(parse_rate(&self.child(&tunnel, "connect")));
        }
        cold
    }
}

/// Gives process `pid` identity `number` in `maps` as the daemon's registrar does: for the
/// image generation read first, taken back (and the bench stopped) if the process changed
/// meanwhile.
fn stamp(maps: &mut Maps, pid: u32, number: u32) {
    let generation = maps.generation(pid).expect("read a generation");
    maps.set_identity(pid, number, generation)
        .expect("set an identity");
    if maps.generation(pid).expect("read a generation") != generation {
        maps.remove_identity(pid).expect("remove an identity");
        panic!("pid {pid} exec'd or exited while it was given its identity");
    }
    assert_eq!(
        maps.identity(pid).expect("read an identity"),
        Some(number),
        "pid {pid} holds its identity"
    );
}

/// Waits for `child` to print `expected`.
fn expect_line(child: &Spawned, expected: &str) {
    match child.read_line(ANSWER) {
        Some(line) if line == expected => {}
        line => panic!(
            "expected {expected:?}, got {line:?}; stderr:\n{}",
            child.stderr()
        ),
    }
}

/// The answer line of `child` (doing `what`).
fn answer(child: &Spawned, what: &str) -> String {
    child
        .read_line(ANSWER)
        .unwrap_or_else(|| panic!("child {what} gave no answer; stderr:\n{}", child.stderr()))
}

/// Writes the policy both nodes load and applies it to both datapaths; returns its
/// compilation. Every workload (name, cgroup) is enrolled; `web` and `local` may reach
/// `api` on the service port.
fn install_policy(
    work: &Path,
    workloads: &[(&str, &ScratchCgroup)],
    (a, b): (IpAddr, IpAddr),
    datapaths: [&ScratchDatapath; 2],
) -> Compiled {
    let mount = cgroup2_mount().expect("cgroup2 mount");
    let relative: Vec<(&str, String)> = workloads
        .iter()
        .map(|&(name, cgroup)| {
            let path = cgroup_relative_path(&mount, cgroup.path())
                .expect("scratch cgroup below the mount");
            (name, path)
        })
        .collect();
    let text = policy_text(&relative, a, b);
    fs::write(work.join(POLICY_FILE), &text).expect("write the policy");
    let policy = parse_policy(&text);
    let compiled = compile(&policy, None, 1);
    for datapath in datapaths {
        let mut maps = Maps::open(&datapath.pin_dir().join("maps")).expect("open maps");
        apply(&mut maps, &policy, &compiled, &mount).expect("apply the policy");
    }
    compiled
}

/// The daemon config a node writes for itself: redirects to its outbound listener on
/// loopback, its inbound listener on `inbound_port`, in the namespace whose cookie is
/// `netns_cookie`.
fn daemon_config(inbound_port: u16, netns_cookie: u64) -> DaemonConfig {
    DaemonConfig {
        outbound_v4: Some(Ipv4Addr::LOCALHOST),
        outbound_v6: None,
        outbound_port: OUTBOUND_PORT,
        inbound_port,
        netns_cookie,
        kernel_flows: false,
    }
}

/// A path's edit of node B's daemon config: none.
fn base_config(_: &mut DaemonConfig) {}

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

/// One way from a client to a server.
struct Route<'a> {
    name: &'static str,
    /// The client's node.
    node: On,
    /// The client's cgroup.
    cgroup: &'a ScratchCgroup,
    target: SocketAddr,
    /// The identity number the client is given in its node's kernel maps before it connects,
    /// as the daemon's registrar would; `None`: the kernel knows none.
    known: Option<u32>,
    /// Whether the client's `connect()` is redirected into its node's outbound listener
    /// (checked by [`Testbed::check_paths`]).
    redirected: bool,
    /// The processes carrying the path besides the client and the server (name, pid): their
    /// CPU time per round trip is reported.
    carriers: Vec<(&'static str, u32)>,
    /// Node B's daemon config for this path: the base config, edited by this.
    config_b: fn(&mut DaemonConfig),
}

impl<'a> Route<'a> {
    /// A path that is not redirected, carried by nothing, from a client the kernel knows
    /// nothing of, with B's base config.
    fn new(name: &'static str, node: On, cgroup: &'a ScratchCgroup, target: SocketAddr) -> Self {
        Self {
            name,
            node,
            cgroup,
            target,
            known: None,
            redirected: false,
            carriers: Vec::new(),
            config_b: base_config,
        }
    }
}

/// Per-round figures of one path.
#[derive(Clone)]
struct PathFigures {
    name: &'static str,
    /// The names of the path's carriers, as [`Rr::cpu`] indexes them.
    carriers: Vec<&'static str>,
    /// Bytes per second.
    stream: Vec<f64>,
    /// Request/response runs: as the processes fall, then pinned to one CPU.
    rr: [Rr; 2],
    /// Connections per second (paths between the nodes only).
    connect: Vec<f64>,
}

impl PathFigures {
    fn new(route: &Route<'_>) -> Self {
        let rr = Rr {
            p50: Vec::new(),
            p99: Vec::new(),
            cpu: vec![Vec::new(); route.carriers.len()],
        };
        Self {
            name: route.name,
            carriers: route.carriers.iter().map(|&(name, _)| name).collect(),
            stream: Vec::new(),
            rr: [rr.clone(), rr],
            connect: Vec::new(),
        }
    }
}

/// Per-round figures of request/response runs, in µs.
#[derive(Clone)]
struct Rr {
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// CPU time per round trip of each carrier of the path.
    cpu: Vec<Vec<f64>>,
}

impl Rr {
    /// The p50s or the p99s.
    fn percentile(&self, percentile: u8) -> &[f64] {
        if percentile == 50 {
            &self.p50
        } else {
            &self.p99
        }
    }
}

/// Indexes of [`Rr`] runs in [`PathFigures::rr`].
const UNPINNED: usize = 0;
const PINNED: usize = 1;

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

/// Indexes of the paths between the nodes ([`Testbed::routes`]); on one node, direct is 0 too.
const DIRECT: usize = 0;
const TUNNEL: usize = 1;
const STUNNEL: usize = 2;

/// The table the README quotes, then the per-round figures behind its medians.
fn report(across: &[PathFigures], local: &[PathFigures], cold: &Cold, memory: Memory) -> String {
    let mut rows = traffic_rows(across, cold);
    rows.extend(local_rows(local));
    rows.extend(memory_rows(memory));
    let mut out = String::from(
        "\nmedians over the rounds, [min–max] over the rounds; ratios and differences per round\n\
         \n| `cargo xtask bench tunnel` | figure |\n|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(out, "| {row} |");
    }
    let mut pairs = vec![(&across[TUNNEL], &across[DIRECT], "between the nodes")];
    pairs.extend(
        local[1..]
            .iter()
            .map(|figures| (figures, &local[DIRECT], "on node B")),
    );
    for (of, to, group) in pairs {
        let line = |values: Vec<f64>| {
            let each: Vec<String> = values.iter().map(|value| format!("{value:.2}")).collect();
            each.join(" ")
        };
        let _ = writeln!(out, "\nper round, {} against direct, {group}:", of.name);
        let _ = writeln!(
            out,
            "  throughput ratio        {}",
            line(each_round(&of.stream, &to.stream, ratio))
        );
        for (run, label) in [(UNPINNED, "unpinned"), (PINNED, "pinned  ")] {
            let (of, to) = (&of.rr[run], &to.rr[run]);
            let _ = writeln!(
                out,
                "  added p50 {label} (µs) {}",
                line(each_round(&of.p50, &to.p50, minus))
            );
            let _ = writeln!(
                out,
                "  added p99 {label} (µs) {}",
                line(each_round(&of.p99, &to.p99, minus))
            );
        }
        if !of.connect.is_empty() {
            let _ = writeln!(
                out,
                "  connection ratio        {}",
                line(each_round(&of.connect, &to.connect, ratio))
            );
        }
    }
    out
}

/// Table rows for throughput, latency, CPU and connection rates between the nodes.
fn traffic_rows<'a>(figures: &'a [PathFigures], cold: &Cold) -> Vec<String> {
    let (direct, tunnel, stunnel) = (&figures[DIRECT], &figures[TUNNEL], &figures[STUNNEL]);
    let gbits = |path: &PathFigures| {
        let each: Vec<f64> = path.stream.iter().map(|bytes| bytes * 8.0 / 1e9).collect();
        spread(&each, 2)
    };
    let vs_direct = each_round(&tunnel.stream, &direct.stream, ratio);
    let vs_stunnel = each_round(&tunnel.stream, &stunnel.stream, ratio);
    let connect_ratio = each_round(&tunnel.connect, &direct.connect, ratio);
    let cold_ratio = each_round(&cold.tunnel, &cold.direct, ratio);
    let mut rows = vec![
        format!(
            "single-stream throughput, tunnel / direct | {} / {} Gbit/s: **ratio {}** (target >= 0.65) {}",
            gbits(tunnel),
            gbits(direct),
            spread(&vs_direct, 2),
            verdict(median(&vs_direct) >= 0.65)
        ),
        format!(
            "single-stream throughput, tunnel / stunnel4 mTLS | {} / {} Gbit/s: **ratio {}** (target >= 1.5) {}",
            gbits(tunnel),
            gbits(stunnel),
            spread(&vs_stunnel, 2),
            verdict(median(&vs_stunnel) >= 1.5)
        ),
    ];
    for (percentile, target) in [(50, 20.0), (99, 60.0)] {
        for (run, how) in [(UNPINNED, "unpinned"), (PINNED, "pinned to one CPU")] {
            let of = |path: &'a PathFigures| path.rr[run].percentile(percentile);
            let added = each_round(of(tunnel), of(direct), minus);
            let ztunnel = if percentile == 50 && run == PINNED {
                "; ztunnel adds 33"
            } else {
                ""
            };
            rows.push(format!(
                "request/response p{percentile}, {how}, tunnel / direct / stunnel4 | {} / {} / {} µs: **added {} µs** (target <= {target}{ztunnel}) {}",
                spread(of(tunnel), 1),
                spread(of(direct), 1),
                spread(of(stunnel), 1),
                spread(&added, 1),
                verdict(median(&added) <= target)
            ));
        }
    }
    for (run, how) in [(UNPINNED, "unpinned"), (PINNED, "pinned to one CPU")] {
        let (of, to) = (&stunnel.rr[run], &direct.rr[run]);
        rows.push(format!(
            "request/response added by stunnel4, {how}, p50 / p99 | {} / {} µs",
            spread(&each_round(&of.p50, &to.p50, minus), 1),
            spread(&each_round(&of.p99, &to.p99, minus), 1)
        ));
    }
    rows.extend([tunnel, stunnel].into_iter().filter_map(cpu_row));
    rows.extend([
        format!(
            "new connections/s (connect + 16-byte exchange + close), warm pool / direct | {} / {}: **ratio {}** (target >= 0.5) {}",
            spread(&tunnel.connect, 0),
            spread(&direct.connect, 0),
            spread(&connect_ratio, 2),
            verdict(median(&connect_ratio) >= 0.5)
        ),
        format!(
            "new connections/s, stunnel4 (a TLS handshake each) | {}",
            spread(&stunnel.connect, 0)
        ),
        format!(
            "new connections/s, cold mTLS (pool disabled) / direct | {} / {}: ratio {}",
            spread(&cold.tunnel, 0),
            spread(&cold.direct, 0),
            spread(&cold_ratio, 2)
        ),
    ]);
    rows
}

/// Table rows for the paths on node B: each against direct.
fn local_rows(figures: &[PathFigures]) -> Vec<String> {
    let direct = &figures[DIRECT];
    let gbits = |path: &PathFigures| {
        let each: Vec<f64> = path.stream.iter().map(|bytes| bytes * 8.0 / 1e9).collect();
        spread(&each, 2)
    };
    let mut rows = Vec::new();
    for path in &figures[1..] {
        let name = path.name;
        rows.push(format!(
            "same node (B), single-stream throughput, {name} / direct | {} / {} Gbit/s: **ratio {}**",
            gbits(path),
            gbits(direct),
            spread(&each_round(&path.stream, &direct.stream, ratio), 2)
        ));
        for (run, how) in [(UNPINNED, "unpinned"), (PINNED, "pinned to one CPU")] {
            let (of, to) = (&path.rr[run], &direct.rr[run]);
            for (percentile, of, to) in [(50, &of.p50, &to.p50), (99, &of.p99, &to.p99)] {
                rows.push(format!(
                    "same node (B), request/response p{percentile}, {how}, {name} / direct | {} / {} µs: **added {} µs**, ratio {}",
                    spread(of, 1),
                    spread(to, 1),
                    spread(&each_round(of, to, minus), 1),
                    spread(&each_round(of, to, ratio), 2)
                ));
            }
        }
        rows.extend(cpu_row(path));
    }
    rows
}

/// The CPU time per round trip of each of `path`'s carriers, unpinned and pinned; `None`
/// when nothing carries the path.
fn cpu_row(path: &PathFigures) -> Option<String> {
    if path.carriers.is_empty() {
        return None;
    }
    let run = |run: usize| {
        let each: Vec<String> = path.rr[run]
            .cpu
            .iter()
            .map(|values| spread(values, 1))
            .collect();
        each.join(" / ")
    };
    Some(format!(
        "CPU time per round trip, {} path, {} | unpinned {} µs; pinned {} µs",
        path.name,
        path.carriers.join(" / "),
        run(UNPINNED),
        run(PINNED)
    ))
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

/// `f(of, to)` for each round.
fn each_round(of: &[f64], to: &[f64], f: fn(f64, f64) -> f64) -> Vec<f64> {
    assert_eq!(of.len(), to.len(), "one figure per round on both paths");
    of.iter().zip(to).map(|(&x, &y)| f(x, y)).collect()
}

/// `median [min–max]` of `values`, with `digits` decimals.
fn spread(values: &[f64], digits: usize) -> String {
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} [{low:.digits$}–{high:.digits$}]",
        median(values)
    )
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

/// The policy both nodes load: every workload (name, cgroup path) enrolled; `web` (in A) and
/// `local` (in B) may reach `api` (in B) on the service port.
fn policy_text(workloads: &[(&str, String)], a: IpAddr, b: IpAddr) -> String {
    let enroll: Vec<String> = workloads
        .iter()
        .map(|(_, cgroup)| format!("\"{cgroup}\""))
        .collect();
    let mut text = format!(
        "trust_domain = \"{TD}\"\nenroll = [{}]\n",
        enroll.join(", ")
    );
    for (name, cgroup) in workloads {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://{TD}/{name}\"\nselectors = [\"cgroup:path:{cgroup}\"]\n"
        );
    }
    for client in ["web", "local"] {
        let _ = write!(
            text,
            "[[allow]]\nfrom = \"spiffe://{TD}/{client}\"\nto = \"spiffe://{TD}/api\"\nports = [{SERVICE_PORT}]\n"
        );
    }
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

/// A client run: prints [`READY`] and waits for [`GO`] (meanwhile the parent may give it an
/// identity and pin it), then prints one answer line:
/// - `bypass`: whether a plain connection to `target` is dropped (`dropped`) or not (`open`);
/// - `probe`: one echo exchange, retried for a few seconds while the path comes up (`ok`);
/// - `stream`: one stream sent for [`STREAM_FOR`] (`rate <bytes/s>` the server received);
/// - `ping`: request/response on one connection (`p50 <µs> p99 <µs>`), the timed exchanges
///   after printing [`WARM`] and waiting for [`GO`] again;
/// - `connect`: connect + 16-byte exchange + close for [`CONNECT_FOR`] (`rate <per s>`).
fn child(mode: &str, target: &str) {
    let target: SocketAddr = target.parse().expect("target address");
    println!("{READY}");
    wait_for_go();
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
        if index + 1 == WARMUP_PINGS {
            println!("{WARM}");
            wait_for_go();
        }
    }
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

/// Waits for the parent's [`GO`] on stdin.
fn wait_for_go() {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).expect("read stdin");
    assert_eq!(line.trim_end(), GO, "the parent lets a child go");
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
        let cookie = netns_cookie(inbound.as_fd()).expect("read the namespace cookie");
        maps.set_config(&daemon_config(args.inbound.port(), cookie))
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

//! `cargo xtask bench churn`: sustained short connections to one workload on another node.
//!
//! Two network namespaces joined by a veth link are the nodes A and B, each running the real
//! daemon (`enforcer run`, the harness of the containers bench) with the machine's default
//! ephemeral port range. A client in A's enrolled `client` cgroup opens 100,000 short
//! connections, 8 at a time, to one server in B's enrolled `server` cgroup: connect, one byte
//! each way, and the client closes first (the server closes when it reads the end), so every
//! connection leaves a `TIME_WAIT` socket behind on the side that closed first towards the
//! workload. Through the tunnel that is B's hop to the workload; on the direct path, run
//! first as the same-run baseline, it is the client's socket in A (an unenrolled client to an
//! unenrolled server on another port of B).
//!
//! Printed per 10,000-connection slice: connections/s, failed connections, `TIME_WAIT`
//! sockets towards the workload and in each namespace, and both daemons' RSS; then each path's
//! last slice against its first (a steady rate keeps that ratio near 1) and the tunnel's
//! against direct. Bounded: each path stops after [`RUN_LIMIT`]. Asserts no timing. Needs root.
//!
//! The client and the servers are this binary: `--serve ADDR` and `--client ADDR COUNT`.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

#[path = "common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::median;
use enforcer::testing::{
    DaemonNode, Netns, Spawn, TestPki, connect_nodes, require_root, rss_kib, wait_for_listener,
};

const TD: &str = "bench.churn";
/// B's enrolled server (reached through the tunnel).
const SERVICE_PORT: u16 = 7101;
/// B's unenrolled server (the direct baseline).
const PLAIN_PORT: u16 = 7102;
/// Connections per path.
const CONNECTIONS: u64 = 100_000;
/// Connections per printed slice.
const SLICE: u64 = 10_000;
/// Connections the client keeps in flight.
const CONCURRENCY: usize = 8;
/// Bound on one connection's connect and exchange.
const CONNECTION_LIMIT: Duration = Duration::from_secs(5);
/// Bound on one path's whole run: the client stops there, slices unfinished.
const RUN_LIMIT: Duration = Duration::from_mins(5);
/// The `st` column of `/proc/net/tcp` for `TIME_WAIT`.
const TIME_WAIT: &str = "06";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--serve") => serve(&args[1]),
        Some("--client") => client(&args[1], &args[2]),
        _ => bench(),
    }
}

fn policy(scope: &str, peer: IpAddr) -> String {
    let mut text = format!("trust_domain = \"{TD}\"\nenroll = [\"{scope}\"]\n");
    for name in ["client", "server"] {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://{TD}/{name}\"\nselectors = [\"cgroup:path:{scope}/{name}\"]\n"
        );
    }
    let _ = write!(
        text,
        "[[peer]]\naddress = \"{peer}\"\n\
         [[allow]]\nfrom = \"spiffe://{TD}/client\"\nto = \"spiffe://{TD}/server\"\n"
    );
    text
}

/// The parent: two daemons, the servers, then the direct and the tunnelled runs.
fn bench() {
    require_root();
    let binary = Path::new(env!("CARGO_BIN_EXE_enforcer"));
    let exe = std::env::current_exe().expect("the bench's own path");
    let link = connect_nodes(&Netns::new("churn-a"), &Netns::new("churn-b"));
    let pki = TestPki::new(TD);
    let (addr_a, addr_b) = (IpAddr::from(link.0.addr4()), IpAddr::from(link.1.addr4()));
    let a = DaemonNode::start(binary, &link.0, "a", &pki.root, |scope| {
        policy(scope, addr_b)
    });
    let b = DaemonNode::start(binary, &link.1, "b", &pki.root, |scope| {
        policy(scope, addr_a)
    });
    let ports = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map(|range| range.split_whitespace().collect::<Vec<_>>().join("-"))
        .unwrap_or_default();
    println!(
        "enforcer bench churn: {CONNECTIONS} short connections per path, {CONCURRENCY} at a time, \
         client closes first; nodes {addr_a} and {addr_b}, ephemeral ports {ports} (the host's \
         default; each namespace starts with it)"
    );

    let (client_cg, server_cg) = (a.scope().child("client"), b.scope().child("server"));
    let service = SocketAddr::new(addr_b, SERVICE_PORT);
    let plain = SocketAddr::new(addr_b, PLAIN_PORT);
    let server = b
        .spawn(&server_cg, &exe)
        .args(["--serve", &service.to_string()])
        .spawn();
    wait_for_listener(&server, SERVICE_PORT);
    let plain_server = Spawn::new(&exe)
        .netns(link.1.netns())
        .args(["--serve", &plain.to_string()])
        .spawn();
    wait_for_listener(&plain_server, PLAIN_PORT);

    let nodes = Nodes {
        a: &a,
        b: &b,
        b_pid: server.pid(),
    };
    let direct = run(
        "direct",
        Spawn::new(&exe).netns(link.0.netns()),
        plain,
        &nodes,
    );
    let tunnel = run("tunnel", a.spawn(&client_cg, &exe), service, &nodes);
    print!("{}", summary(&direct, &tunnel));
}

/// The daemons, and a process in B's namespace whose `/proc/<pid>/net/tcp` is B's table.
struct Nodes<'a> {
    a: &'a DaemonNode,
    b: &'a DaemonNode,
    b_pid: u32,
}

/// One slice of a run.
struct Slice {
    rate: f64,
    failed: u64,
}

/// Runs the client `spawn` against `target`, printing a row per slice.
fn run(path: &str, spawn: Spawn, target: SocketAddr, nodes: &Nodes<'_>) -> Vec<Slice> {
    println!(
        "  {path} -> {target}:\n    {:>7}  {:>8}  {:>6}  {:>10}  {:>8}  {:>8}  {:>9}  {:>9}",
        "conns", "conn/s", "failed", "TW->server", "TW in A", "TW in B", "RSS A KiB", "RSS B KiB"
    );
    let mut client = spawn
        .args(["--client", &target.to_string(), &CONNECTIONS.to_string()])
        .spawn();
    let mut slices = Vec::new();
    let mut done = 0;
    while let Some(line) = client.read_line(RUN_LIMIT + Duration::from_secs(30)) {
        let Some((count, seconds, failed)) = parse_slice(&line) else {
            println!("    {line}");
            break;
        };
        #[expect(clippy::cast_precision_loss, reason = "figures for display")]
        let rate = (count - done) as f64 / seconds;
        done = count;
        let a_table = tcp_table(nodes.a.pid());
        let b_table = tcp_table(nodes.b_pid);
        println!(
            "    {count:>7}  {rate:>8.0}  {failed:>6}  {:>10}  {:>8}  {:>8}  {:>9}  {:>9}",
            time_wait_to(&a_table, target) + time_wait_to(&b_table, target),
            time_wait(&a_table),
            time_wait(&b_table),
            rss_kib(nodes.a.pid()),
            rss_kib(nodes.b.pid()),
        );
        slices.push(Slice { rate, failed });
    }
    if client.wait_timeout(Duration::from_secs(30)).is_none() {
        client.kill();
    }
    assert!(
        !slices.is_empty(),
        "the {path} client reported nothing; stderr:\n{}",
        client.stderr()
    );
    slices
}

/// `COUNT SECONDS FAILED` as the client prints it after each slice.
fn parse_slice(line: &str) -> Option<(u64, f64, u64)> {
    let mut words = line.split_whitespace();
    let count = words.next()?.parse().ok()?;
    let seconds = words.next()?.parse().ok()?;
    let failed = words.next()?.parse().ok()?;
    Some((count, seconds, failed))
}

/// The IPv4 TCP table of the namespace `pid` runs in: (local, remote, state) in `/proc`'s hex.
fn tcp_table(pid: u32) -> Vec<(String, String, String)> {
    fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut columns = line.split_whitespace().skip(1);
            Some((
                columns.next()?.to_owned(),
                columns.next()?.to_owned(),
                columns.next()?.to_owned(),
            ))
        })
        .collect()
}

fn time_wait(table: &[(String, String, String)]) -> usize {
    table.iter().filter(|(_, _, st)| st == TIME_WAIT).count()
}

/// `TIME_WAIT` sockets whose remote end is `target`: those of the side that closed first.
fn time_wait_to(table: &[(String, String, String)], target: SocketAddr) -> usize {
    let IpAddr::V4(ip) = target.ip() else {
        return 0;
    };
    let hex = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        target.port()
    );
    table
        .iter()
        .filter(|(_, remote, st)| st == TIME_WAIT && *remote == hex)
        .count()
}

fn summary(direct: &[Slice], tunnel: &[Slice]) -> String {
    let steady = |slices: &[Slice]| {
        let first = slices[0].rate;
        let last = slices[slices.len() - 1].rate;
        (last, last / first)
    };
    let failed = |slices: &[Slice]| slices.iter().map(|s| s.failed).sum::<u64>();
    let rates = |slices: &[Slice]| slices.iter().map(|s| s.rate).collect::<Vec<_>>();
    let (direct_last, direct_steady) = steady(direct);
    let (tunnel_last, tunnel_steady) = steady(tunnel);
    let (direct_median, tunnel_median) = (median(&rates(direct)), median(&rates(tunnel)));
    format!(
        "  direct: median {direct_median:.0} conn/s over {} slices, last/first slice {direct_steady:.2}, \
         {} failed\n  tunnel: median {tunnel_median:.0} conn/s over {} slices, last/first slice \
         {tunnel_steady:.2}, {} failed\n  tunnel / direct: median {:.2}, last slice {:.2}\n",
        direct.len(),
        failed(direct),
        tunnel.len(),
        failed(tunnel),
        tunnel_median / direct_median,
        tunnel_last / direct_last,
    )
}

/// The client: `count` short connections to `target`, [`CONCURRENCY`] at a time; prints
/// `COUNT SECONDS FAILED` after each slice, stopping after [`RUN_LIMIT`].
fn client(target: &str, count: &str) {
    let target: SocketAddr = target.parse().expect("a socket address");
    let count: u64 = count.parse().expect("a connection count");
    let claimed = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (claimed, finished, failed) = (
                Arc::clone(&claimed),
                Arc::clone(&finished),
                Arc::clone(&failed),
            );
            thread::spawn(move || {
                while claimed.fetch_add(1, Ordering::Relaxed) < count && start.elapsed() < RUN_LIMIT
                {
                    if short_connection(target).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut next = SLICE;
    let mut slice_start = Instant::now();
    let mut reported_failures = 0;
    while next <= count && start.elapsed() < RUN_LIMIT {
        thread::sleep(Duration::from_millis(5));
        if finished.load(Ordering::Relaxed) >= next {
            let failures = failed.load(Ordering::Relaxed);
            println!(
                "{next} {} {}",
                slice_start.elapsed().as_secs_f64(),
                failures - reported_failures
            );
            reported_failures = failures;
            slice_start = Instant::now();
            next += SLICE;
        }
    }
    if next <= count {
        println!("stopped after {RUN_LIMIT:?} with {next} connections not reached");
    }
    for worker in workers {
        let _ = worker.join();
    }
}

/// Connect, one byte each way, and close first.
fn short_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, CONNECTION_LIMIT)?;
    stream.set_read_timeout(Some(CONNECTION_LIMIT))?;
    stream.set_nodelay(true)?;
    stream.write_all(b"x")?;
    let mut byte = [0];
    stream.read_exact(&mut byte)?;
    Ok(())
}

/// A server answering each connection's byte and closing once the client has closed.
fn serve(addr: &str) {
    let listener = TcpListener::bind(addr).expect("bind the server");
    let listener = Arc::new(listener);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let listener = Arc::clone(&listener);
            thread::spawn(move || {
                loop {
                    let Ok((mut stream, _)) = listener.accept() else {
                        continue;
                    };
                    let _ = answer(&mut stream);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

/// One byte back for the client's, then read until the client's end.
fn answer(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CONNECTION_LIMIT))?;
    let mut byte = [0];
    stream.read_exact(&mut byte)?;
    stream.write_all(&byte)?;
    let mut rest = [0; 64];
    while stream.read(&mut rest)? > 0 {}
    Ok(())
}

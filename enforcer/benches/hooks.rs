//! `cargo xtask bench hooks`: what the socket hooks cost.
//!
//! Prints figures and ratios measured in one run, alternating the paths in rounds; asserts
//! nothing. Needs root. Figures:
//! 1. `connect()` rate of an unenrolled process in a cgroup under the attached programs, in the
//!    namespace where `sk_lookup` runs, vs in a cgroup with no programs in a namespace without
//!    (target ratio >= 0.97): everything installing enforcer costs a process it leaves alone;
//! 2. redirected connect+accept (enrolled process, through the outbound listener, which looks
//!    up the original destination) vs direct connect+accept (reported);
//! 3. `listen()` rate (socket, bind, listen, close) of an enrolled process, whose listeners the
//!    kernel records and protects, vs no programs;
//! 4. UDP `sendto` rate of an enrolled process to a destination an egress entry permits (every
//!    datagram decided by the egress hook) vs no programs;
//! 5. average run time per program invocation, from `kernel.bpf_stats_enabled`, over one more
//!    round of every path.
//!
//! The timed loops run in a child process (this binary re-executed with `--child`) placed in
//! the cgroup and network namespace under test; the parent serves a listener in each
//! namespace.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    kernel::{Datapath, EgressEntry, IpProtocol},
    testing::{Netns, ScratchCgroup, ScratchDatapath, Spawn, require_root},
};

use common::median;

/// Operations per timed round.
const OPERATIONS: u32 = 5_000;
/// Rounds per path (paths alternate round by round).
const ROUNDS: usize = 7;
/// Destination the redirected client asks for; it only succeeds through the redirect.
const REDIRECTED_DST: &str = "127.0.0.2:9";
/// Where the UDP loop sends (nobody listens: the datagrams are dropped after the hooks).
const UDP_DST: &str = "127.0.0.3:53";
/// The daemon's inbound port (nobody listens on it here).
const INBOUND_PORT: u16 = 15_008;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--child") {
        child(&args[at + 1], &args[at + 2]);
        return;
    }
    require_root();
    let scope = ScratchCgroup::new("bench-scope");
    let unenrolled = scope.child("unenrolled");
    let enrolled = scope.child("enrolled");
    let detached = ScratchCgroup::new("bench-detached");
    let bare_netns = Netns::new("bench-bare");
    let mut datapath = ScratchDatapath::install(&scope);
    let server = Server::start(datapath.netns(), Some(datapath.pin_dir()));
    let bare_server = Server::start(&bare_netns, None);
    let maps = datapath.maps_mut();
    maps.enroll(enrolled.id()).expect("enroll");
    maps.replace_egress(&[EgressEntry {
        network: Ipv4Addr::new(127, 0, 0, 3).into(),
        prefix_len: 32,
        protocol: IpProtocol::Udp,
        port: Some(53),
        rule: 1,
    }])
    .expect("permit the UDP destination");
    datapath.serve_on_loopback(server.addr.port(), INBOUND_PORT, (&server.v4, &server.v6));
    let bench = Bench {
        netns: datapath.netns(),
        bare_netns: &bare_netns,
        direct: server.addr.to_string(),
        bare_direct: bare_server.addr.to_string(),
    };

    println!("hooks benchmark: {ROUNDS} rounds x {OPERATIONS} operations per path, alternating");
    let mut rates: [Vec<f64>; 8] = Default::default();
    for _ in 0..ROUNDS {
        for (slot, path) in bench
            .paths(&unenrolled, &enrolled, &detached)
            .iter()
            .enumerate()
        {
            rates[slot].push(path.run());
        }
    }
    print_rates(rates);
    // Run times come from a separate pass: bpf stats cost two clock reads per run, which must
    // not weigh on the rates above.
    let stats = StatsGuard::enable();
    for path in bench.paths(&unenrolled, &enrolled, &detached) {
        path.run();
    }
    println!();
    println!("per-program run time (one more round of every path, bpf stats on):");
    println!("| program | runs | avg ns/run |");
    println!("|---|---|---|");
    for program in datapath.program_stats().expect("program stats") {
        let average = if program.run_count == 0 {
            0.0
        } else {
            to_f64(program.run_time_ns) / to_f64(program.run_count)
        };
        println!(
            "| {} | {} | {average:.0} |",
            program.name, program.run_count
        );
    }
    drop(stats);
    server.stop();
    bare_server.stop();
}

/// The rates of every path (in [`Bench::paths`] order) and the ratios between them.
fn print_rates(rates: [Vec<f64>; 8]) {
    let [
        attached,
        bare,
        redirected,
        plain,
        listen,
        listen_bare,
        udp,
        udp_bare,
    ] = rates;
    let ratio = |a: &[f64], b: &[f64]| median(a) / median(b);
    println!();
    println!("| path | operations/s (median) |");
    println!("|---|---|");
    for (name, figures) in [
        ("unenrolled connect, programs attached", &attached),
        ("unenrolled connect, no programs", &bare),
        ("redirected connect+accept+1 byte", &redirected),
        ("direct connect+accept+1 byte", &plain),
        ("enrolled listen (recorded, protected)", &listen),
        ("listen, no programs", &listen_bare),
        ("enrolled UDP sendto (egress decided)", &udp),
        ("UDP sendto, no programs", &udp_bare),
    ] {
        println!("| {name} | {:.0} |", median(figures));
    }
    println!();
    println!(
        "ratio attached/detached (unenrolled connect): {:.3} (target >= 0.97)",
        ratio(&attached, &bare)
    );
    println!(
        "ratio redirected/direct (connect+accept):    {:.3}",
        ratio(&redirected, &plain)
    );
    println!(
        "ratio enrolled/detached (listen):            {:.3}",
        ratio(&listen, &listen_bare)
    );
    println!(
        "ratio enrolled/detached (UDP sendto):        {:.3}",
        ratio(&udp, &udp_bare)
    );
}

/// The namespaces under test and their servers.
struct Bench<'a> {
    /// Where the datapath steers (`sk_lookup` attached).
    netns: &'a Netns,
    /// A namespace without any program.
    bare_netns: &'a Netns,
    /// The server in `netns`.
    direct: String,
    /// The server in `bare_netns`.
    bare_direct: String,
}

/// One path: where the child runs and what it does.
struct Path<'a> {
    cgroup: &'a ScratchCgroup,
    netns: &'a Netns,
    mode: &'static str,
    target: String,
}

impl<'a> Bench<'a> {
    /// Every path, in the order the figures index them.
    fn paths(
        &self,
        unenrolled: &'a ScratchCgroup,
        enrolled: &'a ScratchCgroup,
        detached: &'a ScratchCgroup,
    ) -> [Path<'a>; 8] {
        let attached = |cgroup, mode, target: &str| Path {
            cgroup,
            netns: self.netns,
            mode,
            target: target.to_owned(),
        };
        let bare = |mode, target: &str| Path {
            cgroup: detached,
            netns: self.bare_netns,
            mode,
            target: target.to_owned(),
        };
        [
            attached(unenrolled, "connect", &self.direct),
            bare("connect", &self.bare_direct),
            attached(enrolled, "roundtrip", REDIRECTED_DST),
            attached(unenrolled, "roundtrip", &self.direct),
            attached(enrolled, "listen", "-"),
            bare("listen", "-"),
            attached(enrolled, "udp", UDP_DST),
            bare("udp", UDP_DST),
        ]
    }
}

impl Path<'_> {
    /// Run the timed loop of this path in a child; returns operations per second.
    fn run(&self) -> f64 {
        let exe = std::env::current_exe().expect("current exe");
        let child = Spawn::new(exe)
            .args(["--child", self.mode, &self.target])
            .cgroup(self.cgroup)
            .netns(self.netns)
            .spawn();
        let line = child
            .read_line(Duration::from_mins(2))
            .unwrap_or_else(|| panic!("child gave no result; stderr:\n{}", child.stderr()));
        line.strip_prefix("rate ")
            .and_then(|rate| rate.parse().ok())
            .unwrap_or_else(|| panic!("bad child output {line:?}; stderr:\n{}", child.stderr()))
    }
}

/// The child: `connect` opens and closes connections; `roundtrip` also reads the byte the
/// server writes after accepting; `listen` creates, binds, listens on and closes a socket;
/// `udp` sends datagrams. Prints `rate <operations per second>`.
fn child(mode: &str, target: &str) {
    let start = Instant::now();
    match mode {
        "listen" => {
            for _ in 0..OPERATIONS {
                drop(TcpListener::bind("127.0.0.1:0").expect("listen"));
            }
        }
        "udp" => {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
            for _ in 0..OPERATIONS {
                socket.send_to(b"x", target).expect("sendto");
            }
        }
        _ => {
            let target: SocketAddr = target.parse().expect("target address");
            for _ in 0..OPERATIONS {
                let mut stream = TcpStream::connect(target).expect("connect");
                if mode == "roundtrip" {
                    let mut byte = [0u8; 1];
                    stream
                        .read_exact(&mut byte)
                        .expect("read the server's byte");
                }
                // Close with a reset: tens of thousands of connections to one port would
                // otherwise fill the port range with TIME_WAIT and time the port search.
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger");
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("rate {}", f64::from(OPERATIONS) / elapsed);
}

/// A listener on `127.0.0.1` and `[::1]` (one port) in a namespace: accepts, looks up the
/// original destination in the datapath pinned at `pins`, if any (as the daemon does), writes
/// one byte and closes. In the datapath's namespace it is the daemon's outbound listener.
struct Server {
    addr: SocketAddr,
    v4: Arc<TcpListener>,
    v6: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Server {
    fn start(netns: &Netns, pins: Option<&std::path::Path>) -> Self {
        let (v4, v6) = netns.within(|| {
            let v4 = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = v4.local_addr().expect("addr").port();
            let v6 = TcpListener::bind(("::1", port)).expect("bind [::1]");
            (Arc::new(v4), Arc::new(v6))
        });
        let addr = v4.local_addr().expect("addr");
        v4.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let pins = pins.map(std::path::Path::to_owned);
        let thread = {
            let stop = Arc::clone(&stop);
            let listener = Arc::clone(&v4);
            let netns = enforcer::kernel::netns_cookie(v4.as_fd()).expect("namespace cookie");
            thread::spawn(move || {
                let datapath = pins.map(|pins| Datapath::adopt(&pins).expect("adopt"));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            if let Some(datapath) = &datapath {
                                let _original =
                                    datapath.maps().original(netns, peer).expect("lookup");
                            }
                            let _ = stream.write_all(b"x");
                        }
                        Err(_) => thread::sleep(Duration::from_micros(50)),
                    }
                }
            })
        };
        Self {
            addr,
            v4,
            v6,
            stop,
            thread,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("server thread");
    }
}

/// Turns on `kernel.bpf_stats_enabled` and restores the previous value when dropped.
struct StatsGuard {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsGuard {
    fn enable() -> Self {
        let previous = std::fs::read_to_string(BPF_STATS).expect("read bpf_stats_enabled");
        std::fs::write(BPF_STATS, "1").expect("enable bpf stats");
        Self { previous }
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.previous.trim());
    }
}

#[expect(clippy::cast_precision_loss, reason = "figures for display")]
fn to_f64(value: u64) -> f64 {
    value as f64
}

//! `cargo xtask bench hooks`: what the socket hooks cost on the connection path.
//!
//! Prints figures and ratios measured in one run, alternating the paths in rounds; asserts
//! nothing. Needs root. Figures:
//! 1. `connect()` rate of an unenrolled process in a cgroup under the attached programs vs in a
//!    cgroup with no programs (target ratio >= 0.97);
//! 2. redirected connect+accept (enrolled process, through the outbound listener, which looks
//!    up the original destination) vs direct connect+accept (reported);
//! 3. average run time per program invocation, from `kernel.bpf_stats_enabled`.
//!
//! The timed loops run in a child process (this binary re-executed with `--child`) placed in
//! the cgroup under test; the parent serves the listener.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    kernel::Datapath,
    testing::{ScratchCgroup, ScratchDatapath, Spawn, require_root},
};

use common::median;

/// Connections per timed round.
const CONNECTS: u32 = 5_000;
/// Rounds per path (paths alternate round by round).
const ROUNDS: usize = 7;
/// The daemon's socket mark.
const MARK: u32 = 0x0e5f_0001;
/// Destination the redirected client asks for; it only succeeds through the redirect.
const REDIRECTED_DST: &str = "127.0.0.2:9";

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
    let mut datapath = ScratchDatapath::install(&scope);
    let server = Server::start(&datapath);
    datapath.maps_mut().enroll(enrolled.id()).expect("enroll");
    datapath.serve_on_loopback(server.addr.port(), MARK);

    println!("hooks benchmark: {ROUNDS} rounds x {CONNECTS} connections per path, alternating");
    let direct = server.addr.to_string();
    let (mut attached, mut bare) = (Vec::new(), Vec::new());
    let (mut redirected, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        attached.push(run_child(&unenrolled, "connect", &direct));
        bare.push(run_child(&detached, "connect", &direct));
        redirected.push(run_child(&enrolled, "roundtrip", REDIRECTED_DST));
        plain.push(run_child(&unenrolled, "roundtrip", &direct));
    }
    let ratio = |a: &[f64], b: &[f64]| median(a) / median(b);
    println!();
    println!("| path | connections/s (median) |");
    println!("|---|---|");
    println!(
        "| unenrolled, programs attached | {:.0} |",
        median(&attached)
    );
    println!("| unenrolled, no programs | {:.0} |", median(&bare));
    println!(
        "| redirected connect+accept+1 byte | {:.0} |",
        median(&redirected)
    );
    println!("| direct connect+accept+1 byte | {:.0} |", median(&plain));
    println!();
    println!(
        "ratio attached/detached (unenrolled connect): {:.3} (target >= 0.97)",
        ratio(&attached, &bare)
    );
    println!(
        "ratio redirected/direct (connect+accept):    {:.3}",
        ratio(&redirected, &plain)
    );
    // Run times come from a separate pass: bpf stats cost two clock reads per run, which must
    // not weigh on the rates above.
    let stats = StatsGuard::enable();
    run_child(&unenrolled, "connect", &direct);
    run_child(&enrolled, "roundtrip", REDIRECTED_DST);
    println!();
    println!(
        "per-program run time (one more round of the unenrolled and redirected paths, bpf stats on):"
    );
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
}

/// Run the timed loop in a child placed in `cgroup`; returns connections per second.
fn run_child(cgroup: &ScratchCgroup, mode: &str, target: &str) -> f64 {
    let exe = std::env::current_exe().expect("current exe");
    let child = Spawn::new(exe)
        .args(["--child", mode, target])
        .cgroup(cgroup)
        .spawn();
    let line = child
        .read_line(Duration::from_mins(2))
        .unwrap_or_else(|| panic!("child gave no result; stderr:\n{}", child.stderr()));
    line.strip_prefix("rate ")
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("bad child output {line:?}; stderr:\n{}", child.stderr()))
}

/// The child: `connect` opens and closes connections; `roundtrip` also reads the byte the
/// server writes after accepting. Prints `rate <connections per second>`.
fn child(mode: &str, target: &str) {
    let target: SocketAddr = target.parse().expect("target address");
    let start = Instant::now();
    for _ in 0..CONNECTS {
        let mut stream = TcpStream::connect(target).expect("connect");
        if mode == "roundtrip" {
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .expect("read the server's byte");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("rate {}", f64::from(CONNECTS) / elapsed);
}

/// The listener: accepts, looks up the original destination (as the daemon does), writes one
/// byte and closes.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Server {
    fn start(datapath: &ScratchDatapath) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let pin_dir = datapath.pin_dir().to_owned();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let datapath = Datapath::adopt(&pin_dir).expect("adopt");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            let _original = datapath.maps().original(peer).expect("lookup");
                            let _ = stream.write_all(b"x");
                        }
                        Err(_) => thread::sleep(Duration::from_micros(50)),
                    }
                }
            })
        };
        Self { addr, stop, thread }
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

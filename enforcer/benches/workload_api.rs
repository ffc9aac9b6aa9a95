//! `cargo xtask bench workload-api`: what serving the SPIFFE Workload API costs. A real
//! `enforcer run` in a network namespace serves its socket; the callers are python3 processes
//! in an enrolled cgroup whose connections are handed to this program (the harness of
//! `tests/workload_api.rs`), so the daemon attests a real process for every request.
//!
//! 1. **cached caller**: `FetchX509SVID` first-message latency (open a stream, read its first
//!    message, drop it) on one connection, against two unary round trips on the same
//!    connection that attest nothing: a call without the security header (refused before any
//!    work) and `FetchJWTSVID` with no audience (refused after one hop to the blocking pool);
//! 2. **first-time caller**: the same for a fresh python3 process per sample, timed from the
//!    request (the first on its connection), not from the process start; then as many fresh
//!    callers whose first request is the refused call, to tell what a first request pays for;
//! 3. **1,000 streams**: a second daemon allowing 2,000 streams per caller and issuing 20 s
//!    SVIDs (rotated every 10 s) holds 1,000 `FetchX509SVID` streams on a few connections:
//!    the RSS and threads they add, the daemon's CPU while it holds them, and how long one
//!    rotation takes to reach them all (first stream to last);
//! 4. **`ValidateJWTSVID`**: validations per second in-process on one thread, against
//!    sequential unary calls on one connection.
//!
//! Prints medians with the spread (min–max) over rounds; asserts nothing about timings.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    fs,
    hint::black_box,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use common::median;
use enforcer::{
    identity::{JwtAuthority, JwtBundleSet, SpiffeId, validate_jwt_svid},
    testing::{
        DaemonNode, HandedConnection, Netns, Node, NodeSetup, PublicDir, SYSTEM_PYTHON,
        ScratchCgroup, TestPki, connect_nodes, require_root,
    },
    workload_api::{
        self, Client, SecurityHeader,
        proto::{
            JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest, X509svidResponse,
            spiffe_workload_api_client::SpiffeWorkloadApiClient,
        },
    },
};
use tokio::{runtime::Runtime, task::JoinSet, time::timeout};
use tonic::{Code, Streaming, transport::Channel};

const TD: &str = "bench.wapi";
/// The audience of the JWT-SVIDs validated.
const AUDIENCE: &str = "bench";
/// Rounds of the latency and validation measurements.
const ROUNDS: usize = 5;
/// Calls of each kind before the first round.
const WARM_UP: usize = 200;
/// Calls of each kind per round.
const CALLS: usize = 2_000;
/// Fresh caller processes, one sample each.
const FRESH_CALLERS: usize = 50;
/// Streams held open at once.
const STREAMS: usize = 1_000;
/// The connections (caller processes) they are spread over.
const STREAM_CONNECTIONS: usize = 4;
/// Rotations pushed to them.
const PUSH_ROUNDS: usize = 3;
/// The second daemon's Workload API keys and identity table (after the socket key).
const STREAMS_CONFIG: &str = "max_streams_per_caller = 2000\n[identity]\nsvid_ttl = \"20s\"\n";
/// How long a 20 s SVID may take to be rotated (at half its life), with a margin.
const ROTATION_GUARD: Duration = Duration::from_secs(25);
/// How long the held streams sit idle before the daemon's CPU is read again.
const IDLE_HOLD: Duration = Duration::from_secs(3);
/// How long one validation round runs.
const VALIDATE_ROUND: Duration = Duration::from_secs(1);
/// Hang guard for one answer (not a performance target).
const HANG_GUARD: Duration = Duration::from_secs(30);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

/// One daemon node serving the Workload API, and the enrolled cgroup its callers run in.
struct Site {
    // The daemon goes first: it removes its socket before the directory goes.
    node: DaemonNode,
    /// Enrolled: python3 here is `spiffe://bench.wapi/py`.
    app: ScratchCgroup,
    public: PublicDir,
}

impl Site {
    /// Node `name` on `link`, with `extra` in its `[workload_api]` table after the socket key.
    fn start(link: &Node, name: &str, extra: &str) -> Self {
        let public = PublicDir::new();
        let pki = TestPki::new(TD);
        let python = fs::canonicalize(SYSTEM_PYTHON).expect("python3");
        let setup = NodeSetup {
            config: public.config(extra),
            jwt_key: None,
        };
        let node = DaemonNode::start_set_up(binary(), link, name, &pki.root, setup, |scope| {
            format!(
                "trust_domain = \"{TD}\"\nenroll = [\"{scope}\"]\n[[workload]]\n\
                 id = \"spiffe://{TD}/py\"\n\
                 selectors = [\"cgroup:path:{scope}/app\", \"unix:path:{}\"]\n",
                python.display()
            )
        });
        Self {
            app: node.scope().child("app"),
            node,
            public,
        }
    }

    /// A python3 caller in `app`, and a channel on the connection it made.
    fn caller(&self, rt: &Runtime) -> (HandedConnection, Channel) {
        let mut handed = self.public.handed_connection(&self.app);
        let channel = rt
            .block_on(async { workload_api::channel_over(handed.take()).await })
            .expect("an HTTP/2 channel on the handed connection");
        (handed, channel)
    }
}

fn main() {
    require_root();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (link, _peer) = connect_nodes(&Netns::new("bench-wapi"), &Netns::new("bench-wapi-p"));
    println!(
        "enforcer bench workload-api: a daemon serving the Workload API, python3 callers in an \
         enrolled cgroup; medians (min–max) over rounds"
    );
    {
        let site = Site::start(&link, "a", "");
        cached_caller(&site, &rt);
        first_time_callers(&site, &rt);
        validation(&site, &rt);
    }
    let site = Site::start(&link, "b", STREAMS_CONFIG);
    many_streams(&site, &rt);
}

/// The value at `percent` of `sorted` (ascending, not empty).
fn percentile(sorted: &[f64], percent: usize) -> f64 {
    sorted[(sorted.len() * percent / 100).min(sorted.len() - 1)]
}

/// `median (min–max)` of `values` (not empty), with `decimals` decimals.
fn spread(values: &[f64], decimals: usize) -> String {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(min, max), value| {
            (min.min(*value), max.max(*value))
        });
    format!(
        "{:.decimals$} ({min:.decimals$}–{max:.decimals$})",
        median(values)
    )
}

fn micros(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6
}

/// A client with the security header and one without, on the same connection.
struct Clients {
    with_header: Client,
    bare: SpiffeWorkloadApiClient<Channel>,
}

impl Clients {
    fn new(channel: Channel) -> Self {
        Self {
            bare: SpiffeWorkloadApiClient::new(channel.clone()),
            with_header: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        }
    }
}

/// What one timed call does.
#[derive(Clone, Copy)]
enum Call {
    /// `FetchJWTSVID` without the security header: refused before any work.
    NoHeader,
    /// `FetchJWTSVID` with no audience: refused in the blocking pool, before attestation.
    NoAudience,
    /// `FetchX509SVID`: the stream's first message.
    FirstMessage,
}

impl Call {
    /// Makes the call once; returns how long it took.
    async fn time(self, clients: &mut Clients) -> Duration {
        let started = Instant::now();
        let refusal = match self {
            Self::NoHeader => clients.bare.fetch_jwtsvid(jwt_request(AUDIENCE)).await,
            Self::NoAudience => clients.with_header.fetch_jwtsvid(jwt_request("")).await,
            Self::FirstMessage => return first_message(&mut clients.with_header).await.0,
        };
        let elapsed = started.elapsed();
        let status = refusal.expect_err("a refusal");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        elapsed
    }

    /// `calls` calls' p50 and p99, in microseconds.
    async fn percentiles(self, clients: &mut Clients, calls: usize) -> (f64, f64) {
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            samples.push(micros(self.time(clients).await));
        }
        samples.sort_by(f64::total_cmp);
        (percentile(&samples, 50), percentile(&samples, 99))
    }
}

/// A `FetchJWTSVID` request for `audience` (none when empty).
fn jwt_request(audience: &str) -> JwtsvidRequest {
    JwtsvidRequest {
        audience: [audience]
            .into_iter()
            .filter(|audience| !audience.is_empty())
            .map(str::to_owned)
            .collect(),
        spiffe_id: String::new(),
    }
}

/// Opens a `FetchX509SVID` stream and reads its first message: how long that took from the
/// request, the stream, and the X.509-SVID (DER chain) it carried.
async fn first_message(client: &mut Client) -> (Duration, Streaming<X509svidResponse>, Vec<u8>) {
    let started = Instant::now();
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect("a FetchX509SVID stream")
        .into_inner();
    let first = timeout(HANG_GUARD, stream.message())
        .await
        .expect("the first message within the hang guard")
        .expect("the first message")
        .expect("a message, not the end of the stream");
    let elapsed = started.elapsed();
    (elapsed, stream, svid_of(first))
}

fn svid_of(message: X509svidResponse) -> Vec<u8> {
    message
        .svids
        .into_iter()
        .next()
        .expect("an X.509-SVID")
        .x509_svid
}

/// First-message latency of a caller whose identity is cached, against round trips that
/// attest nothing, in alternating blocks on one connection.
fn cached_caller(site: &Site, rt: &Runtime) {
    let (_caller, channel) = site.caller(rt);
    let mut clients = Clients::new(channel);
    let kinds = [Call::NoHeader, Call::NoAudience, Call::FirstMessage];
    let mut figures = [(); 3].map(|()| (Vec::new(), Vec::new()));
    rt.block_on(async {
        for kind in kinds {
            kind.percentiles(&mut clients, WARM_UP).await;
        }
        for _ in 0..ROUNDS {
            for (kind, (p50s, p99s)) in kinds.iter().zip(&mut figures) {
                let (p50, p99) = kind.percentiles(&mut clients, CALLS).await;
                p50s.push(p50);
                p99s.push(p99);
            }
        }
    });
    let [(bare50, bare99), (hop50, hop99), (fetch50, fetch99)] = &figures;
    println!(
        "  cached caller: FetchX509SVID first message, {ROUNDS} rounds of {CALLS} streams on \
         one connection: p50 {} us, p99 {} us (target p99 <= 1 ms)",
        spread(fetch50, 0),
        spread(fetch99, 0)
    );
    println!(
        "     same connection, no attestation: unary call refused for its missing header p50 {} \
         us, p99 {} us; FetchJWTSVID refused for its missing audience (one blocking-pool hop) \
         p50 {} us, p99 {} us; the stream's p50 is {:.1}x the bare round trip",
        spread(bare50, 0),
        spread(bare99, 0),
        spread(hop50, 0),
        spread(hop99, 0),
        median(fetch50) / median(bare50)
    );
}

/// First-message latency of a fresh caller process, from its first request; then, to tell
/// what a first request pays for, as many fresh callers whose first request attests nothing.
fn first_time_callers(site: &Site, rt: &Runtime) {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let (mut bare_first, mut after_bare) = (Vec::new(), Vec::new());
    for n in 0..2 * FRESH_CALLERS {
        let (_caller, channel) = site.caller(rt);
        let mut clients = Clients::new(channel);
        rt.block_on(async {
            if n % 2 == 0 {
                first.push(micros(Call::FirstMessage.time(&mut clients).await));
                second.push(micros(Call::FirstMessage.time(&mut clients).await));
            } else {
                bare_first.push(micros(Call::NoHeader.time(&mut clients).await));
                after_bare.push(micros(Call::FirstMessage.time(&mut clients).await));
            }
        });
    }
    first.sort_by(f64::total_cmp);
    println!(
        "  first-time caller: FetchX509SVID first message, a fresh python3 each, its first \
         request on its connection, {FRESH_CALLERS} callers: p50 {:.0} us, p99 (the slowest) \
         {:.0} us, fastest {:.0} us; its second stream p50 {:.0} us",
        percentile(&first, 50),
        percentile(&first, 99),
        first[0],
        median(&second)
    );
    println!(
        "     {FRESH_CALLERS} more fresh callers, a call refused for its missing header first: \
         that call p50 {:.0} us, then their first stream p50 {:.0} us",
        median(&bare_first),
        median(&after_bare)
    );
}

/// JWT-SVID validations per second, in-process and through the API.
fn validation(site: &Site, rt: &Runtime) {
    let authority = JwtAuthority::generate(TD.parse().expect("trust domain")).expect("JWT key");
    let subject: SpiffeId = format!("spiffe://{TD}/py").parse().expect("SPIFFE ID");
    let minted = authority
        .mint(
            &subject,
            &[AUDIENCE.to_owned()],
            SystemTime::now(),
            Duration::from_mins(5),
        )
        .expect("a JWT-SVID");
    let mut bundles = JwtBundleSet::new();
    bundles.insert(authority.bundle());

    let (_caller, channel) = site.caller(rt);
    let mut client = Clients::new(channel).with_header;
    let token = rt
        .block_on(client.fetch_jwtsvid(jwt_request(AUDIENCE)))
        .expect("the daemon's JWT-SVID")
        .into_inner()
        .svids
        .into_iter()
        .next()
        .expect("a JWT-SVID")
        .svid;
    let request = ValidateJwtsvidRequest {
        audience: AUDIENCE.to_owned(),
        svid: token,
    };
    let (mut local, mut api) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        local.push(rate(|| {
            black_box(
                validate_jwt_svid(&minted.token, AUDIENCE, &bundles, SystemTime::now())
                    .expect("valid"),
            );
        }));
        api.push(rt.block_on(async {
            let started = Instant::now();
            let mut count = 0_u32;
            while started.elapsed() < VALIDATE_ROUND {
                client
                    .validate_jwtsvid(request.clone())
                    .await
                    .expect("validated");
                count += 1;
            }
            f64::from(count) / started.elapsed().as_secs_f64()
        }));
    }
    println!(
        "  ValidateJWTSVID, {ROUNDS} alternating rounds of {VALIDATE_ROUND:?}: in-process on \
         one thread {}/s; through the API, sequential calls on one connection {}/s ({:.2} of \
         in-process)",
        spread(&local, 0),
        spread(&api, 0),
        median(&api) / median(&local)
    );
}

/// Runs `op` for one [`VALIDATE_ROUND`]; returns the rate per second.
fn rate(mut op: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut count = 0_u32;
    while started.elapsed() < VALIDATE_ROUND {
        op();
        count += 1;
    }
    f64::from(count) / started.elapsed().as_secs_f64()
}

/// What one round of held streams measured.
struct HeldRound {
    /// From the first request to the last first message, in milliseconds.
    opened_ms: f64,
    /// RSS added (MiB) since before the first round, with the streams open after
    /// [`IDLE_HOLD`].
    rss_mib: f64,
    /// Daemon threads then.
    threads: u64,
    /// The daemon's CPU while it held them idle for [`IDLE_HOLD`], in percent of one core.
    cpu_percent: f64,
    /// Streams that got the rotated SVID.
    rotated: usize,
    /// From the first of them receiving it to the last, in milliseconds.
    push_ms: f64,
}

/// 1,000 streams held open through rotations.
fn many_streams(site: &Site, rt: &Runtime) {
    let callers: Vec<(HandedConnection, Client)> = (0..STREAM_CONNECTIONS)
        .map(|_| {
            let (caller, channel) = site.caller(rt);
            (caller, Clients::new(channel).with_header)
        })
        .collect();
    let clients: Vec<Client> = callers.iter().map(|(_, client)| client.clone()).collect();
    let pid = site.node.pid();
    // Start right after a rotation, so that none comes while the streams open.
    rt.block_on(async {
        let mut client = clients[0].clone();
        let (_, mut stream, _) = first_message(&mut client).await;
        timeout(ROTATION_GUARD, stream.message())
            .await
            .expect("a rotation within 25 s")
            .expect("the rotated SVID")
            .expect("a message");
    });
    let baseline = Usage::of(pid);
    let mut rounds = Vec::new();
    while rounds.len() < PUSH_ROUNDS {
        match rt.block_on(hold_streams(&clients, pid, &baseline)) {
            Some(round) => rounds.push(round),
            None => println!(
                "     (a rotation came while the streams opened: round dropped, the next starts \
                 after it)"
            ),
        }
    }
    let figure = |of: fn(&HeldRound) -> f64, decimals| {
        spread(&rounds.iter().map(of).collect::<Vec<_>>(), decimals)
    };
    let list = |of: fn(&HeldRound) -> f64| {
        rounds
            .iter()
            .map(|round| format!("{:.1}", of(round)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::thread::sleep(Duration::from_secs(1));
    let after = Usage::of(pid);
    println!(
        "  {STREAMS} FetchX509SVID streams on {STREAM_CONNECTIONS} connections, {PUSH_ROUNDS} \
         rounds (20 s SVIDs): opened in {} ms; daemon RSS added {} MiB [{}] (target <= 10 MB) \
         over {:.1} MiB before the first, threads {} -> [{}], after the last closed +{:.1} MiB; \
         daemon CPU holding them idle {} % of a core",
        figure(|round| round.opened_ms, 0),
        figure(|round| round.rss_mib, 1),
        list(|round| round.rss_mib),
        kib_to_mib(baseline.rss_kib),
        baseline.threads,
        rounds
            .iter()
            .map(|round| round.threads.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        kib_to_mib(after.rss_kib.saturating_sub(baseline.rss_kib)),
        figure(|round| round.cpu_percent, 0),
    );
    println!(
        "     one rotation pushed to all of them, first stream to last: {} ms; got it: {}",
        figure(|round| round.push_ms, 0),
        rounds
            .iter()
            .map(|round| format!("{}/{STREAMS}", round.rotated))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Opens [`STREAMS`] streams spread over `clients`, reads their first messages, measures the
/// daemon `pid`, then waits for the next rotation on every stream. `None` when the first
/// messages differ (a rotation came while they opened).
async fn hold_streams(clients: &[Client], pid: u32, baseline: &Usage) -> Option<HeldRound> {
    let started = Instant::now();
    let mut opening = JoinSet::new();
    for n in 0..STREAMS {
        let mut client = clients[n % clients.len()].clone();
        opening.spawn(async move {
            let (_, stream, svid) = first_message(&mut client).await;
            (stream, svid)
        });
    }
    let opened = opening.join_all().await;
    let opened_ms = started.elapsed().as_secs_f64() * 1e3;
    if opened.iter().any(|(_, svid)| *svid != opened[0].1) {
        // Wait for the next rotation before the next round.
        let (mut stream, _) = opened.into_iter().next().expect("a stream");
        let _ = timeout(ROTATION_GUARD, stream.message()).await;
        return None;
    }
    let mut waiting = JoinSet::new();
    for (mut stream, first) in opened {
        waiting.spawn(async move {
            match timeout(ROTATION_GUARD, stream.message()).await {
                Ok(Ok(Some(message))) => {
                    let arrived = Instant::now();
                    (svid_of(message) != first).then_some(arrived)
                }
                _ => None,
            }
        });
    }
    // The rotation is some 9 s away: the streams sit idle meanwhile.
    let with = Usage::of(pid);
    tokio::time::sleep(IDLE_HOLD).await;
    let held = Usage::of(pid);
    let arrivals: Vec<Instant> = waiting.join_all().await.into_iter().flatten().collect();
    let push_ms = match (arrivals.iter().min(), arrivals.iter().max()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64() * 1e3,
        _ => f64::NAN,
    };
    #[expect(clippy::cast_precision_loss, reason = "figures for display")]
    let cpu_percent = held.cpu_ticks.saturating_sub(with.cpu_ticks) as f64
        / clock_ticks()
        / held.at.duration_since(with.at).as_secs_f64()
        * 100.0;
    Some(HeldRound {
        opened_ms,
        rss_mib: kib_to_mib(held.rss_kib.saturating_sub(baseline.rss_kib)),
        threads: held.threads,
        cpu_percent,
        rotated: arrivals.len(),
        push_ms,
    })
}

/// The daemon's RSS, threads and CPU time at one moment.
struct Usage {
    at: Instant,
    rss_kib: u64,
    threads: u64,
    /// User and system time, in clock ticks.
    cpu_ticks: u64,
}

impl Usage {
    fn of(pid: u32) -> Self {
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in the daemon's status"))
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon's stat");
        // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or_default()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|value| value.parse().expect("utime and stime"))
            .collect();
        Self {
            at: Instant::now(),
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
            cpu_ticks: fields.iter().sum(),
        }
    }
}

#[expect(clippy::cast_precision_loss, reason = "figures for display")]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

//! `cargo xtask demo`: the daemon on one screen.
//!
//! Two network namespaces joined by a veth link are nodes A and B; each gets a scope cgroup and
//! a real `enforcer run` daemon enforcing `policies/demo.toml`, filled in for that node. `api`
//! (a python3 HTTP server) serves on B in a container run by runc, in its own network namespace
//! on B's pod network, as a CNI plugin wires one; on A, `web` (a copy of curl, pinned by its
//! SHA-256) and `db` (curl) call it. The demo shows an allowed call through the mTLS tunnel, a denied
//! one, a plaintext bypass from an unenrolled process, an impostor binary swapped in at web's
//! path, the audit trail (`enforcer flows`), and a policy reload through the CLI that flips
//! web's decision.
//!
//! Every outcome printed is what the client saw. One that is not what the policy says is
//! reported as a mismatch, with the daemons' logs, and the demo exits 1. Everything is removed
//! at the end, also when a step panics (the harness's guards). Needs root.
#![expect(
    unused_crate_dependencies,
    reason = "an example uses the library, not every dependency"
)]

use std::{
    ffi::OsStr,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    attest::Sha256Digest,
    audit::{AuditRecord, Event, Verdict},
    testing::{
        Container, DaemonNode, Netns, PodNetwork, ScratchCgroup, Spawn, TestPki, connect_nodes,
        demo_policy, require_root, route_pod_networks,
    },
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// The rule of `policies/demo.toml` that the reload step turns into a deny.
const WEB_RULE: &str = "[[allow]]\nfrom = \"spiffe://demo.enforcer.local/web\"";
const TD: &str = "demo.enforcer.local";
const API_PORT: u16 = 8080;
/// What `api` serves.
const HELLO: &str = "hello from api";
/// `api`: an HTTP server answering every GET with its argument (the demo gives [`HELLO`]).
const API_PY: &str = r#"
import http.server, sys
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (sys.argv[1] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"#;
/// Debian's curl and python3, which `cargo xtask setup` installs: real binaries (not shims
/// such as pyenv's), so copies of them run.
const CURL: &str = "/usr/bin/curl";
const PYTHON: &str = "/usr/bin/python3";
/// Short timeouts keep the refused steps quick.
const CURL_ARGS: [&str; 5] = ["-sS", "--connect-timeout", "3", "--max-time", "10"];
/// The impostor's client: print the body, or the error and exit 28 (curl's "timed out") or 1.
const FETCH_PY: &str = r#"
import sys, urllib.request
try:
    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())
except Exception as error:
    reason = getattr(error, "reason", error)
    print(f"web-client: {type(reason).__name__}: {reason}", file=sys.stderr)
    sys.exit(28 if isinstance(reason, TimeoutError) else 1)
"#;
/// How long to wait for a daemon to register a workload or write a record.
const WAIT: Duration = Duration::from_secs(15);
/// Hang guard for one client.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    require_root();
    let started = Instant::now();
    let mut problems = Vec::new();
    // Every guard is dropped when `run` returns (or unwinds): processes, daemons, pins,
    // cgroups, namespaces, files. What they should have removed is checked after.
    let made = run(&mut problems);
    // A killed container's init is reaped by the host's init, a moment after runc returns.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut left = made.still_there();
    while !left.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        left = made.still_there();
    }
    if left.is_empty() {
        println!(
            "cleaned up: daemons stopped, programs detached, namespaces and cgroups removed \
             (demo took {:.1} s)",
            started.elapsed().as_secs_f64()
        );
    } else {
        problems.push(format!("left behind: {}", left.join(", ")));
    }
    for problem in &problems {
        eprintln!("demo: {problem}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The steps; returns what the demo made, to check once its guards are gone.
fn run(problems: &mut Vec<String>) -> Made {
    let demo = Demo::start();
    let made = demo.made();
    demo.header();

    let seen = fetch(demo.curl(&demo.web, &demo.web_client));
    outcome(
        problems,
        "1. web -> api:8080",
        &seen,
        true,
        "through the mTLS tunnel: web's SVID on node a <-> api's SVID on node b",
    );
    let seen = fetch(demo.curl(&demo.db, CURL));
    outcome(
        problems,
        "2. db -> api:8080",
        &seen,
        false,
        "no rule lets db reach api: the tunnel refuses the connection",
    );
    let seen = fetch(demo.curl(&demo.outside, CURL));
    outcome(
        problems,
        "3. bypass -> api:8080",
        &seen,
        false,
        "plaintext from an unenrolled process: node b's kernel drops it",
    );

    let impostor_sha256 = demo.install_web_client(PYTHON);
    let seen = fetch(demo.python(&demo.web, &demo.web_client));
    let why = format!(
        "same path, same cgroup, but web-client is python3 now: sha256 {}.. != pinned {}..",
        short(impostor_sha256),
        short(demo.web_sha256)
    );
    outcome(problems, "4. impostor as web", &seen, false, &why);

    demo.show_flows(problems);
    demo.reload(problems);
    if !problems.is_empty() {
        for (name, node) in [("a", &demo.a), ("b", &demo.b)] {
            eprintln!(
                "--- node {name}: the end of its daemon's log\n{}",
                tail(&node.log(), 20)
            );
        }
    }
    made
}

/// The two nodes, their workload cgroups and the scratch files.
struct Demo {
    // The server first: it goes before the cgroups, daemons and pod networks.
    server: Container,
    web: ScratchCgroup,
    db: ScratchCgroup,
    /// A cgroup outside node A's scope, so not enrolled.
    outside: ScratchCgroup,
    a: DaemonNode,
    b: DaemonNode,
    _pods: (PodNetwork, PodNetwork),
    peers: [Ipv4Addr; 2],
    /// Node B's pod network, which node A's policy routes to B.
    pods_b: String,
    /// The web client's binary.
    web_client: PathBuf,
    /// What the policy pins web's binary to: the SHA-256 of the curl copy.
    web_sha256: Sha256Digest,
    scratch: TempDir,
}

impl Demo {
    fn start() -> Self {
        let binary = enforcer_binary();
        let scratch = TempDir::new().expect("scratch directory");
        fs::create_dir(scratch.path().join("bin")).expect("create the bin directory");
        let web_client = scratch.path().join("bin").join("web-client");
        let web_sha256 = install(CURL, &web_client);

        let link = connect_nodes(&Netns::new("demo-a"), &Netns::new("demo-b"));
        let pods = (
            PodNetwork::new(link.0.netns()),
            PodNetwork::new(link.1.netns()),
        );
        route_pod_networks(&pods.0, &pods.1, &link);
        let (link_a, link_b) = link;
        let peers = [link_a.addr4(), link_b.addr4()];
        let pods_b = pods.1.subnet4();
        let pki = TestPki::new(TD);
        let policy = |scope: &str| demo_policy(scope, (peers, &pods_b), web_sha256);
        let a = DaemonNode::start(&binary, &link_a, "a", &pki.root, policy);
        let b = DaemonNode::start(&binary, &link_b, "b", &pki.root, policy);
        let server = Container::builder(&pods.1.attach("api"), &b.scope().child("api"))
            .args(["python3", "-c", API_PY, HELLO])
            .start();
        server.wait_for_listener(API_PORT);
        let api = format!("\"{}\"", id("api"));
        b.wait_until("node b to give the api server its identity", |b| {
            b.cli_ok(&["workloads", "--json"]).contains(&api)
        });
        Self {
            server,
            web: a.scope().child("web"),
            db: a.scope().child("db"),
            outside: ScratchCgroup::new("demo-outside"),
            a,
            b,
            _pods: pods,
            peers,
            pods_b,
            web_client,
            web_sha256,
            scratch,
        }
    }

    fn header(&self) {
        println!(
            "enforcer demo: two nodes, one daemon each (policies/demo.toml, trust domain {TD})"
        );
        println!(
            "  node a {}  web: {} (curl copy, sha256 {}.. pinned); db: curl",
            self.peers[0],
            self.web_client.display(),
            short(self.web_sha256)
        );
        println!(
            "  node b {}  api: python3 HTTP server :{API_PORT} in runc container {} (pod {})",
            self.peers[1],
            &self.server.id()[..12],
            self.server.addr4()
        );
        println!();
    }

    /// What to remove-check at the end: namespaces, pin directories, cgroups, files, pids.
    fn made(&self) -> Made {
        let mut paths = vec![
            self.scratch.path().to_owned(),
            self.outside.path().to_owned(),
        ];
        let mut pids = Vec::new();
        for node in [&self.a, &self.b] {
            paths.extend([
                node.pin_dir().to_owned(),
                node.scope().path().to_owned(),
                node.dir().to_owned(),
            ]);
            pids.push(node.pid());
        }
        pids.push(self.server.pid());
        Made {
            netns: [&self.a, &self.b].map(|node| node.link().netns().name().to_owned()),
            paths,
            pids,
        }
    }

    fn url(&self) -> String {
        format!("http://{}:{API_PORT}/", self.server.addr4())
    }

    /// `program` (a curl) fetching api's page from `cgroup` of node A, in an empty environment:
    /// web's entry pins curl's hash, which `LD_LIBRARY_PATH` (set by `cargo run`) would void.
    fn curl(&self, cgroup: &ScratchCgroup, program: impl AsRef<OsStr>) -> Spawn {
        self.a
            .spawn(cgroup, program)
            .env_clear()
            .args(CURL_ARGS)
            .arg(self.url())
    }

    /// `program` (a copied python3) fetching api's page from `cgroup` of node A. `PYTHONHOME`
    /// tells the copy where its standard library is, since it no longer sits next to it.
    fn python(&self, cgroup: &ScratchCgroup, program: impl AsRef<OsStr>) -> Spawn {
        self.a
            .spawn(cgroup, program)
            .env("PYTHONHOME", "/usr")
            .args(["-c", FETCH_PY])
            .arg(self.url())
    }

    /// Put a copy of `source` at web's path (a new file renamed over the old one, as an update
    /// or an attacker would) and return its SHA-256.
    fn install_web_client(&self, source: &str) -> Sha256Digest {
        let staged = self.web_client.with_extension("new");
        let digest = install(source, &staged);
        fs::rename(&staged, &self.web_client).unwrap_or_else(|error| {
            panic!("failed to replace {}: {error}", self.web_client.display())
        });
        digest
    }

    /// Step 5: the records of steps 1 to 4, as `enforcer flows` prints them.
    fn show_flows(&self, problems: &mut Vec<String>) {
        let web = id("web");
        let db = id("db");
        let from = |record: &AuditRecord, who: &str| record.src.spiffe_id.as_deref() == Some(who);
        println!();
        println!("5. enforcer flows: the records of 1-4 on node a, then on node b");
        show_records(
            problems,
            &self.a,
            &[
                ("web's flow", &|r| {
                    r.event == Event::Open && r.verdict == Verdict::Allow && from(r, &web)
                }),
                ("db's deny", &|r| r.verdict == Verdict::Deny && from(r, &db)),
                ("the impostor's deny", &|r| {
                    r.verdict == Verdict::Deny && r.reason == "no-identity"
                }),
            ],
        );
        show_records(
            problems,
            &self.b,
            &[
                ("web's flow arriving", &|r| {
                    r.event == Event::Open && r.verdict == Verdict::Allow && from(r, &web)
                }),
                ("the bypass's drop", &|r| r.verdict == Verdict::Drop),
            ],
        );
    }

    /// Step 6: web gets its own binary back, then a reload on both nodes flips its decision.
    fn reload(&self, problems: &mut Vec<String>) {
        println!();
        println!(
            "6. enforcer policy reload on both nodes, web -> api turned into a deny \
             (web-client is curl again):"
        );
        let restored = self.install_web_client(CURL);
        assert_eq!(restored, self.web_sha256, "the curl copy changed");
        let seen = fetch(self.curl(&self.web, &self.web_client));
        outcome(problems, "   v1: web -> api:8080", &seen, true, "");
        let [a, b] = [&self.a, &self.b].map(|node| {
            let file = node.dir().join("demo-v2.toml");
            let policy = deny_web(&demo_policy(
                node.scope_path(),
                (self.peers, &self.pods_b),
                self.web_sha256,
            ));
            fs::write(&file, policy).expect("write the changed policy");
            node.cli_ok(&["policy", "reload", &file.to_string_lossy()])
        });
        for line in a.lines() {
            println!("   a: {line}");
        }
        // The changes are the same on both nodes; b's are printed only if they differ.
        let (b_first, b_changes) = b.split_once('\n').unwrap_or((&b, ""));
        let a_changes = a.split_once('\n').map_or("", |(_, rest)| rest);
        println!("   b: {b_first}");
        if b_changes != a_changes {
            for line in b_changes.lines() {
                println!("   b: {line}");
            }
        }
        let seen = fetch(self.curl(&self.web, &self.web_client));
        outcome(problems, "   v2: web -> api:8080", &seen, false, "");
        let web = id("web");
        show_records(
            problems,
            &self.a,
            &[("web's deny under version 2", &|r| {
                r.verdict == Verdict::Deny
                    && r.policy_version == 2
                    && r.src.spiffe_id.as_deref() == Some(web.as_str())
            })],
        );
    }
}

/// What a client saw.
enum Seen {
    /// It exited 0; the first line of the body.
    Answer(String),
    /// It failed with no answer (refused or reset); its error.
    Refused(String),
    /// It timed out waiting (exit status 28); its error.
    TimedOut(String),
}

/// Print one outcome line, `what LABEL detail`, then `(why)` if given; or, when the client's
/// fate is not what the policy says (`allowed`: it gets api's page), a mismatch instead.
fn outcome(problems: &mut Vec<String>, what: &str, seen: &Seen, allowed: bool, why: &str) {
    let (label, detail) = match seen {
        Seen::Answer(body) => ("ALLOWED", format!("{body:?}")),
        Seen::Refused(error) => ("DENIED", error.clone()),
        Seen::TimedOut(error) => ("DROPPED", error.clone()),
    };
    let got_page = matches!(seen, Seen::Answer(body) if body == HELLO);
    println!("{what:<24}{label:<9}{detail}");
    if got_page != allowed {
        let says = if allowed { "allows" } else { "denies" };
        println!("   MISMATCH: the policy {says} it");
        problems.push(format!(
            "{}: {label}, but the policy {says} it",
            what.trim()
        ));
    } else if !why.is_empty() {
        println!("   ({why})");
    }
}

/// Run a client to completion and classify what it saw.
fn fetch(spawn: Spawn) -> Seen {
    let mut client = spawn.spawn();
    let status = client
        .wait_timeout(CLIENT_LIMIT)
        .unwrap_or_else(|| panic!("a client hung; stderr: {}", client.stderr()));
    let body = client.read_line(Duration::from_secs(1));
    if status.success() {
        return Seen::Answer(body.unwrap_or_default());
    }
    // The stderr reader may lag the exit by a moment.
    let deadline = Instant::now() + Duration::from_secs(1);
    while client.stderr().trim().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let stderr = client.stderr();
    let mut error = stderr.lines().next().unwrap_or("(no message)").to_owned();
    if let Some(body) = body {
        error = format!("{error}, after receiving {body:?}");
    }
    if status.code() == Some(28) {
        Seen::TimedOut(error)
    } else {
        Seen::Refused(error)
    }
}

/// Whether a record is the one wanted.
type RecordTest<'a> = dyn Fn(&AuditRecord) -> bool + 'a;

/// Wait for a record matching each `(what, matches)` on `node` and print the first match of
/// each, as `enforcer flows` prints it; a missing record is a problem.
fn show_records(problems: &mut Vec<String>, node: &DaemonNode, wanted: &[(&str, &RecordTest)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let records = node.flows(&[]);
        let found: Vec<Option<&AuditRecord>> = wanted
            .iter()
            .map(|(_, matches)| records.iter().find(|r| matches(r)))
            .collect();
        if found.iter().all(Option::is_some) || Instant::now() >= deadline {
            for ((what, _), record) in wanted.iter().zip(found) {
                if let Some(record) = record {
                    println!("   {record}");
                } else {
                    println!("   (no record of {what})   MISMATCH");
                    problems.push(format!("enforcer flows has no record of {what}"));
                }
            }
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// What the demo made, checked after its guards removed it.
struct Made {
    netns: [String; 2],
    paths: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl Made {
    /// Whatever still exists, by name.
    fn still_there(&self) -> Vec<String> {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default();
        let netns = self
            .netns
            .iter()
            .filter(|name| listed.split_whitespace().any(|word| word == *name))
            .map(|name| format!("netns {name}"));
        let paths = self
            .paths
            .iter()
            .filter(|path| path.exists())
            .map(|path| path.display().to_string());
        let pids = self
            .pids
            .iter()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .map(|pid| format!("pid {pid}"));
        netns.chain(paths).chain(pids).collect()
    }
}

/// The `enforcer` binary built next to this example: `target/<profile>/examples/demo` is this
/// program, `target/<profile>/enforcer` the daemon.
fn enforcer_binary() -> PathBuf {
    let me = std::env::current_exe().expect("the demo's own path");
    let binary = me.parent().and_then(Path::parent).map_or_else(
        || panic!("{} has no grandparent directory", me.display()),
        |profile| profile.join("enforcer"),
    );
    assert!(
        binary.is_file(),
        "{} is missing: build it first (`cargo build --release -p enforcer --bin enforcer`), \
         or run the demo with `cargo xtask demo`, which does",
        binary.display()
    );
    binary
}

/// `policy` with its web -> api rule turned from an allow into a deny.
fn deny_web(policy: &str) -> String {
    let deny = WEB_RULE.replacen("[[allow]]", "[[deny]]", 1);
    let changed = policy.replacen(WEB_RULE, &deny, 1);
    assert_ne!(
        changed, policy,
        "policies/demo.toml has no rule starting `{WEB_RULE}`"
    );
    changed
}

/// Copy the binary `source` to `target` (keeping its permissions) and return its SHA-256.
fn install(source: &str, target: &Path) -> Sha256Digest {
    fs::copy(source, target)
        .unwrap_or_else(|error| panic!("failed to copy {source} to {}: {error}", target.display()));
    let bytes = fs::read(target)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", target.display()));
    Sha256Digest(Sha256::digest(&bytes).into())
}

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// The first 8 hex digits of a digest.
fn short(digest: Sha256Digest) -> String {
    digest.to_string()[..8].to_owned()
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

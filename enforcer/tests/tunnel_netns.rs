//! The tunnel on a real kernel: two network namespaces as nodes A and B joined by veth, the
//! datapath attached to each node's scope cgroup, each node's tunnel serving inside its
//! namespace, and real workloads in enrolled cgroups (`python3 -m http.server`, `curl`,
//! `iperf3`). Node A runs the clients `web` (allowed to reach `api`) and `db` (denied); node B
//! runs the `api` servers, a same-node `web` client and a same-node `db` client. A policy
//! reload that denies `web` closes its open tunnelled connection.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    process::ExitStatus,
    time::{Duration, Instant},
};

use enforcer::{
    identity::SpiffeId,
    kernel::{Counter, EventKind},
    testing::{
        Netns, ScratchCgroup, Spawn, Spawned, TestPki, TunnelNode, WorkloadClient, connect_nodes,
        mesh_policy, require_root, serial,
    },
    tunnel::{FlowEvent, FlowRecord, FlowVerdict, Reason, Refusal, Side},
};
use tempfile::TempDir;

const TD: &str = "netns.test";
/// The HTTP workload's port on node B.
const HTTP_PORT: u16 = 8080;
/// The iperf3 workload's port on node B.
const IPERF_PORT: u16 = 5201;
/// What `hello.txt` holds.
const HELLO: &str = "hello through the tunnel";
/// Size of `big.bin`, served slowly so a connection stays open.
const BIG_BYTES: usize = 8 << 20;
/// curl's own limit on every request.
const CURL_MAX_TIME: &str = "10";
/// Hang guard for flows that must fail promptly: well below curl's own limit (not a
/// performance assertion; a failure that only a timeout ends would take longer).
const PROMPT: Duration = Duration::from_secs(5);
/// Hang guard for whole commands.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for a kernel event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `web` may reach `api` on the HTTP and iperf3 ports (rule 1); `db` may not (rule 2).
const ALLOW_WEB: &str = r#"
[[allow]]
from = "spiffe://netns.test/web"
to = "spiffe://netns.test/api"
ports = [8080, 5201]

[[deny]]
from = "spiffe://netns.test/db"
to = "spiffe://netns.test/api"
"#;

/// After a reload: nobody may reach `api` (rule 1).
const DENY_ALL: &str = r#"
[[deny]]
from = "spiffe://netns.test/*"
to = "spiffe://netns.test/api"
"#;

fn id(name: &str) -> SpiffeId {
    format!("spiffe://{TD}/{name}").parse().unwrap()
}

/// A node's policy: its scope enrolled, `web`, `db` and `api` as cgroups below it, both nodes
/// as mesh peers, then `rules`.
fn policy(scope: &str, peers: [IpAddr; 2], rules: &str) -> String {
    mesh_policy(TD, scope, &["web", "db", "api"], &peers, rules)
}

/// Two nodes and their workload cgroups, plus the files the HTTP workload serves.
struct Mesh {
    a: TunnelNode,
    b: TunnelNode,
    a_web: ScratchCgroup,
    a_db: ScratchCgroup,
    b_web: ScratchCgroup,
    b_api: ScratchCgroup,
    site: TempDir,
}

impl Mesh {
    fn new() -> Self {
        let (link_a, link_b) = connect_nodes(&Netns::new("node-a"), &Netns::new("node-b"));
        let peers = [link_a.addr4().into(), link_b.addr4().into()];
        let pki = TestPki::new(TD);
        let a = TunnelNode::start(&link_a, "a", &pki, |scope| policy(scope, peers, ALLOW_WEB));
        let b = TunnelNode::start(&link_b, "b", &pki, |scope| policy(scope, peers, ALLOW_WEB));
        let site = TempDir::new().unwrap();
        fs::write(site.path().join("hello.txt"), format!("{HELLO}\n")).unwrap();
        fs::write(site.path().join("big.bin"), vec![b'x'; BIG_BYTES]).unwrap();
        Self {
            a_web: a.scope().child("web"),
            a_db: a.scope().child("db"),
            b_web: b.scope().child("web"),
            b_api: b.scope().child("api"),
            a,
            b,
            site,
        }
    }

    /// Where B's HTTP workload listens.
    fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.b.addr(), HTTP_PORT)
    }

    fn url(&self, file: &str) -> String {
        format!("http://{}/{file}", self.http_addr())
    }

    /// `python3 -m http.server` in B's `api` cgroup, registered with node B.
    fn http_server(&self) -> Spawned {
        let server = self
            .b
            .spawn(&self.b_api, "python3")
            .args(["-m", "http.server", "--bind"])
            .arg(self.b.addr().to_string())
            .arg("--directory")
            .arg(self.site.path())
            .arg(HTTP_PORT.to_string())
            .spawn();
        assert_eq!(self.b.register_server(&server, self.http_addr()), id("api"));
        server
    }

    /// Reload both nodes with `rules`; returns how many flows each closed.
    fn reload(&mut self, rules: &str) -> (usize, usize) {
        let peers = [self.a.addr(), self.b.addr()];
        let text_a = policy(self.a.scope_path(), peers, rules);
        let text_b = policy(self.b.scope_path(), peers, rules);
        (self.a.reload(&text_a), self.b.reload(&text_b))
    }
}

/// curl `url` with the given extra arguments, never through a proxy.
fn curl(spawn: Spawn, url: &str, extra: &[&str]) -> Spawn {
    spawn
        .args(["-sS", "--noproxy", "*", "--max-time", CURL_MAX_TIME])
        .args(extra)
        .arg(url)
}

/// How a finished command ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    pid: u32,
}

/// Run `spawn` to completion within `limit`, panicking if it takes longer.
fn run(spawn: Spawn, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut process = spawn.spawn();
    let status = process.wait_timeout(limit).unwrap_or_else(|| {
        panic!(
            "pid {} still runs after {limit:?}; stderr:\n{}",
            process.pid(),
            process.stderr()
        )
    });
    let elapsed = start.elapsed();
    let mut stdout = String::new();
    while let Some(line) = process.read_line(Duration::from_secs(1)) {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    Finished {
        status,
        stdout,
        stderr: process.stderr(),
        elapsed,
        pid: process.pid(),
    }
}

/// Panics unless `finished` is a client that failed promptly because its connection was
/// refused or reset (curl exit codes 7, 52, 55, 56), not because a timeout ended it.
fn assert_failed_fast(finished: &Finished) {
    let code = finished.status.code();
    assert!(
        matches!(code, Some(7 | 52 | 55 | 56)),
        "expected a refused or reset connection, got {} after {:?}; stderr: {}",
        finished.status,
        finished.elapsed,
        finished.stderr
    );
    assert!(
        finished.elapsed < PROMPT,
        "the refusal took {:?}",
        finished.elapsed
    );
}

/// A flow record of `side`, `event` from `src` to `dst` on `port`.
fn is(
    record: &FlowRecord,
    (side, event): (Side, FlowEvent),
    src: &SpiffeId,
    dst: &SpiffeId,
    port: u16,
) -> bool {
    record.side == side
        && record.event == event
        && record.src.id.as_ref() == Some(src)
        && record.dst.id.as_ref() == Some(dst)
        && record.dst.addr.map(|addr| addr.port()) == Some(port)
}

#[test]
fn the_allowed_identity_reaches_a_workload_on_another_node() {
    let _serial = serial();
    require_root();
    let mesh = Mesh::new();
    let _server = mesh.http_server();

    let spawn = mesh.a.spawn(&mesh.a_web, "curl");
    let fetched = run(curl(spawn, &mesh.url("hello.txt"), &[]), COMMAND_LIMIT);
    assert!(
        fetched.status.success(),
        "curl through the tunnel failed ({}): {}",
        fetched.status,
        fetched.stderr
    );
    assert_eq!(fetched.stdout.trim_end(), HELLO);

    let (web, api) = (id("web"), id("api"));
    let outbound = mesh
        .a
        .wait_for_record(|r| is(r, (Side::Outbound, FlowEvent::Open), &web, &api, HTTP_PORT));
    assert_eq!(
        (outbound.verdict, outbound.reason, outbound.rule),
        (FlowVerdict::Allow, Reason::Policy, Some(1))
    );
    assert_eq!(
        outbound.src.pid,
        Some(fetched.pid),
        "the kernel's redirect names the client"
    );
    assert_eq!(outbound.src.cgroup_id, Some(mesh.a_web.id()));
    assert_eq!(outbound.dst.addr, Some(mesh.http_addr()));
    assert_eq!(outbound.policy_version, 1);
    let inbound = mesh
        .b
        .wait_for_record(|r| is(r, (Side::Inbound, FlowEvent::Open), &web, &api, HTTP_PORT));
    assert_eq!(
        (inbound.verdict, inbound.reason, inbound.rule),
        (FlowVerdict::Allow, Reason::Policy, Some(1))
    );
    assert_eq!(
        inbound.src.addr.map(|addr| addr.ip()),
        Some(mesh.a.addr()),
        "the flow came over the veth link"
    );
    for node in [&mesh.a, &mesh.b] {
        let close = node.wait_for_record(|r| r.event == FlowEvent::Close);
        assert_eq!(close.reason, Reason::Finished);
        assert!(
            close.bytes_up > 0 && close.bytes_down > HELLO.len() as u64,
            "{close}"
        );
    }
}

#[test]
fn the_denied_identity_fails_fast() {
    let _serial = serial();
    require_root();
    let mesh = Mesh::new();
    let _server = mesh.http_server();

    let spawn = mesh.a.spawn(&mesh.a_db, "curl");
    let refused = run(curl(spawn, &mesh.url("hello.txt"), &[]), COMMAND_LIMIT);
    assert_failed_fast(&refused);
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);

    let (db, api) = (id("db"), id("api"));
    let inbound = mesh
        .b
        .wait_for_record(|r| is(r, (Side::Inbound, FlowEvent::Deny), &db, &api, HTTP_PORT));
    assert_eq!(
        (inbound.verdict, inbound.reason, inbound.rule),
        (FlowVerdict::Deny, Reason::Refused(Refusal::Denied), Some(2))
    );
    let outbound = mesh.a.wait_for_record(|r| {
        r.side == Side::Outbound && r.event == FlowEvent::Deny && r.src.id.as_ref() == Some(&db)
    });
    assert_eq!(outbound.verdict, FlowVerdict::Deny);
    assert_eq!(outbound.reason, Reason::Refused(Refusal::Denied));
    assert_eq!(outbound.src.pid, Some(refused.pid));
    assert!(
        mesh.b.records().iter().all(|r| r.event != FlowEvent::Open),
        "no flow may open: {:#?}",
        mesh.b.records()
    );
}

#[test]
fn a_direct_connection_bypassing_the_tunnel_is_dropped() {
    let _serial = serial();
    require_root();
    let mesh = Mesh::new();
    let server = mesh.http_server();
    let mut events = mesh.b.datapath().events().unwrap();
    drop(events.drain());
    let drops_before = mesh.b.counter(Counter::Drop);

    // Not enrolled, so not redirected: plain TCP from node A straight to B's workload port.
    let spawn = Spawn::new("curl").netns(mesh.a.link().netns());
    let direct = run(
        curl(spawn, &mesh.url("hello.txt"), &["--connect-timeout", "2"]),
        COMMAND_LIMIT,
    );
    assert_eq!(
        direct.status.code(),
        Some(28),
        "the SYNs must be dropped, so only the timeout ends curl ({}): {}",
        direct.status,
        direct.stderr
    );
    let dropped = events
        .wait_for(EVENT_TIMEOUT, |e| {
            e.kind == EventKind::Drop && e.dst == mesh.http_addr()
        })
        .unwrap_or_else(|| panic!("no DROP event for {}", mesh.http_addr()));
    assert_eq!(dropped.src.ip(), mesh.a.addr());
    assert_eq!(dropped.tgid, server.pid());
    assert_eq!(dropped.cgroup_id, mesh.b_api.id());
    assert!(mesh.b.counter(Counter::Drop) > drops_before);
    assert!(
        mesh.b.records().is_empty(),
        "the tunnel never saw the flow: {:#?}",
        mesh.b.records()
    );
}

#[test]
fn a_same_node_flow_passes_the_local_tunnel() {
    let _serial = serial();
    require_root();
    let mesh = Mesh::new();
    let _server = mesh.http_server();

    let spawn = mesh.b.spawn(&mesh.b_web, "curl");
    let fetched = run(curl(spawn, &mesh.url("hello.txt"), &[]), COMMAND_LIMIT);
    assert!(
        fetched.status.success(),
        "same-node curl failed ({}): {}",
        fetched.status,
        fetched.stderr
    );
    assert_eq!(fetched.stdout.trim_end(), HELLO);
    let (web, db, api) = (id("web"), id("db"), id("api"));
    let open = mesh
        .b
        .wait_for_record(|r| is(r, (Side::Outbound, FlowEvent::Open), &web, &api, HTTP_PORT));
    assert_eq!((open.verdict, open.rule), (FlowVerdict::Allow, Some(1)));
    assert_eq!(open.src.pid, Some(fetched.pid));
    assert!(
        mesh.b.records().iter().all(|r| r.side == Side::Outbound),
        "a same-node flow does not cross the inbound side: {:#?}",
        mesh.b.records()
    );
    assert!(mesh.a.records().is_empty(), "{:#?}", mesh.a.records());

    // A denied same-node pair whose identities the kernel knows is refused at connect().
    let mut client = WorkloadClient::start(
        Some(&mesh.b.scope().child("db")),
        Some(mesh.b.link().netns()),
    );
    assert_eq!(mesh.b.register(client.pid()), db);
    assert_eq!(
        client.ask(&format!("connect {} {HTTP_PORT}", mesh.b.addr())),
        "err 1",
        "EPERM"
    );
    assert!(mesh.b.counter(Counter::Deny) >= 1);
}

#[test]
fn iperf3_runs_through_the_tunnel() {
    let _serial = serial();
    require_root();
    let mesh = Mesh::new();
    let addr = SocketAddr::new(mesh.b.addr(), IPERF_PORT);
    let server = mesh
        .b
        .spawn(&mesh.b_api, "iperf3")
        .args(["-s", "-1", "-B"])
        .arg(mesh.b.addr().to_string())
        .args(["-p", &IPERF_PORT.to_string()])
        .spawn();
    assert_eq!(mesh.b.register_server(&server, addr), id("api"));

    let client = mesh
        .a
        .spawn(&mesh.a_web, "iperf3")
        .args(["-J", "-t", "1", "-c"])
        .arg(mesh.b.addr().to_string())
        .args(["-p", &IPERF_PORT.to_string()]);
    let finished = run(client, COMMAND_LIMIT);
    assert!(
        finished.status.success(),
        "iperf3 failed ({}): {}{}",
        finished.status,
        finished.stdout,
        finished.stderr
    );
    let report: serde_json::Value =
        serde_json::from_str(&finished.stdout).unwrap_or_else(|error| {
            panic!("iperf3 -J printed no JSON ({error}):\n{}", finished.stdout)
        });
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no end.sum_received.bytes in {report}"));
    assert!(received > 0, "the server received nothing: {report}");

    // The control and the data connection each crossed the tunnel, which delivered at least
    // everything the server counted.
    let (web, api) = (id("web"), id("api"));
    let closed = |node: &TunnelNode, side| {
        node.wait_for_records(2, |r| {
            is(r, (side, FlowEvent::Close), &web, &api, IPERF_PORT)
        })
    };
    let delivered: u64 = closed(&mesh.b, Side::Inbound)
        .iter()
        .map(|r| r.bytes_up)
        .sum();
    assert!(
        delivered >= received,
        "B's tunnel delivered {delivered} bytes, the server counted {received}"
    );
    assert!(
        closed(&mesh.a, Side::Outbound)
            .iter()
            .all(|r| r.verdict == FlowVerdict::Allow && r.rule == Some(1)),
        "{:#?}",
        mesh.a.records()
    );
}

#[test]
fn a_reload_closes_an_open_tunnelled_connection_it_denies() {
    let _serial = serial();
    require_root();
    let mut mesh = Mesh::new();
    let _server = mesh.http_server();
    let (web, api) = (id("web"), id("api"));

    // A slow download keeps one tunnelled flow open for far longer than the test.
    let spawn = mesh.a.spawn(&mesh.a_web, "curl");
    let mut download = curl(
        spawn,
        &mesh.url("big.bin"),
        &["--limit-rate", "256k", "-o", "/dev/null"],
    )
    .spawn();
    mesh.a
        .wait_for_record(|r| is(r, (Side::Outbound, FlowEvent::Open), &web, &api, HTTP_PORT));
    mesh.b
        .wait_for_record(|r| is(r, (Side::Inbound, FlowEvent::Open), &web, &api, HTTP_PORT));
    assert_eq!(mesh.a.tunnel().open_flows(), 1);

    let started = Instant::now();
    let (closed_a, closed_b) = mesh.reload(DENY_ALL);
    assert_eq!(closed_a, 1, "node A closes the flow the new policy denies");
    assert!(closed_b <= 1);
    let status = download
        .wait_timeout(PROMPT)
        .unwrap_or_else(|| panic!("the download still runs {PROMPT:?} after the reload"));
    assert!(
        !status.success(),
        "the download must end early ({status} after {:?}); stderr: {}",
        started.elapsed(),
        download.stderr()
    );
    let revoked = mesh
        .a
        .wait_for_record(|r| is(r, (Side::Outbound, FlowEvent::Close), &web, &api, HTTP_PORT));
    assert_eq!(
        (
            revoked.verdict,
            revoked.reason,
            revoked.rule,
            revoked.policy_version
        ),
        (FlowVerdict::Deny, Reason::Revoked, Some(1), 2)
    );
    assert!(
        revoked.bytes_down < BIG_BYTES as u64,
        "closed before the end: {revoked}"
    );
    mesh.b
        .wait_for_record(|r| is(r, (Side::Inbound, FlowEvent::Close), &web, &api, HTTP_PORT));
    assert_eq!(mesh.a.tunnel().open_flows(), 0);

    // New connections now fail fast, decided by the new version.
    let spawn = mesh.a.spawn(&mesh.a_web, "curl");
    let refused = run(curl(spawn, &mesh.url("hello.txt"), &[]), COMMAND_LIMIT);
    assert_failed_fast(&refused);
    let denied = mesh
        .b
        .wait_for_record(|r| is(r, (Side::Inbound, FlowEvent::Deny), &web, &api, HTTP_PORT));
    assert_eq!(
        (denied.reason, denied.rule, denied.policy_version),
        (Reason::Refused(Refusal::Denied), Some(1), 2)
    );
}

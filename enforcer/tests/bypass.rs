//! No way around the enforcer: every claim of the security model attacked the way an intruder
//! on a node would, on two network namespaces as nodes A and B, each running a real
//! `enforcer run`. One test per principle (README, "Security model"); the attackers are
//! unprivileged processes in enrolled cgroups, unenrolled processes (below the scope cgroup, where
//! the hooks see them, as on a node whose scope is the root cgroup), processes holding only
//! `CAP_NET_RAW`, and peers holding a valid SVID. Root on the node is trusted (it can detach the
//! programs, and owns the cgroup files an enrolled process would have to write to leave), so
//! no test attacks as root.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitStatus,
    time::{Duration, SystemTime},
};

use enforcer::{
    identity::SpiffeId,
    kernel::Maps,
    testing::{
        DaemonNode, Netns, Node, Persona, ScratchCgroup, Spawned, TestPki, WorkloadClient,
        connect_nodes, require_root, serial, wait_for_listener,
    },
    tunnel::{Placement, Pool, PoolError, Refusal, SystemMonotonicClock, TunnelConfig, Untagged},
};
use rustix::process::Signal;
use tempfile::TempDir;

const TD: &str = "bypass.test";
/// The workload's port on node B.
const HTTP_PORT: u16 = 8080;
/// What `hello.txt` holds.
const HELLO: &str = "hello past the enforcer";
/// Hang guard for whole commands (not a performance assertion).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// The daemon's redirect and inbound ports.
const OUTBOUND_PORT: u16 = 15_001;
const INBOUND_PORT: u16 = 15_008;
/// A port where plaintext listeners nobody enrolled wait for what must never reach them.
const OPEN_PORT: u16 = 9400;
/// A port `api` shares with squatters through `SO_REUSEPORT`.
const SHARED: u16 = 9300;
/// Connections made to the shared port: enough that every socket of its group gets some.
const ATTEMPTS: usize = 24;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// A node's policy: the workload cgroups below its scope enrolled one by one (so that
/// `guest`, also below the scope, is not), `web` may reach `api` on the HTTP port, `db` may
/// not, the two nodes are mesh peers, then `extra` (which `{scope}` in it is replaced in).
/// `unmatched` is enrolled but matches no workload entry; `pinned` is enrolled for the entries
/// tests add.
fn policy(scope: &str, peers: [IpAddr; 2], extra: &str) -> String {
    let mut text = format!(
        "trust_domain = \"{TD}\"\n\
         enroll = [\"{scope}/web\", \"{scope}/db\", \"{scope}/api\", \"{scope}/unmatched\", \
         \"{scope}/pinned\"]\n"
    );
    for name in ["web", "db", "api"] {
        let _ = write!(
            text,
            "[[workload]]\nid = \"{}\"\nselectors = [\"cgroup:path:{scope}/{name}\"]\n",
            id(name)
        );
    }
    let _ = write!(
        text,
        "[[allow]]\nfrom = \"{}\"\nto = \"{}\"\nports = [{HTTP_PORT}]\n\
         [[deny]]\nfrom = \"{}\"\nto = \"{}\"\n",
        id("web"),
        id("api"),
        id("db"),
        id("api")
    );
    for peer in peers {
        let _ = write!(text, "[[peer]]\naddress = \"{peer}\"\n");
    }
    text.push_str(&extra.replace("{scope}", scope));
    text
}

/// Two daemon nodes, the workload cgroups, and `api` (`python3 -m http.server` on every
/// address of B, the way most servers listen).
struct Mesh {
    // Processes first: they go before the daemons and cgroups.
    server: Option<Spawned>,
    a: DaemonNode,
    b: DaemonNode,
    a_web: ScratchCgroup,
    a_db: ScratchCgroup,
    a_guest: ScratchCgroup,
    b_api: ScratchCgroup,
    b_guest: ScratchCgroup,
    b_unmatched: ScratchCgroup,
    peers: [IpAddr; 2],
    pki: TestPki,
    site: TempDir,
}

impl Mesh {
    fn new() -> Self {
        Self::with_policy("")
    }

    /// Both nodes with [`policy`] plus `extra`, and the api server on B.
    fn with_policy(extra: &str) -> Self {
        let (link_a, link_b) = connect_nodes(&Netns::new("bp-a"), &Netns::new("bp-b"));
        Self::on_links(&link_a, &link_b, extra)
    }

    fn on_links(link_a: &Node, link_b: &Node, extra: &str) -> Self {
        let peers = [link_a.addr4().into(), link_b.addr4().into()];
        let pki = TestPki::new(TD);
        let a = DaemonNode::start(binary(), link_a, "a", &pki.root, |s| {
            policy(s, peers, extra)
        });
        let b = DaemonNode::start(binary(), link_b, "b", &pki.root, |s| {
            policy(s, peers, extra)
        });
        let site = TempDir::new().unwrap();
        fs::write(site.path().join("hello.txt"), format!("{HELLO}\n")).unwrap();
        let mut mesh = Self {
            server: None,
            a_web: a.scope().child("web"),
            a_db: a.scope().child("db"),
            a_guest: a.scope().child("guest"),
            b_api: b.scope().child("api"),
            b_guest: b.scope().child("guest"),
            b_unmatched: b.scope().child("unmatched"),
            a,
            b,
            peers,
            pki,
            site,
        };
        mesh.start_api();
        mesh
    }

    /// Start the api server on B (again) and wait until B's daemon has registered it.
    fn start_api(&mut self) {
        let server = self
            .b
            .spawn(&self.b_api, "/usr/bin/python3")
            .args(["-m", "http.server", "--bind", "0.0.0.0", "--directory"])
            .arg(self.site.path())
            .arg(HTTP_PORT.to_string())
            .spawn();
        wait_for_listener(&server, HTTP_PORT);
        let pid = server.pid();
        self.server = Some(server);
        Self::wait_for_service(&self.b, pid, "api", HTTP_PORT);
    }

    /// Wait until `node` has registered `pid` as the workload `name` listening on `port`.
    fn wait_for_service(node: &DaemonNode, pid: u32, name: &str, port: u16) {
        node.wait_until(
            &format!("{name} ({pid}) to be registered on {port}"),
            |node| {
                let workloads: serde_json::Value =
                    serde_json::from_str(&node.cli_ok(&["workloads", "--json"])).unwrap();
                workloads.as_array().unwrap().iter().any(|workload| {
                    workload["pid"] == pid
                        && workload["spiffe_id"] == id(name).as_str()
                        && workload["listening"]
                            .to_string()
                            .contains(&format!(":{port}"))
                })
            },
        );
    }

    /// Wait until `node` has attested `pid` as the workload `name`.
    fn wait_for_identity(node: &DaemonNode, pid: u32, name: &str) {
        node.wait_until(&format!("pid {pid} to be attested as {name}"), |node| {
            let workloads: serde_json::Value =
                serde_json::from_str(&node.cli_ok(&["workloads", "--json"])).unwrap();
            workloads.as_array().unwrap().iter().any(|workload| {
                workload["pid"] == pid && workload["spiffe_id"] == id(name).as_str()
            })
        });
    }

    /// The api's address on B.
    fn api(&self) -> SocketAddr {
        SocketAddr::new(self.peers[1], HTTP_PORT)
    }

    fn url(&self, file: &str) -> String {
        format!("http://{}/{file}", self.api())
    }

    /// `curl` in `cgroup` of `node` fetching `hello.txt`, to completion: (status, first line).
    fn fetch(&self, node: &DaemonNode, cgroup: &ScratchCgroup) -> (ExitStatus, Option<String>) {
        Self::fetch_url(node, cgroup, &self.url("hello.txt"))
    }

    /// `curl` in `cgroup` of `node` fetching `url`, to completion: (status, first line).
    fn fetch_url(
        node: &DaemonNode,
        cgroup: &ScratchCgroup,
        url: &str,
    ) -> (ExitStatus, Option<String>) {
        let mut curl = node
            .spawn(cgroup, "curl")
            .args(["-sS", "--connect-timeout", "3", "--max-time", "10"])
            .arg(url)
            .spawn();
        let status = curl
            .wait_timeout(COMMAND_LIMIT)
            .unwrap_or_else(|| panic!("curl hung; stderr: {}", curl.stderr()));
        (status, curl.read_line(Duration::from_secs(1)))
    }

    fn assert_allowed(&self, cgroup: &ScratchCgroup) {
        let (status, line) = self.fetch(&self.a, cgroup);
        assert!(status.success(), "curl failed: {status}");
        assert_eq!(line.as_deref(), Some(HELLO));
    }

    fn assert_refused(&self, node: &DaemonNode, cgroup: &ScratchCgroup) {
        let (status, line) = self.fetch(node, cgroup);
        assert!(!status.success(), "curl succeeded: {line:?}");
        assert_eq!(line, None, "no byte may arrive");
    }

    /// The test client as `persona` in `cgroup` of `node`.
    fn client(node: &DaemonNode, persona: Persona, cgroup: &ScratchCgroup) -> WorkloadClient {
        WorkloadClient::start_as(persona, Some(cgroup), Some(node.link().netns()))
    }

    /// How many records of `node` say `event` with `dst` as the destination identity.
    fn count(node: &DaemonNode, event: &str, dst: &str) -> usize {
        node.flows(&[])
            .iter()
            .filter(|r| r.event.as_str() == event && r.dst.spiffe_id.as_deref() == Some(dst))
            .count()
    }
}

/// A plaintext connect of `client` to `addr` must be dropped: the client times out, and
/// `node` (where `addr` listens) records the drop of this very attempt (by its source port).
fn assert_dropped(node: &DaemonNode, client: &mut WorkloadClient, addr: SocketAddr, extra: &str) {
    let answer = client.ask(&format!("connect {} {} {extra}", addr.ip(), addr.port()));
    let port = answer
        .strip_prefix("err timeout ")
        .unwrap_or_else(|| panic!("plaintext to {addr} {extra}: {answer}"));
    let from = format!(":{port}");
    node.wait_for_record(&format!("the drop of {addr} {extra}"), |r| {
        r.verdict.as_str() == "drop"
            && r.dst.addr.as_deref() == Some(&addr.to_string())
            && r.src
                .addr
                .as_deref()
                .is_some_and(|src| src.ends_with(&from))
    });
}

/// The answer of `close_listeners` when `n` listeners never received a connection (one that
/// did prints `accepted` first, which the caller then reads instead).
fn closed_untouched(n: usize) -> String {
    format!("closed {n} pending 0")
}

#[test]
fn redirects_reach_the_daemon_or_nothing() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    mesh.assert_allowed(&mesh.a_web);

    for signal in [Signal::TERM, Signal::KILL] {
        mesh.a.signal(signal);
        assert!(mesh.a.wait(COMMAND_LIMIT).is_some(), "A did not stop");
        // An unprivileged process takes the daemon's ports on A while it is down.
        let mut squatter = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_guest);
        for port in [OUTBOUND_PORT, INBOUND_PORT] {
            assert_eq!(
                squatter.ask(&format!("listen 127.0.0.1 {port}")),
                format!("listening {port}"),
                "after {signal:?}"
            );
        }
        // Enrolled connects fail closed, promptly; the squatter receives nothing.
        mesh.assert_refused(&mesh.a, &mesh.a_web);
        let mut enrolled = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_web);
        assert_eq!(
            enrolled.ask(&format!("connect {} {HTTP_PORT}", mesh.peers[1])),
            "err 111"
        );

        // The daemon comes back, although its ports are taken, and serves them.
        mesh.a.restart();
        mesh.assert_allowed(&mesh.a_web);
        assert_eq!(
            squatter.ask("close_listeners"),
            closed_untouched(2),
            "after {signal:?}: the squatter received a connection"
        );
        drop(squatter);
    }

    // The same for B, the inbound side: a squatter on the inbound port while B is down gets no
    // peer's tunnel, and B restarts around it.
    mesh.b.signal(Signal::KILL);
    assert!(mesh.b.wait(COMMAND_LIMIT).is_some(), "B did not stop");
    let mut squatter = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(
        squatter.ask(&format!("listen 0.0.0.0 {INBOUND_PORT}")),
        format!("listening {INBOUND_PORT}")
    );
    mesh.assert_refused(&mesh.a, &mesh.a_web);
    mesh.b.restart();
    mesh.assert_allowed(&mesh.a_web);
    assert_eq!(squatter.ask("close_listeners"), closed_untouched(1));
}

#[test]
fn the_tunnel_is_never_a_relay() {
    require_root();
    let _serial = serial();
    // A third namespace C behind B: B routes to it, A does not.
    let (link_a, link_b) = connect_nodes(&Netns::new("bp-a"), &Netns::new("bp-b"));
    let ns_c = Netns::new("bp-c");
    let (_, c) = connect_nodes(link_b.netns(), &ns_c);
    let mesh = Mesh::on_links(&link_a, &link_b, "");
    // Plaintext listeners nobody enrolled: on C, on A (B must not send a tunnel back), and on
    // B's own loopback.
    let mut behind = WorkloadClient::start(None, Some(&ns_c));
    let mut on_a = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_guest);
    let mut on_b = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    let mut open = [&mut behind, &mut on_a, &mut on_b];
    for (listener, host) in open.iter_mut().zip(["0.0.0.0", "0.0.0.0", "127.0.0.1"]) {
        assert_eq!(
            listener.ask(&format!("listen {host} {OPEN_PORT}")),
            format!("listening {OPEN_PORT}")
        );
    }
    // And a squatter on B's IPv6 loopback at the api's port (api listens on IPv4 only).
    let mut squatter = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(
        squatter.ask(&format!("listen ::1 {HTTP_PORT}")),
        format!("listening {HTTP_PORT}")
    );

    // A peer holding a valid SVID of the trust domain asks B's inbound port for each of them,
    // for an address on no link at all, for the api's port on B's loopbacks, and for the api.
    let now = SystemTime::now();
    let svid = mesh
        .pki
        .node_ca_at("intruder", now)
        .issue_svid(
            &id("web").parse::<SpiffeId>().unwrap(),
            Duration::from_hours(1),
            now,
        )
        .unwrap();
    let inbound = SocketAddr::new(mesh.peers[1], INBOUND_PORT);
    let bundles = std::sync::Arc::clone(&mesh.pki.bundles);
    let destinations = [
        SocketAddr::new(c.addr4().into(), OPEN_PORT),
        SocketAddr::new(mesh.peers[0], OPEN_PORT),
        SocketAddr::new([127, 0, 0, 1].into(), OPEN_PORT),
        SocketAddr::new([192, 0, 2, 1].into(), OPEN_PORT),
        SocketAddr::new([127, 0, 0, 1].into(), HTTP_PORT),
        SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), HTTP_PORT),
        mesh.api(),
    ];
    let outcomes: Vec<Result<SpiffeId, String>> = link_a.netns().within(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let pool = Pool::new(
                TunnelConfig::default(),
                bundles,
                std::sync::Arc::default(),
                std::sync::Arc::new(Untagged),
                std::sync::Arc::new(SystemMonotonicClock),
            );
            let mut outcomes = Vec::new();
            for dst in destinations {
                outcomes.push(
                    match pool
                        .open(&svid, (inbound, dst), &Placement::default())
                        .await
                    {
                        Ok(stream) => Ok(stream.server_id),
                        Err(PoolError::Refused { refusal, .. }) => Err(format!("{refusal:?}")),
                        Err(other) => Err(format!("{other}")),
                    },
                );
            }
            outcomes
        })
    });
    let no_such = Err(format!("{:?}", Refusal::NoSuchWorkload));
    for (dst, outcome) in destinations.iter().zip(&outcomes).take(6) {
        assert_eq!(outcome, &no_such, "B relayed to {dst}");
    }
    assert_eq!(
        outcomes[6],
        Ok(id("api").parse().unwrap()),
        "the api itself is served; B's log:\n{}",
        mesh.b.log()
    );
    for listener in open.into_iter().chain([&mut squatter]) {
        assert_eq!(
            listener.ask("close_listeners"),
            closed_untouched(1),
            "a plaintext listener received a relayed connection"
        );
    }
}

#[test]
fn services_are_real_listeners_guarded_while_they_listen() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    mesh.assert_allowed(&mesh.a_web);
    let api = mesh.api();

    // Garbage binds of an unprivileged enrolled process record nothing and cut nobody off:
    // a privileged port, a port in use, hundreds of ephemeral ports, and a port an unenrolled
    // process then listens on at another address.
    let mut binder = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_api);
    assert_eq!(binder.ask("bind 0.0.0.0 80"), "err 13");
    assert_eq!(binder.ask(&format!("bind 0.0.0.0 {HTTP_PORT}")), "err 98");
    for _ in 0..300 {
        assert!(binder.ask("bind 127.0.0.1 0").starts_with("bound "));
    }
    assert_eq!(binder.ask("bind 127.0.0.1 9000"), "bound 9000");
    Mesh::wait_for_identity(&mesh.b, binder.pid(), "api");
    let workloads: serde_json::Value =
        serde_json::from_str(&mesh.b.cli_ok(&["workloads", "--json"])).unwrap();
    let listening = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|workload| workload["pid"] == binder.pid())
        .map(|workload| workload["listening"].clone());
    assert_eq!(listening, Some(serde_json::json!([])), "{workloads}");
    mesh.assert_allowed(&mesh.a_web);
    let mut outsider = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    let b = mesh.peers[1];
    assert_eq!(outsider.ask(&format!("listen {b} 9000")), "listening 9000");
    let mut guest = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert!(guest.ask(&format!("connect {b} 9000")).starts_with("ok "));
    drop(binder);

    // Listeners of enrolled cgroups are guarded whatever their port and identity: one that
    // matches no workload entry, and one on a port the kernel chose.
    let mut unmatched = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_unmatched);
    assert_eq!(unmatched.ask("listen 0.0.0.0 9090"), "listening 9090");
    let chosen = unmatched
        .ask("listen_unbound")
        .strip_prefix("listening ")
        .and_then(|port| port.parse::<u16>().ok())
        .expect("a kernel-chosen port");
    let mut raw = Mesh::client(&mesh.b, Persona::NetRaw, &mesh.b_guest);
    for port in [9090, chosen] {
        assert_dropped(
            &mesh.b,
            &mut guest,
            SocketAddr::new(mesh.peers[1], port),
            "",
        );
        assert_dropped(
            &mesh.b,
            &mut raw,
            SocketAddr::new(mesh.peers[1], port),
            "--mark 0x0e5f0001",
        );
    }
    // ... and nobody reaches the unmatched one through the tunnel either.
    let unmatched_addr = SocketAddr::new(mesh.peers[1], 9090);
    let (status, line) =
        Mesh::fetch_url(&mesh.a, &mesh.a_web, &format!("http://{unmatched_addr}/"));
    assert!(!status.success() && line.is_none(), "{line:?}");
    mesh.b
        .wait_for_record("B's refusal of the unmatched listener", |r| {
            r.source.as_str() == "inbound"
                && r.dst.addr.as_deref() == Some(&unmatched_addr.to_string())
                && r.reason == "no-such-workload"
        });
    assert_eq!(unmatched.ask("close_listeners"), closed_untouched(2));

    // The workload exits: its port is nobody's. An unenrolled process that listens there
    // next is not served the tunnel, and is never recorded as the old workload.
    let opened = Mesh::count(&mesh.b, "open", &id("api"));
    mesh.server = None;
    let mut successor = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(
        successor.ask(&format!("listen 0.0.0.0 {HTTP_PORT}")),
        format!("listening {HTTP_PORT}")
    );
    mesh.assert_refused(&mesh.a, &mesh.a_web);
    mesh.b
        .wait_for_record("B's refusal for the vanished api", |r| {
            r.source.as_str() == "inbound"
                && r.verdict.as_str() == "deny"
                && r.dst.addr.as_deref() == Some(&api.to_string())
                && r.reason == "no-such-workload"
        });
    assert_eq!(Mesh::count(&mesh.b, "open", &id("api")), opened);
    assert_eq!(
        successor.ask("close_listeners"),
        closed_untouched(1),
        "the successor received a tunnelled connection"
    );
}

#[test]
fn a_hop_reaches_only_the_workload_it_was_meant_for() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::with_policy(&format!(
        "[[allow]]\nfrom = \"{}\"\nto = \"{}\"\nports = [{SHARED}]\n",
        id("web"),
        id("api")
    ));
    // api listens with SO_REUSEPORT as nobody; two other processes of nobody join its group:
    // one unenrolled, one enrolled under another identity. Each hop B's daemon makes for api
    // lands on whichever of the three the kernel picks.
    let mut api = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_api);
    let listen = format!("listen 0.0.0.0 {SHARED} --reuseport");
    assert_eq!(api.ask(&listen), format!("listening {SHARED}"));
    Mesh::wait_for_service(&mesh.b, api.pid(), "api", SHARED);
    let mut outsider = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(outsider.ask(&listen), format!("listening {SHARED}"));
    let mut insider = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_unmatched);
    assert_eq!(insider.ask(&listen), format!("listening {SHARED}"));

    let mut web = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_web);
    Mesh::wait_for_identity(&mesh.a, web.pid(), "web");
    let target = SocketAddr::new(mesh.peers[1], SHARED);
    for _ in 0..ATTEMPTS {
        let answer = web.ask(&format!("connect {} {SHARED}", target.ip()));
        assert!(answer.starts_with("ok "), "{answer}");
    }
    // Every attempt ends on B as an open (the hop reached api) or a refusal (it did not).
    let target_text = target.to_string();
    let ended = |node: &DaemonNode| {
        node.flows(&[])
            .into_iter()
            .filter(|r| {
                r.source.as_str() == "inbound"
                    && r.dst.addr.as_deref() == Some(&target_text)
                    && (r.event.as_str() == "open" || r.verdict.as_str() == "deny")
            })
            .collect::<Vec<_>>()
    };
    mesh.b
        .wait_until("every attempt to end on B", |b| ended(b).len() >= ATTEMPTS);
    let outcomes = ended(&mesh.b);
    let opened = outcomes
        .iter()
        .filter(|r| r.event.as_str() == "open")
        .count();
    assert!(
        outcomes
            .iter()
            .all(|r| r.event.as_str() == "open" || r.reason == "upstream-timeout"),
        "{outcomes:?}"
    );
    assert!(opened > 0, "no hop reached api");
    assert!(
        opened < ATTEMPTS,
        "every hop happened to reach api: the squatters were never tried"
    );
    // The hops that reached a squatter were dropped there, and said so.
    let misdelivered = mesh
        .b
        .flows(&["--verdict", "drop"])
        .into_iter()
        .filter(|r| r.reason == "misdelivered" && r.dst.addr.as_deref() == Some(&target_text))
        .count();
    assert!(misdelivered > 0, "no misdelivered hop was recorded");
    for _ in 0..opened {
        assert!(api.next_line().starts_with("accepted "));
    }
    for squatter in [&mut outsider, &mut insider] {
        assert_eq!(
            squatter.ask("close_listeners"),
            closed_untouched(1),
            "a squatter received a hop"
        );
    }
}

#[test]
fn plaintext_is_dropped_whatever_mark_or_address_it_carries() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::new();
    let api = mesh.api();
    // On B: an unprivileged process, one binding a loopback or the node's own address, and one
    // with CAP_NET_RAW setting the mark the tunnel used to carry (and any other).
    let mut nobody = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_dropped(&mesh.b, &mut nobody, api, "");
    assert_dropped(
        &mesh.b,
        &mut nobody,
        api,
        &format!("--bind {}", mesh.peers[1]),
    );
    assert_dropped(
        &mesh.b,
        &mut nobody,
        SocketAddr::new([127, 0, 0, 1].into(), HTTP_PORT),
        "--bind 127.0.0.1",
    );
    let mut raw = Mesh::client(&mesh.b, Persona::NetRaw, &mesh.b_guest);
    assert_eq!(
        raw.ask("mark 0x0e5f0001"),
        "mark ok",
        "CAP_NET_RAW can set marks"
    );
    for mark in ["0x0e5f0001", "0x1", "0x7fffffff"] {
        assert_dropped(&mesh.b, &mut raw, api, &format!("--mark {mark}"));
    }
    // From node A, unenrolled and with CAP_NET_RAW.
    let mut remote = Mesh::client(&mesh.a, Persona::NetRaw, &mesh.a_guest);
    assert_dropped(&mesh.b, &mut remote, api, "--mark 0x0e5f0001");
    // An enrolled process of B itself (api's own cgroup, with CAP_NET_RAW) carrying the mark
    // is decided at connect like any other: api has no rule to call itself, so the kernel
    // refuses it by policy.
    let mut insider = Mesh::client(&mesh.b, Persona::NetRaw, &mesh.b_api);
    Mesh::wait_for_identity(&mesh.b, insider.pid(), "api");
    let answer = insider.ask(&format!(
        "connect {} {HTTP_PORT} --mark 0x0e5f0001",
        mesh.peers[1]
    ));
    assert_eq!(
        answer, "err 1",
        "api -> api has no rule: refused at connect"
    );
    let pid = insider.pid();
    mesh.b
        .wait_for_record("B's policy refusal of the marked insider", |r| {
            r.source.as_str() == "kernel" && r.reason == "policy" && r.src.pid == Some(pid)
        });
    // Meanwhile the tunnel works.
    mesh.assert_allowed(&mesh.a_web);
}

#[test]
fn enrollment_follows_the_cgroup_path() {
    require_root();
    let _serial = serial();
    // `pinned` is a workload of its own here: it may reach api.
    let extra = format!(
        "[[workload]]\nid = \"{}\"\nselectors = [\"cgroup:path:{{scope}}/pinned\"]\n\
         [[allow]]\nfrom = \"{}\"\nto = \"{}\"\nports = [{HTTP_PORT}]\n",
        id("pinned"),
        id("pinned"),
        id("api")
    );
    let mesh = Mesh::with_policy(&extra);
    // Every workload cgroup was created after the daemons applied the policy (the policy named
    // paths that did not exist yet), and they are enforced: the kernel enrolled them at mkdir.
    mesh.assert_allowed(&mesh.a_web);
    mesh.assert_refused(&mesh.a, &mesh.a_db);

    // A service restart re-creates its cgroup: a new cgroup id at the same path. An unenrolled
    // listener on B, reachable in plaintext, tells whether the new cgroup's first connect is
    // enforced: enrolled, it is redirected to A's daemon (and refused there), never plaintext.
    let mut open = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(open.ask("listen 0.0.0.0 9000"), "listening 9000");
    let mut ids = Vec::new();
    for round in 0..3 {
        let pinned = mesh.a.scope().child("pinned");
        ids.push(pinned.id());
        let mut first = Mesh::client(&mesh.a, Persona::Nobody, &pinned);
        let answer = first.ask(&format!("connect {} 9000", mesh.peers[1]));
        // Redirected, the connection lands on A's daemon, which refuses it (no workload listens
        // at B:9000) and resets it: on a loaded machine the reset can arrive before connect()
        // returns (ECONNRESET). Plaintext would have reached B's listener: "ok" from there is
        // told apart by the kernel's redirect record below.
        assert!(
            answer.starts_with("ok ") || answer == "err 104",
            "round {round}: {answer}"
        );
        let pid = first.pid();
        mesh.a
            .wait_for_record("the re-created cgroup's redirect", |r| {
                r.source.as_str() == "kernel"
                    && r.event.as_str() == "redirect"
                    && r.src.pid == Some(pid)
            });
        // And it is the workload its path names: its flows to api pass.
        mesh.assert_allowed(&pinned);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "each round made a new cgroup");
    assert_eq!(
        open.ask("close_listeners"),
        closed_untouched(1),
        "plaintext got through"
    );
}

#[test]
fn identity_is_bound_at_connect() {
    require_root();
    let _serial = serial();
    // `pinned` may reach api, but only a copy of `sleep` with exactly this hash is `pinned`.
    let bin = TempDir::new().unwrap();
    let pinned = bin.path().join("pinned-sleep");
    fs::copy("/bin/sleep", &pinned).unwrap();
    for dir in [bin.path(), pinned.as_path()] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let digest = sha256_hex(&fs::read(&pinned).unwrap());
    let extra = format!(
        "[[workload]]\nid = \"{}\"\nselectors = [\"cgroup:path:{{scope}}/pinned\", \"unix:sha256:{digest}\"]\n\
         [[allow]]\nfrom = \"{}\"\nto = \"{}\"\nports = [{HTTP_PORT}]\n",
        id("pinned"),
        id("pinned"),
        id("api")
    );
    let mesh = Mesh::with_policy(&extra);
    let a_pinned = mesh.a.scope().child("pinned");

    // A process with no identity connects while A's daemon is paused (so nothing attests it
    // in between), sends its request, and execs the pinned binary, keeping the socket. When
    // the daemon looks, the pid is the pinned binary; the connection is still not `pinned`'s.
    let mut impostor = Mesh::client(&mesh.a, Persona::Nobody, &a_pinned);
    let pid = impostor.pid();
    mesh.a.signal(Signal::STOP);
    let answer = impostor.ask(&format!(
        "connect {} {HTTP_PORT} --send GET_/hello.txt_HTTP/1.0 --inherit",
        mesh.peers[1]
    ));
    impostor.send(&format!("exec {} 30", pinned.display()));
    let exe = format!("/proc/{pid}/exe");
    mesh.a
        .wait_until("the impostor to exec the pinned binary", |_| {
            fs::read_link(&exe).is_ok_and(|target| target == pinned)
        });
    mesh.a.signal(Signal::CONT);
    assert!(answer.starts_with("ok "), "{answer}");
    let refused = mesh
        .a
        .wait_for_record("A's refusal of the exec'd client", |r| {
            r.source.as_str() == "outbound"
                && r.verdict.as_str() == "deny"
                && r.src.pid == Some(pid)
        });
    assert_eq!(refused.reason, "changed-since-connect", "{refused:?}");
    assert_eq!(
        Mesh::count(&mesh.b, "open", &id("api")),
        0,
        "B served the impostor"
    );

    // Now the process *is* the pinned binary: it is `pinned` for what it connects from now on.
    mesh.a
        .wait_until("the exec'd process to be attested as pinned", |a| {
            a.cli_ok(&["workloads", "--json"]).contains(&id("pinned"))
        });
}

#[test]
fn every_protocol_is_decided() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::with_policy(
        "[[egress]]\nprotocol = \"udp\"\ncidr = \"10.0.0.0/8\"\nports = [5353]\n",
    );
    let b = mesh.peers[1];
    let mut receiver = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(receiver.ask("udp_listen 0.0.0.0 5353"), "udp 5353");
    let mut web = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_web);
    // UDP, ICMP and raw sockets of an enrolled process: refused unless an egress entry permits.
    assert_eq!(web.ask(&format!("udp_send {b} 53")), "err 1");
    assert_eq!(web.ask(&format!("udp_connect {b} 53")), "err 1");
    assert_eq!(web.ask(&format!("udp_send {b} 5353")), "ok");
    assert!(receiver.next_line().starts_with("datagram "));
    // ICMP echo through a ping socket, which any user may open once the node allows it.
    mesh.a.link().netns().run(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ping_group_range=0 2147483647",
    ]);
    assert_eq!(web.ask(&format!("ping {b}")), "err 1");
    let mut pinger = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_guest);
    assert_eq!(pinger.ask(&format!("ping {b}")), "ok", "ping outside");
    // The same capability outside the enrolled cgroups opens them all: the refusals below
    // are the datapath's, not the persona's.
    let mut control = Mesh::client(&mesh.a, Persona::NetRaw, &mesh.a_guest);
    for command in ["raw", "packet"] {
        assert_eq!(control.ask(command), "ok", "{command} outside");
    }
    let mut raw = Mesh::client(&mesh.a, Persona::NetRaw, &mesh.a_web);
    assert_eq!(raw.ask("raw"), "err 1");
    let packet = raw.ask("packet");
    let status = mesh
        .a
        .cli(&["status", "--pin-dir", mesh.a.pin_dir().to_str().unwrap()]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    if status.contains("packet sockets of enrolled processes: refused") {
        assert_eq!(packet, "err 1");
    } else {
        // The documented limit where the kernel cannot run the BPF LSM program.
        assert!(
            status.contains("packet sockets of enrolled processes: NOT refused"),
            "{status}"
        );
        assert_eq!(packet, "ok");
    }
    // Inbound datagrams to an enrolled workload pass only from permitted egress destinations.
    let mut api_udp = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_api);
    assert_eq!(api_udp.ask("udp_listen 0.0.0.0 6000"), "udp 6000");
    let mut guest = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_guest);
    assert_eq!(guest.ask(&format!("udp_send {b} 6000")), "ok");
    let to_api = SocketAddr::new(b, 6000).to_string();
    mesh.b
        .wait_for_record("B's drop of the inbound datagram", |r| {
            r.verdict.as_str() == "drop"
                && r.reason == "inbound-protocol"
                && r.dst.addr.as_deref() == Some(&to_api)
        });
    assert_eq!(
        api_udp.try_next_line(Duration::from_millis(500)),
        None,
        "the dropped datagram arrived"
    );
    for reason in ["protocol", "raw-socket"] {
        let record = mesh
            .a
            .wait_for_record(&format!("A's {reason} refusal"), |r| {
                r.verdict.as_str() == "deny" && r.reason == reason
            });
        assert_eq!(record.source.as_str(), "kernel", "{record:?}");
    }
}

#[test]
fn egress_never_overrides_the_mesh() {
    require_root();
    let _serial = serial();
    // Plaintext TCP to everywhere: mesh peers and local workloads still go through the tunnel.
    let mesh = Mesh::with_policy("[[egress]]\ncidr = \"0.0.0.0/0\"\n");
    mesh.assert_allowed(&mesh.a_web);
    mesh.assert_refused(&mesh.a, &mesh.a_db);
    // db went through the tunnel too: B refused it by policy, A recorded that.
    mesh.a
        .wait_for_record("A's record of B's refusal of db", |r| {
            r.verdict.as_str() == "deny"
                && r.reason == "denied"
                && r.src.spiffe_id.as_deref() == Some(id("db").as_str())
        });
    mesh.b.wait_for_record("B's tunnelled open", |r| {
        r.source.as_str() == "inbound"
            && r.event.as_str() == "open"
            && r.src.spiffe_id.as_deref() == Some(id("web").as_str())
    });
    let api = mesh.api().to_string();
    let egress = mesh
        .a
        .flows(&[])
        .into_iter()
        .filter(|r| r.event.as_str() == "egress" && r.dst.addr.as_deref() == Some(&api))
        .count();
    assert_eq!(egress, 0, "a flow to the peer went out as plaintext egress");
}

/// SHA-256 of `bytes`, in lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[test]
fn the_audit_trail_says_what_happened_and_shows_what_was_cut() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    mesh.assert_allowed(&mesh.a_web);
    mesh.assert_refused(&mesh.a, &mesh.a_db);

    // A redirect hands a flow to the tunnel; only the tunnel's verdict says whether it passed.
    mesh.a.wait_for_record("A's refusal of db", |r| {
        r.source.as_str() == "outbound" && r.verdict.as_str() == "deny"
    });
    // The kernel's redirect records travel their own path (the event ring, then the pump),
    // so they may land after the tunnel's.
    mesh.a.wait_until("both redirect records", |node| {
        node.flows(&["--verdict", "redirect"]).len() >= 2
    });
    let redirects = mesh.a.flows(&["--verdict", "redirect"]);
    assert!(
        redirects.len() >= 2
            && redirects
                .iter()
                .all(|r| r.event.as_str() == "redirect" && r.reason == "to-tunnel"),
        "{redirects:?}"
    );
    let allowed = mesh.a.flows(&["--verdict", "allow"]);
    assert!(!allowed.is_empty());
    for record in &allowed {
        assert_ne!(record.event.as_str(), "redirect", "{record:?}");
        assert_ne!(
            record.src.spiffe_id.as_deref(),
            Some(id("db").as_str()),
            "a refused flow is listed as allowed: {record:?}"
        );
    }

    // Someone removes the newest records while the daemon is down.
    mesh.a.signal(Signal::TERM);
    assert!(mesh.a.wait(COMMAND_LIMIT).is_some(), "A did not stop");
    let log = mesh.a.audit_path();
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines.len() - 3;
    fs::write(&log, format!("{}\n", lines[..kept].join("\n"))).unwrap();
    let verify = |node: &DaemonNode| {
        let output = node.cli(&["audit", "verify", log.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success(), stdout)
    };
    let (ok, stdout) = verify(&mesh.a);
    assert!(!ok && stdout.contains("missing from the end"), "{stdout}");

    // The restarted daemon does not continue the chain as if nothing happened: it reports
    // the cut, and verify keeps naming it.
    mesh.a.restart();
    mesh.a.wait_for_record("A's report of the cut", |r| {
        r.verdict.as_str() == "loss" && r.reason == "audit-tail-cut"
    });
    let (ok, stdout) = verify(&mesh.a);
    assert!(
        !ok && stdout.contains("cut from the log") && stdout.contains("the daemon reported it"),
        "{stdout}"
    );
}

#[test]
fn listeners_older_than_the_datapath_or_carried_in_are_guarded() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    let api = mesh.api();

    // A listener of an unenrolled process is reachable in plaintext ... until the process
    // moves into an enrolled cgroup with it: the kernel reports the move and the daemon takes
    // the socket under guard.
    let mut carried = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert_eq!(carried.ask("listen 0.0.0.0 9100"), "listening 9100");
    let mut outsider = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert!(outsider.ask("connect 127.0.0.1 9100").starts_with("ok "));
    assert!(carried.next_line().starts_with("accepted "));
    fs::write(
        mesh.b_unmatched.path().join("cgroup.procs"),
        carried.pid().to_string(),
    )
    .unwrap();
    mesh.b
        .wait_until("the carried-in listener to be guarded", |_| {
            outsider
                .ask("connect 127.0.0.1 9100")
                .starts_with("err timeout")
        });

    // The api's listener predates the datapath: B is stopped, its programs detached, the api
    // restarted, then B installs again. It finds the listener and guards it.
    mesh.b.signal(Signal::TERM);
    assert!(mesh.b.wait(COMMAND_LIMIT).is_some(), "B did not stop");
    let pins = mesh.b.pin_dir().to_str().unwrap().to_owned();
    let uninstall = mesh.b.cli(&["uninstall", "--pin-dir", &pins]);
    assert!(uninstall.status.success(), "{uninstall:?}");
    mesh.server = None;
    let server = mesh
        .b
        .spawn(&mesh.b_api, "/usr/bin/python3")
        .args(["-m", "http.server", "--bind", "0.0.0.0", "--directory"])
        .arg(mesh.site.path())
        .arg(HTTP_PORT.to_string())
        .spawn();
    wait_for_listener(&server, HTTP_PORT);
    let mut early = Mesh::client(&mesh.b, Persona::Nobody, &mesh.b_guest);
    assert!(
        early
            .ask(&format!("connect {} {HTTP_PORT}", api.ip()))
            .starts_with("ok "),
        "without a datapath nothing guards it"
    );
    mesh.server = Some(server);
    mesh.b.restart();
    mesh.b.wait_until("the older listener to be guarded", |_| {
        early
            .ask(&format!("connect {} {HTTP_PORT}", api.ip()))
            .starts_with("err timeout")
    });
    mesh.assert_allowed(&mesh.a_web);
    assert_dropped(&mesh.b, &mut early, api, "");
}

/// The port of [`MASTER_AND_WORKER`].
const FORKED_PORT: u16 = 9500;
/// A server in the shape of many real ones: the master listens, a forked worker accepts.
const MASTER_AND_WORKER: &str = "\
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(64)
worker = os.fork()
if worker == 0:
    while True:
        c, _ = s.accept()
        c.recv(4096)
        c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\nworker')
        c.close()
print(worker, flush=True)
time.sleep(600)
";

#[test]
fn a_listener_belongs_to_whoever_holds_it_now() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::with_policy(&format!(
        "[[allow]]\nfrom = \"{}\"\nto = \"{}\"\nports = [{FORKED_PORT}]\n",
        id("web"),
        id("api")
    ));
    let mut master = mesh
        .b
        .spawn(&mesh.b_api, "/usr/bin/python3")
        .args(["-c", MASTER_AND_WORKER, &FORKED_PORT.to_string()])
        .spawn();
    let worker: u32 = master
        .read_line(COMMAND_LIMIT)
        .and_then(|line| line.parse().ok())
        .expect("the worker's pid");
    let master_pid = master.pid();
    Mesh::wait_for_service(&mesh.b, master_pid, "api", FORKED_PORT);
    Mesh::wait_for_identity(&mesh.b, worker, "api");
    let url = format!("http://{}/", SocketAddr::new(mesh.peers[1], FORKED_PORT));
    let fetch = |mesh: &Mesh| Mesh::fetch_url(&mesh.a, &mesh.a_web, &url);
    let (status, line) = fetch(&mesh);
    assert!(status.success(), "{status} {line:?}");
    assert_eq!(line.as_deref(), Some("worker"));

    // The master, who made the socket, exits; the worker holds it on. The socket is nobody's
    // until B's daemon finds the worker holding it, then the worker's (api's again).
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(master_pid).unwrap()).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    assert!(
        master.wait_timeout(COMMAND_LIMIT).is_some(),
        "the master lives"
    );
    mesh.b.wait_until("the worker to own the listener", |b| {
        let workloads: serde_json::Value =
            serde_json::from_str(&b.cli_ok(&["workloads", "--json"])).unwrap();
        workloads.as_array().unwrap().iter().any(|workload| {
            workload["pid"] == worker
                && workload["listening"]
                    .to_string()
                    .contains(&format!(":{FORKED_PORT}"))
        }) && fetch(&mesh).1.as_deref() == Some("worker")
    });
}

#[test]
fn a_restarted_daemon_keeps_no_identity_of_an_earlier_run() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    let web = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_web);
    Mesh::wait_for_identity(&mesh.a, web.pid(), "web");
    let outsider = Mesh::client(&mesh.a, Persona::Nobody, &mesh.a_guest);
    mesh.a.signal(Signal::TERM);
    assert!(mesh.a.wait(COMMAND_LIMIT).is_some(), "A did not stop");

    // What an earlier run left in the kernel (here: web's number on an unenrolled process, as
    // a renumbered policy would make of any entry) ...
    let maps_dir = mesh.a.pin_dir().join("maps");
    let mut maps = Maps::open(&maps_dir).unwrap();
    let number = maps.identity(web.pid()).unwrap().expect("web's number");
    let generation = maps.generation(outsider.pid()).unwrap();
    maps.set_identity(outsider.pid(), number, generation)
        .unwrap();
    drop(maps);

    // ... is gone once the daemon runs again; web holds this run's number.
    mesh.a.restart();
    mesh.assert_allowed(&mesh.a_web);
    let maps = Maps::open(&maps_dir).unwrap();
    assert_eq!(maps.identity(outsider.pid()).unwrap(), None);
    assert!(!maps.identity_pids().contains(&outsider.pid()));
    Mesh::wait_for_identity(&mesh.a, web.pid(), "web");
}

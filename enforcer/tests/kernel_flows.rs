//! Same-node flows authorized in the kernel, with a real `enforcer run` on one node (a network
//! namespace): two workloads whose pair policy allows connect directly (the server sees the
//! client's own address and port, no daemon hop), the kernel's open and close records name
//! both identities, the rule, the version and the bytes, and a reload that denies the pair
//! closes the open connection. Everyone else still cannot reach the port: a denied identity
//! gets `EPERM`, an unenrolled process (root or not) is dropped, and an enrolled process
//! cannot borrow an authorized connection's addresses.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{fs, net::IpAddr, path::Path, time::Duration};

use enforcer::{
    audit::AuditRecord,
    testing::{
        DaemonNode, Netns, Node, Persona, ScratchCgroup, TestPki, WorkloadClient, connect_nodes,
        mesh_policy, require_root, serial,
    },
};

const TD: &str = "direct.test";
/// The server's port.
const PORT: u16 = 8080;
/// How long a dropped connect may take to give up (the client's own 2 s timeout, plus slack).
const SILENCE: Duration = Duration::from_secs(3);

/// `web` may reach `api` on [`PORT`] (rule 1); `db` may not (rule 2).
const ALLOW_WEB: &str = r#"
[[allow]]
from = "spiffe://direct.test/web"
to = "spiffe://direct.test/api"
ports = [8080]

[[deny]]
from = "spiffe://direct.test/db"
to = "spiffe://direct.test/api"
"#;

/// After a reload: nobody may reach `api`.
const DENY_ALL: &str = r#"
[[deny]]
from = "spiffe://direct.test/*"
to = "spiffe://direct.test/api"
"#;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// One node, its workload cgroups, and `api` listening on [`PORT`].
struct Site {
    // Processes first: they go before the daemon and the cgroups.
    server: WorkloadClient,
    node: DaemonNode,
    web: ScratchCgroup,
    db: ScratchCgroup,
    addr: IpAddr,
    peers: [IpAddr; 2],
    /// The other end of the node's link (its namespace holds the link up).
    _other: Node,
}

impl Site {
    fn new() -> Self {
        let (link, other) = connect_nodes(&Netns::new("direct-a"), &Netns::new("direct-b"));
        let peers: [IpAddr; 2] = [link.addr4().into(), other.addr4().into()];
        let node = DaemonNode::start(binary(), &link, "direct", &TestPki::new(TD).root, |s| {
            mesh_policy(TD, s, &["web", "db", "api"], &peers, ALLOW_WEB)
        });
        let api = node.scope().child("api");
        let mut server = WorkloadClient::start(Some(&api), Some(link.netns()));
        let addr = peers[0];
        assert_eq!(
            server.ask(&format!("listen {addr} {PORT}")),
            format!("listening {PORT}")
        );
        let site = Self {
            server,
            web: node.scope().child("web"),
            db: node.scope().child("db"),
            node,
            addr,
            peers,
            _other: other,
        };
        site.wait_for_identity(site.server.pid(), "api");
        let status: serde_json::Value =
            serde_json::from_str(&site.node.cli_ok(&["status", "--json"])).unwrap();
        assert_eq!(
            status["datapath"]["same_node_direct"],
            true,
            "the daemon keeps same-node flows in the tunnel: this kernel cannot close a socket \
             on request (CONFIG_INET_DIAG_DESTROY), so these tests cannot run; its log:\n{}",
            site.node.log()
        );
        site
    }

    /// A client in `cgroup`, attested by the daemon as `name` before it connects (so the
    /// kernel knows its identity).
    fn client(&self, cgroup: &ScratchCgroup, name: &str) -> WorkloadClient {
        let client = WorkloadClient::start(Some(cgroup), Some(self.node.link().netns()));
        self.wait_for_identity(client.pid(), name);
        client
    }

    fn wait_for_identity(&self, pid: u32, name: &str) {
        self.node
            .wait_until(&format!("pid {pid} to be attested as {name}"), |node| {
                let workloads: serde_json::Value =
                    serde_json::from_str(&node.cli_ok(&["workloads", "--json"])).unwrap();
                workloads.as_array().unwrap().iter().any(|workload| {
                    workload["pid"] == pid && workload["spiffe_id"] == id(name).as_str()
                })
            });
    }

    /// `client` connects to the server: its local port.
    fn connect(&self, client: &mut WorkloadClient) -> Result<u16, String> {
        let answer = client.ask(&format!("connect {} {PORT}", self.addr));
        answer
            .strip_prefix("ok ")
            .and_then(|port| port.parse().ok())
            .ok_or(answer)
    }

    /// `client` connects, and the server accepts the client's own address and port (not a
    /// hop of the daemon): the connection is direct. Its local port.
    fn connect_direct(&mut self, client: &mut WorkloadClient) -> u16 {
        let port = self.connect(client).expect("the client reaches api");
        let line = self.server.next_line();
        assert_eq!(line, format!("accepted {} {port}", self.addr), "not direct");
        port
    }

    /// The kernel's next record of `event` (`open`, `close`).
    fn kernel_record(&self, event: &str) -> AuditRecord {
        self.node
            .wait_for_record(&format!("the kernel's {event} record"), |r| {
                r.source.as_str() == "kernel" && r.event.as_str() == event
            })
    }
}

#[test]
fn an_allowed_same_node_flow_goes_direct_is_recorded_and_nothing_else_gets_in() {
    require_root();
    let _serial = serial();
    let mut site = Site::new();
    let mut web = site.client(&site.web, "web");

    let port = site.connect_direct(&mut web);
    assert_eq!(web.ask("send hello-direct"), "ok");
    let open = site.kernel_record("open");
    assert_eq!(open.verdict.as_str(), "allow", "{open:?}");
    assert_eq!(open.src.spiffe_id.as_deref(), Some(id("web").as_str()));
    assert_eq!(open.src.pid, Some(web.pid()));
    assert_eq!(open.src.addr, Some(format!("{}:{port}", site.addr)));
    assert_eq!(open.dst.spiffe_id.as_deref(), Some(id("api").as_str()));
    assert_eq!(open.dst.addr, Some(format!("{}:{PORT}", site.addr)));
    assert_eq!((open.rule, open.policy_version), (Some(1), 1), "{open:?}");
    assert!(
        site.node
            .flows(&[])
            .iter()
            .all(|r| r.source.as_str() != "outbound" && r.source.as_str() != "inbound"),
        "the daemon's tunnel never carried it: {:#?}",
        site.node.flows(&[])
    );

    // Its close record counts the bytes.
    let pid = web.pid();
    drop(web);
    let close = site.kernel_record("close");
    assert_eq!(close.src.pid, Some(pid), "{close:?}");
    assert_eq!(close.reason, "finished", "{close:?}");
    assert_eq!(
        close.bytes_up,
        Some("hello-direct".len() as u64),
        "{close:?}"
    );
    assert_eq!(close.bytes_down, Some(0), "{close:?}");

    // A denied identity: EPERM at connect(), as through the tunnel.
    let mut db = site.client(&site.db, "db");
    assert_eq!(site.connect(&mut db), Err("err 1".to_owned()));

    // Unenrolled processes (root, and nobody; a sibling of the scope, not below it): dropped
    // before the server accepts anything, with a drop record.
    let outside = ScratchCgroup::new("outside");
    for persona in [Persona::Root, Persona::Nobody] {
        let mut intruder =
            WorkloadClient::start_as(persona, Some(&outside), Some(site.node.link().netns()));
        let answer = site
            .connect(&mut intruder)
            .expect_err("the bypass is dropped");
        assert!(answer.starts_with("err timeout"), "{persona:?}: {answer}");
    }
    assert_eq!(
        site.server.try_next_line(SILENCE),
        None,
        "nothing was accepted"
    );
    site.node.wait_for_record("a drop record", |r| {
        r.source.as_str() == "kernel" && r.event.as_str() == "drop"
    });

    // An enrolled process cannot take over an authorized connection's addresses: the tuple
    // is the open connection's, which the kernel keeps unique.
    let mut web = site.client(&site.web, "web");
    let port = site.connect_direct(&mut web);
    let mut squatter = site.client(&site.web, "web");
    assert_eq!(
        squatter.ask(&format!("bind {} {port}", site.addr)),
        "err 98",
        "EADDRINUSE"
    );
}

#[test]
fn a_reload_that_denies_the_pair_closes_the_open_direct_flow() {
    require_root();
    let _serial = serial();
    let mut site = Site::new();
    let mut web = site.client(&site.web, "web");
    site.connect_direct(&mut web);
    site.kernel_record("open");

    let file = site.node.dir().join("next.toml");
    fs::write(
        &file,
        mesh_policy(
            TD,
            site.node.scope_path(),
            &["web", "db", "api"],
            &site.peers,
            DENY_ALL,
        ),
    )
    .unwrap();
    let reloaded = site
        .node
        .cli_ok(&["policy", "reload", file.to_str().unwrap()]);
    assert!(reloaded.contains("1 open flows closed"), "{reloaded}");

    // The client's connection was aborted by the kernel (ECONNABORTED, then EPIPE).
    let sent = web.ask("send after-the-reload");
    assert!(sent == "err 103" || sent == "err 32", "{sent}");
    let close = site.kernel_record("close");
    assert_eq!(close.reason, "revoked", "{close:?}");
    assert_eq!(close.src.pid, Some(web.pid()), "{close:?}");
    // And the pair is refused at connect() from now on.
    assert_eq!(site.connect(&mut web), Err("err 1".to_owned()));
}

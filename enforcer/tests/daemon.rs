//! The daemon as an operator runs it: two network namespaces as nodes A and B, one real
//! `enforcer run` per node with the datapath attached to the node's scope cgroup, real workloads
//! (`python3 -m http.server` for `api` on B, `curl` as `web` and `db` on A), and every check made
//! through the CLI (`status`, `policy reload|show`, `flows`, `workloads`, `audit verify`) or
//! plain signals.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::ExitStatus,
    time::Duration,
};

use enforcer::{
    audit::AuditRecord,
    testing::{
        DaemonNode, Netns, ScratchCgroup, Spawn, Spawned, TestPki, connect_nodes, mesh_policy,
        require_root, serial, wait_for_listener,
    },
};
use rustix::process::Signal;
use tempfile::TempDir;

const TD: &str = "daemon.test";
/// The HTTP workload's port on node B.
const HTTP_PORT: u16 = 8080;
/// What `hello.txt` holds.
const HELLO: &str = "hello through the daemon";
/// Size of `big.bin`, downloaded whole while the daemon drains.
const BIG_BYTES: usize = 4 << 20;
/// Size of `huge.bin` (sparse), served slowly so a connection stays open: far more than the
/// socket buffers and HTTP/2 windows between server and client can hold, so neither end of
/// the flow finishes before the client has read it.
const HUGE_BYTES: u64 = 256 << 20;
/// Hang guard for whole commands (not a performance assertion).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// curl's exit code when its own `--max-time` ran out.
const CURL_TIMED_OUT: i32 = 28;
/// The user the control socket must refuse (`nobody`).
const NOBODY: u32 = 65534;

/// `web` may reach `api` on the HTTP port; `db` may not reach `api`.
const ALLOW_WEB: &str = r#"
[[allow]]
from = "spiffe://daemon.test/web"
to = "spiffe://daemon.test/api"
ports = [8080]

[[deny]]
from = "spiffe://daemon.test/db"
to = "spiffe://daemon.test/api"
"#;

/// Nobody may reach `api`.
const DENY_ALL: &str = r#"
[[deny]]
from = "spiffe://daemon.test/*"
to = "spiffe://daemon.test/api"
"#;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

/// A node's policy: its scope enrolled, `web`, `db` and `api` as cgroups below it, both nodes
/// as mesh peers, then `rules`.
fn policy(scope: &str, peers: [IpAddr; 2], rules: &str) -> String {
    mesh_policy(TD, scope, &["web", "db", "api"], &peers, rules)
}

/// Two daemon nodes, their workload cgroups and the HTTP server on B.
struct Mesh {
    // Processes first: they go before the daemons and cgroups.
    _server: Spawned,
    a: DaemonNode,
    b: DaemonNode,
    a_web: ScratchCgroup,
    a_db: ScratchCgroup,
    a_outside: ScratchCgroup,
    peers: [IpAddr; 2],
    _site: TempDir,
}

impl Mesh {
    fn new() -> Self {
        let (link_a, link_b) = connect_nodes(&Netns::new("dnode-a"), &Netns::new("dnode-b"));
        let peers = [link_a.addr4().into(), link_b.addr4().into()];
        let pki = TestPki::new(TD);
        let a = DaemonNode::start(binary(), &link_a, "a", &pki.root, |s| {
            policy(s, peers, ALLOW_WEB)
        });
        let b = DaemonNode::start(binary(), &link_b, "b", &pki.root, |s| {
            policy(s, peers, ALLOW_WEB)
        });
        let site = TempDir::new().unwrap();
        fs::write(site.path().join("hello.txt"), format!("{HELLO}\n")).unwrap();
        fs::write(site.path().join("big.bin"), vec![b'x'; BIG_BYTES]).unwrap();
        fs::File::create(site.path().join("huge.bin"))
            .and_then(|file| file.set_len(HUGE_BYTES))
            .unwrap();
        let b_api = b.scope().child("api");
        let server = b
            .spawn(&b_api, "python3")
            .args(["-m", "http.server", "--bind"])
            .arg(link_b.addr4().to_string())
            .arg("--directory")
            .arg(site.path())
            .arg(HTTP_PORT.to_string())
            .spawn();
        wait_for_listener(&server, HTTP_PORT);
        let mesh = Self {
            _server: server,
            a_web: a.scope().child("web"),
            a_db: a.scope().child("db"),
            // Not enrolled: a sibling of the scope, not below it.
            a_outside: ScratchCgroup::new("outside"),
            a,
            b,
            peers,
            _site: site,
        };
        // The daemon on B registers the server as `api` (listen event or rescan).
        mesh.b.wait_until("B to register the api server", |b| {
            b.cli_ok(&["workloads", "--json"])
                .contains(&format!("\"spiffe://{TD}/api\""))
        });
        mesh
    }

    fn url(&self, file: &str) -> String {
        format!(
            "http://{}/{file}",
            SocketAddr::new(self.peers[1], HTTP_PORT)
        )
    }

    /// `curl` in `cgroup` of node A, fetching `file`.
    fn curl(&self, cgroup: &ScratchCgroup, file: &str, extra: &[&str]) -> Spawned {
        self.a
            .spawn(cgroup, "curl")
            .args(["-sS", "--connect-timeout", "3", "--max-time", "10"])
            .args(extra)
            .arg(self.url(file))
            .spawn()
    }

    /// Run `curl` to completion: (exit status, first stdout line).
    fn fetch(&self, cgroup: &ScratchCgroup, file: &str) -> (ExitStatus, Option<String>) {
        let mut curl = self.curl(cgroup, file, &[]);
        let status = curl
            .wait_timeout(COMMAND_LIMIT)
            .unwrap_or_else(|| panic!("curl hung; stderr: {}", curl.stderr()));
        (status, curl.read_line(Duration::from_secs(1)))
    }

    fn assert_allowed(&self, cgroup: &ScratchCgroup) {
        let (status, line) = self.fetch(cgroup, "hello.txt");
        assert!(status.success(), "curl failed: {status}");
        assert_eq!(line.as_deref(), Some(HELLO));
    }

    fn assert_refused(&self, cgroup: &ScratchCgroup) {
        let (status, line) = self.fetch(cgroup, "hello.txt");
        assert!(!status.success(), "curl succeeded: {line:?}");
        assert_eq!(line, None, "no byte may arrive");
    }

    /// Reload `rules` on both nodes through the CLI; returns both outputs.
    fn reload_both(&self, rules: &str) -> [String; 2] {
        [&self.a, &self.b].map(|node| {
            let file = node.dir().join("next.toml");
            fs::write(&file, policy(node.scope_path(), self.peers, rules)).unwrap();
            node.cli_ok(&["policy", "reload", file.to_str().unwrap()])
        })
    }
}

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("failed to chmod {}: {error}", path.display()));
}

/// `enforcer flows` filters narrow the list to what they name.
fn assert_filters_narrow(node: &DaemonNode) {
    let denied = node.flows(&["--verdict", "deny"]);
    assert!(!denied.is_empty() && denied.iter().all(|r| r.verdict.as_str() == "deny"));
    let allowed = node.flows(&["--verdict", "allow"]);
    assert!(
        !allowed.is_empty()
            && allowed
                .iter()
                .all(|r| r.verdict.as_str() == "allow" && r.event.as_str() != "redirect"),
        "{allowed:?}"
    );
    let web = node.flows(&["--id", &id("web")]);
    assert!(
        !web.is_empty()
            && web.iter().all(|r| {
                r.src.spiffe_id.as_deref() == Some(&id("web"))
                    || r.dst.spiffe_id.as_deref() == Some(&id("web"))
            }),
        "{web:?}"
    );
    let human = node.cli_ok(&["flows"]);
    assert!(
        human.contains(&id("web")) && human.contains(&id("db")),
        "{human}"
    );
}

#[test]
fn flows_show_identity_tagged_allow_deny_and_drop_and_the_audit_log_verifies() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::new();
    // A follower started before any flow sees the allow record as it is written.
    let socket = mesh.a.socket();
    let follower = Spawn::new(binary())
        .arg("--socket")
        .arg(&socket)
        .args(["flows", "--follow", "--json", "--verdict", "allow"])
        .spawn();

    mesh.assert_allowed(&mesh.a_web);
    let line = follower
        .read_line(COMMAND_LIMIT)
        .unwrap_or_else(|| panic!("flows --follow printed nothing: {}", follower.stderr()));
    let streamed: AuditRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(streamed.verdict.as_str(), "allow", "{streamed:?}");
    drop(follower);
    mesh.assert_refused(&mesh.a_db);
    // Bypass: an unenrolled process on A talks plaintext straight to the api port on B.
    let (status, _) = mesh.fetch(&mesh.a_outside, "hello.txt");
    assert!(!status.success(), "the bypass reached the workload");

    let allow = mesh.a.wait_for_record("A's allow record", |r| {
        r.verdict.as_str() == "allow"
            && r.event.as_str() == "open"
            && r.src.spiffe_id.as_deref() == Some(&id("web"))
            && r.dst.spiffe_id.as_deref() == Some(&id("api"))
    });
    assert!(
        allow.src.pid.is_some() && allow.src.sha256.is_some(),
        "{allow:?}"
    );
    assert!(
        allow.src.exe.as_deref().is_some_and(|e| e.contains("curl")),
        "{allow:?}"
    );
    let deny = mesh.a.wait_for_record("A's deny record", |r| {
        r.verdict.as_str() == "deny" && r.src.spiffe_id.as_deref() == Some(&id("db"))
    });
    assert_eq!(
        deny.dst.addr,
        Some(format!("{}:{HTTP_PORT}", mesh.peers[1])),
        "{deny:?}"
    );
    // The destination node names the identity it refused the client for.
    mesh.b.wait_for_record("B's deny record", |r| {
        r.verdict.as_str() == "deny"
            && r.source.as_str() == "inbound"
            && r.src.spiffe_id.as_deref() == Some(&id("db"))
            && r.dst.spiffe_id.as_deref() == Some(&id("api"))
    });
    let drop = mesh
        .b
        .wait_for_record("B's drop record", |r| r.verdict.as_str() == "drop");
    assert_eq!(
        drop.dst.spiffe_id.as_deref(),
        Some(id("api").as_str()),
        "{drop:?}"
    );
    assert_eq!(drop.source.as_str(), "kernel");

    // The kernel's redirect is recorded as a redirect: the tunnel's records say the rest.
    let redirect = mesh
        .a
        .wait_for_record("A's redirect record", |r| r.event.as_str() == "redirect");
    assert_eq!(
        (redirect.verdict.as_str(), redirect.reason.as_str()),
        ("redirect", "to-tunnel"),
        "{redirect:?}"
    );

    assert_filters_narrow(&mesh.a);

    // The audit log's chain verifies, then fails once a record is edited.
    let log = mesh.a.audit_path();
    let verified = mesh.a.cli_ok(&["audit", "verify", log.to_str().unwrap()]);
    assert!(verified.starts_with("ok"), "{verified}");
    let text = fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"verdict\":\"deny\"", "\"verdict\":\"allow\"", 1);
    assert_ne!(edited, text, "the log has a deny record to edit");
    fs::write(&log, edited).unwrap();
    let output = mesh.a.cli(&["audit", "verify", log.to_str().unwrap()]);
    assert!(!output.status.success(), "an edited log verified");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("audit.jsonl:") && stdout.contains("edited"),
        "{stdout}"
    );
}

#[test]
fn a_reload_flips_the_decision_and_closes_the_now_denied_open_connection() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.assert_allowed(&mesh.a_web);

    // A slow download stays open across the reload.
    let mut download = mesh.curl(
        &mesh.a_web,
        "huge.bin",
        &["--limit-rate", "100k", "-o", "/dev/null"],
    );
    mesh.b
        .wait_for_record("B's open record of the download", |r| {
            r.event.as_str() == "open" && r.src.spiffe_id.as_deref() == Some(&id("web"))
        });

    let outputs = mesh.reload_both(DENY_ALL);
    for output in &outputs {
        assert!(
            output.contains("policy version 2 in force (was 1)"),
            "{output}"
        );
    }
    assert!(
        outputs.iter().any(|o| o.contains("1 open flows closed")),
        "no node closed the download: {outputs:?}"
    );
    let status = download
        .wait_timeout(COMMAND_LIMIT)
        .expect("the revoked download ended");
    // curl gives up by itself after its `--max-time` (exit 28): only another failure shows
    // that the reload cut the download.
    assert!(
        !status.success() && status.code() != Some(CURL_TIMED_OUT),
        "the reload did not cut the download ({status}); stderr: {}",
        download.stderr()
    );
    mesh.assert_refused(&mesh.a_web);
    let show = mesh.a.cli_ok(&["policy", "show"]);
    assert!(show.starts_with("# version 2"), "{show}");
    mesh.a.wait_for_record("a revoked close record", |r| {
        r.reason == "revoked" && r.policy_version == 2
    });

    // And back: the decision flips again.
    mesh.reload_both(ALLOW_WEB);
    mesh.assert_allowed(&mesh.a_web);
}

#[test]
fn a_bad_policy_is_rejected_with_its_location_and_the_old_one_keeps_enforcing() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::new();
    let bad = mesh.a.dir().join("bad.toml");
    fs::write(
        &bad,
        format!(
            "{}\n[[allow]]\nfrom = \"spiffe://{TD}/web\"\nto = \"spiffe://{TD}/api\"\nports = [\"http\"]\n",
            policy(mesh.a.scope_path(), mesh.peers, "")
        ),
    )
    .unwrap();
    for dry_run in [true, false] {
        let mut args = vec!["policy", "reload", bad.to_str().unwrap()];
        if dry_run {
            args.push("--dry-run");
        }
        let output = mesh.a.cli(&args);
        assert!(!output.status.success(), "a bad policy was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("{}:", bad.display())), "{stderr}");
        assert!(stderr.contains("version 1 stays in force"), "{stderr}");
        let location = stderr
            .lines()
            .find(|l| l.starts_with(&bad.display().to_string()))
            .unwrap_or_else(|| panic!("no file:line:col in {stderr}"));
        let mut parts = location.splitn(4, ':').skip(1);
        assert!(
            parts.next().unwrap().parse::<u32>().is_ok()
                && parts.next().unwrap().parse::<u32>().is_ok(),
            "{location}"
        );
    }
    assert!(
        mesh.a
            .cli_ok(&["policy", "show"])
            .starts_with("# version 1")
    );
    mesh.assert_allowed(&mesh.a_web);
    mesh.assert_refused(&mesh.a_db);

    // A dry run of a good policy shows the diff and changes nothing.
    let next = mesh.a.dir().join("next.toml");
    fs::write(&next, policy(mesh.a.scope_path(), mesh.peers, DENY_ALL)).unwrap();
    let dry = mesh
        .a
        .cli_ok(&["policy", "reload", next.to_str().unwrap(), "--dry-run"]);
    assert!(
        dry.contains("would become version 2") && dry.contains("changes"),
        "{dry}"
    );
    assert!(
        mesh.a
            .cli_ok(&["policy", "show"])
            .starts_with("# version 1")
    );
    mesh.assert_allowed(&mesh.a_web);
}

#[test]
fn a_policy_that_enrolls_the_daemons_own_cgroup_is_refused_at_reload_and_at_start() {
    require_root();
    let _serial = serial();
    let (link, _other) = connect_nodes(&Netns::new("dself-a"), &Netns::new("dself-b"));
    let pki = TestPki::new(TD);
    // The daemon runs in home/daemon, outside the scope the policy enrolls.
    let home = ScratchCgroup::new("daemon-home");
    let own = home.child("daemon");
    let mut node = DaemonNode::start_in(binary(), &link, "a", &pki.root, &own, |scope| {
        mesh_policy(TD, scope, &["web"], &[IpAddr::V4(link.addr4())], "")
    });
    let scope = node.scope_path().to_owned();
    let (own_path, home_path) = (own.policy_path(), home.policy_path());
    let enrolling = |entry: &str| {
        format!(
            "trust_domain = \"{TD}\"\nenroll = [\"{scope}\", \"{entry}\"]\n\
             [[workload]]\nid = \"spiffe://{TD}/web\"\nselectors = [\"cgroup:path:{scope}/web\"]\n"
        )
    };
    let refusal = |entry: &str| {
        format!("enroll entry `{entry}` enrolls the daemon's own cgroup `{own_path}`")
    };
    for entry in [&own_path, &home_path] {
        let file = node.dir().join("enrolls-the-daemon.toml");
        fs::write(&file, enrolling(entry)).unwrap();
        for dry_run in [true, false] {
            let mut args = vec!["policy", "reload", file.to_str().unwrap()];
            if dry_run {
                args.push("--dry-run");
            }
            let output = node.cli(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "enrolling {entry} was accepted");
            assert!(stderr.contains(&refusal(entry)), "{stderr}");
            assert!(stderr.contains("version 1 stays in force"), "{stderr}");
        }
    }
    assert!(node.cli_ok(&["policy", "show"]).starts_with("# version 1"));

    node.signal(Signal::TERM);
    node.wait(COMMAND_LIMIT)
        .expect("the daemon exited after SIGTERM");
    for entry in [&own_path, &home_path] {
        let log = node.restart_refused(&enrolling(entry));
        assert!(log.contains(&refusal(entry)), "{log}");
    }
}

#[test]
fn sigterm_drains_open_flows_then_exits() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    let mut download = mesh.curl(
        &mesh.a_web,
        "big.bin",
        &[
            "--limit-rate",
            "2m",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
        ],
    );
    mesh.a
        .wait_for_record("A's open record of the download", |r| {
            r.event.as_str() == "open" && r.src.spiffe_id.as_deref() == Some(&id("web"))
        });
    mesh.a.signal(Signal::TERM);
    // New connections fail closed while the daemon drains.
    mesh.assert_refused(&mesh.a_web);
    let status = download
        .wait_timeout(COMMAND_LIMIT)
        .expect("the download ended");
    assert!(status.success(), "the draining daemon cut the download");
    assert_eq!(
        download.read_line(Duration::from_secs(1)).as_deref(),
        Some(BIG_BYTES.to_string().as_str())
    );
    let exit = mesh
        .a
        .wait(COMMAND_LIMIT)
        .expect("the daemon exited after draining");
    assert!(exit.success(), "{exit}; log:\n{}", mesh.a.log());
    let audit = fs::read_to_string(mesh.a.audit_path()).unwrap();
    assert!(
        audit.lines().last().unwrap().contains("\"event\":\"stop\""),
        "{audit}"
    );
    // Restarting continues the same audit chain, and the start record names the stop.
    mesh.a.restart();
    let log = mesh.a.audit_path();
    let verified = mesh.a.cli_ok(&["audit", "verify", log.to_str().unwrap()]);
    assert!(verified.starts_with("ok"), "{verified}");
    let start = mesh
        .a
        .wait_for_record("A's start record", |r| r.event.as_str() == "start");
    assert!(
        start
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("previous run stopped cleanly at seq")),
        "{start:?}"
    );
}

#[test]
fn a_killed_daemon_fails_closed_and_a_restart_readopts_the_pins() {
    require_root();
    let _serial = serial();
    let mut mesh = Mesh::new();
    mesh.assert_allowed(&mesh.a_web);
    mesh.a.signal(Signal::KILL);
    mesh.a
        .wait(COMMAND_LIMIT)
        .expect("the killed daemon was reaped");

    // The programs stay attached: enrolled workloads reach nothing, unenrolled ones are
    // untouched by A (B's ingress hook still drops their plaintext).
    mesh.assert_refused(&mesh.a_web);
    mesh.assert_refused(&mesh.a_db);
    let status = mesh
        .a
        .cli(&["status", "--pin-dir", mesh.a.pin_dir().to_str().unwrap()]);
    assert!(!status.status.success());
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("daemon: not running") && stdout.contains("datapath: installed"),
        "{stdout}"
    );

    mesh.a.restart();
    let start = mesh
        .a
        .wait_for_record("A's start record", |r| r.event.as_str() == "start");
    assert!(
        start
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("previous run ended without a stop record")),
        "{start:?}"
    );
    let status = mesh.a.cli_ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["datapath"]["adopted"], true, "{status}");
    assert_eq!(
        status["policy"]["version"], 2,
        "versions keep rising: {status}"
    );
    mesh.assert_allowed(&mesh.a_web);
    mesh.assert_refused(&mesh.a_db);
}

#[test]
fn the_control_socket_refuses_non_root_users() {
    require_root();
    let _serial = serial();
    let mesh = Mesh::new();
    // The test binary may live in a checkout other users cannot enter (root's home is 0700):
    // they run a copy from a directory they can read.
    let shared = TempDir::new().unwrap();
    let copy = shared.path().join("enforcer");
    fs::copy(binary(), &copy).unwrap();
    chmod(shared.path(), 0o755);
    chmod(&copy, 0o755);
    let as_nobody = || {
        std::process::Command::new(&copy)
            .arg("--socket")
            .arg(mesh.a.socket())
            .arg("status")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap_or_else(|error| panic!("failed to run {} as nobody: {error}", copy.display()))
    };
    // The node's directory (root's, 0700) keeps other users from the socket file...
    let output = as_nobody();
    assert!(!output.status.success(), "a non-root user read the status");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    // ...and once they may open it, the daemon refuses them by their peer credentials.
    let socket = mesh.a.socket();
    assert_eq!(
        socket.parent(),
        Some(mesh.a.dir()),
        "the socket sits in the node's directory"
    );
    chmod(mesh.a.dir(), 0o755);
    chmod(&socket, 0o777);
    let output = as_nobody();
    assert!(!output.status.success(), "a non-root user read the status");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains(&format!("root-only (peer uid {NOBODY})")),
        "{stderr}"
    );
    // curl as root speaks the same API.
    let curl = std::process::Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            socket.to_str().unwrap(),
            "http://localhost/v1/status",
        ])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(status["node"], "a");
    let metrics = std::process::Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            socket.to_str().unwrap(),
            "http://localhost/metrics",
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for family in [
        "enforcer_kernel_events_total{counter=\"lost_events\"}",
        "enforcer_tunnel_handshake_seconds_bucket",
        "enforcer_attestation_seconds_count",
        "enforcer_svids_issued_total",
        "enforcer_verdicts_total",
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
}

//! The SPIFFE Workload API as applications use it: a real daemon in a network namespace
//! serving its socket, and callers nobody here wrote (pyspiffe, the `spiffe` crate, OpenSSL
//! with the files `enforcer api` writes) in enrolled cgroups, as root and as `nobody`, in
//! their own pid and network namespaces, after an exec, across a reload and a rotation, and
//! hostile ones: no identity, no header, garbage, oversized messages, a flood of connections.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant, SystemTime},
};

use enforcer::{
    audit::{AuditRecord, Source},
    identity::{JwtAuthority, SpiffeId},
    testing::{
        DaemonNode, Netns, Node, NodeSetup, PublicDir, SYSTEM_PYTHON, ScratchCgroup, Spawn,
        Spawned, TestPki, as_uid, connect_nodes, fd_count, openssl, output_text, require_root,
        rss_kib, serial,
    },
    workload_api::{
        self,
        proto::{
            JwtsvidRequest, X509svidRequest, X509svidResponse,
            spiffe_workload_api_client::SpiffeWorkloadApiClient,
        },
    },
};
use serde_json::Value;
use tonic::Code;

const TD: &str = "wapi.test";
/// Hang guard for one caller (not a performance assertion).
const CALLER_LIMIT: Duration = Duration::from_secs(30);
/// The unprivileged uid callers also run as.
const NOBODY: u32 = 65534;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enforcer"))
}

fn id(path: &str) -> String {
    format!("spiffe://{TD}/{path}")
}

/// One daemon node serving the Workload API, and its callers' cgroups and binaries.
struct Site {
    // Callers' files and the socket go last: the daemon removes the socket first.
    node: DaemonNode,
    _peer: Node,
    /// Enrolled: python3 is `py`, the `enforcer` copy `cli`.
    app: ScratchCgroup,
    /// Enrolled: python3 is `py-other`, the `enforcer` copy `db`.
    other: ScratchCgroup,
    /// A sibling of the scope: not enrolled.
    outside: ScratchCgroup,
    /// A copy of `enforcer` every user can run (`cli` in `app`, `db` in `other`).
    cli: PathBuf,
    /// Another copy, at a path no entry names.
    stranger: PathBuf,
    public: PublicDir,
}

impl Site {
    fn new(extra_config: &str) -> Self {
        Self::with_setup(extra_config, None, "wapi-a")
    }

    fn with_setup(extra_config: &str, jwt_key: Option<String>, name: &str) -> Self {
        let (link, peer) = connect_nodes(&Netns::new(name), &Netns::new(&format!("{name}-p")));
        let public = PublicDir::new();
        let cli = public.copy(binary(), "enforcer");
        let stranger = public.copy(binary(), "stranger");
        let pki = TestPki::new(TD);
        let python = fs::canonicalize(SYSTEM_PYTHON).expect("python3");
        let setup = NodeSetup {
            config: public.config(extra_config),
            jwt_key,
        };
        let node = DaemonNode::start_set_up(binary(), &link, "a", &pki.root, setup, |scope| {
            policy(scope, &python, &cli, "py")
        });
        Self {
            app: node.scope().child("app"),
            other: node.scope().child("other"),
            outside: ScratchCgroup::new("outside"),
            node,
            _peer: peer,
            cli,
            stranger,
            public,
        }
    }

    /// `binary args...` as `uid` in `cgroup` (in the node's namespace), to completion.
    fn run(&self, cgroup: &ScratchCgroup, uid: Option<u32>, binary: &Path, args: &[&str]) -> Run {
        let spawn = as_uid(uid, binary)
            .args(args)
            .env(
                workload_api::ENDPOINT_ENV,
                format!("unix://{}", self.public.socket().display()),
            )
            .cgroup(cgroup)
            .netns(self.node.link().netns());
        finish(spawn.spawn())
    }

    /// pyspiffe's `args` as `uid` in `cgroup`.
    fn pyspiffe(&self, cgroup: &ScratchCgroup, uid: Option<u32>, args: &[&str]) -> Run {
        finish(
            self.public
                .pyspiffe(cgroup, uid, args)
                .netns(self.node.link().netns())
                .spawn(),
        )
    }

    /// `enforcer api args... --json` (the copy `binary`) in `cgroup`.
    fn api(&self, cgroup: &ScratchCgroup, binary: &Path, args: &[&str]) -> Run {
        let mut all = vec!["api"];
        all.extend_from_slice(args);
        self.run(cgroup, None, binary, &all)
    }

    fn reload(&self, python: &Path, py: &str) {
        let text = policy(self.node.scope_path(), python, &self.cli, py);
        let file = self.public.path().join("reload.toml");
        fs::write(&file, text).expect("write the policy");
        let said = self
            .node
            .cli_ok(&["policy", "reload", file.to_str().expect("utf-8")]);
        assert!(said.contains("in force"), "{said}");
    }

    fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(self.node.socket())
            .arg("http://localhost/metrics")
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node's Workload API refusal records.
    fn refusals(&self) -> Vec<AuditRecord> {
        self.node
            .flows(&["--verdict", "deny"])
            .into_iter()
            .filter(|record| record.source == Source::WorkloadApi)
            .collect()
    }
}

/// The node's policy: its scope enrolled; python3 and the `enforcer` copy identified per
/// cgroup, python3 in `app` as `py_name`.
fn policy(scope: &str, python: &Path, cli: &Path, py_name: &str) -> String {
    let (python, cli) = (python.display(), cli.display());
    format!(
        r#"trust_domain = "{TD}"
enroll = ["{scope}"]

[[workload]]
id = "spiffe://{TD}/{py_name}"
selectors = ["cgroup:path:{scope}/app", "unix:path:{python}"]

[[workload]]
id = "spiffe://{TD}/cli"
selectors = ["cgroup:path:{scope}/app", "unix:path:{cli}"]

[[workload]]
id = "spiffe://{TD}/py-other"
selectors = ["cgroup:path:{scope}/other", "unix:path:{python}"]

[[workload]]
id = "spiffe://{TD}/db"
selectors = ["cgroup:path:{scope}/other", "unix:path:{cli}"]
"#
    )
}

/// A finished caller: exit code and output.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON object of stdout's last line, asserting success.
    fn json(&self) -> Value {
        assert_eq!(
            self.code,
            Some(0),
            "the caller failed: {}{}",
            self.stdout,
            self.stderr
        );
        self.last()
    }

    fn last(&self) -> Value {
        let line = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}{}", self.stdout, self.stderr))
    }

    /// pyspiffe's refusal: its gRPC code name.
    fn pyspiffe_error(&self) -> String {
        assert_eq!(
            self.code,
            Some(2),
            "not refused: {}{}",
            self.stdout,
            self.stderr
        );
        self.last()["error"].as_str().unwrap_or_default().to_owned()
    }
}

fn finish(mut process: Spawned) -> Run {
    let code = process
        .wait_timeout(CALLER_LIMIT)
        .unwrap_or_else(|| panic!("the caller hung: {}", process.stderr()))
        .code();
    let mut stdout = String::new();
    while let Some(line) = process.read_line(Duration::from_millis(200)) {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    Run {
        code,
        stdout,
        stderr: process.stderr(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The next message of a stream, within the hang guard.
async fn next(
    stream: &mut tonic::Streaming<X509svidResponse>,
) -> Result<Option<X509svidResponse>, tonic::Status> {
    tokio::time::timeout(CALLER_LIMIT, stream.message())
        .await
        .expect("the daemon answered within the hang guard")
}

#[test]
fn callers_get_the_identity_policy_gives_them_and_nothing_else() {
    require_root();
    let _serial = serial();
    let site = Site::new("");

    // pyspiffe, as root and as nobody: python3 in `app` is `py`.
    for uid in [None, Some(NOBODY)] {
        let x509 = site.pyspiffe(&site.app, uid, &["x509"]).json();
        assert_eq!(x509["spiffe_id"], id("py"), "uid {uid:?}");
        assert_eq!(x509["chain_len"], 2, "leaf and node intermediate");
        assert_eq!(x509["key_type"], "ec-secp256r1");
    }
    let bundles = site.pyspiffe(&site.app, None, &["bundles"]).json();
    assert_eq!(bundles["trust_domains"], serde_json::json!([TD]));
    let jwt = site
        .pyspiffe(&site.app, None, &["jwt", "audience-1"])
        .json();
    assert_eq!(jwt["spiffe_id"], id("py"));
    let token = jwt["token"].as_str().expect("token").to_owned();
    let validated = site
        .pyspiffe(&site.app, None, &["validate", "audience-1", &token])
        .json();
    assert_eq!(validated["spiffe_id"], id("py"));
    assert_eq!(validated["claims"]["sub"], id("py"));
    let jwt_bundles = site.pyspiffe(&site.app, None, &["jwt-bundles"]).json();
    assert_eq!(
        jwt_bundles["kids"][TD].as_array().map(Vec::len),
        Some(1),
        "{jwt_bundles}"
    );

    // Another binary in the same cgroup gets its own identity; in another cgroup, another.
    let cli = site
        .api(&site.app, &site.cli, &["fetch", "x509", "--json"])
        .json();
    assert_eq!(cli["spiffe_id"], id("cli"));
    let db = site
        .api(&site.other, &site.cli, &["fetch", "x509", "--json"])
        .json();
    assert_eq!(db["spiffe_id"], id("db"));

    // A binary no entry names, in the same cgroup: refused, and recorded.
    let refused = site.api(&site.app, &site.stranger, &["fetch", "x509", "--json"]);
    assert_eq!(
        refused.code,
        Some(1),
        "{}{}",
        refused.stdout,
        refused.stderr
    );
    assert!(
        refused.stderr.contains("PermissionDenied") && refused.stderr.contains("no workload entry"),
        "{}",
        refused.stderr
    );
    // An unenrolled process: refused whatever it runs.
    assert_eq!(
        site.pyspiffe(&site.outside, None, &["x509"])
            .pyspiffe_error(),
        "PERMISSION_DENIED"
    );
    site.node.wait_until("the refusals to be recorded", |_| {
        site.refusals().len() >= 2
    });
    let refusals = site.refusals();
    let stranger = refusals
        .iter()
        .find(|record| record.reason == "no-identity")
        .unwrap_or_else(|| panic!("no no-identity record: {refusals:?}"));
    let stranger_path = site.stranger.display().to_string();
    assert_eq!(stranger.src.exe.as_deref(), Some(stranger_path.as_str()));
    assert!(stranger.src.pid.is_some() && stranger.src.sha256.is_some());
    assert_eq!(
        stranger.src.cgroup.as_deref(),
        Some(site.app.policy_path().as_str())
    );
    assert!(
        refusals
            .iter()
            .any(|record| record.reason == "not-enrolled"),
        "{refusals:?}"
    );

    spiffe_crate_gets_py(&site);

    let metrics = site.metrics();
    for line in [
        "enforcer_workload_api_requests_total{method=\"FetchX509SVID\",code=\"OK\"}",
        "enforcer_workload_api_requests_total{method=\"FetchX509SVID\",code=\"PERMISSION_DENIED\"}",
        "enforcer_workload_api_requests_total{method=\"ValidateJWTSVID\",code=\"OK\"}",
        "enforcer_workload_api_svids_pushed_total",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

/// The spiffe crate, on a connection a python3 in `app` made, gets `py`'s SVID, bundles and a
/// JWT-SVID that validates.
fn spiffe_crate_gets_py(site: &Site) {
    let mut handed = site.public.handed_connection(&site.app);
    runtime().block_on(async {
        let stream = handed.take();
        let channel = workload_api::channel_over(stream)
            .await
            .expect("a channel on the handed connection");
        let client = spiffe::WorkloadApiClient::new_with_channel(
            spiffe::transport::Endpoint::parse("unix:///handed").expect("endpoint"),
            channel,
        );
        let svid = client.fetch_x509_svid().await.expect("X.509-SVID");
        assert_eq!(svid.spiffe_id().to_string(), id("py"));
        let bundles = client.fetch_x509_bundles().await.expect("bundles");
        assert!(
            bundles
                .get(&spiffe::TrustDomain::new(TD).expect("td"))
                .is_some()
        );
        let token = client
            .fetch_jwt_token(["spiffe-crate"], None)
            .await
            .expect("JWT-SVID");
        let validated = client
            .validate_jwt_token("spiffe-crate", &token)
            .await
            .expect("validated");
        assert_eq!(validated.spiffe_id().to_string(), id("py"));
    });
}

#[test]
fn an_exec_ends_the_callers_stream_and_a_reload_pushes_its_new_identity() {
    require_root();
    let _serial = serial();
    let site = Site::new("");
    let python = fs::canonicalize(SYSTEM_PYTHON).expect("python3");
    let mut handed = site.public.handed_connection(&site.app);
    let rt = runtime();
    let mut stream = rt.block_on(async {
        let mut client = workload_api::over(handed.take()).await.expect("client");
        client
            .fetch_x509svid(X509svidRequest {})
            .await
            .expect("stream")
            .into_inner()
    });
    let first = rt
        .block_on(next(&mut stream))
        .expect("first message")
        .expect("a message");
    assert_eq!(first.svids[0].spiffe_id, id("py"));

    site.reload(&python, "py-renamed");
    let pushed = rt
        .block_on(next(&mut stream))
        .expect("pushed after the reload")
        .expect("a message");
    assert_eq!(pushed.svids[0].spiffe_id, id("py-renamed"));

    // The caller execs the `enforcer` copy, which is `cli` in this cgroup: the connection the
    // python3 image opened (still open here) serves no later image, named or not.
    let socket = site.public.socket();
    handed.exec(&[
        site.cli.to_str().expect("utf-8"),
        "--socket",
        socket.to_str().expect("utf-8"),
        "api",
        "watch",
        "--json",
    ]);
    let ended = rt.block_on(next(&mut stream));
    let status = ended.expect_err("the stream ends with a refusal");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("no longer the image"),
        "{status:?}"
    );
    // The new image, on a connection of its own, is `cli`.
    let watched = handed
        .process
        .read_line(CALLER_LIMIT)
        .unwrap_or_else(|| panic!("cli's watch printed nothing: {}", handed.process.stderr()));
    let watched: Value = serde_json::from_str(&watched).expect("JSON");
    assert_eq!(watched["spiffe_id"], id("cli"));
    handed.process.kill();
}

#[test]
fn a_silent_or_stalled_client_does_not_hold_the_daemon_at_its_stop() {
    require_root();
    let _serial = serial();
    let mut site = Site::new("");
    let _silent = std::os::unix::net::UnixStream::connect(site.public.socket()).expect("connect");
    let mut handed = site.public.handed_connection(&site.app);
    let rt = runtime();
    let _stalled = rt.block_on(async {
        let mut client = workload_api::over(handed.take()).await.expect("client");
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await
            .expect("stream")
            .into_inner();
        next(&mut stream).await.expect("first").expect("a message");
        // Held, never read again.
        (client, stream)
    });
    site.node.signal(rustix::process::Signal::TERM);
    let stopped = site.node.wait(Duration::from_secs(15));
    assert!(
        stopped.is_some_and(|status| status.success()),
        "the daemon did not stop ({stopped:?}); its log:\n{}",
        site.node.log()
    );
    handed.process.kill();
}

#[test]
fn a_watching_client_gets_the_rotated_svid_before_the_old_one_expires() {
    require_root();
    let _serial = serial();
    // SVIDs valid for 10 s: rotated about every 5 s.
    let site = Site::new("[identity]\nsvid_ttl = \"10s\"\n");
    let mut watch = site
        .public
        .pyspiffe(&site.app, None, &["watch", "3", "40"])
        .netns(site.node.link().netns())
        .spawn();
    let mut seen: Vec<(Value, SystemTime)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.len() < 3 && Instant::now() < deadline {
        if let Some(line) = watch.read_line(Duration::from_secs(1)) {
            let value: Value = serde_json::from_str(&line).expect("JSON line");
            seen.push((value, SystemTime::now()));
        }
    }
    assert_eq!(seen.len(), 3, "three SVIDs: {seen:?}\n{}", watch.stderr());
    for pair in seen.windows(2) {
        let (old, _) = &pair[0];
        let (new, arrived) = &pair[1];
        assert_ne!(old["leaf_serial"], new["leaf_serial"], "a new SVID");
        let expiry = SystemTime::UNIX_EPOCH
            + Duration::from_secs(old["not_after"].as_u64().expect("not_after"));
        assert!(
            *arrived < expiry,
            "the rotated SVID arrived after the old one expired: {pair:?}"
        );
    }
    assert_eq!(
        watch
            .wait_timeout(CALLER_LIMIT)
            .and_then(|status| status.code()),
        Some(0)
    );
}

#[test]
fn apps_that_fetched_their_svids_through_the_api_complete_mtls_with_each_other() {
    require_root();
    let _serial = serial();
    let site = Site::new("");
    let server_dir = site.public.path().join("server");
    let client_dir = site.public.path().join("client");
    for (cgroup, dir, name) in [
        (&site.app, &server_dir, "cli"),
        (&site.other, &client_dir, "db"),
    ] {
        let dir = dir.to_str().expect("utf-8");
        let fetched = site
            .api(
                cgroup,
                &site.cli,
                &["fetch", "x509", "--write", dir, "--json"],
            )
            .json();
        assert_eq!(fetched["spiffe_id"], id(name));
    }
    let key_mode = fs::metadata(client_dir.join("svid.0.key"))
        .expect("key")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600
    );
    openssl_mtls(&server_dir, &client_dir, &id("db"));
}

/// `openssl s_server` with the files in `server_dir` and `openssl s_client` with those in
/// `client_dir` complete mTLS 1.3, each verifying the other, the client presenting `client_id`.
fn openssl_mtls(server_dir: &Path, client_dir: &Path, client_id: &str) {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let file = |name: &str| server_dir.join(name);
    let mut server = Spawn::new("openssl")
        .args(["s_server", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "-tls1_3",
            "-Verify",
            "1",
            "-verify_return_error",
            "-naccept",
            "1",
            "-rev",
        ])
        .arg("-cert")
        .arg(file("svid.0.pem"))
        .arg("-cert_chain")
        .arg(file("svid.0.pem"))
        .arg("-key")
        .arg(file("svid.0.key"))
        .arg("-CAfile")
        .arg(file("bundle.0.pem"))
        .spawn();
    let deadline = Instant::now() + CALLER_LIMIT;
    while server.read_line(CALLER_LIMIT).as_deref() != Some("ACCEPT") {
        assert!(
            Instant::now() < deadline,
            "s_server did not start: {}",
            server.stderr()
        );
    }
    let mut client = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-tls1_3", "-verify_return_error", "-ign_eof"])
        .args([
            "-cert_chain",
            "svid.0.pem",
            "-cert",
            "svid.0.pem",
            "-key",
            "svid.0.key",
            "-CAfile",
            "bundle.0.pem",
        ])
        .current_dir(client_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    client
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"ping through svids\n")
        .expect("send");
    let out = wait_output(client);
    let text = output_text(&out);
    assert!(text.contains("Verification: OK"), "{text}");
    assert!(
        text.contains("sdivs hguorht gnip"),
        "the server's reversed reply: {text}"
    );
    let server_exit = server.wait_timeout(CALLER_LIMIT);
    assert!(
        server_exit.is_some_and(|status| status.success()),
        "{}",
        server.stderr()
    );
    let peer = openssl(
        client_dir,
        &[
            "x509",
            "-in",
            "svid.0.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(
        output_text(&peer).contains(client_id),
        "{}",
        output_text(&peer)
    );
}

/// The output of `child`, killed after the hang guard.
fn wait_output(mut child: std::process::Child) -> Output {
    let deadline = Instant::now() + CALLER_LIMIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_caller_in_its_own_pid_and_network_namespace_gets_its_identity() {
    require_root();
    let _serial = serial();
    let site = Site::new("");
    let python = enforcer::testing::pyspiffe_python();
    let script = site.public.path().join("pyspiffe_client.py");
    let unshared = site.run(
        &site.app,
        None,
        Path::new("/usr/bin/unshare"),
        &[
            "--pid",
            "--fork",
            "--net",
            "--mount",
            "--mount-proc",
            python.to_str().expect("utf-8"),
            script.to_str().expect("utf-8"),
            "x509",
        ],
    );
    assert_eq!(unshared.json()["spiffe_id"], id("py"));
}

#[test]
fn bad_requests_are_refused_and_a_flood_of_connections_stays_bounded() {
    require_root();
    let _serial = serial();
    let site = Site::new("");
    let rt = runtime();

    // No security header, or a wrong one: InvalidArgument.
    for value in [None, Some("false")] {
        let mut handed = site.public.handed_connection(&site.app);
        let status = rt.block_on(async {
            let channel = workload_api::channel_over(handed.take())
                .await
                .expect("channel");
            let mut client = SpiffeWorkloadApiClient::new(channel);
            let mut request = tonic::Request::new(X509svidRequest {});
            if let Some(value) = value {
                request
                    .metadata_mut()
                    .insert(workload_api::SECURITY_HEADER, value.parse().expect("value"));
            }
            client.fetch_x509svid(request).await.expect_err("refused")
        });
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{value:?}: {status:?}"
        );
    }

    // An oversized request: refused by size, before it is decoded into anything.
    let mut handed = site.public.handed_connection(&site.app);
    let status = rt.block_on(async {
        let mut client = workload_api::over(handed.take()).await.expect("client");
        client
            .fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["a".repeat(1 << 20)],
                spiffe_id: String::new(),
            })
            .await
            .expect_err("refused")
    });
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    // Garbage instead of HTTP/2: the connection is closed.
    let mut garbage =
        std::os::unix::net::UnixStream::connect(site.public.socket()).expect("connect");
    garbage
        .set_read_timeout(Some(CALLER_LIMIT))
        .expect("timeout");
    let _ = garbage.write_all(&[0x16; 4096]);
    let mut rest = Vec::new();
    let closed = garbage.read_to_end(&mut rest);
    assert!(
        closed.is_ok()
            || closed
                .as_ref()
                .is_err_and(|error| error.kind() == std::io::ErrorKind::ConnectionReset),
        "the daemon closed the connection rather than let the read time out: {closed:?}"
    );

    flood(&site);
}

/// 10,000 connections from one caller, 500 held at a time: the daemon keeps its share of
/// descriptors and memory, and serves another caller meanwhile.
fn flood(site: &Site) {
    let daemon = site.node.pid();
    let (fds_before, rss_before) = (fd_count(daemon), rss_kib(daemon));
    let mut flood = Spawn::new(SYSTEM_PYTHON)
        .args([
            "-c",
            FLOOD,
            site.public.socket().to_str().expect("utf-8"),
            "20",
            "500",
        ])
        .cgroup(&site.app)
        .stdin_piped()
        .spawn();
    let (mut fds_peak, mut rss_peak) = (fds_before, rss_before);
    for round in 0..20 {
        let line = flood.read_line(CALLER_LIMIT);
        assert!(
            line.as_deref()
                .is_some_and(|line| line.starts_with("holding")),
            "round {round}: {line:?} {}",
            flood.stderr()
        );
        fds_peak = fds_peak.max(fd_count(daemon));
        rss_peak = rss_peak.max(rss_kib(daemon));
        if round % 5 == 0 {
            let other = site
                .api(&site.other, &site.cli, &["fetch", "x509", "--json"])
                .json();
            assert_eq!(other["spiffe_id"], id("db"), "served during the flood");
        }
        flood.write_line("next");
    }
    assert_eq!(
        flood.wait_timeout(CALLER_LIMIT).and_then(|s| s.code()),
        Some(0)
    );
    // Each connection the daemon keeps holds its socket and its caller's pidfd.
    assert!(
        fds_peak <= fds_before + 2 * 64 + 16,
        "descriptors: {fds_before} before, {fds_peak} at the peak"
    );
    assert!(
        rss_peak <= rss_before + 32 * 1024,
        "RSS: {rss_before} KiB before, {rss_peak} KiB at the peak"
    );
    let refused: u64 = site
        .metrics()
        .lines()
        .find_map(|line| line.strip_prefix("enforcer_workload_api_refused_connections_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("refused connections counted");
    assert!(refused > 0, "the caller's share was never enforced");
    let after = site.pyspiffe(&site.app, None, &["x509"]).json();
    assert_eq!(after["spiffe_id"], id("py"), "still serving");
}

/// Opens `argv[2]` rounds of `argv[3]` connections to `argv[1]`, prints `holding N` after each
/// round and closes them when a line arrives on stdin.
const FLOOD: &str = r#"
import socket, sys
path, rounds, per_round = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(rounds):
    held = []
    for _ in range(per_round):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        held.append(s)
    print("holding", len(held), flush=True)
    sys.stdin.readline()
    for s in held:
        s.close()
"#;

#[test]
fn a_jwt_svid_minted_on_one_node_validates_on_another_and_nothing_else_does() {
    require_root();
    let _serial = serial();
    let td = TD.parse().expect("td");
    let shared = JwtAuthority::generate(td).expect("JWT key");
    let a = Site::with_setup("", Some(shared.to_pem()), "wapi-ja");
    let b = Site::with_setup("", Some(shared.to_pem()), "wapi-jb");
    let minted = a
        .api(
            &a.app,
            &a.cli,
            &["fetch", "jwt", "--audience", "billing", "--json"],
        )
        .json();
    assert_eq!(minted["spiffe_id"], id("cli"));
    let token = minted["token"].as_str().expect("token").to_owned();

    let validate = |token: &str, audience: &str| {
        b.api(
            &b.app,
            &b.cli,
            &["validate", "jwt", "--audience", audience, token, "--json"],
        )
    };
    let valid = validate(&token, "billing").json();
    assert_eq!(valid["spiffe_id"], id("cli"), "minted on a, valid on b");
    assert_eq!(valid["claims"]["aud"], serde_json::json!(["billing"]));

    let subject: SpiffeId = id("forged").parse().expect("id");
    let other_key = JwtAuthority::generate(TD.parse().expect("td")).expect("key");
    let now = SystemTime::now();
    let expired = shared
        .mint(
            &subject,
            &["billing".to_owned()],
            now - Duration::from_hours(1),
            Duration::from_mins(1),
        )
        .expect("mint");
    let foreign = other_key
        .mint(
            &subject,
            &["billing".to_owned()],
            now,
            Duration::from_mins(1),
        )
        .expect("mint");
    let unsigned = unsigned_token(&token);
    for (what, token, audience, expected) in [
        ("wrong audience", token.as_str(), "payroll", "audience"),
        ("expired", expired.token.as_str(), "billing", "expired"),
        ("another key", foreign.token.as_str(), "billing", "kid"),
        ("alg none", unsigned.as_str(), "billing", "none"),
    ] {
        let refused = validate(token, audience);
        assert_eq!(
            refused.code,
            Some(1),
            "{what}: {}{}",
            refused.stdout,
            refused.stderr
        );
        assert!(
            refused.stderr.contains("InvalidArgument")
                && refused.stderr.to_lowercase().contains(expected),
            "{what}: {}",
            refused.stderr
        );
    }
}

/// `token` with its header replaced by `{"alg":"none"}` and no signature.
fn unsigned_token(token: &str) -> String {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = token.split('.').nth(1).expect("payload");
    let header = engine.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{payload}.")
}

//! The control API transport end to end on a real Unix socket: round trips through `ControlClient`,
//! streams, errors worded for an operator, the socket's modes, stale and foreign files at its
//! path, the root-only gate (checked with curl as `nobody`) and shutdown.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixListener as StdUnixListener, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension, Router,
    extract::{Request, State},
    middleware::{Next, from_fn_with_state},
    response::Response,
    routing::get,
};
use bytes::Bytes;
use enforcer::{
    control::{
        Caller, ClientError, ControlClient, ControlError, MAX_REQUEST_BODY, Query, REQUEST_TIMEOUT,
        Reply, Routes, bind_control_socket, serve_tcp, serve_unix,
    },
    testing::require_root,
};
use http::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// Far more than anything here should take.
const PROMPT: Duration = Duration::from_secs(10);
/// The user curl runs as in the root-only test.
const NOBODY: u32 = 65534;

/// Echoes every request as JSON, except a few paths that exercise the other replies.
#[derive(Default)]
struct Echo {
    /// How many requests reached the routes.
    calls: AtomicUsize,
    /// Senders of `/v1/follow` streams, kept so the streams stay open.
    followers: Mutex<Vec<mpsc::Sender<Bytes>>>,
}

impl Routes for Echo {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/lines", get(lines))
            .route("/v1/follow", get(follow))
            .route("/v1/hang", get(std::future::pending::<Reply>))
            .route("/v1/panic", get(panics))
            .route("/v1/nope", get(nope))
            .fallback(echo)
            .layer(from_fn_with_state(Arc::clone(&self), count))
            .with_state(self)
    }
}

/// Counts the requests that reach the routes.
async fn count(State(echo): State<Arc<Echo>>, request: Request, next: Next) -> Response {
    echo.calls.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

async fn lines() -> Reply {
    let (sender, lines) = mpsc::channel(1);
    tokio::spawn(async move {
        for n in 1..=3 {
            sender
                .send(Bytes::from(format!("{{\"n\":{n}}}")))
                .await
                .unwrap();
        }
    });
    Reply::Stream {
        content_type: "application/x-ndjson",
        lines,
    }
}

async fn follow(State(echo): State<Arc<Echo>>) -> Reply {
    let (sender, lines) = mpsc::channel(1);
    sender.send(Bytes::from_static(b"first")).await.unwrap();
    echo.followers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(sender);
    Reply::Stream {
        content_type: "application/x-ndjson",
        lines,
    }
}

async fn panics() -> Reply {
    panic!("the handler panics on purpose")
}

async fn nope(uri: Uri) -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        format_args!("no route for {}", uri.path()),
    )
}

async fn echo(
    method: Method,
    uri: Uri,
    Extension(peer): Extension<Caller>,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Reply {
    let peer = match peer {
        Caller::Unix { uid, pid } => json!({ "uid": uid, "pid": pid }),
        Caller::Tcp(address) => json!({ "tcp": address.to_string() }),
    };
    Reply::json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": query,
        "body": String::from_utf8_lossy(&body),
        "peer": peer,
    }))
}

/// A control server on a socket in a scratch directory.
struct Daemon {
    dir: TempDir,
    socket: PathBuf,
    handler: Arc<Echo>,
    stop: watch::Sender<bool>,
    served: JoinHandle<()>,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/enforcer/control.sock");
        let listener = bind_control_socket(&socket)
            .unwrap_or_else(|error| panic!("failed to bind {}: {error}", socket.display()));
        let handler = Arc::new(Echo::default());
        let (stop, shutdown) = watch::channel(false);
        let served = tokio::spawn(serve_unix(listener, Arc::clone(&handler), shutdown));
        Self {
            dir,
            socket,
            handler,
            stop,
            served,
        }
    }

    fn client(&self) -> ControlClient {
        ControlClient::new(&self.socket)
    }

    fn calls(&self) -> usize {
        self.handler.calls.load(Ordering::SeqCst)
    }

    /// Signals shutdown and waits (boundedly) for the server to finish.
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(PROMPT, self.served)
            .await
            .expect("the server stops promptly after shutdown")
            .expect("the server task does not fail");
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("failed to chmod {}: {error}", path.display()));
}

/// The status and the daemon's text of a request that must have failed with a non-2xx reply.
fn status_error(result: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, String) {
    match result {
        Err(ClientError::Status { status, message }) => (status, message),
        other => panic!("expected a status error, got {other:?}"),
    }
}

/// `curl` on the control socket as `uid`, from `/`; returns what it prints: the body, then
/// the status code.
async fn curl_as(uid: u32, socket: &Path) -> String {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = Command::new("curl")
            .args(["-q", "-s", "-o", "-", "-w", "%{http_code}", "--unix-socket"])
            .arg(&socket)
            .arg("http://localhost/v1/status")
            .current_dir("/")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap_or_else(|error| panic!("failed to run curl (is it installed?): {error}"));
        assert!(
            output.status.success(),
            "curl as uid {uid} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn get_and_post_round_trip() {
    require_root();
    let daemon = Daemon::start();
    let query =
        serde_urlencoded::to_string([("id", "spiffe://example.org/ns/web"), ("q", "a b&c")])
            .unwrap();
    let reply = daemon
        .client()
        .get(&format!("/v1/echo?{query}&flag"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json::<Value>().unwrap(),
        json!({
            "method": "GET",
            "path": "/v1/echo",
            "query": [["id", "spiffe://example.org/ns/web"], ["q", "a b&c"], ["flag", ""]],
            "body": "",
            "peer": { "uid": 0, "pid": std::process::id() },
        })
    );

    let reply = daemon
        .client()
        .post("/v1/policy", Bytes::from_static(b"{\"allow\":[]}"))
        .await
        .unwrap();
    let echoed: Value = reply.json().unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/v1/policy");
    assert_eq!(echoed["body"], "{\"allow\":[]}");
    assert_eq!(daemon.calls(), 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_reads_exactly_the_lines_sent() {
    require_root();
    let daemon = Daemon::start();
    let mut lines = daemon.client().stream("/v1/lines").await.unwrap();
    for n in 1..=3 {
        assert_eq!(
            lines.next_line().await.unwrap(),
            Some(format!("{{\"n\":{n}}}"))
        );
    }
    assert_eq!(lines.next_line().await.unwrap(), None);
    assert_eq!(lines.next_line().await.unwrap(), None, "stays ended");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn error_replies_carry_the_servers_text() {
    require_root();
    let daemon = Daemon::start();
    let client = daemon.client();
    let expected = (StatusCode::NOT_FOUND, "no route for /v1/nope".to_owned());
    assert_eq!(status_error(client.get("/v1/nope").await), expected);
    assert_eq!(status_error(client.stream("/v1/nope").await), expected);

    let error = client.get("/v1/nope").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the daemon answered 404 Not Found: no route for /v1/nope"
    );

    for path in ["/v1/echo?bad=%zz", "/v1/lines?bad=%zz", "/v1/nope?%zz"] {
        let (status, message) = status_error(client.get(path).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(message.contains("`%zz`"), "{path}: {message}");
    }
    daemon.stop().await;
}

/// Sends `head` and then `body` (from a task of its own, since the server may stop reading)
/// on a raw connection, and returns the server's answer.
async fn raw_exchange(socket: &Path, head: String, body: Vec<u8>) -> String {
    let (mut reader, mut writer) = UnixStream::connect(socket).await.unwrap().into_split();
    let upload = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&body).await
    });
    let mut answer = Vec::new();
    tokio::time::timeout(PROMPT, reader.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes promptly")
        .unwrap();
    // The upload may fail with a broken pipe: the server closes without reading all of it.
    let _ = upload.await.unwrap();
    String::from_utf8(answer).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_bodies_are_refused_with_413() {
    require_root();
    let daemon = Daemon::start();
    let client = daemon.client();
    let largest = Bytes::from(vec![b'x'; MAX_REQUEST_BODY]);
    let reply = client.post("/v1/echo", largest).await.unwrap();
    let echoed: Value = reply.json().unwrap();
    assert_eq!(echoed["body"].as_str().unwrap().len(), MAX_REQUEST_BODY);

    let too_large = Bytes::from(vec![b'x'; MAX_REQUEST_BODY + 1]);
    let error = client.post("/v1/echo", too_large).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the request body is 4194305 bytes; the daemon accepts at most 4 MiB"
    );

    let refusal = "{\"error\":\"the request body exceeds 4 MiB\"}\n";
    let declared = raw_exchange(
        &daemon.socket,
        format!(
            "POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            MAX_REQUEST_BODY + 1
        ),
        Vec::new(),
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 413 "), "{declared}");
    assert!(declared.ends_with(refusal), "{declared}");

    let mut chunk = format!("{:x}\r\n", MAX_REQUEST_BODY + 1).into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', MAX_REQUEST_BODY + 1));
    chunk.extend_from_slice(b"\r\n0\r\n\r\n");
    let chunked = raw_exchange(
        &daemon.socket,
        "POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_owned(),
        chunk,
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413 "), "{chunked}");
    assert!(chunked.ends_with(refusal), "{chunked}");

    assert_eq!(daemon.calls(), 1, "no oversize request reached the handler");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_panics_are_500s_and_the_server_carries_on() {
    require_root();
    let daemon = Daemon::start();
    let (status, message) = status_error(daemon.client().get("/v1/panic").await);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(message, "the handler failed; the daemon log says why");
    assert!(daemon.client().get("/v1/echo").await.is_ok());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_do_not_stop_the_server() {
    require_root();
    let daemon = Daemon::start();
    let mut raw = UnixStream::connect(&daemon.socket).await.unwrap();
    raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PROMPT, raw.read_to_end(&mut answer))
        .await
        .expect("the server closes a malformed connection promptly")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    assert!(daemon.client().get("/v1/echo").await.is_ok());
    assert_eq!(daemon.calls(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_is_0600_in_a_directory_others_may_pass_but_not_list() {
    require_root();
    let daemon = Daemon::start();
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o711);
    let leftovers: Vec<_> = fs::read_dir(daemon.socket.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["control.sock"], "no staging directory is left");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    drop(StdUnixListener::bind(&socket).unwrap());
    let error = ControlClient::new(&socket)
        .get("/v1/echo")
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "nothing is listening on {} (stale socket?)",
            socket.display()
        )
    );

    let listener = bind_control_socket(&socket).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let served = tokio::spawn(serve_unix(listener, Arc::new(Echo::default()), shutdown));
    assert!(ControlClient::new(&socket).get("/v1/echo").await.is_ok());
    assert_eq!(mode(&socket), 0o600);
    stop.send_replace(true);
    tokio::time::timeout(PROMPT, served).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn regular_file_at_the_path_is_refused_and_left_intact() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    fs::write(&path, "not a socket").unwrap();
    let error = bind_control_socket(&path).unwrap_err();
    assert!(
        matches!(error, ControlError::NotASocket { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing else created"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn second_bind_fails_while_the_first_serves() {
    require_root();
    let daemon = Daemon::start();
    let error = bind_control_socket(&daemon.socket).unwrap_err();
    assert!(matches!(error, ControlError::InUse { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!("another daemon is serving {}", daemon.socket.display())
    );
    assert!(
        daemon.client().get("/v1/echo").await.is_ok(),
        "the first server still serves"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_socket_says_no_daemon_is_running() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let error = ControlClient::new(&socket)
        .get("/v1/status")
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::NotRunning { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "no daemon is listening on {} (is `enforcer run` running?)",
            socket.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn non_root_peers_get_403_and_never_reach_the_handler() {
    require_root();
    let daemon = Daemon::start();
    // Let `nobody` reach the socket, so only the credential check stands in its way.
    chmod(&daemon.socket, 0o777);
    for dir in daemon.socket.ancestors().skip(1) {
        chmod(dir, 0o755);
        if dir == daemon.dir.path() {
            break;
        }
    }

    let refused = curl_as(NOBODY, &daemon.socket).await;
    assert_eq!(
        refused,
        format!("{{\"error\":\"the control socket is root-only (peer uid {NOBODY})\"}}\n403")
    );
    assert_eq!(daemon.calls(), 0, "the handler never saw the request");

    let served = curl_as(0, &daemon.socket).await;
    assert!(served.ends_with("}\n200"), "{served}");
    assert_eq!(daemon.calls(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_streams_and_stops_the_server() {
    require_root();
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let mut follow = client.stream("/v1/follow").await.unwrap();
    assert_eq!(follow.next_line().await.unwrap().as_deref(), Some("first"));

    daemon.stop.send_replace(true);
    let ended = tokio::time::timeout(PROMPT, follow.next_line())
        .await
        .expect("shutdown ends the open stream")
        .unwrap();
    assert_eq!(ended, None);
    tokio::time::timeout(PROMPT, &mut daemon.served)
        .await
        .expect("the server stops promptly after shutdown")
        .unwrap();

    let error = client.get("/v1/echo").await.unwrap_err();
    assert!(
        matches!(error, ClientError::Refused { .. }),
        "nothing accepts after shutdown: {error:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn requests_time_out() {
    require_root();
    let daemon = Daemon::start();
    let error = daemon.client().get("/v1/hang").await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "the daemon on {} did not answer within {REQUEST_TIMEOUT:?}",
            daemon.socket.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_serves_with_the_peer_address() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    let served = tokio::spawn(serve_tcp(listener, Arc::new(Echo::default()), shutdown));

    let mut stream = TcpStream::connect(address).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream
        .write_all(b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PROMPT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let echoed: Value = serde_json::from_str(body).unwrap();
    assert_eq!(echoed["path"], "/metrics");
    assert_eq!(echoed["query"], json!([["x", "1"]]));
    assert_eq!(echoed["peer"], json!({ "tcp": local.to_string() }));

    stop.send_replace(true);
    tokio::time::timeout(PROMPT, served).await.unwrap().unwrap();
}

//! Serving HTTP/1.1 on the control socket and on the metrics listener: one task per
//! connection, the request body read whole (up to [`MAX_REQUEST_BODY`]) and the query decoded
//! before the [`Handler`] sees it, and a root-only gate on the control socket.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible, fmt::Display, io, net::SocketAddr, pin::pin, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{mpsc, watch},
    task::{JoinError, JoinSet},
};
use tracing::{debug, error, warn};

use super::{
    body::{LineStream, ReplyBody},
    query::parse_query,
    v1,
};

/// The largest request body the server reads; a longer one is answered with 413.
pub const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish after shutdown before they are closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A request as a handler sees it: the query decoded and the body read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The HTTP method.
    pub method: Method,
    /// The path as sent, not percent-decoded, so an encoded `/` cannot split a segment.
    pub path: String,
    /// The query's `(key, value)` pairs in the order sent, percent-decoded.
    pub query: Vec<(String, String)>,
    /// The whole request body, at most [`MAX_REQUEST_BODY`] bytes.
    pub body: Bytes,
    /// Who sent the request.
    pub peer: Peer,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A process on the control socket, by the credentials the kernel reports for it.
    Unix {
        /// The peer's user ID (0 for every request that reaches a handler).
        uid: u32,
        /// The peer's process ID, when the kernel knows it.
        pid: Option<u32>,
    },
    /// A client of a TCP listener (metrics); the handler decides what it may see.
    Tcp(SocketAddr),
}

/// What a handler answers with.
#[derive(Debug)]
pub enum Reply {
    /// A JSON document, sent as `application/json` with a trailing newline.
    Json {
        /// The status code.
        status: StatusCode,
        /// The document.
        body: serde_json::Value,
    },
    /// A text document, e.g. Prometheus metrics.
    Text {
        /// The status code.
        status: StatusCode,
        /// The `Content-Type`; must be a valid header value.
        content_type: &'static str,
        /// The document.
        body: String,
    },
    /// A 200 with a chunked body of lines, each sent as it arrives (`\n` appended when
    /// missing); it ends when the sender is dropped, the client goes away or the server shuts
    /// down, and the handler learns the last two from a failing `send`.
    Stream {
        /// The `Content-Type`; must be a valid header value.
        content_type: &'static str,
        /// The lines to send.
        lines: mpsc::Receiver<Bytes>,
    },
}

impl Reply {
    /// A 200 with `value` as JSON (a 500 naming the error if it does not serialize).
    pub fn json(value: impl Serialize) -> Self {
        Self::json_with(StatusCode::OK, value)
    }

    /// `value` as JSON with `status` (a 500 naming the error if it does not serialize).
    pub fn json_with(status: StatusCode, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(body) => Self::Json { status, body },
            Err(error) => {
                error!(%error, "failed to serialize a control API reply");
                Self::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format_args!("failed to serialize the reply: {error}"),
                )
            }
        }
    }

    /// An error reply: `{"error": message}` with `status`.
    pub fn error(status: StatusCode, message: impl Display) -> Self {
        Self::json_with(
            status,
            v1::ErrorBody {
                error: message.to_string(),
            },
        )
    }

    /// The HTTP response; a stream's body also ends when `shutdown` becomes true.
    pub(crate) fn into_response(
        self,
        shutdown: &watch::Receiver<bool>,
    ) -> http::Response<ReplyBody> {
        let (status, content_type, body) = match self {
            Self::Json { status, body } => {
                let mut bytes = serde_json::to_vec(&body).expect("a JSON value always serializes");
                bytes.push(b'\n');
                (status, "application/json", Either::Left(Full::from(bytes)))
            }
            Self::Text {
                status,
                content_type,
                body,
            } => (status, content_type, Either::Left(Full::from(body))),
            Self::Stream {
                content_type,
                lines,
            } => {
                let mut shutdown = shutdown.clone();
                let ended = Box::pin(async move { stopped(&mut shutdown).await });
                (
                    StatusCode::OK,
                    content_type,
                    Either::Right(LineStream::new(lines, ended)),
                )
            }
        };
        let mut response = http::Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}

/// Answers requests; the control API's routes live in the implementation.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. A panic here becomes a 500 and an error in the log.
    fn handle(&self, request: Request) -> impl Future<Output = Reply> + Send;
}

/// Serves the control API on `listener` (see [`bind_control_socket`](super::bind_control_socket))
/// until `shutdown` becomes true or its sender is dropped. Only root peers reach `handler`;
/// every request from another user is answered with 403, and the connection is logged.
pub async fn serve_unix<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    accept_until_shutdown(
        || listener.accept(),
        |(stream, _), connections| admit_unix(stream, &handler, connections),
        shutdown,
    )
    .await;
}

/// Serves `handler` on a TCP `listener` (metrics) until `shutdown` becomes true or its sender
/// is dropped; there is no credential check, requests carry [`Peer::Tcp`].
pub async fn serve_tcp<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    accept_until_shutdown(
        || listener.accept(),
        |(stream, address), connections| {
            connections.spawn(stream, Peer::Tcp(address), Arc::clone(&handler));
        },
        shutdown,
    )
    .await;
}

/// Accepts connections and hands them to `admit` until shutdown, then lets the open ones
/// finish (streams end at shutdown) for up to [`DRAIN_TIMEOUT`] and closes the rest.
async fn accept_until_shutdown<S, A>(
    mut accept: impl FnMut() -> A,
    mut admit: impl FnMut(S, &mut Connections),
    mut shutdown: watch::Receiver<bool>,
) where
    A: Future<Output = io::Result<S>>,
{
    let mut connections = Connections {
        tasks: JoinSet::new(),
        shutdown: shutdown.clone(),
    };
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = accept() => match accepted {
                Ok(accepted) => admit(accepted, &mut connections),
                Err(error) => {
                    warn!(%error, "failed to accept a control connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(finished) = connections.tasks.join_next() => reap(finished),
        }
    }
    connections.drain().await;
}

/// Serves a root peer with `handler` and any other with [`RootOnly`].
fn admit_unix<H: Handler>(stream: UnixStream, handler: &Arc<H>, connections: &mut Connections) {
    let credentials = match stream.peer_cred() {
        Ok(credentials) => credentials,
        Err(error) => {
            warn!(%error, "dropped a control connection whose peer credentials are unreadable");
            return;
        }
    };
    let uid = credentials.uid();
    let pid = credentials.pid().and_then(|pid| u32::try_from(pid).ok());
    let peer = Peer::Unix { uid, pid };
    if uid == 0 {
        connections.spawn(stream, peer, Arc::clone(handler));
    } else {
        warn!(uid, pid, "refusing control requests from a non-root peer");
        connections.spawn(stream, peer, Arc::new(RootOnly { uid }));
    }
}

/// The open connections of one listener.
struct Connections {
    /// One task per connection.
    tasks: JoinSet<()>,
    /// Tells every connection to finish.
    shutdown: watch::Receiver<bool>,
}

impl Connections {
    fn spawn<I, H>(&mut self, io: I, peer: Peer, handler: Arc<H>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Handler,
    {
        self.tasks
            .spawn(serve_connection(io, peer, handler, self.shutdown.clone()));
    }

    async fn drain(mut self) {
        let finished = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(finished) = self.tasks.join_next().await {
                reap(finished);
            }
        })
        .await;
        if finished.is_err() {
            warn!(
                open = self.tasks.len(),
                "closing control connections still open {DRAIN_TIMEOUT:?} after shutdown"
            );
            self.tasks.shutdown().await;
        }
    }
}

fn reap(finished: Result<(), JoinError>) {
    if let Err(error) = finished {
        error!(%error, "a control connection task failed");
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it or shutdown, when the request
/// in flight (if any) is finished first.
async fn serve_connection<I, H>(
    io: I,
    peer: Peer,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let service = {
        let shutdown = shutdown.clone();
        service_fn(move |request| {
            let handler = Arc::clone(&handler);
            let shutdown = shutdown.clone();
            async move {
                let reply = respond(handler, peer, request).await;
                Ok::<_, Infallible>(reply.into_response(&shutdown))
            }
        })
    };
    let mut connection = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service)
    );
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        debug!(%error, ?peer, "control connection ended with an error");
    }
}

/// Reads `request` and runs the handler on it in a task of its own, so a panic becomes a 500.
async fn respond<H: Handler>(
    handler: Arc<H>,
    peer: Peer,
    request: http::Request<Incoming>,
) -> Reply {
    let request = match read_request(request, peer).await {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    let (method, path) = (request.method.clone(), request.path.clone());
    match tokio::spawn(async move { handler.handle(request).await }).await {
        Ok(reply) => reply,
        Err(error) => {
            error!(%error, %method, path, ?peer, "a control API handler failed");
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the handler failed; the daemon log says why",
            )
        }
    }
}

/// Decodes the query and reads the body, or says why not (400, 413).
async fn read_request(request: http::Request<Incoming>, peer: Peer) -> Result<Request, Reply> {
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format_args!("the request body exceeds {} MiB", MAX_REQUEST_BODY >> 20),
        )
    };
    let (parts, body) = request.into_parts();
    let query = parse_query(parts.uri.query().unwrap_or_default())
        .map_err(|error| Reply::error(StatusCode::BAD_REQUEST, error))?;
    // Refuse a declared oversize body before reading any of it: the client then gets the 413
    // (and no `100 Continue`) instead of a connection closed in the middle of its upload.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_REQUEST_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<LengthLimitError>() {
                too_large()
            } else {
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    format_args!("failed to read the request body: {error}"),
                )
            }
        })?
        .to_bytes();
    Ok(Request {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        body,
        peer,
    })
}

/// The handler for connections from non-root peers: 403 to everything.
struct RootOnly {
    /// The peer's user ID.
    uid: u32,
}

impl Handler for RootOnly {
    async fn handle(&self, _request: Request) -> Reply {
        Reply::error(
            StatusCode::FORBIDDEN,
            format_args!("the control socket is root-only (peer uid {})", self.uid),
        )
    }
}

/// Completes once `shutdown` is true, or its sender is gone (no one is left to keep us up).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which counts as shutdown.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    async fn render(reply: Reply) -> (StatusCode, String, String) {
        let (_stop, shutdown) = watch::channel(false);
        let response = reply.into_response(&shutdown);
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn json_reply_is_a_200_json_document_with_a_newline() {
        let reply = Reply::json(serde_json::json!({ "workloads": 3 }));
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "application/json".to_owned(),
                "{\"workloads\":3}\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn json_reply_serializes_any_serialize() {
        #[derive(Serialize)]
        struct Status {
            ready: bool,
        }
        let (_, _, body) = render(Reply::json(Status { ready: true })).await;
        assert_eq!(body, "{\"ready\":true}\n");
    }

    #[tokio::test]
    async fn unserializable_json_is_a_500_saying_why() {
        let map = std::collections::BTreeMap::from([((1, 2), "tuple keys")]);
        let (status, _, body) = render(Reply::json(map)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            body.starts_with("{\"error\":\"failed to serialize the reply: "),
            "{body}"
        );
    }

    #[tokio::test]
    async fn error_reply_carries_the_message() {
        let reply = Reply::error(StatusCode::NOT_FOUND, "no workload \"web\"");
        assert_eq!(
            render(reply).await,
            (
                StatusCode::NOT_FOUND,
                "application/json".to_owned(),
                "{\"error\":\"no workload \\\"web\\\"\"}\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn text_reply_keeps_its_content_type() {
        let reply = Reply::Text {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4",
            body: "enforcer_up 1\n".to_owned(),
        };
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "text/plain; version=0.0.4".to_owned(),
                "enforcer_up 1\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn whole_bodies_have_a_length_and_streams_do_not() {
        let (_stop, shutdown) = watch::channel(false);
        let whole = Reply::error(StatusCode::BAD_REQUEST, "x").into_response(&shutdown);
        assert_eq!(whole.body().size_hint().exact(), Some(14));
        let (_sender, lines) = mpsc::channel(1);
        let stream = Reply::Stream {
            content_type: "application/x-ndjson",
            lines,
        }
        .into_response(&shutdown);
        assert_eq!(stream.status(), StatusCode::OK);
        assert_eq!(stream.body().size_hint().exact(), None);
    }

    #[tokio::test]
    async fn stream_reply_sends_the_lines_until_the_sender_is_dropped() {
        let (sender, lines) = mpsc::channel(4);
        for line in ["{\"n\":1}", "{\"n\":2}\n"] {
            sender
                .send(Bytes::from_static(line.as_bytes()))
                .await
                .unwrap();
        }
        drop(sender);
        let reply = Reply::Stream {
            content_type: "application/x-ndjson",
            lines,
        };
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "application/x-ndjson".to_owned(),
                "{\"n\":1}\n{\"n\":2}\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn stream_reply_ends_at_shutdown() {
        let (stop, shutdown) = watch::channel(false);
        let (sender, lines) = mpsc::channel(4);
        sender.send(Bytes::from_static(b"first")).await.unwrap();
        let response = Reply::Stream {
            content_type: "application/x-ndjson",
            lines,
        }
        .into_response(&shutdown);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, Bytes::from_static(b"first\n"));
        stop.send_replace(true);
        assert!(body.frame().await.is_none(), "shutdown ends the stream");
        assert!(sender.is_closed());
    }
}

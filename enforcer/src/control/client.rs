//! The CLI's side of the control socket: one HTTP/1.1 request per connection, errors worded
//! for an operator (no daemon, not root, stale socket, the daemon's own error text).
#![forbid(unsafe_code)]

use std::{io, path::PathBuf, time::Duration};

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{net::UnixStream, task::JoinHandle};

use super::{MAX_REQUEST_BODY, v1};

/// How long a non-streaming request may take, from connecting to the last byte of the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line a stream may send.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing exists at the socket path.
    #[error("no daemon is listening on {} (is `enforcer run` running?)", .socket.display())]
    NotRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// The caller may not open the socket.
    #[error("{}: permission denied (the control socket is root-only)", .socket.display())]
    PermissionDenied {
        /// The socket path.
        socket: PathBuf,
    },
    /// The socket exists but nobody accepts on it.
    #[error("nothing is listening on {} (stale socket?)", .socket.display())]
    Refused {
        /// The socket path.
        socket: PathBuf,
    },
    /// Connecting failed for another reason.
    #[error("failed to connect to {}", .socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The path and query is not a valid request target.
    #[error("invalid request path {path_and_query:?}")]
    BadPath {
        /// What the caller passed.
        path_and_query: String,
        /// Why it is invalid.
        #[source]
        source: http::Error,
    },
    /// The HTTP exchange failed, e.g. the daemon closed the connection mid-reply.
    #[error("the connection to the daemon on {} failed", .socket.display())]
    Http {
        /// The socket path.
        socket: PathBuf,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// The daemon did not answer in time.
    #[error("the daemon on {} did not answer within {timeout:?}", .socket.display())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The time allowed.
        timeout: Duration,
    },
    /// The daemon answered with a non-2xx status.
    #[error("the daemon answered {status}: {message}")]
    Status {
        /// The status code.
        status: StatusCode,
        /// The daemon's error text.
        message: String,
    },
    /// The reply is not the JSON the caller expected.
    #[error("the daemon's reply is not the expected JSON")]
    Json {
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The request body is larger than the daemon accepts.
    #[error(
        "the request body is {size} bytes; the daemon accepts at most {} MiB",
        MAX_REQUEST_BODY >> 20
    )]
    BodyTooLarge {
        /// The body's size in bytes.
        size: usize,
    },
    /// A streamed line is not UTF-8.
    #[error("the daemon streamed a line that is not UTF-8")]
    NotUtf8 {
        /// The decoding error.
        #[source]
        source: std::string::FromUtf8Error,
    },
    /// A streamed line is longer than the client accepts.
    #[error("the daemon streamed a line longer than {} MiB", MAX_LINE >> 20)]
    LineTooLong,
}

/// A client of the control socket; every request opens a connection of its own.
#[derive(Debug, Clone)]
pub struct ControlClient {
    /// The control socket's path.
    socket: PathBuf,
}

/// A successful (2xx) reply, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::Json { source })
    }

    /// The `error` text of a `{"error": ...}` body, or else the body itself (or, if that is
    /// empty, the status's reason).
    #[must_use]
    fn error_message(&self) -> String {
        if let Ok(v1::ErrorBody { error }) = serde_json::from_slice(&self.body) {
            return error;
        }
        let text = String::from_utf8_lossy(&self.body).trim().to_owned();
        if text.is_empty() {
            self.status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        } else {
            text
        }
    }

    /// The error for a non-2xx reply: its status and the daemon's text.
    fn into_error(self) -> ClientError {
        ClientError::Status {
            status: self.status,
            message: self.error_message(),
        }
    }
}

/// A streamed reply, line by line.
#[derive(Debug)]
pub struct Lines {
    /// The body still to read.
    body: Incoming,
    /// Bytes received that do not yet end in a newline.
    pending: Vec<u8>,
    /// Whether the body has ended.
    ended: bool,
    /// The control socket's path, for errors.
    socket: PathBuf,
    /// The task driving the connection, stopped when the stream is dropped.
    _connection: Connection,
}

impl Lines {
    /// The next line without its `\n`, or `None` once the daemon has ended the stream.
    pub async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return utf8(line).map(Some);
            }
            if self.ended {
                return if self.pending.is_empty() {
                    Ok(None)
                } else {
                    utf8(std::mem::take(&mut self.pending)).map(Some)
                };
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        socket: self.socket.clone(),
                        source,
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        // `pending` holds no newline here, so the unfinished line after this
                        // frame is its tail, or all of `pending` and it.
                        let unfinished = match data.iter().rposition(|&byte| byte == b'\n') {
                            Some(last) => data.len() - last - 1,
                            None => self.pending.len() + data.len(),
                        };
                        if unfinished > MAX_LINE {
                            return Err(ClientError::LineTooLong);
                        }
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn utf8(line: Vec<u8>) -> Result<String, ClientError> {
    String::from_utf8(line).map_err(|source| ClientError::NotUtf8 { source })
}

impl ControlClient {
    /// A client of the control socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// `GET path_and_query`; a non-2xx reply is an error carrying the daemon's text.
    pub async fn get(&self, path_and_query: &str) -> Result<Response, ClientError> {
        self.call(Method::GET, path_and_query, Bytes::new()).await
    }

    /// `POST path_and_query` with `body` (JSON or raw; the server does not look at the
    /// content type); a non-2xx reply is an error carrying the daemon's text.
    pub async fn post(&self, path_and_query: &str, body: Bytes) -> Result<Response, ClientError> {
        self.call(Method::POST, path_and_query, body).await
    }

    /// `GET path_and_query` for a streamed reply, read line by line; there is no time limit
    /// once the daemon has answered with a 2xx status.
    pub async fn stream(&self, path_and_query: &str) -> Result<Lines, ClientError> {
        let (response, connection) = self
            .within_timeout(self.send(Method::GET, path_and_query, Bytes::new()))
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = self.within_timeout(self.read(response.into_body())).await?;
            return Err(Response { status, body }.into_error());
        }
        Ok(Lines {
            body: response.into_body(),
            pending: Vec::new(),
            ended: false,
            socket: self.socket.clone(),
            _connection: connection,
        })
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Response, ClientError> {
        self.within_timeout(async {
            let (response, _connection) = self.send(method, path_and_query, body).await?;
            let status = response.status();
            let body = self.read(response.into_body()).await?;
            let response = Response { status, body };
            if status.is_success() {
                Ok(response)
            } else {
                Err(response.into_error())
            }
        })
        .await
    }

    async fn within_timeout<T>(
        &self,
        exchange: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                socket: self.socket.clone(),
                timeout: REQUEST_TIMEOUT,
            })?
    }

    /// Connects, sends the request and waits for the reply's head.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(http::Response<Incoming>, Connection), ClientError> {
        // The server answers 413 as soon as it sees the length and closes the connection
        // mid-upload, which hyper reports as a broken pipe; refusing here says what is wrong.
        if body.len() > MAX_REQUEST_BODY {
            return Err(ClientError::BodyTooLarge { size: body.len() });
        }
        let request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, "localhost")
            .body(Full::new(body))
            .map_err(|source| ClientError::BadPath {
                path_and_query: path_and_query.to_owned(),
                source,
            })?;
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|error| self.connect_error(error))?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http_error(source))?;
        let connection = Connection(tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "control connection ended with an error");
            }
        }));
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| self.http_error(source))?;
        Ok((response, connection))
    }

    async fn read(&self, body: Incoming) -> Result<Bytes, ClientError> {
        Ok(body
            .collect()
            .await
            .map_err(|source| self.http_error(source))?
            .to_bytes())
    }

    fn connect_error(&self, source: io::Error) -> ClientError {
        let socket = self.socket.clone();
        match source.kind() {
            io::ErrorKind::NotFound => ClientError::NotRunning { socket },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { socket },
            io::ErrorKind::ConnectionRefused => ClientError::Refused { socket },
            _ => ClientError::Connect { socket, source },
        }
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            socket: self.socket.clone(),
            source,
        }
    }
}

/// The task driving one connection; dropping it closes the connection.
#[derive(Debug)]
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: StatusCode, body: &'static str) -> Response {
        Response {
            status,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn error_message_prefers_the_error_field() {
        let reply = response(
            StatusCode::NOT_FOUND,
            "{\"error\":\"no workload \\\"web\\\"\"}\n",
        );
        assert_eq!(reply.error_message(), "no workload \"web\"");
    }

    #[test]
    fn error_message_falls_back_to_the_body_then_the_reason() {
        assert_eq!(
            response(StatusCode::BAD_GATEWAY, "upstream down\n").error_message(),
            "upstream down"
        );
        assert_eq!(
            response(StatusCode::BAD_GATEWAY, "{\"other\":1}").error_message(),
            "{\"other\":1}"
        );
        assert_eq!(
            response(StatusCode::BAD_GATEWAY, "").error_message(),
            "Bad Gateway"
        );
    }

    #[test]
    fn status_error_carries_the_status_and_the_text() {
        let error =
            response(StatusCode::CONFLICT, "{\"error\":\"reload in progress\"}").into_error();
        assert_eq!(
            error.to_string(),
            "the daemon answered 409 Conflict: reload in progress"
        );
    }

    #[test]
    fn json_errors_say_the_reply_is_not_json() {
        let error = response(StatusCode::OK, "not json")
            .json::<serde_json::Value>()
            .expect_err("not JSON");
        assert_eq!(
            error.to_string(),
            "the daemon's reply is not the expected JSON"
        );
        let value: serde_json::Value = response(StatusCode::OK, "{\"a\":1}").json().unwrap();
        assert_eq!(value, serde_json::json!({ "a": 1 }));
    }

    #[test]
    fn connect_errors_are_worded_for_an_operator() {
        let client = ControlClient::new("/run/enforcer/control.sock");
        let message = |kind: io::ErrorKind| client.connect_error(kind.into()).to_string();
        assert_eq!(
            message(io::ErrorKind::NotFound),
            "no daemon is listening on /run/enforcer/control.sock (is `enforcer run` running?)"
        );
        assert_eq!(
            message(io::ErrorKind::PermissionDenied),
            "/run/enforcer/control.sock: permission denied (the control socket is root-only)"
        );
        assert_eq!(
            message(io::ErrorKind::ConnectionRefused),
            "nothing is listening on /run/enforcer/control.sock (stale socket?)"
        );
    }
}

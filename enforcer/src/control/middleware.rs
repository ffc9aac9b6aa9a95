//! The layers every control route runs behind, outermost first:
//!
//! 1. `root_only`: a Unix peer other than root gets a JSON 403, logged; its request goes no
//!    further (not even its body is read).
//! 2. `checked_query`: a query string that does not decode (a bad `%` escape, bytes that are
//!    not UTF-8) is a JSON 400 naming the component, on every route, whether or not the route
//!    reads a query.
//! 3. `read_body`: a declared `Content-Length` over [`MAX_REQUEST_BODY`] is a 413 before any
//!    of the body is read; otherwise the body is read whole, and one that turns out longer is a
//!    413 too. axum's `DefaultBodyLimit` (2 MB unless set) answers in plain text, so it is set
//!    to the same limit and never fires on the whole body handed on.
//! 4. `end_streams_at_shutdown`: a streamed reply ([`Streamed`]) ends when the server shuts
//!    down; a whole reply in flight is let finish.
//! 5. `contain_panics`: the route runs in a task of its own, so a panic is a 500 and an error
//!    in the log, and the server carries on.
#![forbid(unsafe_code)]

use axum::{
    Router,
    body::Body,
    extract::{DefaultBodyLimit, Request, State},
    middleware::{Next, from_fn, from_fn_with_state},
    response::{IntoResponse, Response},
};
use http::{StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::watch;
use tracing::{error, warn};

use super::{
    Caller, MAX_REQUEST_BODY, Reply, body::UntilShutdown, query::check, reply::Streamed,
    server::stopped,
};

/// `routes` behind every layer of this module; streams end when `shutdown` becomes true.
pub(crate) fn around(routes: Router, shutdown: watch::Receiver<bool>) -> Router {
    routes
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(from_fn(contain_panics))
        .layer(from_fn_with_state(shutdown, end_streams_at_shutdown))
        .layer(from_fn(read_body))
        .layer(from_fn(checked_query))
        .layer(from_fn(root_only))
}

/// Refuses every request from a Unix peer other than root.
async fn root_only(request: Request, next: Next) -> Response {
    if let Some(&Caller::Unix { uid, pid }) = request.extensions().get::<Caller>()
        && uid != 0
    {
        warn!(uid, pid, "refusing control requests from a non-root peer");
        return Reply::error(
            StatusCode::FORBIDDEN,
            format_args!("the control socket is root-only (peer uid {uid})"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Refuses a request whose query string does not decode.
async fn checked_query(request: Request, next: Next) -> Response {
    if let Err(error) = check(request.uri().query().unwrap_or_default()) {
        return Reply::error(StatusCode::BAD_REQUEST, error).into_response();
    }
    next.run(request).await
}

/// Reads the body whole, up to [`MAX_REQUEST_BODY`], or answers why not (413, 400).
async fn read_body(request: Request, next: Next) -> Response {
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format_args!("the request body exceeds {} MiB", MAX_REQUEST_BODY >> 20),
        )
        .into_response()
    };
    // Refuse a declared oversize body before reading any of it: the client then gets the 413
    // (and no `100 Continue`) instead of a connection closed in the middle of its upload.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_REQUEST_BODY as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => return too_large(),
        Err(error) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format_args!("failed to read the request body: {error}"),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// Ends a streamed reply's body when `shutdown` becomes true.
async fn end_streams_at_shutdown(
    State(shutdown): State<watch::Receiver<bool>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if response.extensions().get::<Streamed>().is_none() {
        return response;
    }
    response.map(|body| {
        let mut shutdown = shutdown;
        let ended = Box::pin(async move { stopped(&mut shutdown).await });
        Body::new(UntilShutdown::new(body, ended))
    })
}

/// Runs the rest in a task of its own, so a panic becomes a 500.
async fn contain_panics(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let peer = request.extensions().get::<Caller>().copied();
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(error) => {
            error!(%error, %method, path, ?peer, "a control API handler failed");
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the handler failed; the daemon log says why",
            )
            .into_response()
        }
    }
}

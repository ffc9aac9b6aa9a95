//! Serving HTTP/1.1 on the control socket and on the metrics listener: our own accept loop,
//! one task per connection, each connection handed to the axum [`Router`] of a [`Routes`]
//! (behind the layers of `middleware`) as its hyper service, with the connection's [`Caller`]
//! as a request extension.
//!
//! The loop is ours rather than `axum::serve` because that has no header-read timeout (a
//! client that never finishes its headers would hold a connection forever) and its graceful
//! shutdown waits for every connection without bound; here hyper's `header_read_timeout`
//! applies, and at shutdown open connections get [`DRAIN_TIMEOUT`] before they are closed.
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener, UnixStream},
    sync::watch,
    task::{JoinError, JoinSet},
};
use tracing::{debug, error, warn};

use super::middleware;

/// The largest request body the server reads; a longer one is answered with 413.
pub const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish after shutdown before they are closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Who is on the other end of a connection; every request carries it as an extension
/// (`axum::Extension<Caller>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A process on the control socket, by the credentials the kernel reports for it.
    Unix {
        /// The peer's user ID (0 for every request that reaches a route).
        uid: u32,
        /// The peer's process ID, when the kernel knows it.
        pid: Option<u32>,
    },
    /// A client of a TCP listener (metrics); the routes decide what it may see.
    Tcp(SocketAddr),
}

/// What a server serves: an API's routes, with the API as their state.
pub trait Routes: Send + Sync + 'static {
    /// The routes. A panic in one becomes a 500 and an error in the log.
    fn routes(self: Arc<Self>) -> Router;
}

/// Serves the control API on `listener` (see [`bind_control_socket`](super::bind_control_socket))
/// until `shutdown` becomes true or its sender is dropped. Only root peers reach the routes;
/// every request from another user is answered with 403, and logged.
pub async fn serve_unix<R: Routes>(
    listener: UnixListener,
    api: Arc<R>,
    shutdown: watch::Receiver<bool>,
) {
    let app = middleware::around(api.routes(), shutdown.clone());
    accept_until_shutdown(
        || listener.accept(),
        |(stream, _), connections| admit_unix(stream, &app, connections),
        shutdown,
    )
    .await;
}

/// Serves `api` on a TCP `listener` (metrics) until `shutdown` becomes true or its sender is
/// dropped; there is no credential check, requests carry [`Caller::Tcp`].
pub async fn serve_tcp<R: Routes>(
    listener: TcpListener,
    api: Arc<R>,
    shutdown: watch::Receiver<bool>,
) {
    let app = middleware::around(api.routes(), shutdown.clone());
    accept_until_shutdown(
        || listener.accept(),
        |(stream, address), connections| connections.spawn(stream, Caller::Tcp(address), &app),
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

/// Serves a peer whose credentials the kernel reports (the routes' `root_only` layer refuses
/// all but root).
fn admit_unix(stream: UnixStream, app: &Router, connections: &mut Connections) {
    let credentials = match stream.peer_cred() {
        Ok(credentials) => credentials,
        Err(error) => {
            warn!(%error, "dropped a control connection whose peer credentials are unreadable");
            return;
        }
    };
    let uid = credentials.uid();
    let pid = credentials.pid().and_then(|pid| u32::try_from(pid).ok());
    connections.spawn(stream, Caller::Unix { uid, pid }, app);
}

/// The open connections of one listener.
struct Connections {
    /// One task per connection.
    tasks: JoinSet<()>,
    /// Tells every connection to finish.
    shutdown: watch::Receiver<bool>,
}

impl Connections {
    fn spawn<I>(&mut self, io: I, peer: Caller, app: &Router)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = app.clone().layer(Extension(peer));
        self.tasks
            .spawn(serve_connection(io, peer, app, self.shutdown.clone()));
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
async fn serve_connection<I>(io: I, peer: Caller, app: Router, mut shutdown: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
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

/// Completes once `shutdown` is true, or its sender is gone (no one is left to keep us up).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which counts as shutdown.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

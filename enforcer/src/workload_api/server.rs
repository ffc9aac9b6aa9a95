//! The Workload API's Unix socket: bound world-connectable (attestation is the gate, not file
//! modes), each accepted connection's caller pinned before the gRPC server sees a byte of it,
//! and connections over a caller's share or the total closed at once.
#![forbid(unsafe_code)]

use std::{
    fs, io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::UnixListener,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    WorkloadApi,
    authority::MAX_HEADER_BYTES,
    caller::{Caller, CallerStream},
    proto::spiffe_workload_api_server::SpiffeWorkloadApiServer,
};
use crate::control::{self, ControlError};

/// The largest request message the service decodes (requests carry an audience or a token).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long a new connection may stay silent before it is closed.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the connection of a caller that holds no identity lasts.
const UNIDENTIFIED_LIFETIME: Duration = Duration::from_secs(5);

/// Why the Workload API's socket could not be bound or served.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    /// The socket could not be bound (a bad path, a live daemon's socket or another file
    /// there, a directory that could not be made).
    #[error(transparent)]
    Bind(#[from] ControlError),
    /// The gRPC server failed.
    #[error("the Workload API server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Binds the socket at `path`, mode 0666, creating its directory (0755) when missing and
/// replacing a stale socket (the way the control socket is bound: never reachable with
/// another mode). Must be called within a tokio runtime. Logs a warning when a directory above
/// it keeps callers other than root out.
pub fn bind(path: &Path) -> Result<UnixListener, WorkloadApiError> {
    let listener = control::bind_socket(path, 0o666, 0o755)?;
    if let Some(closed) = path
        .parent()
        .map(Path::ancestors)
        .into_iter()
        .flatten()
        .find(|dir| fs::metadata(dir).is_ok_and(|meta| meta.mode() & 0o001 == 0))
    {
        tracing::warn!(
            socket = %path.display(),
            directory = %closed.display(),
            "only root can reach the Workload API socket: a directory above it is not searchable by others"
        );
    }
    Ok(listener)
}

/// Serves `api` on `listener` until `stop` turns true (streams then end with `Unavailable`).
pub async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WorkloadApiError> {
    let (accepted, incoming) = mpsc::channel(64);
    let accepting = tokio::spawn(accept(listener, api.clone(), accepted, stop.clone()));
    let per_connection = u32::try_from(api.limits().per_caller()).unwrap_or(u32::MAX);
    let service = SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(per_connection)
        .http2_max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .http2_keepalive_interval(Some(Duration::from_mins(1)))
        .add_service(service)
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
            super::stopping(&mut stop).await;
        })
        .await;
    accepting.abort();
    served.map_err(WorkloadApiError::Serve)
}

/// Accepts connections, pins each one's caller and hands it to the server within the limits.
async fn accept(
    listener: UnixListener,
    api: WorkloadApi,
    accepted: mpsc::Sender<io::Result<CallerStream>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            () = super::stopping(&mut stop) => return,
            result = listener.accept() => match result {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "Workload API accept failed");
                    // Out of descriptors: let some close before trying again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let caller = match Caller::of(stream.as_fd()) {
            Ok(caller) => Arc::new(caller),
            Err(error) => {
                tracing::debug!(%error, "Workload API caller gone before it was pinned");
                continue;
            }
        };
        let Some(slot) = api.limits().connection(caller.pid()) else {
            api.metrics().refused_connection();
            tracing::debug!(
                pid = caller.pid(),
                "Workload API connection refused: over the caller's share or the total"
            );
            continue;
        };
        tokio::spawn(admit(
            api.clone(),
            CallerStream::new(stream, caller, slot),
            accepted.clone(),
        ));
    }
}

/// Hands `stream` to the server once its caller has sent something (within
/// [`FIRST_BYTES_TIMEOUT`], else it is closed). A caller that holds no identity gets its
/// answers (`PermissionDenied`), but its connection is ended after [`UNIDENTIFIED_LIFETIME`]:
/// a process without an identity keeps no slot.
async fn admit(
    api: WorkloadApi,
    mut stream: CallerStream,
    accepted: mpsc::Sender<io::Result<CallerStream>>,
) {
    let spoke = tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.readable()).await;
    if !matches!(spoke, Ok(Ok(()))) {
        tracing::debug!(
            pid = stream.caller().pid(),
            "Workload API connection closed: nothing sent in time"
        );
        return;
    }
    if let Err(status) = api.admit_connection(stream.caller()).await {
        tracing::debug!(pid = stream.caller().pid(), %status, "Workload API caller without an identity: its connection ends soon");
        stream.end_after(UNIDENTIFIED_LIFETIME);
    }
    let _ = accepted.send(Ok(stream)).await;
}

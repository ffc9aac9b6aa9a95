//! A Workload API client on a Unix socket, with the security header on every request: what
//! `enforcer api` and the tests use.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use super::{SECURITY_HEADER, proto::spiffe_workload_api_client::SpiffeWorkloadApiClient};

/// A connected client.
pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a `unix:` address.
    #[error(
        "{0:?}: the Workload API endpoint must be a Unix socket: unix:///path or a path (a TCP endpoint cannot tell who calls)"
    )]
    Endpoint(String),
    /// The socket could not be reached.
    #[error("failed to connect to the Workload API at {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Adds `workload.spiffe.io: true` to every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// The socket path of an endpoint address as `SPIFFE_ENDPOINT_SOCKET` gives it
/// (`unix:///run/x/api.sock`, `unix:/run/x/api.sock`) or a plain absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ClientError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.starts_with('/') && !path.contains('\0') {
        Ok(PathBuf::from(path))
    } else {
        Err(ClientError::Endpoint(endpoint.to_owned()))
    }
}

/// A client of the Workload API at `socket`.
pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
    let path = socket.to_owned();
    let channel = endpoint()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        SecurityHeader,
    ))
}

/// A client on `stream`, an already connected socket (whoever connected it is the caller the
/// daemon sees). The client never reconnects.
pub async fn over(stream: UnixStream) -> Result<Client, ClientError> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel_over(stream).await?,
        SecurityHeader,
    ))
}

/// An HTTP/2 channel on `stream`, an already connected socket, for any gRPC client (one that
/// adds the security header itself, or a test that leaves it out). It never reconnects.
pub async fn channel_over(stream: UnixStream) -> Result<Channel, ClientError> {
    let stream = Arc::new(Mutex::new(Some(stream)));
    endpoint()
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = stream.lock().unwrap_or_else(PoisonError::into_inner).take();
            async move {
                taken.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the connection was used once",
                    )
                })
            }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: PathBuf::from("(a connected socket)"),
            source,
        })
}

/// The HTTP/2 endpoint (the authority is not looked at).
fn endpoint() -> Endpoint {
    Endpoint::from_static("http://localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_socket_paths() {
        for (endpoint, path) in [
            (
                "unix:///run/enforcer/public/api.sock",
                "/run/enforcer/public/api.sock",
            ),
            ("unix:/tmp/api.sock", "/tmp/api.sock"),
            ("/tmp/api.sock", "/tmp/api.sock"),
        ] {
            assert_eq!(socket_path(endpoint).expect(endpoint), Path::new(path));
        }
        for endpoint in ["tcp://127.0.0.1:8081", "unix://relative", "api.sock", ""] {
            assert!(
                matches!(socket_path(endpoint), Err(ClientError::Endpoint(_))),
                "{endpoint}"
            );
        }
    }
}

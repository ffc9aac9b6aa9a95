//! Settings of a tunnel endpoint, with the defaults the daemon uses.
#![forbid(unsafe_code)]

use std::time::Duration;

/// The redirect port: the kernel hands enrolled connections for it to the outbound listener.
pub(crate) const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default timeout of a TCP connect.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of the TLS plus HTTP/2 handshakes.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which a flow is closed.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_hours(1);

/// Settings of both tunnel sides of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Timeout of a TCP connect (to a peer node or a workload).
    pub connect_timeout: Duration,
    /// Timeout of the TLS plus HTTP/2 handshakes, on either side (slow clients are closed).
    pub handshake_timeout: Duration,
    /// TCP keepalive: probes after this much silence on tunnel and workload sockets.
    pub keepalive: Option<Duration>,
    /// A flow with no byte moving either way for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// A flow open this long is closed.
    pub max_lifetime: Option<Duration>,
    /// Streams one pooled connection carries at most.
    pub pool_max_streams: usize,
    /// A pooled connection idle this long is closed.
    pub pool_idle_timeout: Duration,
    /// A pooled connection this old takes no new streams (SVIDs rotate underneath it).
    pub pool_max_age: Duration,
    /// HTTP/2: initial per-stream receive window.
    pub stream_window: u32,
    /// HTTP/2: initial per-connection receive window.
    pub connection_window: u32,
    /// HTTP/2: largest DATA frame accepted.
    pub max_frame_size: u32,
    /// HTTP/2: concurrent streams an inbound connection accepts.
    pub max_concurrent_streams: u32,
    /// HTTP/2: largest header list a CONNECT may carry (larger ones get 431; the HTTP/2 layer
    /// resets streams whose list exceeds four times this before decoding them fully).
    pub max_header_list_size: u32,
    /// An inbound connection with no open stream for this long is closed.
    pub inbound_idle_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive: Some(Duration::from_mins(1)),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_lifetime: None,
            pool_max_streams: 100,
            pool_idle_timeout: Duration::from_mins(1),
            pool_max_age: Duration::from_mins(30),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_concurrent_streams: 1000,
            max_header_list_size: 16 * 1024,
            inbound_idle_timeout: Duration::from_mins(5),
        }
    }
}

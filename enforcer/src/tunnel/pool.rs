//! The client side of the tunnel: TLS 1.3 mTLS connections to peer nodes carrying HTTP/2
//! CONNECT streams, pooled.
//!
//! A connection is keyed by (source identity, peer node, destination): the server's
//! certificate is chosen by the destination named in the TLS server name (see [`super::hbone`]),
//! so one connection proves one destination workload's identity and carries only streams to
//! that destination. Each carries at most `pool_max_streams` streams; one idle for
//! `pool_idle_timeout` is closed, and one older than `pool_max_age` takes no new streams (and is
//! closed once idle). Ages and idle times come from a [`MonotonicClock`], so tests drive them
//! without sleeping.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{
    RecvStream, SendStream,
    client::{ResponseFuture, SendRequest},
};
use http::StatusCode;
use tokio_rustls::TlsConnector;

use super::{
    config::TunnelConfig,
    hbone::{self, ALPN_H2, Refusal},
    metrics::{Metric, Metrics},
    net::{self, ConnectError, Dial},
    record::Placement,
    state::{Namespace, SocketTagger},
};
use crate::identity::{
    PeerAuthorizer, SpiffeId, SvidVerifyError, TrustBundleSet, X509Svid, client_config,
    peer_spiffe_id,
};

/// Why no stream to the destination could be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The peer node could not be reached.
    #[error("failed to reach peer {peer}")]
    Connect {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// The client TLS configuration could not be built from the source's SVID.
    #[error("failed to build a TLS client for `{id}`")]
    Config {
        /// The source identity.
        id: SpiffeId,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The TLS handshake failed (e.g. the server's SVID did not verify).
    #[error("TLS handshake with peer {peer} failed")]
    Tls {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A handshake did not finish in time.
    #[error("handshake with peer {peer} timed out")]
    HandshakeTimeout {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer did not agree on HTTP/2.
    #[error("peer {peer} did not negotiate ALPN `h2`")]
    Alpn {
        /// The peer.
        peer: SocketAddr,
    },
    /// The server's SPIFFE ID could not be read from its certificate.
    #[error("peer {peer} presented no usable SPIFFE ID")]
    ServerId {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: SvidVerifyError,
    },
    /// HTTP/2 failed on the connection or the stream.
    #[error("HTTP/2 with peer {peer} failed")]
    Http2 {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: h2::Error,
    },
    /// The peer refused the CONNECT.
    #[error("peer {peer} refused CONNECT {dst}: {} ({})", refusal.as_str(), refusal.status())]
    Refused {
        /// The peer.
        peer: SocketAddr,
        /// The destination.
        dst: SocketAddr,
        /// Why, from the response status.
        refusal: Refusal,
    },
    /// The peer answered with a status this protocol does not use.
    #[error("peer {peer} answered CONNECT {dst} with unexpected status {status}")]
    Status {
        /// The peer.
        peer: SocketAddr,
        /// The destination.
        dst: SocketAddr,
        /// The status.
        status: StatusCode,
    },
}

/// An open CONNECT stream to a destination.
pub struct TunnelStream {
    /// Sends towards the destination.
    pub send: SendStream<Bytes>,
    /// Receives from the destination.
    pub recv: RecvStream,
    /// The SPIFFE ID the server proved (the destination workload's).
    pub server_id: SpiffeId,
    /// Whether the stream rode an existing connection.
    pub reused: bool,
    /// Where the destination workload runs, as the server's node reported it.
    pub placement: Placement,
    _lease: Lease,
}

/// A stream slot on a pooled connection whose server identity is proven, before any request.
/// Dropping it returns the slot.
pub struct Leased {
    conn: Arc<Conn>,
    lease: Lease,
    peer: SocketAddr,
    reused: bool,
    status_timeout: Duration,
}

impl Leased {
    /// The SPIFFE ID the server proved in the TLS handshake (the destination workload's).
    #[must_use]
    pub fn server_id(&self) -> &SpiffeId {
        &self.conn.server_id
    }

    /// Send the CONNECT request for `dst`, from a client running at `placement`, without
    /// waiting for its status: the returned stream can carry data at once, which the peer
    /// delivers only if it accepts the request.
    pub async fn connect(
        self,
        dst: SocketAddr,
        placement: &Placement,
    ) -> Result<(SendStream<Bytes>, Requested), PoolError> {
        let peer = self.peer;
        let http2 = |source| PoolError::Http2 { peer, source };
        let mut send = self.conn.send.clone().ready().await.map_err(http2)?;
        let (response, stream) = send
            .send_request(hbone::connect_request(dst, placement), false)
            .map_err(http2)?;
        Ok((
            stream,
            Requested {
                response,
                dst,
                leased: self,
            },
        ))
    }
}

/// A CONNECT request sent, its status not yet read.
pub struct Requested {
    response: ResponseFuture,
    dst: SocketAddr,
    leased: Leased,
}

impl Requested {
    /// Wait (up to the handshake timeout) for the status: the stream's receiving side on
    /// `200`, the peer's refusal otherwise.
    pub async fn accepted(self) -> Result<Accepted, PoolError> {
        let Self {
            response,
            dst,
            leased,
        } = self;
        let peer = leased.peer;
        let response = tokio::time::timeout(leased.status_timeout, response)
            .await
            .map_err(|_| PoolError::HandshakeTimeout { peer })?
            .map_err(|source| PoolError::Http2 { peer, source })?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(match Refusal::from_status(status) {
                Some(refusal) => PoolError::Refused { peer, dst, refusal },
                None => PoolError::Status { peer, dst, status },
            });
        }
        Ok(Accepted {
            placement: hbone::parse_placement(response.headers()),
            recv: response.into_body(),
            leased,
        })
    }
}

/// A CONNECT request the peer accepted: the receiving side of its stream.
pub struct Accepted {
    recv: RecvStream,
    placement: Placement,
    leased: Leased,
}

impl Accepted {
    /// The open stream, with `send`, the sending side [`Leased::connect`] returned.
    #[must_use]
    pub fn stream(self, send: SendStream<Bytes>) -> TunnelStream {
        TunnelStream {
            send,
            recv: self.recv,
            server_id: self.leased.conn.server_id.clone(),
            reused: self.leased.reused,
            placement: self.placement,
            _lease: self.leased.lease,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: SpiffeId,
    peer: SocketAddr,
    dst: SocketAddr,
}

/// A source of monotonic time for the pool.
pub trait MonotonicClock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemMonotonicClock;

impl MonotonicClock for SystemMonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

struct Conn {
    send: SendRequest<Bytes>,
    server_id: SpiffeId,
    born: Instant,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
    /// The pool's clock, read when the last stream's lease is returned.
    clock: Arc<dyn MonotonicClock>,
}

impl Conn {
    fn usable(&self, config: &TunnelConfig, now: Instant) -> bool {
        !self.closed.load(Ordering::Acquire) && now.duration_since(self.born) < config.pool_max_age
    }

    /// Takes a stream slot if one is free.
    fn try_lease(self: &Arc<Self>, max: usize) -> Option<Lease> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Lease(Arc::clone(self)))
    }
}

/// A stream slot on a connection; returning it marks the connection idle when it was the last.
struct Lease(Arc<Conn>);

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .0
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = self.0.clock.now();
        }
    }
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while dialling, so concurrent requests for one key dial once.
    dialing: tokio::sync::Mutex<()>,
}

impl Slot {
    fn lease(&self, config: &TunnelConfig, now: Instant) -> Option<(Arc<Conn>, Lease)> {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns
            .iter()
            .filter(|conn| conn.usable(config, now))
            .find_map(|conn| {
                conn.try_lease(config.pool_max_streams)
                    .map(|lease| (Arc::clone(conn), lease))
            })
    }
}

/// Pooled tunnel connections of one node.
pub struct Pool {
    config: TunnelConfig,
    bundles: Arc<TrustBundleSet>,
    metrics: Arc<Metrics>,
    tags: Arc<dyn SocketTagger>,
    clock: Arc<dyn MonotonicClock>,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
}

impl Pool {
    /// An empty pool verifying servers against `bundles`, its sockets tagged by `tags`, its
    /// connections aged by `clock`.
    #[must_use]
    pub fn new(
        config: TunnelConfig,
        bundles: Arc<TrustBundleSet>,
        metrics: Arc<Metrics>,
        tags: Arc<dyn SocketTagger>,
        clock: Arc<dyn MonotonicClock>,
    ) -> Self {
        Self {
            config,
            bundles,
            metrics,
            tags,
            clock,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Open a CONNECT stream to `dst` through the peer node at `peer`, as the workload whose
    /// SVID is `svid` and which runs at `placement`, reusing a pooled connection when one has
    /// room: [`Pool::lease`], [`Leased::connect`] and [`Requested::accepted`] in turn.
    pub async fn open(
        &self,
        svid: &X509Svid,
        (peer, dst): (SocketAddr, SocketAddr),
        placement: &Placement,
    ) -> Result<TunnelStream, PoolError> {
        let leased = self.lease(svid, (peer, dst)).await?;
        let (send, requested) = leased.connect(dst, placement).await?;
        Ok(requested.accepted().await?.stream(send))
    }

    /// A stream slot on a connection to the peer node at `peer` that proved the identity of
    /// `dst`'s workload, as the workload whose SVID is `svid`: a pooled connection with room,
    /// or a new one dialled now. No request is sent yet, so the caller can check the server's
    /// identity first.
    pub async fn lease(
        &self,
        svid: &X509Svid,
        (peer, dst): (SocketAddr, SocketAddr),
    ) -> Result<Leased, PoolError> {
        let key = Key {
            src: svid.spiffe_id().clone(),
            peer,
            dst,
        };
        let slot = Arc::clone(
            self.slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key)
                .or_default(),
        );
        let (conn, lease, reused) =
            if let Some((conn, lease)) = slot.lease(&self.config, self.clock.now()) {
                (conn, lease, true)
            } else {
                let _dialing = slot.dialing.lock().await;
                if let Some((conn, lease)) = slot.lease(&self.config, self.clock.now()) {
                    (conn, lease, true)
                } else {
                    let conn = Arc::new(self.dial(svid, peer, dst).await?);
                    let lease = conn
                        .try_lease(self.config.pool_max_streams.max(1))
                        .expect("a new connection has room");
                    let mut conns = slot.conns.lock().unwrap_or_else(PoisonError::into_inner);
                    let now = self.clock.now();
                    conns.retain(|c| c.usable(&self.config, now));
                    conns.push(Arc::clone(&conn));
                    (conn, lease, false)
                }
            };
        if reused {
            self.metrics.inc(Metric::PoolReuses);
        }
        Ok(Leased {
            lease,
            conn,
            peer,
            reused,
            status_timeout: self.config.handshake_timeout,
        })
    }
    /// Close connections idle for longer than the idle timeout, and forget empty keys.
    pub fn prune(&self) {
        let now = self.clock.now();
        let idle_timeout = self.config.pool_idle_timeout;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, slot| {
            let mut conns = slot.conns.lock().unwrap_or_else(PoisonError::into_inner);
            conns.retain(|conn| {
                let idle_for = now.duration_since(
                    *conn
                        .idle_since
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                );
                let busy = conn.streams.load(Ordering::Acquire) > 0;
                busy || (conn.usable(&self.config, now) && idle_for < idle_timeout)
            });
            !conns.is_empty()
        });
    }

    /// How many connections the pool holds.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|slot| {
                slot.conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// Dial `peer`: TCP, TLS 1.3 with the source's SVID and the destination as server name,
    /// ALPN `h2`, then the HTTP/2 handshake; the connection is driven by a spawned task.
    async fn dial(
        &self,
        svid: &X509Svid,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Conn, PoolError> {
        self.metrics.inc(Metric::PoolDials);
        let config = &self.config;
        let started = Instant::now();
        let tcp = net::connect(
            peer,
            Dial::Out(Namespace::HOME),
            self.tags.as_ref(),
            config.connect_timeout,
            config.keepalive,
        )
        .await
        .map_err(|source| PoolError::Connect { peer, source })?;
        let mut tls_config = client_config(svid, Arc::clone(&self.bundles), PeerAuthorizer::Any)
            .map_err(|source| PoolError::Config {
                id: svid.spiffe_id().clone(),
                source,
            })?;
        tls_config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let connector = TlsConnector::from(Arc::new(tls_config));
        let handshakes = async {
            let tls = connector
                .connect(hbone::server_name(dst), tcp)
                .await
                .map_err(|source| PoolError::Tls { peer, source })?;
            let (_, session) = tls.get_ref();
            if session.alpn_protocol() != Some(ALPN_H2) {
                return Err(PoolError::Alpn { peer });
            }
            let server_id =
                peer_spiffe_id(session).map_err(|source| PoolError::ServerId { peer, source })?;
            let (send, connection) = h2::client::Builder::new()
                .initial_window_size(config.stream_window)
                .initial_connection_window_size(config.connection_window)
                .max_frame_size(config.max_frame_size)
                .max_header_list_size(config.max_header_list_size)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| PoolError::Http2 { peer, source })?;
            Ok((send, connection, server_id))
        };
        let (send, connection, server_id) =
            tokio::time::timeout(config.handshake_timeout, handshakes)
                .await
                .map_err(|_| PoolError::HandshakeTimeout { peer })??;
        self.metrics.handshake.observe(started.elapsed());
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = Arc::clone(&closed);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "tunnel connection ended");
            }
            driver_closed.store(true, Ordering::Release);
        });
        let now = self.clock.now();
        Ok(Conn {
            send,
            server_id,
            born: now,
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
            closed,
            clock: Arc::clone(&self.clock),
        })
    }
}

/// How long a pool's pruning task sleeps between rounds.
#[must_use]
pub(super) fn prune_interval(config: &TunnelConfig) -> Duration {
    (config.pool_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Untagged;

    /// A clock that moves only when told to.
    struct TestClock(Mutex<Instant>);

    impl TestClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl MonotonicClock for TestClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    const IDLE: Duration = Duration::from_mins(1);
    const MAX_AGE: Duration = Duration::from_mins(30);
    /// The smallest step the tests take.
    const TICK: Duration = Duration::from_millis(1);

    fn pool() -> (Arc<TestClock>, Pool) {
        let clock = Arc::new(TestClock(Mutex::new(Instant::now())));
        let config = TunnelConfig {
            pool_idle_timeout: IDLE,
            pool_max_age: MAX_AGE,
            ..TunnelConfig::default()
        };
        let pool = Pool::new(
            config,
            Arc::new(TrustBundleSet::new()),
            Arc::new(Metrics::default()),
            Arc::new(Untagged),
            Arc::clone(&clock) as Arc<dyn MonotonicClock>,
        );
        (clock, pool)
    }

    /// A pooled connection to `dst`, born now, over an in-memory HTTP/2 connection.
    async fn pooled(pool: &Pool, dst: &str) -> Arc<Conn> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server).await.unwrap();
            while server.accept().await.is_some() {}
        });
        let (send, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        let now = pool.clock.now();
        let conn = Arc::new(Conn {
            send,
            server_id: "spiffe://example.org/api".parse().unwrap(),
            born: now,
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
            closed: Arc::new(AtomicBool::new(false)),
            clock: Arc::clone(&pool.clock),
        });
        let key = Key {
            src: "spiffe://example.org/web".parse().unwrap(),
            peer: "10.0.0.2:15008".parse().unwrap(),
            dst: dst.parse().unwrap(),
        };
        let mut slots = pool.slots.lock().unwrap();
        let slot = slots.entry(key).or_default();
        slot.conns.lock().unwrap().push(Arc::clone(&conn));
        conn
    }

    /// Whether `conn` is still in the pool.
    fn pooled_still(pool: &Pool, conn: &Arc<Conn>) -> bool {
        pool.slots.lock().unwrap().values().any(|slot| {
            slot.conns
                .lock()
                .unwrap()
                .iter()
                .any(|c| Arc::ptr_eq(c, conn))
        })
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_pruned_and_a_fresh_one_kept() {
        let (clock, pool) = pool();
        let old = pooled(&pool, "10.0.0.2:8080").await;
        clock.advance(IDLE / 2);
        let fresh = pooled(&pool, "10.0.0.2:8081").await;
        clock.advance((IDLE / 2).saturating_sub(TICK));
        pool.prune();
        assert_eq!(pool.connections(), 2, "nothing is idle for the timeout yet");
        clock.advance(TICK);
        pool.prune();
        assert!(!pooled_still(&pool, &old), "the idle connection was kept");
        assert!(
            pooled_still(&pool, &fresh),
            "the fresh connection was pruned"
        );
        assert_eq!(pool.connections(), 1);
    }

    #[tokio::test]
    async fn idle_time_counts_from_the_last_stream_returned() {
        let (clock, pool) = pool();
        let conn = pooled(&pool, "10.0.0.2:8080").await;
        let lease = conn.try_lease(1).expect("a free slot");
        assert!(
            conn.try_lease(1).is_none(),
            "a full connection leased again"
        );
        clock.advance(IDLE * 2);
        pool.prune();
        assert!(pooled_still(&pool, &conn), "a busy connection was pruned");
        drop(lease);
        clock.advance(IDLE.saturating_sub(TICK));
        pool.prune();
        assert!(pooled_still(&pool, &conn), "pruned before its idle timeout");
        clock.advance(TICK);
        pool.prune();
        assert_eq!(pool.connections(), 0);
    }

    #[tokio::test]
    async fn a_connection_past_its_maximum_age_takes_no_stream_and_is_pruned_once_idle() {
        let (clock, pool) = pool();
        let old = pooled(&pool, "10.0.0.2:8080").await;
        let slot = pool
            .slots
            .lock()
            .unwrap()
            .values()
            .next()
            .map(Arc::clone)
            .expect("pooled");
        // Streams keep it from idling, but not from ageing.
        let mut leases = Vec::new();
        for _ in 0..4 {
            clock.advance((MAX_AGE / 4).saturating_sub(TICK));
            let (conn, lease) = slot
                .lease(&pool.config, clock.now())
                .expect("a young connection takes streams");
            assert!(Arc::ptr_eq(&conn, &old));
            leases.push(lease);
        }
        clock.advance(TICK * 4);
        let fresh = pooled(&pool, "10.0.0.2:8081").await;
        assert!(
            slot.lease(&pool.config, clock.now()).is_none(),
            "an over-age connection took a stream"
        );
        pool.prune();
        assert!(
            pooled_still(&pool, &old),
            "a busy over-age connection was cut"
        );
        leases.clear();
        pool.prune();
        assert!(
            !pooled_still(&pool, &old),
            "the over-age connection was kept"
        );
        assert!(
            pooled_still(&pool, &fresh),
            "the fresh connection was pruned"
        );
        assert_eq!(pool.connections(), 1);
    }
}

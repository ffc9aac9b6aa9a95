//! The inbound side: peers' TLS 1.3 mTLS connections carrying HTTP/2 CONNECT streams to local
//! workloads.
//!
//! The TLS server name names the destination (see [`super::hbone`]); the certificate shown is
//! the SVID of the enrolled workload listening there, or the node's own SVID when none is.
//! Each CONNECT must name that same destination, an enrolled workload must own it, and policy
//! must allow (client ID, workload ID, port); only then is the workload dialled, with a hop the
//! kernel admits only to that workload's listener, and the stream spliced to it. Refusals map
//! to distinct statuses (see [`Refusal`]).
//!
//! A destination is first checked against where the client connected from (`ClientAt`):
//! an unspecified address (`0.0.0.0`, `::`) is never a destination, and a loopback one
//! (`127.0.0.0/8`, `::1`, either IPv4-mapped) only for a client that itself connected over
//! loopback, i.e. from this node's own network namespace. A peer on another node naming one
//! gets the node's own certificate and `404`, with no owner looked up and nothing dialled, so
//! a listener bound to loopback stays out of every other node's reach.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt, io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use rustls::{
    ServerConfig,
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::{CertifiedKey, SingleCertAndKey},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use super::{
    FlowVerdict, Node, Party, Placement, Reason, Side,
    copy::{H2Sink, H2Source, tcp_ends},
    hbone::{self, ALPN_H2, Refusal},
    metrics::Metric,
    net::{self, Dial},
    new_record,
    state::{LocalOwner, LocalWorkloads, Namespace, SvidSource, off_worker},
    verdict,
};
use crate::identity::{SpiffeId, X509Svid, peer_spiffe_id};

/// The HTTP/2 layer refuses header lists this many times the configured limit outright (with
/// 431 and a stream reset, uncounted); smaller oversized lists reach the handler, which refuses
/// and counts them.
const HEADER_HARD_LIMIT_FACTOR: u32 = 4;

/// What the inbound side knows of an authenticated client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundClient {
    /// The client's SPIFFE ID, from its verified SVID.
    pub id: SpiffeId,
    /// The client's address.
    pub addr: SocketAddr,
    /// The destination the TLS server name named, if it named one.
    pub destination: Option<SocketAddr>,
    /// Whose certificate was shown: the workload owning `destination`, `None` when the node's
    /// own SVID was shown.
    pub presented: Option<SpiffeId>,
    /// The network namespace of the listener that accepted the connection (destinations are
    /// looked up as seen from there).
    pub netns: Namespace,
}

/// Where an inbound client connected from, which bounds the destinations it may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ClientAt {
    /// Over loopback: from this node's own network namespace (the kernel never accepts a
    /// loopback source from another host, and a spoofed one could not complete a handshake).
    ThisNode,
    /// From any other address: another node.
    Elsewhere,
}

impl ClientAt {
    /// Where a client whose address is `client` connected from.
    pub(super) fn of(client: SocketAddr) -> Self {
        if client.ip().to_canonical().is_loopback() {
            Self::ThisNode
        } else {
            Self::Elsewhere
        }
    }

    /// Whether such a client may name `dst` as its destination: never an unspecified address
    /// (it names no listener, and a connect to it reaches this node's loopback), and a
    /// loopback address only from this node.
    pub(super) fn may_name(self, dst: SocketAddr) -> bool {
        let dst = dst.ip().to_canonical();
        !dst.is_unspecified() && (!dst.is_loopback() || self == Self::ThisNode)
    }
}

/// The SVIDs the inbound side can present, and the signing keys built from them.
pub(super) struct WorkloadCerts {
    node_id: SpiffeId,
    svids: Arc<dyn SvidSource>,
    workloads: Arc<dyn LocalWorkloads>,
    /// Signing keys already built, with the SVID they were built from.
    keys: Mutex<HashMap<SpiffeId, BuiltKey>>,
}

/// A signing key and the SVID it was built from.
type BuiltKey = (Arc<X509Svid>, Arc<CertifiedKey>);

impl WorkloadCerts {
    pub(super) fn new(
        node_id: SpiffeId,
        svids: Arc<dyn SvidSource>,
        workloads: Arc<dyn LocalWorkloads>,
    ) -> Self {
        Self {
            node_id,
            svids,
            workloads,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        let svid = match self.svids.svid(id) {
            Ok(svid) => svid,
            Err(error) => {
                tracing::warn!(%id, error = %crate::report::report(&error), "no SVID to present");
                return None;
            }
        };
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached, key)) = keys.get(id)
            && Arc::ptr_eq(cached, &svid)
        {
            return Some(Arc::clone(key));
        }
        let key = svid.certified_key().ok()?;
        keys.insert(id.clone(), (svid, Arc::clone(&key)));
        Some(key)
    }
}

impl fmt::Debug for WorkloadCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCerts")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl WorkloadCerts {
    /// What a client at `at` whose hello named `destination` is shown: the enrolled workload
    /// listening there, when such a client [may name](ClientAt::may_name) it (`None` for the
    /// node's own SVID), and the signing key of that SVID (`None` when there is none to show,
    /// which fails the handshake). May block: the SVID may be issued now.
    pub(super) fn choose(
        &self,
        at: ClientAt,
        netns: Namespace,
        destination: Option<SocketAddr>,
    ) -> (Option<SpiffeId>, Option<Arc<CertifiedKey>>) {
        let owner = self
            .owner_named(at, netns, destination)
            .map(|owner| owner.id);
        let key = self.certified_key(owner.as_ref().unwrap_or(&self.node_id));
        (owner, key)
    }

    fn owner_named(
        &self,
        at: ClientAt,
        netns: Namespace,
        destination: Option<SocketAddr>,
    ) -> Option<LocalOwner> {
        let dst = destination.filter(|&dst| at.may_name(dst))?;
        self.workloads.owner(netns, dst)
    }
}

/// The certificate resolver of the base inbound TLS configuration, which no handshake uses:
/// each connection reads the client hello first, chooses its certificate off the async worker
/// ([`WorkloadCerts::choose`]) and handshakes with a copy of the base presenting that one.
#[derive(Debug)]
pub(super) struct ChosenPerConnection;

impl ResolvesServerCert for ChosenPerConnection {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// Accept peers' connections, on a listener of namespace `netns`, until the task is aborted.
pub(super) async fn serve(node: Arc<Node>, listener: TcpListener, netns: Namespace) {
    if let Err(error) = net::tune(&listener, node.config.keepalive) {
        tracing::warn!(%error, "failed to tune the inbound listener");
    }
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                // A dual-stack listener (a workload namespace's) sees IPv4 peers v4-mapped.
                let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
                tokio::spawn(handle_connection(Arc::clone(&node), tcp, addr, netns));
            }
            Err(error) => {
                // Out of descriptors or similar: back off rather than spin.
                tracing::warn!(%error, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// TLS handshake (bounded in time), then HTTP/2.
async fn handle_connection(node: Arc<Node>, tcp: TcpStream, addr: SocketAddr, netns: Namespace) {
    node.metrics.inc(Metric::InboundAccepted);
    let at = ClientAt::of(addr);
    let (tls, destination, presented) = match tokio::time::timeout(
        node.config.handshake_timeout,
        handshake(&node, tcp, at, netns),
    )
    .await
    {
        Err(_) => {
            node.metrics.inc(Metric::InboundHandshakeTimeouts);
            tracing::debug!(%addr, "TLS handshake timed out");
            return;
        }
        Ok(Err(error)) => {
            node.metrics.inc(Metric::InboundHandshakeFailures);
            tracing::debug!(%addr, %error, "TLS handshake failed");
            return;
        }
        Ok(Ok(handshaken)) => handshaken,
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        node.metrics.inc(Metric::InboundHandshakeFailures);
        tracing::debug!(%addr, "client did not negotiate h2");
        return;
    }
    let id = match peer_spiffe_id(session) {
        Ok(id) => id,
        Err(error) => {
            node.metrics.inc(Metric::InboundHandshakeFailures);
            tracing::debug!(%addr, %error, "client SVID has no usable ID");
            return;
        }
    };
    let client = InboundClient {
        id,
        addr,
        destination,
        presented,
        netns,
    };
    serve_connection(node, tls, client).await;
}

/// Reads the client hello, chooses the certificate its server name calls for (off the async
/// worker), and completes the handshake presenting it. Returns the stream, the destination the
/// server name named, and whose certificate was shown.
async fn handshake(
    node: &Node,
    tcp: TcpStream,
    at: ClientAt,
    netns: Namespace,
) -> io::Result<(TlsStream<TcpStream>, Option<SocketAddr>, Option<SpiffeId>)> {
    let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
    let destination = hbone::parse_server_name(start.client_hello().server_name()).ok();
    let certs = Arc::clone(&node.certs);
    let (presented, key) = off_worker(move || certs.choose(at, netns, destination))
        .await
        .ok_or_else(|| io::Error::other("the runtime is shutting down"))?;
    let key = key.ok_or_else(|| io::Error::other("no certificate to present"))?;
    let mut config = ServerConfig::clone(&node.tls_server);
    config.cert_resolver = Arc::new(SingleCertAndKey::from(key));
    let tls = start.into_stream(Arc::new(config)).await?;
    Ok((tls, destination, presented))
}

/// Serve CONNECT streams of one authenticated connection: the HTTP/2 handshake bounded in time,
/// and the connection closed once it has had no stream for the inbound idle timeout.
pub(super) async fn serve_connection<IO>(node: Arc<Node>, io: IO, client: InboundClient)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &node.config;
    let handshake = h2::server::Builder::new()
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(
            config
                .max_header_list_size
                .saturating_mul(HEADER_HARD_LIMIT_FACTOR),
        )
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Err(_) => {
            node.metrics.inc(Metric::InboundHandshakeTimeouts);
            return;
        }
        Ok(Err(error)) => {
            node.metrics.inc(Metric::InboundProtocolErrors);
            tracing::debug!(addr = %client.addr, %error, "HTTP/2 handshake failed");
            return;
        }
        Ok(Ok(conn)) => conn,
    };
    loop {
        let next = match tokio::time::timeout(config.inbound_idle_timeout, conn.accept()).await {
            Ok(next) => next,
            Err(_) if conn.has_streams() => continue,
            Err(_) => {
                conn.graceful_shutdown();
                let closing = std::future::poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(config.handshake_timeout, closing).await;
                return;
            }
        };
        match next {
            None => return,
            Some(Err(error)) => {
                if !error.is_io() {
                    node.metrics.inc(Metric::InboundProtocolErrors);
                }
                tracing::debug!(addr = %client.addr, %error, "inbound HTTP/2 connection failed");
                return;
            }
            Some(Ok((request, respond))) => {
                tokio::spawn(handle_stream(
                    Arc::clone(&node),
                    client.clone(),
                    request,
                    respond,
                ));
            }
        }
    }
}

/// Check one CONNECT, dial the workload, answer, and splice.
async fn handle_stream(
    node: Arc<Node>,
    client: InboundClient,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let view = node.policy();
    let (parts, body) = request.into_parts();
    let src = Party {
        id: Some(client.id.clone()),
        addr: Some(client.addr),
        placement: hbone::parse_placement(&parts.headers),
        ..Party::default()
    };
    let mut dst = Party::default();
    let refuse =
        |respond: &mut SendResponse<Bytes>, refusal: Refusal, rule: Option<u32>, dst: &Party| {
            node.metrics.inc(Metric::InboundRefused);
            if matches!(refusal, Refusal::BadRequest | Refusal::HeadersTooLarge) {
                node.metrics.inc(Metric::InboundBadRequests);
            }
            let response = Response::builder()
                .status(refusal.status())
                .body(())
                .expect("a status-only response is valid");
            // The client may already have gone; there is nothing left to tell it then.
            let _ = respond.send_response(response, true);
            node.deny(new_record(
                Side::Inbound,
                &view,
                (FlowVerdict::Deny, Reason::Refused(refusal), rule),
                &src,
                dst,
            ));
        };
    let header_bytes = hbone::header_list_size(&parts);
    if header_bytes > node.config.max_header_list_size as usize {
        tracing::debug!(client = %client.addr, header_bytes, "oversized CONNECT headers");
        return refuse(&mut respond, Refusal::HeadersTooLarge, None, &dst);
    }
    let addr = match hbone::parse_connect(&parts) {
        Ok(addr) => addr,
        Err(error) => {
            tracing::debug!(client = %client.addr, %error, "bad CONNECT");
            return refuse(&mut respond, Refusal::BadRequest, None, &dst);
        }
    };
    dst.addr = Some(addr);
    if !ClientAt::of(client.addr).may_name(addr) {
        tracing::debug!(client = %client.addr, %addr, "CONNECT to a loopback or unspecified address");
        return refuse(&mut respond, Refusal::NoSuchWorkload, None, &dst);
    }
    if client.destination != Some(addr) {
        return refuse(&mut respond, Refusal::Misdirected, None, &dst);
    }
    let Some(owner) = node.workloads.owner(client.netns, addr) else {
        return refuse(&mut respond, Refusal::NoSuchWorkload, None, &dst);
    };
    dst.id = Some(owner.id.clone());
    dst.pid = owner.pid;
    dst.placement = owner.placement.clone();
    if client.presented.as_ref() != Some(&owner.id) {
        // The certificate shown was not this workload's (it started listening meanwhile).
        return refuse(&mut respond, Refusal::Misdirected, None, &dst);
    }
    let decision = view.decide(&client.id, &owner.id, addr.port());
    if !decision.allowed {
        return refuse(&mut respond, Refusal::Denied, decision.rule, &dst);
    }
    let config = &node.config;
    let connecting = Box::pin(net::connect(
        addr,
        Dial::Hop(&owner),
        node.tags.as_ref(),
        config.connect_timeout,
        None,
    ));
    let upstream = match connecting.await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%addr, error = %crate::report::report(&error), "workload unreachable");
            return refuse(&mut respond, error.refusal(), decision.rule, &dst);
        }
    };
    let Ok(send) = respond.send_response(connected(&owner.placement), false) else {
        return;
    };
    let open = new_record(
        Side::Inbound,
        &view,
        (verdict(decision), Reason::Policy, decision.rule),
        &src,
        &dst,
    );
    node.run_flow(
        (open, 0),
        (H2Source::new(body), H2Sink(send)),
        tcp_ends(upstream),
    )
    .await;
}

/// The `200` of a CONNECT whose workload runs at `placement` (told to the client's node).
fn connected(placement: &Placement) -> Response<()> {
    let mut response = Response::builder().status(StatusCode::OK);
    if let Some(value) = hbone::placement_value(placement) {
        response = response.header(hbone::PLACEMENT, value);
    }
    response
        .body(())
        .expect("a status with a checked header is a valid response")
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use rustls_pki_types::ServerName;

    use super::{ClientAt, Placement, WorkloadCerts, hbone};
    use crate::{
        identity::{CacheError, SpiffeId, X509Svid},
        tunnel::state::{LocalOwner, LocalWorkloads, Namespace, SvidSource},
    };

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn api() -> SpiffeId {
        "spiffe://example.org/api".parse().unwrap()
    }

    /// Every address is `api`'s; counts the lookups.
    #[derive(Default)]
    struct Everywhere(AtomicUsize);

    impl LocalWorkloads for Everywhere {
        fn owner(&self, _from: Namespace, _addr: SocketAddr) -> Option<LocalOwner> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Some(LocalOwner {
                id: api(),
                netns: Namespace::HOME,
                pid: None,
                placement: Placement::default(),
            })
        }
    }

    struct NoSvids;

    impl SvidSource for NoSvids {
        fn svid(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, CacheError> {
            panic!("no SVID of {id} is wanted here")
        }
    }

    const LOOPBACK_AND_UNSPECIFIED: [&str; 8] = [
        "127.0.0.1:8080",
        "127.3.2.1:8080",
        "[::1]:8080",
        "[::ffff:127.0.0.1]:8080",
        "0.0.0.0:8080",
        "[::]:8080",
        "[::ffff:0.0.0.0]:8080",
        "0.0.0.0:1",
    ];

    #[test]
    fn clients_of_other_nodes_may_name_neither_loopback_nor_unspecified_addresses() {
        for client in [
            "10.0.0.1:40000",
            "[fd00::1]:40000",
            "[::ffff:10.0.0.1]:40000",
        ] {
            assert_eq!(ClientAt::of(addr(client)), ClientAt::Elsewhere, "{client}");
        }
        for client in [
            "127.0.0.1:40000",
            "127.0.0.2:1",
            "[::1]:40000",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(ClientAt::of(addr(client)), ClientAt::ThisNode, "{client}");
        }
        for dst in LOOPBACK_AND_UNSPECIFIED {
            assert!(!ClientAt::Elsewhere.may_name(addr(dst)), "{dst}");
        }
        for dst in ["0.0.0.0:8080", "[::]:8080", "[::ffff:0.0.0.0]:8080"] {
            assert!(!ClientAt::ThisNode.may_name(addr(dst)), "{dst}");
        }
        for dst in ["127.0.0.1:8080", "[::1]:8080", "[::ffff:127.0.0.2]:8080"] {
            assert!(ClientAt::ThisNode.may_name(addr(dst)), "{dst}");
        }
        for dst in ["10.0.0.2:8080", "[fd00::2]:443", "[::ffff:10.0.0.2]:8080"] {
            assert!(ClientAt::Elsewhere.may_name(addr(dst)), "{dst}");
            assert!(ClientAt::ThisNode.may_name(addr(dst)), "{dst}");
        }
    }

    #[test]
    fn a_server_name_another_node_may_not_name_is_answered_without_an_owner_lookup() {
        let workloads = Arc::new(Everywhere::default());
        let certs = WorkloadCerts::new(
            "spiffe://example.org/enforcer/node/b".parse().unwrap(),
            Arc::new(NoSvids),
            Arc::clone(&workloads) as Arc<dyn LocalWorkloads>,
        );
        let named = |dst: &str| {
            let ServerName::DnsName(name) = hbone::server_name(addr(dst)) else {
                panic!("not a DNS name")
            };
            hbone::parse_server_name(Some(name.as_ref())).ok()
        };
        for dst in LOOPBACK_AND_UNSPECIFIED {
            assert_eq!(
                certs.owner_named(ClientAt::Elsewhere, Namespace::HOME, named(dst)),
                None,
                "{dst}"
            );
        }
        assert_eq!(
            workloads.0.load(Ordering::SeqCst),
            0,
            "an owner was looked up"
        );
        let home = Namespace::HOME;
        let owner = |at, dst| certs.owner_named(at, home, dst).map(|owner| owner.id);
        assert_eq!(
            owner(ClientAt::Elsewhere, named("10.0.0.2:8080")),
            Some(api())
        );
        assert_eq!(
            owner(ClientAt::ThisNode, named("127.0.0.1:8080")),
            Some(api())
        );
        assert_eq!(owner(ClientAt::ThisNode, named("0.0.0.0:8080")), None);
        assert_eq!(owner(ClientAt::ThisNode, None), None);
        assert_eq!(workloads.0.load(Ordering::SeqCst), 2);
    }
}

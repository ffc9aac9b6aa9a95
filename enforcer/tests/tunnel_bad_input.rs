//! Bad input on the inbound tunnel port, without privileges: non-TLS bytes, slow clients,
//! malformed HTTP/2, oversized headers and CONNECT to garbage authorities all end with a clean
//! close (or a refusal status) within a bounded time, and are counted; a peer on another node
//! never reaches a loopback or unspecified destination.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use enforcer::{
    identity::{PeerAuthorizer, SpiffeId, client_config},
    testing::{MeshListeners, MeshNode, TestPki},
    tunnel::{self, InboundClient, Metric, Namespace, Refusal, TunnelConfig},
};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

const TD: &str = "example.org";
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Far more than any refusal here should take.
const PROMPT: Duration = Duration::from_secs(10);

fn id(path: &str) -> SpiffeId {
    format!("spiffe://{TD}/{path}").parse().unwrap()
}

/// Node B with a short handshake timeout and one enrolled workload, `api`.
struct Target {
    pki: TestPki,
    node: MeshNode,
    api: SocketAddr,
}

/// An echo server on `addr` (port 0: the kernel picks); returns where it listens.
async fn echo_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn target() -> Target {
    let pki = TestPki::new(TD);
    let listeners = MeshListeners::bind(B).await;
    let policy = format!(
        "trust_domain = \"{TD}\"\n[[allow]]\nfrom = \"{}\"\nto = \"{}\"\n",
        id("web"),
        id("api")
    );
    let config = TunnelConfig {
        handshake_timeout: Duration::from_millis(300),
        ..TunnelConfig::default()
    };
    let node = MeshNode::start(listeners, "b", &pki, pki.node_svids("b"), &policy, config);
    let api = echo_server(SocketAddr::new(B, 0)).await;
    node.workloads.insert(api, &id("api"));
    Target { pki, node, api }
}

impl Target {
    /// A TLS connection as `web`, naming `dst` in the server name.
    async fn tls(&self, dst: SocketAddr) -> TlsStream<TcpStream> {
        let now = SystemTime::now();
        let svid = self
            .pki
            .node_ca_at("a", now)
            .issue_svid(&id("web"), Duration::from_hours(1), now)
            .unwrap();
        let mut config =
            client_config(&svid, Arc::clone(&self.pki.bundles), PeerAuthorizer::Any).unwrap();
        config.alpn_protocols = vec![tunnel::ALPN_H2.to_vec()];
        let tcp = TcpStream::connect(self.node.inbound).await.unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(tunnel::server_name(dst), tcp)
            .await
            .expect("TLS handshake as web")
    }

    /// An HTTP/2 client over [`Target::tls`].
    async fn h2(&self, dst: SocketAddr) -> SendRequest<Bytes> {
        let (send, connection) = h2::client::handshake(self.tls(dst).await).await.unwrap();
        tokio::spawn(connection);
        send
    }

    /// An HTTP/2 client of the node's request handling, without TLS, as `web` connecting from
    /// `client` after naming `dst` in its server name and being shown `api`'s certificate (as
    /// if the handshake had gone that far).
    async fn h2_from(&self, client: SocketAddr, dst: SocketAddr) -> SendRequest<Bytes> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let tunnel = self.node.tunnel.clone();
        let client = InboundClient {
            id: id("web"),
            addr: client,
            destination: Some(dst),
            presented: Some(id("api")),
            netns: Namespace::HOME,
        };
        tokio::spawn(async move { tunnel.serve_connection(theirs, client).await });
        let (send, connection) = h2::client::handshake(ours).await.unwrap();
        tokio::spawn(connection);
        send
    }

    /// Waits until `metric` has counted at least once.
    async fn counted(&self, metric: Metric) {
        let deadline = tokio::time::Instant::now() + PROMPT;
        while self.node.tunnel.metrics().get(metric) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never counted",
                metric.name()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads until the peer closes; panics if that takes longer than [`PROMPT`].
async fn closed_by_peer(stream: &mut (impl AsyncReadExt + Unpin)) {
    let mut buf = vec![0u8; 64 * 1024];
    let until_closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PROMPT, until_closed)
        .await
        .expect("the server must close the connection");
}

/// The status of `request`, `None` when the stream or connection was refused outright.
async fn status(send: &SendRequest<Bytes>, request: Request<()>) -> Option<StatusCode> {
    let mut send = send.clone().ready().await.ok()?;
    let (response, _body) = send.send_request(request, false).ok()?;
    tokio::time::timeout(PROMPT, response)
        .await
        .expect("a response or an error, promptly")
        .ok()
        .map(|r| r.status())
}

fn connect(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_bytes_are_closed_and_counted() {
    let target = target().await;
    let mut tcp = TcpStream::connect(target.node.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_peer(&mut tcp).await;
    target.counted(Metric::InboundHandshakeFailures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_at_the_handshake_timeout() {
    let target = target().await;
    // Silent: never says anything.
    let mut silent = TcpStream::connect(target.node.inbound).await.unwrap();
    closed_by_peer(&mut silent).await;
    // Trickling: a TLS record header, then one byte every 50 ms.
    let mut trickle = TcpStream::connect(target.node.inbound).await.unwrap();
    trickle
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let trickling = async {
        loop {
            if trickle.write_all(&[0x01]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PROMPT, trickling)
        .await
        .expect("the trickling client is cut off");
    target.counted(Metric::InboundHandshakeTimeouts).await;
    assert!(
        target
            .node
            .tunnel
            .metrics()
            .get(Metric::InboundHandshakeTimeouts)
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_is_closed_and_counted() {
    let target = target().await;
    let mut tls = target.tls(target.api).await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A frame header announcing a 16 MiB SETTINGS frame on stream 1: a protocol error.
    tls.write_all(&[0xff, 0xff, 0xff, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01])
        .await
        .unwrap();
    tls.flush().await.unwrap();
    closed_by_peer(&mut tls).await;
    target.counted(Metric::InboundProtocolErrors).await;

    // Silent after TLS: the HTTP/2 preface never comes.
    let mut silent = target.tls(target.api).await;
    closed_by_peer(&mut silent).await;
    target.counted(Metric::InboundHandshakeTimeouts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_authorities_get_distinct_refusals() {
    let target = target().await;
    let send = target.h2(target.api).await;
    let api = target.api.to_string();
    let cases = [
        (connect("example.com:80"), Refusal::BadRequest),
        (connect("10.0.0.1"), Refusal::BadRequest),
        (connect("127.0.0.2:0"), Refusal::BadRequest),
        (connect("[fe80::1%25eth0]:80"), Refusal::BadRequest),
        (
            Request::builder()
                .method(Method::GET)
                .uri(format!("http://{api}/"))
                .body(())
                .unwrap(),
            Refusal::BadRequest,
        ),
        (connect("127.0.0.2:1"), Refusal::Misdirected),
    ];
    let count = cases.len() as u64;
    for (request, refusal) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        assert_eq!(
            status(&send, request).await,
            Some(refusal.status()),
            "{what}"
        );
    }
    assert_eq!(
        target.node.tunnel.metrics().get(Metric::InboundRefused),
        count
    );
    assert_eq!(
        target.node.tunnel.metrics().get(Metric::InboundBadRequests),
        count - 1
    );
    // The connection still serves a good request after all that.
    assert_eq!(status(&send, connect(&api)).await, Some(StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_the_node_keeps_serving() {
    let target = target().await;
    let send = target.h2(target.api).await;
    let padded = |bytes: usize| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(target.api.to_string())
            .header("x-padding", "x".repeat(bytes))
            .body(())
            .unwrap()
    };
    // Over the 16 KiB limit: refused by the handler with 431, and counted.
    assert_eq!(
        status(&send, padded(32 * 1024)).await,
        Some(Refusal::HeadersTooLarge.status())
    );
    assert_eq!(
        target.node.tunnel.metrics().get(Metric::InboundBadRequests),
        1
    );
    // Far over it: refused by the HTTP/2 layer before decoding it all.
    let refused = status(&send, padded(256 * 1024)).await;
    assert_ne!(refused, Some(StatusCode::OK), "oversized headers accepted");
    // Whatever became of that connection, the node serves a new one.
    let send = target.h2(target.api).await;
    assert_eq!(
        status(&send, connect(&target.api.to_string())).await,
        Some(StatusCode::OK)
    );
    assert_eq!(target.node.tunnel.metrics().get(Metric::FlowsOpened), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_never_reaches_a_loopback_or_unspecified_destination() {
    let target = target().await;
    // `api` owns a listener on each loopback address, and a wildcard one.
    let v4 = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let v6 = echo_server("[::1]:0".parse().unwrap()).await;
    let any = echo_server("[::]:0".parse().unwrap()).await.port();
    let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), v4.port());
    let unspecified4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), any);
    let unspecified6 = SocketAddr::new("::".parse().unwrap(), any);
    let loopback = [v4, v6, mapped];
    let unspecified = [unspecified4, unspecified6];
    for addr in loopback.iter().chain(&unspecified) {
        target.node.workloads.insert(*addr, &id("api"));
    }
    let another_node: SocketAddr = "192.0.2.1:40000".parse().unwrap();
    let this_node: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut refused = 0;
    for dst in loopback.iter().chain(&unspecified) {
        let send = target.h2_from(another_node, *dst).await;
        assert_eq!(
            status(&send, connect(&dst.to_string())).await,
            Some(Refusal::NoSuchWorkload.status()),
            "another node reached {dst}"
        );
        refused += 1;
    }
    // This node's own clients (the outbound side's local route never comes here) may name a
    // loopback destination, never an unspecified one.
    for dst in loopback {
        let send = target.h2_from(this_node, dst).await;
        assert_eq!(
            status(&send, connect(&dst.to_string())).await,
            Some(StatusCode::OK),
            "{dst}"
        );
    }
    for dst in unspecified {
        let send = target.h2_from(this_node, dst).await;
        assert_eq!(
            status(&send, connect(&dst.to_string())).await,
            Some(Refusal::NoSuchWorkload.status()),
            "{dst}"
        );
        refused += 1;
    }
    let metrics = target.node.tunnel.metrics();
    assert_eq!(metrics.get(Metric::InboundRefused), refused);
    assert_eq!(metrics.get(Metric::FlowsOpened), loopback.len() as u64);
}

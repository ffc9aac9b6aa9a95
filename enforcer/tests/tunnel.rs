//! The tunnel end to end in one process, without privileges: two nodes on loopback
//! (`127.0.0.1` is node A, `127.0.0.2` node B) with a test CA; clients reach A's outbound
//! listener as if the kernel had redirected them, workloads are tokio tasks on B.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use enforcer::{
    identity::{CacheError, SpiffeId, X509Svid},
    testing::{MeshListeners, MeshNode, TestPki},
    tunnel::{
        FlowEvent, FlowRecord, FlowVerdict, Metric, Reason, Refusal, Side, SvidSource, TunnelConfig,
    },
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TD: &str = "example.org";
const A: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Bound on anything that should end promptly.
const PROMPT: Duration = Duration::from_secs(10);

fn id(path: &str) -> SpiffeId {
    format!("spiffe://{TD}/{path}").parse().unwrap()
}

/// Two nodes, with the policy text (after the peers) of each.
struct Mesh {
    a: MeshNode,
    b: MeshNode,
}

struct MeshSpec<'a> {
    rules_a: &'a str,
    rules_b: &'a str,
    config: TunnelConfig,
    /// B's PKI (and A's unless `pki_a` is set); a fresh one when `None`.
    pki: Option<&'a TestPki>,
    pki_a: Option<&'a TestPki>,
    svids_a: Option<Arc<dyn SvidSource>>,
    /// When set, A reaches B through a proxy that holds every byte from B back this long, so
    /// CONNECT statuses arrive late.
    slow_b: Option<Duration>,
}

impl Default for MeshSpec<'_> {
    fn default() -> Self {
        Self {
            rules_a: ALLOW_WEB_API,
            rules_b: ALLOW_WEB_API,
            config: TunnelConfig::default(),
            pki: None,
            pki_a: None,
            svids_a: None,
            slow_b: None,
        }
    }
}

const ALLOW_WEB_API: &str = r#"
[[allow]]
from = "spiffe://example.org/web"
to = "spiffe://example.org/api"
"#;

fn policy_text(trust_domain: &str, a_port: u16, b_port: u16, rules: &str) -> String {
    format!(
        "trust_domain = \"{trust_domain}\"\n\
         [[peer]]\naddress = \"{A}\"\nport = {a_port}\n\
         [[peer]]\naddress = \"{B}\"\nport = {b_port}\n{rules}",
    )
}

/// A proxy on B's address to B's inbound listener `to` that passes bytes towards B at once
/// and holds each read from B back for `delay`; returns its address.
async fn slow_proxy(to: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(B, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((from_a, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(to_b) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut a_read, mut a_write) = from_a.into_split();
                let (mut b_read, mut b_write) = to_b.into_split();
                let up = tokio::io::copy(&mut a_read, &mut b_write);
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = b_read.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if a_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}

async fn mesh(spec: MeshSpec<'_>) -> Mesh {
    let fresh;
    let pki = if let Some(pki) = spec.pki {
        pki
    } else {
        fresh = TestPki::new(TD);
        &fresh
    };
    let la = MeshListeners::bind(A).await;
    let lb = MeshListeners::bind(B).await;
    let pki_a = spec.pki_a.unwrap_or(pki);
    let td_a = pki_a.root.trust_domain().to_string();
    let (a_port, b_port) = (la.inbound_addr().port(), lb.inbound_addr().port());
    let b_port_for_a = match spec.slow_b {
        Some(delay) => slow_proxy(lb.inbound_addr(), delay).await.port(),
        None => b_port,
    };
    let policy_a = policy_text(&td_a, a_port, b_port_for_a, spec.rules_a);
    let policy_b = policy_text(TD, a_port, b_port, spec.rules_b);
    let svids_a = spec.svids_a.unwrap_or_else(|| pki_a.node_svids("a"));
    let a = MeshNode::start(la, "a", pki_a, svids_a, &policy_a, spec.config.clone());
    let b = MeshNode::start(lb, "b", pki, pki.node_svids("b"), &policy_b, spec.config);
    Mesh { a, b }
}

/// A workload on `ip` whose connections `serve` handles; returns its address.
async fn workload<F, Fut>(ip: IpAddr, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// Echoes until end of stream, then half-closes.
async fn echo(mut stream: TcpStream) {
    let (mut read, mut write) = stream.split();
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// An echo workload on B registered as `spiffe://example.org/<path>`.
async fn echo_workload(mesh: &Mesh, path: &str) -> SocketAddr {
    let addr = workload(B, echo).await;
    mesh.b.workloads.insert(addr, &id(path));
    addr
}

/// Sends `message`, half-closes, and reads everything back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

/// Asserts the client's connection fails (reset at connect, or reset or closed without data
/// after it) promptly.
async fn assert_refused(stream: std::io::Result<TcpStream>) {
    let Ok(mut stream) = stream else {
        return;
    };
    let mut buf = [0u8; 64];
    let _ = stream.write_all(b"hello").await;
    let read = tokio::time::timeout(PROMPT, stream.read(&mut buf))
        .await
        .expect("a refused client must not hang");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a refused client read {read:?}"
    );
}

fn is(side: Side, event: FlowEvent) -> impl Fn(&FlowRecord) -> bool {
    move |r| r.side == side && r.event == event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_flow_is_tunnelled_and_recorded_on_both_sides() {
    let mesh = mesh(MeshSpec::default()).await;
    let api = echo_workload(&mesh, "api").await;
    let mut client = mesh.a.connect(&id("web"), api).await.unwrap();
    let reply = round_trip(&mut client, b"hello through the tunnel")
        .await
        .unwrap();
    assert_eq!(reply, b"hello through the tunnel");

    let open = mesh
        .a
        .wait_for_record(is(Side::Outbound, FlowEvent::Open))
        .await;
    assert_eq!(open.verdict, FlowVerdict::Allow);
    assert_eq!(open.rule, Some(1));
    assert_eq!(open.policy_version, 1);
    assert_eq!(open.src.id, Some(id("web")));
    assert_eq!(open.dst.id, Some(id("api")));
    assert_eq!(open.dst.addr, Some(api));
    let inbound = mesh
        .b
        .wait_for_record(is(Side::Inbound, FlowEvent::Open))
        .await;
    assert_eq!(inbound.src.id, Some(id("web")));
    assert_eq!(inbound.dst.id, Some(id("api")));
    for node in [&mesh.a, &mesh.b] {
        let close = node.wait_for_record(|r| r.event == FlowEvent::Close).await;
        assert_eq!(close.reason, Reason::Finished);
        assert_eq!((close.bytes_up, close.bytes_down), (24, 24));
    }
    assert_eq!(mesh.a.tunnel.metrics().get(Metric::PoolDials), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_the_destination_denies_fails_fast_with_records_on_both_sides() {
    let mesh = mesh(MeshSpec::default()).await;
    let db = echo_workload(&mesh, "db").await;
    assert_refused(mesh.a.connect(&id("web"), db).await).await;
    let denied = Reason::Refused(Refusal::Denied);
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(
        (a.side, a.verdict, a.reason),
        (Side::Outbound, FlowVerdict::Deny, denied)
    );
    let b = mesh.b.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!((b.side, b.reason, b.rule), (Side::Inbound, denied, None));
    assert_eq!(b.dst.id, Some(id("db")));
    assert_eq!(mesh.b.tunnel.metrics().get(Metric::InboundRefused), 1);
}

/// A workload on B that counts the connections it accepts and the bytes it reads.
async fn counting_workload() -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let (accepts, bytes) = (Arc::clone(&accepted), Arc::clone(&received));
    let addr = workload(B, move |mut stream: TcpStream| {
        accepts.fetch_add(1, Ordering::SeqCst);
        let bytes = Arc::clone(&bytes);
        async move {
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            bytes.fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
    })
    .await;
    (addr, accepted, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_a_slow_refusal_never_reach_the_workload() {
    // A may reach `db` and sends the client's bytes with the CONNECT; B's policy denies the
    // pair, and its `403` reaches A only after the bytes have gone.
    let rules_a =
        "[[allow]]\nfrom = \"spiffe://example.org/web\"\nto = \"spiffe://example.org/db\"\n";
    let mesh = mesh(MeshSpec {
        rules_a,
        slow_b: Some(Duration::from_millis(300)),
        ..MeshSpec::default()
    })
    .await;
    let (db, accepted, received) = counting_workload().await;
    mesh.b.workloads.insert(db, &id("db"));
    for round in 0..2 {
        let mut client = mesh.a.connect(&id("web"), db).await;
        if let Ok(stream) = &mut client {
            let _ = stream.write_all(b"secret").await;
        }
        assert_refused(client).await;
        let denied = |node: &MeshNode| {
            node.records()
                .iter()
                .filter(|r| {
                    r.event == FlowEvent::Deny && r.reason == Reason::Refused(Refusal::Denied)
                })
                .count()
        };
        tokio::time::timeout(PROMPT, async {
            while denied(&mesh.a) <= round || denied(&mesh.b) <= round {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: no refusal recorded on both sides"));
    }
    assert!(
        mesh.a.tunnel.metrics().get(Metric::BytesBeforeStatus) >= 2 * 6,
        "the bytes were not sent before the status, so this proves nothing"
    );
    assert_eq!(mesh.a.tunnel.metrics().get(Metric::PoolReuses), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the workload was dialled"
    );
    assert_eq!(received.load(Ordering::SeqCst), 0, "the workload got bytes");
    assert!(
        mesh.a.records().iter().all(|r| r.event == FlowEvent::Deny),
        "A opened a refused flow: {:#?}",
        mesh.a.records()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_a_slow_200_arrive_once_and_are_counted() {
    let mesh = mesh(MeshSpec {
        slow_b: Some(Duration::from_millis(200)),
        ..MeshSpec::default()
    })
    .await;
    let api = echo_workload(&mesh, "api").await;
    let mut client = mesh.a.connect(&id("web"), api).await.unwrap();
    let reply = round_trip(&mut client, b"early bytes").await.unwrap();
    assert_eq!(reply, b"early bytes");
    assert_eq!(
        mesh.a.tunnel.metrics().get(Metric::BytesBeforeStatus),
        11,
        "the client's bytes went before the status"
    );
    for node in [&mesh.a, &mesh.b] {
        let close = node.wait_for_record(|r| r.event == FlowEvent::Close).await;
        assert_eq!(close.reason, Reason::Finished);
        assert_eq!((close.bytes_up, close.bytes_down), (11, 11));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_another_trust_domain_is_refused_at_the_handshake() {
    let other = TestPki::new("other.org");
    let mesh = mesh(MeshSpec {
        pki_a: Some(&other),
        rules_a: "[[allow]]\nfrom = \"spiffe://other.org/web\"\nto = \"spiffe://example.org/api\"\n",
        ..MeshSpec::default()
    })
    .await;
    let api = echo_workload(&mesh, "api").await;
    let web: SpiffeId = "spiffe://other.org/web".parse().unwrap();
    assert_refused(mesh.a.connect(&web, api).await).await;
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(a.reason, Reason::PeerUnreachable);
    assert!(
        mesh.b.records().is_empty(),
        "no CONNECT may reach B: {:?}",
        mesh.b.records()
    );
}

/// Always presents one fixed SVID.
struct FixedSvid(Arc<X509Svid>);

impl SvidSource for FixedSvid {
    fn svid(&self, _: &SpiffeId) -> Result<Arc<X509Svid>, CacheError> {
        Ok(Arc::clone(&self.0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_svid_is_refused() {
    let long_ago = SystemTime::now() - Duration::from_hours(3);
    let pki = TestPki::new_at(TD, long_ago);
    let expired = pki
        .node_ca_at("a", long_ago)
        .issue_svid(&id("web"), Duration::from_hours(1), long_ago)
        .unwrap();
    let mesh = mesh(MeshSpec {
        pki: Some(&pki),
        svids_a: Some(Arc::new(FixedSvid(Arc::new(expired)))),
        ..MeshSpec::default()
    })
    .await;
    let api = echo_workload(&mesh, "api").await;
    assert_refused(mesh.a.connect(&id("web"), api).await).await;
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(a.reason, Reason::PeerUnreachable);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        mesh.b
            .tunnel
            .metrics()
            .get(Metric::InboundHandshakeFailures)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_identity_the_client_may_not_reach_gets_no_byte() {
    // B claims the destination belongs to `imposter` and lets web reach it; A's policy only
    // lets web reach `api`, so A must refuse before sending anything.
    let mesh = mesh(MeshSpec {
        rules_b: "[[allow]]\nfrom = \"spiffe://example.org/web\"\nto = \"spiffe://example.org/imposter\"\n",
        ..MeshSpec::default()
    })
    .await;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let addr = workload(B, move |mut stream: TcpStream| {
        let counter = Arc::clone(&counter);
        async move {
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            counter.fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
    })
    .await;
    mesh.b.workloads.insert(addr, &id("imposter"));
    // Under load the refusal can beat `connect` itself, which then fails with a reset.
    let mut client = mesh.a.connect(&id("web"), addr).await;
    if let Ok(stream) = &mut client {
        let _ = stream.write_all(b"secret").await;
    }
    assert_refused(client).await;
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(a.reason, Reason::ServerNotAuthorized);
    assert_eq!(a.dst.id, Some(id("imposter")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(received.load(Ordering::SeqCst), 0, "the workload got bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_port_no_enrolled_workload_owns_is_refused() {
    let mesh = mesh(MeshSpec::default()).await;
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&accepted);
    let open_port = workload(B, move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {}
    })
    .await;
    assert_refused(mesh.a.connect(&id("web"), open_port).await).await;
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(a.reason, Reason::Refused(Refusal::NoSuchWorkload));
    let b = mesh.b.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(b.reason, Reason::Refused(Refusal::NoSuchWorkload));
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "never an open relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_workload_port_maps_to_upstream_refused() {
    let mesh = mesh(MeshSpec::default()).await;
    // Registered, but nothing listens there any more.
    let gone = {
        let listener = TcpListener::bind(SocketAddr::new(B, 0)).await.unwrap();
        listener.local_addr().unwrap()
    };
    mesh.b.workloads.insert(gone, &id("api"));
    assert_refused(mesh.a.connect(&id("web"), gone).await).await;
    let a = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(a.reason, Reason::Refused(Refusal::UpstreamRefused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_in_both_directions() {
    let mesh = mesh(MeshSpec::default()).await;
    // Client first: the workload reads to end of stream, then answers and closes.
    let counter = workload(B, |mut stream: TcpStream| async move {
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        let answer = format!("got {} bytes", buf.len());
        stream.write_all(answer.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
    })
    .await;
    mesh.b.workloads.insert(counter, &id("api"));
    let mut client = mesh.a.connect(&id("web"), counter).await.unwrap();
    let reply = round_trip(&mut client, &vec![7u8; 100_000]).await.unwrap();
    assert_eq!(reply, b"got 100000 bytes");

    // Workload first: it greets and half-closes, then still reads the client's answer.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let greeter = workload(B, move |mut stream: TcpStream| {
        let tx = tx.lock().unwrap().take();
        async move {
            stream.write_all(b"greeting").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await.unwrap();
            tx.unwrap().send(buf).unwrap();
        }
    })
    .await;
    mesh.b.workloads.insert(greeter, &id("api"));
    let mut client = mesh.a.connect(&id("web"), greeter).await.unwrap();
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"greeting");
    client
        .write_all(b"answer after the server's end")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let got = tokio::time::timeout(PROMPT, rx).await.unwrap().unwrap();
    assert_eq!(got, b"answer after the server's end");
}

/// Deterministic pseudo-random bytes (xorshift), so the data is not trivially compressible.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_arrives_intact() {
    const TOTAL: usize = 1 << 30;
    let mesh = mesh(MeshSpec::default()).await;
    let hasher = workload(B, |mut stream: TcpStream| async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        stream.write_all(&hash.finalize()).await.unwrap();
        stream.shutdown().await.unwrap();
    })
    .await;
    mesh.b.workloads.insert(hasher, &id("api"));
    let mut client = mesh.a.connect(&id("web"), hasher).await.unwrap();
    let mut sent = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..TOTAL / buf.len() {
        fill(&mut buf, &mut state);
        sent.update(&buf);
        client.write_all(&buf).await.unwrap();
    }
    client.shutdown().await.unwrap();
    let mut received = Vec::new();
    client.read_to_end(&mut received).await.unwrap();
    assert_eq!(received, sent.finalize().to_vec(), "hash of what arrived");
    let close = mesh
        .a
        .wait_for_record(|r| r.event == FlowEvent::Close)
        .await;
    assert_eq!(close.bytes_up, TOTAL as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_pooled_connection() {
    const STREAMS: usize = 1000;
    let config = TunnelConfig {
        pool_max_streams: STREAMS,
        ..TunnelConfig::default()
    };
    let mesh = Arc::new(
        mesh(MeshSpec {
            config,
            ..MeshSpec::default()
        })
        .await,
    );
    let api = echo_workload(&mesh, "api").await;
    // Open every stream first, then use them all, so they are concurrent.
    let mut clients = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        clients.push(mesh.a.connect(&id("web"), api).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let message = format!("stream {i}");
            let reply = round_trip(&mut client, message.as_bytes()).await.unwrap();
            assert_eq!(reply, message.as_bytes());
        });
    }
    let all = async {
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_mins(1), all)
        .await
        .expect("1000 streams finish");
    assert_eq!(mesh.a.tunnel.metrics().get(Metric::PoolDials), 1);
    assert_eq!(mesh.a.tunnel.pooled_connections(), 1);
    assert_eq!(
        mesh.b.tunnel.metrics().get(Metric::InboundAccepted),
        1,
        "every stream rode one TLS connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_flow_is_authorized_and_recorded() {
    let mesh = mesh(MeshSpec::default()).await;
    let api = workload(A, echo).await;
    mesh.a.workloads.insert(api, &id("api"));
    let mut client = mesh.a.connect(&id("web"), api).await.unwrap();
    assert_eq!(round_trip(&mut client, b"local").await.unwrap(), b"local");
    let open = mesh.a.wait_for_record(|r| r.event == FlowEvent::Open).await;
    assert_eq!((open.reason, open.rule), (Reason::Policy, Some(1)));
    assert_eq!(open.dst.id, Some(id("api")));
    assert_eq!(mesh.a.tunnel.metrics().get(Metric::PoolDials), 0);

    let db = workload(A, echo).await;
    mesh.a.workloads.insert(db, &id("db"));
    assert_refused(mesh.a.connect(&id("web"), db).await).await;
    let deny = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!((deny.reason, deny.rule), (Reason::Policy, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_passes_in_plaintext_and_other_destinations_have_no_route() {
    let egress_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let outside = workload(egress_ip, echo).await;
    let rules = format!(
        "{ALLOW_WEB_API}[[egress]]\ncidr = \"{egress_ip}/32\"\nports = [{}]\n",
        outside.port()
    );
    let mesh = mesh(MeshSpec {
        rules_a: &rules,
        ..MeshSpec::default()
    })
    .await;
    let mut client = mesh.a.connect(&id("web"), outside).await.unwrap();
    assert_eq!(round_trip(&mut client, b"dns?").await.unwrap(), b"dns?");
    let open = mesh.a.wait_for_record(|r| r.event == FlowEvent::Open).await;
    assert_eq!(open.reason, Reason::Egress);

    let nowhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)), 9);
    assert_refused(mesh.a.connect(&id("web"), nowhere).await).await;
    let deny = mesh.a.wait_for_record(|r| r.event == FlowEvent::Deny).await;
    assert_eq!(deny.reason, Reason::NoRoute);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_closes_open_flows_the_new_policy_denies() {
    let mesh = mesh(MeshSpec::default()).await;
    let api = echo_workload(&mesh, "api").await;
    let deny_all = format!("trust_domain = \"{TD}\"\n");
    // Each node in turn revokes an open flow: its own end closes as revoked, and the other
    // end then closes as the stream ends (one flow each, so no reload races the other's).
    for node in [&mesh.a, &mesh.b] {
        let mut client = mesh.a.connect(&id("web"), api).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(node.tunnel.open_flows(), 1);

        let allowed = node.policy_text();
        assert_eq!(node.reload(&deny_all), 1);
        let read = tokio::time::timeout(PROMPT, client.read(&mut buf))
            .await
            .expect("the revoked flow closes");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let close = node
            .wait_for_record(|r| r.event == FlowEvent::Close && r.reason == Reason::Revoked)
            .await;
        assert_eq!(
            (close.verdict, close.policy_version),
            (FlowVerdict::Deny, 2)
        );
        assert_eq!(node.tunnel.metrics().get(Metric::FlowsRevoked), 1);
        assert_eq!(node.reload(&allowed), 0);
        // The far end has closed too before the next round counts open flows.
        for end in [&mesh.a, &mesh.b] {
            tokio::time::timeout(PROMPT, async {
                while end.tunnel.open_flows() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("both ends of the revoked flow close");
        }
    }
}

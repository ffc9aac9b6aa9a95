//! The inbound side's HTTP/2 CONNECT handling, fed by an untrusted peer: after a valid client
//! preface either raw frames (`mode` even) or requests built from the input with a real HTTP/2
//! client (`mode` odd): method, authority (the enrolled destination, a misdirected one, or
//! arbitrary text), extra headers of arbitrary size, and body bytes. Serving must never panic
//! and always end (time is paused, so every timeout fires at once when nothing else can run).

#![no_main]
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use enforcer::{
    identity::SpiffeId,
    policy::{InForce, PolicySnapshot},
    testing::{TableOrigins, TableWorkloads, TestPki, test_policy},
    tunnel::{
        InboundClient, Namespace, RecentRecords, Tunnel, TunnelConfig, TunnelParts, Untagged,
    },
};
use http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncWriteExt, DuplexStream};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where the enrolled workload "listens" (nothing does: connecting is refused).
const TARGET: &str = "127.0.0.1:1";

static TUNNEL: LazyLock<Tunnel> = LazyLock::new(|| {
    let pki = TestPki::new("fuzz.org");
    let workloads = Arc::new(TableWorkloads::default());
    workloads.insert(TARGET.parse().unwrap(), &id("api"));
    let text = "trust_domain = \"fuzz.org\"\n[[allow]]\nfrom = \"spiffe://fuzz.org/web\"\nto = \"spiffe://fuzz.org/api\"\n";
    Tunnel::new(TunnelParts {
        config: TunnelConfig::default(),
        node_id: id("enforcer/node/fuzz"),
        bundles: Arc::clone(&pki.bundles),
        svids: pki.node_svids("fuzz"),
        workloads,
        origins: Arc::new(TableOrigins::default()),
        records: Arc::new(RecentRecords::new(16)),
        tags: Arc::new(Untagged),
        policy: PolicySnapshot::fixed(InForce::compile(
            "fuzz.toml",
            text,
            test_policy(text),
            None,
            1,
        )),
    })
    .unwrap()
});

fn id(path: &str) -> SpiffeId {
    format!("spiffe://fuzz.org/{path}").parse().unwrap()
}

/// Takes input bytes front to back.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        first
    }

    /// A chunk whose length is given by the next two bytes (scaled, up to 64 KiB).
    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(u16::from_le_bytes([self.byte(), self.byte()]));
        let len = len.min(self.0.len());
        let (chunk, rest) = self.0.split_at(len);
        self.0 = rest;
        chunk
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(serve(data));
});

async fn serve(data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let info = InboundClient {
        id: id("web"),
        addr: "127.0.0.1:40000".parse().unwrap(),
        destination: Some(TARGET.parse::<SocketAddr>().unwrap()),
        presented: Some(id("api")),
        netns: Namespace::HOME,
    };
    let tunnel = TUNNEL.clone();
    let served = tokio::spawn(async move { tunnel.serve_connection(server, info).await });
    let mut input = Input(data);
    if input.byte() % 2 == 0 {
        raw(client, input.0).await;
    } else {
        requests(client, input).await;
    }
    tokio::time::timeout(Duration::from_secs(3600), served)
        .await
        .expect("serving an input must end")
        .unwrap();
}

/// The preface, then the input as frames; responses are read and dropped.
async fn raw(client: DuplexStream, frames: &[u8]) {
    let (mut read, mut write) = tokio::io::split(client);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut read, &mut tokio::io::sink()).await;
    });
    let _ = write.write_all(PREFACE).await;
    let _ = write.write_all(frames).await;
    let _ = write.shutdown().await;
}

/// Requests built from the input, sent by an HTTP/2 client.
async fn requests(client: DuplexStream, mut input: Input<'_>) {
    let Ok((send, connection)) = h2::client::handshake(client).await else {
        return;
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    for _ in 0..(input.byte() % 4) + 1 {
        let method = match input.byte() % 4 {
            0 | 1 => Method::CONNECT,
            2 => Method::GET,
            _ => Method::from_bytes(input.chunk()).unwrap_or(Method::POST),
        };
        let authority = match input.byte() % 4 {
            0 => TARGET.to_owned(),
            1 => "127.0.0.1:2".to_owned(),
            2 => "[::1]:1".to_owned(),
            _ => String::from_utf8_lossy(input.chunk()).into_owned(),
        };
        let mut request = Request::builder().method(method).uri(authority);
        for _ in 0..input.byte() % 4 {
            request = request.header(input.chunk(), input.chunk());
        }
        let Ok(request) = request.body(()) else {
            continue;
        };
        let Ok(mut send) = send.clone().ready().await else {
            return;
        };
        let Ok((response, mut body)) = send.send_request(request, false) else {
            continue;
        };
        let _ = body.send_data(Bytes::copy_from_slice(input.chunk()), input.byte() % 2 == 0);
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(60), response).await
        {
            let mut stream = response.into_body();
            while let Some(Ok(_)) = stream.data().await {}
        }
    }
}

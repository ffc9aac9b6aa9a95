//! In-process mTLS between a rustls client and server using the SPIFFE verifiers: the
//! handshake runs over in-memory buffers, so the test needs no privileges and no network.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
    time::{Duration, SystemTime},
};

use enforcer::identity::{
    CertificateAuthority, PeerAuthorizer, SpiffeId, TrustBundle, TrustBundleSet, X509Svid,
    client_config, peer_spiffe_id, server_config,
};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;

const HOUR: Duration = Duration::from_hours(1);

/// Moves TLS records between the two ends until both finish the handshake or one fails.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        while client.wants_write() {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client write_tls");
            server
                .read_tls(&mut buf.as_slice())
                .expect("server read_tls");
            server.process_new_packets()?;
        }
        while server.wants_write() {
            let mut buf = Vec::new();
            server.write_tls(&mut buf).expect("server write_tls");
            client
                .read_tls(&mut buf.as_slice())
                .expect("client read_tls");
            client.process_new_packets()?;
        }
    }
    panic!("handshake made no progress");
}

/// Sends `data` from one end to the other and returns what the other end read.
fn transfer(from: &mut impl TlsEnd, to: &mut impl TlsEnd, data: &[u8]) -> Vec<u8> {
    from.plaintext_writer()
        .write_all(data)
        .expect("write plaintext");
    let mut buf = Vec::new();
    from.tls_out(&mut buf);
    to.tls_in(&buf);
    let mut out = vec![0; data.len()];
    to.plaintext_reader()
        .read_exact(&mut out)
        .expect("read plaintext");
    out
}

/// The parts of client and server connections `transfer` needs.
trait TlsEnd {
    fn plaintext_writer(&mut self) -> rustls::Writer<'_>;
    fn plaintext_reader(&mut self) -> rustls::Reader<'_>;
    fn tls_out(&mut self, buf: &mut Vec<u8>);
    fn tls_in(&mut self, buf: &[u8]);
}

macro_rules! tls_end {
    ($t:ty) => {
        impl TlsEnd for $t {
            fn plaintext_writer(&mut self) -> rustls::Writer<'_> {
                self.writer()
            }
            fn plaintext_reader(&mut self) -> rustls::Reader<'_> {
                self.reader()
            }
            fn tls_out(&mut self, buf: &mut Vec<u8>) {
                while self.wants_write() {
                    self.write_tls(buf).expect("write_tls");
                }
            }
            fn tls_in(&mut self, mut buf: &[u8]) {
                while !buf.is_empty() {
                    self.read_tls(&mut buf).expect("read_tls");
                    self.process_new_packets().expect("process");
                }
            }
        }
    };
}
tls_end!(ClientConnection);
tls_end!(ServerConnection);

/// Two trust domains, each with a root and a node CA, and a federated bundle set.
struct Mesh {
    a_node: CertificateAuthority,
    b_node: CertificateAuthority,
    bundles: Arc<TrustBundleSet>,
}

fn mesh() -> Mesh {
    let now = SystemTime::now();
    let mut bundles = TrustBundleSet::new();
    let mut nodes = Vec::new();
    for td in ["a.example", "b.example"] {
        let root =
            CertificateAuthority::new_root(&td.parse().expect("td"), HOUR * 24, now).expect("root");
        nodes.push(
            root.issue_intermediate("node", HOUR * 2, now)
                .expect("node"),
        );
        bundles.insert(
            TrustBundle::new(
                root.trust_domain().clone(),
                vec![root.certificate().clone()],
            )
            .expect("bundle"),
        );
    }
    let b_node = nodes.pop().expect("b");
    let a_node = nodes.pop().expect("a");
    Mesh {
        a_node,
        b_node,
        bundles: Arc::new(bundles),
    }
}

fn svid(ca: &CertificateAuthority, id: &str) -> X509Svid {
    ca.issue_svid(&id.parse().expect("id"), HOUR, SystemTime::now())
        .expect("svid")
}

fn connect(
    client_svid: &X509Svid,
    server_svid: &X509Svid,
    bundles: &Arc<TrustBundleSet>,
    expected_server: PeerAuthorizer,
) -> (
    ClientConnection,
    ServerConnection,
    Result<(), rustls::Error>,
) {
    let server_cfg = server_config(server_svid, Arc::clone(bundles), PeerAuthorizer::Any)
        .expect("server config");
    let client_cfg =
        client_config(client_svid, Arc::clone(bundles), expected_server).expect("client config");
    let name = ServerName::try_from("spiffe").expect("server name");
    let mut client = ClientConnection::new(Arc::new(client_cfg), name).expect("client");
    let mut server = ServerConnection::new(Arc::new(server_cfg)).expect("server");
    let result = handshake(&mut client, &mut server);
    (client, server, result)
}

#[test]
fn mtls_handshake_across_federated_trust_domains_reports_both_ids() {
    let mesh = mesh();
    let web = svid(&mesh.a_node, "spiffe://a.example/web");
    let db = svid(&mesh.b_node, "spiffe://b.example/db");
    let db_id: SpiffeId = "spiffe://b.example/db".parse().expect("id");
    let (mut client, mut server, result) = connect(
        &web,
        &db,
        &mesh.bundles,
        PeerAuthorizer::Exactly(db_id.clone()),
    );
    result.expect("handshake succeeds");
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(peer_spiffe_id(&client).expect("server id"), db_id);
    assert_eq!(
        peer_spiffe_id(&server).expect("client id").as_str(),
        "spiffe://a.example/web"
    );
    assert_eq!(transfer(&mut client, &mut server, b"ping"), b"ping");
    assert_eq!(transfer(&mut server, &mut client, b"pong"), b"pong");
}

#[test]
fn client_refuses_a_server_with_an_unexpected_id() {
    let mesh = mesh();
    let web = svid(&mesh.a_node, "spiffe://a.example/web");
    let impostor = svid(&mesh.a_node, "spiffe://a.example/impostor");
    let (_, _, result) = connect(
        &web,
        &impostor,
        &mesh.bundles,
        PeerAuthorizer::Exactly("spiffe://a.example/db".parse().expect("id")),
    );
    assert_eq!(
        result.expect_err("wrong server"),
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    );
}

#[test]
fn server_refuses_a_client_from_an_untrusted_trust_domain() {
    let mesh = mesh();
    let now = SystemTime::now();
    let stranger_root =
        CertificateAuthority::new_root(&"c.example".parse().expect("td"), HOUR, now).expect("root");
    let stranger = svid(&stranger_root, "spiffe://c.example/web");
    let db = svid(&mesh.b_node, "spiffe://b.example/db");
    let (_, _, result) = connect(&stranger, &db, &mesh.bundles, PeerAuthorizer::Any);
    let err = result.expect_err("unknown trust domain");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("c.example"), "{err}");
}

//! `cargo xtask bench identity`: identity costs. Prints figures and ratios from one run;
//! asserts nothing.
//! 1. X.509-SVIDs issued per second on one core, key generation included (target >= 5,000/s);
//! 2. TLS 1.3 mTLS handshakes per second between two in-process rustls endpoints with our
//!    SPIFFE verifiers, vs the same handshake with rustls's stock webpki verifiers over the
//!    same certificates and roots (target ratio >= 0.8).
//!
//! Both handshake variants present identical leaves (our node CA signs them with the SVID
//! profile plus a DNS SAN, which the stock server verifier needs); session resumption is off,
//! so every handshake verifies both chains. Rounds alternate between the variants.
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use enforcer::identity::{
    CertificateAuthority, DEFAULT_ROOT_VALIDITY, DEFAULT_SVID_TTL, PeerAuthorizer, SpiffeId,
    TrustBundle, TrustBundleSet, X509Svid, client_config, provider, server_config,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    client::Resumption, server::NoServerSessionStorage, server::WebPkiClientVerifier,
};
use rustls_pki_types::ServerName;

use common::median;

/// Rounds per measurement; the median is printed.
const ROUNDS: usize = 7;
/// How long one round runs.
const ROUND: Duration = Duration::from_millis(500);

const SERVER_ID: &str = "spiffe://example.org/ns/prod/server";
const CLIENT_ID: &str = "spiffe://example.org/ns/prod/client";
/// The DNS SAN the stock client verifies the server against.
const SERVER_DNS: &str = "server.example.org";

fn main() {
    println!("identity benchmark ({ROUNDS} rounds of {ROUND:?}, medians)");
    issuance();
    handshakes();
}

/// Runs `op` repeatedly for one [`ROUND`] and returns the rate per second.
fn rate(mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut count = 0u32;
    while start.elapsed() < ROUND {
        op();
        count += 1;
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

fn node_ca() -> (CertificateAuthority, CertificateAuthority) {
    let now = SystemTime::now();
    let td = "example.org".parse().expect("td");
    let root = CertificateAuthority::new_root(&td, DEFAULT_ROOT_VALIDITY, now).expect("root");
    let node = root
        .issue_intermediate("node-1", Duration::from_hours(24), now)
        .expect("node");
    (root, node)
}

fn issuance() {
    let (_, node) = node_ca();
    let id: SpiffeId = "spiffe://example.org/ns/prod/web".parse().expect("id");
    let samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            rate(|| {
                black_box(
                    node.issue_svid(&id, DEFAULT_SVID_TTL, SystemTime::now())
                        .expect("issue"),
                );
            })
        })
        .collect();
    println!(
        "SVID issuance, key generation included, one core: {:.0}/s (target >= 5,000/s)",
        median(&samples)
    );
}

/// A leaf with the SVID profile (as `issue_svid` makes it) plus `dns` as a DNS SAN, signed by
/// `node`, loaded back through [`X509Svid::from_pem`] so it passes our SVID checks.
fn leaf(node: &CertificateAuthority, id: &str, dns: Option<&str>) -> X509Svid {
    let signer = KeyPair::from_pem(&node.key_pem()).expect("node key");
    let issuer = Issuer::from_ca_cert_der(node.certificate(), signer).expect("issuer");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "example.org");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("ia5"))];
    if let Some(dns) = dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.try_into().expect("ia5")));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_mins(1)).into();
    params.not_after = (now + Duration::from_hours(1)).into();
    let cert = params.signed_by(&key, &issuer).expect("sign leaf");
    let chain = format!("{}{}", cert.pem(), node.chain_pem());
    X509Svid::from_pem(&chain, &key.serialize_pem(), id).expect("a valid SVID")
}

/// The client and server configs of one handshake variant.
struct Endpoints {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
}

impl Endpoints {
    /// Turns resumption off on both sides so every handshake verifies certificates.
    fn new(mut client: ClientConfig, mut server: ServerConfig, name: &str) -> Self {
        client.resumption = Resumption::disabled();
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Self {
            client: Arc::new(client),
            server: Arc::new(server),
            name: ServerName::try_from(name.to_owned()).expect("server name"),
        }
    }

    /// One full handshake over in-memory buffers.
    fn handshake(&self) {
        let mut client =
            ClientConnection::new(Arc::clone(&self.client), self.name.clone()).expect("client");
        let mut server = ServerConnection::new(Arc::clone(&self.server)).expect("server");
        let mut buf = Vec::with_capacity(4096);
        while client.is_handshaking() || server.is_handshaking() {
            let mut progressed = false;
            while client.wants_write() {
                buf.clear();
                client.write_tls(&mut buf).expect("client write_tls");
                server
                    .read_tls(&mut buf.as_slice())
                    .expect("server read_tls");
                server.process_new_packets().expect("server handshake");
                progressed = true;
            }
            while server.wants_write() {
                buf.clear();
                server.write_tls(&mut buf).expect("server write_tls");
                client
                    .read_tls(&mut buf.as_slice())
                    .expect("client read_tls");
                client.process_new_packets().expect("client handshake");
                progressed = true;
            }
            assert!(progressed, "handshake stalled");
        }
        black_box((client, server));
    }
}

fn handshakes() {
    let (root, node) = node_ca();
    let server_svid = leaf(&node, SERVER_ID, Some(SERVER_DNS));
    let client_svid = leaf(&node, CLIENT_ID, None);
    let td = root.trust_domain().clone();
    let mut bundles = TrustBundleSet::new();
    bundles.insert(TrustBundle::new(td, vec![root.certificate().clone()]).expect("bundle"));
    let bundles = Arc::new(bundles);
    let spiffe = Endpoints::new(
        client_config(
            &client_svid,
            Arc::clone(&bundles),
            PeerAuthorizer::Exactly(SERVER_ID.parse().expect("id")),
        )
        .expect("client config"),
        server_config(
            &server_svid,
            bundles,
            PeerAuthorizer::Exactly(CLIENT_ID.parse().expect("id")),
        )
        .expect("server config"),
        "spiffe",
    );

    let mut roots = RootCertStore::empty();
    roots.add(root.certificate().clone()).expect("root");
    let roots = Arc::new(roots);
    let stock_client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(Arc::clone(&roots))
        .with_client_auth_cert(client_svid.chain().to_vec(), client_svid.private_key())
        .expect("client config");
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .expect("client verifier");
    let stock_server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_svid.chain().to_vec(), server_svid.private_key())
        .expect("server config");
    let stock = Endpoints::new(stock_client, stock_server, SERVER_DNS);

    // Warm up both, then alternate rounds so drift (frequency, the other core) hits both.
    spiffe.handshake();
    stock.handshake();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(rate(|| spiffe.handshake()));
        theirs.push(rate(|| stock.handshake()));
    }
    let (ours, theirs) = (median(&ours), median(&theirs));
    println!("mTLS handshakes, SPIFFE verifiers: {ours:.0}/s");
    println!("mTLS handshakes, stock webpki verifiers: {theirs:.0}/s");
    println!(
        "SPIFFE / stock handshake rate: {:.2} (target >= 0.8)",
        ours / theirs
    );
}

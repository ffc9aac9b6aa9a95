//! mTLS interop with OpenSSL over loopback: our rustls client against `openssl s_server` and
//! `openssl s_client` against our rustls server, both configured with SVIDs from the identity
//! module, and the same handshakes failing when either side presents a certificate from
//! another CA. Every socket and child process has a deadline; the children are killed and
//! reaped when a test ends. Needs the `openssl` command; without it the tests fail.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use enforcer::identity::{
    CertificateAuthority, DEFAULT_ROOT_VALIDITY, DEFAULT_SVID_TTL, PeerAuthorizer, SpiffeId,
    TrustBundle, TrustBundleSet, X509Svid, client_config, encode_certificates, peer_spiffe_id,
    server_config, write_private, write_public,
};
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use rustls_pki_types::ServerName;

/// Upper bound on every wait: socket reads and writes, process start and exit.
const DEADLINE: Duration = Duration::from_secs(15);

const SERVER_ID: &str = "spiffe://example.org/ns/prod/server";
const CLIENT_ID: &str = "spiffe://example.org/ns/prod/client";

/// One CA hierarchy written to a directory, with a server and a client SVID.
struct Pki {
    dir: PathBuf,
    bundles: Arc<TrustBundleSet>,
    server: X509Svid,
    client: X509Svid,
}

impl Pki {
    /// Root, node CA and two SVIDs of `example.org` in `dir/<name>/`: `bundle.pem`,
    /// `node.pem`, and `{server,client}.{pem,key}` (leaf only in `.pem`, for openssl `-cert`).
    fn new(base: &Path, name: &str) -> Self {
        let dir = base.join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        let now = SystemTime::now();
        let td = "example.org".parse().expect("td");
        let root = CertificateAuthority::new_root(&td, DEFAULT_ROOT_VALIDITY, now).expect("root");
        let node = root
            .issue_intermediate("node-1", Duration::from_hours(2), now)
            .expect("node");
        let issue = |id: &str| {
            node.issue_svid(&id.parse().expect("id"), DEFAULT_SVID_TTL, now)
                .expect("svid")
        };
        let (server, client) = (issue(SERVER_ID), issue(CLIENT_ID));
        let bundle = TrustBundle::new(td, vec![root.certificate().clone()]).expect("bundle");
        write_public(&dir.join("bundle.pem"), &bundle.to_pem()).expect("write");
        write_public(&dir.join("node.pem"), &node.chain_pem()).expect("write");
        for (stem, svid) in [("server", &server), ("client", &client)] {
            let leaf = encode_certificates(&svid.chain()[..1]);
            write_public(&dir.join(format!("{stem}.pem")), &leaf).expect("write");
            write_private(&dir.join(format!("{stem}.key")), &svid.key_pem()).expect("write");
        }
        let mut bundles = TrustBundleSet::new();
        bundles.insert(bundle);
        Self {
            dir,
            bundles: Arc::new(bundles),
            server,
            client,
        }
    }

    /// openssl arguments presenting the `stem` SVID and trusting this PKI's bundle.
    fn openssl_identity(&self, stem: &str, trusted: &Self) -> Vec<String> {
        let path = |dir: &Path, file: &str| dir.join(file).display().to_string();
        vec![
            "-cert".into(),
            path(&self.dir, &format!("{stem}.pem")),
            "-cert_chain".into(),
            path(&self.dir, "node.pem"),
            "-key".into(),
            path(&self.dir, &format!("{stem}.key")),
            "-CAfile".into(),
            path(&trusted.dir, "bundle.pem"),
            "-verify_return_error".into(),
        ]
    }
}

fn spiffe_id(text: &str) -> SpiffeId {
    text.parse().expect("id")
}

/// A child process that is killed and reaped when dropped; its output lines arrive on a
/// channel read by a thread, so waiting on them is bounded.
struct Openssl {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Openssl {
    /// Starts `openssl args...` with stdout and stderr merged into one line channel.
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `openssl {}`: {e}", args.join(" ")));
        let (tx, lines) = mpsc::channel();
        let forward = |stream: Box<dyn Read + Send>, tx: mpsc::Sender<String>| {
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        };
        forward(Box::new(child.stdout.take().expect("stdout")), tx.clone());
        forward(Box::new(child.stderr.take().expect("stderr")), tx);
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a line containing `needle` appears; false at the deadline or at exit.
    fn wait_for(&mut self, needle: &str) -> bool {
        let end = Instant::now() + DEADLINE;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits for the process to exit (killing it at the deadline) and returns all its output.
    fn finish(mut self) -> String {
        drop(self.stdin.take());
        let end = Instant::now() + DEADLINE;
        while self.child.try_wait().expect("try_wait").is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

impl Drop for Openssl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (for `s_server`, which takes a port number).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn with_deadlines(sock: &TcpStream) {
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    sock.set_write_timeout(Some(DEADLINE)).expect("timeout");
}

/// Sends `ping` and reads one line back.
fn ping<S: Read + std::io::Write>(tls: &mut S) -> std::io::Result<String> {
    tls.write_all(b"ping\n")?;
    tls.flush()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        if tls.read(&mut byte)? == 0 {
            break;
        }
        reply.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Our rustls client, presenting `pki.client` and trusting `trusted`, against an
/// `openssl s_server` presenting `server.server` and trusting `server_trusts`. Returns the
/// server's SPIFFE ID and its reply, or the error, plus `s_server`'s output.
fn rustls_client_vs_s_server(
    pki: &Pki,
    trusted: &Pki,
    server: &Pki,
    server_trusts: &Pki,
) -> (Result<(SpiffeId, String), String>, String) {
    let port = free_port();
    let mut args: Vec<String> = [
        "s_server",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-tls1_3",
        "-Verify",
        "1",
        "-naccept",
        "1",
        "-rev",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.extend(server.openssl_identity("server", server_trusts));
    let mut s_server = Openssl::spawn(&args);
    assert!(
        s_server.wait_for("ACCEPT"),
        "s_server did not start:\n{}",
        s_server.finish()
    );

    let config = client_config(
        &pki.client,
        Arc::clone(&trusted.bundles),
        PeerAuthorizer::Exactly(spiffe_id(SERVER_ID)),
    )
    .expect("client config");
    let name = ServerName::try_from("spiffe").expect("name");
    let conn = ClientConnection::new(Arc::new(config), name).expect("client");
    let sock = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    with_deadlines(&sock);
    let mut tls = StreamOwned::new(conn, sock);
    let result = (|| {
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        let reply = ping(&mut tls)?;
        let id = peer_spiffe_id(&tls.conn).map_err(std::io::Error::other)?;
        tls.conn.send_close_notify();
        let _ = tls.conn.complete_io(&mut tls.sock);
        Ok::<_, std::io::Error>((id, reply))
    })()
    .map_err(|e| e.to_string());
    drop(tls);
    (result, s_server.finish())
}

/// `openssl s_client` presenting `client.client` and trusting `client_trusts`, against our
/// rustls server presenting `pki.server` and trusting `trusted`. Returns the client's SPIFFE
/// ID as our server saw it (or the error), plus `s_client`'s output.
fn s_client_vs_rustls_server(
    pki: &Pki,
    trusted: &Pki,
    client: &Pki,
    client_trusts: &Pki,
) -> (Result<SpiffeId, String>, String) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config = server_config(
        &pki.server,
        Arc::clone(&trusted.bundles),
        PeerAuthorizer::Exactly(spiffe_id(CLIENT_ID)),
    )
    .expect("server config");
    let mut args: Vec<String> = [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-tls1_3",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.extend(client.openssl_identity("client", client_trusts));
    let mut s_client = Openssl::spawn(&args);
    if let Some(stdin) = s_client.stdin.as_mut() {
        // s_client sends this once connected; our server answers and closes.
        stdin.write_all(b"ping\n").expect("write to s_client");
    }

    listener.set_nonblocking(true).expect("nonblocking");
    let end = Instant::now() + DEADLINE;
    let sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection from s_client ({e}):\n{}", s_client.finish()),
        }
    };
    sock.set_nonblocking(false).expect("blocking");
    with_deadlines(&sock);
    let conn = ServerConnection::new(Arc::new(config)).expect("server");
    let mut tls = StreamOwned::new(conn, sock);
    let result = (|| {
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        let id = peer_spiffe_id(&tls.conn).map_err(std::io::Error::other)?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') && tls.read(&mut byte)? == 1 {
            line.push(byte[0]);
        }
        assert_eq!(line, b"ping\n", "s_client sent something else");
        tls.write_all(b"pong\n")?;
        tls.conn.send_close_notify();
        tls.conn.complete_io(&mut tls.sock)?;
        Ok::<_, std::io::Error>(id)
    })()
    .map_err(|e| e.to_string());
    drop(tls);
    (result, s_client.finish())
}

#[test]
fn rustls_client_completes_mtls_with_openssl_s_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "ours");
    let (result, output) = rustls_client_vs_s_server(&pki, &pki, &pki, &pki);
    let (id, reply) = result.unwrap_or_else(|e| panic!("handshake failed: {e}\n{output}"));
    assert_eq!(id, spiffe_id(SERVER_ID));
    assert_eq!(reply, "gnip\n", "s_server -rev echoes reversed");
    assert!(output.contains("Protocol version: TLSv1.3"), "{output}");
    assert!(output.contains("Verification: OK"), "{output}");
}

#[test]
fn openssl_s_client_completes_mtls_with_rustls_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "ours");
    let (result, output) = s_client_vs_rustls_server(&pki, &pki, &pki, &pki);
    let id = result.unwrap_or_else(|e| panic!("handshake failed: {e}\n{output}"));
    assert_eq!(id, spiffe_id(CLIENT_ID));
    assert!(output.contains("Verify return code: 0 (ok)"), "{output}");
    assert!(output.contains("pong"), "{output}");
    assert!(output.contains("New, TLSv1.3"), "{output}");
}

#[test]
fn rustls_client_refuses_an_s_server_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, other) = (Pki::new(tmp.path(), "ours"), Pki::new(tmp.path(), "other"));
    // Same trust domain and IDs, different root: only the issuing CA is wrong.
    let (result, output) = rustls_client_vs_s_server(&ours, &ours, &other, &ours);
    let err = result.expect_err("accepted a server from another CA");
    // Same issuer names, so webpki finds the candidate issuer and the signature fails.
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "{err}\n{output}"
    );
}

#[test]
fn openssl_s_server_refuses_a_rustls_client_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, other) = (Pki::new(tmp.path(), "ours"), Pki::new(tmp.path(), "other"));
    // Our client trusts the server, but presents an SVID the server's bundle did not issue.
    let (result, output) = rustls_client_vs_s_server(&other, &ours, &ours, &ours);
    let err = result.expect_err("s_server accepted a client from another CA");
    assert!(err.contains("alert"), "{err}\n{output}");
    assert!(
        output.contains("unable to get local issuer certificate"),
        "{output}"
    );
}

#[test]
fn rustls_server_refuses_an_s_client_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, other) = (Pki::new(tmp.path(), "ours"), Pki::new(tmp.path(), "other"));
    let (result, output) = s_client_vs_rustls_server(&ours, &ours, &other, &ours);
    let err = result.expect_err("accepted a client from another CA");
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "{err}\n{output}"
    );
    assert!(output.contains("alert"), "{output}");
    assert!(!output.contains("pong"), "{output}");
}

#[test]
fn openssl_s_client_refuses_a_rustls_server_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, other) = (Pki::new(tmp.path(), "ours"), Pki::new(tmp.path(), "other"));
    let (result, output) = s_client_vs_rustls_server(&other, &ours, &ours, &ours);
    let err = result.expect_err("s_client accepted a server from another CA");
    assert!(err.contains("alert"), "{err}\n{output}");
    assert!(
        output.contains("unable to get local issuer certificate"),
        "{output}"
    );
    assert!(!output.contains("pong"), "{output}");
}

//! Privileged tests of the kernel datapath: real programs attached to a scratch cgroup, real
//! processes (the python test client) inside it, traffic on loopback and in test namespaces.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use enforcer::{
    kernel::{
        Counter, DaemonConfig, EventKind, EventReader, KernelEvent, Original, PolicyAction,
        PolicyMode, PolicyRule, PolicyTable,
    },
    testing::{Client, Netns, ScratchCgroup, ScratchDatapath, require_root, serial},
};

/// The daemon's socket mark in these tests.
const MARK: u32 = 0x0e5f_0001;
/// How long to wait for an event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Identity numbers used by the tests.
const CLIENT_ID: u32 = 11;
const SERVER_ID: u32 = 22;

/// A scope cgroup with the datapath attached, an enrolled child cgroup `app`, an unenrolled
/// child `other`, and an outbound listener on 127.0.0.1 (and `[::1]`, same port).
struct Fixture {
    app: ScratchCgroup,
    other: ScratchCgroup,
    datapath: ScratchDatapath,
    outbound4: TcpListener,
    outbound6: TcpListener,
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn fixture_with(adjust: impl FnOnce(&mut enforcer::kernel::DatapathOptions)) -> Fixture {
    require_root();
    let scope = ScratchCgroup::new("scope");
    let app = scope.child("app");
    let other = scope.child("other");
    let mut datapath = ScratchDatapath::install_with(&scope, adjust);
    let (outbound4, outbound6) = dual_listeners();
    let port = outbound4.local_addr().unwrap().port();
    datapath.maps_mut().enroll(app.id()).expect("enroll app");
    datapath.serve_on_loopback(port, MARK);
    Fixture {
        app,
        other,
        datapath,
        outbound4,
        outbound6,
    }
}

/// Listeners on `127.0.0.1:P` and `[::1]:P` for one free port P.
fn dual_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(("::1", port)) {
            return (v4, v6);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

fn events(datapath: &ScratchDatapath) -> EventReader {
    let mut reader = datapath.events().expect("open events");
    drop(reader.drain());
    reader
}

fn wait_event(
    reader: &mut EventReader,
    what: &str,
    want: impl FnMut(&KernelEvent) -> bool,
) -> KernelEvent {
    reader
        .wait_for(EVENT_TIMEOUT, want)
        .unwrap_or_else(|| panic!("no {what} event within {EVENT_TIMEOUT:?}"))
}

fn deny_table(version: u64, port: u16) -> PolicyTable {
    PolicyTable {
        version,
        mode: PolicyMode::Enforce,
        rules: vec![PolicyRule {
            src_id: CLIENT_ID,
            dst_id: SERVER_ID,
            port: Some(port),
            action: PolicyAction::Deny,
            rule: 42,
        }],
    }
}

fn allow_table(version: u64) -> PolicyTable {
    PolicyTable {
        version,
        mode: PolicyMode::Enforce,
        rules: vec![PolicyRule {
            src_id: CLIENT_ID,
            dst_id: SERVER_ID,
            port: None,
            action: PolicyAction::Allow,
            rule: 7,
        }],
    }
}

/// A server on loopback owned by `SERVER_ID` and a client in `app` attested as `CLIENT_ID`,
/// under the policy `table(server port)`.
struct KnownPair {
    /// Kept open so the port stays the server's.
    _server: TcpListener,
    addr: SocketAddr,
    client: Client,
}

impl KnownPair {
    fn connect(&mut self) -> String {
        self.client
            .ask(&format!("connect 127.0.0.1 {}", self.addr.port()))
    }
}

fn known_pair(fx: &mut Fixture, table: impl FnOnce(u16) -> PolicyTable) -> KnownPair {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let client = Client::start(Some(&fx.app), None);
    let maps = fx.datapath.maps_mut();
    maps.set_identity(client.pid(), CLIENT_ID).unwrap();
    maps.set_service(addr, SERVER_ID).unwrap();
    maps.apply_policy(&table(addr.port())).unwrap();
    KnownPair {
        _server: server,
        addr,
        client,
    }
}

/// Send `command` (a connect the hooks must redirect), accept the connection on `listener`
/// and return it with the original destination the kernel recorded for it.
fn redirected(
    fx: &Fixture,
    client: &mut Client,
    command: &str,
    listener: &TcpListener,
) -> (std::net::TcpStream, Original) {
    let answer = client.ask(command);
    assert!(
        answer.starts_with("ok "),
        "{command}: must be redirected: {answer}"
    );
    let conn = accept(listener);
    let peer = conn.peer_addr().unwrap();
    let original = fx
        .datapath
        .maps()
        .original(peer)
        .unwrap()
        .unwrap_or_else(|| panic!("{command}: no original destination recorded for {peer}"));
    (conn, original)
}

/// Accept one connection on `listener` within a few seconds.
fn accept(listener: &TcpListener) -> std::net::TcpStream {
    listener.set_nonblocking(true).unwrap();
    for _ in 0..500 {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("accept failed: {error}"),
        }
    }
    panic!(
        "no connection arrived at {}",
        listener.local_addr().unwrap()
    );
}

#[test]
fn denied_triple_fails_with_eperm_and_a_deny_event() {
    let _serial = serial();
    let mut fx = fixture();
    let mut pair = known_pair(&mut fx, |port| deny_table(7, port));
    let mut reader = events(&fx.datapath);

    assert_eq!(pair.connect(), "err 1", "connect must fail with EPERM");

    let event = wait_event(&mut reader, "DENY", |e| e.kind == EventKind::Deny);
    assert_eq!(event.tgid, pair.client.pid());
    assert_eq!(event.cgroup_id, fx.app.id());
    assert_eq!((event.src_id, event.dst_id), (CLIENT_ID, SERVER_ID));
    assert_eq!(event.dst, pair.addr);
    assert_eq!((event.rule, event.policy_version), (42, 7));
    assert!(fx.datapath.maps().counter(Counter::Deny).unwrap() >= 1);
}

#[test]
fn known_pair_without_a_rule_is_denied_by_default() {
    let _serial = serial();
    let mut fx = fixture();
    // A rule for another port only.
    let mut pair = known_pair(&mut fx, |_| deny_table(3, 1));
    assert_eq!(pair.connect(), "err 1");
}

#[test]
fn audit_mode_lets_a_denied_flow_through_and_flags_it() {
    let _serial = serial();
    let mut fx = fixture();
    let mut pair = known_pair(&mut fx, |port| PolicyTable {
        mode: PolicyMode::Audit,
        ..deny_table(9, port)
    });
    let mut reader = events(&fx.datapath);

    let answer = pair.connect();
    assert!(answer.starts_with("ok "), "audit mode must allow: {answer}");
    let event = wait_event(&mut reader, "AUDIT", |e| e.kind == EventKind::Audit);
    assert_eq!(
        (event.tgid, event.rule, event.policy_version),
        (pair.client.pid(), 42, 9)
    );
    // Allowed flows of enrolled workloads still go through the daemon.
    let conn = accept(&fx.outbound4);
    let original = fx
        .datapath
        .maps()
        .original(conn.peer_addr().unwrap())
        .unwrap()
        .expect("audited flow is redirected and recorded");
    assert_eq!(original.dst, pair.addr);
    assert_eq!(original.audit_rule, 42);
}

#[test]
fn redirected_connect_lands_on_the_listener_which_recovers_the_original_destination() {
    let _serial = serial();
    let fx = fixture();
    let mut client = Client::start(Some(&fx.app), None);
    let mut reader = events(&fx.datapath);

    // 127.0.0.2:4242 has no listener: only the redirect can make this connect succeed.
    let (conn, original) = redirected(&fx, &mut client, "connect 127.0.0.2 4242", &fx.outbound4);
    let peer = conn.peer_addr().unwrap();
    assert_eq!(
        original.dst,
        "127.0.0.2:4242".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(original.tgid, client.pid());
    assert_eq!(original.cgroup_id, fx.app.id());

    let event = wait_event(&mut reader, "REDIRECT", |e| e.kind == EventKind::Redirect);
    assert_eq!(event.cookie, original.cookie);
    assert_eq!(event.tgid, client.pid());
    assert_eq!(event.dst, original.dst);

    // sock_ops removes the record when the client's socket closes.
    drop(client);
    drop(conn);
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        fx.datapath.maps().original(peer).unwrap().is_none()
    });
    assert!(gone, "the record of {peer} outlived its socket");
}

#[test]
fn ipv6_and_v4_mapped_connects_are_redirected_to_the_matching_listener() {
    let _serial = serial();
    let fx = fixture();
    let mut client = Client::start(Some(&fx.app), None);

    let (_conn, original) = redirected(&fx, &mut client, "connect ::1 4243", &fx.outbound6);
    assert_eq!(original.dst, "[::1]:4243".parse::<SocketAddr>().unwrap());
    assert_eq!(original.tgid, client.pid());

    let command = "connect ::ffff:127.0.0.2 4244 --v6";
    let (_conn, original) = redirected(&fx, &mut client, command, &fx.outbound4);
    assert_eq!(
        original.dst,
        "127.0.0.2:4244".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(original.tgid, client.pid());
}

#[test]
fn unenrolled_cgroups_and_the_daemon_pass_untouched() {
    let _serial = serial();
    let mut fx = fixture();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let before = fx.datapath.maps().counter(Counter::PassUnenrolled).unwrap();

    let mut outsider = Client::start(Some(&fx.other), None);
    assert!(
        outsider
            .ask(&format!("connect 127.0.0.1 {port}"))
            .starts_with("ok ")
    );
    drop(accept(&server));
    assert!(fx.datapath.maps().counter(Counter::PassUnenrolled).unwrap() > before);

    // An enrolled process that is the daemon also passes.
    let mut daemon = Client::start(Some(&fx.app), None);
    let mut config = fx.datapath.maps().config().unwrap();
    config.daemon_tgid = daemon.pid();
    fx.datapath
        .maps_mut()
        .set_config(&DaemonConfig {
            daemon_tgid: daemon.pid(),
            tunnel_mark: config.tunnel_mark,
            outbound_v4: Some(Ipv4Addr::LOCALHOST),
            outbound_v6: Some(Ipv6Addr::LOCALHOST),
            outbound_port: config.outbound_port,
        })
        .unwrap();
    assert!(
        daemon
            .ask(&format!("connect 127.0.0.1 {port}"))
            .starts_with("ok ")
    );
    drop(accept(&server));
    assert!(fx.datapath.maps().counter(Counter::PassDaemon).unwrap() >= 1);
    // Nothing reached the outbound listener.
    fx.outbound4.set_nonblocking(true).unwrap();
    assert!(fx.outbound4.accept().is_err());
}

#[test]
fn ingress_bypass_is_dropped_and_daemon_marked_traffic_passes() {
    let _serial = serial();
    let fx = fixture();
    let node = Netns::new("node");
    let mut reader = events(&fx.datapath);

    let mut workload = Client::start(Some(&fx.app), Some(&node));
    assert_eq!(workload.ask("listen 0.0.0.0 8080"), "listening 8080");
    let bind = wait_event(&mut reader, "BIND", |e| e.kind == EventKind::Bind);
    assert_eq!((bind.tgid, bind.src.port()), (workload.pid(), 8080));

    // An unprivileged local process, even one binding the daemon's source address, is dropped.
    let mut attacker = Client::start(None, Some(&node));
    assert_eq!(attacker.ask("user 65534"), "user 65534");
    assert_eq!(
        attacker.ask("mark 0x0e5f0001"),
        "mark err 1",
        "SO_MARK must need privilege"
    );
    assert_eq!(attacker.ask("connect 127.0.0.1 8080"), "err timeout");
    let drop_event = wait_event(&mut reader, "DROP", |e| e.kind == EventKind::Drop);
    assert_eq!(drop_event.dst.port(), 8080);
    assert_eq!(drop_event.tgid, workload.pid());
    assert_eq!(drop_event.cgroup_id, fx.app.id());
    assert_eq!(
        drop_event.src.ip(),
        std::net::IpAddr::from(Ipv4Addr::LOCALHOST)
    );
    assert_eq!(
        attacker.ask("connect 127.0.0.1 8080 --bind 127.0.0.1"),
        "err timeout"
    );

    // The daemon's marked socket gets through.
    let mut daemon = Client::start(None, Some(&node));
    let answer = daemon.ask(&format!("connect 127.0.0.1 8080 --mark {MARK:#x}"));
    assert!(
        answer.starts_with("ok "),
        "marked connect must pass: {answer}"
    );
    assert!(workload.next_line().starts_with("accepted 127.0.0.1"));
    assert!(fx.datapath.maps().counter(Counter::Drop).unwrap() >= 1);
}

#[test]
fn exec_revokes_the_identity_and_is_reported() {
    let _serial = serial();
    let mut fx = fixture();
    let mut client = Client::start(Some(&fx.app), None);
    let pid = client.pid();
    fx.datapath.maps_mut().set_identity(pid, CLIENT_ID).unwrap();
    let mut reader = events(&fx.datapath);

    client.send("exec sleep 30");
    let event = wait_event(&mut reader, "EXEC", |e| e.kind == EventKind::Exec);
    assert_eq!(event.tgid, pid);
    assert_eq!(event.src_id, CLIENT_ID);
    assert_eq!(event.cgroup_id, fx.app.id());
    assert_eq!(fx.datapath.maps().identity(pid).unwrap(), None);

    drop(client);
    let event = wait_event(&mut reader, "EXIT", |e| e.kind == EventKind::Exit);
    assert_eq!(event.tgid, pid);
}

#[test]
fn pins_survive_a_daemon_restart_and_are_readopted() {
    let _serial = serial();
    let mut fx = fixture();
    let mut pair = known_pair(&mut fx, |port| deny_table(5, port));

    // The daemon is gone: every handle closed. Enforcement continues.
    fx.datapath.stop();
    assert_eq!(
        pair.connect(),
        "err 1",
        "fail-closed while the daemon is down"
    );

    fx.datapath.restart();
    let maps = fx.datapath.maps_mut();
    assert_eq!(maps.active_policy().unwrap().version, 5);
    assert_eq!(maps.identity(pair.client.pid()).unwrap(), Some(CLIENT_ID));
    maps.apply_policy(&allow_table(6)).unwrap();
    assert!(pair.connect().starts_with("ok "));
    drop(accept(&fx.outbound4));
}

#[test]
fn lost_events_are_counted_when_the_ring_buffer_is_full() {
    let _serial = serial();
    let mut fx = fixture_with(|options| options.ring_bytes = 4096);
    let mut pair = known_pair(&mut fx, |port| deny_table(1, port));

    // Nobody reads: 200 DENY events of 104 bytes cannot fit in 4 KiB.
    let command = format!("connect_many 200 127.0.0.1 {}", pair.addr.port());
    assert_eq!(pair.client.ask(&command), "done 0 200 0");
    let lost = fx.datapath.maps().counter(Counter::LostEvents).unwrap();
    assert!(lost > 0, "lost-event counter did not rise");
    assert_eq!(fx.datapath.maps().counter(Counter::Deny).unwrap(), 200);
}

#[test]
fn a_staged_policy_takes_effect_only_when_its_slot_is_activated() {
    let _serial = serial();
    let mut fx = fixture();
    let mut pair = known_pair(&mut fx, |port| deny_table(1, port));

    let staged = fx
        .datapath
        .maps_mut()
        .stage_policy(&allow_table(2))
        .unwrap();
    assert_eq!(
        pair.connect(),
        "err 1",
        "a staged policy must not be visible"
    );
    fx.datapath.maps_mut().activate_slot(staged).unwrap();
    assert!(pair.connect().starts_with("ok "));
    drop(accept(&fx.outbound4));
}

#[test]
fn concurrent_swaps_never_mix_rules_and_version() {
    let _serial = serial();
    let mut fx = fixture();
    let mut pair = known_pair(&mut fx, |port| deny_table(1, port));
    let pin_dir = fx.datapath.pin_dir().to_owned();
    let mut reader = events(&fx.datapath);

    // Odd versions deny, even versions allow; a writer flips between them while the client
    // connects. A DENY stamped with an even version would be a torn swap.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let port = pair.addr.port();
        std::thread::spawn(move || {
            let mut datapath = enforcer::kernel::Datapath::adopt(&pin_dir).unwrap();
            let mut version = 1;
            while !stop.load(Ordering::Relaxed) && version < 400 {
                version += 1;
                let table = if version % 2 == 0 {
                    allow_table(version)
                } else {
                    deny_table(version, port)
                };
                datapath.maps_mut().apply_policy(&table).unwrap();
            }
            version
        })
    };
    let command = format!("connect_many 200 127.0.0.1 {}", pair.addr.port());
    let answer = pair.client.ask(&command);
    stop.store(true, Ordering::Relaxed);
    let last_version = writer.join().unwrap();
    assert!(answer.starts_with("done "), "{answer}");

    let mut denies = 0;
    let mut redirects = 0;
    for event in reader.drain().into_iter().map(Result::unwrap) {
        match event.kind {
            EventKind::Deny => {
                denies += 1;
                assert_eq!(
                    event.policy_version % 2,
                    1,
                    "DENY under allow version {event:?}"
                );
            }
            EventKind::Redirect => {
                redirects += 1;
                assert_eq!(
                    event.policy_version % 2,
                    0,
                    "REDIRECT under deny version {event:?}"
                );
            }
            _ => {}
        }
    }
    assert_eq!(
        denies + redirects,
        200,
        "one decision per connect (writer reached {last_version})"
    );
}

#[test]
fn a_port_bound_before_attestation_takes_its_owners_identity() {
    let _serial = serial();
    let mut fx = fixture();
    let mut server = Client::start(Some(&fx.app), None);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        server.ask(&format!("listen 127.0.0.1 {port}")),
        format!("listening {port}")
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let bound = fx
        .datapath
        .maps()
        .service(addr)
        .unwrap()
        .expect("bind registered the port");
    assert_eq!((bound.tgid, bound.identity), (server.pid(), 0));

    let mut client = Client::start(Some(&fx.app), None);
    let maps = fx.datapath.maps_mut();
    maps.set_identity(server.pid(), SERVER_ID).unwrap();
    maps.set_identity(client.pid(), CLIENT_ID).unwrap();
    assert_eq!(maps.service(addr).unwrap().unwrap().identity, SERVER_ID);
    maps.apply_policy(&deny_table(4, port)).unwrap();
    assert_eq!(client.ask(&format!("connect 127.0.0.1 {port}")), "err 1");
}

//! `cargo xtask demo`: the kernel datapath on one screen.
//!
//! Creates a scratch cgroup, attaches the programs, enrolls a child cgroup with two workloads
//! (`web`, a client, and `api`, a server), runs a small stand-in for the daemon's outbound
//! side (accept, recover the original destination from the kernel, connect onwards with the
//! tunnel mark), then shows: an allowed flow, a denied flow, a bypass attempt, an exec that
//! revokes an identity, and a policy swap that flips a decision. Everything is removed at the
//! end, also on failure. Needs root.
#![expect(
    unused_crate_dependencies,
    reason = "an example uses the library, not every dependency"
)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use enforcer::{
    kernel::{
        Counter, Datapath, EventKind, EventReader, PolicyAction, PolicyMode, PolicyRule,
        PolicyTable, cgroup::cgroup2_mount, mark::connect_marked,
    },
    testing::{Client, ScratchCgroup, ScratchDatapath, require_root},
};

const MARK: u32 = 0x0e5f_0001;
const WEB: u32 = 1;
const API: u32 = 2;
const DB: u32 = 3;

fn main() {
    require_root();
    println!("enforcer datapath demo");
    let scope = ScratchCgroup::new("demo");
    let app = scope.child("app");
    let mut datapath = ScratchDatapath::install(&scope);
    println!(
        "  attached 8 programs to {} (cgroup v2 at {}), pinned at {}",
        scope.path().display(),
        cgroup2_mount()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        datapath.pin_dir().display()
    );
    let outbound = TcpListener::bind("127.0.0.1:0").expect("bind outbound listener");
    let outbound_port = outbound.local_addr().expect("addr").port();
    datapath.maps_mut().enroll(app.id()).expect("enroll");
    datapath.serve_on_loopback(outbound_port, MARK);
    println!(
        "  enrolled {}; outbound listener 127.0.0.1:{outbound_port}",
        app.path().display()
    );
    spawn_outbound(outbound, datapath.pin_dir().to_owned());
    let mut events = datapath.events().expect("events");

    let api_port = free_port();
    let mut api = Client::start(Some(&app), None);
    api.ask(&format!("listen 127.0.0.1 {api_port}"));
    let mut web = Client::start(Some(&app), None);
    let db: SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    let maps = datapath.maps_mut();
    maps.set_identity(web.pid(), WEB).expect("identity");
    maps.set_identity(api.pid(), API).expect("identity");
    maps.set_service(db, DB).expect("service");
    maps.apply_policy(&policy(1, PolicyAction::Allow))
        .expect("policy");
    println!(
        "  web (pid {}) = identity {WEB}, api (pid {}, port {api_port}) = identity {API}, \
         db 127.0.0.1:5432 = identity {DB}; policy v1: web->api allowed, web->db denied",
        web.pid(),
        api.pid()
    );
    println!();

    let answer = web.ask(&format!("connect 127.0.0.1 {api_port}"));
    let accepted = api.next_line();
    println!(
        "1. web -> api:{api_port}      {answer:<8} api saw: {accepted} (through the daemon's marked socket)"
    );
    show(&mut events, EventKind::Redirect);

    let answer = web.ask("connect 127.0.0.1 5432");
    println!(
        "2. web -> db:5432        {answer:<8} (errno 1 = EPERM: refused at connect(), no packet sent)"
    );
    show(&mut events, EventKind::Deny);

    let mut intruder = Client::start(None, None);
    intruder.ask("user 65534");
    let answer = intruder.ask(&format!("connect 127.0.0.1 {api_port} --bind 127.0.0.1"));
    println!(
        "3. bypass -> api:{api_port}   {answer:<8} (unprivileged, not enrolled: SYN dropped in the kernel)"
    );
    show(&mut events, EventKind::Drop);

    let mut impostor = Client::start(Some(&app), None);
    datapath
        .maps_mut()
        .set_identity(impostor.pid(), WEB)
        .expect("identity");
    drop(events.drain());
    let impostor_pid = impostor.pid();
    impostor.send("exec sleep 60");
    let exec = events.wait_for(Duration::from_secs(5), |event| {
        event.kind == EventKind::Exec && event.tgid == impostor_pid
    });
    let left = datapath.maps().identity(impostor.pid()).expect("identity");
    println!(
        "4. pid {} (identity {WEB}) execs sleep: identity now {left:?} (revoked in the kernel at exec)",
        exec.map_or(0, |e| e.tgid)
    );

    datapath
        .maps_mut()
        .apply_policy(&policy(2, PolicyAction::Deny))
        .expect("policy");
    let answer = web.ask(&format!("connect 127.0.0.1 {api_port}"));
    println!("5. policy v2 (atomic swap) denies web->api: web -> api:{api_port} {answer}");
    show(&mut events, EventKind::Deny);

    println!();
    let maps = datapath.maps();
    let counters: Vec<String> = [
        Counter::Redirect,
        Counter::Deny,
        Counter::Drop,
        Counter::Exec,
    ]
    .into_iter()
    .map(|c| format!("{}={}", c.name(), maps.counter(c).unwrap_or(0)))
    .collect();
    println!("counters: {}", counters.join(" "));
    drop(impostor);
    drop(datapath);
    println!("cleaned up: programs detached, pins and cgroups removed");
}

fn policy(version: u64, web_to_api: PolicyAction) -> PolicyTable {
    let rule = |dst_id, action, rule| PolicyRule {
        src_id: WEB,
        dst_id,
        port: None,
        action,
        rule,
    };
    PolicyTable {
        version,
        mode: PolicyMode::Enforce,
        rules: vec![rule(API, web_to_api, 1), rule(DB, PolicyAction::Deny, 2)],
    }
}

/// Wait for the next event of `kind` and print it.
fn show(events: &mut EventReader, kind: EventKind) {
    if let Some(event) = events.wait_for(Duration::from_secs(5), |event| event.kind == kind) {
        println!(
            "   event {:?}: pid {} cgroup {} {} -> {} ids {}->{} rule {} policy v{}",
            event.kind,
            event.tgid,
            event.cgroup_id,
            event.src,
            event.dst,
            event.src_id,
            event.dst_id,
            event.rule,
            event.policy_version
        );
    } else {
        println!("   (no {kind:?} event)");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// The stand-in for the daemon's outbound side: recover where the client meant to go, connect
/// there with the tunnel mark (so the ingress hook lets it in) and relay one exchange.
fn spawn_outbound(listener: TcpListener, pin_dir: std::path::PathBuf) {
    thread::spawn(move || {
        let datapath = Datapath::adopt(&pin_dir).expect("adopt");
        for stream in listener.incoming().flatten() {
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let Ok(Some(original)) = datapath.maps().original(peer) else {
                continue;
            };
            if let Ok(upstream) = connect_marked(original.dst, MARK) {
                relay(stream, upstream);
            }
        }
    });
}

fn relay(mut client: TcpStream, mut upstream: TcpStream) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = upstream.read(&mut buf) {
            if n == 0 || client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

//! Privileged tests of the `enforcer` binary's datapath commands.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{net::TcpListener, process::Command};

use enforcer::testing::{ScratchCgroup, ScratchDatapath, WorkloadClient, require_root, serial};

fn enforcer(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .output()
        .expect("run enforcer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A control socket path nothing listens on.
const NO_DAEMON: &str = "/nonexistent/enforcer/control.sock";

#[test]
fn status_reports_and_uninstall_detaches_everything() {
    let _serial = serial();
    require_root();
    let scope = ScratchCgroup::new("cli");
    let app = scope.child("app");
    let mut datapath = ScratchDatapath::install(&scope);
    datapath.maps_mut().enroll(app.id()).unwrap();
    let pin_dir = datapath.pin_dir().to_str().unwrap().to_owned();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let connect = format!("connect 127.0.0.1 {}", server.local_addr().unwrap().port());

    // No outbound listener is configured: enrolled traffic fails closed.
    let mut client = WorkloadClient::start(Some(&app), None);
    assert_eq!(client.ask(&connect), "err 1");

    // No daemon answers: status says so, shows the pinned datapath, and exits 1.
    let (ok, text) = enforcer(&["status", "--socket", NO_DAEMON, "--pin-dir", &pin_dir]);
    assert!(!ok, "{text}");
    assert!(text.contains("daemon: not running"), "{text}");
    assert!(text.contains("datapath: installed"), "{text}");
    assert!(text.contains("no_listener"), "{text}");

    let (ok, text) = enforcer(&["uninstall", "--pin-dir", &pin_dir]);
    assert!(ok, "{text}");
    assert!(!std::path::Path::new(&pin_dir).exists(), "pins left behind");
    // Detached: the same connect now reaches the server untouched.
    assert!(client.ask(&connect).starts_with("ok "));

    let (ok, text) = enforcer(&["status", "--socket", NO_DAEMON, "--pin-dir", &pin_dir]);
    assert!(!ok, "{text}");
    assert!(text.contains("not installed"), "{text}");
    let (ok, text) = enforcer(&["uninstall", "--pin-dir", &pin_dir]);
    assert!(ok, "uninstalling nothing is not an error: {text}");
}

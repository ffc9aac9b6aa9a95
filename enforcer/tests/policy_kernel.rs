//! A policy file, end to end on a real kernel: parse -> compile -> program the datapath ->
//! attest real processes -> registry -> identity numbers -> `connect()` decided in the kernel.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::net::TcpListener;

use enforcer::{
    attest::{AttestOptions, Attestor, cgroup_relative_path},
    kernel::cgroup2_mount,
    policy::{self, Compiled, Identification, Policy, Registry, apply, compile},
    testing::{ScratchCgroup, ScratchDatapath, WorkloadClient, require_root, serial},
};

/// The daemon's inbound port (nobody listens on it here).
const INBOUND_PORT: u16 = 15_008;

fn policy_text(scope: &str, action: &str, port: u16) -> String {
    format!(
        r#"
trust_domain = "e2e.local"
enroll = ["{scope}"]

[[workload]]
id = "spiffe://e2e.local/web"
selectors = ["cgroup:path:{scope}/web"]

[[workload]]
id = "spiffe://e2e.local/api"
selectors = ["cgroup:path:{scope}/api"]

[[{action}]]
from = "spiffe://e2e.local/web"
to = "spiffe://e2e.local/api"
ports = [{port}]

[[egress]]
cidr = "127.0.0.3/32"
"#
    )
}

/// Attest `pid` and give it its policy identity number in the kernel.
fn attest_into_kernel(
    datapath: &mut ScratchDatapath,
    attestor: &Attestor,
    registry: &Registry,
    compiled: &Compiled,
    pid: u32,
) {
    let facts = attestor.attest(pid).expect("attest");
    let Identification::Matched { id, .. } = registry.identify(&facts) else {
        panic!("pid {pid} ({}) matched no single workload", facts.cgroup);
    };
    let number = compiled.numbers.get(&id).expect("numbered");
    let maps = datapath.maps_mut();
    let generation = maps.generation(pid).expect("generation");
    maps.set_identity(pid, number, generation)
        .expect("identity");
}

fn load(text: &str) -> Policy {
    policy::parse("e2e.toml", text.as_bytes())
        .expect("valid policy")
        .0
}

#[test]
fn a_policy_file_decides_connects_in_the_kernel_and_a_reload_flips_it() {
    let _serial = serial();
    require_root();
    let mount = cgroup2_mount().unwrap();
    let scope = ScratchCgroup::new("e2e");
    let web = scope.child("web");
    let api = scope.child("api");
    let scope_path = cgroup_relative_path(&mount, scope.path()).unwrap();
    let mut datapath = ScratchDatapath::install(&scope);
    let netns = datapath.netns().clone();
    let (outbound4, outbound6) = netns.within(|| {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        (v4, TcpListener::bind(("::1", port)).unwrap())
    });
    let outbound_port = outbound4.local_addr().unwrap().port();
    datapath.serve_on_loopback(outbound_port, INBOUND_PORT, (&outbound4, &outbound6));

    // The namespace is new: any port is free.
    let port = 8080;
    let denying = load(&policy_text(&scope_path, "deny", port));
    let compiled = compile(&denying, None, 1);
    let report = apply(datapath.maps_mut(), &denying, &compiled, &mount).unwrap();
    assert!(report.missing_cgroups.is_empty(), "{report:?}");

    // Both workloads start after enrollment, so the listen hook records api's port.
    let mut server = WorkloadClient::start(Some(&api), Some(&netns));
    assert_eq!(
        server.ask(&format!("listen 127.0.0.1 {port}")),
        format!("listening {port}")
    );
    let mut client = WorkloadClient::start(Some(&web), Some(&netns));
    let attestor = Attestor::new(AttestOptions::default());
    let registry = Registry::new(denying.workloads.clone());
    for pid in [server.pid(), client.pid()] {
        attest_into_kernel(&mut datapath, &attestor, &registry, &compiled, pid);
    }
    let connect = format!("connect 127.0.0.1 {port}");
    assert_eq!(
        client.ask(&connect),
        "err 1",
        "the deny rule refuses at connect()"
    );
    // Plaintext egress from the policy passes untouched (nothing listens there: refused).
    assert_eq!(client.ask("connect 127.0.0.3 9"), "err 111");

    // Reload: the same identities keep their numbers, and the flow is now allowed.
    let allowing = load(&policy_text(&scope_path, "allow", port));
    let recompiled = compile(&allowing, Some(&compiled.numbers), 2);
    for workload in &allowing.workloads {
        assert_eq!(
            compiled.numbers.get(&workload.id),
            recompiled.numbers.get(&workload.id)
        );
    }
    apply(datapath.maps_mut(), &allowing, &recompiled, &mount).unwrap();
    assert!(
        client.ask(&connect).starts_with("ok "),
        "allowed flows are redirected"
    );
    assert_eq!(datapath.maps().active_policy().unwrap().version, 2);
}

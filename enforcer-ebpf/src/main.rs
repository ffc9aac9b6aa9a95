//! enforcer's eBPF programs. Each program entry point is thin: it calls a `try_*` function in
//! its module and maps the result to the hook's return code. The logic lives in small modules:
//! `maps` (definitions), `state` (reads of them), `emit` (events and counters), `enroll` (is
//! this cgroup enrolled?), `connect`, `bind` (the daemon's ports), `sockets` (creation),
//! `sockops` (listeners, redirected sockets), `steer` (`sk_lookup`), `ingress`, `egress`,
//! `lifecycle` (exec, exit, cgroups).
//!
//! On the host (clippy, `cargo test`) this binary is empty: the programs only exist for
//! `bpfel-unknown-none`, where `enforcer/build.rs` builds them with aya-build.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    not(target_arch = "bpf"),
    expect(
        unused_crate_dependencies,
        reason = "the host build of the programs binary is empty"
    )
)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

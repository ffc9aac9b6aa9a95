//! `cargo xtask demo`: the datapath demo, the README's main-job command. It attaches the eBPF
//! programs to a cgroup it creates, so it needs root.

use anyhow::Result;

use crate::{cmd, root, setup};

/// Checks for root first (before setup spends time), then builds and runs the enforcer
/// crate's `demo` example in release mode.
pub(crate) fn run() -> Result<()> {
    root::require("the demo attaches eBPF programs and needs root")?;
    setup::run()?;
    cmd::run(cmd::new("cargo").args(["run", "--release", "-p", "enforcer", "--example", "demo"]))
}

//! `cargo xtask demo`: the daemon demo, the README's main-job command. It starts two daemon
//! nodes in network namespaces and attaches eBPF programs, so it needs root.

use std::{env, path::PathBuf};

use anyhow::Result;

use crate::{cmd, root, setup};

/// Checks for root first (before setup spends time), builds the `enforcer` binary and the
/// `demo` example in release mode, then runs the example, which finds the binary next to it.
pub(crate) fn run() -> Result<()> {
    root::require("the demo starts daemons that attach eBPF programs, and needs root")?;
    setup::run()?;
    cmd::run(cmd::new("cargo").args([
        "build",
        "--release",
        "-p",
        "enforcer",
        "--bin",
        "enforcer",
        "--example",
        "demo",
    ]))?;
    let demo = target_dir().join("release").join("examples").join("demo");
    cmd::run(&mut cmd::new(demo))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root, where cargo
/// runs) or the workspace's `target`.
fn target_dir() -> PathBuf {
    let root = cmd::workspace_root();
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

//! Builds the eBPF object (`enforcer-ebpf`, for bpfel-unknown-none) with aya-build and the
//! nightly toolchain; the loader embeds it from `OUT_DIR`.

use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let root_dir = Path::new(&manifest_dir).join("../enforcer-ebpf");
    let root_dir = root_dir
        .to_str()
        .context("the enforcer-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "enforcer-ebpf",
            root_dir,
            ..Package::default()
        }],
        Toolchain::default(),
    )
}

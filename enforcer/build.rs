//! Builds the eBPF object (`enforcer-ebpf`, for bpfel-unknown-none) with aya-build and the
//! nightly toolchain; the loader embeds it from `OUT_DIR`. Generates the SPIFFE Workload API's
//! gRPC code from `proto/workload.proto` with protox (a protobuf compiler in Rust: no system
//! `protoc`) and tonic.

use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    workload_api()?;
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

/// The Workload API's messages, server and client.
fn workload_api() -> anyhow::Result<()> {
    let proto = "proto/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors =
        protox::compile([proto], ["proto"]).context("failed to compile the .proto")?;
    tonic_prost_build::configure()
        .codec_path("crate::workload_api::codec::LeanCodec")
        // Ordered maps: a message encodes the same way every time, so streams compare digests.
        .btree_map(".")
        .compile_fds(descriptors)
        .context("failed to generate the Workload API code")
}

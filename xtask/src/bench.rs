//! `cargo xtask bench [NAME...]`: the enforcer crate's benchmarks, each a `harness = false`
//! program that prints its own figures. `hooks` attaches eBPF programs, and `tunnel`,
//! `containers`, `workload-api` and `churn` also create network namespaces (and containers, or
//! daemons), so they need root; `attest` (its own child processes) and
//! `identity` (in-process certificates and TLS) do not.

use anyhow::Result;
use clap::ValueEnum;

use crate::{cmd, root, setup};

/// A benchmark of the enforcer crate; its name is the `--bench` target it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Bench {
    /// Cost of the eBPF socket hooks on the connection path.
    Hooks,
    /// Attestation, authorization and policy compilation costs (no root needed).
    Attest,
    /// SVID issuance and mTLS handshake costs (no root needed).
    Identity,
    /// Throughput, latency, connection rate and memory of the mTLS tunnel between two network
    /// namespaces, against direct TCP and stunnel4 (needs root).
    Tunnel,
    /// Containers served by the daemon: time to listeners, memory and descriptors per
    /// namespace, and container-to-container throughput against host-to-host (needs root).
    Containers,
    /// The SPIFFE Workload API served by a daemon: first-message latency for cached and
    /// first-time callers, 1,000 streams through a rotation, JWT-SVID validation (needs root).
    WorkloadApi,
    /// 100,000 short connections to one workload on another node through the tunnel, against
    /// direct TCP: connections/s, `TIME_WAIT` sockets and daemon RSS per 10,000 (needs root).
    Churn,
}

impl Bench {
    /// The bench target in enforcer/benches/.
    fn target(self) -> &'static str {
        match self {
            Self::Hooks => "hooks",
            Self::Attest => "attest",
            Self::Identity => "identity",
            Self::Tunnel => "tunnel",
            Self::Containers => "containers",
            Self::WorkloadApi => "workload_api",
            Self::Churn => "churn",
        }
    }

    /// Whether the benchmark touches kernel state and so needs root.
    fn needs_root(self) -> bool {
        matches!(
            self,
            Self::Hooks | Self::Tunnel | Self::Containers | Self::WorkloadApi | Self::Churn
        )
    }
}

/// Checks for root first when a chosen benchmark needs it (before setup spends time), then
/// runs `benches` in order, or every benchmark when none is named.
pub(crate) fn run(benches: &[Bench]) -> Result<()> {
    let benches = if benches.is_empty() {
        Bench::value_variants()
    } else {
        benches
    };
    if benches.iter().any(|bench| bench.needs_root()) {
        root::require(
            "benchmarks that attach eBPF programs or create network namespaces need root",
        )?;
    }
    setup::run()?;
    for bench in benches {
        cmd::run(cmd::new("cargo").args(["bench", "-p", "enforcer", "--bench", bench.target()]))?;
    }
    Ok(())
}

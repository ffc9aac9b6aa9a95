//! Project tasks for enforcer, run as `cargo xtask <task>`: toolchain setup, build, the test
//! tiers, the kernel matrix under qemu, benchmarks, fuzzing and the demo. Every task starts
//! with the idempotent setup.

#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod layers;
mod root;
mod setup;
mod test;
mod vmtest;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Project tasks for enforcer.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: nightly toolchain, rust-src, bpf-linker, Debian test tools,
    /// the pyspiffe venv (idempotent; a second run does nothing).
    Setup,
    /// Build the workspace; enforcer's build script builds the eBPF object with the nightly.
    Build,
    /// Run every test tier: fmt, clippy, unit tests, privileged integration tests (root), then
    /// those suites under qemu on Debian's 6.1 and 6.12 kernels, except the host-only ones, and
    /// bullseye's 5.10, which must refuse the datapath (see vm-tests/README.md).
    Test {
        /// Stop after the unit tests (local iteration only; refused when CI is set).
        #[arg(long)]
        unit_only: bool,
        /// Skip the qemu tier (local iteration only; refused when CI is set).
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot Debian cloud kernels under qemu (TCG) and run the privileged suites in each, except
    /// the host-only ones (root; see vm-tests/README.md).
    VmTest {
        /// Kernel series to boot, e.g. 5.10, 6.1 or 6.12 (repeatable); default all three.
        #[arg(long = "kernel", value_name = "VERSION", value_parser = vmtest::parse_version)]
        kernels: Vec<String>,
        /// Wall-clock limit per kernel, in minutes; qemu is killed when it passes.
        #[arg(long, value_name = "MINUTES", default_value_t = vmtest::DEFAULT_TIMEOUT_MINUTES)]
        timeout: u64,
    },
    /// Check that the enforcer crate's modules import each other one way only (tunnel, attest,
    /// audit and policy; see xtask/src/layers.rs).
    Layers,
    /// Run benchmarks as root; every benchmark when none is named.
    Bench {
        /// Benchmarks to run.
        #[arg(value_enum, value_name = "NAME")]
        names: Vec<bench::Bench>,
    },
    /// Run the two-node daemon demo as root (the README's main job).
    Demo,
    /// Run cargo-fuzz targets on the nightly, each for a fixed time; every target when none
    /// is named (not part of CI).
    Fuzz {
        /// Fuzz targets to run.
        #[arg(value_enum, value_name = "TARGET")]
        targets: Vec<fuzz::Target>,
        /// How long to fuzz each target, in seconds.
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cmd::run(cmd::new("cargo").args(["build", "--workspace"]))
        }
        Task::Test { unit_only, no_vm } => test::run(unit_only, no_vm),
        Task::VmTest { kernels, timeout } => {
            setup::run()?;
            let kernels = if kernels.is_empty() {
                vmtest::DEFAULT_KERNELS.map(str::to_owned).to_vec()
            } else {
                kernels
            };
            let tally = vmtest::run(&kernels, Duration::from_mins(timeout))?;
            eprintln!("vm-test: ok: {tally}");
            Ok(())
        }
        Task::Layers => layers::run(),
        Task::Bench { names } => bench::run(&names),
        Task::Demo => demo::run(),
        Task::Fuzz { targets, seconds } => fuzz::run(&targets, seconds),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_names_parse() {
        let cli = Cli::try_parse_from(["cargo xtask", "bench", "hooks"]).unwrap();
        assert!(matches!(cli.task, Task::Bench { names } if names == [bench::Bench::Hooks]));
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "nope"]).is_err());
    }

    #[test]
    fn vm_test_kernels_and_timeout_parse() {
        let cli = Cli::try_parse_from(["cargo xtask", "vm-test"]).unwrap();
        assert!(matches!(
            cli.task,
            Task::VmTest { kernels, timeout: vmtest::DEFAULT_TIMEOUT_MINUTES } if kernels.is_empty()
        ));
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "vm-test",
            "--kernel",
            "6.1",
            "--kernel",
            "6.12",
            "--timeout",
            "45",
        ])
        .unwrap();
        assert!(matches!(
            cli.task,
            Task::VmTest { kernels, timeout: 45 } if kernels == ["6.1", "6.12"]
        ));
        assert!(Cli::try_parse_from(["cargo xtask", "vm-test", "--kernel", "latest"]).is_err());
    }

    #[test]
    fn fuzz_targets_and_seconds_parse() {
        let cli = Cli::try_parse_from(["cargo xtask", "fuzz"]).unwrap();
        assert!(matches!(
            cli.task,
            Task::Fuzz { targets, seconds: 60 } if targets.is_empty()
        ));
        let cli =
            Cli::try_parse_from(["cargo xtask", "fuzz", "spiffe_id", "--seconds", "5"]).unwrap();
        assert!(matches!(
            cli.task,
            Task::Fuzz { targets, seconds: 5 } if targets == [fuzz::Target::SpiffeId]
        ));
        assert!(Cli::try_parse_from(["cargo xtask", "fuzz", "nope"]).is_err());
    }
}

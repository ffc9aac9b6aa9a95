//! Project tasks for enforcer, run as `cargo xtask <task>`: toolchain setup, build, the test
//! tiers, benchmarks and the demo. Every task starts with the idempotent setup.

#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod demo;
mod root;
mod setup;
mod test;

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
    /// Install what is missing: nightly toolchain, rust-src, bpf-linker, Debian test tools
    /// (idempotent; a second run does nothing).
    Setup,
    /// Build the workspace; enforcer's build script builds the eBPF object with the nightly.
    Build,
    /// Run every test tier: fmt, clippy, unit tests, then privileged integration tests (root).
    Test {
        /// Stop after the unit tests (local iteration only; refused when CI is set).
        #[arg(long)]
        unit_only: bool,
    },
    /// Run benchmarks as root; every benchmark when none is named.
    Bench {
        /// Benchmarks to run.
        #[arg(value_enum, value_name = "NAME")]
        names: Vec<bench::Bench>,
    },
    /// Run the datapath demo as root (the README's main job).
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cmd::run(cmd::new("cargo").args(["build", "--workspace"]))
        }
        Task::Test { unit_only } => test::run(unit_only),
        Task::Bench { names } => bench::run(&names),
        Task::Demo => demo::run(),
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
}

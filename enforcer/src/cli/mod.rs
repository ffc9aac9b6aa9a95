//! Command-line interface of the `enforcer` binary: one module per area.

mod datapath;
mod identity;
mod policy;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

pub use datapath::DEFAULT_PIN_DIR;
pub use identity::{BundleCommand, BundleFormat, CaCommand, SvidCommand};
pub use policy::PolicyCommand;

/// Kernel-level workload identity enforcer.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `enforcer=debug`.
    #[arg(long, global = true, default_value = "info", env = "ENFORCER_LOG")]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the state of the pinned datapath: attachment, policy slot and version, counters.
    Status {
        /// The daemon's bpffs directory.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate and compare policy files.
    Policy {
        /// What to do with policies.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Create the trust domain's root CA and node intermediates.
    Ca {
        /// What to do with CAs.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Issue workload X.509-SVIDs.
    Svid {
        /// What to do with SVIDs.
        #[command(subcommand)]
        command: SvidCommand,
    },
    /// Print trust bundles.
    Bundle {
        /// What to do with bundles.
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Detach every program and remove every pin of the datapath.
    Uninstall {
        /// The daemon's bpffs directory.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Entry point of the binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status { pin_dir } => datapath::status(&pin_dir).map(|()| ExitCode::SUCCESS),
        Command::Policy { command } => Ok(command.run()),
        Command::Ca { command } => command.run().map(|()| ExitCode::SUCCESS),
        Command::Svid { command } => command.run().map(|()| ExitCode::SUCCESS),
        Command::Bundle { command } => command.run().map(|()| ExitCode::SUCCESS),
        Command::Uninstall { pin_dir } => datapath::uninstall(&pin_dir).map(|()| ExitCode::SUCCESS),
    }
}

//! Command-line interface of the `enforcer` binary.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    kernel::{Counter, Datapath, loader::LoadError},
    policy,
};

/// Default pin directory of the daemon on bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer";

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
    /// Detach every program and remove every pin of the datapath.
    Uninstall {
        /// The daemon's bpffs directory.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// `enforcer policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print every problem in the files as `file:line:col: severity: message`; exits 1 when
    /// any file has an error.
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the workloads, rules, egress entries, peers and enrollments that differ.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The candidate.
        new: PathBuf,
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
        Command::Status { pin_dir } => status(&pin_dir).map(|()| ExitCode::SUCCESS),
        Command::Policy {
            command: PolicyCommand::Check { files },
        } => Ok(policy_check(&files)),
        Command::Policy {
            command: PolicyCommand::Diff { old, new },
        } => Ok(policy_diff(&old, &new)),
        Command::Uninstall { pin_dir } => {
            Datapath::uninstall(&pin_dir)
                .with_context(|| format!("failed to uninstall {}", pin_dir.display()))?;
            tracing::info!(pin_dir = %pin_dir.display(), "datapath uninstalled");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn policy_check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match policy::load(file) {
            Ok((policy, warnings)) => {
                for warning in &warnings {
                    println!("{warning}");
                }
                println!(
                    "{}: ok ({} workloads, {} rules, {} egress, {} warnings)",
                    file.display(),
                    policy.workloads.len(),
                    policy.rules.len(),
                    policy.egress.len(),
                    warnings.len()
                );
            }
            Err(diagnostics) => {
                failed = true;
                for diagnostic in &diagnostics {
                    println!("{diagnostic}");
                }
                let errors = diagnostics
                    .iter()
                    .filter(|d| d.severity == policy::Severity::Error)
                    .count();
                println!("{}: {errors} errors", file.display());
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn policy_diff(old: &std::path::Path, new: &std::path::Path) -> ExitCode {
    let mut loaded = Vec::new();
    for file in [old, new] {
        match policy::load(file) {
            Ok((policy, _)) => loaded.push(policy),
            Err(diagnostics) => {
                for diagnostic in &diagnostics {
                    println!("{diagnostic}");
                }
                return ExitCode::FAILURE;
            }
        }
    }
    let changes = policy::diff::diff(&loaded[0], &loaded[1]);
    for change in &changes {
        println!("{change}");
    }
    println!("{} changes", changes.len());
    ExitCode::SUCCESS
}

fn status(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let datapath = match Datapath::adopt(pin_dir) {
        Ok(datapath) => datapath,
        Err(LoadError::Incomplete { missing, .. }) if !pin_dir.exists() => {
            println!(
                "datapath: not installed ({} absent; first link {missing})",
                pin_dir.display()
            );
            return Ok(());
        }
        Err(error) => return Err(error).context("failed to open the datapath"),
    };
    let maps = datapath.maps();
    let policy = maps.active_policy()?;
    let config = maps.config()?;
    println!("datapath: installed at {}", pin_dir.display());
    println!(
        "policy: slot {} version {} mode {}",
        maps.active_slot()?,
        policy.version,
        if policy.mode == crate::kernel::PolicyMeta::MODE_AUDIT {
            "audit"
        } else {
            "enforce"
        }
    );
    println!(
        "daemon: pid {} outbound port {} tunnel mark {:#x}",
        config.daemon_tgid, config.outbound_port, config.tunnel_mark
    );
    for counter in Counter::ALL {
        println!("counter {:<16} {}", counter.name(), maps.counter(counter)?);
    }
    Ok(())
}

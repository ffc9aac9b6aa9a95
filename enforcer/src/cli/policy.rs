//! `enforcer policy ...`: check and diff policy files, reload and show the daemon's.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Subcommand;

use crate::policy;

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
    /// Send FILE to the running daemon: validate, diff, then swap it in atomically and close
    /// the open flows it denies. Prints the new version and the diff; on any error the policy
    /// in force stays.
    Reload {
        /// The new policy.
        file: PathBuf,
        /// Validate and diff only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the policy the running daemon enforces, with its version and hash.
    Show,
}

impl PolicyCommand {
    /// Run the command; `reload` and `show` talk to the daemon on `socket`.
    pub fn run(&self, socket: &Path) -> anyhow::Result<ExitCode> {
        match self {
            Self::Check { files } => Ok(check(files)),
            Self::Diff { old, new } => Ok(diff(old, new)),
            Self::Reload { file, dry_run } => super::control::reload(socket, file, *dry_run),
            Self::Show => super::control::show(socket),
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
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

fn diff(old: &Path, new: &Path) -> ExitCode {
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
    let changes = policy::diff(&loaded[0], &loaded[1]);
    for change in &changes {
        println!("{change}");
    }
    println!("{} changes", changes.len());
    ExitCode::SUCCESS
}

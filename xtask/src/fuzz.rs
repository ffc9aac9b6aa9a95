//! `cargo xtask fuzz [TARGET...] [--seconds N]`: the libFuzzer targets of `enforcer/fuzz`,
//! run with cargo-fuzz on the nightly for a fixed time each. Not part of CI; the corpus grows
//! in `enforcer/fuzz/corpus/` and crashing inputs land in `enforcer/fuzz/artifacts/`.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;

use crate::{cmd, setup};

/// The fuzz crate, relative to the workspace root.
const FUZZ_DIR: &str = "enforcer/fuzz";

/// A fuzz target; its name is the `fuzz_targets/<name>.rs` binary it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum Target {
    /// SPIFFE IDs and trust domain names: parse, print, parse again.
    SpiffeId,
    /// SPIFFE trust bundle JSON, one trust domain and the federated set.
    BundleJson,
    /// Policy files.
    Policy,
    /// HTTP/2 CONNECT requests and raw frames on the tunnel's inbound side.
    Connect,
    /// JWT-SVID validation of arbitrary tokens.
    Jwt,
    /// The Workload API's rewriting of HTTP/2 header blocks (`:authority`).
    WorkloadHeaders,
}

impl Target {
    /// The binary name in enforcer/fuzz/Cargo.toml.
    fn name(self) -> &'static str {
        match self {
            Self::SpiffeId => "spiffe_id",
            Self::BundleJson => "bundle_json",
            Self::Policy => "policy",
            Self::Connect => "connect",
            Self::Jwt => "jwt",
            Self::WorkloadHeaders => "workload_headers",
        }
    }
}

/// Runs setup, installs cargo-fuzz if missing, then fuzzes `targets` (every target when none
/// is named) for `seconds` each. Every target runs even after one crashes; the error at the
/// end names each failed target and the inputs libFuzzer saved for it.
pub(crate) fn run(targets: &[Target], seconds: u64) -> Result<()> {
    ensure!(seconds > 0, "--seconds must be at least 1");
    setup::run()?;
    cargo_fuzz()?;
    let targets = if targets.is_empty() {
        Target::value_variants()
    } else {
        targets
    };
    let mut failures = Vec::new();
    for &target in targets {
        if let Err(failure) = fuzz(target, seconds) {
            eprintln!("fuzz: {} FAILED", target.name());
            failures.push(failure);
        } else {
            eprintln!("fuzz: {} ran {seconds} s without a crash", target.name());
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    bail!(
        "{} of {} fuzz targets failed:\n{}",
        failures.len(),
        targets.len(),
        failures.join("\n")
    )
}

/// cargo-fuzz, installed with `cargo install` when `cargo fuzz` is not a command yet.
fn cargo_fuzz() -> Result<()> {
    if let Some(version) = cargo_fuzz_version() {
        eprintln!("ok: {}", version.trim());
        return Ok(());
    }
    eprintln!("missing: cargo-fuzz");
    cmd::run(cmd::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    let version = cargo_fuzz_version()
        .context("installed cargo-fuzz but `cargo fuzz --version` still fails")?;
    eprintln!("ok: {}", version.trim());
    Ok(())
}

/// What `cargo fuzz --version` prints, if cargo-fuzz is installed.
fn cargo_fuzz_version() -> Option<String> {
    cmd::probe(cmd::new("cargo").args(["fuzz", "--version"]))
}

/// Fuzzes one target for `seconds`; on failure, a description naming the inputs it saved.
fn fuzz(target: Target, seconds: u64) -> Result<(), String> {
    let artifacts = cmd::workspace_root()
        .join(FUZZ_DIR)
        .join("artifacts")
        .join(target.name());
    let before = list_files(&artifacts).map_err(|e| format!("{}: {e:#}", target.name()))?;
    let status = cmd::run(
        cmd::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--fuzz-dir",
                FUZZ_DIR,
                target.name(),
            ])
            .args(["--", "-print_final_stats=1"])
            .arg(format!("-max_total_time={seconds}")),
    );
    let Err(error) = status else {
        return Ok(());
    };
    let after = list_files(&artifacts).map_err(|e| format!("{}: {e:#}", target.name()))?;
    let saved = after.difference(&before).collect::<Vec<_>>();
    Err(if saved.is_empty() {
        format!(
            "{}: {error:#}; no input was saved in {} (a build failure?)",
            target.name(),
            artifacts.display()
        )
    } else {
        let reproduce = saved.iter().map(|path| {
            format!(
                "  {}\n    reproduce: cargo +nightly fuzz run --fuzz-dir {FUZZ_DIR} {} {}",
                path.display(),
                target.name(),
                path.display()
            )
        });
        format!(
            "{}: {error:#}; crashing input saved:\n{}",
            target.name(),
            reproduce.collect::<Vec<_>>().join("\n")
        )
    })
}

/// The files in `dir`, none when it does not exist yet.
fn list_files(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to list {}", dir.display())),
    };
    entries
        .map(|entry| {
            entry
                .map(|entry| entry.path())
                .with_context(|| format!("failed to list {}", dir.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_source_file() {
        let dir = cmd::workspace_root().join(FUZZ_DIR).join("fuzz_targets");
        for target in Target::value_variants() {
            let source = dir.join(format!("{}.rs", target.name()));
            assert!(source.is_file(), "{} is missing", source.display());
        }
    }

    #[test]
    fn command_line_names_are_binary_names() {
        for target in Target::value_variants() {
            let value = target.to_possible_value().unwrap();
            assert_eq!(value.get_name(), target.name());
        }
    }

    #[test]
    fn list_files_of_a_missing_dir_is_empty() {
        let files = list_files(Path::new("/nonexistent/xtask-test")).unwrap();
        assert!(files.is_empty());
    }
}

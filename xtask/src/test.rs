//! `cargo xtask test`: every tier in order — formatting, clippy (host, and the eBPF programs
//! for the BPF target), the module layering (`cargo xtask layers`), unit tests, the privileged integration tests (root) on the host
//! kernel, then the same suites except the host-only ones under qemu on Debian's 6.1 and 6.12
//! kernels, and the kernel-support suite alone on bullseye's 5.10, below the minimum (`vm-test`;
//! `HOST_ONLY_SUITES` in `vmtest` says which stay on the host).
//! A tier that cannot run fails; it never looks like a pass.

use std::env;
use std::fmt;
use std::io;
use std::time::Duration;

use anyhow::{Result, bail, ensure};

use crate::{cmd, layers, root, setup, vmtest};

/// Runs setup, then every tier. For local iteration only (both refused under CI), `unit_only`
/// stops before the privileged tier and `no_vm` before the vm tier; the tally says so.
pub(crate) fn run(unit_only: bool, no_vm: bool) -> Result<()> {
    if (unit_only || no_vm) && env::var_os("CI").is_some() {
        bail!("--unit-only and --no-vm skip test tiers; CI must run every tier");
    }
    setup::run()?;
    cmd::run(cmd::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(cmd::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The programs only exist for the BPF target, so lint them there too (nightly, build-std).
    cmd::run(cmd::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "enforcer-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/bpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))?;
    layers::run()?;
    let unit = cargo_test(&["test", "--workspace", "--lib", "--bins"])?;
    if unit_only {
        eprintln!("test: ok: fmt, clippy, layers, unit {unit}; privileged NOT RUN (--unit-only)");
        return Ok(());
    }
    root::require("privileged tests need root")?;
    let privileged = cargo_test(&[
        "test",
        "-p",
        "enforcer",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ])?;
    ensure!(
        privileged.passed > 0,
        "the privileged tier passed no tests ({privileged}); a tier that did not run is not a pass"
    );
    if no_vm {
        eprintln!(
            "test: ok: fmt, clippy, layers, unit {unit}, privileged {privileged}; vm NOT RUN (--no-vm)"
        );
        return Ok(());
    }
    let kernels = vmtest::DEFAULT_KERNELS.map(str::to_owned);
    let vm = vmtest::run(
        &kernels,
        Duration::from_mins(vmtest::DEFAULT_TIMEOUT_MINUTES),
    )?;
    eprintln!("test: ok: fmt, clippy, layers, unit {unit}, privileged {privileged}, vm {vm}");
    Ok(())
}

/// Runs `cargo <args>`, showing its output, and adds up libtest's summary lines.
fn cargo_test(args: &[&str]) -> Result<Counts> {
    let mut counts = Counts::default();
    cmd::run_tee(cmd::new("cargo").args(args), &mut io::stdout(), |line| {
        if let Some(suite) = parse_result(line) {
            counts.add(&suite);
        }
    })?;
    Ok(counts)
}

/// Test counts of one or more libtest suites.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) suites: u64,
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, other: &Counts) {
        self.suites += other.suites;
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed", self.passed)?;
        if self.failed > 0 {
            write!(f, ", {} failed", self.failed)?;
        }
        if self.ignored > 0 {
            write!(f, ", {} ignored", self.ignored)?;
        }
        write!(f, " in {} suites", self.suites)
    }
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` into one suite.
pub(crate) fn parse_result(line: &str) -> Option<Counts> {
    let (_verdict, fields) = line.strip_prefix("test result: ")?.split_once(". ")?;
    let mut counts = Counts {
        suites: 1,
        ..Counts::default()
    };
    let (mut saw_passed, mut saw_failed) = (false, false);
    for field in fields.split("; ") {
        let Some((number, label)) = field.split_once(' ') else {
            continue;
        };
        let slot = match label {
            "passed" => {
                saw_passed = true;
                &mut counts.passed
            }
            "failed" => {
                saw_failed = true;
                &mut counts.failed
            }
            "ignored" => &mut counts.ignored,
            _ => continue,
        };
        *slot = number.parse().ok()?;
    }
    (saw_passed && saw_failed).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_passing_summary() {
        let line = "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; \
                    0 filtered out; finished in 0.31s";
        assert_eq!(
            parse_result(line),
            Some(Counts {
                suites: 1,
                passed: 12,
                failed: 0,
                ignored: 2
            })
        );
    }

    #[test]
    fn parses_a_failing_summary() {
        let line = "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; \
                    0 filtered out; finished in 1.00s";
        assert_eq!(parse_result(line).map(|counts| counts.failed), Some(1));
    }

    #[test]
    fn ignores_other_lines() {
        assert_eq!(parse_result("running 3 tests"), None);
        assert_eq!(parse_result("test result_parsing ... ok"), None);
        assert_eq!(parse_result("test result: ok. many passed; 0 failed"), None);
        assert_eq!(parse_result("test result: ok. 1 passed"), None);
    }

    #[test]
    fn tally_adds_suites_and_shows_only_nonzero_extras() {
        let mut total = Counts::default();
        for line in [
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out",
        ] {
            total.add(&parse_result(line).unwrap());
        }
        assert_eq!(total.to_string(), "7 passed, 1 ignored in 2 suites");
    }
}

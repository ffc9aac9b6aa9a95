//! `cargo xtask vm-test`: the privileged integration suites, except [`HOST_ONLY_SUITES`],
//! booted under qemu on Debian's cloud kernels, one verdict per kernel.
//!
//! The test executables are built on the host as usual; the guest sees the host's whole root
//! read-only through virtiofs (with a tmpfs overlay for writes), so the executables, their
//! shared libraries and the workload tools (python3, curl, iperf3, ip) are the host's own. Only
//! the kernel and its modules come from the downloaded package. See `vm-tests/README.md`.
//!
//! A kernel series older than the enforcer's minimum ([`MINIMUM_KERNEL`]) cannot carry the
//! datapath, so the suites would only fail there. Such a kernel runs [`SUPPORT_SUITE`] alone,
//! and passes only when that suite passed having seen the datapath refused (its
//! `VMTEST-REFUSED <feature>` line); every other kernel runs the whole set, and the same suite
//! must report the datapath accepted (`VMTEST-ACCEPTED`).

mod apt;
mod guest;
mod initramfs;
mod kernel;
mod qemu;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{cmd, root};
use guest::{Suite, Support, Transcript, Verdict};

/// The kernels `vm-test` and the vm tier of `cargo xtask test` boot when none is named:
/// Debian bullseye's cloud kernel, below the minimum (seconds once fetched: it boots to be
/// refused), then bookworm's default cloud kernel and the newer series bookworm also carries
/// (about ten minutes each under TCG on two cores, on a quiet machine).
pub(crate) const DEFAULT_KERNELS: [&str; 3] = ["5.10", "6.1", "6.12"];

/// The enforcer's minimum kernel (`MINIMUM_KERNEL` in `enforcer/src/kernel/features.rs`), as
/// `(major, minor)`: older series run only [`SUPPORT_SUITE`] and must be refused. Should the two
/// drift apart, a kernel between them fails its run with a message that says so.
const MINIMUM_KERNEL: (u32, u32) = (5, 15);

/// The suite that says whether the running kernel carries the datapath: it installs it, or
/// sees it refused for the first feature the release predates, and prints which.
pub(crate) const SUPPORT_SUITE: &str = "kernel_support";

/// Suites left to the host tier: the identity suites and the in-process tunnel suites run in
/// one process on loopback and load nothing into the kernel (see "Which suites" in
/// `vm-tests/README.md`), and TCG makes their cryptography far too slow for the guest
/// (`tunnel` moves a gibibyte through TLS); `control_socket` is a Unix-socket HTTP server
/// that loads nothing either; `daemon` and `bypass` drive the same kernel paths as `datapath`
/// and `tunnel_netns` through two real (debug-built) daemons and their CLI, and under TCG the
/// six tests of `daemon` alone took five minutes per kernel, doubling the tier;
/// `container_flows` is the same two-daemon shape with runc containers on each node;
/// `workload_api` is a daemon's Unix-socket gRPC service driven by pyspiffe, whose venv
/// setup puts on the host, and it adds nothing to the datapath the guest suites test. Every other
/// suite runs in the guest, including `datapath` (every program and hook, attacked the same
/// ways) and `tunnel_netns` (the tunnel over the real datapath), and any suite added later.
const HOST_ONLY_SUITES: [&str; 12] = [
    "bypass",
    "container_flows",
    "control_socket",
    "daemon",
    "identity_cli",
    "identity_interop",
    "identity_openssl",
    "identity_spiffe_crate",
    "identity_tls",
    "tunnel",
    "tunnel_bad_input",
    "workload_api",
];

/// The default wall-clock limit per kernel, in minutes: about twice a run on a loaded machine
/// (10 to 16 minutes under TCG), and small enough that a hung guest fails CI with this tier's message
/// rather than CI's own limit.
pub(crate) const DEFAULT_TIMEOUT_MINUTES: u64 = 30;

/// How many times one kernel is booted when it panics before the suites start.
const BOOT_ATTEMPTS: u32 = 3;

/// Builds the test executables, then boots each kernel in turn; fails unless every kernel
/// passed. Returns the one-line tally.
pub(crate) fn run(kernels: &[String], timeout: Duration) -> Result<String> {
    root::require("vm-test runs virtiofsd, which exports / and needs root")?;
    ensure!(!kernels.is_empty(), "vm-test needs at least one kernel");
    let suites = build_suites()?;
    let cache = cmd::workspace_root().join("target/vm-test");
    let mut results = Vec::new();
    for version in kernels {
        let started = Instant::now();
        let support = expected_support(version);
        let to_run = suites_for(support, &suites)?;
        if support == Support::Refused {
            eprintln!(
                "vm-test: {version} is older than Linux {}.{}: it runs {SUPPORT_SUITE} alone \
                 and must refuse the datapath",
                MINIMUM_KERNEL.0, MINIMUM_KERNEL.1
            );
        }
        let verdict = boot(version, &to_run, support, &cache, timeout)?;
        let took = minutes(started.elapsed());
        let release = verdict.release.clone().unwrap_or_else(|| version.clone());
        eprintln!("vm-test: {version} ({release}): {verdict} [{took}]");
        results.push((version, release, verdict, took));
    }
    eprintln!("vm-test: summary");
    for (version, release, verdict, took) in &results {
        eprintln!("  {version:<6} {release:<32} {verdict} [{took}]");
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, _, verdict, _)| verdict.problem.is_some())
        .map(|(version, ..)| version.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(results
        .iter()
        .map(|(version, _, verdict, _)| format!("{version}: {}", verdict.counts))
        .collect::<Vec<_>>()
        .join("; "))
}

/// What the support suite must report on kernel series `version`: refused below the minimum.
fn expected_support(version: &str) -> Support {
    let series = version
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
    match series {
        Some(series) if series < MINIMUM_KERNEL => Support::Refused,
        _ => Support::Accepted,
    }
}

/// The suites a kernel runs: all of `built` when it should carry the datapath, only
/// [`SUPPORT_SUITE`] when it should refuse it.
fn suites_for(support: Support, built: &[Suite]) -> Result<Vec<Suite>> {
    let suites: Vec<Suite> = built
        .iter()
        .filter(|suite| support == Support::Accepted || suite.name == SUPPORT_SUITE)
        .cloned()
        .collect();
    ensure!(
        suites.iter().any(|suite| suite.name == SUPPORT_SUITE),
        "the integration suite {SUPPORT_SUITE} (enforcer/tests/{SUPPORT_SUITE}.rs) was not built; \
         it is what tells whether a kernel carries the datapath"
    );
    Ok(suites)
}

/// Fetches and boots one kernel, writing its initramfs and second stage into a fresh run
/// directory under the cache, which is removed afterwards.
fn boot(
    version: &str,
    suites: &[Suite],
    support: Support,
    cache: &Path,
    timeout: Duration,
) -> Result<Verdict> {
    let kernel = kernel::fetch(version, cache)?;
    let run_dir = cache.join("run").join(&kernel.release);
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .with_context(|| format!("failed to remove {}", run_dir.display()))?;
    }
    fs::create_dir_all(&run_dir)
        .with_context(|| format!("failed to create {}", run_dir.display()))?;
    let stage2 = run_dir.join("stage2");
    let package_dir = cmd::workspace_root().join("enforcer");
    write_executable(
        &stage2,
        &guest::stage2_script(&kernel, suites, &package_dir),
    )?;
    let initramfs = run_dir.join("initramfs.cpio");
    initramfs::write(&kernel, &stage2, &initramfs)?;

    let verdict = boot_until_started(&kernel, &initramfs, &run_dir, support, timeout);
    fs::remove_dir_all(&run_dir)
        .with_context(|| format!("failed to remove {}", run_dir.display()))?;
    verdict
}

/// Boots `kernel` until the guest starts the suites, at most [`BOOT_ATTEMPTS`] times. Only a
/// kernel panic before the second stage began is tried again: under TCG the guest kernel
/// sometimes dies patching its own text while it initialises (an `int3` Oops in early boot,
/// seen on 6.12), before anything of ours ran. A panic once the suites started, like every
/// other failure, is the kernel's verdict.
fn boot_until_started(
    kernel: &kernel::Kernel,
    initramfs: &Path,
    run_dir: &Path,
    support: Support,
    timeout: Duration,
) -> Result<Verdict> {
    let mut attempt = 1;
    loop {
        let mut transcript = Transcript::default();
        let exit = qemu::boot(kernel, initramfs, run_dir, timeout, &mut transcript)?;
        let verdict = transcript.verdict(&exit, support);
        if !transcript.died_booting() || attempt == BOOT_ATTEMPTS {
            return Ok(verdict);
        }
        attempt += 1;
        eprintln!(
            "vm-test: {}: the kernel died before the suites started ({verdict}); \
             booting again, attempt {attempt} of {BOOT_ATTEMPTS}",
            kernel.version
        );
    }
}

/// Writes `contents` to `path` with mode 0755.
fn write_executable(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("failed to write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to make {} executable", path.display()))
}

/// Builds the integration tests of the enforcer package and returns the executables of those
/// that run in the guest, from cargo's JSON messages.
fn build_suites() -> Result<Vec<Suite>> {
    let mut suites = Vec::new();
    cmd::run_tee(
        cmd::new("cargo").args([
            "test",
            "-p",
            "enforcer",
            "--test",
            "*",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]),
        &mut std::io::sink(),
        // Diagnostics go to stderr, rendered; every stdout line is one JSON message.
        |line| {
            if let Ok(message) = serde_json::from_str::<Value>(line) {
                suites.extend(test_executable(&message));
            }
        },
    )?;
    ensure!(
        !suites.is_empty(),
        "cargo built no integration test executables for the enforcer package"
    );
    suites.sort_by(|a, b| a.name.cmp(&b.name));
    let (guest, host_only): (Vec<Suite>, Vec<Suite>) = suites
        .into_iter()
        .partition(|suite| runs_in_guest(&suite.name));
    let names = |suites: &[Suite]| {
        suites
            .iter()
            .map(|suite| suite.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("vm-test: the guest runs {}", names(&guest));
    eprintln!("vm-test: left to the host tier: {}", names(&host_only));
    ensure!(
        !guest.is_empty(),
        "no integration test suite is meant for the guest"
    );
    Ok(guest)
}

/// Whether the suite `name` runs in the guest (see [`HOST_ONLY_SUITES`]).
fn runs_in_guest(name: &str) -> bool {
    !HOST_ONLY_SUITES.contains(&name)
}

/// The test executable a `compiler-artifact` message announces, if it is an integration test.
fn test_executable(message: &Value) -> Option<Suite> {
    if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
        return None;
    }
    let kinds = message["target"]["kind"].as_array()?;
    if !kinds.iter().any(|kind| kind == "test") {
        return None;
    }
    Some(Suite {
        name: message["target"]["name"].as_str()?.to_owned(),
        path: PathBuf::from(message["executable"].as_str()?),
    })
}

/// Whether `version` has the `major.minor` form kernels are named by (`6.1`, `6.12`).
pub(crate) fn parse_version(version: &str) -> Result<String, String> {
    let valid = version.split_once('.').is_some_and(|(major, minor)| {
        [major, minor]
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    });
    if valid {
        Ok(version.to_owned())
    } else {
        Err(format!(
            "{version:?} is not a kernel series like 6.1 or 6.12"
        ))
    }
}

/// A duration as `12m05s`.
fn minutes(duration: Duration) -> String {
    let seconds = duration.as_secs();
    format!("{}m{:02}s", seconds / 60, seconds % 60)
}

/// Single-quotes a word for `sh` unless it only holds characters no shell treats specially.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_integration_test_artifacts_are_suites() {
        let message: Value = serde_json::from_str(
            r#"{"reason":"compiler-artifact","profile":{"test":true},
                "target":{"name":"datapath","kind":["test"]},
                "executable":"/t/debug/deps/datapath-1"}"#,
        )
        .unwrap();
        assert_eq!(
            test_executable(&message),
            Some(Suite {
                name: "datapath".to_owned(),
                path: PathBuf::from("/t/debug/deps/datapath-1"),
            })
        );
        for other in [
            r#"{"reason":"compiler-artifact","profile":{"test":false},
                "target":{"name":"enforcer","kind":["bin"]},"executable":"/t/debug/enforcer"}"#,
            r#"{"reason":"compiler-artifact","profile":{"test":true},
                "target":{"name":"enforcer","kind":["lib"]},"executable":"/t/debug/deps/e-1"}"#,
            r#"{"reason":"compiler-artifact","profile":{"test":false},
                "target":{"name":"aya","kind":["lib"]},"executable":null}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ] {
            let message: Value = serde_json::from_str(other).unwrap();
            assert_eq!(test_executable(&message), None, "{other}");
        }
    }

    #[test]
    fn kernel_facing_suites_run_in_the_guest() {
        for name in [
            "attest",
            "cli",
            "datapath",
            "harness",
            "policy",
            "policy_kernel",
            "tunnel_netns",
            SUPPORT_SUITE,
            "a_new_suite",
        ] {
            assert!(runs_in_guest(name), "{name}");
        }
        for name in ["identity_cli", "identity_tls", "tunnel", "tunnel_bad_input"] {
            assert!(!runs_in_guest(name), "{name}");
        }
    }

    fn suite(name: &str) -> Suite {
        Suite {
            name: name.to_owned(),
            path: PathBuf::from(format!("/t/debug/deps/{name}-1")),
        }
    }

    #[test]
    fn series_below_the_minimum_must_be_refused() {
        assert_eq!(expected_support("5.10"), Support::Refused);
        assert_eq!(expected_support("4.19"), Support::Refused);
        for accepted in ["5.15", "6.1", "6.12", "10.0"] {
            assert_eq!(expected_support(accepted), Support::Accepted, "{accepted}");
        }
    }

    #[test]
    fn a_refused_kernel_runs_the_support_suite_alone() {
        let built = [suite("datapath"), suite(SUPPORT_SUITE), suite("cli")];
        let names = |suites: Vec<Suite>| -> Vec<String> {
            suites.into_iter().map(|suite| suite.name).collect()
        };
        assert_eq!(
            names(suites_for(Support::Refused, &built).unwrap()),
            [SUPPORT_SUITE]
        );
        assert_eq!(
            names(suites_for(Support::Accepted, &built).unwrap()),
            ["datapath", SUPPORT_SUITE, "cli"]
        );
        let error = suites_for(Support::Refused, &built[..1]).unwrap_err();
        assert!(error.to_string().contains("was not built"), "{error}");
    }

    #[test]
    fn versions_are_major_dot_minor() {
        assert_eq!(parse_version("6.1").as_deref(), Ok("6.1"));
        assert_eq!(parse_version("6.12").as_deref(), Ok("6.12"));
        for bad in ["6", "6.", ".1", "6.1.0", "6.x", "latest", ""] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn minutes_pad_seconds() {
        assert_eq!(minutes(Duration::from_secs(605)), "10m05s");
        assert_eq!(minutes(Duration::from_secs(59)), "0m59s");
    }

    #[test]
    fn shell_quote_quotes_only_what_needs_it() {
        assert_eq!(shell_quote("/work/main/target"), "/work/main/target");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}

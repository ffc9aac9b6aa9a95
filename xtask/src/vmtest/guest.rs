//! The guest side: the second-stage script that runs the suites as process 1 inside the
//! host's root, and the reading of its serial console into one verdict per kernel.
//!
//! The script frames its output with sentinel lines (`VMTEST-BEGIN`, `VMTEST-SUITE`,
//! `VMTEST-END`, `VMTEST-ERROR`); libtest's own `test result:` lines give the counts.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kernel::Kernel;
use super::shell_quote;
use crate::test::{Counts, parse_result};

/// What the kernel prints when it panics.
const PANIC: &str = "Kernel panic - not syncing";

/// A privileged test executable built on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Suite {
    /// The integration test's name (`datapath`).
    pub(crate) name: String,
    /// The executable cargo built.
    pub(crate) path: PathBuf,
}

/// The second stage, run as process 1 in the guest: mount what the suite expects (proc, sysfs,
/// devtmpfs, cgroup2, bpffs, debugfs, tmpfs on `/run`), make the kernel's modules loadable,
/// bring up loopback, run every suite one test at a time from `package_dir` (with the tests
/// ignored on hosts whose kernel lacks what they need, such as the BPF LSM), and power off.
pub(super) fn stage2_script(kernel: &Kernel, suites: &[Suite], package_dir: &Path) -> String {
    let mut script = format!(
        "#!/bin/sh\n\
         # The vm-test second stage (written by cargo xtask vm-test); runs as process 1.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
         fail() {{ echo \"VMTEST-ERROR setup: $*\"; /bin/busybox poweroff -f; }}\n\
         mount -t proc proc /proc || fail 'mount /proc'\n\
         mount -t sysfs sysfs /sys || fail 'mount /sys'\n\
         mount -t devtmpfs devtmpfs /dev || fail 'mount /dev'\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts || fail 'mount /dev/pts'\n\
         mount -t tmpfs tmpfs /dev/shm || fail 'mount /dev/shm'\n\
         mount -t tmpfs tmpfs /run || fail 'mount /run'\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail 'mount cgroup2'\n\
         mount -t bpf bpf /sys/fs/bpf || fail 'mount bpffs'\n\
         mount -t debugfs debugfs /sys/kernel/debug || fail 'mount debugfs'\n\
         mkdir -p /lib/modules && ln -s {modules} /lib/modules/{release} || fail 'link the modules'\n\
         ip link set lo up || fail 'bring up lo'\n\
         cd {package} || fail 'cd {package}'\n\
         echo \"VMTEST-BEGIN $(uname -r)\"\n\
         suite() {{\n\
         \x20 name=$1; shift\n\
         \x20 echo \"VMTEST-RUN $name\"\n\
         \x20 \"$@\" --include-ignored --test-threads=1 --color=never\n\
         \x20 echo \"VMTEST-SUITE $name exit=$?\"\n\
         }}\n",
        modules = shell_quote(&kernel.modules.to_string_lossy()),
        release = shell_quote(&kernel.release),
        package = shell_quote(&package_dir.to_string_lossy()),
    );
    for suite in suites {
        writeln!(
            script,
            "suite {} {}",
            shell_quote(&suite.name),
            shell_quote(&suite.path.to_string_lossy())
        )
        .expect("writing to a String cannot fail");
    }
    script.push_str("echo VMTEST-END\n/bin/busybox poweroff -f\n");
    script
}

/// How qemu ended.
#[derive(Debug)]
pub(super) enum Exit {
    /// qemu exited by itself (guest power-off, reboot after a panic, or a qemu error).
    Exited(std::process::ExitStatus),
    /// The wall-clock limit passed and qemu was killed.
    TimedOut(Duration),
}

/// What the serial console said, line by line.
#[derive(Debug, Default)]
pub(super) struct Transcript {
    /// The release the guest reported at `VMTEST-BEGIN`.
    release: Option<String>,
    /// The suite that started last.
    running: Option<String>,
    /// Exit codes of the finished suites.
    suites: Vec<(String, String)>,
    /// libtest's counts over every suite.
    counts: Counts,
    /// Whether `VMTEST-END` was seen.
    ended: bool,
    /// A setup failure the guest reported.
    error: Option<String>,
    /// The kernel's panic line.
    panic: Option<String>,
}

impl Transcript {
    /// Takes one console line (kernel messages may precede a sentinel on the same line).
    pub(super) fn feed(&mut self, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(at) = line.find(PANIC) {
            self.panic.get_or_insert_with(|| line[at..].to_owned());
        }
        if let Some(counts) = line
            .find("test result: ")
            .and_then(|at| parse_result(&line[at..]))
        {
            self.counts.add(&counts);
        }
        let Some(at) = line.find("VMTEST-") else {
            return;
        };
        let (tag, rest) = line[at..].split_once(' ').unwrap_or((&line[at..], ""));
        match tag {
            "VMTEST-BEGIN" => self.release = Some(rest.to_owned()),
            "VMTEST-RUN" => self.running = Some(rest.to_owned()),
            "VMTEST-SUITE" => {
                if let Some((name, exit)) = rest.rsplit_once(" exit=") {
                    self.suites.push((name.to_owned(), exit.to_owned()));
                }
            }
            "VMTEST-END" => self.ended = true,
            "VMTEST-ERROR" => {
                self.error.get_or_insert_with(|| rest.to_owned());
            }
            _ => {}
        }
    }

    /// Whether the kernel panicked before the second stage announced itself: nothing of the
    /// suites ran, so the boot itself failed.
    pub(super) fn died_booting(&self) -> bool {
        self.panic.is_some() && self.release.is_none()
    }

    /// The verdict for this kernel once qemu has ended with `exit`.
    pub(super) fn verdict(&self, exit: &Exit) -> Verdict {
        let failed: Vec<String> = self
            .suites
            .iter()
            .filter(|(_, code)| code != "0")
            .map(|(name, code)| format!("{name} (exit {code})"))
            .collect();
        let problem = if let Some(panic) = &self.panic {
            Some(format!("kernel panic: {panic}"))
        } else if let Exit::TimedOut(limit) = exit {
            Some(format!(
                "timed out after {} while running {}",
                super::minutes(*limit),
                self.running.as_deref().unwrap_or("the boot")
            ))
        } else if let Some(error) = &self.error {
            Some(format!("guest {error}"))
        } else if self.release.is_none() {
            Some(format!(
                "the guest never started the suites (qemu {})",
                exit_text(exit)
            ))
        } else if !self.ended {
            Some(format!(
                "the guest stopped during {} (qemu {})",
                self.running.as_deref().unwrap_or("setup"),
                exit_text(exit)
            ))
        } else if !failed.is_empty() {
            Some(format!("failed suites: {}", failed.join(", ")))
        } else if self.counts.failed > 0 {
            Some(format!("{} tests failed", self.counts.failed))
        } else if self.counts.passed == 0 {
            Some("no tests ran; a tier that did not run is not a pass".to_owned())
        } else {
            None
        };
        Verdict {
            release: self.release.clone(),
            counts: self.counts.clone(),
            problem,
        }
    }
}

/// `exit status: 0`, or how it was killed.
fn exit_text(exit: &Exit) -> String {
    match exit {
        Exit::Exited(status) => format!("exited with {status}"),
        Exit::TimedOut(limit) => format!("killed after {}", super::minutes(*limit)),
    }
}

/// The result of one kernel.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// The release the guest ran, when it got that far.
    pub(crate) release: Option<String>,
    /// The tests' counts.
    pub(crate) counts: Counts,
    /// Why the kernel did not pass; `None` when it passed.
    pub(crate) problem: Option<String>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => write!(f, "ok, {}", self.counts),
            Some(problem) => write!(f, "FAILED, {}: {problem}", self.counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    fn feed(lines: &str) -> Transcript {
        let mut transcript = Transcript::default();
        for line in lines.lines() {
            transcript.feed(line);
        }
        transcript
    }

    fn powered_off() -> Exit {
        Exit::Exited(ExitStatus::from_raw(0))
    }

    const PASSING: &str = "\
SeaBIOS
VMTEST-BEGIN 6.1.0-56-cloud-amd64\r
VMTEST-RUN datapath
running 2 tests
test a ... ok
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
VMTEST-SUITE datapath exit=0
VMTEST-RUN cli
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s
VMTEST-SUITE cli exit=0
VMTEST-END
[   99.1] reboot: Power down
";

    #[test]
    fn a_complete_run_passes_with_its_counts() {
        let verdict = feed(PASSING).verdict(&powered_off());
        assert_eq!(verdict.problem, None);
        assert_eq!(verdict.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(verdict.to_string(), "ok, 5 passed, 1 ignored in 2 suites");
    }

    #[test]
    fn a_failing_suite_fails_the_kernel() {
        let lines = PASSING.replace("VMTEST-SUITE cli exit=0", "VMTEST-SUITE cli exit=101");
        let verdict = feed(&lines).verdict(&powered_off());
        assert_eq!(
            verdict.problem.as_deref(),
            Some("failed suites: cli (exit 101)")
        );
    }

    #[test]
    fn a_panic_is_reported_with_its_reason() {
        let lines = "VMTEST-BEGIN 6.1.0\nVMTEST-RUN datapath\n\
                     [   12.0] Kernel panic - not syncing: Fatal exception in interrupt\n";
        let verdict = feed(lines).verdict(&Exit::Exited(ExitStatus::from_raw(0)));
        assert_eq!(
            verdict.problem.as_deref(),
            Some("kernel panic: Kernel panic - not syncing: Fatal exception in interrupt")
        );
    }

    #[test]
    fn only_a_panic_before_the_suites_is_a_failed_boot() {
        let early = "[    1.89] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
                     [    1.89] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(feed(early).died_booting());
        let late = format!("VMTEST-BEGIN 6.12.0\nVMTEST-RUN datapath\n{early}");
        assert!(!feed(&late).died_booting());
        assert!(!feed("SeaBIOS\n").died_booting());
    }

    #[test]
    fn a_timeout_names_the_suite_that_hung() {
        let lines = "VMTEST-BEGIN 6.1.0\nVMTEST-RUN datapath\n";
        let verdict = feed(lines).verdict(&Exit::TimedOut(Duration::from_mins(30)));
        assert_eq!(
            verdict.problem.as_deref(),
            Some("timed out after 30m00s while running datapath")
        );
    }

    #[test]
    fn a_setup_error_and_an_early_stop_are_failures() {
        let verdict = feed("VMTEST-ERROR initramfs: insmod lib/modules/virtiofs.ko\n")
            .verdict(&powered_off());
        assert_eq!(
            verdict.problem.as_deref(),
            Some("guest initramfs: insmod lib/modules/virtiofs.ko")
        );
        let verdict = feed("VMTEST-BEGIN 6.1.0\nVMTEST-RUN cli\n").verdict(&powered_off());
        assert_eq!(
            verdict.problem.as_deref(),
            Some("the guest stopped during cli (qemu exited with exit status: 0)")
        );
        let verdict = feed("SeaBIOS\n").verdict(&Exit::Exited(ExitStatus::from_raw(256)));
        assert_eq!(
            verdict.problem.as_deref(),
            Some("the guest never started the suites (qemu exited with exit status: 1)")
        );
    }

    #[test]
    fn a_run_without_tests_is_not_a_pass() {
        let verdict = feed("VMTEST-BEGIN 6.1.0\nVMTEST-END\n").verdict(&powered_off());
        assert_eq!(
            verdict.problem.as_deref(),
            Some("no tests ran; a tier that did not run is not a pass")
        );
    }

    #[test]
    fn sentinels_after_kernel_noise_on_the_same_line_count() {
        let verdict = feed(
            "VMTEST-BEGIN 6.1.0\n[ 3.2] random: crng initVMTEST-RUN x\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             VMTEST-SUITE x exit=0\nVMTEST-END\n",
        )
        .verdict(&powered_off());
        assert_eq!(verdict.problem, None);
    }

    #[test]
    fn the_script_runs_every_suite_then_powers_off() {
        let kernel = Kernel {
            version: "6.1".to_owned(),
            release: "6.1.0-56-cloud-amd64".to_owned(),
            vmlinuz: PathBuf::from("/c/tree/boot/vmlinuz-6.1.0-56-cloud-amd64"),
            modules: PathBuf::from("/c/tree/lib/modules/6.1.0-56-cloud-amd64"),
        };
        let suites = [
            Suite {
                name: "datapath".to_owned(),
                path: PathBuf::from("/t/debug/deps/datapath-1"),
            },
            Suite {
                name: "cli".to_owned(),
                path: PathBuf::from("/t/debug/deps/cli-2"),
            },
        ];
        let script = stage2_script(&kernel, &suites, Path::new("/w/enforcer"));
        assert!(script.contains("mount -t cgroup2 cgroup2 /sys/fs/cgroup"));
        assert!(script.contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(script.contains(
            "ln -s /c/tree/lib/modules/6.1.0-56-cloud-amd64 /lib/modules/6.1.0-56-cloud-amd64"
        ));
        assert!(script.contains("cd /w/enforcer ||"));
        assert!(script.ends_with(
            "suite datapath /t/debug/deps/datapath-1\nsuite cli /t/debug/deps/cli-2\n\
             echo VMTEST-END\n/bin/busybox poweroff -f\n"
        ));
    }
}

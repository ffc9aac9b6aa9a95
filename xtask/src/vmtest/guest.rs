//! The guest side: the second-stage script that runs the suites as process 1 inside the
//! host's root, and the reading of its serial console into one verdict per kernel.
//!
//! The script frames its output with sentinel lines (`VMTEST-BEGIN`, `VMTEST-SUITE`,
//! `VMTEST-END`, `VMTEST-ERROR`); libtest's own `test result:` lines give the counts. The
//! support suite, run with `--nocapture`, adds `VMTEST-ACCEPTED <release>` or
//! `VMTEST-REFUSED <feature>`.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kernel::Kernel;
use super::{SUPPORT_SUITE, shell_quote};
use crate::test::{Counts, parse_result};

/// What the kernel prints when it panics.
const PANIC: &str = "Kernel panic - not syncing";

/// What the support suite must have seen of the datapath on a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Support {
    /// Installed: the kernel is at least the minimum.
    Accepted,
    /// Refused for a missing feature: the kernel is older than the minimum.
    Refused,
}

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
/// ignored on hosts whose kernel lacks what they need, such as the BPF LSM; the support suite
/// with its output shown, for its verdict line), and power off.
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
        let show_output = if suite.name == SUPPORT_SUITE {
            " --nocapture"
        } else {
            ""
        };
        writeln!(
            script,
            "suite {} {}{show_output}",
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
    /// The support suite found the datapath installs (`VMTEST-ACCEPTED`).
    accepted: bool,
    /// The feature the support suite saw the datapath refused for (`VMTEST-REFUSED`).
    refused: Option<String>,
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
            "VMTEST-ACCEPTED" => self.accepted = true,
            "VMTEST-REFUSED" => self.refused = Some(rest.to_owned()),
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

    /// The verdict for this kernel once qemu has ended with `exit`, when the support suite
    /// should have seen `support`.
    pub(super) fn verdict(&self, exit: &Exit, support: Support) -> Verdict {
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
            self.support_problem(support)
        };
        Verdict {
            release: self.release.clone(),
            counts: self.counts.clone(),
            refused: self.refused.clone(),
            problem,
        }
    }

    /// Why the support suite's report does not match `support`, if it does not.
    fn support_problem(&self, support: Support) -> Option<String> {
        let (minimum_major, minimum_minor) = super::MINIMUM_KERNEL;
        match (support, self.accepted, &self.refused) {
            (Support::Accepted, true, None) | (Support::Refused, false, Some(_)) => None,
            (Support::Accepted, _, Some(feature)) => Some(format!(
                "{SUPPORT_SUITE} saw the datapath refused for lacking {feature}, on a kernel \
                 vm-test takes to be at least Linux {minimum_major}.{minimum_minor}"
            )),
            (Support::Refused, true, _) => Some(format!(
                "{SUPPORT_SUITE} saw the datapath install on a kernel older than Linux \
                 {minimum_major}.{minimum_minor}, which vm-test expects refused; if the \
                 enforcer's minimum changed, change MINIMUM_KERNEL in xtask/src/vmtest/mod.rs"
            )),
            (support, ..) => Some(format!(
                "{SUPPORT_SUITE} reported neither VMTEST-ACCEPTED nor VMTEST-REFUSED \
                 (expected {})",
                match support {
                    Support::Accepted => "VMTEST-ACCEPTED",
                    Support::Refused => "VMTEST-REFUSED",
                }
            )),
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
    /// The feature the datapath was refused for, on a kernel below the minimum.
    pub(crate) refused: Option<String>,
    /// Why the kernel did not pass; `None` when it passed.
    pub(crate) problem: Option<String>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.problem, &self.refused) {
            (None, None) => write!(f, "ok, {}", self.counts),
            (None, Some(feature)) => write!(
                f,
                "ok, refused as expected (lacks {feature}), {}",
                self.counts
            ),
            (Some(problem), _) => write!(f, "FAILED, {}: {problem}", self.counts),
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
VMTEST-RUN kernel_support
running 1 test
test the_datapath_installs_or_is_refused_for_the_first_missing_feature ... VMTEST-ACCEPTED 6.1.0-56-cloud-amd64
ok
test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.00s
VMTEST-SUITE kernel_support exit=0
VMTEST-END
[   99.1] reboot: Power down
";

    /// A kernel below the minimum: the support suite alone, refused.
    const REFUSED: &str = "\
VMTEST-BEGIN 5.10.0-32-cloud-amd64
VMTEST-RUN kernel_support
running 1 test
test the_datapath_installs_or_is_refused_for_the_first_missing_feature ... kernel_support: \
Datapath::install refused: kernel 5.10.0-32-cloud-amd64 lacks bpf_get_netns_cookie in sock_ops \
programs, which Linux 5.15 introduced; enforcer needs Linux 5.15 or newer
VMTEST-REFUSED bpf_get_netns_cookie in sock_ops programs
ok
test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
VMTEST-SUITE kernel_support exit=0
VMTEST-END
";

    #[test]
    fn a_complete_run_passes_with_its_counts() {
        let verdict = feed(PASSING).verdict(&powered_off(), Support::Accepted);
        assert_eq!(verdict.problem, None);
        assert_eq!(verdict.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(verdict.to_string(), "ok, 6 passed, 1 ignored in 3 suites");
    }

    #[test]
    fn a_kernel_below_the_minimum_passes_only_when_refused() {
        let verdict = feed(REFUSED).verdict(&powered_off(), Support::Refused);
        assert_eq!(verdict.problem, None);
        assert_eq!(
            verdict.to_string(),
            "ok, refused as expected (lacks bpf_get_netns_cookie in sock_ops programs), \
             1 passed in 1 suites"
        );
        let verdict = feed(PASSING).verdict(&powered_off(), Support::Refused);
        assert!(
            verdict
                .problem
                .as_deref()
                .is_some_and(|problem| problem.contains(
                    "saw the datapath install on a kernel \
                                                         older than Linux 5.15"
                )),
            "{verdict}"
        );
    }

    #[test]
    fn a_refusal_on_a_supported_kernel_fails_it() {
        let verdict = feed(REFUSED).verdict(&powered_off(), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some(
                "kernel_support saw the datapath refused for lacking bpf_get_netns_cookie in \
                 sock_ops programs, on a kernel vm-test takes to be at least Linux 5.15"
            )
        );
    }

    #[test]
    fn a_support_suite_without_its_line_is_not_a_pass() {
        let silent = PASSING.replace("VMTEST-ACCEPTED 6.1.0-56-cloud-amd64", "");
        let verdict = feed(&silent).verdict(&powered_off(), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some(
                "kernel_support reported neither VMTEST-ACCEPTED nor VMTEST-REFUSED (expected VMTEST-ACCEPTED)"
            )
        );
        let silent = REFUSED.replace(
            "VMTEST-REFUSED bpf_get_netns_cookie in sock_ops programs",
            "",
        );
        let verdict = feed(&silent).verdict(&powered_off(), Support::Refused);
        assert_eq!(
            verdict.problem.as_deref(),
            Some(
                "kernel_support reported neither VMTEST-ACCEPTED nor VMTEST-REFUSED (expected VMTEST-REFUSED)"
            )
        );
    }

    #[test]
    fn a_failing_suite_fails_the_kernel() {
        let lines = PASSING.replace("VMTEST-SUITE cli exit=0", "VMTEST-SUITE cli exit=101");
        let verdict = feed(&lines).verdict(&powered_off(), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some("failed suites: cli (exit 101)")
        );
    }

    #[test]
    fn a_panic_is_reported_with_its_reason() {
        let lines = "VMTEST-BEGIN 6.1.0\nVMTEST-RUN datapath\n\
                     [   12.0] Kernel panic - not syncing: Fatal exception in interrupt\n";
        let verdict =
            feed(lines).verdict(&Exit::Exited(ExitStatus::from_raw(0)), Support::Accepted);
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
        let verdict =
            feed(lines).verdict(&Exit::TimedOut(Duration::from_mins(30)), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some("timed out after 30m00s while running datapath")
        );
    }

    #[test]
    fn a_setup_error_and_an_early_stop_are_failures() {
        let verdict = feed("VMTEST-ERROR initramfs: insmod lib/modules/virtiofs.ko\n")
            .verdict(&powered_off(), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some("guest initramfs: insmod lib/modules/virtiofs.ko")
        );
        let verdict =
            feed("VMTEST-BEGIN 6.1.0\nVMTEST-RUN cli\n").verdict(&powered_off(), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some("the guest stopped during cli (qemu exited with exit status: 0)")
        );
        let verdict =
            feed("SeaBIOS\n").verdict(&Exit::Exited(ExitStatus::from_raw(256)), Support::Accepted);
        assert_eq!(
            verdict.problem.as_deref(),
            Some("the guest never started the suites (qemu exited with exit status: 1)")
        );
    }

    #[test]
    fn a_run_without_tests_is_not_a_pass() {
        let verdict =
            feed("VMTEST-BEGIN 6.1.0\nVMTEST-END\n").verdict(&powered_off(), Support::Accepted);
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
             [ 3.3] randomVMTEST-ACCEPTED 6.1.0\nVMTEST-SUITE x exit=0\nVMTEST-END\n",
        )
        .verdict(&powered_off(), Support::Accepted);
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
            Suite {
                name: "kernel_support".to_owned(),
                path: PathBuf::from("/t/debug/deps/kernel_support-3"),
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
             suite kernel_support /t/debug/deps/kernel_support-3 --nocapture\n\
             echo VMTEST-END\n/bin/busybox poweroff -f\n"
        ));
    }
}

//! Workload processes started inside a scratch cgroup and/or network namespace, killed when
//! dropped.
//!
//! Placement needs no `unsafe` `pre_exec` hook: a `sh` wrapper writes its own pid into the
//! cgroup's `cgroup.procs`, then `exec`s `ip netns exec NAME`, which switches namespace and
//! `exec`s a second `sh` that reports back on stdout and `exec`s the workload. Every step is an
//! `exec`, so the pid [`Spawned::pid`] returns is the workload's, and [`Spawn::spawn`] returns
//! only once the process is in its cgroup and namespace.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::{
    process::Pid,
    thread::{CpuSet, sched_getaffinity, sched_setaffinity},
};

use super::{Netns, ScratchCgroup};

/// The line the wrapper prints once the process is placed, just before it becomes the workload.
const PLACED: &str = "enforcer-testing: placed";
/// `$0` of the wrapper shells, which `sh` names in its own error messages.
const WRAPPER_NAME: &str = "enforcer-spawn";
/// Joins the cgroup whose `cgroup.procs` is `$1`, then becomes the rest of the arguments.
const JOIN_CGROUP: &str = r#"echo $$ >"$1" && shift && exec "$@""#;
/// Prints `$1` on stdout, then becomes the rest of the arguments.
const ANNOUNCE: &str = r#"printf '%s\n' "$1" && shift && exec "$@""#;
/// How long placement may take before [`Spawn::spawn`] gives up.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed process gets to exit and flush stderr before its failure is reported.
const FAILURE_GRACE: Duration = Duration::from_secs(1);
/// Pause between polls for a process to exit.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Builder for a workload process: what to run and where to place it.
#[derive(Debug)]
#[must_use = "a Spawn does nothing until .spawn() is called"]
pub struct Spawn {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    env_clear: bool,
    cgroup: Option<ScratchCgroup>,
    netns: Option<Netns>,
    stdin_piped: bool,
}

impl Spawn {
    /// Runs `program` (looked up in `PATH`) with no arguments, in the caller's cgroup and
    /// network namespace, with stdin from `/dev/null`.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            env_clear: false,
            cgroup: None,
            netns: None,
            stdin_piped: false,
        }
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Starts the process with only the variables set by [`env`](Self::env), instead of this
    /// process's environment (which, under cargo, sets `LD_LIBRARY_PATH`). The wrappers find
    /// `sh` and `ip` in the default search path; give `program` as an absolute path.
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// Places the process in `cgroup`, which stays alive until the process is killed.
    pub fn cgroup(mut self, cgroup: &ScratchCgroup) -> Self {
        self.cgroup = Some(cgroup.clone());
        self
    }

    /// Places the process in `netns`, which stays alive until the process is killed.
    pub fn netns(mut self, netns: &Netns) -> Self {
        self.netns = Some(netns.clone());
        self
    }

    /// Connects the process's stdin to a pipe for [`Spawned::write_line`].
    pub fn stdin_piped(mut self) -> Self {
        self.stdin_piped = true;
        self
    }

    /// Starts the process and waits until it is in its cgroup and namespace.
    ///
    /// Panics, with the process's stderr, if it cannot be started or placed.
    pub fn spawn(self) -> Spawned {
        let description = self.describe();
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(cgroup) = &self.cgroup {
            argv.extend(["sh", "-c", JOIN_CGROUP, WRAPPER_NAME].map(OsString::from));
            argv.push(cgroup.path().join("cgroup.procs").into());
        }
        if let Some(netns) = &self.netns {
            argv.extend(netns.exec_args().into_iter().map(OsString::from));
        }
        argv.extend(["sh", "-c", ANNOUNCE, WRAPPER_NAME, PLACED].map(OsString::from));
        argv.push(self.program);
        argv.extend(self.args);
        let mut command = Command::new(&argv[0]);
        if self.env_clear {
            command.env_clear();
        }
        let mut child = command
            .args(&argv[1..])
            .envs(self.envs)
            .stdin(if self.stdin_piped {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {description}: {error}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || forward_lines(stdout, &sender));
        let stderr_text = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = {
            let stderr_text = Arc::clone(&stderr_text);
            thread::spawn(move || collect(stderr, &stderr_text))
        };
        let mut spawned = Spawned {
            child,
            description,
            lines,
            stderr_text,
            stderr_reader,
            _cgroup: self.cgroup,
            _netns: self.netns,
        };
        match spawned.lines.recv_timeout(PLACEMENT_TIMEOUT) {
            Ok(line) if line == PLACED => {
                spawned.wait_for_final_exec();
                spawned
            }
            Ok(line) => spawned.fail(&format!("printed {line:?} before being placed")),
            Err(_) => spawned.fail("was not placed"),
        }
    }

    /// `["program", "arg", …] in cgroup PATH in netns NAME`, for messages.
    fn describe(&self) -> String {
        let argv: Vec<_> = [&self.program]
            .into_iter()
            .chain(&self.args)
            .map(|arg| arg.to_string_lossy())
            .collect();
        let mut description = format!("{argv:?}");
        if let Some(cgroup) = &self.cgroup {
            let _ = write!(description, " in cgroup {}", cgroup.path().display());
        }
        if let Some(netns) = &self.netns {
            let _ = write!(description, " in netns {}", netns.name());
        }
        description
    }
}

/// A running workload process; dropping it kills it with SIGKILL and reaps it.
///
/// Its stdout is read line by line on a background thread ([`read_line`](Self::read_line)),
/// its stderr collected for panic messages ([`stderr`](Self::stderr)).
#[derive(Debug)]
#[must_use = "the process is killed as soon as the guard is dropped"]
pub struct Spawned {
    child: Child,
    description: String,
    lines: Receiver<String>,
    stderr_text: Arc<Mutex<Vec<u8>>>,
    stderr_reader: JoinHandle<()>,
    /// Keeps the cgroup the process was placed in until the process is gone.
    _cgroup: Option<ScratchCgroup>,
    /// Keeps the namespace the process was placed in until the process is gone.
    _netns: Option<Netns>,
}

impl Spawned {
    /// Waits until the announcing wrapper has `exec`ed the workload: the wrapper prints
    /// [`PLACED`] just before its last `exec`, so until then `/proc/<pid>` still describes the
    /// wrapper shell (its command line carries [`WRAPPER_NAME`]). Inside `exec` there is a
    /// moment when `/proc/<pid>/exe` already names the new binary but the new image's command
    /// line and environment are not set up yet (both read empty): that is still waiting. Returns
    /// early if the process exits or after [`PLACEMENT_TIMEOUT`].
    fn wait_for_final_exec(&self) {
        let path = format!("/proc/{}/cmdline", self.pid());
        let deadline = Instant::now() + PLACEMENT_TIMEOUT;
        while Instant::now() < deadline {
            match std::fs::read(&path) {
                Ok(cmdline)
                    if (cmdline.is_empty() && !self.exited())
                        || cmdline
                            .split(|&byte| byte == 0)
                            .any(|arg| arg == WRAPPER_NAME.as_bytes()) =>
                {
                    thread::sleep(Duration::from_millis(1));
                }
                _ => return,
            }
        }
    }

    /// Whether the process has exited (a zombie, or gone): its command line reads empty too.
    fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state == 'Z' || state == 'X')
            })
            .unwrap_or(true)
    }

    /// The process id, which is the workload's own: the wrappers `exec` it.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `line` and a newline to the process's stdin (see [`Spawn::stdin_piped`]).
    pub fn write_line(&mut self, line: &str) {
        let Some(stdin) = self.child.stdin.as_mut() else {
            panic!("{} was spawned without stdin_piped()", self.description)
        };
        if let Err(error) = stdin.write_all(format!("{line}\n").as_bytes()) {
            self.fail(&format!("did not accept {line:?} on stdin: {error}"));
        }
    }

    /// The next line the process prints on stdout, without its line ending; `None` if none
    /// comes within `timeout` or stdout is closed.
    #[must_use]
    pub fn read_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits up to `timeout` for the process to exit and returns how it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Ok(None) => return None,
                Err(error) => panic!("failed to wait for {}: {error}", self.description),
            }
        }
    }

    /// Kills the process with SIGKILL unless it already exited, reaps it, and returns how it
    /// exited.
    pub fn kill(&mut self) -> ExitStatus {
        self.terminate()
            .unwrap_or_else(|error| panic!("failed to kill {}: {error}", self.description))
    }

    /// What the process has printed on stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        let text = self
            .stderr_text
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Signals only this child's pid, which cannot have been reused: it is not reaped until
    /// the `wait` that follows.
    fn terminate(&mut self) -> io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Panics with `problem`, how the process exited and its stderr.
    fn fail(&mut self, problem: &str) -> ! {
        let status = self.wait_timeout(FAILURE_GRACE);
        let deadline = Instant::now() + FAILURE_GRACE;
        while !self.stderr_reader.is_finished() && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        let status = status.map_or_else(|| "still running".to_owned(), |status| status.to_string());
        panic!(
            "{} {problem} ({status}); stderr:\n{}",
            self.description,
            self.stderr()
        )
    }
}

impl Drop for Spawned {
    /// Kills and reaps the process, warning instead of panicking, which could abort an
    /// unwinding test.
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!("warning: failed to kill {}: {error}", self.description);
        }
    }
}

/// Sends each line of `stdout`, without its line ending, until it closes or nobody listens.
fn forward_lines(stdout: ChildStdout, lines: &Sender<String>) {
    let mut stdout = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdout.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']).to_owned();
                if lines.send(text).is_err() {
                    return;
                }
            }
        }
    }
}

/// Appends everything read from `stderr` to `text` as it arrives, until it closes.
fn collect(mut stderr: ChildStderr, text: &Mutex<Vec<u8>>) {
    let mut buffer = [0; 4096];
    while let Ok(read @ 1..) = stderr.read(&mut buffer) {
        text.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(&buffer[..read]);
    }
}

/// The resident set size of process `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
#[must_use]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("read the status of pid {pid}: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// The CPU time process `pid` has used so far, user and system, all its threads together
/// (those that exited included): `utime` + `stime` of `/proc/<pid>/stat`, whose unit is the
/// clock tick of `sysconf(_SC_CLK_TCK)`.
#[must_use]
pub fn cpu_time(pid: u32) -> Duration {
    let stat = procfs::process::Process::new(i32::try_from(pid).expect("pids fit in i32"))
        .and_then(|process| process.stat())
        .unwrap_or_else(|error| panic!("read the stat of pid {pid}: {error}"));
    let ticks = u128::from(stat.utime + stat.stime);
    let nanos = ticks * 1_000_000_000 / u128::from(procfs::ticks_per_second());
    Duration::from_nanos(u64::try_from(nanos).expect("CPU time fits in u64 nanoseconds"))
}

/// Restricts every thread of process `pid` to CPU `cpu` (`sched_setaffinity` on each thread
/// id under `/proc/<pid>/task`), or with `None` lets them run on every CPU this thread may
/// use. Threads started later inherit the mask of the thread that starts them; a thread
/// started while this runs is caught by the pass that repeats until no thread is new. A thread
/// that exits meanwhile is skipped.
pub fn set_affinity(pid: u32, cpu: Option<usize>) {
    let cpus = cpu.map_or_else(
        || sched_getaffinity(None).unwrap_or_else(|error| panic!("read my affinity: {error}")),
        |cpu| {
            let mut one = CpuSet::new();
            one.set(cpu);
            one
        },
    );
    let mut done = BTreeSet::new();
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap_or_else(|error| panic!("list the threads of pid {pid}: {error}"));
        let new: Vec<i32> = tasks
            .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
            .filter(|tid| !done.contains(tid))
            .collect();
        if new.is_empty() {
            return;
        }
        for tid in new {
            let thread = Pid::from_raw(tid).expect("thread ids are positive");
            match sched_setaffinity(Some(thread), &cpus) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(error) => panic!("set the affinity of thread {tid} of pid {pid}: {error}"),
            }
            done.insert(tid);
        }
    }
}

/// How many descriptors process `pid` holds open.
#[must_use]
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|error| panic!("list the descriptors of pid {pid}: {error}"))
        .count()
}

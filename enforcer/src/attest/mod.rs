//! Workload attestation: the facts of a local process, read race-free from procfs.
//!
//! A process is pinned before anything is read: a pidfd (`pidfd_open`) plus a directory handle
//! on `/proc/<pid>` and its start time from `/proc/<pid>/stat`. Every fact is then read through
//! that handle, and at the end the start time is read again and the pidfd polled: a process
//! that exited, or a pid that now names another process, is an error, never a wrong identity.
//!
//! The binary is hashed through `/proc/<pid>/exe`, i.e. the inode the process runs: replacing
//! the file on disk after start does not change a running process's hash; `exec` does. An
//! `exec` of another binary while the facts are read is an error (the facts would mix two
//! images).
//!
//! What else runs in the process is read too ([`ProcessFacts::loaded_code`], see
//! [`LoadedCodeIssue`]): loader variables in its initial environment and executable mappings
//! of files a non-root user could have written. The registry refuses a `unix:sha256` entry's
//! match when there are any, since the pin vouches for the code the loader maps as well.
//!
//! Results are cached per pid, each entry holding the process's pidfd. A cached result is used
//! only while that pidfd says the process is alive (so a reused pid is never served another
//! process's facts) and `/proc/<pid>/exe` is still the same inode (so an `exec` of another
//! binary is never served stale facts), and for at most `cache_ttl`, after which uid, gid and
//! cgroup (which a process can change without `exec`) are read again. Each cached entry holds
//! one file descriptor.
//!
//! An `exec` of the *same* binary (same inode) changes nothing userspace can check cheaply and
//! reliably (`/proc/<pid>/stat`'s start time and name stay; addresses are the process's to
//! choose once it disables randomization; a handle on the old memory stays valid while another
//! process shares it), yet the new image may have been started with `LD_PRELOAD`. The kernel
//! knows: it gives a process a new *image generation* on every exec (and exit and cgroup
//! move). [`Attestor::attest_for`] takes the generation the caller read from the kernel and
//! serves a cached entry only when it was made for that same generation, so an exec always
//! invalidates it. [`Attestor::attest`], which has no generation, relies on the inode check,
//! the time limit and the daemon dropping entries on the kernel's EXEC and EXIT events
//! ([`Attestor::forget`]): it can serve the old image's facts for up to `cache_ttl` after a
//! same-binary exec, and is for callers that know no generation.
#![forbid(unsafe_code)]

mod accounts;
mod container;
mod hash;
mod loaded;
mod selector;

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read as _},
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use procfs::{ProcError, process::Process};
use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    fs::{AtFlags, OFlags, StatxFlags, makedev, statx},
    process::{Pid, PidfdFlags, pidfd_open},
};

pub use accounts::Accounts;
pub use container::ContainerInfo;
pub(crate) use hash::ExeHasher;
pub use hash::{DigestParseError, HashError, Sha256Digest};
pub use loaded::{LoadedCodeIssue, MappingProblem};
pub(crate) use selector::cgroup_path_problem;
pub use selector::{Selector, SelectorError};

/// Default cap on the size of a binary the attestor hashes (a guard against hashing huge files).
pub const DEFAULT_MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;

/// Default number of binary digests kept.
pub const DEFAULT_HASH_CACHE_ENTRIES: usize = 4096;

/// Default time a cached attestation is served before uid, gid and cgroup are read again.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);

/// Default number of processes whose attestation is cached (one pidfd each).
pub const DEFAULT_FACTS_CACHE_ENTRIES: usize = 4096;

/// Errors of attestation.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// No process has this pid.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: u32,
    },
    /// The process exited while it was being attested.
    #[error("process {pid} exited during attestation")]
    Exited {
        /// The pid.
        pid: u32,
    },
    /// The process exec'd another binary while it was being attested.
    #[error("process {pid} exec'd another binary during attestation")]
    Exec {
        /// The pid.
        pid: u32,
    },
    /// The pid named another process at the end than at the start.
    #[error("pid {pid} was reused during attestation (start time {before} then {after})")]
    PidReused {
        /// The pid.
        pid: u32,
        /// Start time (clock ticks after boot) when pinned.
        before: u64,
        /// Start time when re-checked.
        after: u64,
    },
    /// A procfs file could not be read.
    #[error("failed to read /proc/{pid}/{file}")]
    Proc {
        /// The pid.
        pid: u32,
        /// The file below `/proc/<pid>`.
        file: &'static str,
        /// Why.
        #[source]
        source: ProcError,
    },
    /// A procfs file had unexpected contents.
    #[error("unexpected contents in /proc/{pid}/{file}: {what}")]
    Format {
        /// The pid.
        pid: u32,
        /// The file below `/proc/<pid>`.
        file: &'static str,
        /// What was wrong.
        what: String,
    },
    /// A system call on the process failed.
    #[error("{call} for pid {pid} failed")]
    Sys {
        /// The pid.
        pid: u32,
        /// The call.
        call: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The running binary could not be hashed.
    #[error("failed to hash the binary of pid {pid}")]
    Hash {
        /// The pid.
        pid: u32,
        /// Why.
        #[source]
        source: HashError,
    },
}

/// Everything attestation knows about a process; selectors match against this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessFacts {
    /// Process id (tgid).
    pub pid: u32,
    /// Start time in clock ticks after boot (with the pid, a unique name for the process).
    pub start_time: u64,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Name of `uid` in `/etc/passwd`.
    pub user: Option<String>,
    /// Name of `gid` in `/etc/group`.
    pub group: Option<String>,
    /// Path of the binary (`/proc/<pid>/exe`; ends in ` (deleted)` if it was removed).
    pub exe: PathBuf,
    /// SHA-256 of the running binary.
    pub sha256: Sha256Digest,
    /// cgroup v2 path, relative to the cgroup2 mount (`/` for the root).
    pub cgroup: String,
    /// cgroup id (the inode of the cgroup directory), when the cgroup2 mount is known.
    pub cgroup_id: Option<u64>,
    /// Container id and pod uid parsed from the cgroup path.
    pub container: ContainerInfo,
    /// Inode of the process's network namespace.
    pub netns: u64,
    /// Why the code in the process may be more than its binary: loader variables in its
    /// initial environment, executable mappings of files a non-root user could have written.
    /// Empty when there is nothing of the kind.
    pub loaded_code: Vec<LoadedCodeIssue>,
}

/// Settings of an [`Attestor`].
#[derive(Clone, Debug)]
pub struct AttestOptions {
    /// Where cgroup v2 is mounted (for cgroup ids); `None` leaves ids out.
    pub cgroup2_mount: Option<PathBuf>,
    /// Binaries above this size are not hashed (attestation fails with a clear reason).
    pub max_binary_bytes: u64,
    /// How many binary digests to keep.
    pub hash_cache_entries: usize,
    /// Account tables for user and group names.
    pub accounts: Accounts,
    /// How long a cached attestation is served (zero disables the cache).
    pub cache_ttl: Duration,
    /// How many processes' attestations are cached.
    pub facts_cache_entries: usize,
}

impl Default for AttestOptions {
    fn default() -> Self {
        Self {
            cgroup2_mount: crate::kernel::cgroup2_mount().ok(),
            max_binary_bytes: DEFAULT_MAX_BINARY_BYTES,
            hash_cache_entries: DEFAULT_HASH_CACHE_ENTRIES,
            accounts: Accounts::load(),
            cache_ttl: DEFAULT_CACHE_TTL,
            facts_cache_entries: DEFAULT_FACTS_CACHE_ENTRIES,
        }
    }
}

/// Reads [`ProcessFacts`] for pids.
#[derive(Debug)]
pub struct Attestor {
    hasher: ExeHasher,
    options: AttestOptions,
    cache: Mutex<HashMap<u32, Cached>>,
}

/// A cached attestation and what must still hold for it to be served.
#[derive(Debug)]
struct Cached {
    facts: ProcessFacts,
    exe: (u64, u64),
    /// The kernel's image generation the facts were read for, when the caller gave one.
    generation: Option<u64>,
    at: Instant,
    pidfd: OwnedFd,
}

impl Attestor {
    /// An attestor with `options`.
    #[must_use]
    pub fn new(options: AttestOptions) -> Self {
        Self {
            hasher: ExeHasher::new(options.max_binary_bytes, options.hash_cache_entries),
            options,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Attest `pid`, from the cache when the process is provably the one cached (same start
    /// time, same binary inode) and the entry is fresh; otherwise [`Attestor::attest_fresh`].
    /// A same-binary `exec` goes unnoticed until the entry expires or is forgotten: prefer
    /// [`Attestor::attest_for`] wherever the kernel's image generation is known.
    pub fn attest(&self, pid: u32) -> Result<ProcessFacts, AttestError> {
        self.attest_cached(pid, None)
    }

    /// Attest the image of `pid` whose kernel image generation is `generation` (read by the
    /// caller before this call): like [`Attestor::attest`], but a cached entry is served only
    /// if it was made for this same generation, so any `exec` since (even of the same binary)
    /// means a fresh attestation.
    pub fn attest_for(&self, pid: u32, generation: u64) -> Result<ProcessFacts, AttestError> {
        self.attest_cached(pid, Some(generation))
    }

    /// The cached facts of image `generation` of `pid`, if the cache holds them and they still
    /// hold; never a fresh attestation (a poll of the cached pidfd and a `stat` of the binary's
    /// link, nothing read, nothing hashed).
    pub fn cached_for(&self, pid: u32, generation: u64) -> Option<ProcessFacts> {
        self.cached(pid, Some(generation))
    }

    fn attest_cached(
        &self,
        pid: u32,
        generation: Option<u64>,
    ) -> Result<ProcessFacts, AttestError> {
        if let Some(facts) = self.cached(pid, generation) {
            return Ok(facts);
        }
        let pinned = Pinned::open(pid)?;
        let (facts, exe) = self.read_confirmed(&pinned)?;
        if !self.options.cache_ttl.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= self.options.facts_cache_entries.max(1) {
                cache.clear();
            }
            cache.insert(
                pid,
                Cached {
                    facts: facts.clone(),
                    exe,
                    generation,
                    at: Instant::now(),
                    pidfd: pinned.pidfd,
                },
            );
        }
        Ok(facts)
    }

    /// Attest `pid` ignoring the cache: pin it, read every fact, and confirm it is still the
    /// same process.
    pub fn attest_fresh(&self, pid: u32) -> Result<ProcessFacts, AttestError> {
        let pinned = Pinned::open(pid)?;
        self.read_confirmed(&pinned).map(|(facts, _)| facts)
    }

    /// Drop the cached attestation of `pid` (on exec or exit).
    pub fn forget(&self, pid: u32) {
        self.lock().remove(&pid);
    }

    /// The cached facts of `pid`, if they still hold (for image `generation`, when given).
    fn cached(&self, pid: u32, generation: Option<u64>) -> Option<ProcessFacts> {
        let mut cache = self.lock();
        let entry = cache.get(&pid)?;
        // An entry of another (or an unknown) generation is not even looked at: it may be the
        // image before an exec. Replacing it is up to the fresh attestation that follows.
        if generation.is_some() && entry.generation != generation {
            return None;
        }
        // The pidfd names the cached process instance: if it exited, the pid may name another.
        let valid = entry.at.elapsed() < self.options.cache_ttl
            && !exited(&entry.pidfd)
            && exe_inode(pid).ok() == Some(entry.exe);
        if valid {
            Some(entry.facts.clone())
        } else {
            cache.remove(&pid);
            None
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Cached>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every fact of `pinned`, and the (device, inode) of the binary that was hashed; then
    /// confirms that the process is still the one pinned and still runs that binary (an exec
    /// of another binary in between would mix two images' facts).
    fn read_confirmed(&self, pinned: &Pinned) -> Result<(ProcessFacts, (u64, u64)), AttestError> {
        let (facts, hashed) = self.read_facts(pinned)?;
        pinned.confirm()?;
        let running = pinned
            .open_path("exe")
            .and_then(|exe| exe.metadata())
            .map(|meta| (meta.dev(), meta.ino()))
            .map_err(|source| AttestError::Sys {
                pid: pinned.pid,
                call: "stat(exe)",
                source,
            })?;
        if running != hashed {
            return Err(AttestError::Exec { pid: pinned.pid });
        }
        Ok((facts, hashed))
    }

    fn read_facts(&self, pinned: &Pinned) -> Result<(ProcessFacts, (u64, u64)), AttestError> {
        let pid = pinned.pid;
        let (uid, gid) =
            parse_status_ids(&pinned.read_text("status")?).ok_or_else(|| AttestError::Format {
                pid,
                file: "status",
                what: "no Uid/Gid lines".to_owned(),
            })?;
        let exe = pinned
            .process
            .exe()
            .map_err(|source| pinned.proc_error("exe", source))?;
        let mut binary = pinned.open_file("exe")?;
        let sha256 = self
            .hasher
            .digest(&mut binary)
            .map_err(|source| AttestError::Hash { pid, source })?;
        let hashed = binary
            .metadata()
            .map(|meta| (meta.dev(), meta.ino()))
            .map_err(|source| AttestError::Sys {
                pid,
                call: "fstat(exe)",
                source,
            })?;
        let cgroup =
            parse_cgroup_v2(&pinned.read_text("cgroup")?).ok_or_else(|| AttestError::Format {
                pid,
                file: "cgroup",
                what: "no cgroup v2 (0::) line".to_owned(),
            })?;
        // The mount is known to be cgroup2, so the directory's inode is the cgroup id.
        let cgroup_id = self.options.cgroup2_mount.as_deref().and_then(|mount| {
            std::fs::metadata(mount.join(cgroup.trim_start_matches('/')))
                .ok()
                .map(|meta| meta.ino())
        });
        let netns = pinned
            .open_file("ns/net")?
            .metadata()
            .map_err(|source| AttestError::Sys {
                pid,
                call: "fstat(ns/net)",
                source,
            })?
            .ino();
        let loaded_code = loaded_code(pinned, hashed)?;
        let accounts = &self.options.accounts;
        let facts = ProcessFacts {
            pid,
            start_time: pinned.start_time,
            uid,
            gid,
            user: accounts.user(uid).map(str::to_owned),
            group: accounts.group(gid).map(str::to_owned),
            exe,
            sha256,
            container: container::parse(&cgroup),
            cgroup,
            cgroup_id,
            netns,
            loaded_code,
        };
        Ok((facts, hashed))
    }
}

/// What besides its binary `exe` (device, inode) may run in `pinned`: loader variables first,
/// then mappings. The maps are read before the environment: an `exec` in between then shows
/// the newer image's environment, which its loader read before it mapped anything.
fn loaded_code(pinned: &Pinned, exe: (u64, u64)) -> Result<Vec<LoadedCodeIssue>, AttestError> {
    let pid = pinned.pid;
    let mappings =
        loaded::parse_maps(&pinned.read_bytes("maps")?).map_err(|error| AttestError::Format {
            pid,
            file: "maps",
            what: error.to_string(),
        })?;
    // One directory handle, then one statx per mapped file (following its magic link).
    let map_files = pinned.open_path("map_files");
    let mapped = loaded::mapping_issues(&mappings, exe, |mapping| {
        let dir = map_files
            .as_ref()
            .map_err(|error| io::Error::from(error.kind()))?;
        let wanted = StatxFlags::INO | StatxFlags::UID | StatxFlags::MODE | StatxFlags::NLINK;
        let stat = statx(dir, mapping.map_files_name(), AtFlags::empty(), wanted)?;
        Ok(loaded::FileStat {
            dev: makedev(stat.stx_dev_major, stat.stx_dev_minor),
            ino: stat.stx_ino,
            uid: stat.stx_uid,
            mode: u32::from(stat.stx_mode),
            nlink: u64::from(stat.stx_nlink),
        })
    });
    let mut issues = loaded::loader_variables(&pinned.read_bytes("environ")?);
    issues.extend(mapped);
    Ok(issues)
}

/// A process held still for attestation: pidfd, `/proc/<pid>` handle and start time.
struct Pinned {
    pid: u32,
    pidfd: OwnedFd,
    process: Process,
    start_time: u64,
}

impl Pinned {
    fn open(pid: u32) -> Result<Self, AttestError> {
        let raw = Pid::from_raw(i32::try_from(pid).unwrap_or(0))
            .ok_or(AttestError::NoSuchProcess { pid })?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|error| {
            if error == rustix::io::Errno::SRCH {
                AttestError::NoSuchProcess { pid }
            } else {
                AttestError::Sys {
                    pid,
                    call: "pidfd_open",
                    source: error.into(),
                }
            }
        })?;
        let process = Process::new(raw.as_raw_nonzero().get()).map_err(|source| match source {
            ProcError::NotFound(_) => AttestError::NoSuchProcess { pid },
            source => AttestError::Proc {
                pid,
                file: "",
                source,
            },
        })?;
        let mut pinned = Self {
            pid,
            pidfd,
            process,
            start_time: 0,
        };
        pinned.start_time = pinned.read_start_time()?;
        Ok(pinned)
    }

    /// The process is still alive and still the one pinned.
    fn confirm(&self) -> Result<(), AttestError> {
        let after = self.read_start_time()?;
        if after != self.start_time {
            return Err(AttestError::PidReused {
                pid: self.pid,
                before: self.start_time,
                after,
            });
        }
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let ready =
            poll(&mut fds, Some(&Timespec::default())).map_err(|error| AttestError::Sys {
                pid: self.pid,
                call: "poll(pidfd)",
                source: error.into(),
            })?;
        // A pidfd becomes readable when its process exits.
        if ready > 0 {
            return Err(AttestError::Exited { pid: self.pid });
        }
        Ok(())
    }

    fn read_start_time(&self) -> Result<u64, AttestError> {
        self.process
            .stat()
            .map(|stat| stat.starttime)
            .map_err(|source| self.proc_error("stat", source))
    }

    fn open_file(&self, file: &'static str) -> Result<File, AttestError> {
        self.process
            .open_relative(file)
            .map_err(|source| self.proc_error(file, source))
    }

    fn read_bytes(&self, file: &'static str) -> Result<Vec<u8>, AttestError> {
        let mut bytes = Vec::new();
        self.open_file(file)?
            .read_to_end(&mut bytes)
            .map_err(|source| AttestError::Sys {
                pid: self.pid,
                call: "read",
                source,
            })?;
        Ok(bytes)
    }

    /// A path-only handle (`O_PATH`) on what `path` below `/proc/<pid>` leads to, following a
    /// final magic link (`exe`) to the very inode the process uses; nothing is opened for
    /// reading.
    fn open_path(&self, path: &str) -> io::Result<File> {
        self.process
            .open_relative_flags(path, OFlags::PATH | OFlags::CLOEXEC)
            .map_err(|error| match error {
                ProcError::PermissionDenied(_) => io::ErrorKind::PermissionDenied.into(),
                ProcError::NotFound(_) => io::ErrorKind::NotFound.into(),
                ProcError::Io(error, _) => error,
                error => io::Error::other(error.to_string()),
            })
    }

    fn read_text(&self, file: &'static str) -> Result<String, AttestError> {
        let mut text = String::new();
        self.open_file(file)?
            .read_to_string(&mut text)
            .map_err(|source| AttestError::Sys {
                pid: self.pid,
                call: "read",
                source,
            })?;
        Ok(text)
    }

    /// A procfs error; "not found" on a pinned process means it has exited.
    fn proc_error(&self, file: &'static str, source: ProcError) -> AttestError {
        match source {
            ProcError::NotFound(_) => AttestError::Exited { pid: self.pid },
            source => AttestError::Proc {
                pid: self.pid,
                file,
                source,
            },
        }
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable then); an error
/// counts as exited.
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    poll(&mut fds, Some(&Timespec::default())).map_or(true, |ready| ready > 0)
}

/// (device, inode) of the binary `pid` runs.
fn exe_inode(pid: u32) -> Result<(u64, u64), AttestError> {
    let meta =
        std::fs::metadata(format!("/proc/{pid}/exe")).map_err(|source| AttestError::Sys {
            pid,
            call: "stat exe",
            source,
        })?;
    Ok((meta.dev(), meta.ino()))
}

/// Effective uid and gid from the text of `/proc/<pid>/status`.
fn parse_status_ids(status: &str) -> Option<(u32, u32)> {
    let effective = |key: &str| -> Option<u32> {
        let line = status.lines().find_map(|line| line.strip_prefix(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((effective("Uid:")?, effective("Gid:")?))
}

/// The cgroup v2 path from the text of `/proc/<pid>/cgroup` (the `0::<path>` line).
pub(crate) fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The cgroup v2 path of a cgroup directory below `mount`, as `/proc/<pid>/cgroup` writes it.
#[must_use]
pub fn cgroup_relative_path(mount: &Path, dir: &Path) -> Option<String> {
    let relative = dir.strip_prefix(mount).ok()?;
    Some(format!("/{}", relative.display()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{cgroup_relative_path, parse_cgroup_v2, parse_status_ids};

    #[test]
    fn parses_effective_ids() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t65534\t0\t0\n";
        assert_eq!(parse_status_ids(status), Some((0, 65534)));
        assert_eq!(parse_status_ids("Name:\tx\n"), None);
    }

    #[test]
    fn finds_the_v2_line_in_hybrid_and_pure_layouts() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/enf-1-0-app\n";
        assert_eq!(parse_cgroup_v2(hybrid).as_deref(), Some("/enf-1-0-app"));
        assert_eq!(parse_cgroup_v2("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_cgroup_v2("4:memory:/x\n"), None);
    }

    #[test]
    fn relative_cgroup_paths() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            cgroup_relative_path(mount, &mount.join("a/b")).as_deref(),
            Some("/a/b")
        );
        assert_eq!(cgroup_relative_path(mount, Path::new("/tmp")), None);
    }
}

#[cfg(test)]
mod pin_tests {
    use std::process::Command;

    use super::{AttestError, Pinned};

    #[test]
    fn a_process_that_exits_after_pinning_is_an_error_not_an_identity() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pinned = Pinned::open(child.id()).unwrap();
        assert!(pinned.confirm().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        match pinned.confirm() {
            Err(AttestError::Exited { pid }) => assert_eq!(pid, child.id()),
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_pid_is_reported_as_such() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(matches!(
            Pinned::open(pid),
            Err(AttestError::NoSuchProcess { .. })
        ));
    }
}

//! Scratch cgroups: created under the cgroup v2 mount for one test, removed when dropped.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{report, unique_name};
use crate::kernel::{cgroup_id, cgroup2_mount};

/// How long to wait for processes in a cgroup to finish exiting before killing them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts to remove a busy cgroup.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// A cgroup created for a test, directly under the cgroup v2 mount or inside another scratch
/// cgroup; removed, with any process still in it killed, when the last clone is dropped.
///
/// Clones share the one cgroup. Only directories this type created are ever removed, and never
/// the root cgroup.
#[derive(Debug, Clone)]
#[must_use = "the cgroup is removed as soon as the guard is dropped"]
pub struct ScratchCgroup {
    dir: Arc<CgroupDir>,
}

impl ScratchCgroup {
    /// Creates `<cgroup2 mount>/enf-<pid>-<n>-<hint>`.
    pub fn new(hint: &str) -> Self {
        let mount = cgroup2_mount()
            .unwrap_or_else(|error| panic!("cannot create a scratch cgroup: {}", report(&error)));
        Self::create(mount.join(unique_name(hint)), None)
    }

    /// Creates the cgroup `name` inside this one; it keeps this one alive until it is removed.
    pub fn child(&self, name: &str) -> Self {
        assert!(
            !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
            "{name:?} is not a valid cgroup name: it must be one non-empty path component"
        );
        Self::create(self.path().join(name), Some(Arc::clone(&self.dir)))
    }

    fn create(path: PathBuf, parent: Option<Arc<CgroupDir>>) -> Self {
        fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("failed to create cgroup {}: {error}", path.display()));
        Self {
            dir: Arc::new(CgroupDir {
                path,
                _parent: parent,
            }),
        }
    }

    /// The cgroup's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// The cgroup's path as policies write it: relative to the cgroup2 mount, with a leading `/`.
    #[must_use]
    pub fn policy_path(&self) -> String {
        let mount = cgroup2_mount().unwrap_or_else(|error| panic!("{}", report(&error)));
        crate::attest::cgroup_relative_path(&mount, self.path())
            .unwrap_or_else(|| panic!("{} is not below {}", self.path().display(), mount.display()))
    }

    /// The id `bpf_get_current_cgroup_id()` returns for processes in this cgroup.
    #[must_use]
    pub fn id(&self) -> u64 {
        cgroup_id(self.path()).unwrap_or_else(|error| panic!("{}", report(&error)))
    }

    /// The cgroup's directory opened read-only, as BPF program attachment needs it.
    #[must_use]
    pub fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|error| {
            panic!("failed to open cgroup {}: {error}", self.path().display())
        })
    }

    /// The processes directly in this cgroup (not in its children), from `cgroup.procs`.
    #[must_use]
    pub fn procs(&self) -> Vec<u32> {
        read_procs(self.path()).unwrap_or_else(|error| {
            panic!(
                "failed to read {}: {error}",
                self.path().join("cgroup.procs").display()
            )
        })
    }
}

/// A cgroup directory this harness created; removing it is the whole point of the type.
#[derive(Debug)]
struct CgroupDir {
    path: PathBuf,
    /// The enclosing scratch cgroup, which must outlive this one.
    _parent: Option<Arc<CgroupDir>>,
}

impl Drop for CgroupDir {
    /// Removes the cgroup: waits for exiting processes, then kills what is left (the tests
    /// placed it there) and tries again. Warns instead of panicking, which could abort an
    /// unwinding test.
    fn drop(&mut self) {
        let error = match remove_within(&self.path, DRAIN_TIMEOUT) {
            Ok(()) => return,
            Err(error) if error.kind() == io::ErrorKind::ResourceBusy => error,
            Err(error) => {
                warn(&self.path, &error);
                return;
            }
        };
        let kill = self.path.join("cgroup.kill");
        if let Err(kill_error) = fs::write(&kill, "1") {
            eprintln!(
                "warning: failed to write 1 to {} after {error}: {kill_error}",
                kill.display()
            );
        }
        if let Err(error) = remove_within(&self.path, DRAIN_TIMEOUT) {
            warn(&self.path, &error);
        }
    }
}

/// Removes the cgroup at `path`, retrying while it is busy for up to `timeout`.
pub(super) fn remove_within(path: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.kind() == io::ErrorKind::ResourceBusy && Instant::now() < deadline =>
            {
                thread::sleep(RETRY_INTERVAL);
            }
            Err(error) => return Err(error),
        }
    }
}

fn warn(path: &Path, error: &io::Error) {
    let procs = read_procs(path).unwrap_or_default();
    eprintln!(
        "warning: failed to remove scratch cgroup {}: {error} (processes still in it: {procs:?})",
        path.display()
    );
}

fn read_procs(cgroup: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(cgroup.join("cgroup.procs"))?;
    text.lines()
        .map(|line| {
            line.trim().parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad pid {line:?}"))
            })
        })
        .collect()
}

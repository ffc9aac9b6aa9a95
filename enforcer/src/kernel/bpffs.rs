//! The BPF filesystem, where pinned maps and links outlive the process that loaded them.
//!
//! Many hosts do not mount it by default; the daemon mounts it before pinning anything.

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use super::cgroup::{MOUNTINFO, parse_mountinfo, read_mountinfo};

/// Errors from checking for or mounting a BPF filesystem.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// The mount table could not be read.
    #[error("failed to read {}", path.display())]
    ReadMountinfo {
        /// The mount table that was being read.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// The directory exists but could not be inspected.
    #[error("failed to stat {}", path.display())]
    Stat {
        /// The directory meant to hold bpffs.
        path: PathBuf,
        /// Why inspecting it failed.
        #[source]
        source: io::Error,
    },
    /// The directory to mount bpffs on could not be created.
    #[error("failed to create {}", path.display())]
    CreateDir {
        /// The directory meant to hold bpffs.
        path: PathBuf,
        /// Why creating it failed.
        #[source]
        source: io::Error,
    },
    /// The `mount` program could not be started.
    #[error("failed to run `mount -t bpf bpf {}`", path.display())]
    SpawnMount {
        /// The directory meant to hold bpffs.
        path: PathBuf,
        /// Why starting `mount` failed.
        #[source]
        source: io::Error,
    },
    /// `mount -t bpf` ran and failed.
    #[error("`mount -t bpf bpf {}` failed ({status}): {stderr}", path.display())]
    Mount {
        /// The directory meant to hold bpffs.
        path: PathBuf,
        /// How `mount` exited.
        status: ExitStatus,
        /// What `mount` printed on stderr.
        stderr: String,
    },
    /// `mount` reported success, yet the directory is still not on a bpf filesystem.
    #[error("{} is still not a bpf filesystem after mounting one there", path.display())]
    NotMounted {
        /// The directory meant to hold bpffs.
        path: PathBuf,
    },
}

/// Whether `dir` exists and lies on a bpf filesystem (it may be a directory inside one).
///
/// Any failure to find out counts as "no"; [`ensure_bpffs`] reports such failures.
#[must_use]
pub fn is_bpffs(dir: &Path) -> bool {
    on_bpffs(dir).unwrap_or(false)
}

/// Makes sure `dir` (usually `/sys/fs/bpf`) is on a bpf filesystem, mounting one if needed.
///
/// A directory already on bpffs, or one created inside an existing bpffs, is left as it is;
/// otherwise the directory is created and `mount -t bpf bpf DIR` is run.
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpffsError> {
    if on_bpffs(dir)? {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| BpffsError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    if on_bpffs(dir)? {
        return Ok(());
    }
    let output = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .output()
        .map_err(|source| BpffsError::SpawnMount {
            path: dir.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(BpffsError::Mount {
            path: dir.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    if on_bpffs(dir)? {
        Ok(())
    } else {
        Err(BpffsError::NotMounted {
            path: dir.to_owned(),
        })
    }
}

/// Whether `dir` lies on a bpf filesystem; a missing `dir` does not.
///
/// Compares the device number of `dir` with those of the bpf mounts in the mount table, which
/// also holds for directories inside a bpffs and is not fooled by mounts stacked over others.
fn on_bpffs(dir: &Path) -> Result<bool, BpffsError> {
    let metadata = match fs::metadata(dir) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(BpffsError::Stat {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mountinfo = read_mountinfo().map_err(|source| BpffsError::ReadMountinfo {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    let dev = metadata.dev();
    Ok(is_bpf_device(
        &mountinfo,
        (libc::major(dev), libc::minor(dev)),
    ))
}

/// Whether the filesystem with device number `dev` is listed in `mountinfo` as type `bpf`.
fn is_bpf_device(mountinfo: &str, dev: (u32, u32)) -> bool {
    parse_mountinfo(mountinfo).any(|mount| mount.dev == dev && mount.fstype == "bpf")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_WITH_BPFFS: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
37 24 0:32 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:11 - bpf bpf rw,mode=700
90 22 0:77 / /tmp/enforcer\\040pins rw,relatime shared:40 - bpf bpf rw
";

    #[test]
    fn recognises_bpf_mounts_by_device() {
        assert!(is_bpf_device(MOUNTINFO_WITH_BPFFS, (0, 32)));
        assert!(is_bpf_device(MOUNTINFO_WITH_BPFFS, (0, 77)));
    }

    #[test]
    fn other_filesystems_are_not_bpffs() {
        assert!(!is_bpf_device(MOUNTINFO_WITH_BPFFS, (0, 22)));
        assert!(!is_bpf_device(MOUNTINFO_WITH_BPFFS, (253, 1)));
        assert!(!is_bpf_device(MOUNTINFO_WITH_BPFFS, (0, 99)));
    }

    #[test]
    fn no_bpf_mount_at_all() {
        let without = "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                       24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw\n";
        assert!(!is_bpf_device(without, (0, 22)));
        assert!(!is_bpf_device("", (0, 32)));
    }

    #[test]
    fn a_missing_directory_is_not_bpffs() {
        assert!(!is_bpffs(Path::new("/nonexistent/enforcer/bpffs")));
    }
}

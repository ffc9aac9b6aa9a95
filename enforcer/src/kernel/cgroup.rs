//! cgroup v2 facts: where the unified hierarchy is mounted and how the kernel names a cgroup.
//!
//! The eBPF programs see a workload's cgroup only as the number `bpf_get_current_cgroup_id()`
//! returns; userspace derives the same number from the cgroup directory so that policy written
//! against paths can be matched in the kernel.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The kernel's table of the calling process's mounts.
pub(super) const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Errors from locating the cgroup v2 hierarchy or identifying a cgroup in it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mount table could not be read.
    #[error("failed to read {}", path.display())]
    ReadMountinfo {
        /// The mount table that was being read.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// The mount table lists no cgroup2 filesystem, so there is no cgroup v2 hierarchy to use.
    #[error("no cgroup2 filesystem is mounted: none is listed in {}", path.display())]
    NoCgroup2Mount {
        /// The mount table that was searched.
        path: PathBuf,
    },
    /// A path given as a cgroup (or the cgroup2 mount point itself) could not be inspected.
    #[error("failed to stat {}", path.display())]
    Stat {
        /// The path that could not be inspected.
        path: PathBuf,
        /// Why inspecting it failed.
        #[source]
        source: io::Error,
    },
    /// The path is not a directory, so it cannot be a cgroup.
    #[error("{} is not a directory, so it is not a cgroup", path.display())]
    NotADirectory {
        /// The path given as a cgroup.
        path: PathBuf,
    },
    /// The path is outside the cgroup v2 hierarchy, so its inode number is not a cgroup id.
    #[error("{} is not on the cgroup2 filesystem mounted at {}", path.display(), mount.display())]
    NotOnCgroup2 {
        /// The path given as a cgroup.
        path: PathBuf,
        /// Where the cgroup v2 hierarchy is mounted.
        mount: PathBuf,
    },
}

/// Where the cgroup v2 (unified) hierarchy is mounted, read from `/proc/self/mountinfo`.
///
/// Pure v2 systems mount it at `/sys/fs/cgroup`, hybrid ones at `/sys/fs/cgroup/unified`;
/// nothing may assume either.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = read_mountinfo().map_err(|source| CgroupError::ReadMountinfo {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    cgroup2_mount_in(&mountinfo)
}

/// [`cgroup2_mount`] for the given text of `/proc/self/mountinfo`.
fn cgroup2_mount_in(mountinfo: &str) -> Result<PathBuf, CgroupError> {
    parse_cgroup2_mount(mountinfo).ok_or_else(|| CgroupError::NoCgroup2Mount {
        path: PathBuf::from(MOUNTINFO),
    })
}

/// The id `bpf_get_current_cgroup_id()` returns for tasks in the cgroup at `path`.
///
/// On cgroup2 that id is the inode number of the cgroup's directory. The path must lie on the
/// cgroup2 filesystem: any other directory also has an inode number, but it names no cgroup.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    let mount = cgroup2_mount()?;
    let metadata = stat(path)?;
    if !metadata.is_dir() {
        return Err(CgroupError::NotADirectory {
            path: path.to_owned(),
        });
    }
    if metadata.dev() != stat(&mount)?.dev() {
        return Err(CgroupError::NotOnCgroup2 {
            path: path.to_owned(),
            mount,
        });
    }
    Ok(metadata.ino())
}

fn stat(path: &Path) -> Result<fs::Metadata, CgroupError> {
    fs::metadata(path).map_err(|source| CgroupError::Stat {
        path: path.to_owned(),
        source,
    })
}

/// The cgroup2 mount point listed in `mountinfo` (the text of `/proc/self/mountinfo`).
///
/// A mount of the whole hierarchy (root `/`) wins over a bind mount of a sub-tree.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut cgroup2 = parse_mountinfo(mountinfo).filter(|mount| mount.fstype == "cgroup2");
    let first = cgroup2.next()?;
    if first.root == Path::new("/") {
        return Some(first.mount_point);
    }
    Some(
        cgroup2
            .find(|mount| mount.root == Path::new("/"))
            .unwrap_or(first)
            .mount_point,
    )
}

/// Reads `/proc/self/mountinfo`; bytes that are not UTF-8 (possible only in paths of
/// unrelated mounts) are replaced rather than failing the whole read.
pub(super) fn read_mountinfo() -> io::Result<String> {
    fs::read(MOUNTINFO).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// One line of `/proc/self/mountinfo`, reduced to the fields the enforcer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// Device number of the mounted filesystem as `(major, minor)` (field 3).
    pub(super) dev: (u32, u32),
    /// The directory of the filesystem that is mounted (field 4): `/` unless a bind mount.
    pub(super) root: PathBuf,
    /// Where it is mounted (field 5).
    pub(super) mount_point: PathBuf,
    /// Filesystem type (first field after the ` - ` separator).
    pub(super) fstype: String,
}

/// The well-formed lines of a mountinfo table, in order; malformed lines are skipped.
///
/// Format (proc(5)): `id parent major:minor root mount-point options [optional...] - fstype
/// source super-options`. Paths escape space, tab, newline and backslash as octal `\ooo`, so
/// the ` - ` separator and the space-separated fields are unambiguous.
pub(super) fn parse_mountinfo(mountinfo: &str) -> impl Iterator<Item = MountEntry> + '_ {
    mountinfo.lines().filter_map(parse_mountinfo_line)
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (fields, after_separator) = line.split_once(" - ")?;
    let mut fields = fields.split(' ');
    let dev = fields.nth(2)?;
    let root = fields.next()?;
    let mount_point = fields.next()?;
    let fstype = after_separator.split(' ').next()?;
    let (major, minor) = dev.split_once(':')?;
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: unescape_octal(root),
        mount_point: unescape_octal(mount_point),
        fstype: fstype.to_owned(),
    })
}

/// Decodes the `\ooo` octal escapes the kernel writes for special bytes in mountinfo paths.
fn unescape_octal(field: &str) -> PathBuf {
    let mut rest = field.as_bytes();
    let mut decoded = Vec::with_capacity(rest.len());
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'\\'
            && let Some(value) = octal_byte(tail)
        {
            decoded.push(value);
            rest = &tail[3..];
        } else {
            decoded.push(byte);
            rest = tail;
        }
    }
    PathBuf::from(OsString::from_vec(decoded))
}

/// The byte written as three octal digits at the start of `digits`, if that is what is there.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let digits = digits.get(..3)?;
    if !digits.iter().all(|digit| (b'0'..=b'7').contains(digit)) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0_u32, |value, digit| value * 8 + u32::from(digit - b'0'));
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fedora / Ubuntu 22.04 and later: cgroup v2 only.
    const PURE_V2: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
36 24 0:31 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:10 - pstore pstore rw
37 24 0:32 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:11 - bpf bpf rw,mode=700
";

    /// Ubuntu 20.04 / Debian 10 style hybrid: v1 controllers plus the unified hierarchy.
    const HYBRID: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
28 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
";

    /// Older distributions: cgroup v1 only.
    const LEGACY_V1: &str = "\
22 1 253:1 / / rw,relatime shared:1 - xfs /dev/vda1 rw
25 24 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
28 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_pure_v2_mount() {
        assert_eq!(
            parse_cgroup2_mount(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn finds_hybrid_unified_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_an_error_naming_mountinfo() {
        assert_eq!(parse_cgroup2_mount(LEGACY_V1), None);
        assert_eq!(parse_cgroup2_mount(""), None);
        let error = cgroup2_mount_in(LEGACY_V1).expect_err("v1 only has no cgroup2 mount");
        assert!(
            matches!(error, CgroupError::NoCgroup2Mount { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("/proc/self/mountinfo"),
            "{error}"
        );
    }

    #[test]
    fn whole_hierarchy_wins_over_bind_mounted_subtree() {
        let mountinfo = "\
40 22 0:30 /kubepods /var/lib/kubelet/cg rw,relatime - cgroup2 cgroup2 rw
41 22 0:30 / /run/cgroup2 rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/run/cgroup2"))
        );
        let only_subtree = "40 22 0:30 /kubepods /var/lib/kubelet/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(only_subtree),
            Some(PathBuf::from("/var/lib/kubelet/cg"))
        );
    }

    #[test]
    fn decodes_octal_escapes_in_mount_points() {
        let mountinfo =
            "50 22 0:40 / /mnt/my\\040cgroups\\011v2\\134x rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/my cgroups\tv2\\x"))
        );
    }

    #[test]
    fn leaves_malformed_escapes_alone() {
        assert_eq!(unescape_octal("/a\\9b\\04"), PathBuf::from("/a\\9b\\04"));
        assert_eq!(unescape_octal("/a\\+12"), PathBuf::from("/a\\+12"));
        assert_eq!(unescape_octal("/a\\777"), PathBuf::from("/a\\777"));
        assert_eq!(unescape_octal("/trailing\\"), PathBuf::from("/trailing\\"));
    }

    #[test]
    fn optional_fields_do_not_shift_the_fstype() {
        let line = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 propagate_from:3 - ext3 /dev/root rw,errors=continue";
        let mount = parse_mountinfo_line(line).expect("the proc(5) example parses");
        assert_eq!(
            mount,
            MountEntry {
                dev: (98, 0),
                root: PathBuf::from("/mnt1"),
                mount_point: PathBuf::from("/mnt2"),
                fstype: "ext3".to_owned(),
            }
        );
    }

    #[test]
    fn skips_malformed_lines() {
        let mountinfo =
            "garbage\n1 2 x:y / /a rw - ext4 /dev/a rw\n37 24 0:32 / /sys/fs/bpf rw - bpf bpf rw\n";
        let mounts: Vec<_> = parse_mountinfo(mountinfo).collect();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].fstype, "bpf");
    }
}

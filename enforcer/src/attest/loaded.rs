//! Loaded code: what a process's dynamic loader was told to load, and whose files the process
//! executes. A `unix:sha256` pin vouches for the binary image; these facts say whether the rest
//! of the code mapped into the process is something only root could have put there.
//!
//! Two sources, each read once per attestation under the attestor's pidfd guard:
//!
//! - `/proc/<pid>/environ`: a non-empty [`LD_PRELOAD`, `LD_AUDIT`, `LD_LIBRARY_PATH` or
//!   `LD_ORIGIN_PATH`](REFUSED_LOADER_VARIABLES) is an issue, whether or not the binary is
//!   dynamically linked. Variables that change how the loader binds or reports (`LD_BIND_NOW`,
//!   `LD_DEBUG`, `GLIBC_TUNABLES`, ...) are not: whatever it maps must pass the mapping check.
//!   That file is not a record of the environment the process was started with: the kernel
//!   reads it from the process's own memory, the area where `exec` placed the initial
//!   environment, as it is *now*. The process may overwrite that memory after start (programs
//!   that set their process title do; so can the constructor of a library it preloaded), and
//!   with `CAP_SYS_RESOURCE` point the kernel elsewhere (`prctl(PR_SET_MM)`). So this check
//!   sees what the loader read only if the process has not rewritten it. A rewrite can only
//!   hide variables the process was started with (one it adds only gets it refused), but that
//!   is enough: the loader acted on them before the process ran. What the loader mapped is
//!   still seen by the mapping check below, so a preloaded library a non-root user could write
//!   is refused all the same; a root-owned library only root can write, preloaded and then
//!   hidden, is not flagged by either check (README, Limits).
//! - `/proc/<pid>/maps`: every executable mapping of a file other than the main binary (whose
//!   hash is checked instead) must be of a file no non-root user could have written: owned by
//!   uid 0, not group or world writable, not deleted. Each is examined through
//!   `/proc/<pid>/map_files/<start>-<end>`, i.e. the exact inode mapped, not whatever sits at
//!   its path now (following those links needs `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`);
//!   a mapping that cannot be examined is an issue, never a pass.
//!
//! Anonymous executable memory (JIT code, `[vdso]`) is not examined: code written into memory
//! at run time is outside what a hash of files can vouch for.
#![forbid(unsafe_code)]

use std::{collections::HashSet, ffi::OsStr, fmt, io, os::unix::ffi::OsStrExt as _, path::PathBuf};

/// Loader variables that name code to load or a place to look for it; a process started with
/// any of them set (non-empty) has code its binary's hash does not vouch for.
pub(super) const REFUSED_LOADER_VARIABLES: [&str; 4] = [
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "LD_ORIGIN_PATH",
];

/// How much of a loader variable's value an issue keeps (values may be up to 128 KiB).
const MAX_VALUE_CHARS: usize = 256;

/// What maps the dynamic loader may have brought into a process beyond its pinned binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadedCodeIssue {
    /// The initial environment asks the dynamic loader to load, or look for, more code.
    LoaderVariable {
        /// The variable, one of [`REFUSED_LOADER_VARIABLES`].
        name: &'static str,
        /// Its value (the first 256 characters, lossy UTF-8).
        value: String,
    },
    /// An executable mapping of a file that a non-root user could have written, or that could
    /// not be shown not to be.
    Mapping {
        /// The file as `/proc/<pid>/maps` names it (without ` (deleted)`).
        path: PathBuf,
        /// What is wrong with it.
        problem: MappingProblem,
    },
}

/// Why an executable mapping is not known to be root-controlled code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingProblem {
    /// The file is owned by this uid, not root.
    Owner(u32),
    /// The file is group or world writable (its permission bits).
    Writable(u32),
    /// The file has no name any more (deleted, or never had one: memfd, shared memory).
    Deleted,
    /// The mapping names no file on a filesystem (`anon_inode:...`, `[...]`).
    NotAFile,
    /// The mapped file could not be examined (why).
    Unexamined(String),
}

impl fmt::Display for LoadedCodeIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LoaderVariable { name, value } => {
                write!(f, "the initial environment sets {name}={value:?}")
            }
            Self::Mapping { path, problem } => {
                write!(f, "executable mapping of {}: {problem}", path.display())
            }
        }
    }
}

impl fmt::Display for MappingProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Owner(uid) => write!(f, "owned by uid {uid}, not root"),
            Self::Writable(mode) => write!(f, "group or world writable (mode {mode:04o})"),
            Self::Deleted => f.write_str("the file is deleted"),
            Self::NotAFile => f.write_str("not a file on a filesystem"),
            Self::Unexamined(why) => write!(f, "cannot be examined ({why})"),
        }
    }
}

/// The refused loader variables set to a non-empty value in `environ`, the NUL-separated
/// `NAME=value` entries of `/proc/<pid>/environ`.
pub(super) fn loader_variables(environ: &[u8]) -> Vec<LoadedCodeIssue> {
    let mut issues = Vec::new();
    for entry in environ.split(|&byte| byte == 0) {
        let Some(equals) = entry.iter().position(|&byte| byte == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..equals], &entry[equals + 1..]);
        let Some(name) = REFUSED_LOADER_VARIABLES
            .into_iter()
            .find(|refused| refused.as_bytes() == name)
        else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let issue = LoadedCodeIssue::LoaderVariable {
            name,
            value: String::from_utf8_lossy(value)
                .chars()
                .take(MAX_VALUE_CHARS)
                .collect(),
        };
        if !issues.contains(&issue) {
            issues.push(issue);
        }
    }
    issues
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Mapping {
    /// First address.
    pub(super) start: u64,
    /// Address after the last.
    pub(super) end: u64,
    /// The `x` permission is set.
    pub(super) executable: bool,
    /// Device (major, minor) of the mapped file; (0, 0) for anonymous memory.
    pub(super) device: (u32, u32),
    /// Inode of the mapped file; 0 for anonymous memory.
    pub(super) inode: u64,
    /// The name column without ` (deleted)`: a path, `[heap]`-style, or empty.
    pub(super) name: PathBuf,
    /// The name ended in ` (deleted)`.
    pub(super) deleted: bool,
}

impl Mapping {
    /// The name of this mapping in `/proc/<pid>/map_files/` (unpadded hex, unlike `maps`).
    pub(super) fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// A line of `/proc/<pid>/maps` that does not have the kernel's layout.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub(super) struct MapsError {
    /// One-based line number.
    line: usize,
    /// What is missing or malformed.
    what: &'static str,
}

/// Every mapping in `text`, the contents of `/proc/<pid>/maps`: lines of
/// `start-end perms offset major:minor inode`, padding, then the name, which may contain
/// spaces (the kernel escapes only newlines).
pub(super) fn parse_maps(text: &[u8]) -> Result<Vec<Mapping>, MapsError> {
    text.split(|&byte| byte == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| {
            parse_maps_line(line).map_err(|what| MapsError {
                line: index + 1,
                what,
            })
        })
        .collect()
}

fn parse_maps_line(line: &[u8]) -> Result<Mapping, &'static str> {
    let mut fields = line.splitn(6, |&byte| byte == b' ');
    let mut field = |what: &'static str| {
        fields
            .next()
            .and_then(|field| std::str::from_utf8(field).ok())
            .filter(|field| !field.is_empty())
            .ok_or(what)
    };
    let (range, perms, _offset, device, inode) = (
        field("no address range")?,
        field("no permissions")?,
        field("no offset")?,
        field("no device")?,
        field("no inode")?,
    );
    let hex = |text: &str, what| u64::from_str_radix(text, 16).map_err(|_| what);
    let (start, end) = range.split_once('-').ok_or("address range without `-`")?;
    let (major, minor) = device.split_once(':').ok_or("device without `:`")?;
    let minor_or_major = |text: &str| u32::from_str_radix(text, 16).map_err(|_| "bad device");
    let name = fields.next().unwrap_or_default().trim_ascii_start();
    let (name, deleted) = match name.strip_suffix(b" (deleted)") {
        Some(name) => (name, true),
        None => (name, false),
    };
    Ok(Mapping {
        start: hex(start, "bad start address")?,
        end: hex(end, "bad end address")?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        device: (minor_or_major(major)?, minor_or_major(minor)?),
        inode: inode.parse().map_err(|_| "bad inode")?,
        name: PathBuf::from(OsStr::from_bytes(name)),
        deleted,
    })
}

/// What examining a mapped file found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStat {
    /// Device of the inode.
    pub(super) dev: u64,
    /// Inode number.
    pub(super) ino: u64,
    /// Owner.
    pub(super) uid: u32,
    /// Mode (type and permission bits).
    pub(super) mode: u32,
    /// Number of names (0 once deleted).
    pub(super) nlink: u64,
}

/// The issues of the executable, file-backed mappings in `mappings`. Each distinct file is
/// examined once with `examine`; the file `exe` (device, inode), the main binary, is skipped:
/// its hash is what the pin checks, whoever owns it.
pub(super) fn mapping_issues(
    mappings: &[Mapping],
    exe: (u64, u64),
    mut examine: impl FnMut(&Mapping) -> io::Result<FileStat>,
) -> Vec<LoadedCodeIssue> {
    let mut seen = HashSet::new();
    let mut issues = Vec::new();
    for mapping in mappings {
        if !mapping.executable
            || mapping.inode == 0
            || !seen.insert((mapping.device, mapping.inode))
        {
            continue;
        }
        let problem = if mapping.name.starts_with("/") {
            match examine(mapping) {
                Ok(stat) => file_problem(&stat, mapping.deleted, exe),
                Err(error) => Some(MappingProblem::Unexamined(unexamined(&error))),
            }
        } else {
            Some(MappingProblem::NotAFile)
        };
        if let Some(problem) = problem {
            issues.push(LoadedCodeIssue::Mapping {
                path: mapping.name.clone(),
                problem,
            });
        }
    }
    issues
}

/// What is wrong with a mapped file, if anything.
fn file_problem(stat: &FileStat, deleted: bool, exe: (u64, u64)) -> Option<MappingProblem> {
    if (stat.dev, stat.ino) == exe {
        None
    } else if deleted || stat.nlink == 0 {
        Some(MappingProblem::Deleted)
    } else if stat.uid != 0 {
        Some(MappingProblem::Owner(stat.uid))
    } else if stat.mode & 0o022 != 0 {
        Some(MappingProblem::Writable(stat.mode & 0o7777))
    } else {
        None
    }
}

/// Why a mapped file could not be examined, in words.
fn unexamined(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::PermissionDenied => {
            "following map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".to_owned()
        }
        io::ErrorKind::NotFound => "the mapping went away while it was examined".to_owned(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{io, path::Path};

    use super::{
        FileStat, LoadedCodeIssue, Mapping, MappingProblem, MapsError, loader_variables,
        mapping_issues, parse_maps,
    };

    #[test]
    fn finds_refused_loader_variables_in_a_nul_separated_environment() {
        let environ = b"PATH=/usr/bin\0LD_PRELOAD=/tmp/evil.so\0LD_BIND_NOW=1\0LD_AUDIT=\0\
            NOEQUALS\0XLD_LIBRARY_PATH=/x\0LD_LIBRARY_PATH=:\0LD_PRELOAD=/tmp/evil.so\0";
        assert_eq!(
            loader_variables(environ),
            [
                LoadedCodeIssue::LoaderVariable {
                    name: "LD_PRELOAD",
                    value: "/tmp/evil.so".into()
                },
                LoadedCodeIssue::LoaderVariable {
                    name: "LD_LIBRARY_PATH",
                    value: ":".into()
                },
            ]
        );
        assert!(loader_variables(b"").is_empty());
        assert!(loader_variables(b"LD_DEBUG=all\0GLIBC_TUNABLES=x\0LD_PRELOAD=").is_empty());
        let long = format!("LD_AUDIT={}", "a".repeat(1000));
        match &loader_variables(long.as_bytes())[..] {
            [LoadedCodeIssue::LoaderVariable { value, .. }] => assert_eq!(value.len(), 256),
            other => panic!("expected one LD_AUDIT issue, got {other:?}"),
        }
    }

    #[test]
    fn parses_maps_lines_with_spaces_padding_and_deleted_files() {
        let text = b"00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/my prog\n\
            7f00aa000000-7f00aa021000 rw-p 00000000 00:00 0 \n\
            7f00ab000000-7f00ab002000 r-xp 00001000 fd:01 42                         /tmp/x/lib evil.so (deleted)\n\
            7ffd5e1f0000-7ffd5e1f2000 r-xp 00000000 00:00 0                          [vdso]\n";
        let maps = parse_maps(text).unwrap();
        assert_eq!(
            maps[0],
            Mapping {
                start: 0x40_0000,
                end: 0x45_2000,
                executable: true,
                device: (8, 2),
                inode: 173_521,
                name: "/usr/bin/my prog".into(),
                deleted: false,
            }
        );
        assert_eq!(maps[0].map_files_name(), "400000-452000");
        assert!(!maps[1].executable);
        assert_eq!((maps[1].inode, maps[1].name.as_os_str()), (0, "".as_ref()));
        assert_eq!(maps[2].name, Path::new("/tmp/x/lib evil.so"));
        assert!(maps[2].deleted);
        assert_eq!(maps[2].device, (0xfd, 1));
        assert_eq!(maps[3].name, Path::new("[vdso]"));
    }

    #[test]
    fn malformed_maps_lines_are_located() {
        assert_eq!(
            parse_maps(b"00400000-00452000 r-xp 00000000 08:02 1 /a\nnonsense\n"),
            Err(MapsError {
                line: 2,
                what: "no permissions"
            })
        );
        assert_eq!(
            parse_maps(b"00400000 r-xp 00000000 08:02 1 /a\n"),
            Err(MapsError {
                line: 1,
                what: "address range without `-`"
            })
        );
        assert_eq!(
            parse_maps(b"0-1 r-xp 0 08:02 x /a\n"),
            Err(MapsError {
                line: 1,
                what: "bad inode"
            })
        );
    }

    fn mapping(inode: u64, name: &str, deleted: bool) -> Mapping {
        Mapping {
            start: inode << 12,
            end: (inode + 1) << 12,
            executable: true,
            device: (8, 1),
            inode,
            name: name.into(),
            deleted,
        }
    }

    fn stat(ino: u64, uid: u32, mode: u32, nlink: u64) -> FileStat {
        FileStat {
            dev: 2049,
            ino,
            uid,
            mode: 0o100_000 | mode,
            nlink,
        }
    }

    #[test]
    fn judges_each_executable_file_once_and_skips_the_main_binary() {
        let mut readonly = mapping(5, "/usr/lib/libreadonly.so", false);
        readonly.executable = false;
        let maps = [
            mapping(1, "/home/u/app", true),
            mapping(2, "/usr/lib/libc.so.6", false),
            mapping(2, "/usr/lib/libc.so.6", false),
            mapping(3, "/opt/lib/libmine.so", false),
            mapping(4, "/usr/lib/libgw.so", false),
            mapping(6, "/tmp/libgone.so", true),
            mapping(7, "/memfd:jit", true),
            mapping(8, "anon_inode:[x]", false),
            mapping(9, "/mnt/fuse/lib.so", false),
            readonly,
            mapping(0, "", false),
        ];
        let mut examined = Vec::new();
        let issues = mapping_issues(&maps, (2049, 1), |mapping| {
            examined.push(mapping.inode);
            match mapping.inode {
                1 => Ok(stat(1, 1000, 0o755, 0)),
                2 => Ok(stat(2, 0, 0o755, 1)),
                3 => Ok(stat(3, 65534, 0o755, 1)),
                4 => Ok(stat(4, 0, 0o775, 1)),
                6 => Ok(stat(6, 0, 0o755, 0)),
                7 => Ok(stat(7, 0, 0o777, 0)),
                _ => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            }
        });
        assert_eq!(examined, [1, 2, 3, 4, 6, 7, 9]);
        let problems: Vec<_> = issues
            .iter()
            .map(|issue| match issue {
                LoadedCodeIssue::Mapping { path, problem } => (path.to_str().unwrap(), problem),
                LoadedCodeIssue::LoaderVariable { .. } => panic!("{issue}"),
            })
            .collect();
        assert_eq!(
            problems,
            [
                ("/opt/lib/libmine.so", &MappingProblem::Owner(65534)),
                ("/usr/lib/libgw.so", &MappingProblem::Writable(0o775)),
                ("/tmp/libgone.so", &MappingProblem::Deleted),
                ("/memfd:jit", &MappingProblem::Deleted),
                ("anon_inode:[x]", &MappingProblem::NotAFile),
                (
                    "/mnt/fuse/lib.so",
                    &MappingProblem::Unexamined(
                        "following map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".into()
                    )
                ),
            ]
        );
        assert_eq!(
            issues[0].to_string(),
            "executable mapping of /opt/lib/libmine.so: owned by uid 65534, not root"
        );
        assert_eq!(
            issues[1].to_string(),
            "executable mapping of /usr/lib/libgw.so: group or world writable (mode 0775)"
        );
    }
}

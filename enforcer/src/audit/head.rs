//! The head: a small file beside the log that names both ends of the chain, so that records cut
//! from the end of the log, or files removed from its start beyond rotation, show. The chain
//! alone cannot show them: what is left of a cut chain is still a chain.
//!
//! The log `audit.jsonl` has its head in `audit.head`, one JSON object:
//!
//! ```text
//! {"last_seq":45,"last_hash":"<64 hex>","first_seq":1,"first_prev":"<64 hex>","updated":"..."}
//! ```
//!
//! `last_*` name the newest record written (seq 0 and 64 zeros before the first one);
//! `first_*` the oldest record retained and its `prev` (seq 1 and 64 zeros until rotation
//! deletes a file); `updated` is when the writer wrote the head (RFC 3339 UTC), for people.
//! The writer replaces the file (a temporary file, fsync, rename) after every batch once the
//! batch is synced to disk, and at every rotation before it deletes the oldest file. So the
//! head never names a record the disk may not hold, and a crash between a write to the log and
//! the head's update leaves the log holding more than the head names, never less.
#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use super::{chain::Head, record::format_time};
use crate::attest::Sha256Digest;

/// The loss reason for records the head names but the log no longer holds at its end.
pub(super) const TAIL_CUT: &str = "audit-tail-cut";

/// The loss reason for a log found with records but without its head.
pub(super) const HEAD_MISSING: &str = "audit-head-missing";

/// The loss reason for a log whose records do not pass through the record its head names.
pub(super) const HEAD_MISMATCH: &str = "audit-head-mismatch";

/// Errors of reading a head file.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The file exists but could not be read.
    #[error("failed to read audit head {}", path.display())]
    Read {
        /// The head file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a head.
    #[error("audit head {} is malformed", path.display())]
    Malformed {
        /// The head file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
}

/// The oldest record retained: its seq and its `prev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Oldest {
    /// Its seq.
    pub(super) seq: u64,
    /// Its `prev`: the hash of the record before it, which rotation deleted.
    pub(super) prev: Sha256Digest,
}

impl Oldest {
    /// The oldest record of a log that holds none yet and continues from `head`: the next one.
    pub(super) fn next_after(head: Head) -> Self {
        Self {
            seq: head.seq + 1,
            prev: head.hash,
        }
    }
}

/// Both ends of the chain, as a head names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ends {
    /// The newest record written.
    pub(super) last: Head,
    /// The oldest record retained.
    pub(super) first: Oldest,
}

/// The head's JSON, fields in this order.
#[derive(Serialize, Deserialize)]
struct HeadFile {
    last_seq: u64,
    #[serde(with = "hex")]
    last_hash: Sha256Digest,
    first_seq: u64,
    #[serde(with = "hex")]
    first_prev: Sha256Digest,
    updated: String,
}

/// A digest as its 64 lowercase hex digits.
mod hex {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::attest::Sha256Digest;

    pub(super) fn serialize<S: Serializer>(
        digest: &Sha256Digest,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(digest)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Sha256Digest, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// The head of the log whose current file is `log`: `audit.jsonl` -> `audit.head`.
pub(super) fn path_for(log: &Path) -> PathBuf {
    log.with_extension("head")
}

/// The head of the log that `file`, current or rotated, belongs to: `audit.jsonl` and
/// `audit.jsonl.3` -> `audit.head`.
pub(super) fn path_beside(file: &Path) -> PathBuf {
    let rotated = file
        .extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            !extension.is_empty() && extension.bytes().all(|b| b.is_ascii_digit())
        });
    if rotated {
        path_for(&file.with_extension(""))
    } else {
        path_for(file)
    }
}

/// The ends the head at `path` names; `None` if there is no file.
pub(super) fn read(path: &Path) -> Result<Option<Ends>, HeadError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(HeadError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: HeadFile = serde_json::from_slice(&text).map_err(|source| HeadError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some(Ends {
        last: Head {
            seq: file.last_seq,
            hash: file.last_hash,
        },
        first: Oldest {
            seq: file.first_seq,
            prev: file.first_prev,
        },
    }))
}

/// Replaces the head at `path` with `ends`: writes `<path>.tmp` (created 0600), syncs it and
/// renames it over `path`, so that a reader sees the old head or the new one, never a part.
pub(super) fn write(path: &Path, ends: &Ends) -> io::Result<()> {
    let json = serde_json::to_string(&HeadFile {
        last_seq: ends.last.seq,
        last_hash: ends.last.hash,
        first_seq: ends.first.seq,
        first_prev: ends.first.prev,
        updated: format_time(SystemTime::now()),
    })
    .expect("a head holds only numbers and strings, which always serialize");
    let mut temp = OsString::from(path.as_os_str());
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let replace = || {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(json.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    replace().map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("failed to write audit head {}: {error}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::audit::chain::GENESIS;

    fn ends() -> Ends {
        Ends {
            last: Head {
                seq: 45,
                hash: Sha256Digest([0xab; 32]),
            },
            first: Oldest {
                seq: 12,
                prev: Sha256Digest([0x01; 32]),
            },
        }
    }

    #[test]
    fn a_head_round_trips_through_a_private_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.head");
        assert!(read(&path).unwrap().is_none(), "no file, no head");
        write(&path, &ends()).unwrap();
        assert_eq!(read(&path).unwrap(), Some(ends()));
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!(
                r#"{{"last_seq":45,"last_hash":"{}","first_seq":12,"first_prev":"{}","updated":""#,
                "ab".repeat(32),
                "01".repeat(32)
            )),
            "{text}"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let genesis = Ends {
            last: Head::GENESIS,
            first: Oldest::next_after(Head::GENESIS),
        };
        write(&path, &genesis).unwrap();
        assert_eq!(read(&path).unwrap(), Some(genesis));
        assert_eq!(
            genesis.first,
            Oldest {
                seq: 1,
                prev: GENESIS
            }
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["audit.head"]);
    }

    #[test]
    fn a_malformed_head_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.head");
        for bad in [
            String::new(),
            "{}".to_owned(),
            format!(
                r#"{{"last_seq":1,"last_hash":"{}","first_seq":1,"first_prev":"{}","updated":""}}"#,
                "AB".repeat(32),
                "0".repeat(64)
            ),
        ] {
            fs::write(&path, &bad).unwrap();
            let error = read(&path).unwrap_err();
            assert!(
                matches!(&error, HeadError::Malformed { path: p, .. } if *p == path),
                "{bad}: {error}"
            );
        }
        fs::create_dir(dir.path().join("dir.head")).unwrap();
        assert!(matches!(
            read(&dir.path().join("dir.head")),
            Err(HeadError::Read { .. })
        ));
    }

    #[test]
    fn the_head_is_named_after_the_log_for_current_and_rotated_files() {
        let dir = Path::new("/var/lib/enforcer/audit");
        let head = dir.join("audit.head");
        assert_eq!(path_for(&dir.join("audit.jsonl")), head);
        for file in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.10"] {
            assert_eq!(path_beside(&dir.join(file)), head, "{file}");
        }
        assert_eq!(path_beside(Path::new("trail")), Path::new("trail.head"));
        assert_eq!(path_beside(Path::new("trail.2")), Path::new("trail.head"));
    }
}

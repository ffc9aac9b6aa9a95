//! The log's files on disk: their names, their rotation, and what the end of one holds when the
//! daemon restarts.
#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::chain::{self, Head};

/// `path` with `.k` appended: the `k`-th newest rotated file.
pub(super) fn rotated(path: &Path, k: usize) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

/// Opens `path` for appending, creating it readable by its owner only.
pub(super) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Moves `path` to `path.1`, `path.1` to `path.2` and so on, deleting what would become
/// `path.(keep+1)` (and any older file a larger `keep` once left). `path` itself must already
/// be synced; the directory is synced after the renames.
pub(super) fn rotate(path: &Path, keep: usize) -> io::Result<()> {
    let mut k = keep;
    loop {
        match fs::remove_file(rotated(path, k)) {
            Ok(()) => k += 1,
            Err(error) if error.kind() == io::ErrorKind::NotFound => break,
            Err(error) => return Err(error),
        }
    }
    for k in (1..keep).rev() {
        match fs::rename(rotated(path, k), rotated(path, k + 1)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    fs::rename(path, rotated(path, 1))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What the end of a log file holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Tail {
    /// The last record that verifies, if any.
    pub(super) head: Option<Head>,
    /// Lines in the file, counting a torn last line.
    pub(super) lines: u64,
    /// Lines after `head` (or all lines, without one): torn, or not verifying.
    pub(super) damaged: u64,
}

impl Tail {
    /// The 1-based line of the first damaged line.
    pub(super) fn first_damaged_line(&self) -> u64 {
        self.lines - self.damaged + 1
    }
}

/// Reads the end of the log file at `path`: its last good record and the damaged lines after
/// it. `None` if the file does not exist. Only the lines after the last good one are checked:
/// damage further back is the verifier's to find.
pub(super) fn scan(path: &Path) -> io::Result<Option<Tail>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut reader = BufReader::new(&file);
    let mut complete = Vec::new();
    let mut offset = 0;
    let mut torn = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        let len = reader.read_until(b'\n', &mut line)?;
        if len == 0 {
            break;
        }
        if line.ends_with(b"\n") {
            complete.push((offset, len - 1));
        } else {
            torn = true;
        }
        offset += len as u64;
    }
    let lines = complete.len() as u64 + u64::from(torn);
    let mut damaged = u64::from(torn);
    for &(start, len) in complete.iter().rev() {
        line.resize(len, 0);
        file.read_exact_at(&mut line, start)?;
        if let Ok((record, hash)) = chain::open(&line) {
            let head = Some(Head {
                seq: record.seq,
                hash,
            });
            return Ok(Some(Tail {
                head,
                lines,
                damaged,
            }));
        }
        damaged += 1;
    }
    Ok(Some(Tail {
        head: None,
        lines,
        damaged,
    }))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::audit::record::{AuditRecord, samples::kernel_deny};

    fn lines(n: u64) -> (String, Head) {
        let mut text = String::new();
        let mut head = Head::GENESIS;
        for seq in 1..=n {
            let record = AuditRecord::new(kernel_deny(1), seq, "node-a", head.hash.to_string());
            let (line, hash) = chain::seal(&record);
            text.push_str(&line);
            text.push('\n');
            head = Head { seq, hash };
        }
        (text, head)
    }

    #[test]
    fn rotate_shifts_files_and_deletes_beyond_keep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for (file, text) in [
            (path.clone(), "new"),
            (rotated(&path, 1), "one"),
            (rotated(&path, 2), "two"),
        ] {
            fs::write(file, text).unwrap();
        }
        fs::write(rotated(&path, 5), "left by keep = 5").unwrap();
        rotate(&path, 2).unwrap();
        assert!(!path.exists());
        assert_eq!(fs::read_to_string(rotated(&path, 1)).unwrap(), "new");
        assert_eq!(fs::read_to_string(rotated(&path, 2)).unwrap(), "one");
        assert!(!rotated(&path, 3).exists());
        assert!(
            rotated(&path, 5).exists(),
            "only files next to keep are swept"
        );
    }

    #[test]
    fn scan_finds_the_last_good_record_and_the_damage_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert_eq!(scan(&path).unwrap(), None);

        fs::write(&path, "").unwrap();
        assert_eq!(
            scan(&path).unwrap(),
            Some(Tail {
                head: None,
                lines: 0,
                damaged: 0
            })
        );

        let (text, head) = lines(3);
        fs::write(&path, &text).unwrap();
        let clean = scan(&path).unwrap().unwrap();
        assert_eq!((clean.head, clean.lines, clean.damaged), (Some(head), 3, 0));

        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":4,\"ti").unwrap();
        let torn = scan(&path).unwrap().unwrap();
        assert_eq!((torn.head, torn.lines, torn.damaged), (Some(head), 4, 1));
        assert_eq!(torn.first_damaged_line(), 4);

        fs::write(&path, "garbage\n").unwrap();
        let garbage = scan(&path).unwrap().unwrap();
        assert_eq!((garbage.head, garbage.damaged), (None, 1));
    }
}

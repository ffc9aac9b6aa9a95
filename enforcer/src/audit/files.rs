//! The log's files on disk: their names, their rotation, what the end of one holds when the
//! daemon restarts, and which record is the oldest retained (for the head).
#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    chain::{self, Head},
    head::Oldest,
    record::{AuditRecord, Event, Source},
};
use crate::attest::Sha256Digest;

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
    /// Whether that record is the daemon's stop record: its run ended cleanly.
    pub(super) stopped: bool,
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

/// A log file's complete lines, found without reading their records, to be opened from the end.
struct Indexed {
    file: File,
    /// Each complete line's offset and length (without its newline).
    complete: Vec<(u64, usize)>,
    /// Whether a line without a newline follows them.
    torn: bool,
}

impl Indexed {
    /// The lines of the file at `path`; `None` if it does not exist.
    fn open(path: &Path) -> io::Result<Option<Self>> {
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
        Ok(Some(Self {
            file,
            complete,
            torn,
        }))
    }

    /// The complete lines' records, newest first: each one opened and checked on its own, or
    /// `None` for a line that does not verify.
    fn backwards(&self) -> impl Iterator<Item = io::Result<Option<(AuditRecord, Sha256Digest)>>> {
        let mut line = Vec::new();
        self.complete.iter().rev().map(move |&(start, len)| {
            line.resize(len, 0);
            self.file.read_exact_at(&mut line, start)?;
            Ok(chain::open(&line).ok())
        })
    }
}

/// A line of a log file (without its newline) and its 1-based number.
pub(super) type NumberedLine = (u64, Vec<u8>);

/// The complete lines of the log file at `path`, newest first, each with its 1-based line
/// number (a torn last line, which the writer may still be appending, is left out). `None`
/// if the file does not exist.
pub(super) fn lines_backwards(
    path: &Path,
) -> io::Result<Option<impl Iterator<Item = io::Result<NumberedLine>> + use<>>> {
    let Some(indexed) = Indexed::open(path)? else {
        return Ok(None);
    };
    let Indexed { file, complete, .. } = indexed;
    Ok(Some(complete.into_iter().enumerate().rev().map(
        move |(index, (start, len))| {
            let mut line = vec![0; len];
            file.read_exact_at(&mut line, start)?;
            Ok((index as u64 + 1, line))
        },
    )))
}

/// Reads the end of the log file at `path`: its last good record and the damaged lines after
/// it. `None` if the file does not exist. Only the lines after the last good one are checked:
/// damage further back is the verifier's to find.
pub(super) fn scan(path: &Path) -> io::Result<Option<Tail>> {
    let Some(indexed) = Indexed::open(path)? else {
        return Ok(None);
    };
    let lines = indexed.complete.len() as u64 + u64::from(indexed.torn);
    let mut damaged = u64::from(indexed.torn);
    for opened in indexed.backwards() {
        if let Some((record, hash)) = opened? {
            return Ok(Some(Tail {
                head: Some(Head {
                    seq: record.seq,
                    hash,
                }),
                stopped: record.source == Source::Daemon && record.event == Event::Stop,
                lines,
                damaged,
            }));
        }
        damaged += 1;
    }
    Ok(Some(Tail {
        head: None,
        stopped: false,
        lines,
        damaged,
    }))
}

/// The hash of record `seq` in the log file at `path`, looking back from its end; `None` if the
/// file does not hold a good record `seq`.
pub(super) fn hash_of(path: &Path, seq: u64) -> io::Result<Option<Sha256Digest>> {
    let Some(indexed) = Indexed::open(path)? else {
        return Ok(None);
    };
    for opened in indexed.backwards() {
        match opened? {
            Some((record, hash)) if record.seq == seq => return Ok(Some(hash)),
            Some((record, _)) if record.seq < seq => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// The oldest record of the log whose current file is `path`, among the current file and the
/// rotated ones up to `path.<newest_rotated>`: the first good record of the oldest file that
/// starts with one.
pub(super) fn oldest(path: &Path, newest_rotated: usize) -> io::Result<Option<Oldest>> {
    for k in (0..=newest_rotated).rev() {
        let file = if k == 0 {
            path.to_owned()
        } else {
            rotated(path, k)
        };
        if let Some(oldest) = first_record(&file)? {
            return Ok(Some(oldest));
        }
    }
    Ok(None)
}

/// The first line of the file at `path` as the oldest record, if it is a good record.
fn first_record(path: &Path) -> io::Result<Option<Oldest>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut line = Vec::new();
    BufReader::new(file).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Ok(None);
    }
    Ok(chain::open(&line).ok().and_then(|(record, _)| {
        let prev = record.prev.parse().ok()?;
        Some(Oldest {
            seq: record.seq,
            prev,
        })
    }))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::audit::record::{Entry, Verdict, samples::kernel_deny};

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
                stopped: false,
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

    #[test]
    fn scan_tells_a_last_stop_record_from_any_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut text, head) = lines(2);
        fs::write(&path, &text).unwrap();
        assert!(!scan(&path).unwrap().unwrap().stopped);
        let stop = AuditRecord::new(
            Entry::new(Source::Daemon, Event::Stop, Verdict::Info, "stop"),
            3,
            "node-a",
            head.hash.to_string(),
        );
        text.push_str(&chain::seal(&stop).0);
        text.push('\n');
        fs::write(&path, &text).unwrap();
        let tail = scan(&path).unwrap().unwrap();
        assert_eq!((tail.head.unwrap().seq, tail.stopped), (3, true));
    }

    #[test]
    fn hash_of_finds_a_record_looking_back_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert_eq!(hash_of(&path, 1).unwrap(), None);
        let (text, head) = lines(5);
        let (_, third) = lines(3);
        fs::write(&path, &text).unwrap();
        assert_eq!(hash_of(&path, 5).unwrap(), Some(head.hash));
        assert_eq!(hash_of(&path, 3).unwrap(), Some(third.hash));
        assert_eq!(hash_of(&path, 6).unwrap(), None);
        assert_eq!(hash_of(&path, 0).unwrap(), None);
    }

    #[test]
    fn oldest_is_the_first_record_of_the_oldest_file_that_starts_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert_eq!(oldest(&path, 3).unwrap(), None);
        let (text, _) = lines(4);
        let all: Vec<&str> = text.lines().collect();
        fs::write(&path, format!("{}\n", all[3])).unwrap();
        fs::write(rotated(&path, 1), format!("{}\n{}\n", all[1], all[2])).unwrap();
        fs::write(rotated(&path, 2), "").unwrap();
        fs::write(rotated(&path, 3), format!("{}\n", all[0])).unwrap();
        let (_, first) = lines(1);
        let second = Oldest {
            seq: 2,
            prev: first.hash,
        };
        assert_eq!(
            oldest(&path, 2).unwrap(),
            Some(second),
            "empty .2 is skipped"
        );
        assert_eq!(
            oldest(&path, 3).unwrap(),
            Some(Oldest::next_after(Head::GENESIS))
        );
        assert_eq!(oldest(&path, 0).unwrap().map(|o| o.seq), Some(4));
        fs::write(rotated(&path, 1), "torn").unwrap();
        assert_eq!(oldest(&path, 2).unwrap().map(|o| o.seq), Some(4));
    }
}

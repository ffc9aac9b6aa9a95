//! The verifier: checks every line of a set of log files and the chain across them.
#![forbid(unsafe_code)]

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use super::{
    chain::{self, ChainError, GENESIS, Head},
    record::AuditRecord,
};
use crate::attest::Sha256Digest;

/// Why a set of log files does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{}: cannot read", path.display())]
    Read {
        /// The file, as given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A line is malformed, edited, torn, or out of its place in the chain.
    #[error("{}:{line}", path.display())]
    Record {
        /// The file, as given.
        path: PathBuf,
        /// The 1-based line.
        line: u64,
        /// What is wrong with it.
        #[source]
        problem: ChainError,
    },
}

/// What a successful verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Files that held records (empty files are skipped).
    pub files: usize,
    /// The seq of the oldest record (0 without records).
    pub first_seq: u64,
    /// The seq of the newest record (0 without records).
    pub last_seq: u64,
    /// Whether the oldest record is the first record ever (its `prev` is all zeros), so that
    /// nothing older can have been removed; true without records.
    pub anchored: bool,
    /// The newest record's hash (64 zeros without records): where the chain must continue.
    pub last_hash: Sha256Digest,
}

/// Checks `files` (in any order: they are ordered by the seq of their first record) line by
/// line and the chain across them, stopping at the first problem.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let mut ordered = Vec::new();
    for path in files {
        if let Some(seq) = first_seq(path)? {
            ordered.push((seq, path));
        }
    }
    ordered.sort_by_key(|&(seq, _)| seq);
    let mut walk = Walk::default();
    for &(_, path) in &ordered {
        walk.file(path)?;
    }
    let head = walk.head.unwrap_or(Head::GENESIS);
    Ok(VerifyReport {
        records: walk.records,
        files: ordered.len(),
        first_seq: walk.first_seq,
        last_seq: head.seq,
        anchored: walk.anchored || walk.head.is_none(),
        last_hash: head.hash,
    })
}

/// Lines of a file, each with its 1-based number and without its newline.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    number: u64,
    line: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self, VerifyError> {
        let file = File::open(path).map_err(|source| VerifyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            reader: BufReader::new(file),
            number: 0,
            line: Vec::new(),
        })
    }

    /// The next line's record and hash, once the line is checked on its own; `None` at the end.
    fn next_record(&mut self) -> Result<Option<(AuditRecord, Sha256Digest)>, VerifyError> {
        self.line.clear();
        let len = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|source| VerifyError::Read {
                path: self.path.clone(),
                source,
            })?;
        if len == 0 {
            return Ok(None);
        }
        self.number += 1;
        if self.line.pop() != Some(b'\n') {
            return Err(self.error(ChainError::Torn));
        }
        chain::open(&self.line)
            .map(Some)
            .map_err(|problem| self.error(problem))
    }

    fn error(&self, problem: ChainError) -> VerifyError {
        VerifyError::Record {
            path: self.path.clone(),
            line: self.number,
            problem,
        }
    }
}

/// The seq of the first record of `path`; `None` for an empty file.
fn first_seq(path: &Path) -> Result<Option<u64>, VerifyError> {
    Ok(Lines::open(path)?
        .next_record()?
        .map(|(record, _)| record.seq))
}

/// The chain walked so far.
#[derive(Default)]
struct Walk {
    head: Option<Head>,
    records: u64,
    first_seq: u64,
    anchored: bool,
}

impl Walk {
    fn file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let mut lines = Lines::open(path)?;
        while let Some((record, hash)) = lines.next_record()? {
            self.follow(&record)
                .map_err(|problem| lines.error(problem))?;
            self.head = Some(Head {
                seq: record.seq,
                hash,
            });
            self.records += 1;
        }
        Ok(())
    }

    /// Checks that `record` may come next. The first record may be any record (older files
    /// may have been rotated away) unless it claims to be the first ever.
    fn follow(&mut self, record: &AuditRecord) -> Result<(), ChainError> {
        if let Some(head) = self.head {
            return head.check_next(record);
        }
        self.first_seq = record.seq;
        if record.prev == GENESIS.to_string() {
            self.anchored = true;
            Head::GENESIS.check_next(record)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::record::samples::kernel_deny;

    /// Writes records `first..=last` of a chain to `path`, continuing from `head`.
    fn write_chain(path: &Path, head: Head, last: u64) -> Head {
        let mut text = String::new();
        let mut head = head;
        for seq in head.seq + 1..=last {
            let rule = u32::try_from(seq).unwrap();
            let record = AuditRecord::new(kernel_deny(rule), seq, "node-a", head.hash.to_string());
            let (line, hash) = chain::seal(&record);
            text.push_str(&line);
            text.push('\n');
            head = Head { seq, hash };
        }
        fs::write(path, text).unwrap();
        head
    }

    fn failure(result: Result<VerifyReport, VerifyError>) -> (PathBuf, u64, ChainError) {
        match result {
            Err(VerifyError::Record {
                path,
                line,
                problem,
            }) => (path, line, problem),
            other => panic!("expected a record error, got {other:?}"),
        }
    }

    fn edit_line(path: &Path, line: usize, edit: impl FnOnce(&mut Vec<String>, usize)) {
        let mut lines: Vec<String> = fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        edit(&mut lines, line - 1);
        fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_chain_of_records_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let head = write_chain(&path, Head::GENESIS, 20);
        let report = verify(&[path]).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 20,
                files: 1,
                first_seq: 1,
                last_seq: 20,
                anchored: true,
                last_hash: head.hash,
            }
        );
    }

    #[test]
    fn no_records_verify_trivially() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "").unwrap();
        let report = verify(&[path]).unwrap();
        assert_eq!(
            (report.records, report.files, report.anchored),
            (0, 0, true)
        );
        assert_eq!(report.last_hash, GENESIS);
    }

    #[test]
    fn editing_any_field_of_a_middle_or_the_last_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let edits = [
            ("\"seq\":3", "\"seq\":33"),
            ("10:00:00.123456Z", "10:00:01.123456Z"),
            ("\"node\":\"node-a\"", "\"node\":\"node-b\""),
            ("\"verdict\":\"deny\"", "\"verdict\":\"allow\""),
            ("\"reason\":\"policy\"", "\"reason\":\"no-route\""),
            ("\"rule\":3", "\"rule\":4"),
            ("\"pid\":812", "\"pid\":813"),
            ("spiffe://td/db", "spiffe://td/cache"),
            (",\"cgroup_id\":4242", ""),
            ("\"src\":{", "\"src\":{\"extra\":1,"),
            ("\"prev\":\"", "\"prev\":\"f"),
        ];
        for (from, to) in edits {
            write_chain(&path, Head::GENESIS, 5);
            edit_line(&path, 3, |lines, i| {
                assert!(lines[i].contains(from), "{from}");
                lines[i] = lines[i].replacen(from, to, 1);
            });
            let (file, line, problem) = failure(verify(std::slice::from_ref(&path)));
            assert_eq!(
                (file.as_path(), line),
                (path.as_path(), 3),
                "{from} -> {to}"
            );
            assert!(
                matches!(problem, ChainError::Edited { .. }),
                "{from} -> {to}: {problem}"
            );
        }

        write_chain(&path, Head::GENESIS, 5);
        edit_line(&path, 3, |lines, i| {
            let digit = lines[i].rfind("\"hash\":\"").unwrap() + "\"hash\":\"".len();
            let flipped = if lines[i][digit..].starts_with('0') {
                "1"
            } else {
                "0"
            };
            lines[i].replace_range(digit..=digit, flipped);
        });
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 3);
        assert!(
            matches!(problem, ChainError::Edited { seq: 3 }),
            "{problem}"
        );

        write_chain(&path, Head::GENESIS, 5);
        edit_line(&path, 5, |lines, i| {
            lines[i] = lines[i].replacen("\"pid\":812", "\"pid\":1", 1);
        });
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 5);
        assert!(
            matches!(problem, ChainError::Edited { seq: 5 }),
            "{problem}"
        );
        assert_eq!(
            problem.to_string(),
            "record seq 5 was edited (hash mismatch)"
        );
    }

    #[test]
    fn a_deleted_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, Head::GENESIS, 5);
        edit_line(&path, 3, |lines, i| {
            lines.remove(i);
        });
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 3);
        assert!(
            matches!(
                problem,
                ChainError::BrokenLink {
                    seq: 4,
                    previous: 2
                }
            ),
            "{problem}"
        );
    }

    #[test]
    fn swapped_lines_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, Head::GENESIS, 5);
        edit_line(&path, 2, |lines, i| lines.swap(i, i + 1));
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 2);
        assert!(
            matches!(
                problem,
                ChainError::BrokenLink {
                    seq: 3,
                    previous: 1
                }
            ),
            "{problem}"
        );
    }

    #[test]
    fn malformed_and_torn_lines_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, Head::GENESIS, 3);
        edit_line(&path, 2, |lines, i| lines[i] = "{\"seq\":2}".to_owned());
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 2);
        assert!(matches!(problem, ChainError::NoHash), "{problem}");

        write_chain(&path, Head::GENESIS, 3);
        let mut bytes = fs::read(&path).unwrap();
        bytes.pop();
        fs::write(&path, &bytes).unwrap();
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 3);
        assert!(matches!(problem, ChainError::Torn), "{problem}");

        let missing = dir.path().join("missing.jsonl");
        assert!(matches!(verify(&[missing]), Err(VerifyError::Read { .. })));
    }

    #[test]
    fn files_verify_together_in_any_order_and_a_missing_middle_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let head = write_chain(&path("audit.jsonl.2"), Head::GENESIS, 4);
        let head = write_chain(&path("audit.jsonl.1"), head, 9);
        write_chain(&path("audit.jsonl"), head, 12);
        fs::write(path("audit.jsonl.empty"), "").unwrap();
        let newest_first = [
            path("audit.jsonl"),
            path("audit.jsonl.1"),
            path("audit.jsonl.2"),
            path("audit.jsonl.empty"),
        ];
        let mut shuffled = newest_first.clone();
        shuffled.swap(0, 2);
        for files in [&newest_first[..], &shuffled[..]] {
            let report = verify(files).unwrap();
            assert_eq!((report.records, report.files), (12, 3));
            assert_eq!(
                (report.first_seq, report.last_seq, report.anchored),
                (1, 12, true)
            );
        }

        let rotated_away = verify(&[path("audit.jsonl"), path("audit.jsonl.1")]).unwrap();
        assert_eq!((rotated_away.first_seq, rotated_away.anchored), (5, false));

        let (file, line, problem) = failure(verify(&[path("audit.jsonl"), path("audit.jsonl.2")]));
        assert_eq!((file, line), (path("audit.jsonl"), 1));
        assert!(
            matches!(
                problem,
                ChainError::BrokenLink {
                    seq: 10,
                    previous: 4
                }
            ),
            "{problem}"
        );
    }

    #[test]
    fn a_record_claiming_genesis_out_of_place_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let record = AuditRecord::new(kernel_deny(1), 7, "node-a", GENESIS.to_string());
        fs::write(&path, chain::seal(&record).0 + "\n").unwrap();
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path)));
        assert_eq!(line, 1);
        assert!(
            matches!(
                problem,
                ChainError::Sequence {
                    seq: 7,
                    expected: 1
                }
            ),
            "{problem}"
        );
    }
}

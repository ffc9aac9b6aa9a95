//! The verifier: checks every line of a set of log files, the chain across them, and both ends
//! of the chain against the log's head (see [`super::head`]): records cut from the end, or
//! from the start beyond what rotation deleted, are missing from the log but not from the
//! head.
//!
//! A stop at the first problem ([`AuditVerifyError`]) is kept for damage that leaves the rest
//! unreadable (a malformed, edited, torn or misplaced line); what is missing at the ends, or
//! a gap the daemon itself reported with an `audit-tail-cut` loss record, is a [`Finding`],
//! collected while the walk goes on.
#![forbid(unsafe_code)]

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use super::{
    chain::{self, ChainError, GENESIS, Head},
    head::{self, Ends, HEAD_MISMATCH, HEAD_MISSING, HeadError, TAIL_CUT},
    record::{AuditRecord, Event, Source},
};
use crate::attest::Sha256Digest;

/// Why a set of log files does not verify.
#[derive(Debug, thiserror::Error)]
pub enum AuditVerifyError {
    /// No file was given.
    #[error("no audit log files given")]
    NoFiles,
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
    /// The head exists but could not be read.
    #[error("cannot check the ends of the log")]
    Head(#[from] HeadError),
    /// The files are named after different logs, so no one head beside them checks them all.
    #[error(
        "{} and {} belong to different logs (heads {} and {}): check one log at a time, or name its head",
        files[0].display(), files[1].display(), heads[0].display(), heads[1].display()
    )]
    Logs {
        /// Two of the files.
        files: [PathBuf; 2],
        /// The heads they are named after.
        heads: [PathBuf; 2],
    },
}

/// Which head `verify` checks the ends of the chain against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadCheck {
    /// The head beside the files, named after their log: `audit.jsonl*` -> `audit.head`.
    Beside,
    /// The head at this path.
    At(PathBuf),
    /// None: the chain alone, whose ends show no records cut from them.
    Skip,
}

/// Something the log is missing, or the daemon reported about it, found without stopping the
/// walk. Most are failures; a few are notes ([`Finding::is_failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// There is no head where one was looked for: the ends of the chain cannot be checked.
    HeadMissing {
        /// Where the head was looked for.
        path: PathBuf,
    },
    /// The log ends before the record the head names as its last.
    MissingAtEnd {
        /// The first missing seq.
        from: u64,
        /// The head's last record.
        to: u64,
    },
    /// The log starts after the record the head names as the oldest retained.
    MissingAtStart {
        /// The head's oldest retained record.
        from: u64,
        /// The last missing seq.
        to: u64,
    },
    /// The record the head names as the last has another hash, or is not in the log.
    EndMismatch {
        /// The record's seq.
        seq: u64,
    },
    /// The record the head names as the oldest retained has another `prev`.
    StartMismatch {
        /// The record's seq.
        seq: u64,
    },
    /// Records are missing, and an `audit-tail-cut` loss record of the daemon says so.
    Cut {
        /// The first missing seq.
        from: u64,
        /// The last missing seq.
        to: u64,
        /// The loss record's seq.
        reported_at: u64,
    },
    /// An `audit-head-mismatch` loss record: the daemon found the log rewritten when it started.
    Rewritten {
        /// The loss record's seq.
        reported_at: u64,
    },
    /// A note, not a failure: records written after the head's last update (a running writer
    /// updates it after each batch).
    AfterHead {
        /// The first record after the head's last.
        from: u64,
        /// The log's last record.
        to: u64,
    },
    /// A note, not a failure: an `audit-head-missing` loss record, the daemon found records
    /// without a head when it started.
    StartedWithoutHead {
        /// The loss record's seq.
        reported_at: u64,
    },
}

impl Finding {
    /// Whether the finding fails the verification (the others are notes).
    #[must_use]
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            Self::AfterHead { .. } | Self::StartedWithoutHead { .. }
        )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeadMissing { path } => write!(
                f,
                "the head {} is missing: the ends of the log cannot be checked",
                path.display()
            ),
            Self::MissingAtEnd { from, to } => write!(
                f,
                "records {from}..{to} are missing from the end of the log (the head says the \
                 last record is seq {to})"
            ),
            Self::MissingAtStart { from, to } => write!(
                f,
                "records {from}..{to} are missing from the start of the log (the head says the \
                 oldest retained record is seq {from}; were all of its files given?)"
            ),
            Self::EndMismatch { seq } => write!(
                f,
                "the log does not hold record seq {seq} as the head names it (the last record \
                 written): the end of the log was rewritten"
            ),
            Self::StartMismatch { seq } => write!(
                f,
                "the log does not hold record seq {seq} as the head names it (the oldest \
                 retained record): the start of the log was rewritten"
            ),
            Self::Cut {
                from,
                to,
                reported_at,
            } => write!(
                f,
                "records {from}..{to} were cut from the log; the daemon reported it at seq \
                 {reported_at}"
            ),
            Self::Rewritten { reported_at } => write!(
                f,
                "the log did not hold the record its head named when the daemon started: \
                 records before seq {reported_at} were rewritten; the daemon reported it at seq \
                 {reported_at} ({HEAD_MISMATCH})"
            ),
            Self::AfterHead { from, to } => write!(
                f,
                "records {from}..{to} were written after the head was last updated (a running \
                 daemon updates it after every batch)"
            ),
            Self::StartedWithoutHead { reported_at } => write!(
                f,
                "the daemon found the log without its head and reported it at seq \
                 {reported_at} ({HEAD_MISSING}): records cut before then cannot be ruled out"
            ),
        }
    }
}

/// What a verification covered and found.
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
    /// The head the ends were checked against; `None` when they were not checked.
    pub head: Option<PathBuf>,
    /// What is missing or was reported, from the start of the log to its end.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// Whether nothing found fails the verification.
    #[must_use]
    pub fn intact(&self) -> bool {
        !self.findings.iter().any(Finding::is_failure)
    }
}

/// Checks `files` (in any order: they are ordered by the seq of their first record) line by
/// line and the chain across them, stopping at the first damaged line, then both ends of the
/// chain against the head `head` names.
pub fn verify(files: &[PathBuf], head: &HeadCheck) -> Result<VerifyReport, AuditVerifyError> {
    let head_path = match head {
        HeadCheck::Beside => Some(beside(files)?),
        HeadCheck::At(path) => Some(path.clone()),
        HeadCheck::Skip => None,
    };
    // The head before the log: a running writer updates it after the log, so the files read
    // next hold at least what it names.
    let ends = head_path.as_deref().map(head::read).transpose()?.flatten();

    let mut ordered = Vec::new();
    for path in files {
        if let Some(seq) = first_seq(path)? {
            ordered.push((seq, path));
        }
    }
    ordered.sort_by_key(|&(seq, _)| seq);
    let mut walk = Walk {
        named: ends,
        ..Walk::default()
    };
    for &(_, path) in &ordered {
        walk.file(path)?;
    }
    let findings = match (&head_path, ends) {
        (Some(path), None) => {
            let mut findings = vec![Finding::HeadMissing { path: path.clone() }];
            findings.append(&mut walk.findings);
            findings
        }
        (Some(_), Some(ends)) => {
            let end = walk.end(ends);
            let mut findings = walk.start(ends);
            findings.append(&mut walk.findings);
            findings.extend(end);
            findings
        }
        (None, _) => std::mem::take(&mut walk.findings),
    };
    let last = walk.head.unwrap_or(Head::GENESIS);
    Ok(VerifyReport {
        records: walk.records,
        files: ordered.len(),
        first_seq: walk.first.as_ref().map_or(0, |first| first.seq),
        last_seq: last.seq,
        anchored: walk.anchored || walk.head.is_none(),
        last_hash: last.hash,
        head: head_path.filter(|_| ends.is_some()),
        findings,
    })
}

/// The head beside `files`, which must all be named after one log.
fn beside(files: &[PathBuf]) -> Result<PathBuf, AuditVerifyError> {
    let (first, rest) = files.split_first().ok_or(AuditVerifyError::NoFiles)?;
    let head = head::path_beside(first);
    for file in rest {
        let other = head::path_beside(file);
        if other != head {
            return Err(AuditVerifyError::Logs {
                files: [first.clone(), file.clone()],
                heads: [head, other],
            });
        }
    }
    Ok(head)
}

/// Lines of a file, each with its 1-based number and without its newline.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    number: u64,
    line: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self, AuditVerifyError> {
        let file = File::open(path).map_err(|source| AuditVerifyError::Read {
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
    fn next_record(&mut self) -> Result<Option<(AuditRecord, Sha256Digest)>, AuditVerifyError> {
        self.line.clear();
        let len = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|source| AuditVerifyError::Read {
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

    fn error(&self, problem: ChainError) -> AuditVerifyError {
        AuditVerifyError::Record {
            path: self.path.clone(),
            line: self.number,
            problem,
        }
    }
}

/// The seq of the first record of `path`; `None` for an empty file.
fn first_seq(path: &Path) -> Result<Option<u64>, AuditVerifyError> {
    Ok(Lines::open(path)?
        .next_record()?
        .map(|(record, _)| record.seq))
}

/// Whether `record` is the daemon's report of records cut from the end of the log.
fn reports_cut(record: &AuditRecord) -> bool {
    record.source == Source::Daemon && record.event == Event::Loss && record.reason == TAIL_CUT
}

/// The oldest record walked.
struct First {
    seq: u64,
    prev: String,
    reports_cut: bool,
}

/// The chain walked so far.
#[derive(Default)]
struct Walk {
    head: Option<Head>,
    records: u64,
    first: Option<First>,
    anchored: bool,
    /// The ends the head names, if it is checked.
    named: Option<Ends>,
    /// The hash of the record the head names as the last, once walked.
    named_last: Option<Sha256Digest>,
    /// The `prev` of the record the head names as the oldest retained, once walked.
    named_first_prev: Option<String>,
    findings: Vec<Finding>,
}

impl Walk {
    fn file(&mut self, path: &Path) -> Result<(), AuditVerifyError> {
        let mut lines = Lines::open(path)?;
        while let Some((record, hash)) = lines.next_record()? {
            self.follow(&record)
                .map_err(|problem| lines.error(problem))?;
            self.note(&record, hash);
            self.head = Some(Head {
                seq: record.seq,
                hash,
            });
            self.records += 1;
        }
        Ok(())
    }

    /// Checks that `record` may come next. The first record may be any record (older files
    /// may have been rotated away) unless it claims to be the first ever. A gap the daemon
    /// reported is a finding, not a stop.
    fn follow(&mut self, record: &AuditRecord) -> Result<(), ChainError> {
        if let Some(head) = self.head {
            return match head.check_next(record) {
                Err(_) if reports_cut(record) && record.seq > head.seq + 1 => {
                    self.findings.push(Finding::Cut {
                        from: head.seq + 1,
                        to: record.seq - 1,
                        reported_at: record.seq,
                    });
                    Ok(())
                }
                checked => checked,
            };
        }
        self.first = Some(First {
            seq: record.seq,
            prev: record.prev.clone(),
            reports_cut: reports_cut(record),
        });
        if record.prev == GENESIS.to_string() {
            self.anchored = true;
            Head::GENESIS.check_next(record)?;
        }
        Ok(())
    }

    /// Keeps what the end checks need of `record`, and the daemon's reports about the log.
    fn note(&mut self, record: &AuditRecord, hash: Sha256Digest) {
        if let Some(named) = self.named {
            if record.seq == named.last.seq {
                self.named_last = Some(hash);
            }
            if record.seq == named.first.seq {
                self.named_first_prev = Some(record.prev.clone());
            }
        }
        if record.source == Source::Daemon && record.event == Event::Loss {
            let reported_at = record.seq;
            match record.reason.as_str() {
                HEAD_MISMATCH => self.findings.push(Finding::Rewritten { reported_at }),
                HEAD_MISSING => self
                    .findings
                    .push(Finding::StartedWithoutHead { reported_at }),
                _ => {}
            }
        }
    }

    /// What is missing at the start: records older than the first one walked down to the one
    /// the head names as the oldest retained. Older records than that are left over from a
    /// rotation stopped before it deleted them.
    fn start(&self, named: Ends) -> Vec<Finding> {
        let Some(first) = &self.first else {
            return Vec::new();
        };
        let oldest = named.first;
        let finding = if first.seq > oldest.seq {
            if first.reports_cut {
                Finding::Cut {
                    from: oldest.seq,
                    to: first.seq - 1,
                    reported_at: first.seq,
                }
            } else {
                Finding::MissingAtStart {
                    from: oldest.seq,
                    to: first.seq - 1,
                }
            }
        } else {
            let prev = if first.seq == oldest.seq {
                Some(&first.prev)
            } else {
                self.named_first_prev.as_ref()
            };
            match prev {
                Some(prev) if *prev != oldest.prev.to_string() => {
                    Finding::StartMismatch { seq: oldest.seq }
                }
                _ => return Vec::new(),
            }
        };
        vec![finding]
    }

    /// What is missing at the end: records up to the one the head names as the last. Records
    /// after it are a note.
    fn end(&self, named: Ends) -> Vec<Finding> {
        let named = named.last;
        let Some(last) = self.head else {
            return if named.seq > 0 {
                let from = self.named.map_or(1, |ends| ends.first.seq.min(named.seq));
                vec![Finding::MissingAtEnd {
                    from,
                    to: named.seq,
                }]
            } else {
                Vec::new()
            };
        };
        if last.seq < named.seq {
            return vec![Finding::MissingAtEnd {
                from: last.seq + 1,
                to: named.seq,
            }];
        }
        let holds = if last.seq == named.seq {
            last.hash == named.hash
        } else if named.seq == 0 {
            true
        } else {
            self.named_last == Some(named.hash) || self.in_reported_cut(named.seq)
        };
        if !holds {
            return vec![Finding::EndMismatch { seq: named.seq }];
        }
        if last.seq > named.seq {
            return vec![Finding::AfterHead {
                from: named.seq + 1,
                to: last.seq,
            }];
        }
        Vec::new()
    }

    /// Whether record `seq` is in a gap the daemon reported: before a first record that
    /// reports a cut, or in a gap found on the way.
    fn in_reported_cut(&self, seq: u64) -> bool {
        self.first
            .as_ref()
            .is_some_and(|first| first.reports_cut && seq < first.seq)
            || self.findings.iter().any(|finding| {
                matches!(*finding, Finding::Cut { from, to, .. } if (from..=to).contains(&seq))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::{
        head::Oldest,
        record::{Entry, samples::kernel_deny},
    };

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

    fn failure(result: Result<VerifyReport, AuditVerifyError>) -> (PathBuf, u64, ChainError) {
        match result {
            Err(AuditVerifyError::Record {
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
        let report = verify(&[path], &HeadCheck::Skip).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 20,
                files: 1,
                first_seq: 1,
                last_seq: 20,
                anchored: true,
                last_hash: head.hash,
                head: None,
                findings: Vec::new(),
            }
        );
    }

    #[test]
    fn no_records_verify_trivially() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "").unwrap();
        let report = verify(&[path], &HeadCheck::Skip).unwrap();
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
            let (file, line, problem) =
                failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
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
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
        assert_eq!(line, 3);
        assert!(
            matches!(problem, ChainError::Edited { seq: 3 }),
            "{problem}"
        );

        write_chain(&path, Head::GENESIS, 5);
        edit_line(&path, 5, |lines, i| {
            lines[i] = lines[i].replacen("\"pid\":812", "\"pid\":1", 1);
        });
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
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
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
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
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
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
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
        assert_eq!(line, 2);
        assert!(matches!(problem, ChainError::NoHash), "{problem}");

        write_chain(&path, Head::GENESIS, 3);
        let mut bytes = fs::read(&path).unwrap();
        bytes.pop();
        fs::write(&path, &bytes).unwrap();
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
        assert_eq!(line, 3);
        assert!(matches!(problem, ChainError::Torn), "{problem}");

        let missing = dir.path().join("missing.jsonl");
        assert!(matches!(
            verify(&[missing], &HeadCheck::Skip),
            Err(AuditVerifyError::Read { .. })
        ));
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
            let report = verify(files, &HeadCheck::Skip).unwrap();
            assert_eq!((report.records, report.files), (12, 3));
            assert_eq!(
                (report.first_seq, report.last_seq, report.anchored),
                (1, 12, true)
            );
        }

        let rotated_away = verify(
            &[path("audit.jsonl"), path("audit.jsonl.1")],
            &HeadCheck::Skip,
        )
        .unwrap();
        assert_eq!((rotated_away.first_seq, rotated_away.anchored), (5, false));

        let (file, line, problem) = failure(verify(
            &[path("audit.jsonl"), path("audit.jsonl.2")],
            &HeadCheck::Skip,
        ));
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
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
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

    fn write_head(path: &Path, last: Head, first_seq: u64, first_prev: Sha256Digest) {
        let first = Oldest {
            seq: first_seq,
            prev: first_prev,
        };
        head::write(path, &Ends { last, first }).unwrap();
    }

    /// Records 1..=4 in `audit.jsonl.1` and 5..=8 in `audit.jsonl`: the heads after 4 and 8.
    fn two_files(dir: &Path) -> (Head, Head, Vec<PathBuf>) {
        let older = dir.join("audit.jsonl.1");
        let current = dir.join("audit.jsonl");
        let fourth = write_chain(&older, Head::GENESIS, 4);
        let eighth = write_chain(&current, fourth, 8);
        (fourth, eighth, vec![current, older])
    }

    #[test]
    fn both_ends_are_checked_against_the_head_beside_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let head_path = dir.path().join("audit.head");
        let (fourth, eighth, files) = two_files(dir.path());
        write_head(&head_path, eighth, 1, GENESIS);
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.head.as_deref(), Some(head_path.as_path()));
        let elsewhere = dir.path().join("elsewhere.head");
        fs::copy(&head_path, &elsewhere).unwrap();
        let report = verify(&files, &HeadCheck::At(elsewhere.clone())).unwrap();
        assert_eq!(
            (report.head, report.findings),
            (Some(elsewhere), Vec::new())
        );

        let current = verify(&files[..1], &HeadCheck::Beside).unwrap();
        assert_eq!(
            current.findings,
            [Finding::MissingAtStart { from: 1, to: 4 }]
        );
        assert!(!current.intact());

        let other = Sha256Digest([9; 32]);
        write_head(
            &head_path,
            Head {
                seq: 8,
                hash: other,
            },
            1,
            GENESIS,
        );
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::EndMismatch { seq: 8 }]);
        write_head(&head_path, eighth, 1, other);
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::StartMismatch { seq: 1 }]);

        // A rotation that updated the head and stopped before deleting the older file.
        write_head(&head_path, eighth, 5, fourth.hash);
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        write_head(&head_path, eighth, 5, other);
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::StartMismatch { seq: 5 }]);

        // A head behind the log: a note, when the log passes through the record it names.
        write_head(&head_path, fourth, 1, GENESIS);
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::AfterHead { from: 5, to: 8 }]);
        assert!(report.intact());
        write_head(
            &head_path,
            Head {
                seq: 4,
                hash: other,
            },
            1,
            GENESIS,
        );
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::EndMismatch { seq: 4 }]);
    }

    #[test]
    fn an_empty_log_verifies_against_the_head_of_an_empty_log_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, "").unwrap();
        let head_path = dir.path().join("audit.head");
        write_head(&head_path, Head::GENESIS, 1, GENESIS);
        let report = verify(std::slice::from_ref(&path), &HeadCheck::Beside).unwrap();
        assert!(report.findings.is_empty() && report.records == 0);
        let (_, eighth, _) = two_files(dir.path());
        fs::write(&path, "").unwrap();
        fs::write(dir.path().join("audit.jsonl.1"), "").unwrap();
        write_head(&head_path, eighth, 3, GENESIS);
        let report = verify(std::slice::from_ref(&path), &HeadCheck::Beside).unwrap();
        assert_eq!(report.findings, [Finding::MissingAtEnd { from: 3, to: 8 }]);
    }

    #[test]
    fn a_head_that_cannot_be_found_or_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, files) = two_files(dir.path());
        let head_path = dir.path().join("audit.head");
        let report = verify(&files, &HeadCheck::Beside).unwrap();
        assert_eq!(
            (report.head, report.findings),
            (
                None,
                vec![Finding::HeadMissing {
                    path: head_path.clone()
                }]
            )
        );

        fs::write(&head_path, "{}").unwrap();
        assert!(matches!(
            verify(&files, &HeadCheck::Beside),
            Err(AuditVerifyError::Head(HeadError::Malformed { .. }))
        ));

        let other_log = dir.path().join("other.jsonl");
        write_chain(&other_log, Head::GENESIS, 1);
        let mixed = [files[0].clone(), other_log.clone()];
        match verify(&mixed, &HeadCheck::Beside) {
            Err(AuditVerifyError::Logs { files, heads }) => {
                assert_eq!(files, mixed);
                assert_eq!(heads, [head_path, dir.path().join("other.head")]);
            }
            other => panic!("expected files of two logs, got {other:?}"),
        }
        assert!(matches!(
            verify(&[], &HeadCheck::Beside),
            Err(AuditVerifyError::NoFiles)
        ));
    }

    #[test]
    fn a_gap_the_daemon_reported_is_a_finding_and_the_walk_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_chain(&path, Head::GENESIS, 3);
        let elsewhere = Sha256Digest([5; 32]).to_string();
        let mut text = fs::read_to_string(&path).unwrap();
        let report = AuditRecord::new(
            Entry::loss(TAIL_CUT, 2, None),
            6,
            "node-a",
            elsewhere.clone(),
        );
        let (line, hash) = chain::seal(&report);
        let next = AuditRecord::new(kernel_deny(7), 7, "node-a", hash.to_string());
        for line in [line, chain::seal(&next).0] {
            text.push_str(&line);
            text.push('\n');
        }
        fs::write(&path, &text).unwrap();
        let report = verify(std::slice::from_ref(&path), &HeadCheck::Skip).unwrap();
        assert_eq!(
            report.findings,
            [Finding::Cut {
                from: 4,
                to: 5,
                reported_at: 6
            }]
        );
        assert_eq!((report.records, report.last_seq), (5, 7));

        // The same loss record in its place, with a wrong link, is no gap: it is a broken link.
        let misplaced = AuditRecord::new(Entry::loss(TAIL_CUT, 2, None), 4, "node-a", elsewhere);
        let mut lines: Vec<String> = text.lines().take(3).map(str::to_owned).collect();
        lines.push(chain::seal(&misplaced).0);
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        let (_, line, problem) = failure(verify(std::slice::from_ref(&path), &HeadCheck::Skip));
        assert_eq!(line, 4);
        assert!(
            matches!(
                problem,
                ChainError::BrokenLink {
                    seq: 4,
                    previous: 3
                }
            ),
            "{problem}"
        );
    }
}

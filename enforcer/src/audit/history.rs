//! Records older than the in-memory window, read back from the log's files for
//! `enforcer flows`.
//!
//! The files are read newest first (the current one, then `.1` up to `.<keep>`), each from
//! its end. Every line is opened and its hash checked as the verifier does, and must be the
//! record right before the one read last: duplicates a rotation during the read leaves are
//! skipped, a gap right before a loss record of the daemon (records cut from the tail, which
//! the restarted writer reported) is read past, and any other missing seq is an error naming
//! the file and line where the chain jumps.
//! Damaged lines at the end of a file (what recovery rotates out after a crash) are skipped,
//! as the writer's loss record reports them; a damaged line anywhere else is an error. What
//! the files cannot give is said, never left out silently: records rotated out of the log, or
//! the error that stopped the read.
#![forbid(unsafe_code)]

use std::{io, path::PathBuf};

use super::{
    chain::{self, ChainError},
    files,
    recent::{Filter, RecentRecord},
    record::{Event, Source},
};

/// Why a read of older records stopped before it had all it was asked for.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// A file could not be read.
    #[error("failed to read audit file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A line is not a good record.
    #[error("{} line {line} is not a good audit record", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: u64,
        /// What is wrong with it.
        #[source]
        problem: ChainError,
    },
    /// The chain jumps: records between two lines are in none of the files.
    #[error(
        "records {from}..={to} are in none of the audit files: {} line {line} holds seq {}, \
         where {to} was due (a rotated file was removed, or records were cut)",
        path.display(),
        from - 1
    )]
    Gap {
        /// The file of the older record.
        path: PathBuf,
        /// Its 1-based line.
        line: u64,
        /// The first missing seq.
        from: u64,
        /// The last missing seq.
        to: u64,
    },
}

/// Where a read of older records ended.
#[derive(Debug)]
pub(crate) enum End {
    /// It found as many records as it was asked for.
    Limit,
    /// It reached the first record ever.
    Start,
    /// The log no longer holds the records before seq `oldest`: rotation deleted them.
    RotatedOut {
        /// The oldest seq the files hold.
        oldest: u64,
    },
    /// An error stopped it before seq `before`.
    Failed {
        /// The seq it could not read back beyond.
        before: u64,
        /// What stopped it.
        error: HistoryError,
    },
}

/// Records read back from the files.
#[derive(Debug)]
pub(crate) struct Older {
    /// The records, oldest first.
    pub(crate) records: Vec<RecentRecord>,
    /// Where the read ended.
    pub(crate) end: End,
}

/// Up to `limit` records with seqs below `before` that `filter` selects, the newest ones, from
/// the log whose current file is `path` and which keeps `keep` rotated files.
pub(super) fn older(
    path: &std::path::Path,
    keep: usize,
    before: u64,
    limit: usize,
    filter: &Filter,
) -> Older {
    let mut reader = Reader {
        records: Vec::new(),
        expected: before.saturating_sub(1),
        after_loss: false,
        limit,
        filter,
    };
    let end = reader.read(path, keep);
    let mut records = reader.records;
    records.reverse();
    Older { records, end }
}

/// A read in progress: the records found so far, newest first, and the seq due next.
struct Reader<'a> {
    records: Vec<RecentRecord>,
    expected: u64,
    /// Whether the record read last is a loss record of the daemon.
    after_loss: bool,
    limit: usize,
    filter: &'a Filter,
}

impl Reader<'_> {
    fn read(&mut self, path: &std::path::Path, keep: usize) -> End {
        if self.expected == 0 {
            return End::Start;
        }
        if self.limit == 0 {
            return End::Limit;
        }
        for k in 0..=keep {
            let file = if k == 0 {
                path.to_owned()
            } else {
                files::rotated(path, k)
            };
            match self.read_file(file) {
                Ok(Some(end)) => return end,
                Ok(None) => {}
                Err(error) => {
                    return End::Failed {
                        before: self.expected + 1,
                        error,
                    };
                }
            }
        }
        End::RotatedOut {
            oldest: self.expected + 1,
        }
    }

    /// Reads `file` backwards; `Some` once the read is over.
    fn read_file(&mut self, file: PathBuf) -> Result<Option<End>, HistoryError> {
        let read_error = |path: &PathBuf| {
            let path = path.clone();
            move |source| HistoryError::Read { path, source }
        };
        let Some(lines) = files::lines_backwards(&file).map_err(read_error(&file))? else {
            return Ok(None);
        };
        let mut at_end = true;
        for line in lines {
            let (number, bytes) = line.map_err(read_error(&file))?;
            let record = match chain::open(&bytes) {
                Ok((record, _)) => record,
                Err(_) if at_end => continue,
                Err(problem) => {
                    return Err(HistoryError::Record {
                        path: file,
                        line: number,
                        problem,
                    });
                }
            };
            at_end = false;
            let is_loss = record.event == Event::Loss && record.source == Source::Daemon;
            if record.seq > self.expected {
                // Newer than asked for (in the window, or read twice across a rotation).
                self.after_loss = record.seq == self.expected + 1 && is_loss;
                continue;
            }
            if record.seq < self.expected && self.after_loss {
                // The writer's loss record right after the gap reports it (a cut tail the
                // chain continued after): read on.
                self.expected = record.seq;
            } else if record.seq < self.expected {
                return Err(HistoryError::Gap {
                    path: file,
                    line: number,
                    from: record.seq + 1,
                    to: self.expected,
                });
            }
            self.after_loss = is_loss;
            if record.matches(self.filter.verdict, self.filter.id.as_deref()) {
                let text = std::str::from_utf8(&bytes).expect("an opened record is UTF-8");
                self.records.push(RecentRecord::new(&record, text));
                if self.records.len() == self.limit {
                    return Ok(Some(End::Limit));
                }
            }
            self.expected -= 1;
            if self.expected == 0 {
                return Ok(Some(End::Start));
            }
        }
        Ok(None)
    }
}

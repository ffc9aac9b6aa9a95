//! The writer: producers submit entries without ever waiting; one thread appends them to the
//! log in submission order, chains them, rotates files by size, and keeps the newest records
//! in memory and on a broadcast channel for `enforcer flows`, which reads older records back
//! from the files (see [`super::history`]).
//!
//! Nothing is lost silently: an entry that finds the queue full is counted, and as soon as the
//! queue has room again the writer records a `daemon`/`loss` record (`audit-queue-full`) with
//! the count; entries an I/O error kept off the disk get a `write-error` loss record once
//! writing works again; damage found at the end of the log on restart gets a `torn-record`
//! loss record naming the file and line.
//!
//! The writer keeps the log's head (see [`super::head`]) beside it, and checks the log against
//! it when it opens: records the head names that the log no longer ends with (an
//! `audit-tail-cut` loss record; the chain then continues after the head's last record, so the
//! gap stays visible), a log whose records do not pass through the head's last record
//! (`audit-head-mismatch`), or records without a head (`audit-head-missing`). The loss record is
//! the first new record, and [`AuditLog::previous_run`] says what the log held of the
//! previous run.
#![forbid(unsafe_code)]

use std::{
    fmt,
    fs::{DirBuilder, File},
    io::{self, BufWriter, Write as _},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::broadcast;

use super::{
    chain::{self, Head},
    files::{self, Tail},
    head::{self, Ends, HEAD_MISMATCH, HEAD_MISSING, HeadError, Oldest, TAIL_CUT},
    history::{self, End},
    recent::{Filter, RecentRecord, Window},
    record::{AuditRecord, Entry},
};

/// Entries the writer takes from the queue before it flushes and publishes them.
const MAX_BATCH: usize = 1024;

/// Records a `flows --follow` subscriber may fall behind by before it misses some.
const FOLLOW_BUFFER: usize = 4096;

/// How long dropping the last handle waits for the writer to drain the queue.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the audit log goes and how much of it is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuditConfig {
    /// The current file; rotated files are `<path>.1` (newest) to `<path>.<keep>`.
    pub path: PathBuf,
    /// The size at which the current file is rotated.
    pub max_bytes: u64,
    /// How many rotated files are kept.
    pub keep: usize,
    /// How many bytes the newest records kept in memory for `enforcer flows` may cost (each
    /// its line and about 50 bytes more); `flows` reads older ones from the files.
    pub recent_bytes: usize,
    /// How many submitted entries may wait for the writer before new ones are dropped (and
    /// counted in a loss record).
    pub queue: usize,
}

impl AuditConfig {
    /// A log at `path` rotated at `max_bytes` and keeping `keep` rotated files, with
    /// `recent_bytes` of the newest records in memory and room for 65,536 entries waiting for
    /// the writer.
    #[must_use]
    pub(crate) fn new(path: PathBuf, max_bytes: u64, keep: usize, recent_bytes: usize) -> Self {
        Self {
            path,
            max_bytes,
            keep,
            recent_bytes,
            queue: 65_536,
        }
    }
}

/// Errors of opening the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A size or count in the configuration is zero.
    #[error("audit setting {0} must be at least 1")]
    Invalid(&'static str),
    /// The log's directory could not be created.
    #[error("failed to create audit directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An existing log file could not be read to find where the chain continues.
    #[error("failed to read audit log {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The log's head could not be read.
    #[error("failed to read the audit head")]
    Head(#[from] HeadError),
    /// The log's head could not be written.
    #[error("failed to write the audit head")]
    WriteHead(#[source] io::Error),
    /// A log file damaged at its end could not be rotated out.
    #[error("failed to rotate damaged audit log {}", path.display())]
    Rotate {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The log file could not be opened for appending.
    #[error("failed to open audit log {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("failed to start the audit writer thread")]
    Spawn(#[source] io::Error),
}

/// Counters of the audit log since it was opened.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AuditStats {
    /// Records written (loss records included).
    pub written: u64,
    /// Entries dropped because the queue was full or the log was closed.
    pub dropped: u64,
    /// Files rotated.
    pub rotations: u64,
    /// I/O errors met while writing.
    pub write_errors: u64,
    /// The current file.
    pub path: PathBuf,
    /// The seq of the newest record written (0 if there is none).
    pub last_seq: u64,
}

/// What the log held of the previous run when it opened, for the daemon's start record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreviousRun {
    /// No earlier records: the log starts with this run.
    None,
    /// The last record, seq `seq`, is the daemon's stop record: the previous run stopped cleanly.
    Stopped {
        /// The stop record's seq.
        seq: u64,
    },
    /// The last record, seq `seq`, is not a stop record: the previous run died.
    Died {
        /// The last record's seq.
        seq: u64,
    },
    /// The head names records `from..=to` that the log no longer ends with: they were cut (or
    /// never reached the disk), and an `audit-tail-cut` loss record says so.
    TailCut {
        /// The first missing seq.
        from: u64,
        /// The last missing seq: the head's last record.
        to: u64,
    },
    /// The log does not hold record `seq` as the head names it: the log was rewritten, and an
    /// `audit-head-mismatch` loss record says so.
    Diverged {
        /// The head's last record.
        seq: u64,
    },
    /// The log ends at `last` but had no head: whether records were cut after it is unknown,
    /// and an `audit-head-missing` loss record says so.
    HeadMissing {
        /// The last record's seq.
        last: u64,
        /// Whether that record is the daemon's stop record.
        stopped: bool,
    },
}

/// The start record's words: `previous run stopped cleanly at seq 41`.
impl fmt::Display for PreviousRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ended = |f: &mut fmt::Formatter<'_>, seq: u64, stopped: bool| {
            if stopped {
                write!(f, "previous run stopped cleanly at seq {seq}")
            } else {
                write!(
                    f,
                    "previous run ended without a stop record (last seq {seq})"
                )
            }
        };
        match *self {
            Self::None => f.write_str("no previous run in the audit log"),
            Self::Stopped { seq } => ended(f, seq, true),
            Self::Died { seq } => ended(f, seq, false),
            Self::TailCut { from, to } => write!(
                f,
                "previous run's end is missing: records {from}..{to} were cut from the audit log \
                 (see the {TAIL_CUT} loss record)"
            ),
            Self::Diverged { seq } => write!(
                f,
                "previous run's end is unknown: the audit log does not hold record seq {seq} as \
                 its head names it (see the {HEAD_MISMATCH} loss record)"
            ),
            Self::HeadMissing { last, stopped } => {
                ended(f, last, stopped)?;
                write!(
                    f,
                    "; the audit head was missing (see the {HEAD_MISSING} loss record)"
                )
            }
        }
    }
}

/// The node's audit trail: a cheap handle to one writer thread.
#[derive(Clone)]
pub(crate) struct AuditLog(Arc<Inner>);

struct Inner {
    /// `None` once closed.
    sender: RwLock<Option<SyncSender<Message>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    previous_run: PreviousRun,
}

/// The newest records a `flows` request asks for, oldest first, and where they stop when
/// there are fewer than it asked for.
#[derive(Debug)]
pub(crate) struct Backlog {
    /// The records, oldest first.
    pub(crate) records: Vec<Arc<RecentRecord>>,
    /// The seq of the newest record written when the backlog was taken (0: none).
    pub(crate) last_seq: u64,
    /// Why records older than these are not there, when the log may hold some that match.
    pub(crate) unavailable: Option<Unavailable>,
}

/// Records a `flows` request asked for that the log cannot give.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unavailable {
    /// No record older than this seq is given.
    pub(crate) before: u64,
    /// Why, for an operator.
    pub(crate) reason: String,
}

/// What the queue carries.
enum Message {
    /// An entry to write.
    Entry(Box<Entry>),
    /// Nothing to write: wakes the writer to record a loss.
    Wake,
}

/// State the handles and the writer thread both see.
struct Shared {
    path: PathBuf,
    /// Rotated files kept (where `flows` looks for older records).
    keep: usize,
    /// Calls of `submit` while open (each ends up written or counted as dropped).
    submitted: AtomicU64,
    /// Entries dropped since opening.
    dropped: AtomicU64,
    /// Entries dropped that no loss record reports yet.
    unreported_drops: AtomicU64,
    progress: Mutex<Progress>,
    changed: Condvar,
    recent: Mutex<Window>,
    follow: broadcast::Sender<Arc<RecentRecord>>,
}

/// What the writer has done, published after each batch.
#[derive(Debug)]
struct Progress {
    /// Submitted entries dealt with: written, lost to an I/O error, or counted in a loss record.
    accounted: u64,
    written: u64,
    rotations: u64,
    write_errors: u64,
    last_seq: u64,
    /// Whether everything written so far reached the OS without error.
    clean: bool,
    /// Whether the writer thread has ended.
    stopped: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditLog {
    /// Opens the log at `config.path` for `node`, creating its directory (mode 0700), file and
    /// head (0600), checks the files on disk against the head, continues the chain, and starts
    /// the writer thread. Anything missing or damaged becomes a loss record, written first.
    pub(crate) fn open(config: AuditConfig, node: &str) -> Result<Self, AuditError> {
        for (setting, zero) in [
            ("max_bytes", config.max_bytes == 0),
            ("keep", config.keep == 0),
            ("queue", config.queue == 0),
        ] {
            if zero {
                return Err(AuditError::Invalid(setting));
            }
        }
        let path = config.path;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| AuditError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let Recovered {
            head,
            oldest,
            previous_run,
            losses,
        } = recover(&path, config.keep)?;
        let open_error = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        let file = files::open_append(&path).map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();

        let (sender, receiver) = sync_channel(config.queue);
        let shared = Arc::new(Shared {
            path: path.clone(),
            keep: config.keep,
            submitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            unreported_drops: AtomicU64::new(0),
            progress: Mutex::new(Progress {
                accounted: 0,
                written: 0,
                rotations: 0,
                write_errors: 0,
                last_seq: head.seq,
                clean: true,
                stopped: false,
            }),
            changed: Condvar::new(),
            recent: Mutex::new(Window::new(config.recent_bytes, head.seq + 1)),
            follow: broadcast::channel(FOLLOW_BUFFER).0,
        });
        let writer = Writer {
            head_path: head::path_for(&path),
            path,
            node: node.to_owned(),
            max_bytes: config.max_bytes,
            keep: config.keep,
            file: BufWriter::new(file),
            size,
            head,
            oldest,
            head_stale: false,
            written: 0,
            rotations: 0,
            write_errors: 0,
            lost: 0,
            error: None,
        };
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("enforcer-audit".to_owned())
            .spawn(move || writer.run(&receiver, &thread_shared))
            .map_err(AuditError::Spawn)?;
        let log = Self(Arc::new(Inner {
            sender: RwLock::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            shared,
            previous_run,
        }));
        for loss in losses {
            log.submit(loss);
        }
        Ok(log)
    }

    /// Queues `entry` for writing; never waits (it runs on the data path). If the queue is
    /// full, the entry is counted and a loss record reports the count.
    pub(crate) fn submit(&self, entry: Entry) {
        let shared = &self.0.shared;
        let sender = self.0.sender.read().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            shared.dropped.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                path = %shared.path.display(),
                "audit entry submitted after the log was closed; dropped"
            );
            return;
        };
        shared.submitted.fetch_add(1, Ordering::SeqCst);
        match sender.try_send(Message::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                shared.dropped.fetch_add(1, Ordering::SeqCst);
                shared.unreported_drops.fetch_add(1, Ordering::SeqCst);
                // The writer may have emptied the queue since: make sure it looks at the count.
                // If the queue is still full, the writer reads the count after its next batch.
                let _ = sender.try_send(Message::Wake);
            }
            Err(TrySendError::Disconnected(_)) => {
                shared.dropped.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    path = %shared.path.display(),
                    "the audit writer is gone; entry dropped"
                );
            }
        }
    }

    /// What the log held of the previous run when it opened.
    #[must_use]
    pub(crate) fn previous_run(&self) -> PreviousRun {
        self.0.previous_run
    }

    /// The newest `limit` written records that `filter` selects, oldest first: from memory,
    /// and from the files for what the memory window does not reach. Reads files: call it
    /// off the async workers.
    #[must_use]
    pub(crate) fn backlog(&self, filter: &Filter, limit: usize) -> Backlog {
        let shared = &self.0.shared;
        let (window, oldest_seq, next_seq) = {
            let window = lock(&shared.recent);
            (window.records(), window.oldest_seq(), window.next_seq())
        };
        let mut records: Vec<Arc<RecentRecord>> =
            window.into_iter().filter(|r| r.matches(filter)).collect();
        let last_seq = next_seq - 1;
        if records.len() >= limit {
            records.drain(..records.len() - limit);
            return Backlog {
                records,
                last_seq,
                unavailable: None,
            };
        }
        let older = history::older(
            &shared.path,
            shared.keep,
            oldest_seq,
            limit - records.len(),
            filter,
        );
        let unavailable = match older.end {
            End::Limit | End::Start => None,
            End::RotatedOut { oldest } => Some(Unavailable {
                before: oldest,
                reason: format!(
                    "records before seq {oldest} were rotated out of the audit log, which keeps \
                     {} rotated files",
                    shared.keep
                ),
            }),
            End::Failed { before, error } => Some(Unavailable {
                before,
                reason: crate::report::report(&error),
            }),
        };
        let mut all: Vec<Arc<RecentRecord>> = older.records.into_iter().map(Arc::new).collect();
        all.append(&mut records);
        Backlog {
            records: all,
            last_seq,
            unavailable,
        }
    }

    /// Every record from now on, as it is written (for `enforcer flows --follow`).
    #[must_use]
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<RecentRecord>> {
        self.0.shared.follow.subscribe()
    }

    /// Waits up to `timeout` until everything submitted before the call is written and
    /// handed to the OS; false if that did not happen in time or an I/O error got in the way.
    /// Only the tests wait on the writer this way.
    #[cfg(test)]
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let shared = &self.0.shared;
        let target = shared.submitted.load(Ordering::SeqCst);
        let (progress, _) = shared
            .changed
            .wait_timeout_while(lock(&shared.progress), timeout, |p| {
                p.accounted < target && !p.stopped
            })
            .unwrap_or_else(PoisonError::into_inner);
        progress.accounted >= target && progress.clean
    }

    /// Counters since the log was opened.
    #[must_use]
    pub(crate) fn stats(&self) -> AuditStats {
        let shared = &self.0.shared;
        let progress = lock(&shared.progress);
        AuditStats {
            written: progress.written,
            dropped: shared.dropped.load(Ordering::SeqCst),
            rotations: progress.rotations,
            write_errors: progress.write_errors,
            path: shared.path.clone(),
            last_seq: progress.last_seq,
        }
    }

    /// Stops taking entries, lets the writer drain the queue, sync the file and end, waiting
    /// up to `timeout` for it. Later submissions are counted as dropped.
    pub(crate) fn close(&self, timeout: Duration) {
        self.0.close(timeout);
    }
}

impl Inner {
    fn close(&self, timeout: Duration) {
        // The writer ends once it has drained what the dropped sender left in the queue.
        drop(
            self.sender
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let shared = &self.shared;
        let (progress, _) = shared
            .changed
            .wait_timeout_while(lock(&shared.progress), timeout, |p| !p.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        if !progress.stopped {
            tracing::warn!(
                path = %shared.path.display(),
                ?timeout,
                "the audit writer is still draining its queue"
            );
            return;
        }
        drop(progress);
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            tracing::error!(path = %shared.path.display(), "the audit writer panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close(DROP_TIMEOUT);
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.0.shared.path)
            .finish_non_exhaustive()
    }
}

/// What the files on disk hold when the log opens.
struct Recovered {
    /// Where the chain continues.
    head: Head,
    /// The oldest record retained.
    oldest: Oldest,
    /// What the log held of the previous run.
    previous_run: PreviousRun,
    /// Loss entries to write first.
    losses: Vec<Entry>,
}

/// Where the chain continues after a restart, checked against the head: the loss entries for
/// records the head names that the log does not end with, for a missing head, and for damage
/// found at the end of the current file or of the newest rotated one. A damaged current file
/// is rotated out as it is, so that nothing is appended after its damage and `verify` points
/// at it. Without a head and without records, a head for an empty log is written.
fn recover(path: &Path, keep: usize) -> Result<Recovered, AuditError> {
    let head_path = head::path_for(path);
    let stored = head::read(&head_path)?;
    let scan = |file: &Path| files::scan(file).map_err(read_error(file));
    let current = scan(path)?;
    let last_of = |tail: &Tail| tail.head.map(|head| (head, tail.stopped));
    let current_last = current.as_ref().and_then(last_of);
    let previous = match current_last {
        Some(_) => None,
        None => scan(&files::rotated(path, 1))?,
    };
    let last = current_last.or_else(|| previous.as_ref().and_then(last_of));

    let mut losses = Vec::new();
    let (head, previous_run) = match (stored, last) {
        (None, None) => {
            let ends = Ends {
                last: Head::GENESIS,
                first: Oldest::next_after(Head::GENESIS),
            };
            head::write(&head_path, &ends).map_err(AuditError::WriteHead)?;
            (Head::GENESIS, PreviousRun::None)
        }
        (None, Some((last, stopped))) => {
            let detail = format!(
                "{} holds records up to seq {} but its head {} is missing: records cut after \
                 seq {} cannot be ruled out; the chain continues from seq {}",
                path.display(),
                last.seq,
                head_path.display(),
                last.seq,
                last.seq,
            );
            losses.push(Entry::loss(HEAD_MISSING, 0, Some(detail)));
            let previous_run = PreviousRun::HeadMissing {
                last: last.seq,
                stopped,
            };
            (last, previous_run)
        }
        (Some(ends), last) => check_against_head(path, &head_path, ends, last, &mut losses)?,
    };
    let mut oldest = match stored {
        Some(ends) => ends.first,
        None => files::oldest(path, keep)
            .map_err(read_error(path))?
            .unwrap_or(Oldest::next_after(head)),
    };

    let mut previous_name = files::rotated(path, 1);
    if let Some(tail) = current.filter(|tail| tail.damaged > 0) {
        let mut rotate = || {
            oldest = oldest_after_rotation(path, keep, oldest)?;
            if let Some(ends) = stored {
                let first = oldest;
                head::write(&head_path, &Ends { first, ..ends })?;
            }
            files::rotate(path, keep)
        };
        rotate().map_err(|source| AuditError::Rotate {
            path: path.to_owned(),
            source,
        })?;
        let fate = format!("rotated out unchanged as {}", previous_name.display());
        losses.push(torn(path, &tail, &fate, head));
        previous_name = files::rotated(path, 2);
    }
    if let Some(tail) = previous.filter(|tail| tail.damaged > 0) {
        losses.push(torn(&previous_name, &tail, "left as found", head));
    }
    Ok(Recovered {
        head,
        oldest,
        previous_run,
        losses,
    })
}

/// Compares the log's last good record with the head's `ends`: where the chain continues and
/// what the previous run left, pushing a loss entry when the log does not end as the head says.
fn check_against_head(
    path: &Path,
    head_path: &Path,
    ends: Ends,
    last: Option<(Head, bool)>,
    losses: &mut Vec<Entry>,
) -> Result<(Head, PreviousRun), AuditError> {
    let named = ends.last;
    let log_last = last.map_or(0, |(head, _)| head.seq);
    if log_last < named.seq {
        let from = if last.is_some() {
            log_last + 1
        } else {
            ends.first.seq.min(named.seq)
        };
        let ends_at = match last {
            Some(_) => format!("ends at seq {log_last}"),
            None => "holds no records".to_owned(),
        };
        let detail = format!(
            "records {from}..{} are missing from the end of {}: its head {} says the last \
             record is seq {} (hash {}), but the log {ends_at}; they were cut, or never reached \
             the disk; the chain continues after seq {}",
            named.seq,
            path.display(),
            head_path.display(),
            named.seq,
            named.hash,
            named.seq,
        );
        losses.push(Entry::loss(TAIL_CUT, named.seq - from + 1, Some(detail)));
        let previous_run = PreviousRun::TailCut {
            from,
            to: named.seq,
        };
        return Ok((named, previous_run));
    }
    let Some((last, stopped)) = last else {
        return Ok((Head::GENESIS, PreviousRun::None));
    };
    let passes = named.seq == 0 || last == named || (last.seq > named.seq && holds(path, named)?);
    if !passes {
        let detail = format!(
            "{} does not hold record seq {} as its head {} names it (hash {}): the log was \
             rewritten up to at least seq {}; the chain continues from its last record, seq {}",
            path.display(),
            named.seq,
            head_path.display(),
            named.hash,
            named.seq,
            last.seq,
        );
        losses.push(Entry::loss(HEAD_MISMATCH, 1, Some(detail)));
        return Ok((last, PreviousRun::Diverged { seq: named.seq }));
    }
    let previous_run = if stopped {
        PreviousRun::Stopped { seq: last.seq }
    } else {
        PreviousRun::Died { seq: last.seq }
    };
    Ok((last, previous_run))
}

/// Whether the log at `path` holds the record `named`, in the current file or the newest rotated
/// one (the head is at most one rotation behind the log).
fn holds(path: &Path, named: Head) -> Result<bool, AuditError> {
    for file in [path.to_owned(), files::rotated(path, 1)] {
        if let Some(hash) = files::hash_of(&file, named.seq).map_err(read_error(&file))? {
            return Ok(hash == named.hash);
        }
    }
    Ok(false)
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> AuditError {
    let path = path.to_owned();
    move |source| AuditError::Read { path, source }
}

/// The oldest record retained once the log's files rotate: unchanged, unless the rotation
/// deletes `path.<keep>` and the first record of the oldest file left takes its place.
fn oldest_after_rotation(path: &Path, keep: usize, oldest: Oldest) -> io::Result<Oldest> {
    if !files::rotated(path, keep).exists() {
        return Ok(oldest);
    }
    Ok(files::oldest(path, keep - 1)?.unwrap_or(oldest))
}

/// The loss entry for the damaged end of `file`.
fn torn(file: &Path, tail: &Tail, fate: &str, head: Head) -> Entry {
    let detail = format!(
        "{} line {}: {} damaged line(s) at the end (torn or not verifying), {fate}; \
         the chain continues from seq {}",
        file.display(),
        tail.first_damaged_line(),
        tail.damaged,
        head.seq,
    );
    Entry::loss("torn-record", tail.damaged, Some(detail))
}

/// The writer thread's state: the open file, the chain's head and the head file.
struct Writer {
    path: PathBuf,
    head_path: PathBuf,
    node: String,
    max_bytes: u64,
    keep: usize,
    file: BufWriter<File>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
    head: Head,
    /// The oldest record retained.
    oldest: Oldest,
    /// Whether records were written since the head file was.
    head_stale: bool,
    written: u64,
    rotations: u64,
    write_errors: u64,
    /// Entries an I/O error kept out of the log that no loss record reports yet.
    lost: u64,
    /// The latest I/O error no loss record reports yet.
    error: Option<io::Error>,
}

impl Writer {
    /// Writes batches from the queue until every handle has let go of it, then syncs.
    fn run(mut self, receiver: &Receiver<Message>, shared: &Shared) {
        let _stopped = Stopped(shared);
        while let Ok(first) = receiver.recv() {
            let mut entries = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next {
                if let Message::Entry(entry) = message {
                    entries.push(*entry);
                }
                next = if entries.len() < MAX_BATCH {
                    receiver.try_recv().ok()
                } else {
                    None
                };
            }
            self.write_batch(entries, shared);
        }
        self.write_batch(Vec::new(), shared);
        if let Err(error) = self.file.get_ref().sync_all() {
            self.failed(error);
            let mut progress = lock(&shared.progress);
            progress.write_errors = self.write_errors;
            progress.clean = false;
        }
    }

    /// Writes a report of earlier I/O errors, `entries`, and a loss record for entries dropped
    /// meanwhile; flushes; and publishes the records.
    fn write_batch(&mut self, entries: Vec<Entry>, shared: &Shared) {
        let mut accounted = entries.len() as u64;
        let mut records = Vec::with_capacity(entries.len() + 2);
        if let Some(error) = self.error.take() {
            let lost = std::mem::take(&mut self.lost);
            let detail = format!("{}: {error}", self.path.display());
            match self.append(Entry::loss("write-error", lost, Some(detail))) {
                Some(record) => records.push(record),
                None => self.lost += lost,
            }
        }
        for entry in entries {
            match self.append(entry) {
                Some(record) => records.push(record),
                None => self.lost += 1,
            }
        }
        let dropped = shared.unreported_drops.swap(0, Ordering::SeqCst);
        if dropped > 0 {
            accounted += dropped;
            match self.append(Entry::loss("audit-queue-full", dropped, None)) {
                Some(record) => records.push(record),
                None => self.lost += dropped,
            }
        }
        let clean = match self.file.flush().and_then(|()| self.sync_head()) {
            Ok(()) => self.error.is_none(),
            Err(error) => {
                self.failed(error);
                false
            }
        };
        shared.publish(records, accounted, clean, self);
    }

    /// Appends the record for `entry`, rotating afterwards if the file is full; `None` if it
    /// could not be written.
    fn append(&mut self, entry: Entry) -> Option<Arc<RecentRecord>> {
        let seq = self.head.seq + 1;
        let record = AuditRecord::new(entry, seq, &self.node, self.head.hash.to_string());
        let (line, hash) = chain::seal(&record);
        if let Err(error) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.write_all(b"\n"))
        {
            self.failed(error);
            return None;
        }
        self.head = Head { seq, hash };
        self.head_stale = true;
        self.size += line.len() as u64 + 1;
        self.written += 1;
        if self.size >= self.max_bytes
            && let Err(error) = self.rotate()
        {
            self.failed(error);
        }
        Some(Arc::new(RecentRecord::new(&record, &line)))
    }

    /// Once the batch flushed is on disk, writes the head if records were written since it was
    /// last: the head never names a record the disk may not hold.
    fn sync_head(&mut self) -> io::Result<()> {
        if !self.head_stale {
            return Ok(());
        }
        self.file.get_ref().sync_data()?;
        self.write_head()
    }

    fn write_head(&mut self) -> io::Result<()> {
        let ends = Ends {
            last: self.head,
            first: self.oldest,
        };
        head::write(&self.head_path, &ends)?;
        self.head_stale = false;
        Ok(())
    }

    /// Syncs the current file, writes the head (with the oldest record that stays), shifts the
    /// rotated files, deleting the oldest beyond `keep`, and starts a new current file.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        self.oldest = oldest_after_rotation(&self.path, self.keep, self.oldest)?;
        self.write_head()?;
        files::rotate(&self.path, self.keep)?;
        self.file = BufWriter::new(files::open_append(&self.path)?);
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }

    fn failed(&mut self, error: io::Error) {
        tracing::error!(path = %self.path.display(), %error, "audit log write failed");
        self.write_errors += 1;
        self.error = Some(error);
    }
}

impl Shared {
    /// Makes `records` visible to `recent` and subscribers, and wakes `flush` and `close`.
    fn publish(
        &self,
        records: Vec<Arc<RecentRecord>>,
        accounted: u64,
        clean: bool,
        writer: &Writer,
    ) {
        lock(&self.recent).extend(records.iter().cloned());
        for record in records {
            // No subscriber is not an error.
            let _ = self.follow.send(record);
        }
        let mut progress = lock(&self.progress);
        progress.accounted += accounted;
        progress.written = writer.written;
        progress.rotations = writer.rotations;
        progress.write_errors = writer.write_errors;
        progress.last_seq = writer.head.seq;
        progress.clean = clean;
        drop(progress);
        self.changed.notify_all();
    }
}

/// Marks the writer stopped when its thread ends, also by a panic.
struct Stopped<'a>(&'a Shared);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        lock(&self.0.progress).stopped = true;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::PermissionsExt as _,
        thread,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::audit::{
        AuditVerifyError, ChainError, Event, Finding, HeadCheck, Source, Verdict, VerifyReport,
        record::samples::{self, kernel_deny},
        verify::verify,
    };

    /// Long enough for any machine; the tests assert that it is met, not how fast.
    const WAIT: Duration = Duration::from_secs(30);

    fn config(dir: &Path, max_bytes: u64, keep: usize) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit.jsonl"),
            max_bytes,
            keep,
            recent_bytes: 4096,
            queue: 1024,
        }
    }

    fn write(log: &AuditLog, count: u32) {
        for n in 1..=count {
            log.submit(kernel_deny(n));
        }
        assert!(log.flush(WAIT), "the writer did not catch up");
    }

    fn read_records(path: &Path) -> Vec<AuditRecord> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| chain::open(line.as_bytes()).unwrap().0)
            .collect()
    }

    /// The log's files, as the shell glob `audit.jsonl*` names them (current one first).
    fn log_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains("audit.jsonl"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn records_are_written_in_order_kept_in_memory_and_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(config(dir.path(), u64::MAX, 3), "node-a").unwrap();
        let mut follow = log.subscribe();
        write(&log, 30);
        log.submit(Entry {
            time: samples::time(),
            rule: Some(1),
            policy_version: 2,
            ..Entry::new(Source::Inbound, Event::Open, Verdict::Allow, "policy")
        });
        assert!(log.flush(WAIT));

        let records = read_records(&dir.path().join("audit.jsonl"));
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=31).collect::<Vec<_>>());
        let rules: Vec<Option<u32>> = records[..30].iter().map(|r| r.rule).collect();
        assert_eq!(
            rules,
            (1..=30).map(Some).collect::<Vec<_>>(),
            "submission order"
        );
        assert_eq!(
            (records[30].source, records[30].event),
            (Source::Inbound, Event::Open)
        );
        assert!(records.iter().all(|r| r.node == "node-a"));

        let backlog = log.backlog(&Filter::default(), 10);
        let recent: Vec<u64> = backlog.records.iter().map(|r| r.seq()).collect();
        assert_eq!(recent, (22..=31).collect::<Vec<_>>());
        assert_eq!((backlog.last_seq, backlog.unavailable), (31, None));
        let followed: Vec<u64> = std::iter::from_fn(|| follow.try_recv().ok())
            .map(|r| r.seq())
            .collect();
        assert_eq!(followed, seqs);

        let stats = log.stats();
        assert_eq!(
            (
                stats.written,
                stats.dropped,
                stats.rotations,
                stats.last_seq
            ),
            (31, 0, 0, 31)
        );
        log.close(WAIT);
        let report = verify(&log_files(dir.path()), &HeadCheck::Beside).unwrap();
        assert_eq!((report.records, report.anchored), (31, true));
        assert_eq!(report.head, Some(dir.path().join("audit.head")));
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }

    #[test]
    fn directory_and_file_are_private_and_bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("lib/enforcer/audit");
        let log = AuditLog::open(config(&nested, 1024, 2), "node-a").unwrap();
        log.close(WAIT);
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&nested.join("audit.jsonl")), 0o600);
        assert_eq!(mode(&nested.join("audit.head")), 0o600);

        for (setting, bad) in [
            (
                "max_bytes",
                AuditConfig {
                    max_bytes: 0,
                    ..config(&nested, 1, 1)
                },
            ),
            (
                "keep",
                AuditConfig {
                    keep: 0,
                    ..config(&nested, 1, 1)
                },
            ),
            (
                "queue",
                AuditConfig {
                    queue: 0,
                    ..config(&nested, 1, 1)
                },
            ),
        ] {
            let error = AuditLog::open(bad, "node-a").unwrap_err();
            assert!(
                matches!(error, AuditError::Invalid(s) if s == setting),
                "{error}"
            );
        }
    }

    #[test]
    fn rotated_files_verify_together_in_any_order_and_a_missing_one_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(config(dir.path(), 2000, 20), "node-a").unwrap();
        write(&log, 40);
        log.close(WAIT);
        let rotations = log.stats().rotations;
        assert!(rotations >= 3, "{rotations} rotations");

        let mut files = log_files(dir.path());
        assert_eq!(files.len() as u64, rotations + 1);
        let with_records = files
            .iter()
            .filter(|file| fs::metadata(file).unwrap().len() > 0)
            .count();
        for _ in 0..2 {
            let report = verify(&files, &HeadCheck::Beside).unwrap();
            assert_eq!((report.records, report.anchored), (40, true));
            assert!(report.intact(), "{:?}", report.findings);
            assert_eq!(report.files, with_records);
            files.reverse();
        }

        let middle = files::rotated(&dir.path().join("audit.jsonl"), 2);
        fs::remove_file(&middle).unwrap();
        let newer = files::rotated(&dir.path().join("audit.jsonl"), 1);
        match verify(&log_files(dir.path()), &HeadCheck::Beside) {
            Err(AuditVerifyError::Record {
                path,
                line: 1,
                problem: ChainError::BrokenLink { .. },
            }) => assert_eq!(path, newer),
            other => panic!(
                "expected a broken link at the start of {}, got {other:?}",
                newer.display()
            ),
        }
    }

    #[test]
    fn rotation_deletes_files_beyond_keep_and_still_verifies_against_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(dir.path(), 1000, 2), "node-a").unwrap();
        write(&log, 40);
        log.close(WAIT);
        assert!(files::rotated(&path, 2).exists());
        assert!(!files::rotated(&path, 3).exists());
        let report = verify(&log_files(dir.path()), &HeadCheck::Beside).unwrap();
        assert!(!report.anchored);
        assert_eq!(report.last_seq, 40);
        assert!(report.intact(), "{:?}", report.findings);
        let oldest = first_seq_of(&files::rotated(&path, 2));
        assert_eq!(report.first_seq, oldest);
        assert!(oldest > 1, "rotation deleted the first records");

        // Deleting the oldest retained file is not rotation: the head still names its first record.
        fs::remove_file(files::rotated(&path, 2)).unwrap();
        let next = first_seq_of(&files::rotated(&path, 1));
        let report = verify(&log_files(dir.path()), &HeadCheck::Beside).unwrap();
        assert_eq!(
            report.findings,
            [Finding::MissingAtStart {
                from: oldest,
                to: next - 1
            }]
        );
        assert!(!report.intact());
    }

    #[test]
    fn a_restarted_log_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let log = AuditLog::open(config(dir.path(), u64::MAX, 2), "node-a").unwrap();
            write(&log, 5);
        }
        // Every record fills a file: the current file is empty when the log opens again, and
        // the chain continues from the newest rotated one.
        for _ in 0..2 {
            let log = AuditLog::open(config(dir.path(), 1, 20), "node-a").unwrap();
            write(&log, 2);
            assert_eq!(
                fs::metadata(dir.path().join("audit.jsonl")).unwrap().len(),
                0
            );
        }
        let report = verify(&log_files(dir.path()), &HeadCheck::Beside).unwrap();
        assert_eq!(
            (report.records, report.last_seq, report.anchored),
            (14, 14, true)
        );
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }

    #[test]
    fn a_torn_last_line_is_kept_rotated_out_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        write(&log, 5);
        log.close(WAIT);
        let mut damaged = fs::read(&path).unwrap();
        damaged.extend_from_slice(b"{\"seq\":6,\"time\":\"2026-");
        fs::write(&path, &damaged).unwrap();

        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        assert_eq!(log.previous_run(), PreviousRun::Died { seq: 5 });
        write(&log, 2);
        log.close(WAIT);

        let rotated = files::rotated(&path, 1);
        assert_eq!(
            fs::read(&rotated).unwrap(),
            damaged,
            "the damaged file is kept as it was"
        );
        let records = read_records(&path);
        let loss = &records[0];
        assert_eq!(
            (loss.seq, loss.source, loss.event, loss.verdict, loss.lost),
            (6, Source::Daemon, Event::Loss, Verdict::Loss, Some(1))
        );
        assert_eq!(loss.reason, "torn-record");
        let detail = loss.detail.as_deref().unwrap();
        assert!(
            detail.contains(&format!("{} line 6", path.display())),
            "{detail}"
        );
        assert!(
            detail.contains(&format!("as {}", rotated.display())),
            "{detail}"
        );

        match verify(&log_files(dir.path()), &HeadCheck::Beside) {
            Err(AuditVerifyError::Record {
                path,
                line: 6,
                problem: ChainError::Torn,
            }) => assert_eq!(path, rotated),
            other => panic!("expected the torn line, got {other:?}"),
        }
        let newest = verify(&[path], &HeadCheck::Beside).unwrap();
        assert_eq!(
            (newest.first_seq, newest.last_seq, newest.anchored),
            (6, 8, false)
        );
        assert_eq!(
            newest.findings,
            [Finding::MissingAtStart { from: 1, to: 5 }],
            "the torn file is part of the log"
        );
    }

    #[test]
    fn a_last_line_that_does_not_verify_is_treated_as_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        write(&log, 4);
        log.close(WAIT);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"rule\":4", "\"rule\":1")).unwrap();

        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        log.close(WAIT);
        // The head named record 4 as it was written: the log no longer ends with it.
        assert_eq!(log.previous_run(), PreviousRun::TailCut { from: 4, to: 4 });
        let records = read_records(&path);
        let losses: Vec<(u64, &str, Option<u64>)> = records
            .iter()
            .map(|r| (r.seq, r.reason.as_str(), r.lost))
            .collect();
        assert_eq!(
            losses,
            [(5, "audit-tail-cut", Some(1)), (6, "torn-record", Some(1))]
        );
    }

    #[test]
    fn a_full_queue_is_counted_and_reported_in_a_loss_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(
            AuditConfig {
                queue: 1,
                ..config(dir.path(), u64::MAX, 5)
            },
            "node-a",
        )
        .unwrap();
        let submitted = 100;
        {
            // The writer flushes a batch to the file before it publishes the batch to
            // `recent`: holding that lock while the first entry reaches the file leaves the
            // writer stopped with nothing in hand. The second entry then fills the queue of
            // one and every later one is dropped.
            let _writer_stopped = lock(&log.0.shared.recent);
            log.submit(kernel_deny(1));
            let deadline = Instant::now() + WAIT;
            while fs::read_to_string(&path).unwrap().lines().count() < 1 {
                assert!(
                    Instant::now() < deadline,
                    "the first entry was never written"
                );
                thread::sleep(Duration::from_millis(1));
            }
            for n in 2..=submitted {
                log.submit(kernel_deny(n));
            }
        }
        assert!(log.flush(WAIT));
        log.close(WAIT);

        let records = read_records(&path);
        let written: Vec<u32> = records
            .iter()
            .filter(|r| r.source == Source::Kernel)
            .filter_map(|r| r.rule)
            .collect();
        let losses: Vec<(Source, Verdict, Option<u64>)> = records
            .iter()
            .filter(|r| r.reason == "audit-queue-full")
            .map(|r| (r.source, r.verdict, r.lost))
            .collect();
        let lost = u64::from(submitted) - 2;
        assert_eq!(written, [1, 2]);
        assert_eq!(losses, [(Source::Daemon, Verdict::Loss, Some(lost))]);
        assert_eq!(log.stats().dropped, lost);
        let report = verify(&[path], &HeadCheck::Beside).unwrap();
        assert_eq!(report.records, records.len() as u64);
        assert!(report.intact(), "{:?}", report.findings);
    }

    #[test]
    fn entries_after_close_are_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let other = log.clone();
        write(&log, 1);
        log.close(WAIT);
        other.submit(Entry::new(
            Source::Daemon,
            Event::Stop,
            Verdict::Info,
            "late",
        ));
        assert!(other.flush(WAIT), "nothing is left to write");
        let stats = other.stats();
        assert_eq!((stats.written, stats.dropped, stats.last_seq), (1, 1, 1));
    }

    /// Keeps all but the last `n` lines of the file at `path`.
    fn cut_lines(path: &Path, n: usize) {
        let text = fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let kept: String = lines[..lines.len() - n]
            .iter()
            .flat_map(|line| [*line, "\n"])
            .collect();
        fs::write(path, kept).unwrap();
    }

    fn first_seq_of(path: &Path) -> u64 {
        read_records(path)[0].seq
    }

    fn stop(log: &AuditLog) {
        log.submit(Entry::new(
            Source::Daemon,
            Event::Stop,
            Verdict::Info,
            "stop",
        ));
        assert!(log.flush(WAIT), "the writer did not catch up");
    }

    fn verified(dir: &Path, head: &HeadCheck) -> VerifyReport {
        verify(&log_files(dir), head).unwrap()
    }

    #[test]
    fn the_previous_run_is_none_then_stopped_then_died() {
        let dir = tempfile::tempdir().unwrap();
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::None);
        write(&log, 3);
        stop(&log);
        log.close(WAIT);

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::Stopped { seq: 4 });
        write(&log, 2);
        drop(log);

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::Died { seq: 6 });
        log.close(WAIT);
        assert_eq!(
            PreviousRun::Stopped { seq: 41 }.to_string(),
            "previous run stopped cleanly at seq 41"
        );
        assert_eq!(
            PreviousRun::Died { seq: 41 }.to_string(),
            "previous run ended without a stop record (last seq 41)"
        );
        let records = read_records(&dir.path().join("audit.jsonl"));
        assert!(
            records.iter().all(|r| r.event != Event::Loss),
            "{records:?}"
        );
    }

    #[test]
    fn records_cut_from_the_end_fail_against_the_head_but_not_the_chain_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        write(&log, 10);
        log.close(WAIT);
        cut_lines(&path, 3);

        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(report.findings, [Finding::MissingAtEnd { from: 8, to: 10 }]);
        assert_eq!(
            report.findings[0].to_string(),
            "records 8..10 are missing from the end of the log (the head says the last record is seq 10)"
        );
        assert!(!report.intact());
        let alone = verified(dir.path(), &HeadCheck::Skip);
        assert!(alone.intact() && alone.findings.is_empty() && alone.head.is_none());
        assert_eq!(alone.last_seq, 7);

        cut_lines(&path, 7);
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(report.findings, [Finding::MissingAtEnd { from: 1, to: 10 }]);
    }

    #[test]
    fn a_restart_after_a_cut_records_the_loss_and_the_gap_stays_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        write(&log, 9);
        stop(&log);
        log.close(WAIT);
        cut_lines(&path, 4);

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::TailCut { from: 7, to: 10 });
        assert_eq!(
            log.previous_run().to_string(),
            "previous run's end is missing: records 7..10 were cut from the audit log (see the \
             audit-tail-cut loss record)"
        );
        write(&log, 2);
        log.close(WAIT);

        let records = read_records(&path);
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 11, 12, 13]);
        let loss = &records[6];
        assert_eq!(
            (loss.source, loss.event, loss.verdict, loss.lost),
            (Source::Daemon, Event::Loss, Verdict::Loss, Some(4))
        );
        assert_eq!(loss.reason, "audit-tail-cut");
        let detail = loss.detail.as_deref().unwrap();
        assert!(
            detail.starts_with(&format!(
                "records 7..10 are missing from the end of {}: its head {} says the last record \
                 is seq 10",
                path.display(),
                dir.path().join("audit.head").display()
            )),
            "{detail}"
        );
        assert!(detail.contains("the log ends at seq 6"), "{detail}");

        let gap = Finding::Cut {
            from: 7,
            to: 10,
            reported_at: 11,
        };
        assert_eq!(
            gap.to_string(),
            "records 7..10 were cut from the log; the daemon reported it at seq 11"
        );
        for head in [HeadCheck::Beside, HeadCheck::Skip] {
            let report = verified(dir.path(), &head);
            assert_eq!(report.findings, std::slice::from_ref(&gap), "{head:?}");
            assert_eq!((report.records, report.last_seq), (9, 13));
        }

        // Reported once: the next start finds the log and its head in step again.
        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::Died { seq: 13 });
        log.close(WAIT);
        assert_eq!(read_records(&path).len(), 9);
    }

    #[test]
    fn a_restart_after_every_file_was_removed_reports_the_whole_log_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        write(&log, 5);
        log.close(WAIT);
        fs::remove_file(&path).unwrap();

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::TailCut { from: 1, to: 5 });
        log.close(WAIT);
        let records = read_records(&path);
        assert_eq!(
            (records[0].seq, records[0].reason.as_str(), records[0].lost),
            (6, "audit-tail-cut", Some(5))
        );
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(
            report.findings,
            [Finding::Cut {
                from: 1,
                to: 5,
                reported_at: 6
            }]
        );
    }

    #[test]
    fn a_missing_head_fails_verify_and_a_restart_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let head = dir.path().join("audit.head");
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        write(&log, 4);
        stop(&log);
        log.close(WAIT);
        fs::remove_file(&head).unwrap();

        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(
            report.findings,
            [Finding::HeadMissing { path: head.clone() }]
        );
        assert!(!report.intact());
        assert!(verified(dir.path(), &HeadCheck::Skip).intact());

        let log = open();
        assert_eq!(
            log.previous_run(),
            PreviousRun::HeadMissing {
                last: 5,
                stopped: true
            }
        );
        assert_eq!(
            log.previous_run().to_string(),
            "previous run stopped cleanly at seq 5; the audit head was missing (see the \
             audit-head-missing loss record)"
        );
        log.close(WAIT);
        let records = read_records(&path);
        let loss = &records[5];
        assert_eq!(
            (loss.seq, loss.reason.as_str(), loss.lost),
            (6, "audit-head-missing", Some(0))
        );
        assert!(
            loss.detail
                .as_deref()
                .unwrap()
                .contains(&format!("its head {} is missing", head.display())),
            "{loss:?}"
        );
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert!(report.intact(), "{:?}", report.findings);
        assert_eq!(
            report.findings,
            [Finding::StartedWithoutHead { reported_at: 6 }]
        );
    }

    #[test]
    fn a_rewritten_end_is_found_and_a_restart_does_not_adopt_it_silently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        write(&log, 5);
        log.close(WAIT);
        // Records 4 and 5 replaced by a chain that links: only the head can tell.
        let text = fs::read_to_string(&path).unwrap();
        let third = text.lines().nth(2).unwrap();
        let (_, hash) = chain::open(third.as_bytes()).unwrap();
        let mut forged = text.lines().take(3).collect::<Vec<_>>().join("\n") + "\n";
        let mut prev = hash;
        for seq in 4..=5 {
            let record = AuditRecord::new(kernel_deny(99), seq, "node-a", prev.to_string());
            let (line, hash) = chain::seal(&record);
            forged.push_str(&line);
            forged.push('\n');
            prev = hash;
        }
        fs::write(&path, forged).unwrap();
        assert!(verified(dir.path(), &HeadCheck::Skip).intact());
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(report.findings, [Finding::EndMismatch { seq: 5 }]);

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::Diverged { seq: 5 });
        log.close(WAIT);
        let records = read_records(&path);
        assert_eq!(
            (records[5].seq, records[5].reason.as_str()),
            (6, "audit-head-mismatch")
        );
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert_eq!(report.findings, [Finding::Rewritten { reported_at: 6 }]);
        assert!(!report.intact());
    }

    #[test]
    fn records_written_after_the_head_are_a_note_and_a_restart_continues_without_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let head = dir.path().join("audit.head");
        let open = || AuditLog::open(config(dir.path(), u64::MAX, 5), "node-a").unwrap();
        let log = open();
        write(&log, 3);
        let behind = fs::read(&head).unwrap();
        write(&log, 2);
        log.close(WAIT);
        // As if the writer died between syncing a batch and updating the head.
        fs::write(&head, behind).unwrap();

        let report = verified(dir.path(), &HeadCheck::Beside);
        assert!(report.intact(), "{:?}", report.findings);
        assert_eq!(report.findings, [Finding::AfterHead { from: 4, to: 5 }]);

        let log = open();
        assert_eq!(log.previous_run(), PreviousRun::Died { seq: 5 });
        write(&log, 1);
        log.close(WAIT);
        assert!(read_records(&path).iter().all(|r| r.event != Event::Loss));
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }

    #[test]
    fn the_head_follows_rotation_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for _ in 0..3 {
            let log = AuditLog::open(config(dir.path(), 600, 2), "node-a").unwrap();
            write(&log, 10);
            stop(&log);
            log.close(WAIT);
        }
        assert!(!files::rotated(&path, 3).exists());
        let report = verified(dir.path(), &HeadCheck::Beside);
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert!(report.first_seq > 1 && report.last_seq == 33);
        let log = AuditLog::open(config(dir.path(), 600, 2), "node-a").unwrap();
        assert_eq!(log.previous_run(), PreviousRun::Stopped { seq: 33 });
    }

    /// A log of `count` records in files of about four records each, with a window of one.
    fn rotated_log(dir: &Path, count: u32, keep: usize) -> AuditLog {
        let log = AuditLog::open(
            AuditConfig {
                recent_bytes: 1000,
                ..config(dir, 2000, keep)
            },
            "node-a",
        )
        .unwrap();
        write(&log, count);
        log
    }

    fn seqs(backlog: &Backlog) -> Vec<u64> {
        backlog.records.iter().map(|r| r.seq()).collect()
    }

    #[test]
    fn the_window_costs_bytes_not_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = rotated_log(dir.path(), 40, 20);
        let window = lock(&log.0.shared.recent).records();
        assert_eq!(window.len(), 1, "one record of about 600 bytes fits 1000");
        assert_eq!(window[0].seq(), 40);
        let written: String = log_files(dir.path())
            .iter()
            .map(|file| fs::read_to_string(file).unwrap())
            .collect();
        assert!(
            written.contains(&format!("{}\n", window[0].line())),
            "the window holds the line as written"
        );
    }

    #[test]
    fn flows_read_older_records_from_the_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = rotated_log(dir.path(), 40, 20);
        assert!(log.stats().rotations >= 3);
        let backlog = log.backlog(&Filter::default(), 25);
        assert_eq!(seqs(&backlog), (16..=40).collect::<Vec<_>>());
        assert_eq!((backlog.last_seq, backlog.unavailable), (40, None));
        let file_line = |n: usize| {
            let mut lines = Vec::new();
            for k in (1..=20).rev() {
                if let Ok(text) =
                    fs::read_to_string(files::rotated(&dir.path().join("audit.jsonl"), k))
                {
                    lines.extend(text.lines().map(str::to_owned));
                }
            }
            lines.extend(
                fs::read_to_string(dir.path().join("audit.jsonl"))
                    .unwrap()
                    .lines()
                    .map(str::to_owned),
            );
            lines[n - 1].clone()
        };
        assert_eq!(
            backlog.records[0].line(),
            file_line(16),
            "lines as the files hold them"
        );

        let everything = log.backlog(&Filter::default(), 1000);
        assert_eq!(seqs(&everything), (1..=40).collect::<Vec<_>>());
        assert_eq!(everything.unavailable, None, "the log starts at seq 1");

        let odd_rules = Filter {
            verdict: Some(Verdict::Deny),
            id: Some("spiffe://td/web".to_owned()),
        };
        assert_eq!(log.backlog(&odd_rules, 1000).records.len(), 40);
        let allowed = Filter {
            verdict: Some(Verdict::Allow),
            id: None,
        };
        let none = log.backlog(&allowed, 5);
        assert!(none.records.is_empty());
        assert_eq!(
            none.unavailable, None,
            "every file was read: nothing matches"
        );
    }

    #[test]
    fn flows_read_past_a_cut_the_writer_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(config(dir.path(), u64::MAX, 2), "node-a").unwrap();
        write(&log, 6);
        log.close(WAIT);
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().take(4).collect();
        fs::write(&path, kept.join("\n") + "\n").unwrap();
        let log = AuditLog::open(config(dir.path(), u64::MAX, 2), "node-a").unwrap();
        write(&log, 1);
        let backlog = log.backlog(&Filter::default(), 100);
        assert_eq!(seqs(&backlog), [1, 2, 3, 4, 7, 8]);
        assert!(backlog.records[4].line().contains("audit-tail-cut"));
        assert_eq!(backlog.unavailable, None);
    }

    #[test]
    fn flows_say_where_rotation_ended_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = rotated_log(dir.path(), 40, 2);
        let backlog = log.backlog(&Filter::default(), 1000);
        let first = backlog.records[0].seq();
        assert!(first > 1);
        assert_eq!(seqs(&backlog), (first..=40).collect::<Vec<_>>());
        let unavailable = backlog.unavailable.expect("the start was rotated out");
        assert_eq!(unavailable.before, first);
        assert!(
            unavailable.reason.contains("rotated out") && unavailable.reason.contains("keeps 2"),
            "{}",
            unavailable.reason
        );
    }

    #[test]
    fn flows_name_a_missing_file_a_bad_line_and_an_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = rotated_log(dir.path(), 40, 20);
        let first_of = |file: &Path| read_records(file)[0].seq;
        let (one, two, three) = (
            files::rotated(&path, 1),
            files::rotated(&path, 2),
            files::rotated(&path, 3),
        );

        let saved = fs::read_to_string(&two).unwrap();
        fs::remove_file(&two).unwrap();
        let backlog = log.backlog(&Filter::default(), 1000);
        assert_eq!(seqs(&backlog), (first_of(&one)..=40).collect::<Vec<_>>());
        let unavailable = backlog.unavailable.expect("a gap");
        assert_eq!(unavailable.before, first_of(&one));
        assert!(
            unavailable.reason.contains("in none of the audit files")
                && unavailable.reason.contains(&three.display().to_string()),
            "{}",
            unavailable.reason
        );
        fs::write(&two, saved).unwrap();

        let text = fs::read_to_string(&one).unwrap();
        let edited = text.replacen("\"node\":\"node-a\"", "\"node\":\"node-x\"", 1);
        fs::write(&one, edited).unwrap();
        let unavailable = log
            .backlog(&Filter::default(), 1000)
            .unavailable
            .expect("an edited record");
        assert!(
            unavailable.reason.contains(&format!(
                "{} line 1 is not a good audit record",
                one.display()
            )) && unavailable.reason.contains("edited"),
            "{}",
            unavailable.reason
        );
        fs::write(&one, text).unwrap();

        fs::remove_file(&one).unwrap();
        fs::create_dir(&one).unwrap();
        let unavailable = log
            .backlog(&Filter::default(), 1000)
            .unavailable
            .expect("an unreadable file");
        assert!(
            unavailable
                .reason
                .contains(&format!("failed to read audit file {}", one.display())),
            "{}",
            unavailable.reason
        );
    }
}

//! The recorder: where the records of every component go (the audit log, counted by verdict).
//!
//! The tunnel hands over its flow records on the async workers, and completing one may block:
//! the client's provenance (binary hash, cgroup path) comes from the registrar, which attests
//! a process it has not registered (procfs reads, hashing its binary) and reads the kernel maps
//! behind the lock the registrar's rescans and policy reloads hold for long stretches. So flow
//! records go through a bounded queue to a thread of their own, and an async worker never
//! waits: a record that finds the queue full is dropped and counted, and the thread writes a
//! `recorder-queue-full` loss record once it has written the records queued before the drop
//! (at the latest a second later, when the queue is idle). A record the thread cannot write
//! (it panicked, or is gone) is a loss record too. At shutdown the run loop flushes the queue
//! before the stop record, so every flow record of a run precedes it. Entries of the other
//! components (kernel events, lifecycle) are already complete and go to the audit log at once.
#![forbid(unsafe_code)]

use std::{
    io,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread,
    time::Duration,
};

use super::{telemetry::Telemetry, workloads::Registrar};
use crate::{
    audit::{AuditLog, Entry},
    tunnel::{FlowRecord, RecordSink},
};

/// Flow records that may wait for the recorder thread before new ones are dropped. Boxed, a
/// waiting record's slot costs 16 bytes, allocated up front.
const FLOW_QUEUE: usize = 16_384;

/// How long the recorder thread waits for a record before it reports drops anyway.
const IDLE_REPORT: Duration = Duration::from_secs(1);

/// What the recorder thread is asked to do.
enum Job {
    /// Complete and write a flow record.
    Flow(Box<FlowRecord>),
    /// Report drops, then answer: every record queued before this one is written.
    Flush(SyncSender<()>),
}

/// Where the records of every component go: the audit log, counted by verdict. It also holds
/// the daemon's audit log and telemetry for everything else that reads them. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Recorder {
    /// The audit log every record is written to.
    pub(crate) audit: AuditLog,
    /// The daemon's counters (records by verdict among them).
    pub(crate) telemetry: Arc<Telemetry>,
    /// The queue of the thread that completes flow records with their client's provenance
    /// (from the registrar) and writes them.
    flows: SyncSender<Job>,
    /// Flow records dropped on a full queue that no loss record reports yet.
    unreported: Arc<AtomicU64>,
}

impl Recorder {
    /// A recorder writing to `audit` and counting in `telemetry`, with the thread that adds
    /// the provenance `registrar` knows to flow records.
    pub(crate) fn start(
        audit: AuditLog,
        telemetry: Arc<Telemetry>,
        registrar: Arc<Registrar>,
    ) -> io::Result<Self> {
        let (flows, queue) = sync_channel(FLOW_QUEUE);
        let unreported = Arc::new(AtomicU64::new(0));
        let writer = FlowWriter {
            audit: audit.clone(),
            telemetry: Arc::clone(&telemetry),
            registrar,
            unreported: Arc::clone(&unreported),
        };
        thread::Builder::new()
            .name("enforcer-recorder".into())
            .spawn(move || writer.run(&queue))?;
        Ok(Self {
            audit,
            telemetry,
            flows,
            unreported,
        })
    }

    /// Write `entry` to the audit log.
    pub(crate) fn submit(&self, entry: Entry) {
        write(&self.audit, &self.telemetry, entry);
    }

    /// Wait (at most `timeout`) until every flow record queued so far is written, with a loss
    /// record for any dropped. Blocking.
    pub(crate) fn flush(&self, timeout: Duration) {
        let (done, flushed) = sync_channel(1);
        if self.flows.send(Job::Flush(done)).is_err() {
            self.recorder_gone();
            return;
        }
        if flushed.recv_timeout(timeout).is_err() {
            tracing::warn!(?timeout, "the recorder queue did not drain in time");
        }
    }

    /// The recorder thread is gone: say so in the audit trail, once per record it would have
    /// written.
    fn recorder_gone(&self) {
        tracing::error!("the recorder thread is gone; flow record dropped");
        self.submit(Entry::loss("recorder-gone", 1, None));
    }
}

impl RecordSink for Recorder {
    /// A tunnel record, with the binary hash and cgroup path of its client added (on the
    /// recorder thread) when the client runs on this node. Never waits.
    fn record(&self, record: FlowRecord) {
        match self.flows.try_send(Job::Flow(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.unreported.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => self.recorder_gone(),
        }
    }
}

/// The recorder thread's side: completes flow records and writes them.
struct FlowWriter {
    audit: AuditLog,
    telemetry: Arc<Telemetry>,
    registrar: Arc<Registrar>,
    unreported: Arc<AtomicU64>,
}

impl FlowWriter {
    /// Write the records of `queue` until every [`Recorder`] is gone.
    fn run(&self, queue: &Receiver<Job>) {
        loop {
            match queue.recv_timeout(IDLE_REPORT) {
                Ok(Job::Flow(record)) => {
                    self.write_contained(&record);
                    self.report_drops();
                }
                Ok(Job::Flush(done)) => {
                    self.report_drops();
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => self.report_drops(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// [`write`](Self::write), with a panic (in attestation, say) costing this one record, as a
    /// loss record, instead of the thread.
    fn write_contained(&self, record: &FlowRecord) {
        if std::panic::catch_unwind(AssertUnwindSafe(|| self.write(record))).is_err() {
            tracing::error!("completing a flow record panicked; it is recorded as lost");
            write(
                &self.audit,
                &self.telemetry,
                Entry::loss("recorder-panic", 1, None),
            );
        }
    }

    /// A loss record for the flow records dropped since the last one, if any were.
    fn report_drops(&self) {
        let dropped = self.unreported.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "the recorder queue was full; flow records dropped");
            write(
                &self.audit,
                &self.telemetry,
                Entry::loss("recorder-queue-full", dropped, None),
            );
        }
    }

    /// `record` with the provenance of its ends that run on this node: the client's binary
    /// hash, cgroup, container and pod; the destination workload's container and pod (the
    /// registrar's word wins over what the tunnel learned, which for the far end is the other
    /// node's).
    fn write(&self, record: &FlowRecord) {
        let mut entry = super::flow_entry::from_flow(record);
        if let Some(known) = record
            .src
            .pid
            .and_then(|pid| self.registrar.provenance(pid))
        {
            entry.src.sha256 = Some(known.sha256);
            entry.src.cgroup = Some(known.cgroup);
            entry.src.container_id = known.container.container_id;
            entry.src.pod_uid = known.container.pod_uid;
        }
        if let Some(known) = record
            .dst
            .pid
            .and_then(|pid| self.registrar.provenance(pid))
        {
            entry.dst.container_id = known.container.container_id;
            entry.dst.pod_uid = known.container.pod_uid;
        }
        write(&self.audit, &self.telemetry, entry);
    }
}

/// Count `entry` by its verdict and queue it for the audit log.
fn write(audit: &AuditLog, telemetry: &Telemetry, entry: Entry) {
    telemetry.verdict(entry.source, entry.verdict);
    audit.submit(entry);
}

//! The recorder: where the records of every component go (the audit log, counted by verdict).
//!
//! The tunnel hands over its flow records on the async workers, and completing one may block:
//! the client's provenance (binary hash, cgroup path) comes from the registrar, which attests
//! a process it has not registered (procfs reads, hashing its binary) and reads the kernel maps
//! behind the lock the registrar's rescans and policy reloads hold for long stretches. So flow
//! records go through a bounded queue to a thread of their own, and an async worker never
//! waits: a record that finds the queue full is dropped and counted, and the thread writes a
//! `recorder-queue-full` loss record as soon as it takes the next one (as the audit log does
//! for its own queue). Entries of the other components (kernel events, lifecycle) are already
//! complete and go to the audit log at once.
#![forbid(unsafe_code)]

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread,
};

use super::{telemetry::Telemetry, workloads::Registrar};
use crate::{
    audit::{AuditLog, Entry},
    tunnel::{FlowRecord, RecordSink},
};

/// Flow records that may wait for the recorder thread before new ones are dropped. Boxed, a
/// waiting record's slot costs 16 bytes, allocated up front.
const FLOW_QUEUE: usize = 16_384;

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
    flows: SyncSender<Box<FlowRecord>>,
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
}

impl RecordSink for Recorder {
    /// A tunnel record, with the binary hash and cgroup path of its client added (on the
    /// recorder thread) when the client runs on this node. Never waits.
    fn record(&self, record: FlowRecord) {
        match self.flows.try_send(Box::new(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.unreported.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the recorder thread is gone; flow record dropped");
            }
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
    fn run(&self, queue: &Receiver<Box<FlowRecord>>) {
        while let Ok(record) = queue.recv() {
            self.report_drops();
            self.write(&record);
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

    /// `record` with its client's provenance, when the client runs on this node.
    fn write(&self, record: &FlowRecord) {
        let mut entry = super::flow_entry::from_flow(record);
        if let Some(known) = record
            .src
            .pid
            .and_then(|pid| self.registrar.provenance(pid))
        {
            entry.src.sha256 = Some(known.sha256);
            entry.src.cgroup = Some(known.cgroup);
        }
        write(&self.audit, &self.telemetry, entry);
    }
}

/// Count `entry` by its verdict and queue it for the audit log.
fn write(audit: &AuditLog, telemetry: &Telemetry, entry: Entry) {
    telemetry.verdict(entry.source, entry.verdict);
    audit.submit(entry);
}

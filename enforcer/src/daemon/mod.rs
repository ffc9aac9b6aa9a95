//! `enforcer run`: the daemon's parts that `app` wires together — the run loop (signals,
//! ticks, drain), the registrar, the kernel event reader, policy reloads, the kernel- and
//! attestation-backed sources the tunnel asks, and the control API's handlers. `app::build`
//! builds and binds them in start-up order; [`run::serve`] runs them until SIGTERM or SIGINT.

mod api;
mod events;
mod node;
mod own_cgroup;
mod reload;
mod run;
pub mod sockets;
mod sources;
mod telemetry;
mod upkeep;
mod workloads;

use std::sync::Arc;

pub(crate) use self::{
    api::Api,
    events::EventPump,
    node::NodeFacts,
    own_cgroup::refuse_enrolling_the_daemon,
    reload::{Reloader, compile_and_apply},
    run::{Listeners, Running, serve},
    telemetry::{MeteredIssuer, Telemetry},
    upkeep::Upkeep,
    workloads::Registrar,
};
pub use self::{own_cgroup::OwnCgroupError, sources::KernelSources};
use crate::{
    audit::{AuditLog, Entry},
    identity::{SvidCache, SystemClock},
    tunnel::{FlowRecord, RecordSink},
};

/// The SVIDs the daemon holds: issued by the node CA, counted in its telemetry.
pub(crate) type Svids = SvidCache<SystemClock, MeteredIssuer>;

/// Why the run loop stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A signal handler or thread could not be set up.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Maps an I/O error from `what` into a [`DaemonError`].
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// Where the records of every component go: the audit log, counted by verdict. It also holds
/// the daemon's audit log and telemetry for everything else that reads them.
#[derive(Clone)]
pub(crate) struct Recorder {
    pub(crate) audit: AuditLog,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) registrar: Arc<Registrar>,
}

impl Recorder {
    /// Write `entry` to the audit log.
    pub(crate) fn submit(&self, entry: Entry) {
        self.telemetry.verdict(entry.source, entry.verdict);
        self.audit.submit(entry);
    }
}

impl RecordSink for Recorder {
    /// A tunnel record, with the binary hash and cgroup path of its client added when the
    /// client runs on this node.
    fn record(&self, record: FlowRecord) {
        let mut entry = Entry::from_flow(&record);
        if let Some(known) = record
            .src
            .pid
            .and_then(|pid| self.registrar.provenance(pid))
        {
            entry.src.sha256 = Some(known.sha256);
            entry.src.cgroup = Some(known.cgroup);
        }
        self.submit(entry);
    }
}

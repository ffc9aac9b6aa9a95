//! `enforcer run`: the daemon's parts that `app` wires together — the run loop (signals,
//! ticks, drain), the registrar, the kernel event reader, policy reloads, the kernel- and
//! attestation-backed sources the tunnel asks, and the control API's handlers. `app::build`
//! builds and binds them in start-up order; [`run::serve`] runs them until SIGTERM or SIGINT.

mod api;
mod events;
mod flow_entry;
mod kernel_flows;
mod namespaces;
mod node;
mod own_cgroup;
mod recorder;
mod reload;
mod run;
mod sockets;
mod sources;
mod telemetry;
mod upkeep;
mod workload_api;
mod workloads;

pub(crate) use self::{
    api::{Api, ApiFigures},
    events::EventPump,
    kernel_flows::KernelFlows,
    namespaces::NamespaceServer,
    node::NodeFacts,
    own_cgroup::refuse_enrolling_the_daemon,
    recorder::Recorder,
    reload::{Reloader, compile_and_apply},
    run::{Listeners, Running, serve},
    telemetry::{MeteredIssuer, Telemetry},
    upkeep::Upkeep,
    workload_api::{ApiCallers, NodeCredentials},
    workloads::Registrar,
};
pub use self::{namespaces::Namespaces, own_cgroup::OwnCgroupError, sources::KernelSources};
// The harness reads /proc/net/tcp the way the daemon does to wait for test listeners.
#[cfg(feature = "testing")]
pub(crate) use self::sockets::listeners;
use crate::identity::{SvidCache, SystemClock};

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

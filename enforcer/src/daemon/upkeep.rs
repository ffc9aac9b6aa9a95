//! The daemon's periodic work, off the async workers: learn this node's addresses, rescan the
//! enrolled cgroups, serve the network namespaces their processes live in, issue the SVIDs the
//! registered processes hold, and renew SVIDs due for rotation.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::{Svids, kernel_flows::KernelFlows, namespaces::NamespaceServer, workloads::Registrar};
use crate::{identity::SpiffeId, report::report};

/// What the periodic work reads and writes.
pub(crate) struct Upkeep {
    /// The served namespaces and their addresses.
    pub(crate) namespaces: Arc<NamespaceServer>,
    /// The registrar (rescans).
    pub(crate) registrar: Arc<Registrar>,
    /// The SVID cache.
    pub(crate) svids: Arc<Svids>,
    /// The same-node flows the kernel authorized (stale ones are forgotten).
    pub(crate) kernel_flows: Arc<KernelFlows>,
}

impl Upkeep {
    /// Refresh this node's addresses, rescan every enrolled cgroup and issue the SVIDs the
    /// registered processes hold. Returns how many enrolled processes were seen. Blocking.
    pub(crate) fn scan(&self) -> usize {
        self.namespaces.refresh();
        let seen = self.registrar.rescan();
        self.namespaces.reconcile();
        self.issue_svids();
        let stale = self.kernel_flows.sweep();
        if stale > 0 {
            tracing::debug!(stale, "forgot kernel flows whose connect() failed early");
        }
        seen
    }

    /// Renew the SVIDs due for rotation (the issuer reports each new one to the Workload
    /// API's streams).
    pub(crate) fn rotate(&self) {
        let refreshed = self.svids.refresh_due();
        for (id, error) in refreshed.failed {
            tracing::warn!(%id, error = %report(&error), "SVID rotation failed");
        }
        tracing::debug!(
            renewed = refreshed.renewed,
            "SVIDs due for rotation renewed"
        );
    }

    /// Issue (or keep) the SVID of every identity a registered process holds.
    fn issue_svids(&self) {
        let mut ids: Vec<SpiffeId> = self
            .registrar
            .workloads()
            .into_iter()
            .filter_map(|w| w.spiffe_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Err(error) = self.svids.get(&id) {
                tracing::warn!(%id, error = %report(&error), "no SVID");
            }
        }
    }
}

//! The daemon's periodic work, off the async workers: learn this node's addresses, rescan the
//! enrolled cgroups, issue the SVIDs the registered processes hold, and renew SVIDs due for
//! rotation.
#![forbid(unsafe_code)]

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use super::{Svids, sources::KernelSources, workloads::Registrar};
use crate::{identity::SpiffeId, kernel::Maps, report::report};

/// What the periodic work reads and writes.
pub(crate) struct Upkeep {
    /// The kernel maps (this node's addresses).
    pub(crate) maps: Arc<Mutex<Maps>>,
    /// The tunnel's sources (this node's addresses).
    pub(crate) sources: Arc<KernelSources>,
    /// The registrar (rescans).
    pub(crate) registrar: Arc<Registrar>,
    /// The SVID cache.
    pub(crate) svids: Arc<Svids>,
}

impl Upkeep {
    /// Refresh this node's addresses, rescan every enrolled cgroup and issue the SVIDs the
    /// registered processes hold. Returns how many enrolled processes were seen. Blocking.
    pub(crate) fn scan(&self) -> usize {
        self.refresh_local_addrs();
        let seen = self.registrar.rescan();
        self.issue_svids();
        seen
    }

    /// Renew the SVIDs due for rotation.
    pub(crate) fn rotate(&self) {
        for (id, error) in self.svids.refresh_due() {
            tracing::warn!(%id, error = %report(&error), "SVID rotation failed");
        }
    }

    /// Tell the kernel and the tunnel this node's addresses: a wildcard listener owns a
    /// destination only at one of them, so the tunnel never delivers to another host.
    fn refresh_local_addrs(&self) {
        let addrs: Vec<IpAddr> = match if_addrs::get_if_addrs() {
            Ok(interfaces) => interfaces
                .iter()
                .map(if_addrs::Interface::ip)
                .filter(|ip| !ip.is_loopback())
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "failed to list this node's addresses; keeping the last list");
                return;
            }
        };
        tracing::debug!(?addrs, "this node's addresses");
        let result = self
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace_local_addrs(&addrs);
        if let Err(error) = result {
            tracing::warn!(error = %report(&error), "failed to give the kernel this node's addresses");
        }
        self.sources.set_local_addrs(addrs);
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

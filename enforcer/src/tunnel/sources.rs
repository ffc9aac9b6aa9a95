//! The daemon's answers to the tunnel's questions, from the kernel maps and attestation: which
//! enrolled workload listens at an address (the services the bind hook and the daemon
//! recorded), and who a redirected client is (the kernel's redirect record, then attestation
//! of its process against the workload entries).
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use super::state::{LocalWorkloads, Origin, OriginError, Origins};
use crate::{
    attest::{Attestor, Identification, Identities},
    identity::SpiffeId,
    kernel::Maps,
};

/// Kernel- and attestation-backed [`LocalWorkloads`] and [`Origins`].
pub struct KernelSources {
    maps: Arc<Mutex<Maps>>,
    attestor: Arc<Attestor>,
    identities: RwLock<Arc<Identities>>,
}

impl KernelSources {
    /// Sources reading `maps` and attesting with `attestor` (shared with the daemon's registrar,
    /// so both use one cache); they know no identity until
    /// [`KernelSources::update`].
    #[must_use]
    pub fn new(maps: Arc<Mutex<Maps>>, attestor: Arc<Attestor>) -> Self {
        Self {
            maps,
            attestor,
            identities: RwLock::new(Arc::default()),
        }
    }

    /// Take the identities of a newly applied policy.
    pub fn update(&self, identities: Arc<Identities>) {
        *self
            .identities
            .write()
            .unwrap_or_else(PoisonError::into_inner) = identities;
    }

    fn identities(&self) -> Arc<Identities> {
        Arc::clone(
            &self
                .identities
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalWorkloads for KernelSources {
    fn owner(&self, addr: SocketAddr) -> Option<SpiffeId> {
        let port = addr.port();
        let candidates = [
            addr,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ];
        let service = {
            let maps = self.maps();
            if !maps.port_hinted(port).unwrap_or(true) {
                return None;
            }
            candidates.iter().find_map(|&key| match maps.service(key) {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(%key, error = %crate::report::report(&error), "service lookup failed");
                    None
                }
            })
        }?;
        self.identities().id(service.identity).cloned()
    }
}

impl Origins for KernelSources {
    fn origin(&self, client: SocketAddr) -> Result<Origin, OriginError> {
        let original = self
            .maps()
            .original(client)
            .ok()
            .flatten()
            .ok_or(OriginError::NotRedirected(client))?;
        let facts = self
            .attestor
            .attest(original.tgid)
            .map_err(|source| OriginError::Attest {
                pid: original.tgid,
                dst: original.dst,
                source: Box::new(source),
            })?;
        let identification = self.identities().registry.identify(&facts);
        match identification {
            Identification::Matched { id, .. } => Ok(Origin {
                dst: original.dst,
                pid: original.tgid,
                cgroup_id: original.cgroup_id,
                exe: Some(facts.exe),
                id,
            }),
            Identification::Unmatched | Identification::Ambiguous(_) => {
                Err(OriginError::NoIdentity {
                    pid: original.tgid,
                    dst: original.dst,
                    exe: facts.exe,
                })
            }
        }
    }
}

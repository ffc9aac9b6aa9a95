//! The daemon's answers to the tunnel's questions, from the kernel maps and attestation: which
//! enrolled workload listens at an address (the services the bind hook and the daemon
//! recorded), and who a redirected client is (the kernel's redirect record, then attestation
//! of its process against the workload entries).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use super::state::{LocalWorkloads, Origin, OriginError, Origins};
use crate::{
    attest::{Attestor, Identification, Registry},
    identity::SpiffeId,
    kernel::Maps,
    policy::IdentityNumbers,
};

/// Identity numbers and workload entries of the policy in force.
#[derive(Default)]
struct Identities {
    by_number: HashMap<u32, SpiffeId>,
    registry: Registry,
}

/// Kernel- and attestation-backed [`LocalWorkloads`] and [`Origins`].
pub struct KernelSources {
    maps: Arc<Mutex<Maps>>,
    attestor: Arc<Attestor>,
    identities: RwLock<Identities>,
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
            identities: RwLock::new(Identities::default()),
        }
    }

    /// Take the identity numbers and workload entries of a newly applied policy.
    pub fn update(&self, numbers: &IdentityNumbers, registry: Registry) {
        let by_number = numbers.iter().map(|(id, n)| (n, id.clone())).collect();
        *self
            .identities
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Identities {
            by_number,
            registry,
        };
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
        self.identities
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_number
            .get(&service.identity)
            .cloned()
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
        let identification = self
            .identities
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .registry
            .identify(&facts);
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
                    exe: facts.exe.display().to_string(),
                })
            }
        }
    }
}

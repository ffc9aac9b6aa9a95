//! The daemon's answers to the tunnel's questions, from the kernel maps and attestation:
//! - which enrolled workload listens at an address (one of this node's own): the listening
//!   socket the kernel recorded there, owned by the identity its owner process holds *now*, as
//!   long as the owner is still the image that took the socket;
//! - who a redirected client is: the identity the kernel stamped on the redirect at
//!   `connect()`; a process the daemon had not attested by then is attested now, and only if
//!   it is still the process image that connected (no exec, no cgroup move since);
//! - how the tunnel's sockets make themselves known: the daemon's socket tags.
//!
//! Locking: the sources read the kernel maps through a handle of their own, whose lock only
//! these lookups take, each for a few map syscalls; the daemon's other handle, which the
//! registrar and the policy reload hold for long stretches (a reload writes the whole policy
//! table under it), is never theirs to wait for. So an owner lookup answers at once, and the
//! tunnel makes it on its async worker; the origin, which may attest a process (procfs reads,
//! hashing a binary), is asked off the worker (see [`crate::tunnel::state`]). The socket
//! tags are a handle of their own too, with a lock held for one map write, and tagging runs on
//! the worker.
#![forbid(unsafe_code)]

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::BorrowedFd,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::net::TcpSocket;

use super::namespaces::Namespaces;
use crate::{
    attest::{Attestor, ContainerInfo},
    identity::SpiffeId,
    kernel::{Maps, Original, SocketTags},
    policy::{Identification, PolicySnapshot},
    report::report,
    tunnel::{
        LocalOwner, LocalWorkloads, Namespace, Origin, OriginError, Origins, Placement,
        SocketTagger,
    },
};

/// Kernel- and attestation-backed [`LocalWorkloads`], [`Origins`] and [`SocketTagger`].
pub struct KernelSources {
    maps: Arc<Mutex<Maps>>,
    tags: SocketTags,
    attestor: Arc<Attestor>,
    policy: PolicySnapshot,
    namespaces: Arc<Namespaces>,
    redirect_port: u16,
}

impl KernelSources {
    /// Sources reading `maps` (a handle no one else holds for long: see the module docs),
    /// tagging with `tags`, attesting with `attestor` (shared with the daemon's registrar, so
    /// both use one cache), resolving identities in the policy in force and addresses in the
    /// served `namespaces`, for redirects to `redirect_port`.
    #[must_use]
    pub fn new(
        maps: Arc<Mutex<Maps>>,
        tags: SocketTags,
        attestor: Arc<Attestor>,
        policy: PolicySnapshot,
        (namespaces, redirect_port): (Arc<Namespaces>, u16),
    ) -> Self {
        Self {
            maps,
            tags,
            attestor,
            policy,
            namespaces,
            redirect_port,
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The identity number of the process that owns the listening socket at `addr` now, as
    /// the kernel finds it from namespace `from`: only at one of this node's own addresses, in
    /// the namespace that address belongs to, the exact entry first, then the any-address
    /// entry of the address's family, then (for IPv4) the dual-stack `::` entry; and only
    /// while the owner is still the image that took the socket. Also returns that namespace,
    /// the owner's pid and its image generation.
    fn owner_number(&self, from: Namespace, addr: SocketAddr) -> Option<(u32, u64, u32, u64)> {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() {
            return None;
        }
        let netns = self.namespaces.netns_of(from, ip)?;
        let maps = self.maps();
        if !maps.port_hinted(addr.port()).unwrap_or(true) {
            return None;
        }
        let lookup = |ip: IpAddr| match maps.service(netns, SocketAddr::new(ip, addr.port())) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%addr, error = %report(&error), "service lookup failed");
                None
            }
        };
        let any_of_family = match ip {
            IpAddr::V4(_) => Some(IpAddr::from(Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => None,
        };
        let service = lookup(ip)
            .or_else(|| any_of_family.and_then(lookup))
            .or_else(|| lookup(IpAddr::from(Ipv6Addr::UNSPECIFIED)))?;
        if maps.generation(service.tgid).ok()? != service.generation {
            return None;
        }
        let number = maps.identity(service.tgid).ok().flatten()?;
        Some((number, netns, service.tgid, service.generation))
    }

    /// The kernel's record of the redirected connection from `client`, which arrived at `local`
    /// in namespace `netns`. Only a connection the kernel steered to the redirect address was
    /// redirected; one made to the listener's own address is not, whatever its peer address
    /// says.
    fn redirect(
        &self,
        netns: Namespace,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<Original> {
        if local.port() != self.redirect_port {
            return None;
        }
        let netns = self.namespaces.cookie(netns);
        self.maps().original(netns, client).ok().flatten()
    }

    /// The binary `pid` runs now and where, for records (from the attestation cache for its
    /// current image).
    fn exe_of(&self, pid: u32) -> Option<(PathBuf, Placement)> {
        let generation = self.maps().generation(pid).ok()?;
        self.attestor
            .attest_for(pid, generation)
            .ok()
            .map(|facts| (facts.exe, placement(&facts.container)))
    }

    /// Attest `pid` now for the connection it made as image `generation`: only while that is
    /// still its image (checked before and after reading its facts).
    fn attest_unstamped(
        &self,
        pid: u32,
        generation: u64,
        dst: SocketAddr,
    ) -> Result<SpiffeId, OriginError> {
        let current = || self.maps().generation(pid).ok();
        if current() != Some(generation) {
            return Err(OriginError::Changed { pid, dst });
        }
        let facts = self
            .attestor
            .attest_fresh(pid)
            .map_err(|source| OriginError::Attest {
                pid,
                dst,
                source: Box::new(source),
            })?;
        if current() != Some(generation) {
            return Err(OriginError::Changed { pid, dst });
        }
        match self.policy.load().identities.registry.identify(&facts) {
            Identification::Matched { id, .. } => Ok(id),
            Identification::Unmatched
            | Identification::Ambiguous(_)
            | Identification::Refused { .. } => Err(OriginError::NoIdentity {
                pid,
                dst,
                placement: placement(&facts.container),
                exe: facts.exe,
            }),
        }
    }
}

impl LocalWorkloads for KernelSources {
    fn owner(&self, from: Namespace, addr: SocketAddr) -> Option<LocalOwner> {
        let (number, netns, pid, generation) = self.owner_number(from, addr)?;
        let id = self.policy.load().identities.id(number).cloned()?;
        let placement = self
            .attestor
            .cached_for(pid, generation)
            .map(|facts| placement(&facts.container))
            .unwrap_or_default();
        Some(LocalOwner {
            id,
            netns: Namespace(netns),
            pid: Some(pid),
            placement,
        })
    }
}

impl Origins for KernelSources {
    fn origin(
        &self,
        netns: Namespace,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Origin, OriginError> {
        let original = self
            .redirect(netns, client, local)
            .ok_or(OriginError::NotRedirected(client))?;
        let (pid, dst) = (original.tgid, original.dst);
        let id = if original.src_id == 0 {
            self.attest_unstamped(pid, original.generation, dst)?
        } else {
            // The identity the process held at connect(): an exec since never upgrades it.
            self.policy
                .load()
                .identities
                .id(original.src_id)
                .cloned()
                .ok_or_else(|| {
                    let (exe, placement) = self.exe_of(pid).unwrap_or_default();
                    OriginError::NoIdentity {
                        pid,
                        dst,
                        exe,
                        placement,
                    }
                })?
        };
        Ok(origin(&original, id, self.exe_of(pid)))
    }

    fn origin_at_once(
        &self,
        netns: Namespace,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<Origin> {
        let original = self.redirect(netns, client, local)?;
        if original.src_id == 0 {
            return None;
        }
        let id = self.policy.load().identities.id(original.src_id).cloned()?;
        let generation = self.maps().generation(original.tgid).ok()?;
        let facts = self.attestor.cached_for(original.tgid, generation)?;
        let place = placement(&facts.container);
        Some(origin(&original, id, Some((facts.exe, place))))
    }
}

/// The origin of the redirect `original`, whose client is `id` and runs `exe` (where).
fn origin(original: &Original, id: SpiffeId, exe: Option<(PathBuf, Placement)>) -> Origin {
    let (exe, placement) = exe.map_or((None, Placement::default()), |(exe, placement)| {
        (Some(exe), placement)
    });
    Origin {
        dst: original.dst,
        pid: original.tgid,
        cgroup_id: original.cgroup_id,
        exe,
        id,
        placement,
    }
}

/// A container and pod as the tunnel's records name them.
fn placement(container: &ContainerInfo) -> Placement {
    Placement {
        container_id: container.container_id.clone(),
        pod_uid: container.pod_uid.clone(),
    }
}

impl SocketTagger for KernelSources {
    fn hop(&self, socket: BorrowedFd<'_>, owner: &SpiffeId) -> io::Result<()> {
        let number = self
            .policy
            .load()
            .identities
            .numbers
            .get(owner)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{owner} has no identity number in the policy in force"),
                )
            })?;
        self.tags
            .tag_hop(socket, number)
            .map_err(|error| io::Error::other(report(&error)))
    }

    fn own(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.tags
            .tag_daemon(socket)
            .map_err(|error| io::Error::other(report(&error)))
    }

    fn socket_in(&self, netns: Namespace, addr: SocketAddr) -> io::Result<TcpSocket> {
        self.namespaces.socket_in(netns, addr)
    }
}

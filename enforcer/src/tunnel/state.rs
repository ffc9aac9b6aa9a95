//! What a tunnel endpoint needs to know about its node, as traits so the daemon backs them with
//! the kernel maps and attestation while in-process tests back them with tables: who a
//! redirected client is ([`Origins`]), which local workload owns an address
//! ([`LocalWorkloads`]), the SVIDs to present ([`SvidSource`]), how its sockets make
//! themselves known to the kernel ([`SocketTagger`]); the policy in force is the one snapshot the
//! daemon publishes ([`PolicySnapshot`](crate::policy::PolicySnapshot)).
//!
//! Where the calls run ("off the worker": see [`off_worker`]):
//! - [`Origins::origin`] may block (the daemon may attest the process: procfs reads, hashing
//!   its binary), so the tunnel asks it off the worker; first it asks
//!   [`Origins::origin_at_once`], which answers on the worker only what needs no attestation
//!   (the common case: a client the daemon attested before it connected).
//! - [`LocalWorkloads`] must answer without blocking (the daemon's reads a few kernel maps
//!   through a handle whose lock no one holds for long), and the tunnel asks it on the worker,
//!   once per CONNECT stream.
//! - [`SvidSource`] answers from its cache and issues an SVID on a miss (key generation: tens
//!   of microseconds, once per identity and rotation). The inbound handshake asks it off the
//!   worker, together with the owner lookup that picks the certificate; the outbound side asks
//!   on the worker, once per flow.
//! - [`SocketTagger`] calls stay on the worker: each is one socket-storage write under a lock
//!   held for that write alone, cheaper than moving off the worker.
//! - [`RecordSink::record`] must not block (the daemon's queues the record for a thread of its
//!   own).
//!
//! [`RecordSink::record`]: super::RecordSink::record
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, os::fd::BorrowedFd, path::PathBuf, sync::Arc};

use tokio::{net::TcpSocket, runtime::RuntimeFlavor};

use super::record::{Party, Placement};
use crate::identity::{CacheError, Clock, SpiffeId, SvidCache, SvidIssuer, X509Svid};

/// Where the SVIDs presented on a workload's behalf come from.
pub trait SvidSource: Send + Sync {
    /// The current SVID of `id`.
    fn svid(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, CacheError>;
}

impl<C: Clock, I: SvidIssuer> SvidSource for SvidCache<C, I> {
    fn svid(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, CacheError> {
        self.get(id)
    }
}

/// A network namespace the tunnel serves, named by its cookie as the kernel names it: the
/// node's own, or a container's, where the daemon's listeners and hops live (see
/// [`crate::kernel::Netns`]). In-process tests use [`Namespace::HOME`] throughout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Namespace(pub u64);

impl Namespace {
    /// The namespace of the tunnel's own threads (for backends that know no other).
    pub const HOME: Self = Self(0);
}

/// An enrolled local workload, as [`LocalWorkloads::owner`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalOwner {
    /// Its identity.
    pub id: SpiffeId,
    /// The network namespace its listener lives in, where a hop to it must be made.
    pub netns: Namespace,
    /// The process that owns the listener, when known (for records).
    pub pid: Option<u32>,
    /// The container and pod it runs in, when known.
    pub placement: Placement,
}

/// How the sockets the tunnel opens make themselves known to the kernel, before they connect.
pub trait SocketTagger: Send + Sync {
    /// `socket` is a hop to the local workload that holds `owner`: the kernel lets it reach
    /// only a listener whose owner holds that identity.
    fn hop(&self, socket: BorrowedFd<'_>, owner: &SpiffeId) -> io::Result<()>;
    /// `socket` goes to a peer node or a plaintext egress destination.
    fn own(&self, socket: BorrowedFd<'_>) -> io::Result<()>;

    /// A new TCP socket for `addr`'s family, made in network namespace `netns` (a hop to a
    /// workload is made in the workload's own). Must not block. By default: here.
    fn socket_in(&self, netns: Namespace, addr: SocketAddr) -> io::Result<TcpSocket> {
        let _ = netns;
        match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
    }
}

/// A [`SocketTagger`] for endpoints without a kernel datapath (in-process tests): tags nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Untagged;

impl SocketTagger for Untagged {
    fn hop(&self, _socket: BorrowedFd<'_>, _owner: &SpiffeId) -> io::Result<()> {
        Ok(())
    }

    fn own(&self, _socket: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }
}

/// The enrolled workloads listening on this node. The tunnel asks on its async workers, so an
/// answer must not block: a few map lookups under a lock no one holds for long, at most.
pub trait LocalWorkloads: Send + Sync {
    /// The enrolled workload listening on `addr` (on that address, or on every address of its
    /// namespace) as reached from namespace `from` (loopback is `from`'s own), `None` when no
    /// enrolled workload does.
    fn owner(&self, from: Namespace, addr: SocketAddr) -> Option<LocalOwner>;
}

/// Who a redirected client is and where it wanted to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The destination the client connected to.
    pub dst: SocketAddr,
    /// The client's process id.
    pub pid: u32,
    /// The client's cgroup id.
    pub cgroup_id: u64,
    /// The client's binary, when attestation read it.
    pub exe: Option<PathBuf>,
    /// The client's attested identity.
    pub id: SpiffeId,
    /// The container and pod it runs in, when known.
    pub placement: Placement,
}

/// Why a redirected client has no [`Origin`].
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The kernel holds no record of a redirect from this address, or the connection did not
    /// arrive at the redirect address.
    #[error("no redirect record for client {0}")]
    NotRedirected(SocketAddr),
    /// The client process is not the process image that called `connect()` (it exec'd, or
    /// moved to another cgroup, since), so it cannot be attested for that call.
    #[error("pid {pid} changed since it connected (exec or cgroup move)")]
    Changed {
        /// The process.
        pid: u32,
        /// Where it connected.
        dst: SocketAddr,
    },
    /// The client process could not be attested.
    #[error("failed to attest pid {pid}")]
    Attest {
        /// The process.
        pid: u32,
        /// Where it connected.
        dst: SocketAddr,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The client process matches no single workload entry.
    #[error("pid {pid} ({}) has no workload identity", exe.display())]
    NoIdentity {
        /// The process.
        pid: u32,
        /// Its binary.
        exe: PathBuf,
        /// The container and pod it runs in, when known.
        placement: Placement,
        /// Where it connected.
        dst: SocketAddr,
    },
}

impl OriginError {
    /// The two parties of the refused flow: `client` (with its process, when the kernel's
    /// record named it) and the original destination (when known).
    #[must_use]
    pub fn parties(&self, client: SocketAddr) -> (Party, Party) {
        let (pid, exe, placement, dst) = match self {
            Self::NotRedirected(_) => (None, None, Placement::default(), None),
            Self::Attest { pid, dst, .. } | Self::Changed { pid, dst } => {
                (Some(*pid), None, Placement::default(), Some(*dst))
            }
            Self::NoIdentity {
                pid,
                exe,
                placement,
                dst,
            } => (Some(*pid), Some(exe.clone()), placement.clone(), Some(*dst)),
        };
        let src = Party {
            addr: Some(client),
            pid,
            exe,
            placement,
            ..Party::default()
        };
        let dst = Party {
            addr: dst,
            ..Party::default()
        };
        (src, dst)
    }
}

/// Looks up the origin of redirected connections. The daemon's answer reads kernel maps and may
/// attest the client (procfs reads, hashing its binary), so the tunnel asks from the blocking
/// pool.
pub trait Origins: Send + Sync {
    /// The origin of the connection the outbound listener of namespace `netns` accepted from
    /// `client`, on its local address `local` (the redirect address, for a redirected
    /// connection).
    fn origin(
        &self,
        netns: Namespace,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Origin, OriginError>;

    /// The same origin when it can be told without blocking (the daemon's: the kernel stamped
    /// the client's identity at `connect()` and its binary is in the attestation cache), else
    /// `None`, and the tunnel asks [`Origins::origin`] off the worker. An answer here
    /// must be the one [`Origins::origin`] would give; a refusal is always left to it.
    fn origin_at_once(
        &self,
        netns: Namespace,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<Origin> {
        let _ = (netns, client, local);
        None
    }
}

/// Runs `work` where it may block without stalling the runtime's other tasks: on a
/// multi-thread runtime in place (`block_in_place`: this thread hands its queue of tasks to
/// another and carries on with `work`, so the caller waits for no hand-off), else on the
/// blocking pool. A panic in `work` resumes in the caller; `None` when the runtime shut down
/// before `work` ran.
pub(super) async fn off_worker<T, F>(work: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if tokio::runtime::Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        return Some(tokio::task::block_in_place(work));
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}

//! The network namespaces the daemon serves: its own, and every one an enrolled workload lives
//! in (a container's, a pod's), with the addresses configured in each.
//!
//! Serving a namespace follows Istio ztunnel's in-pod mode: the daemon enters it on the calling
//! thread only to make its sockets there (see [`crate::kernel::Netns`]), binds the outbound
//! listener on that namespace's loopback (`127.0.0.1` and `[::1]`, the redirect port: the
//! connect hooks' rewrite is the same in every namespace) and the inbound listener on every
//! address (the inbound port: peers dial the workload's own address), and hands them to the
//! tunnel, which drives them from any thread. Hops to a workload are made in its namespace
//! too, so they arrive over that namespace's loopback like the host's hops do, and the ingress
//! hook checks them the same way (`skb->mark` would not survive a veth crossing; nothing here
//! relies on it).
//!
//! Lifetime: the first registered workload in a namespace brings its listeners up; when the
//! registrar holds no workload there any more, they are closed and the namespace's descriptor
//! dropped, so a dead container's namespace is never kept alive. Only then is the namespace
//! counted as served in the kernel (`ENF_NETNS`): until its listeners are up, enrolled
//! connects there fail closed, and the bind hooks keep the two ports for the daemon.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{net::TcpListener, net::TcpSocket, task::JoinHandle};

use super::{sources::KernelSources, workloads::Registrar};
use crate::{
    kernel::{Maps, Netns},
    policy::PolicySnapshot,
    report::report,
    tunnel::{Namespace, SocketTagger as _, Tunnel},
};

/// Backlog of the listeners the daemon opens in workloads' namespaces.
const BACKLOG: i32 = 1024;

/// The served namespaces and the addresses of each, as the tunnel's lookups read them.
#[derive(Debug)]
pub struct Namespaces {
    home: Netns,
    state: RwLock<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Served namespaces other than the daemon's own, by cookie.
    served: HashMap<u64, Arc<Netns>>,
    /// Every local address but loopback, with the cookie of the namespace it is in.
    addrs: HashMap<IpAddr, u64>,
}

impl Namespaces {
    /// The table of a daemon living in `home`, which serves only `home` so far.
    #[must_use]
    pub fn new(home: Netns) -> Self {
        Self {
            home,
            state: RwLock::default(),
        }
    }

    /// Take `addrs` as this node's addresses, each with the cookie of its namespace (the
    /// daemon's [`NamespaceServer`] learns them itself; harnesses without one say them).
    pub fn set_addrs(&self, addrs: impl IntoIterator<Item = (IpAddr, u64)>) {
        self.table_mut().addrs = addrs
            .into_iter()
            .map(|(ip, netns)| (ip.to_canonical(), netns))
            .collect();
    }

    /// The daemon's own namespace.
    pub(crate) fn home(&self) -> &Netns {
        &self.home
    }

    /// The cookie `netns` stands for ([`Namespace::HOME`] is the daemon's own).
    pub(crate) fn cookie(&self, netns: Namespace) -> u64 {
        if netns == Namespace::HOME {
            self.home.cookie()
        } else {
            netns.0
        }
    }

    /// The cookie of the served namespace whose inode is `inode`, if it is served.
    pub(crate) fn cookie_of_inode(&self, inode: u64) -> Option<u64> {
        if inode == self.home.inode() {
            return Some(self.home.cookie());
        }
        self.table()
            .served
            .values()
            .find(|netns| netns.inode() == inode)
            .map(|netns| netns.cookie())
    }

    /// The namespace in which `ip` is a local address, as seen from namespace `from`:
    /// loopback is `from`'s own, another address the namespace it is configured in; `None`
    /// when it is no address of this node.
    pub(crate) fn netns_of(&self, from: Namespace, ip: IpAddr) -> Option<u64> {
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return Some(self.cookie(from));
        }
        self.table().addrs.get(&ip).copied()
    }

    /// A new TCP socket for `addr`'s family, made in namespace `netns`.
    pub(crate) fn socket_in(&self, netns: Namespace, addr: SocketAddr) -> io::Result<TcpSocket> {
        self.run_in(self.cookie(netns), || match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        })?
    }

    /// Run `make` on the calling thread inside the served namespace `cookie` (the daemon's
    /// own, or one of its workloads'); `make` must not block.
    pub(crate) fn run_in<T>(&self, cookie: u64, make: impl FnOnce() -> T) -> io::Result<T> {
        if cookie == self.home.cookie() {
            return Ok(make());
        }
        let target = self.table().served.get(&cookie).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("network namespace {cookie} is not served"),
            )
        })?;
        target.run(&self.home, make)
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One served namespace other than the daemon's own.
struct Served {
    netns: Arc<Netns>,
    /// The tunnel's tasks accepting on its listeners; aborting them closes the listeners.
    accepting: Vec<JoinHandle<()>>,
}

/// Brings listeners up in the namespaces of registered workloads and down when they are gone,
/// and keeps the kernel's and the tunnel's address tables true.
pub(crate) struct NamespaceServer {
    namespaces: Arc<Namespaces>,
    registrar: Arc<Registrar>,
    tunnel: Tunnel,
    maps: Arc<Mutex<Maps>>,
    /// Tags the listeners as the daemon's.
    sources: Arc<KernelSources>,
    /// The redirect port and the inbound port.
    ports: (u16, u16),
    /// The policy in force (its peers' networks are never a workload namespace's addresses).
    policy: PolicySnapshot,
    /// Served namespaces by inode.
    serving: Mutex<HashMap<u64, Served>>,
    /// What was already warned about, by namespace inode (and the address concerned): a
    /// namespace refused for good, an address claim ignored. Pruned as namespaces go.
    warned: Mutex<HashSet<(u64, Option<IpAddr>)>>,
}

impl NamespaceServer {
    /// A server of no namespace yet.
    pub(crate) fn new(
        namespaces: Arc<Namespaces>,
        registrar: Arc<Registrar>,
        tunnel: Tunnel,
        (maps, sources): (Arc<Mutex<Maps>>, Arc<KernelSources>),
        policy: PolicySnapshot,
        ports: (u16, u16),
    ) -> Self {
        Self {
            namespaces,
            registrar,
            tunnel,
            maps,
            sources,
            ports,
            policy,
            serving: Mutex::default(),
            warned: Mutex::default(),
        }
    }

    /// Serve exactly the namespaces the registrar's workloads live in (besides the daemon's
    /// own), then refresh every namespace's addresses and tell the kernel which namespaces
    /// are served, all under one lock (two reconciles never undo each other's work). Runs on
    /// a thread that may block briefly, inside the runtime (the listeners join its reactor).
    pub(crate) fn reconcile(&self) {
        let home = self.namespaces.home().inode();
        // The host's own namespace (pid 1's) is a workload namespace only to a daemon that
        // lives elsewhere, and that one must never take the host's ports: a process seen there
        // is on its way into its container (a runtime's init before it joins the pod's
        // namespace).
        let host = std::fs::metadata("/proc/1/ns/net")
            .map(|meta| meta.ino())
            .ok();
        let wanted: HashMap<u64, u32> = self
            .registrar
            .namespaces()
            .into_iter()
            .filter(|&(inode, _)| inode != home && Some(inode) != host)
            .collect();
        let mut serving = self.serving();
        {
            let gone: Vec<u64> = serving
                .keys()
                .filter(|inode| !wanted.contains_key(inode))
                .copied()
                .collect();
            for inode in gone {
                if let Some(served) = serving.remove(&inode) {
                    self.release(served);
                }
            }
            for (&inode, &pid) in &wanted {
                if serving.contains_key(&inode) {
                    continue;
                }
                match self.serve(pid, inode) {
                    Ok(served) => {
                        tracing::info!(
                            pid,
                            netns = inode,
                            cookie = served.netns.cookie(),
                            "serving a workload network namespace"
                        );
                        serving.insert(inode, served);
                    }
                    Err(ServeError::ForeignUserNamespace) => {
                        if self.first_warning(inode, None) {
                            tracing::warn!(
                                pid,
                                netns = inode,
                                "a workload's network namespace belongs to another user \
                                 namespace (an unprivileged unshare, a rootless runtime): never \
                                 served; its connects fail closed"
                            );
                        }
                    }
                    Err(ServeError::Io(error)) => tracing::warn!(
                        pid,
                        netns = inode,
                        %error,
                        "cannot serve a workload's network namespace; its connects fail closed"
                    ),
                }
            }
        }
        self.warned()
            .retain(|(inode, _)| wanted.contains_key(inode));
        self.refresh_addrs(&serving);
        let mut cookies: Vec<u64> = serving.values().map(|s| s.netns.cookie()).collect();
        cookies.push(self.namespaces.home().cookie());
        if let Err(error) = self.maps().replace_served(&cookies) {
            tracing::warn!(error = %report(&error), "failed to tell the kernel the served namespaces");
        }
    }

    /// The workload namespaces served: (inode, cookie), by inode.
    pub(crate) fn served(&self) -> Vec<(u64, u64)> {
        let mut served: Vec<(u64, u64)> = self
            .serving()
            .iter()
            .map(|(&inode, served)| (inode, served.netns.cookie()))
            .collect();
        served.sort_unstable();
        served
    }

    /// Woken when the registrar's set of namespaces changes.
    pub(crate) fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.registrar.namespaces_changed()
    }

    /// Close every workload namespace's listeners (the daemon stops: new redirects there now
    /// fail closed).
    pub(crate) fn close_all(&self) {
        let served: Vec<Served> = self.serving().drain().map(|(_, served)| served).collect();
        for served in served {
            self.release(served);
        }
    }

    /// Learn this node's and every served namespace's addresses, and tell the kernel which
    /// address is whose. The kernel's served set is left as it is: at a restart, it still
    /// holds the namespaces the earlier run served, whose ports the bind hooks keep until the
    /// first reconcile.
    pub(crate) fn refresh(&self) {
        let serving = self.serving();
        self.refresh_addrs(&serving);
    }

    /// [`refresh`](Self::refresh), with the served namespaces locked. An address belongs to
    /// the node when the node has it, else to the one workload namespace that configures it;
    /// one that two workload namespaces configure, or that lies in another node's networks, is
    /// nobody's (connects to it are not local, and plaintext there meets the ingress hook):
    /// a workload that configures another's address takes nothing.
    fn refresh_addrs(&self, serving: &HashMap<u64, Served>) {
        let home = self.namespaces.home();
        let mut addrs: HashMap<IpAddr, u64> = HashMap::new();
        match local_addrs() {
            Ok(found) => addrs.extend(found.into_iter().map(|ip| (ip, home.cookie()))),
            Err(error) => {
                tracing::warn!(%error, "failed to list this node's addresses; keeping the last list");
                return;
            }
        }
        let served: Vec<Arc<Netns>> = serving
            .values()
            .map(|served| Arc::clone(&served.netns))
            .collect();
        let mut claims: HashMap<IpAddr, Vec<&Netns>> = HashMap::new();
        for netns in &served {
            match netns.run(home, local_addrs) {
                Ok(Ok(found)) => {
                    for ip in found {
                        claims.entry(ip).or_default().push(netns);
                    }
                }
                Ok(Err(error)) | Err(error) => {
                    tracing::warn!(cookie = netns.cookie(), %error, "failed to list a served namespace's addresses");
                }
            }
        }
        let view = Arc::clone(&self.policy.load().view);
        let node_has = addrs.clone();
        for (ip, claimers) in claims {
            let refused = if node_has.contains_key(&ip) {
                "the node's own"
            } else if view
                .peer_of(ip)
                .is_some_and(|peer| !node_has.contains_key(&peer.to_canonical()))
            {
                // (One policy serves the whole mesh: the peer that is this node is not one.)
                "in a peer's networks"
            } else if let [only] = claimers[..] {
                addrs.insert(ip, only.cookie());
                continue;
            } else {
                "configured in another workload namespace too: nobody's"
            };
            for netns in claimers {
                if self.first_warning(netns.inode(), Some(ip)) {
                    tracing::warn!(
                        netns = netns.inode(),
                        %ip,
                        refused,
                        "a workload namespace configures an address that is not its own; ignored"
                    );
                }
            }
        }
        let table: Vec<(IpAddr, u64)> = addrs.iter().map(|(&ip, &netns)| (ip, netns)).collect();
        if let Err(error) = self.maps().replace_local_addrs(&table) {
            tracing::warn!(error = %report(&error), "failed to give the kernel the node's addresses");
        }
        self.namespaces.set_addrs(addrs);
        self.namespaces.table_mut().served = served
            .into_iter()
            .map(|netns| (netns.cookie(), netns))
            .collect();
    }

    /// Whether `(inode, ip)` is warned about for the first time (and remember it).
    fn first_warning(&self, inode: u64, ip: Option<IpAddr>) -> bool {
        self.warned().insert((inode, ip))
    }

    /// Bring the listeners up in the namespace of `pid`, whose inode the registrar saw as
    /// `inode`.
    fn serve(&self, pid: u32, inode: u64) -> Result<Served, ServeError> {
        let home = self.namespaces.home();
        let netns = Arc::new(Netns::of_process(pid, home)?);
        if netns.inode() != inode {
            return Err(
                io::Error::other(format!("pid {pid} left network namespace {inode}")).into(),
            );
        }
        // A namespace that another user namespace owns was made without the node's root
        // (`unshare -Urn`, a rootless runtime): whoever made it configures its addresses.
        if netns.owner_user_namespace()? != std::fs::metadata("/proc/self/ns/user")?.ino() {
            return Err(ServeError::ForeignUserNamespace);
        }
        let (outbound_port, inbound_port) = self.ports;
        let listeners = netns.run(home, || -> io::Result<Vec<(bool, TcpListener)>> {
            let mut listeners = vec![(
                true,
                self.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, outbound_port)), false)?,
            )];
            match self.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, outbound_port)), true) {
                Ok(listener) => listeners.push((true, listener)),
                Err(error) => tracing::debug!(%error, "no IPv6 loopback in a workload namespace; its IPv6 connects are refused"),
            }
            let inbound = self
                .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, inbound_port)), false)
                .or_else(|_| {
                    self.listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, inbound_port)), true)
                })?;
            listeners.push((false, inbound));
            Ok(listeners)
        })??;
        let at = Namespace(netns.cookie());
        let accepting = listeners
            .into_iter()
            .map(|(outbound, listener)| {
                if outbound {
                    self.tunnel.serve_outbound(listener, at)
                } else {
                    self.tunnel.serve_inbound(listener, at)
                }
            })
            .collect();
        self.namespaces
            .table_mut()
            .served
            .insert(netns.cookie(), Arc::clone(&netns));
        Ok(Served { netns, accepting })
    }

    /// A listener of the daemon's on `addr` in the calling thread's namespace, tagged as the
    /// daemon's before it binds (so the bind hooks let it have the port). `v6_only` keeps an
    /// IPv6 socket to IPv6; otherwise `[::]` also takes IPv4.
    fn listen(&self, addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(v6_only)?;
        }
        // As every server does: connections of an earlier run waiting out TIME_WAIT on the
        // port do not keep a restarted daemon from listening.
        socket.set_reuse_address(true)?;
        self.sources.own(socket.as_fd())?;
        socket.bind(&SockAddr::from(addr))?;
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    }

    /// Close a namespace's listeners and let go of it.
    fn release(&self, Served { netns, accepting }: Served) {
        for task in accepting {
            task.abort();
        }
        self.namespaces.table_mut().served.remove(&netns.cookie());
        tracing::info!(
            netns = netns.inode(),
            cookie = netns.cookie(),
            "released a workload network namespace (no workload left in it)"
        );
    }

    fn serving(&self) -> MutexGuard<'_, HashMap<u64, Served>> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn warned(&self) -> MutexGuard<'_, HashSet<(u64, Option<IpAddr>)>> {
        self.warned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a workload namespace is not served.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    /// It belongs to a user namespace other than the daemon's.
    #[error("the namespace belongs to another user namespace")]
    ForeignUserNamespace,
    /// Entering it or making the listeners failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The addresses of the calling thread's namespace, loopback left out.
fn local_addrs() -> io::Result<HashSet<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .iter()
        .map(if_addrs::Interface::ip)
        .filter(|ip| !ip.is_loopback())
        .map(|ip| ip.to_canonical())
        .collect())
}

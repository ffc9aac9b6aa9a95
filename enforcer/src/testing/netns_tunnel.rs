//! Tunnel nodes in network namespaces, for privileged tests of the whole data path: each node
//! is one [`Netns`] joined to the others by veth, a scope cgroup with the datapath attached to
//! it, and a [`Tunnel`] backed by the kernel maps and attestation as the daemon's is, served by
//! a tokio runtime whose threads all live inside the namespace.
//!
//! Every node uses the same fixed ports inside its own namespace: the outbound listener on
//! `127.0.0.1:`[`OUTBOUND_PORT`] (the kernel redirect target) and the inbound listener on
//! `0.0.0.0:`[`INBOUND_PORT`], so a policy can name its peers before any node starts; the
//! node's `sk_lookup` program hands both ports to them. There is no IPv6 outbound listener,
//! so the kernel refuses enrolled workloads' IPv6 connects.
//!
//! Workload processes are registered the way the daemon registers them: attested from procfs,
//! matched against the policy's workload entries, and given their identity number in the
//! node's kernel maps; servers' listening sockets are recorded by the kernel itself.

use std::{
    fmt::Write as _,
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::{net::TcpListener, runtime::Runtime};

use super::{Node, ScratchCgroup, ScratchDatapath, Spawn, Spawned, TestPki, report};
use crate::{
    attest::{AttestOptions, Attestor},
    daemon::{KernelSources, Namespaces, compile_and_apply},
    identity::SpiffeId,
    kernel::{Counter, DaemonConfig, ListenerSlot, Maps, Netns, cgroup2_mount, netns_cookie},
    policy::{Identification, InForce, Policy, PolicyPublisher, parse},
    tunnel::{
        FlowRecord, LocalWorkloads, Namespace, Origins, RecentRecords, RecordSink, SocketTagger,
        Tunnel, TunnelConfig, TunnelParts,
    },
};

/// The outbound listener's port (on `127.0.0.1`) inside every node's namespace.
pub const OUTBOUND_PORT: u16 = crate::tunnel::DEFAULT_OUTBOUND_PORT;
/// The inbound listener's port (on every address) inside every node's namespace.
pub const INBOUND_PORT: u16 = crate::policy::DEFAULT_PEER_PORT;

/// Worker threads of each node's runtime (the VMs the suite runs on have two cores).
const WORKER_THREADS: usize = 2;
/// How long a node's runtime gets to finish its tasks when the node is dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for a record, or for a server to listen.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server gets to start listening: a python server under emulation (the vm tier)
/// with two daemons busy beside it can take well over 10 s.
const LISTEN_TIMEOUT: Duration = Duration::from_mins(1);
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// One node: namespace, scope cgroup, datapath and tunnel. Dropping it stops the tunnel, then
/// uninstalls the datapath and removes the scope cgroup (when no clone of it is left).
pub struct TunnelNode {
    // Declared first, so it is dropped first: its tasks hold the tunnel's sockets.
    runtime: Option<Runtime>,
    name: String,
    tunnel: Tunnel,
    records: Arc<RecentRecords>,
    maps: Arc<Mutex<Maps>>,
    /// The cookie of the node's network namespace.
    netns_cookie: u64,
    attestor: Attestor,
    publisher: PolicyPublisher,
    mount: PathBuf,
    scope_path: String,
    datapath: ScratchDatapath,
    scope: ScratchCgroup,
    link: Node,
}

impl TunnelNode {
    /// Start a node named `name` on the veth end `link`: create its scope cgroup, install and
    /// configure the datapath, apply the policy `policy(scope)` returns for the scope's cgroup
    /// path (as policies write it: relative to the cgroup2 mount), and serve both listeners
    /// inside the namespace with SVIDs from a new node intermediate of `pki`.
    pub fn start(
        link: &Node,
        name: &str,
        pki: &TestPki,
        policy: impl FnOnce(&str) -> String,
    ) -> Self {
        let mount = cgroup2_mount().unwrap_or_else(|error| panic!("{}", report(&error)));
        let scope = ScratchCgroup::new(name);
        let scope_path = scope.policy_path();
        let datapath = ScratchDatapath::install_in(&scope, link.netns(), |_| {});
        let maps_dir = datapath.pin_dir().join("maps");
        let open_maps = || {
            Maps::open(&maps_dir).unwrap_or_else(|error| {
                panic!(
                    "failed to open the maps in {}: {}",
                    maps_dir.display(),
                    report(&error)
                )
            })
        };
        let runtime = runtime_in(link);
        let home = runtime
            .block_on(runtime.spawn(async { Netns::current() }))
            .expect("the namespace probe task")
            .unwrap_or_else(|error| panic!("failed to open node {name}'s namespace: {error}"));
        let mut maps = open_maps();
        let local_addrs = [
            (link.addr4().into(), home.cookie()),
            (link.addr6().into(), home.cookie()),
        ];
        maps.replace_local_addrs(&local_addrs)
            .and_then(|()| maps.replace_served(&[home.cookie()]))
            .unwrap_or_else(|error| {
                panic!("failed to list node {name}'s addresses: {}", report(&error))
            });
        let netns_cookie = home.cookie();
        let namespaces = Arc::new(Namespaces::new(home));
        namespaces.set_addrs(local_addrs);
        let maps = Arc::new(Mutex::new(maps));
        let tags = datapath
            .socket_tags()
            .unwrap_or_else(|error| panic!("failed to open the socket tags: {}", report(&error)));
        let text = policy(&scope_path);
        let publisher = PolicyPublisher::new(put_in_force(name, &maps, &mount, &text, None, 1));
        let policy = publisher.snapshot();
        // The lookups' own handle, as the daemon's (see `KernelSources`).
        let sources = Arc::new(KernelSources::new(
            Arc::new(Mutex::new(open_maps())),
            tags,
            Arc::new(Attestor::new(AttestOptions::default())),
            policy.clone(),
            (namespaces, OUTBOUND_PORT),
        ));
        let records = Arc::new(RecentRecords::new(10_000));
        let node_id = format!(
            "spiffe://{}/enforcer/node/{name}",
            policy.load().policy.trust_domain
        )
        .parse()
        .unwrap_or_else(|error| panic!("node {name:?} makes no SPIFFE ID: {error}"));
        let tunnel = Tunnel::new(TunnelParts {
            config: TunnelConfig::default(),
            node_id,
            bundles: Arc::clone(&pki.bundles),
            svids: pki.node_svids(name),
            workloads: Arc::clone(&sources) as Arc<dyn LocalWorkloads>,
            origins: Arc::clone(&sources) as Arc<dyn Origins>,
            records: Arc::clone(&records) as Arc<dyn RecordSink>,
            tags: Arc::clone(&sources) as Arc<dyn SocketTagger>,
            policy,
        })
        .unwrap_or_else(|error| panic!("failed to build node {name}'s tunnel: {error}"));
        let node = Self {
            runtime: Some(runtime),
            name: name.to_owned(),
            tunnel,
            records,
            maps,
            netns_cookie,
            attestor: Attestor::new(AttestOptions::default()),
            publisher,
            mount,
            scope_path,
            datapath,
            scope,
            link: link.clone(),
        };
        node.serve();
        node
    }

    /// Bind both listeners on a runtime thread (so inside the namespace), hand the kernel the
    /// daemon's ports, and serve them.
    fn serve(&self) {
        let tunnel = self.tunnel.clone();
        let name = self.name.clone();
        let netns = netns_path(&self.link);
        let maps = Arc::clone(&self.maps);
        let runtime = self.runtime();
        let serving = runtime.spawn(async move {
            assert_in_netns(&netns);
            let outbound = bind(&name, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
            let inbound = bind(&name, Ipv4Addr::UNSPECIFIED, INBOUND_PORT).await;
            let mut maps = maps.lock().unwrap_or_else(PoisonError::into_inner);
            maps.set_listener(ListenerSlot::Outbound4, outbound.as_fd())
                .and_then(|()| maps.set_listener(ListenerSlot::Inbound4, inbound.as_fd()))
                .and_then(|()| {
                    maps.set_config(&DaemonConfig {
                        outbound_v4: Some(Ipv4Addr::LOCALHOST),
                        outbound_v6: None,
                        outbound_port: OUTBOUND_PORT,
                        inbound_port: INBOUND_PORT,
                        netns_cookie: netns_cookie(inbound.as_fd())
                            .expect("read the namespace cookie"),
                        kernel_flows: false,
                    })
                })
                .unwrap_or_else(|error| {
                    panic!("failed to configure node {name}: {}", report(&error))
                });
            drop(maps);
            tunnel.serve_outbound(outbound, Namespace::HOME);
            tunnel.serve_inbound(inbound, Namespace::HOME);
        });
        if let Err(error) = runtime.block_on(serving) {
            std::panic::resume_unwind(error.into_panic());
        }
    }

    /// Reload the policy as the daemon does: compile `text` as the next version (keeping the
    /// identity numbers), program the kernel, publish it, then have the tunnel close the open
    /// flows it denies. Returns how many flows were closed.
    pub fn reload(&mut self, text: &str) -> usize {
        let current = self.publisher.load();
        let next = put_in_force(
            &self.name,
            &self.maps,
            &self.mount,
            text,
            Some(&current.compiled.numbers),
            current.version() + 1,
        );
        self.publisher.publish(next);
        self.tunnel.revoke_denied()
    }

    /// A builder that places `program` in `cgroup` (a child of [`scope`](Self::scope)) inside
    /// this node's namespace.
    pub fn spawn(&self, cgroup: &ScratchCgroup, program: &str) -> Spawn {
        Spawn::new(program).cgroup(cgroup).netns(self.link.netns())
    }

    /// Register the workload process `pid` as the daemon would: attest it, match it against
    /// the policy's workload entries, and record its identity number in the kernel. Returns
    /// its SPIFFE ID.
    pub fn register(&self, pid: u32) -> SpiffeId {
        let generation = self.maps().generation(pid).unwrap_or_else(|error| {
            panic!("failed to read pid {pid}'s generation: {}", report(&error))
        });
        let facts = self
            .attestor
            .attest_fresh(pid)
            .unwrap_or_else(|error| panic!("failed to attest pid {pid}: {}", report(&error)));
        let Identification::Matched { id, .. } =
            self.publisher.load().identities.registry.identify(&facts)
        else {
            panic!(
                "pid {pid} ({}, cgroup {}) matches no single workload entry of node {}",
                facts.exe.display(),
                facts.cgroup,
                self.name
            );
        };
        let number = self.number(&id);
        self.maps()
            .set_identity(pid, number, generation)
            .unwrap_or_else(|error| {
                panic!("failed to set pid {pid}'s identity: {}", report(&error))
            });
        id
    }

    /// Wait until `server` listens on `addr`'s port, then register it ([`register`]). The
    /// kernel recorded its listening socket when it started listening (this checks it did), so
    /// the tunnel serves `addr` and the ingress hook guards it. Returns the server's SPIFFE ID.
    ///
    /// [`register`]: Self::register
    pub fn register_server(&self, server: &Spawned, addr: SocketAddr) -> SpiffeId {
        wait_for_listener(server, addr.port());
        let id = self.register(server.pid());
        let wildcard = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), addr.port());
        let maps = self.maps();
        let recorded = [addr, wildcard].into_iter().find_map(|key| {
            maps.service(self.netns_cookie, key)
                .unwrap_or_else(|error| {
                    panic!("failed to look up service {key}: {}", report(&error))
                })
        });
        assert!(
            recorded.is_some_and(|service| service.tgid == server.pid()),
            "node {}: the kernel did not record pid {}'s listener at {addr}: {recorded:?}",
            self.name,
            server.pid()
        );
        id
    }

    fn number(&self, id: &SpiffeId) -> u32 {
        self.publisher
            .load()
            .identities
            .numbers
            .get(id)
            .unwrap_or_else(|| panic!("{id} has no identity number on node {}", self.name))
    }

    /// The tunnel.
    #[must_use]
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// The datapath (for its events).
    #[must_use]
    pub fn datapath(&self) -> &ScratchDatapath {
        &self.datapath
    }

    /// The scope cgroup the datapath is attached to; workload cgroups are its children.
    pub fn scope(&self) -> &ScratchCgroup {
        &self.scope
    }

    /// The scope cgroup's path as policies write it (relative to the cgroup2 mount).
    #[must_use]
    pub fn scope_path(&self) -> &str {
        &self.scope_path
    }

    /// The node's address on the veth link.
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.link.addr4().into()
    }

    /// The node's namespace and veth end.
    #[must_use]
    pub fn link(&self) -> &Node {
        &self.link
    }

    /// A kernel counter of this node's datapath.
    #[must_use]
    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps()
            .counter(counter)
            .unwrap_or_else(|error| panic!("failed to read a counter: {}", report(&error)))
    }

    /// The records the tunnel has written so far, oldest first.
    #[must_use]
    pub fn records(&self) -> Vec<FlowRecord> {
        self.records.snapshot()
    }

    /// Wait up to 10 s for a record that `matches`, panicking with every record seen if none
    /// arrives.
    pub fn wait_for_record(&self, matches: impl Fn(&FlowRecord) -> bool) -> FlowRecord {
        self.wait_for_records(1, matches).swap_remove(0)
    }

    /// Wait up to 10 s until `count` records match `matches` and return every matching one,
    /// panicking with every record seen if too few arrive.
    pub fn wait_for_records(
        &self,
        count: usize,
        matches: impl Fn(&FlowRecord) -> bool,
    ) -> Vec<FlowRecord> {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let found: Vec<FlowRecord> = self.records().into_iter().filter(&matches).collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: {} of {count} matching records within {WAIT_TIMEOUT:?}; records:\n{}",
                self.name,
                found.len(),
                self.records()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the node")
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for TunnelNode {
    /// Stops the tunnel (every task and socket of the runtime) before the datapath, the scope
    /// cgroup and the namespace go.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
        }
    }
}

/// A multi-threaded runtime every thread of which (workers and blocking pool) enters `link`'s
/// namespace as it starts, so every socket its tasks open lives there.
fn runtime_in(link: &Node) -> Runtime {
    let path = netns_path(link);
    let netns = Arc::new(
        File::open(&path)
            .unwrap_or_else(|error| panic!("failed to open {}: {error}", path.display())),
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name(format!("tunnel-{}", link.netns().name()))
        .enable_all()
        .on_thread_start(move || {
            if let Err(error) =
                move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
            {
                // A thread left outside would send test traffic on the host's own network, and
                // a panic here would leave the runtime short of a thread: stop everything.
                eprintln!(
                    "fatal: a tunnel thread failed to enter {}: {error}",
                    path.display()
                );
                std::process::abort();
            }
        })
        .build()
        .unwrap_or_else(|error| panic!("failed to build a tokio runtime: {error}"))
}

/// A listener of node `name` on `ip:port`.
async fn bind(name: &str, ip: Ipv4Addr, port: u16) -> TcpListener {
    let addr = SocketAddr::new(ip.into(), port);
    TcpListener::bind(addr)
        .await
        .unwrap_or_else(|error| panic!("node {name} failed to bind {addr}: {error}"))
}

/// Where `ip netns` keeps the namespace of `link`.
fn netns_path(link: &Node) -> PathBuf {
    Path::new("/run/netns").join(link.netns().name())
}

/// Panics unless the calling thread is in the namespace at `netns`.
fn assert_in_netns(netns: &Path) {
    let inode = |path: &Path| {
        fs::metadata(path)
            .unwrap_or_else(|error| panic!("failed to stat {}: {error}", path.display()))
            .ino()
    };
    assert_eq!(
        inode(Path::new("/proc/thread-self/ns/net")),
        inode(netns),
        "a tunnel thread is not in {}",
        netns.display()
    );
}

/// Compile `text` as `version` (IDs keeping their `previous` numbers) and apply it to node
/// `name`'s kernel maps, as the daemon does; every enrolled cgroup must exist.
fn put_in_force(
    name: &str,
    maps: &Mutex<Maps>,
    mount: &std::path::Path,
    text: &str,
    previous: Option<&crate::policy::IdentityNumbers>,
    version: u64,
) -> InForce {
    let (in_force, missing) = compile_and_apply(
        maps,
        mount,
        ("test-policy.toml", text),
        parse_policy(text),
        previous,
        version,
    )
    .unwrap_or_else(|error| panic!("failed to apply node {name}'s policy: {}", report(&error)));
    assert!(
        missing.is_empty(),
        "node {name}'s policy enrolls cgroups that do not exist: {missing:?}"
    );
    in_force
}

fn parse_policy(text: &str) -> Policy {
    parse("netns-tunnel.toml", text.as_bytes())
        .unwrap_or_else(|diagnostics| panic!("invalid policy: {diagnostics:?}\n{text}"))
        .0
}

/// A node's policy for the netns tests: `scope` enrolled, each of `workloads` a cgroup below
/// it with the ID `spiffe://<trust_domain>/<name>`, `peers` as mesh peers on the default
/// inbound port, then `rules`.
#[must_use]
pub fn mesh_policy(
    trust_domain: &str,
    scope: &str,
    workloads: &[&str],
    peers: &[IpAddr],
    rules: &str,
) -> String {
    let mut text = format!("trust_domain = \"{trust_domain}\"\nenroll = [\"{scope}\"]\n");
    for name in workloads {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://{trust_domain}/{name}\"\n\
             selectors = [\"cgroup:path:{scope}/{name}\"]\n"
        );
    }
    for peer in peers {
        let _ = write!(
            text,
            "[[peer]]\naddress = \"{peer}\"\nport = {INBOUND_PORT}\n"
        );
    }
    text.push_str(rules);
    text
}

/// Wait until a TCP socket in `process`'s namespace listens on `port`, panicking (with the
/// process's stderr) if none does within [`LISTEN_TIMEOUT`] or the process exits.
pub fn wait_for_listener(process: &Spawned, port: u16) {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let tables = ["tcp", "tcp6"].map(|table| format!("/proc/{}/net/{table}", process.pid()));
    loop {
        let listening = tables
            .iter()
            .any(|table| fs::read_to_string(table).is_ok_and(|text| listens_on(&text, port)));
        if listening {
            return;
        }
        assert!(
            Instant::now() < deadline && fs::metadata(&tables[0]).is_ok(),
            "pid {} does not listen on port {port}; stderr:\n{}",
            process.pid(),
            process.stderr()
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether the text of a `/proc/net/tcp` table has a listening socket on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    crate::daemon::listeners(table)
        .iter()
        .any(|(addr, _)| addr.port() == port)
}

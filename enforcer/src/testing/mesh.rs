//! In-process tunnel nodes for tests without privileges: a test PKI, table-backed workloads
//! and origins, and a node whose outbound and inbound listeners run on a loopback address
//! (each node its own `127.0.0.x`).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use crate::{
    identity::{
        CacheConfig, CertificateAuthority, SpiffeId, SvidCache, SystemClock, TrustBundle,
        TrustBundleSet, TrustDomain,
    },
    policy::{InForce, Policy, PolicyPublisher, parse},
    tunnel::{
        FlowRecord, LocalOwner, LocalWorkloads, Namespace, Origin, OriginError, Origins, Placement,
        RecentRecords, SvidSource, Tunnel, TunnelConfig, TunnelParts,
    },
};

/// A trust domain's root CA and the bundle set that trusts it.
pub struct TestPki {
    /// The root CA.
    pub root: CertificateAuthority,
    /// Bundles trusting the root.
    pub bundles: Arc<TrustBundleSet>,
}

impl TestPki {
    /// A fresh root for `trust_domain`.
    #[must_use]
    pub fn new(trust_domain: &str) -> Self {
        Self::new_at(trust_domain, SystemTime::now())
    }

    /// A root for `trust_domain` made at `now`, valid for a day.
    #[must_use]
    pub fn new_at(trust_domain: &str, now: SystemTime) -> Self {
        let td: TrustDomain = trust_domain.parse().expect("valid trust domain");
        let root =
            CertificateAuthority::new_root(&td, Duration::from_hours(24), now).expect("root CA");
        let mut bundles = TrustBundleSet::new();
        bundles.insert(TrustBundle::new(td, vec![root.certificate().clone()]).expect("bundle"));
        Self {
            root,
            bundles: Arc::new(bundles),
        }
    }

    /// A node intermediate named `node`, made at `now`.
    #[must_use]
    pub fn node_ca_at(&self, node: &str, now: SystemTime) -> CertificateAuthority {
        self.root
            .issue_intermediate(node, Duration::from_hours(24), now)
            .expect("node CA")
    }

    /// An SVID cache issuing from a new node intermediate named `node`.
    #[must_use]
    pub fn node_svids(&self, node: &str) -> Arc<dyn SvidSource> {
        Arc::new(SvidCache::new(
            SystemClock,
            self.node_ca_at(node, SystemTime::now()),
            CacheConfig::default(),
        ))
    }
}

/// Local workloads from a table.
#[derive(Default)]
pub struct TableWorkloads(RwLock<HashMap<SocketAddr, SpiffeId>>);

impl TableWorkloads {
    /// `id` listens at `addr`.
    pub fn insert(&self, addr: SocketAddr, id: &SpiffeId) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, id.clone());
    }
}

impl LocalWorkloads for TableWorkloads {
    fn owner(&self, _from: Namespace, addr: SocketAddr) -> Option<LocalOwner> {
        let id = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
            .cloned()?;
        Some(LocalOwner {
            id,
            netns: Namespace::HOME,
            pid: None,
            placement: Placement::default(),
        })
    }
}

/// Redirect origins from a table, keyed by the client's address.
#[derive(Default)]
pub struct TableOrigins(RwLock<HashMap<SocketAddr, Origin>>);

impl Origins for TableOrigins {
    fn origin(
        &self,
        _netns: Namespace,
        client: SocketAddr,
        _local: SocketAddr,
    ) -> Result<Origin, OriginError> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&client)
            .cloned()
            .ok_or(OriginError::NotRedirected(client))
    }
}

/// A node's listeners, bound before the policy is written (it names their ports).
pub struct MeshListeners {
    ip: IpAddr,
    outbound: TcpListener,
    inbound: TcpListener,
}

impl MeshListeners {
    /// Bind both listeners on `ip` with ports the kernel picks.
    pub async fn bind(ip: IpAddr) -> Self {
        let bind = || async {
            TcpListener::bind(SocketAddr::new(ip, 0))
                .await
                .unwrap_or_else(|e| panic!("failed to bind on {ip}: {e}"))
        };
        Self {
            ip,
            outbound: bind().await,
            inbound: bind().await,
        }
    }

    /// The inbound listener's address (what peers connect to).
    #[must_use]
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound.local_addr().expect("bound")
    }
}

/// One in-process node: a tunnel serving both listeners, with table-backed sources and the
/// records kept in memory. Dropping it stops the listeners.
pub struct MeshNode {
    /// The tunnel.
    pub tunnel: Tunnel,
    /// The node's loopback address.
    pub ip: IpAddr,
    /// Where redirected clients connect.
    pub outbound: SocketAddr,
    /// Where peers connect.
    pub inbound: SocketAddr,
    /// Local workloads.
    pub workloads: Arc<TableWorkloads>,
    /// Client origins.
    pub origins: Arc<TableOrigins>,
    /// Where the policy in force is published.
    pub policy: PolicyPublisher,
    records: Arc<RecentRecords>,
    tasks: Vec<JoinHandle<()>>,
}

impl MeshNode {
    /// Start a node named `name` on `listeners` with the policy `text` (version 1).
    pub fn start(
        listeners: MeshListeners,
        name: &str,
        pki: &TestPki,
        svids: Arc<dyn SvidSource>,
        text: &str,
        config: TunnelConfig,
    ) -> Self {
        let workloads = Arc::new(TableWorkloads::default());
        let origins = Arc::new(TableOrigins::default());
        let records = Arc::new(RecentRecords::new(100_000));
        let policy = PolicyPublisher::new(InForce::compile(
            POLICY_FILE,
            text,
            self::policy(text),
            None,
            1,
        ));
        let node_id: SpiffeId = format!(
            "spiffe://{}/enforcer/node/{name}",
            policy.load().policy.trust_domain
        )
        .parse()
        .expect("node id");
        let tunnel = Tunnel::new(TunnelParts {
            config,
            node_id,
            bundles: Arc::clone(&pki.bundles),
            svids,
            workloads: Arc::clone(&workloads) as Arc<dyn LocalWorkloads>,
            origins: Arc::clone(&origins) as Arc<dyn Origins>,
            records: Arc::clone(&records) as Arc<dyn crate::tunnel::RecordSink>,
            tags: Arc::new(crate::tunnel::Untagged),
            policy: policy.snapshot(),
        })
        .expect("tunnel");
        let outbound = listeners.outbound.local_addr().expect("bound");
        let inbound = listeners.inbound_addr();
        let tasks = vec![
            tunnel.serve_outbound(listeners.outbound, Namespace::HOME),
            tunnel.serve_inbound(listeners.inbound, Namespace::HOME),
        ];
        Self {
            tunnel,
            ip: listeners.ip,
            outbound,
            inbound,
            workloads,
            origins,
            policy,
            records,
            tasks,
        }
    }

    /// The text of the policy in force.
    #[must_use]
    pub fn policy_text(&self) -> String {
        self.policy.load().text.clone()
    }

    /// Put the policy `text` in force as the next version, as a reload does, and close the
    /// open flows it denies. Returns how many were closed.
    #[must_use = "how many open flows were closed"]
    pub fn reload(&self, text: &str) -> usize {
        let current = self.policy.load();
        self.policy.publish(InForce::compile(
            POLICY_FILE,
            text,
            policy(text),
            Some(&current.compiled.numbers),
            current.version() + 1,
        ));
        self.tunnel.revoke_denied()
    }

    /// Connect to the outbound listener as a redirected client of identity `id` that asked
    /// for `dst` (what the kernel redirect and attestation would report). A refused flow may
    /// already fail here: the listener resets it at once, possibly before `connect` returns.
    pub async fn connect(&self, id: &SpiffeId, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = match self.ip {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }?;
        socket.bind(SocketAddr::new(self.ip, 0))?;
        let client = socket.local_addr()?;
        self.origins
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                client,
                Origin {
                    dst,
                    pid: std::process::id(),
                    cgroup_id: 0,
                    exe: None,
                    id: id.clone(),
                    placement: Placement::default(),
                },
            );
        let stream = socket.connect(self.outbound).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// The records written so far.
    #[must_use]
    pub fn records(&self) -> Vec<FlowRecord> {
        self.records.snapshot()
    }

    /// Wait up to 10 s for a record that `matches`, panicking with every record seen if none
    /// arrives.
    pub async fn wait_for_record(&self, matches: impl Fn(&FlowRecord) -> bool) -> FlowRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = self.records().into_iter().find(&matches) {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "no matching record; records: {:#?}",
                self.records()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The file name test policies are read as.
const POLICY_FILE: &str = "test-policy.toml";

/// Parse `text` as a policy, panicking with the diagnostics if it is invalid.
#[must_use]
pub fn policy(text: &str) -> Policy {
    parse(POLICY_FILE, text.as_bytes())
        .unwrap_or_else(|diagnostics| panic!("invalid test policy: {diagnostics:?}"))
        .0
}

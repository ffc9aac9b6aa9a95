//! The mTLS tunnel: the outbound listener that redirected connections land on, the inbound
//! listener peers connect to, and the HBONE-style HTTP/2 CONNECT streams between them.
//!
//! ```text
//! client --connect()--> [kernel redirect] --> outbound listener (attest, route)
//!     same node:   --hop (tagged for the workload's identity)--> local workload
//!     mesh peer:   ==TLS 1.3 mTLS, h2 CONNECT <dst>==> peer inbound (authorize) --hop--> workload
//!     egress:      --plaintext--> destination outside the mesh
//!     otherwise:   reset, with a deny record
//! ```
//!
//! Both sides authorize every flow against the policy (source ID, destination ID, port), write
//! a record when it is refused, opened and closed, and a policy reload closes the open flows
//! the new policy denies.
// Every submodule forbids unsafe code but `hop`, which sets one socket option.
#![deny(unsafe_code)]

mod config;
mod copy;
mod hbone;
mod hop;
mod inbound;
mod metrics;
mod net;
mod outbound;
mod pool;
mod record;
mod state;
mod tracker;

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinHandle,
};

pub use config::TunnelConfig;
pub(crate) use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_OUTBOUND_PORT,
};
pub use hbone::{ALPN_H2, Refusal, server_name};
pub use inbound::InboundClient;
pub use metrics::{Metric, Metrics};
pub use net::ConnectError;
pub use pool::{
    Accepted, Leased, MonotonicClock, Pool, PoolError, Requested, SystemMonotonicClock,
    TunnelStream,
};
pub use record::{
    FlowEvent, FlowRecord, FlowVerdict, LogSink, Party, Placement, Reason, RecentRecords,
    RecordSink, Side,
};
pub use state::{
    LocalOwner, LocalWorkloads, Namespace, Origin, OriginError, Origins, SocketTagger, SvidSource,
    Untagged,
};

use self::{
    copy::{Ended, Limits, Sink, Source, SpliceOutcome, splice},
    inbound::{ChosenPerConnection, WorkloadCerts},
    tracker::{TrackedFlow, Tracker},
};
use crate::{
    identity::{PeerAuthorizer, SpiffeId, TrustBundleSet, server_config_with_resolver},
    policy::{Decision, PolicySnapshot, PolicyView},
};

/// Why a tunnel endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The TLS server configuration was refused.
    #[error("failed to build the inbound TLS configuration")]
    Tls(#[from] rustls::Error),
}

/// Everything a tunnel endpoint is built from.
pub struct TunnelParts {
    /// Settings.
    pub config: TunnelConfig,
    /// The node's own identity: its SVID is presented when a client names no local workload,
    /// so that the client gets a clear "no such workload" instead of a failed handshake.
    pub node_id: SpiffeId,
    /// Trust bundles that client and server SVIDs must verify against.
    pub bundles: Arc<TrustBundleSet>,
    /// SVIDs of local workloads (and of the node).
    pub svids: Arc<dyn SvidSource>,
    /// Enrolled local workloads by listening address.
    pub workloads: Arc<dyn LocalWorkloads>,
    /// Who redirected clients are.
    pub origins: Arc<dyn Origins>,
    /// Where flow records go.
    pub records: Arc<dyn RecordSink>,
    /// How the tunnel's sockets make themselves known to the kernel.
    pub tags: Arc<dyn SocketTagger>,
    /// The policy in force, as the daemon publishes it.
    pub policy: PolicySnapshot,
}

/// One node's tunnel: both listeners' shared state. Cheap to clone.
#[derive(Clone)]
pub struct Tunnel(Arc<Node>);

struct Node {
    config: TunnelConfig,
    svids: Arc<dyn SvidSource>,
    workloads: Arc<dyn LocalWorkloads>,
    origins: Arc<dyn Origins>,
    records: Arc<dyn RecordSink>,
    tags: Arc<dyn SocketTagger>,
    policy: PolicySnapshot,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    pool: Pool,
    /// The certificates inbound handshakes present.
    certs: Arc<WorkloadCerts>,
    /// The inbound TLS configuration, copied for each connection with the certificate chosen
    /// for it.
    tls_server: Arc<ServerConfig>,
    /// Whether the pool's pruning task runs.
    pruning: AtomicBool,
}

impl Tunnel {
    /// A tunnel endpoint built from `parts`.
    pub fn new(parts: TunnelParts) -> Result<Self, TunnelError> {
        let metrics = Arc::new(Metrics::default());
        let certs = Arc::new(WorkloadCerts::new(
            parts.node_id,
            Arc::clone(&parts.svids),
            Arc::clone(&parts.workloads),
        ));
        let mut tls_server = server_config_with_resolver(
            Arc::new(ChosenPerConnection),
            Arc::clone(&parts.bundles),
            PeerAuthorizer::Any,
        )?;
        tls_server.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
        Ok(Self(Arc::new(Node {
            pool: Pool::new(
                parts.config.clone(),
                parts.bundles,
                Arc::clone(&metrics),
                Arc::clone(&parts.tags),
                Arc::new(pool::SystemMonotonicClock),
            ),
            config: parts.config,
            svids: parts.svids,
            workloads: parts.workloads,
            origins: parts.origins,
            records: parts.records,
            tags: parts.tags,
            policy: parts.policy,
            tracker: Arc::new(Tracker::default()),
            metrics,
            certs,
            tls_server: Arc::new(tls_server),
            pruning: AtomicBool::new(false),
        })))
    }

    /// Serve redirected connections accepted on `listener`, a socket of namespace `netns`
    /// (the outbound side), until the task is aborted. The first call also starts pruning
    /// idle pooled connections, for as long as the tunnel lives.
    pub fn serve_outbound(&self, listener: TcpListener, netns: Namespace) -> JoinHandle<()> {
        if !self.0.pruning.swap(true, Ordering::Relaxed) {
            let interval = pool::prune_interval(&self.0.config);
            tokio::spawn(prune_pool(Arc::downgrade(&self.0), interval));
        }
        tokio::spawn(outbound::serve(Arc::clone(&self.0), listener, netns))
    }

    /// Serve peers' tunnel connections accepted on `listener`, a socket of namespace `netns`
    /// (the inbound side), until the task is aborted.
    pub fn serve_inbound(&self, listener: TcpListener, netns: Namespace) -> JoinHandle<()> {
        tokio::spawn(inbound::serve(Arc::clone(&self.0), listener, netns))
    }

    /// Serve HTTP/2 CONNECT requests on `io`, a connection whose client already proved
    /// `client_id`, whose TLS server name named `destination`, and for which the certificate
    /// of `presented` was shown. The inbound listener calls this after the TLS handshake; it
    /// is public so request handling can be fuzzed without TLS.
    pub async fn serve_connection<IO>(&self, io: IO, client: InboundClient)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        inbound::serve_connection(Arc::clone(&self.0), io, client).await;
    }

    /// Close every open flow the policy in force denies (each gets a close record with reason
    /// `revoked`); returns how many were closed. Called once a new policy is published.
    #[must_use = "how many open flows were closed"]
    pub fn revoke_denied(&self) -> usize {
        self.0.tracker.revoke_denied(&self.0.policy())
    }

    /// The endpoint's counters.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// How many flows with known identities on both ends are open.
    #[must_use]
    pub fn open_flows(&self) -> usize {
        self.0.tracker.len()
    }

    /// How many tunnel connections to peers are pooled.
    #[must_use]
    pub fn pooled_connections(&self) -> usize {
        self.0.pool.connections()
    }
}

impl Node {
    /// The tunnel's view of the policy in force now: a flow decided under it keeps it.
    fn policy(&self) -> Arc<PolicyView> {
        Arc::clone(&self.policy.load().view)
    }

    fn limits(&self) -> Limits {
        Limits {
            idle: self.config.idle_timeout,
            lifetime: self.config.max_lifetime,
        }
    }

    /// Write a deny record.
    fn deny(&self, mut record: FlowRecord) {
        record.event = FlowEvent::Deny;
        self.records.record(record);
    }

    /// Record `open`, copy both ways until the flow ends, then record the close; `sent_early`
    /// bytes of the client's went before the open (optimistic send) and count in the close. A
    /// flow whose two identities are known is tracked, so that a reload that denies it closes
    /// it.
    async fn run_flow<CS, CK, SS, SK>(
        &self,
        (open, sent_early): (FlowRecord, u64),
        client: (CS, CK),
        server: (SS, SK),
    ) -> SpliceOutcome
    where
        CS: Source,
        CK: Sink,
        SS: Source,
        SK: Sink,
    {
        let tracked = match (&open.src.id, &open.dst.id, open.dst.addr) {
            (Some(src), Some(dst), Some(addr)) if open.reason != Reason::Egress => {
                Some(self.tracker.track(src, dst, addr.port()))
            }
            _ => None,
        };
        // A reload published after this flow was decided revoked only the flows tracked then:
        // decide the tracked ones again under the policy in force now.
        let current = self.policy();
        if tracked.is_some() && current.version != open.policy_version {
            self.tracker.revoke_denied(&current);
        }
        self.metrics.inc(Metric::FlowsOpened);
        self.records.record(open.clone());
        let revoked = async {
            match &tracked {
                Some(flow) => flow.revoked().await,
                None => std::future::pending().await,
            }
        };
        let mut outcome = splice(client, server, self.limits(), revoked).await;
        outcome.up += sent_early;
        self.metrics.inc(Metric::FlowsClosed);
        self.metrics.add(Metric::BytesUp, outcome.up);
        self.metrics.add(Metric::BytesDown, outcome.down);
        let mut close = FlowRecord {
            time: SystemTime::now(),
            event: FlowEvent::Close,
            bytes_up: outcome.up,
            bytes_down: outcome.down,
            duration: outcome.duration,
            ..open
        };
        // A reload that counted this flow as revoked wins over however the copy ended.
        let revocation = match (&outcome.ended, tracked.and_then(TrackedFlow::finish)) {
            (Ended::Revoked(revocation), _) => Some(*revocation),
            (_, revoked) => revoked,
        };
        close.reason = match (&outcome.ended, revocation) {
            (_, Some(revocation)) => {
                self.metrics.inc(Metric::FlowsRevoked);
                close.verdict = FlowVerdict::Deny;
                close.rule = revocation.rule;
                close.policy_version = revocation.policy_version;
                Reason::Revoked
            }
            (Ended::Finished, None) => Reason::Finished,
            (Ended::IdleTimeout, None) => Reason::IdleTimeout,
            (Ended::Lifetime, None) => Reason::Lifetime,
            (Ended::Error(_) | Ended::Revoked(_), None) => Reason::Error,
        };
        self.records.record(close);
        outcome
    }
}

/// The record verdict of a decision.
fn verdict(decision: Decision) -> FlowVerdict {
    match (decision.allowed, decision.audited) {
        (true, false) => FlowVerdict::Allow,
        (true, true) => FlowVerdict::Audit,
        (false, _) => FlowVerdict::Deny,
    }
}

/// A record of `event` between `src` and `dst`, stamped now with `view`'s version.
fn new_record(
    side: Side,
    view: &PolicyView,
    (verdict, reason, rule): (FlowVerdict, Reason, Option<u32>),
    src: &Party,
    dst: &Party,
) -> FlowRecord {
    FlowRecord {
        time: SystemTime::now(),
        side,
        event: FlowEvent::Open,
        verdict,
        reason,
        rule,
        policy_version: view.version,
        src: src.clone(),
        dst: dst.clone(),
        bytes_up: 0,
        bytes_down: 0,
        duration: std::time::Duration::ZERO,
    }
}

/// Prunes the pool of the node behind `node` every `interval` until the node is gone.
async fn prune_pool(node: Weak<Node>, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(node) = node.upgrade() else {
            return;
        };
        node.pool.prune();
    }
}

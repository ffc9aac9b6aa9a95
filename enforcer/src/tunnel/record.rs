//! Flow records: what each tunnel endpoint reports about every flow it decides, opens and
//! closes. The daemon's audit log consumes them through a [`RecordSink`].
#![forbid(unsafe_code)]

use std::{
    collections::VecDeque,
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use crate::identity::SpiffeId;

/// Which part of the tunnel wrote a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The outbound listener, on the client's node.
    Outbound,
    /// The inbound listener, on the destination's node.
    Inbound,
}

/// What happened to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowEvent {
    /// The flow was allowed and opened.
    Open,
    /// An open flow ended.
    Close,
    /// The flow was refused before it opened.
    Deny,
}

/// The policy's verdict on the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowVerdict {
    /// Allowed by a rule (or by an egress entry).
    Allow,
    /// Refused.
    Deny,
    /// Policy denies it, but audit mode let it through.
    Audit,
}

/// Why a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An allow rule (or audit mode) permits the flow.
    Policy,
    /// Plaintext egress permitted by policy.
    Egress,
    /// The destination is neither local, a mesh peer, nor permitted egress.
    NoRoute,
    /// The client has no identity (or no redirect record).
    NoIdentity,
    /// The client process exec'd or moved to another cgroup after it connected: the identity
    /// it has now is not the one that made the connection.
    ChangedSinceConnect,
    /// No SVID could be had for the client's identity.
    NoSvid,
    /// The peer node could not be reached or the handshake failed.
    PeerUnreachable,
    /// The peer's SVID names an identity policy does not let the client reach.
    ServerNotAuthorized,
    /// The inbound side refused the CONNECT, with the HTTP status's meaning.
    Refused(super::hbone::Refusal),
    /// Both directions ended normally.
    Finished,
    /// Nothing moved for longer than the idle timeout.
    IdleTimeout,
    /// The flow reached its maximum lifetime.
    Lifetime,
    /// A policy reload denies the flow; it was closed.
    Revoked,
    /// A socket or stream failed or was reset.
    Error,
    /// The endpoint is shutting down.
    Shutdown,
}

impl Reason {
    /// A short name for logs and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Egress => "egress",
            Self::NoRoute => "no-route",
            Self::NoIdentity => "no-identity",
            Self::ChangedSinceConnect => "changed-since-connect",
            Self::NoSvid => "no-svid",
            Self::PeerUnreachable => "peer-unreachable",
            Self::ServerNotAuthorized => "server-not-authorized",
            Self::Refused(refusal) => refusal.as_str(),
            Self::Finished => "finished",
            Self::IdleTimeout => "idle-timeout",
            Self::Lifetime => "lifetime",
            Self::Revoked => "revoked",
            Self::Error => "error",
            Self::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One end of a flow as a record names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Party {
    /// Its SPIFFE ID, when known.
    pub id: Option<SpiffeId>,
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Its process, when it runs on the recording node: the client's, or the one listening
    /// at the destination.
    pub pid: Option<u32>,
    /// Its cgroup id (client side only, on the client's node).
    pub cgroup_id: Option<u64>,
    /// Its binary (client side only, on the client's node).
    pub exe: Option<PathBuf>,
    /// The container and pod it runs in: from attestation on its own node, and as the other
    /// node reported it (in the CONNECT request or its answer) on the far one.
    pub placement: Placement,
}

/// Where a workload runs: its container and pod, when its cgroup path names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The container id (64 hex digits).
    pub container_id: Option<String>,
    /// The Kubernetes pod uid.
    pub pod_uid: Option<String>,
}

/// One record of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// When it was written.
    pub time: SystemTime,
    /// Which endpoint wrote it.
    pub side: Side,
    /// Open, close or deny.
    pub event: FlowEvent,
    /// The policy's verdict.
    pub verdict: FlowVerdict,
    /// Why.
    pub reason: Reason,
    /// The deciding rule (file order, 1-based), `None` for the default deny or no rule.
    pub rule: Option<u32>,
    /// The policy version that decided.
    pub policy_version: u64,
    /// The client.
    pub src: Party,
    /// The destination.
    pub dst: Party,
    /// Bytes from client to destination.
    pub bytes_up: u64,
    /// Bytes from destination to client.
    pub bytes_down: u64,
    /// How long the flow was open (zero for open and deny records).
    pub duration: Duration,
}

impl fmt::Display for FlowRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = |party: &Party| {
            party
                .id
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string)
        };
        let addr = |party: &Party| party.addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
        write!(
            f,
            "{:?} {:?} {:?} reason={} rule={} v{} {} ({}) -> {} ({}) up={} down={} {:?}",
            self.side,
            self.event,
            self.verdict,
            self.reason,
            self.rule.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            self.policy_version,
            id(&self.src),
            addr(&self.src),
            id(&self.dst),
            addr(&self.dst),
            self.bytes_up,
            self.bytes_down,
            self.duration,
        )
    }
}

/// Where records go.
pub trait RecordSink: Send + Sync {
    /// Take one record; must not block for long (it runs on the data path).
    fn record(&self, record: FlowRecord);
}

/// Writes each record to the log (`tracing`, target `enforcer::flow`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSink;

impl RecordSink for LogSink {
    fn record(&self, record: FlowRecord) {
        tracing::info!(target: "enforcer::flow", "{record}");
    }
}

/// Keeps the most recent records in memory (the newest `capacity`).
#[derive(Debug)]
pub struct RecentRecords {
    capacity: usize,
    records: Mutex<VecDeque<FlowRecord>>,
}

impl RecentRecords {
    /// An empty buffer of `capacity` records.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            records: Mutex::new(VecDeque::new()),
        }
    }

    /// A copy of the records held, oldest first.
    #[must_use]
    pub fn snapshot(&self) -> Vec<FlowRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl RecordSink for RecentRecords {
    fn record(&self, record: FlowRecord) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.len() == self.capacity {
            records.pop_front();
        }
        records.push_back(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> FlowRecord {
        FlowRecord {
            time: SystemTime::UNIX_EPOCH,
            side: Side::Outbound,
            event: FlowEvent::Deny,
            verdict: FlowVerdict::Deny,
            reason: Reason::NoRoute,
            rule: None,
            policy_version: n,
            src: Party::default(),
            dst: Party::default(),
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn recent_records_keep_the_newest() {
        let recent = RecentRecords::new(2);
        for n in 1..=3 {
            recent.record(record(n));
        }
        let versions: Vec<u64> = recent.snapshot().iter().map(|r| r.policy_version).collect();
        assert_eq!(versions, [2, 3]);
        assert!(record(1).to_string().contains("reason=no-route rule=- v1"));
    }
}

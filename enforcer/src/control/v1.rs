//! The control API's wire types, version 1: one struct per route's query and reply, shared by
//! the daemon (which serializes them) and the CLI (which parses them). The JSON field names are
//! the contract `curl` users and the README rely on; `tests` pins them.
//!
//! | route | query | reply |
//! |---|---|---|
//! | `GET /v1/status` | | [`Status`] |
//! | `GET /v1/policy` | | [`Policy`] |
//! | `POST /v1/policy` | [`ReloadQuery`] | [`ReloadOutcome`], or 422 [`Refusal`] |
//! | `GET /v1/workloads` | | `[`[`Workload`]`]` |
//! | `GET /v1/flows` | [`FlowsQuery`] | JSON lines of [`AuditRecord`](crate::audit::AuditRecord), [`Lagged`] |
//! | `GET /v1/svid` | [`SvidQuery`] | [`Svid`] |
//! | any, on failure | | [`ErrorBody`] |
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    audit::{AuditStats, Verdict},
    identity::SpiffeId,
};

/// Whether denials are enforced or only recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Denied connections are refused.
    Enforce,
    /// Denied connections are let through and recorded.
    Audit,
}

/// `GET /v1/status`: the daemon, its datapath, listeners, workloads, SVIDs and counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Status {
    /// The node's name.
    pub node: String,
    /// The node's own SPIFFE ID.
    #[serde(with = "spiffe_id")]
    pub node_id: SpiffeId,
    /// The trust domain.
    pub trust_domain: String,
    /// The daemon's process ID.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// The mode the kernel enforces.
    pub mode: Mode,
    /// The policy in force.
    pub policy: StatusPolicy,
    /// The kernel side.
    pub datapath: Datapath,
    /// Where the daemon listens.
    pub listeners: Listeners,
    /// How many processes are registered.
    pub workloads: WorkloadCount,
    /// The SVIDs held, by SPIFFE ID.
    pub svids: Vec<SvidSummary>,
    /// Tunnel flows open now.
    pub open_flows: usize,
    /// Kernel and tunnel counters.
    pub counters: Counters,
    /// What was lost.
    pub lost: Lost,
    /// The audit log's counters.
    pub audit: AuditStats,
}

/// The policy part of [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusPolicy {
    /// The version the daemon holds.
    pub version: u64,
    /// The version the kernel's active slot holds, if readable.
    pub kernel_version: Option<u64>,
    /// The kernel's active slot, if readable.
    pub kernel_slot: Option<u32>,
    /// SHA-256 of the policy text.
    pub hash: String,
    /// The file it was read from.
    pub file: String,
    /// When it was put in force (RFC 3339).
    pub since: String,
}

/// The datapath part of [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Datapath {
    /// Where the maps and links are pinned.
    pub pin_dir: String,
    /// The cgroup the programs are attached to.
    pub scope_cgroup: String,
    /// The cgroup v2 mount.
    pub cgroup2_mount: String,
    /// Whether the pins of a previous run were adopted.
    pub adopted: bool,
    /// Whether the BPF LSM program refuses packet sockets of enrolled processes.
    pub refuses_packet_sockets: bool,
    /// Whether allowed same-node flows go direct, authorized in the kernel.
    pub same_node_direct: bool,
    /// Every program and what it is attached to.
    pub attachments: Vec<Attachment>,
}

/// One attached program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Attachment {
    /// The program's name.
    pub program: String,
    /// What it is attached to.
    pub attached_to: String,
}

/// The listeners part of [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Listeners {
    /// The tunnel's outbound listeners.
    pub outbound: Vec<SocketAddr>,
    /// The tunnel's inbound listener.
    pub inbound: SocketAddr,
    /// The control socket.
    pub control: String,
    /// The metrics listener, if any.
    pub metrics: Option<SocketAddr>,
    /// The workloads' network namespaces where the tunnel's listeners are up (besides the
    /// daemon's own).
    pub namespaces: Vec<ServedNamespace>,
    /// The SPIFFE Workload API, when served.
    pub workload_api: Option<WorkloadApiStatus>,
}

/// The SPIFFE Workload API in [`Listeners`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkloadApiStatus {
    /// Its Unix socket.
    pub socket: String,
    /// Streams open now.
    pub streams: usize,
}

/// A workload network namespace the daemon serves, in [`Listeners`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServedNamespace {
    /// Its inode (what `/proc/<pid>/ns/net` links to).
    pub inode: u64,
    /// Its cookie, as the kernel's tables name it.
    pub cookie: u64,
}

/// The workloads part of [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkloadCount {
    /// Registered processes.
    pub processes: usize,
    /// Those that hold an identity.
    pub with_identity: usize,
}

/// One SVID in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SvidSummary {
    /// Its SPIFFE ID.
    #[serde(with = "spiffe_id")]
    pub spiffe_id: SpiffeId,
    /// When it expires (RFC 3339).
    pub not_after: String,
    /// Seconds until it expires.
    pub expires_in_s: u64,
}

/// The counters part of [`Status`], by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    /// The kernel datapath's counters.
    pub kernel: BTreeMap<String, u64>,
    /// The tunnel's counters.
    pub tunnel: BTreeMap<String, u64>,
}

/// The losses part of [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lost {
    /// Kernel events lost (ring buffer full).
    pub kernel_events: u64,
    /// Audit records dropped (writer queue full).
    pub audit_records: u64,
}

/// `GET /v1/policy`: the policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Policy {
    /// Its version.
    pub version: u64,
    /// SHA-256 of its text.
    pub hash: String,
    /// The file it was read from.
    pub file: String,
    /// Its global mode.
    pub mode: Mode,
    /// When it was put in force (RFC 3339).
    pub since: String,
    /// Its source text.
    pub text: String,
}

/// The query of `POST /v1/policy` (the body is the policy text).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReloadQuery {
    /// The name diagnostics give the text.
    pub file: Option<String>,
    /// Validate and diff only (`true` or `1`).
    #[serde(default, with = "flag")]
    pub dry_run: bool,
}

/// The reply of `POST /v1/policy`: what the reload did (or, for a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReloadOutcome {
    /// Whether it was put in force (false for a dry run).
    pub applied: bool,
    /// The version in force before.
    pub previous_version: u64,
    /// The new version (for a dry run: the version it would get).
    pub version: u64,
    /// SHA-256 of the new text.
    pub hash: String,
    /// What changed, one line each (`+`, `-`, `~`).
    pub changes: Vec<String>,
    /// Warnings of validation.
    pub warnings: Vec<String>,
    /// Enrolled cgroups that do not exist yet.
    pub missing_cgroups: Vec<String>,
    /// Open flows the new policy denies, closed.
    pub closed: usize,
}

/// The 422 reply of `POST /v1/policy` for a policy that does not validate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Refusal {
    /// What was wrong, and which version stays in force, with every diagnostic.
    pub error: String,
    /// One `file:line:col: severity: message` line per problem.
    pub diagnostics: Vec<String>,
}

/// One element of `GET /v1/workloads`: a registered process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Workload {
    /// Process ID.
    pub pid: u32,
    /// Its binary.
    pub exe: String,
    /// SHA-256 of the running binary.
    pub sha256: String,
    /// cgroup v2 path.
    pub cgroup: String,
    /// cgroup ID.
    pub cgroup_id: Option<u64>,
    /// Effective uid.
    pub uid: u32,
    /// The identity it was given.
    #[serde(with = "optional_spiffe_id")]
    pub spiffe_id: Option<SpiffeId>,
    /// The workload entry that matched (1-based, file order).
    pub entry: Option<usize>,
    /// `matched`, `unmatched`, `ambiguous` or `refused`.
    pub state: String,
    /// Why the entry that matched gave no identity (state `refused`).
    pub reason: Option<String>,
    /// TCP addresses it listens on.
    pub listening: Vec<SocketAddr>,
    /// The container it runs in, when its cgroup path names one.
    pub container_id: Option<String>,
    /// The Kubernetes pod it belongs to, when its cgroup path names one.
    pub pod_uid: Option<String>,
    /// The inode of its network namespace (`/proc/<pid>/ns/net`).
    pub netns: u64,
}

/// The query of `GET /v1/flows`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FlowsQuery {
    /// Only records with this verdict.
    #[serde(
        default,
        with = "optional_verdict",
        skip_serializing_if = "Option::is_none"
    )]
    pub verdict: Option<Verdict>,
    /// Only records naming this SPIFFE ID (either end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// At most this many past records (default 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Keep the stream open and send new records as they are written (`true` or `1`).
    #[serde(default, with = "flag", skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
}

/// The first line of `GET /v1/flows` when the log cannot give every record asked for: where
/// the records stop, and why (rotated out of the log, or a file that could not be read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Unavailable {
    /// No record older than this seq follows.
    pub unavailable_before: u64,
    /// Why.
    pub reason: String,
}

/// A line of `GET /v1/flows?follow=true` in place of records the follower fell behind on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lagged {
    /// How many records were skipped.
    pub lagged: u64,
    /// Where they are.
    pub note: String,
}

/// The query of `GET /v1/svid`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SvidQuery {
    /// The SPIFFE ID of a local workload (parsed by the route, so its error names the ID).
    pub id: Option<String>,
}

/// `GET /v1/svid`: the current SVID of a local workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Svid {
    /// Its SPIFFE ID.
    #[serde(with = "spiffe_id")]
    pub spiffe_id: SpiffeId,
    /// Valid from (RFC 3339).
    pub not_before: String,
    /// Valid until (RFC 3339).
    pub not_after: String,
    /// Seconds until it expires.
    pub expires_in_s: u64,
    /// The leaf and its intermediates, PEM.
    pub chain_pem: String,
}

/// The body of every non-2xx reply (a [`Refusal`] adds diagnostics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    /// What went wrong, for an operator.
    pub error: String,
}

/// A [`SpiffeId`] as its string.
mod spiffe_id {
    use super::{Deserialize, Deserializer, Serializer, SpiffeId, from_str};

    pub(super) fn serialize<S: Serializer>(
        id: &SpiffeId,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(id.as_ref())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SpiffeId, D::Error> {
        from_str(&String::deserialize(deserializer)?)
    }
}

/// An optional [`SpiffeId`] as its string or `null`.
mod optional_spiffe_id {
    use super::{Deserialize, Deserializer, Serializer, SpiffeId, from_str};

    #[expect(
        clippy::ref_option,
        reason = "serde's `with` passes the field by reference"
    )]
    pub(super) fn serialize<S: Serializer>(
        id: &Option<SpiffeId>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => serializer.serialize_some(id.as_ref()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SpiffeId>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|id| from_str(&id))
            .transpose()
    }
}

/// An optional [`Verdict`] by its name, parsed as the audit log names it.
mod optional_verdict {
    use super::{Deserialize, Deserializer, Serializer, Verdict, from_str};

    #[expect(
        clippy::ref_option,
        clippy::trivially_copy_pass_by_ref,
        reason = "serde's `with` passes the field by reference"
    )]
    pub(super) fn serialize<S: Serializer>(
        verdict: &Option<Verdict>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match verdict {
            Some(verdict) => serializer.serialize_some(verdict.as_str()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Verdict>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|verdict| from_str(&verdict))
            .transpose()
    }
}

/// A query flag: `true` or `1` is set, any other value is not; sent as `true`.
mod flag {
    use super::{Deserialize, Deserializer, Serializer};

    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "serde's `with` passes the field by reference"
    )]
    pub(super) fn serialize<S: Serializer>(set: &bool, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if *set { "true" } else { "false" })
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<bool, D::Error> {
        let value = String::deserialize(deserializer)?;
        Ok(value == "true" || value == "1")
    }
}

/// `text` parsed with [`FromStr`], its error as the deserializer's.
fn from_str<T: FromStr, E: serde::de::Error>(text: &str) -> Result<T, E>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(E::custom)
}

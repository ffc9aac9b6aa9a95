//! The control API's routes (HTTP + JSON on the root-only Unix socket; `/metrics` also on
//! the metrics TCP address):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/status` | attachments, policy version and hash, mode, workloads, SVIDs, counters, losses |
//! | `GET /v1/policy` | the policy in force: version, hash, file, text |
//! | `POST /v1/policy?file=NAME[&dry_run=true]` | reload from the body (diagnostics name `NAME`) |
//! | `GET /v1/workloads` | registered processes: pid, exe, sha256, cgroup, SPIFFE ID, entry |
//! | `GET /v1/flows[?verdict=V][&id=ID][&limit=N][&follow=true]` | audit records, JSON lines (older ones read from the files) |
//! | `GET /v1/svid?id=ID` | the current SVID of a local workload identity |
//! | `GET /metrics` | Prometheus metrics, `OpenMetrics` text |
//!
//! They are an axum `Router` (`Routes for Api`); anything else is a JSON 404 naming the method
//! and path, and the metrics listener answers every path but `/metrics` with a 404.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::{Request, State},
    middleware::{Next, from_fn},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{
    Svids,
    namespaces::NamespaceServer,
    node::NodeFacts,
    reload::{Outcome, ReloadError, Reloader},
    telemetry::Telemetry,
    workloads::Registrar,
};
use crate::{
    audit::{AuditLog, AuditStats, Filter, RecentRecord},
    control::{Caller, Query, Reply, Routes, v1},
    identity::SpiffeId,
    kernel::{Counter, LSM, Maps, PROGRAMS, PolicyMeta, TRACEPOINTS},
    metrics::{self, Histogram},
    policy::PolicySnapshot,
    tunnel::{Metric, Tunnel},
    workload_api::{ApiMetrics, Limits},
};

/// Records `flows` returns without `limit`.
const DEFAULT_FLOWS: usize = 200;

/// The control API of one daemon: a narrow handle on each part it reports or drives.
pub(crate) struct Api {
    /// What this daemon is and where it serves.
    pub(crate) node: Arc<NodeFacts>,
    /// The policy in force.
    pub(crate) policy: PolicySnapshot,
    /// Reloads (`POST /v1/policy`).
    pub(crate) reloader: Arc<Reloader>,
    /// The registrar's table of enrolled processes.
    pub(crate) registrar: Arc<Registrar>,
    /// The audit reader (recent records, followers, stats).
    pub(crate) audit: AuditLog,
    /// The daemon's own counters.
    pub(crate) telemetry: Arc<Telemetry>,
    /// The SVIDs held.
    pub(crate) svids: Arc<Svids>,
    /// The tunnel's counters and open flows.
    pub(crate) tunnel: Tunnel,
    /// The kernel's counters and active policy slot.
    pub(crate) maps: Arc<Mutex<Maps>>,
    /// The workload namespaces served.
    pub(crate) namespaces: Arc<NamespaceServer>,
    /// The Workload API's counters and limits, when it is served.
    pub(crate) workload_figures: Option<ApiFigures>,
}

/// What `/metrics` reports of the Workload API.
#[derive(Clone, Debug)]
pub(crate) struct ApiFigures {
    /// Its counters.
    pub(crate) counters: Arc<ApiMetrics>,
    /// Its limits, which count the streams open.
    pub(crate) limits: Arc<Limits>,
}

impl Routes for Api {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/metrics", get(get_metrics))
            .route("/v1/status", get(get_status))
            .route("/v1/policy", get(get_policy).post(post_policy))
            .route("/v1/workloads", get(get_workloads))
            .route("/v1/flows", get(flows))
            .route("/v1/svid", get(svid))
            .fallback(no_route)
            .method_not_allowed_fallback(no_route)
            .layer(from_fn(only_metrics_over_tcp))
            .with_state(self)
    }
}

/// The state every route reads.
type ApiState = State<Arc<Api>>;

async fn get_metrics(State(daemon): ApiState) -> Reply {
    Reply::Text {
        status: StatusCode::OK,
        content_type: metrics::CONTENT_TYPE,
        body: metrics::exposition(Scrape::read(&daemon)),
    }
}

async fn get_status(State(daemon): ApiState) -> Reply {
    Reply::json(status(&daemon))
}

async fn get_policy(State(daemon): ApiState) -> Reply {
    Reply::json(policy(&daemon))
}

async fn get_workloads(State(daemon): ApiState) -> Reply {
    Reply::json(workloads(&daemon))
}

async fn post_policy(
    State(daemon): ApiState,
    Query(query): Query<v1::ReloadQuery>,
    body: Bytes,
) -> Reply {
    let file = query.file.unwrap_or_else(|| "<request>".to_owned());
    reload(&daemon.reloader, file, body, query.dry_run).await
}

/// Every unknown method and path: a JSON 404 naming both.
async fn no_route(method: Method, uri: Uri) -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
    )
}

/// The metrics listener (a [`Caller::Tcp`]) serves `/metrics` and nothing else.
async fn only_metrics_over_tcp(request: Request, next: Next) -> Response {
    if matches!(request.extensions().get::<Caller>(), Some(Caller::Tcp(_)))
        && request.uri().path() != "/metrics"
    {
        return Reply::error(StatusCode::NOT_FOUND, "only /metrics is served here").into_response();
    }
    next.run(request).await
}

fn mode(audit: bool) -> v1::Mode {
    if audit {
        v1::Mode::Audit
    } else {
        v1::Mode::Enforce
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn policy(daemon: &Api) -> v1::Policy {
    let enforced = daemon.policy.load();
    v1::Policy {
        version: enforced.version(),
        hash: enforced.hash.clone(),
        file: enforced.name.clone(),
        mode: mode(enforced.policy.mode == crate::policy::Mode::Audit),
        since: rfc3339(enforced.since),
        text: enforced.text.clone(),
    }
}

fn workloads(daemon: &Api) -> Vec<v1::Workload> {
    daemon
        .registrar
        .workloads()
        .into_iter()
        .map(|w| v1::Workload {
            pid: w.pid,
            exe: w.exe,
            sha256: w.sha256,
            cgroup: w.cgroup,
            cgroup_id: w.cgroup_id,
            uid: w.uid,
            spiffe_id: w.spiffe_id,
            entry: w.entry,
            state: w.state.to_owned(),
            reason: w.reason,
            listening: w.listening,
            container_id: w.container.container_id,
            pod_uid: w.container.pod_uid,
            netns: w.netns,
        })
        .collect()
}

async fn reload(reloader: &Arc<Reloader>, file: String, body: Bytes, dry_run: bool) -> Reply {
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            format!("{file}: the policy is not UTF-8"),
        );
    };
    let version = reloader.publisher.load().version();
    let reloader = Arc::clone(reloader);
    let result = tokio::task::spawn_blocking(move || reloader.reload(&file, &text, dry_run)).await;
    match result {
        Ok(Ok(outcome)) => Reply::json(reload_outcome(outcome)),
        Ok(Err(ReloadError::Invalid(diagnostics))) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            Reply::json_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                v1::Refusal {
                    error: format!(
                        "invalid policy; version {version} stays in force\n{}",
                        lines.join("\n")
                    ),
                    diagnostics: lines,
                },
            )
        }
        Ok(Err(error)) => Reply::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}; version {version} stays in force",
                crate::report::report(&error)
            ),
        ),
        Err(error) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, error),
    }
}

fn reload_outcome(outcome: Outcome) -> v1::ReloadOutcome {
    v1::ReloadOutcome {
        applied: outcome.applied,
        previous_version: outcome.previous_version,
        version: outcome.version,
        hash: outcome.hash,
        changes: outcome.changes,
        warnings: outcome.warnings,
        missing_cgroups: outcome.missing_cgroups,
        closed: outcome.closed,
    }
}

async fn flows(State(daemon): ApiState, Query(query): Query<v1::FlowsQuery>) -> Reply {
    let v1::FlowsQuery {
        verdict,
        id,
        limit,
        follow,
    } = query;
    let limit = limit.unwrap_or(DEFAULT_FLOWS);
    let filter = Filter { verdict, id };
    let line = |record: &RecentRecord| {
        let mut line = Vec::with_capacity(record.line().len() + 1);
        line.extend_from_slice(record.line().as_bytes());
        line.push(b'\n');
        Bytes::from(line)
    };
    // A follower subscribes before taking the backlog, so no record falls between the two
    // (records in both are sent once: the stream skips what the backlog had).
    let subscription = follow.then(|| daemon.audit.subscribe());
    let audit = daemon.audit.clone();
    let wanted = filter.clone();
    let backlog = match tokio::task::spawn_blocking(move || audit.backlog(&wanted, limit)).await {
        Ok(backlog) => backlog,
        Err(error) => {
            return Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the audit records failed: {error}"),
            );
        }
    };
    let note = backlog.unavailable.map(|unavailable| {
        let mut note = serde_json::to_vec(&v1::Unavailable {
            unavailable_before: unavailable.before,
            reason: unavailable.reason,
        })
        .unwrap_or_default();
        note.push(b'\n');
        Bytes::from(note)
    });
    let lines_of_backlog: Vec<Bytes> = note
        .into_iter()
        .chain(backlog.records.iter().map(|r| line(r)))
        .collect();
    let Some(mut subscription) = subscription else {
        let mut body = Vec::new();
        for chunk in lines_of_backlog {
            body.extend_from_slice(&chunk);
        }
        return Reply::Text {
            status: StatusCode::OK,
            content_type: "application/x-ndjson",
            body: String::from_utf8(body).unwrap_or_default(),
        };
    };
    let last_seq = backlog.last_seq;
    let (sender, lines) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        for chunk in lines_of_backlog {
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
        loop {
            match subscription.recv().await {
                Ok(record) if record.seq() > last_seq && record.matches(&filter) => {
                    if sender.send(line(&record)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    let note = v1::Lagged {
                        lagged: missed,
                        note: "the follower fell behind; records were skipped here, the audit log has them all".to_owned(),
                    };
                    let mut note = serde_json::to_vec(&note).unwrap_or_default();
                    note.push(b'\n');
                    if sender.send(Bytes::from(note)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Reply::Stream {
        content_type: "application/x-ndjson",
        lines,
    }
}

async fn svid(State(daemon): ApiState, Query(query): Query<v1::SvidQuery>) -> Reply {
    let Some(id) = query.id else {
        return Reply::error(StatusCode::BAD_REQUEST, "missing ?id=SPIFFE_ID");
    };
    let id: SpiffeId = match id.parse() {
        Ok(id) => id,
        Err(error) => return Reply::error(StatusCode::BAD_REQUEST, format!("{id:?}: {error}")),
    };
    let local = daemon
        .registrar
        .workloads()
        .iter()
        .any(|w| w.spiffe_id.as_ref() == Some(&id));
    if !local {
        return Reply::error(
            StatusCode::NOT_FOUND,
            format!(
                "no process on this node holds {id}; SVIDs are issued only to attested local workloads"
            ),
        );
    }
    match daemon.svids.get(&id) {
        Ok(svid) => Reply::json(v1::Svid {
            not_before: rfc3339(svid.not_before()),
            not_after: rfc3339(svid.not_after()),
            expires_in_s: expires_in(svid.not_after()),
            chain_pem: svid.chain_pem(),
            spiffe_id: id,
        }),
        Err(error) => Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            crate::report::report(&error),
        ),
    }
}

fn expires_in(not_after: SystemTime) -> u64 {
    not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn kernel_counters(daemon: &Api) -> Vec<(&'static str, u64)> {
    let maps = daemon.maps.lock().unwrap_or_else(PoisonError::into_inner);
    Counter::ALL
        .iter()
        .map(|&counter| (counter.name(), maps.counter(counter).unwrap_or(0)))
        .collect()
}

/// Every program the daemon attached, and to what.
fn attachments(daemon: &Api, scope: &str) -> Vec<v1::Attachment> {
    let lsm = daemon.node.refuses_packet_sockets.then_some(&LSM.0);
    PROGRAMS
        .iter()
        .chain(lsm)
        .map(|program| {
            let attached_to = if TRACEPOINTS.iter().any(|(name, _)| name == program) {
                "btf tracepoint".to_owned()
            } else if *program == enforcer_ebpf::program_names::SK_LOOKUP {
                "the daemon's network namespace".to_owned()
            } else if *program == LSM.0 {
                format!("lsm {}", LSM.1)
            } else {
                format!("cgroup {scope}")
            };
            v1::Attachment {
                program: (*program).to_owned(),
                attached_to,
            }
        })
        .collect()
}

fn status(daemon: &Api) -> v1::Status {
    let enforced = daemon.policy.load();
    let (slot, meta) = {
        let maps = daemon.maps.lock().unwrap_or_else(PoisonError::into_inner);
        (maps.active_slot().ok(), maps.active_policy().ok())
    };
    let scope = daemon.node.scope.display().to_string();
    let attachments = attachments(daemon, &scope);
    let workloads = daemon.registrar.workloads();
    let mut svids: Vec<v1::SvidSummary> = daemon
        .svids
        .current()
        .iter()
        .map(|svid| v1::SvidSummary {
            spiffe_id: svid.spiffe_id().clone(),
            not_after: rfc3339(svid.not_after()),
            expires_in_s: expires_in(svid.not_after()),
        })
        .collect();
    svids.sort_by(|a, b| a.spiffe_id.as_ref().cmp(b.spiffe_id.as_ref()));
    let kernel: std::collections::BTreeMap<String, u64> = kernel_counters(daemon)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let lost_events = kernel
        .get(Counter::LostEvents.name())
        .copied()
        .unwrap_or_default();
    let tunnel_metrics = daemon.tunnel.metrics();
    let tunnel = Metric::ALL
        .iter()
        .map(|&m| (m.name().to_owned(), tunnel_metrics.get(m)))
        .collect();
    let audit = daemon.audit.stats();
    v1::Status {
        node: daemon.node.config.node_name.clone(),
        node_id: daemon.node.node_id.clone(),
        trust_domain: daemon.node.trust_domain.to_string(),
        pid: std::process::id(),
        started: rfc3339(daemon.node.started),
        uptime_s: SystemTime::now()
            .duration_since(daemon.node.started)
            .unwrap_or_default()
            .as_secs(),
        mode: mode(meta.is_some_and(|m| m.mode == PolicyMeta::MODE_AUDIT)),
        policy: v1::StatusPolicy {
            version: enforced.version(),
            kernel_version: meta.map(|m| m.version),
            kernel_slot: slot,
            hash: enforced.hash.clone(),
            file: enforced.name.clone(),
            since: rfc3339(enforced.since),
        },
        datapath: v1::Datapath {
            pin_dir: daemon.node.config.kernel.pin_dir.display().to_string(),
            scope_cgroup: scope,
            cgroup2_mount: daemon.node.mount.display().to_string(),
            adopted: daemon.node.adopted,
            refuses_packet_sockets: daemon.node.refuses_packet_sockets,
            same_node_direct: daemon.node.same_node_direct,
            attachments,
        },
        listeners: v1::Listeners {
            outbound: daemon.node.outbound.clone(),
            inbound: daemon.node.inbound,
            control: daemon.node.config.control_socket.display().to_string(),
            metrics: daemon.node.config.metrics_addr,
            namespaces: daemon
                .namespaces
                .served()
                .into_iter()
                .map(|(inode, cookie)| v1::ServedNamespace { inode, cookie })
                .collect(),
            workload_api: daemon
                .workload_figures
                .as_ref()
                .map(|figures| v1::WorkloadApiStatus {
                    socket: daemon.node.config.workload_api.socket.display().to_string(),
                    streams: figures.limits.open_streams(),
                }),
        },
        workloads: v1::WorkloadCount {
            processes: workloads.len(),
            with_identity: workloads.iter().filter(|w| w.spiffe_id.is_some()).count(),
        },
        svids,
        open_flows: daemon.tunnel.open_flows(),
        counters: v1::Counters { kernel, tunnel },
        lost: v1::Lost {
            kernel_events: lost_events,
            audit_records: audit.dropped,
        },
        audit,
    }
}

/// What one scrape of `/metrics` reports, read from the daemon's handles when it is asked for
/// (the daemon's own counters are read as they are encoded).
#[derive(Debug)]
struct Scrape {
    /// The kernel datapath's counters, by name.
    kernel: Vec<(&'static str, u64)>,
    /// The tunnel's counters.
    tunnel: Vec<(Metric, u64)>,
    /// The tunnel's dial latencies.
    handshake: Histogram,
    /// The tunnel's accept-to-route latencies.
    outbound_decision: Histogram,
    /// Flows open now.
    open_flows: usize,
    /// SVIDs held now.
    svids: usize,
    /// Version of the policy in force.
    policy_version: u64,
    /// The audit log's counters.
    audit: AuditStats,
    /// The daemon's own counters and histograms.
    telemetry: Arc<Telemetry>,
    /// The Workload API's counters and limits, when it is served.
    workload_api: Option<ApiFigures>,
}

impl Scrape {
    fn read(daemon: &Api) -> Self {
        let tunnel = daemon.tunnel.metrics();
        Self {
            kernel: kernel_counters(daemon),
            tunnel: tunnel.snapshot(),
            handshake: tunnel.handshake.clone(),
            outbound_decision: tunnel.outbound_decision.clone(),
            open_flows: daemon.tunnel.open_flows(),
            svids: daemon.svids.len(),
            policy_version: daemon.policy.load().version(),
            audit: daemon.audit.stats(),
            telemetry: Arc::clone(&daemon.telemetry),
            workload_api: daemon.workload_figures.clone(),
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let families = &mut out;
        metrics::labelled_counters(
            families,
            "enforcer_kernel_events_total",
            "Kernel datapath counters (per-CPU, summed): connects, redirects, denies, drops, lost events...",
            self.kernel
                .iter()
                .map(|&(name, value)| ([("counter", name)], value)),
        )?;
        for &(metric, value) in &self.tunnel {
            metrics::counter(
                families,
                &format!("enforcer_{}", metric.name()),
                "Tunnel counter (see the README's metrics table).",
                value,
            )?;
        }
        metrics::histogram(
            families,
            "enforcer_tunnel_handshake_seconds",
            "Time to dial a peer node: TCP, TLS 1.3 and HTTP/2 handshakes.",
            &self.handshake,
        )?;
        metrics::histogram(
            families,
            "enforcer_tunnel_outbound_decision_seconds",
            "Time from accepting a redirected connection to its route (redirect record, attestation, owner).",
            &self.outbound_decision,
        )?;
        metrics::gauge(
            families,
            "enforcer_tunnel_open_flows",
            "Flows open now.",
            u64::try_from(self.open_flows).unwrap_or(u64::MAX),
        )?;
        metrics::gauge(
            families,
            "enforcer_svids_held",
            "SVIDs held now.",
            u64::try_from(self.svids).unwrap_or(u64::MAX),
        )?;
        metrics::gauge(
            families,
            "enforcer_policy_version",
            "Version of the policy in force.",
            self.policy_version,
        )?;
        metrics::counter(
            families,
            "enforcer_audit_records_total",
            "Records written to the audit log.",
            self.audit.written,
        )?;
        metrics::counter(
            families,
            "enforcer_audit_dropped_total",
            "Audit records dropped because the writer queue was full (each drop is itself recorded as a loss).",
            self.audit.dropped,
        )?;
        if let Some(api) = &self.workload_api {
            api.counters.encode(families, api.limits.open_streams())?;
        }
        self.telemetry.encode(out)
    }
}

#[cfg(test)]
mod tests {
    //! The v1 replies keep the JSON field names the routes had when they were built with
    //! `json!`: the key sets below were taken from those `json!` literals (and, for the types
    //! that still serialize themselves, from those types).
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    /// A scrape with every family and every verdict sample present.
    fn full_scrape() -> Scrape {
        let telemetry = Telemetry::default();
        for source in crate::audit::Source::ALL {
            for verdict in crate::audit::Verdict::ALL {
                telemetry.verdict(source, verdict);
            }
        }
        let tunnel = crate::tunnel::Metrics::default();
        Scrape {
            kernel: Counter::ALL.iter().map(|c| (c.name(), 1)).collect(),
            tunnel: tunnel.snapshot(),
            handshake: Histogram::default(),
            outbound_decision: Histogram::default(),
            open_flows: 1,
            svids: 1,
            policy_version: 1,
            audit: audit_stats(),
            telemetry: Arc::new(telemetry),
            // Its families are newer than the fixture; `workload_api::metrics` tests them.
            workload_api: None,
        }
    }

    /// Every sample of an exposition as (sample name, label names, family type, family help).
    fn samples(text: &str) -> BTreeSet<(String, Vec<String>, String, String)> {
        let (mut kind, mut help) = (String::new(), String::new());
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help = rest.split_once(' ').unwrap().1.to_owned();
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                kind = rest.split_once(' ').unwrap().1.to_owned();
            } else if !line.starts_with('#') {
                let series = line.rsplit_once(' ').unwrap().0;
                let (name, labels) = series.split_once('{').unwrap_or((series, ""));
                let labels = labels
                    .split(',')
                    .filter_map(|label| Some(label.split_once('=')?.0.to_owned()))
                    .collect();
                samples.insert((name.to_owned(), labels, kind.clone(), help.clone()));
            }
        }
        samples
    }

    /// The `OpenMetrics` exposition has the samples, labels, types and help texts the text format
    /// 0.0.4 writer this replaced had (the fixture was rendered by that writer from the same
    /// scrape).
    #[test]
    fn metrics_keep_the_families_of_the_text_format_writer() {
        let fixture = include_str!("testdata/metrics-text-0.0.4.prom");
        let text = metrics::exposition(full_scrape());
        assert!(text.ends_with("# EOF\n"), "{text}");
        let expected = samples(fixture);
        assert!(
            expected
                .iter()
                .any(|(name, labels, _, _)| name == "enforcer_verdicts_total"
                    && labels == &["source", "verdict"]),
            "the fixture parses"
        );
        assert_eq!(samples(&text), expected, "{text}");
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
        names.iter().copied().collect()
    }

    fn id() -> SpiffeId {
        "spiffe://example.org/ns/web".parse().unwrap()
    }

    fn audit_stats() -> AuditStats {
        AuditStats {
            written: 1,
            dropped: 0,
            rotations: 0,
            write_errors: 0,
            path: "/var/lib/enforcer/audit/audit.jsonl".into(),
            last_seq: 1,
        }
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one literal with every field of the status"
    )]
    fn status_has_the_keys_of_the_json_literal() {
        let audit = audit_stats();
        let status = v1::Status {
            node: "n".to_owned(),
            node_id: id(),
            trust_domain: "example.org".to_owned(),
            pid: 1,
            started: String::new(),
            uptime_s: 0,
            mode: v1::Mode::Enforce,
            policy: v1::StatusPolicy {
                version: 1,
                kernel_version: None,
                kernel_slot: None,
                hash: String::new(),
                file: String::new(),
                since: String::new(),
            },
            datapath: v1::Datapath {
                pin_dir: String::new(),
                scope_cgroup: String::new(),
                cgroup2_mount: String::new(),
                adopted: false,
                refuses_packet_sockets: true,
                same_node_direct: true,
                attachments: vec![v1::Attachment {
                    program: "connect4".to_owned(),
                    attached_to: String::new(),
                }],
            },
            listeners: v1::Listeners {
                outbound: Vec::new(),
                inbound: "0.0.0.0:15008".parse().unwrap(),
                control: String::new(),
                metrics: None,
                namespaces: Vec::new(),
                workload_api: Some(v1::WorkloadApiStatus {
                    socket: "/run/enforcer/public/api.sock".to_owned(),
                    streams: 0,
                }),
            },
            workloads: v1::WorkloadCount {
                processes: 0,
                with_identity: 0,
            },
            svids: vec![v1::SvidSummary {
                spiffe_id: id(),
                not_after: String::new(),
                expires_in_s: 0,
            }],
            open_flows: 0,
            counters: v1::Counters {
                kernel: [("lost_events".to_owned(), 0)].into(),
                tunnel: [("tunnel_bytes_up_total".to_owned(), 0)].into(),
            },
            lost: v1::Lost {
                kernel_events: 0,
                audit_records: 0,
            },
            audit: audit.clone(),
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(
            keys(&value),
            set(&[
                "node",
                "node_id",
                "trust_domain",
                "pid",
                "started",
                "uptime_s",
                "mode",
                "policy",
                "datapath",
                "listeners",
                "workloads",
                "svids",
                "open_flows",
                "counters",
                "lost",
                "audit"
            ])
        );
        assert_eq!(value["node_id"], "spiffe://example.org/ns/web");
        assert_eq!(value["mode"], "enforce");
        assert_eq!(
            keys(&value["policy"]),
            set(&[
                "version",
                "kernel_version",
                "kernel_slot",
                "hash",
                "file",
                "since"
            ])
        );
        assert_eq!(
            keys(&value["datapath"]),
            set(&[
                "pin_dir",
                "scope_cgroup",
                "cgroup2_mount",
                "adopted",
                "refuses_packet_sockets",
                "same_node_direct",
                "attachments"
            ])
        );
        assert_eq!(
            keys(&value["datapath"]["attachments"][0]),
            set(&["program", "attached_to"])
        );
        assert_eq!(
            keys(&value["listeners"]),
            set(&[
                "outbound",
                "inbound",
                "control",
                "metrics",
                "namespaces",
                "workload_api"
            ])
        );
        assert_eq!(
            keys(&value["workloads"]),
            set(&["processes", "with_identity"])
        );
        assert_eq!(
            keys(&value["svids"][0]),
            set(&["spiffe_id", "not_after", "expires_in_s"])
        );
        assert_eq!(keys(&value["counters"]), set(&["kernel", "tunnel"]));
        assert_eq!(
            keys(&value["lost"]),
            set(&["kernel_events", "audit_records"])
        );
        assert_eq!(value["audit"], serde_json::to_value(&audit).unwrap());
    }

    #[test]
    fn policy_svid_error_and_lagged_have_the_keys_of_the_json_literals() {
        let policy = v1::Policy {
            version: 1,
            hash: String::new(),
            file: String::new(),
            mode: v1::Mode::Audit,
            since: String::new(),
            text: String::new(),
        };
        let value = serde_json::to_value(&policy).unwrap();
        assert_eq!(
            keys(&value),
            set(&["version", "hash", "file", "mode", "since", "text"])
        );
        assert_eq!(value["mode"], "audit");
        let svid = v1::Svid {
            spiffe_id: id(),
            not_before: String::new(),
            not_after: String::new(),
            expires_in_s: 0,
            chain_pem: String::new(),
        };
        assert_eq!(
            keys(&serde_json::to_value(&svid).unwrap()),
            set(&[
                "spiffe_id",
                "not_before",
                "not_after",
                "expires_in_s",
                "chain_pem"
            ])
        );
        let error = v1::ErrorBody {
            error: String::new(),
        };
        assert_eq!(
            keys(&serde_json::to_value(&error).unwrap()),
            set(&["error"])
        );
        let refusal = v1::Refusal {
            error: String::new(),
            diagnostics: Vec::new(),
        };
        assert_eq!(
            keys(&serde_json::to_value(&refusal).unwrap()),
            set(&["error", "diagnostics"])
        );
        let lagged = v1::Lagged {
            lagged: 1,
            note: String::new(),
        };
        assert_eq!(
            keys(&serde_json::to_value(&lagged).unwrap()),
            set(&["lagged", "note"])
        );
    }

    #[test]
    fn reload_outcome_has_the_keys_of_the_daemons_outcome() {
        let outcome = super::super::reload::Outcome {
            applied: true,
            previous_version: 1,
            version: 2,
            hash: String::new(),
            changes: Vec::new(),
            warnings: Vec::new(),
            missing_cgroups: Vec::new(),
            closed: 0,
        };
        let before = serde_json::to_value(&outcome).unwrap();
        assert_eq!(
            serde_json::to_value(reload_outcome(outcome)).unwrap(),
            before
        );
    }

    #[test]
    fn workload_has_the_keys_the_table_serialized_with() {
        let workload = v1::Workload {
            pid: 1,
            exe: String::new(),
            sha256: String::new(),
            cgroup: String::new(),
            cgroup_id: None,
            uid: 0,
            spiffe_id: Some(id()),
            entry: Some(1),
            state: "matched".to_owned(),
            reason: None,
            listening: Vec::new(),
            container_id: None,
            pod_uid: None,
            netns: 4_026_531_840,
        };
        let value = serde_json::to_value(&workload).unwrap();
        assert_eq!(
            keys(&value),
            set(&[
                "pid",
                "exe",
                "sha256",
                "cgroup",
                "cgroup_id",
                "uid",
                "spiffe_id",
                "entry",
                "state",
                "reason",
                "listening",
                "container_id",
                "pod_uid",
                "netns"
            ])
        );
        assert_eq!(value["spiffe_id"], "spiffe://example.org/ns/web");
        let unmatched = v1::Workload {
            spiffe_id: None,
            ..workload
        };
        assert_eq!(
            serde_json::to_value(&unmatched).unwrap()["spiffe_id"],
            Value::Null
        );
    }
}

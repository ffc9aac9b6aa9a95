//! The control API's routes (HTTP + JSON on the root-only Unix socket; `/metrics` also on
//! the metrics TCP address):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/status` | attachments, policy version and hash, mode, workloads, SVIDs, counters, losses |
//! | `GET /v1/policy` | the policy in force: version, hash, file, text |
//! | `POST /v1/policy?file=NAME[&dry_run=true]` | reload from the body (diagnostics name `NAME`) |
//! | `GET /v1/workloads` | registered processes: pid, exe, sha256, cgroup, SPIFFE ID, entry |
//! | `GET /v1/flows[?verdict=V][&id=ID][&limit=N][&follow=true]` | audit records, JSON lines |
//! | `GET /v1/svid?id=ID` | the current SVID of a local workload identity |
//! | `GET /metrics` | Prometheus text |
#![forbid(unsafe_code)]

use std::{
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{
    Svids, node::NodeFacts, reload::ReloadError, reload::Reloader, telemetry::Telemetry,
    workloads::Registrar,
};
use crate::{
    audit::{AuditLog, AuditRecord, Verdict},
    control::{Handler, Peer, Reply, Request},
    identity::SpiffeId,
    kernel::{
        Counter, Maps, PolicyMeta,
        loader::{LSM, PROGRAMS, TRACEPOINTS},
    },
    metrics::Exposition,
    policy::PolicySnapshot,
    tunnel::{Metric, Tunnel},
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
}

impl Handler for Api {
    async fn handle(&self, request: Request) -> Reply {
        let query = |key: &str| {
            request
                .query
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if matches!(request.peer, Peer::Tcp(_)) && request.path != "/metrics" {
            return Reply::error(StatusCode::NOT_FOUND, "only /metrics is served here");
        }
        let daemon = self;
        match (&request.method, request.path.as_str()) {
            (&Method::GET, "/metrics") => Reply::Text {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4",
                body: metrics(daemon),
            },
            (&Method::GET, "/v1/status") => Reply::json(status(daemon)),
            (&Method::GET, "/v1/policy") => {
                let enforced = daemon.policy.load();
                Reply::json(json!({
                    "version": enforced.version(),
                    "hash": enforced.hash,
                    "file": enforced.name,
                    "mode": mode_name(enforced.policy.mode == crate::policy::Mode::Audit),
                    "since": humantime::format_rfc3339_seconds(enforced.since).to_string(),
                    "text": enforced.text,
                }))
            }
            (&Method::POST, "/v1/policy") => {
                let file = query("file").unwrap_or("<request>").to_owned();
                let dry_run = query("dry_run").is_some_and(|v| v == "true" || v == "1");
                reload(&daemon.reloader, file, request.body.clone(), dry_run).await
            }
            (&Method::GET, "/v1/workloads") => Reply::json(daemon.registrar.workloads()),
            (&Method::GET, "/v1/flows") => flows(
                daemon,
                query("verdict"),
                query("id"),
                query("limit"),
                query("follow"),
            ),
            (&Method::GET, "/v1/svid") => match query("id") {
                Some(id) => svid(daemon, id),
                None => Reply::error(StatusCode::BAD_REQUEST, "missing ?id=SPIFFE_ID"),
            },
            (_, path) => Reply::error(
                StatusCode::NOT_FOUND,
                format!("no route {} {path}", request.method),
            ),
        }
    }
}

fn mode_name(audit: bool) -> &'static str {
    if audit { "audit" } else { "enforce" }
}

async fn reload(reloader: &Arc<Reloader>, file: String, body: Bytes, dry_run: bool) -> Reply {
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            format!("{file}: the policy is not UTF-8"),
        );
    };
    let version = reloader.policy.load().version();
    let reloader = Arc::clone(reloader);
    let result = tokio::task::spawn_blocking(move || reloader.reload(&file, &text, dry_run)).await;
    match result {
        Ok(Ok(outcome)) => Reply::json(outcome),
        Ok(Err(ReloadError::Invalid(diagnostics))) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            Reply::Json {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: json!({
                    "error": format!(
                        "invalid policy; version {} stays in force\n{}",
                        version,
                        lines.join("\n")
                    ),
                    "diagnostics": lines,
                }),
            }
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

fn flows(
    daemon: &Api,
    verdict: Option<&str>,
    id: Option<&str>,
    limit: Option<&str>,
    follow: Option<&str>,
) -> Reply {
    let verdict = match verdict.map(Verdict::from_str).transpose() {
        Ok(verdict) => verdict,
        Err(error) => return Reply::error(StatusCode::BAD_REQUEST, error),
    };
    let limit = match limit.map(str::parse::<usize>).transpose() {
        Ok(limit) => limit.unwrap_or(DEFAULT_FLOWS),
        Err(error) => return Reply::error(StatusCode::BAD_REQUEST, format!("bad limit: {error}")),
    };
    let id = id.map(str::to_owned);
    let keep = move |record: &AuditRecord| record.matches(verdict, id.as_deref());
    let line = |record: &AuditRecord| {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    };
    let follow = follow.is_some_and(|v| v == "true" || v == "1");
    // A follower subscribes before taking the backlog, so no record falls between the two
    // (records in both are sent once: the stream skips what the backlog had).
    let subscription = follow.then(|| daemon.audit.subscribe());
    let recent: Vec<Arc<AuditRecord>> = daemon.audit.recent();
    let matching: Vec<&Arc<AuditRecord>> = recent.iter().filter(|r| keep(r)).collect();
    let start = matching.len().saturating_sub(limit);
    let backlog: Vec<Bytes> = matching[start..].iter().map(|r| line(r)).collect();
    let Some(mut subscription) = subscription else {
        let mut body = Vec::new();
        for chunk in backlog {
            body.extend_from_slice(&chunk);
        }
        return Reply::Text {
            status: StatusCode::OK,
            content_type: "application/x-ndjson",
            body: String::from_utf8(body).unwrap_or_default(),
        };
    };
    let last_seq = recent.last().map_or(0, |r| r.seq);
    let (sender, lines) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        for chunk in backlog {
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
        loop {
            match subscription.recv().await {
                Ok(record) if record.seq > last_seq && keep(&record) => {
                    if sender.send(line(&record)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    let note = json!({"lagged": missed, "note": "the follower fell behind; records were skipped here, the audit log has them all"});
                    if sender.send(Bytes::from(format!("{note}\n"))).await.is_err() {
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

fn svid(daemon: &Api, id: &str) -> Reply {
    let id: SpiffeId = match id.parse() {
        Ok(id) => id,
        Err(error) => return Reply::error(StatusCode::BAD_REQUEST, format!("{id:?}: {error}")),
    };
    let local = daemon
        .registrar
        .workloads()
        .iter()
        .any(|w| w.spiffe_id.as_deref() == Some(id.as_ref()));
    if !local {
        return Reply::error(
            StatusCode::NOT_FOUND,
            format!(
                "no process on this node holds {id}; SVIDs are issued only to attested local workloads"
            ),
        );
    }
    match daemon.svids.get(&id) {
        Ok(svid) => Reply::json(json!({
            "spiffe_id": id.to_string(),
            "not_before": humantime::format_rfc3339_seconds(svid.not_before()).to_string(),
            "not_after": humantime::format_rfc3339_seconds(svid.not_after()).to_string(),
            "expires_in_s": expires_in(svid.not_after()),
            "chain_pem": svid.chain_pem(),
        })),
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

fn status(daemon: &Api) -> Value {
    let enforced = daemon.policy.load();
    let (slot, meta) = {
        let maps = daemon.maps.lock().unwrap_or_else(PoisonError::into_inner);
        (maps.active_slot().ok(), maps.active_policy().ok())
    };
    let scope = daemon.node.scope.display().to_string();
    let lsm = daemon.node.refuses_packet_sockets.then_some(&LSM.0);
    let attachments: Vec<Value> = PROGRAMS
        .iter()
        .chain(lsm)
        .map(|program| {
            let target = if TRACEPOINTS.iter().any(|(name, _)| name == program) {
                "btf tracepoint".to_owned()
            } else if *program == enforcer_ebpf::program_names::SK_LOOKUP {
                "the daemon's network namespace".to_owned()
            } else if *program == LSM.0 {
                format!("lsm {}", LSM.1)
            } else {
                format!("cgroup {scope}")
            };
            json!({"program": program, "attached_to": target})
        })
        .collect();
    let workloads = daemon.registrar.workloads();
    let mut svids: Vec<Value> = daemon
        .svids
        .current()
        .iter()
        .map(|svid| {
            json!({
                "spiffe_id": svid.spiffe_id().to_string(),
                "not_after": humantime::format_rfc3339_seconds(svid.not_after()).to_string(),
                "expires_in_s": expires_in(svid.not_after()),
            })
        })
        .collect();
    svids.sort_by(|a, b| a["spiffe_id"].as_str().cmp(&b["spiffe_id"].as_str()));
    let kernel_counters = kernel_counters(daemon);
    let lost_events = kernel_counters
        .iter()
        .find(|(name, _)| *name == Counter::LostEvents.name())
        .map_or(0, |&(_, value)| value);
    let kernel: serde_json::Map<String, Value> = kernel_counters
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.into()))
        .collect();
    let tunnel_metrics = daemon.tunnel.metrics();
    let tunnel: serde_json::Map<String, Value> = Metric::ALL
        .iter()
        .map(|&m| (m.name().to_owned(), tunnel_metrics.get(m).into()))
        .collect();
    let audit = daemon.audit.stats();
    json!({
        "node": daemon.node.config.node_name,
        "node_id": daemon.node.node_id.to_string(),
        "trust_domain": daemon.node.trust_domain.to_string(),
        "pid": std::process::id(),
        "started": humantime::format_rfc3339_seconds(daemon.node.started).to_string(),
        "uptime_s": SystemTime::now().duration_since(daemon.node.started).unwrap_or_default().as_secs(),
        "mode": mode_name(meta.is_some_and(|m| m.mode == PolicyMeta::MODE_AUDIT)),
        "policy": {
            "version": enforced.version(),
            "kernel_version": meta.map(|m| m.version),
            "kernel_slot": slot,
            "hash": enforced.hash,
            "file": enforced.name,
            "since": humantime::format_rfc3339_seconds(enforced.since).to_string(),
        },
        "datapath": {
            "pin_dir": daemon.node.config.kernel.pin_dir.display().to_string(),
            "scope_cgroup": scope,
            "cgroup2_mount": daemon.node.mount.display().to_string(),
            "adopted": daemon.node.adopted,
            "refuses_packet_sockets": daemon.node.refuses_packet_sockets,
            "attachments": attachments,
        },
        "listeners": {
            "outbound": daemon.node.outbound,
            "inbound": daemon.node.inbound,
            "control": daemon.node.config.control_socket.display().to_string(),
            "metrics": daemon.node.config.metrics_addr,
        },
        "workloads": {
            "processes": workloads.len(),
            "with_identity": workloads.iter().filter(|w| w.spiffe_id.is_some()).count(),
        },
        "svids": svids,
        "open_flows": daemon.tunnel.open_flows(),
        "counters": { "kernel": kernel, "tunnel": tunnel },
        "lost": {
            "kernel_events": lost_events,
            "audit_records": audit.dropped,
        },
        "audit": audit,
    })
}

fn metrics(daemon: &Api) -> String {
    let mut out = Exposition::default();
    out.family(
        "enforcer_kernel_events_total",
        crate::metrics::Kind::Counter,
        "Kernel datapath counters (per-CPU, summed): connects, redirects, denies, drops, lost events...",
    );
    for (name, value) in kernel_counters(daemon) {
        out.sample("enforcer_kernel_events_total", &[("counter", name)], value);
    }
    let tunnel = daemon.tunnel.metrics();
    for metric in Metric::ALL {
        out.counter(
            &format!("enforcer_{}", metric.name()),
            "Tunnel counter (see the README's metrics table).",
            tunnel.get(metric),
        );
    }
    out.histogram(
        "enforcer_tunnel_handshake_seconds",
        "Time to dial a peer node: TCP, TLS 1.3 and HTTP/2 handshakes.",
        &tunnel.handshake,
    )
    .histogram(
        "enforcer_tunnel_outbound_decision_seconds",
        "Time from accepting a redirected connection to its route (redirect record, attestation, owner).",
        &tunnel.outbound_decision,
    )
    .gauge(
        "enforcer_tunnel_open_flows",
        "Flows open now.",
        u64::try_from(daemon.tunnel.open_flows()).unwrap_or(u64::MAX),
    )
    .gauge(
        "enforcer_svids_held",
        "SVIDs held now.",
        u64::try_from(daemon.svids.len()).unwrap_or(u64::MAX),
    )
    .gauge(
        "enforcer_policy_version",
        "Version of the policy in force.",
        daemon.policy.load().version(),
    );
    let audit = daemon.audit.stats();
    out.counter(
        "enforcer_audit_records_total",
        "Records written to the audit log.",
        audit.written,
    )
    .counter(
        "enforcer_audit_dropped_total",
        "Audit records dropped because the writer queue was full (each drop is itself recorded as a loss).",
        audit.dropped,
    );
    daemon.telemetry.export(&mut out);
    out.finish()
}

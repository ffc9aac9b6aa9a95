//! The CLI commands that talk to a running daemon over its control socket: `status`,
//! `policy reload|show`, `workloads`, `flows` and `svid show`.

use std::{fmt::Write as _, io::Write as _, net::SocketAddr, path::Path, process::ExitCode};

use anyhow::Context as _;
use bytes::Bytes;

use crate::{
    audit::{AuditRecord, Verdict},
    control::{ClientError, ControlClient, v1},
    identity::SpiffeId,
};

/// Run `work` with a client of `socket` on a single-threaded runtime.
fn with_client<T>(
    socket: &Path,
    work: impl AsyncFnOnce(&ControlClient) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let client = ControlClient::new(socket);
    runtime.block_on(work(&client))
}

/// `enforcer status [--json]`.
pub(super) fn status(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let status: v1::Status = with_client(socket, async |client| {
        Ok(client.get("/v1/status").await?.json()?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human form of a status reply.
fn render_status(status: &v1::Status) -> String {
    let (policy, datapath, listeners) = (&status.policy, &status.datapath, &status.listeners);
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "node {} ({}), pid {}, up {}s",
        status.node, status.node_id, status.pid, status.uptime_s
    ));
    line(format!(
        "policy v{} mode {} sha256 {} from {}",
        policy.version,
        mode_name(status.mode),
        policy.hash.get(..16).unwrap_or_default(),
        policy.file
    ));
    line(format!(
        "datapath {} in {}{}",
        datapath.scope_cgroup,
        datapath.pin_dir,
        if datapath.adopted {
            " (adopted from a previous run)"
        } else {
            ""
        }
    ));
    line(format!(
        "packet sockets of enrolled processes: {}",
        if datapath.refuses_packet_sockets {
            "refused (BPF LSM)"
        } else {
            "NOT refused (the kernel does not run the BPF LSM program)"
        }
    ));
    line(format!(
        "same-node flows: {}",
        if datapath.same_node_direct {
            "direct, authorized in the kernel"
        } else {
            "through the daemon"
        }
    ));
    for attachment in &datapath.attachments {
        line(format!(
            "  {:<14} {}",
            attachment.program, attachment.attached_to
        ));
    }
    let listed =
        |address: Option<SocketAddr>| address.map_or_else(|| "-".to_owned(), |a| a.to_string());
    line(format!(
        "listeners outbound {} inbound {} metrics {}; {} workload namespaces served",
        serde_json::to_string(&listeners.outbound).unwrap_or_default(),
        listeners.inbound,
        listed(listeners.metrics),
        listeners.namespaces.len()
    ));
    line(listeners.workload_api.as_ref().map_or_else(
        || "workload api off".to_owned(),
        |api| format!("workload api {} ({} streams open)", api.socket, api.streams),
    ));
    line(format!(
        "workloads {} processes, {} with an identity; {} open flows",
        status.workloads.processes, status.workloads.with_identity, status.open_flows
    ));
    for svid in &status.svids {
        line(format!(
            "  svid {} expires {} (in {}s)",
            svid.spiffe_id, svid.not_after, svid.expires_in_s
        ));
    }
    line(format!(
        "lost kernel events {}, dropped audit records {}",
        status.lost.kernel_events, status.lost.audit_records
    ));
    for (group, counters) in [
        ("kernel", &status.counters.kernel),
        ("tunnel", &status.counters.tunnel),
    ] {
        let nonzero: Vec<String> = counters
            .iter()
            .filter(|(_, value)| **value != 0)
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        line(format!("{group} counters: {}", nonzero.join(" ")));
    }
    out
}

fn mode_name(mode: v1::Mode) -> &'static str {
    match mode {
        v1::Mode::Enforce => "enforce",
        v1::Mode::Audit => "audit",
    }
}

/// `enforcer policy reload FILE [--dry-run]`.
pub(super) fn reload(socket: &Path, file: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
    let name = file.display().to_string();
    let query = v1::ReloadQuery {
        file: Some(name.clone()),
        dry_run,
    };
    let path = format!("/v1/policy?{}", serde_urlencoded::to_string(&query)?);
    let result = with_client(socket, async |client| {
        Ok(client.post(&path, Bytes::from(text)).await)
    })?;
    let outcome: v1::ReloadOutcome = match result {
        Ok(response) => response.json()?,
        Err(ClientError::Status { message, .. }) => {
            eprintln!("{message}");
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error.into()),
    };
    print!("{}", render_reload(&name, dry_run, &outcome));
    Ok(ExitCode::SUCCESS)
}

/// The human form of a reload's outcome.
fn render_reload(name: &str, dry_run: bool, outcome: &v1::ReloadOutcome) -> String {
    let mut lines: Vec<String> = outcome.warnings.clone();
    if dry_run {
        lines.push(format!(
            "dry run: {name} would become version {} ({} changes); nothing applied",
            outcome.version,
            outcome.changes.len()
        ));
    } else {
        lines.push(format!(
            "policy version {} in force (was {}), sha256 {}…: {} changes, {} open flows closed",
            outcome.version,
            outcome.previous_version,
            outcome.hash.get(..16).unwrap_or_default(),
            outcome.changes.len(),
            outcome.closed
        ));
    }
    lines.extend(outcome.changes.iter().map(|change| format!("  {change}")));
    lines.extend(
        outcome
            .missing_cgroups
            .iter()
            .map(|missing| format!("warning: enrolled cgroup {missing} does not exist yet")),
    );
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `enforcer policy show`.
pub(super) fn show(socket: &Path) -> anyhow::Result<ExitCode> {
    let policy: v1::Policy = with_client(socket, async |client| {
        Ok(client.get("/v1/policy").await?.json()?)
    })?;
    print!("{}", render_policy(&policy));
    Ok(ExitCode::SUCCESS)
}

/// The policy in force as `enforcer policy show` prints it: a header, then the text.
fn render_policy(policy: &v1::Policy) -> String {
    format!(
        "# version {} mode {} sha256 {}\n# from {} since {}\n{}",
        policy.version,
        mode_name(policy.mode),
        policy.hash,
        policy.file,
        policy.since,
        policy.text
    )
}

/// `enforcer workloads [--json]`.
pub(super) fn workloads(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let workloads: Vec<v1::Workload> = with_client(socket, async |client| {
        Ok(client.get("/v1/workloads").await?.json()?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&workloads)?);
    } else {
        print!("{}", render_workloads(&workloads));
    }
    Ok(ExitCode::SUCCESS)
}

/// The workloads as a table.
fn render_workloads(workloads: &[v1::Workload]) -> String {
    let width = |column: fn(&v1::Workload) -> &str, header: &str| {
        workloads
            .iter()
            .map(|w| column(w).chars().count())
            .chain([header.len()])
            .max()
            .unwrap_or_default()
    };
    let exe_width = width(|w| &w.exe, "EXE");
    let cgroup_width = width(|w| &w.cgroup, "CGROUP");
    let mut out = format!(
        "{:>7}  {:<exe_width$}  {:<12}  {:<cgroup_width$}  {:<12}  {:<5}  SPIFFE ID\n",
        "PID", "EXE", "SHA256", "CGROUP", "CONTAINER", "ENTRY"
    );
    for w in workloads {
        let identity = match (&w.spiffe_id, &w.reason) {
            (Some(id), _) => id.to_string(),
            (None, Some(reason)) => format!("({}: {reason})", w.state),
            (None, None) => format!("({})", w.state),
        };
        let container = w
            .container_id
            .as_deref()
            .map_or("-", |id| id.get(..12).unwrap_or(id));
        writeln!(
            out,
            "{:>7}  {:<exe_width$}  {:<12}  {:<cgroup_width$}  {container:<12}  {:<5}  {identity}",
            w.pid,
            w.exe,
            w.sha256.get(..12).unwrap_or_default(),
            w.cgroup,
            w.entry.map_or_else(|| "-".to_owned(), |e| e.to_string()),
        )
        .expect("writing to a String cannot fail");
    }
    out
}

/// What `enforcer flows` selects.
pub(super) struct FlowsQuery {
    /// Stream new records until interrupted.
    pub(super) follow: bool,
    /// Print JSON lines instead of the human form.
    pub(super) json: bool,
    /// Only this verdict.
    pub(super) verdict: Option<Verdict>,
    /// Only records naming this identity.
    pub(super) id: Option<SpiffeId>,
    /// At most this many past records.
    pub(super) limit: usize,
}

/// `enforcer flows [--follow] [--json] [--verdict V] [--id ID]`.
pub(super) fn flows(socket: &Path, query: &FlowsQuery) -> anyhow::Result<ExitCode> {
    let request = v1::FlowsQuery {
        verdict: query.verdict,
        id: query.id.as_ref().map(ToString::to_string),
        limit: Some(query.limit),
        follow: query.follow,
    };
    let path = format!("/v1/flows?{}", serde_urlencoded::to_string(&request)?);
    let json = query.json;
    let print = move |line: &str| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{line}")?;
        } else if let Ok(record) = serde_json::from_str::<AuditRecord>(line) {
            writeln!(out, "{record}")?;
        } else if let Ok(note) = serde_json::from_str::<v1::Unavailable>(line) {
            writeln!(out, "{}", render_unavailable(&note))?;
        } else {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(())
    };
    with_client(socket, async |client| {
        if query.follow {
            let mut lines = client.stream(&path).await?;
            while let Some(line) = lines.next_line().await? {
                print(&line)?;
            }
        } else {
            let response = client.get(&path).await?;
            for line in String::from_utf8_lossy(&response.body).lines() {
                print(line)?;
            }
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Where the records `flows` printed stop, and why, as one line above them.
fn render_unavailable(note: &v1::Unavailable) -> String {
    format!(
        "-- no records before seq {} shown: {}",
        note.unavailable_before, note.reason
    )
}

/// `enforcer svid show SPIFFE_ID`.
pub(super) fn svid_show(socket: &Path, id: &SpiffeId) -> anyhow::Result<ExitCode> {
    let query = v1::SvidQuery {
        id: Some(id.to_string()),
    };
    let path = format!("/v1/svid?{}", serde_urlencoded::to_string(&query)?);
    let svid: v1::Svid = with_client(socket, async |client| {
        Ok(client.get(&path).await?.json()?)
    })?;
    print!("{}", render_svid(&svid));
    Ok(ExitCode::SUCCESS)
}

/// An SVID as `enforcer svid show` prints it: its names and times, then the chain.
fn render_svid(svid: &v1::Svid) -> String {
    format!(
        "spiffe_id  {}\nnot_before {}\nnot_after  {} (in {}s)\n{}",
        svid.spiffe_id, svid.not_before, svid.not_after, svid.expires_in_s, svid.chain_pem
    )
}

#[cfg(test)]
mod tests {
    //! Each reply goes the whole way: serialized as the daemon sends it, parsed as the CLI
    //! reads it, then printed.
    use bytes::Bytes;
    use http::StatusCode;
    use serde::{Serialize, de::DeserializeOwned};

    use super::*;
    use crate::control::Response;

    /// `reply` as the daemon sends it, read back as the CLI reads it.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(reply: &T) -> T {
        let mut body = serde_json::to_vec(&serde_json::to_value(reply).unwrap()).unwrap();
        body.push(b'\n');
        let parsed: T = Response {
            status: StatusCode::OK,
            body: Bytes::from(body),
        }
        .json()
        .unwrap();
        assert_eq!(&parsed, reply);
        parsed
    }

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    fn status() -> v1::Status {
        v1::Status {
            node: "node-a".to_owned(),
            node_id: id("spiffe://example.org/enforcer/node/node-a"),
            trust_domain: "example.org".to_owned(),
            pid: 42,
            started: "2026-11-24T10:00:00Z".to_owned(),
            uptime_s: 7,
            mode: v1::Mode::Audit,
            policy: v1::StatusPolicy {
                version: 3,
                kernel_version: Some(3),
                kernel_slot: Some(1),
                hash: "0123456789abcdef0123".to_owned(),
                file: "/etc/enforcer/policy.toml".to_owned(),
                since: "2026-11-24T10:00:01Z".to_owned(),
            },
            datapath: v1::Datapath {
                pin_dir: "/sys/fs/bpf/enforcer".to_owned(),
                scope_cgroup: "/sys/fs/cgroup/unified/enforcer".to_owned(),
                cgroup2_mount: "/sys/fs/cgroup/unified".to_owned(),
                adopted: true,
                refuses_packet_sockets: false,
                same_node_direct: true,
                attachments: vec![v1::Attachment {
                    program: "connect4".to_owned(),
                    attached_to: "cgroup /sys/fs/cgroup/unified/enforcer".to_owned(),
                }],
            },
            listeners: v1::Listeners {
                outbound: vec!["127.0.0.1:15001".parse().unwrap()],
                inbound: "0.0.0.0:15008".parse().unwrap(),
                control: "/run/enforcer/control.sock".to_owned(),
                metrics: None,
                namespaces: Vec::new(),
                workload_api: None,
            },
            workloads: v1::WorkloadCount {
                processes: 2,
                with_identity: 1,
            },
            svids: vec![v1::SvidSummary {
                spiffe_id: id("spiffe://example.org/ns/web"),
                not_after: "2026-11-24T11:00:00Z".to_owned(),
                expires_in_s: 3500,
            }],
            open_flows: 4,
            counters: v1::Counters {
                kernel: [("connect".to_owned(), 5), ("drop".to_owned(), 0)].into(),
                tunnel: [("tunnel_flows_opened_total".to_owned(), 1)].into(),
            },
            lost: v1::Lost {
                kernel_events: 0,
                audit_records: 1,
            },
            audit: crate::audit::AuditStats {
                written: 10,
                dropped: 1,
                rotations: 0,
                write_errors: 0,
                path: "/var/lib/enforcer/audit/audit.jsonl".into(),
                last_seq: 10,
            },
        }
    }

    #[test]
    fn an_unavailable_note_says_where_the_records_stop() {
        let note = v1::Unavailable {
            unavailable_before: 120,
            reason: "records before seq 120 were rotated out of the audit log".to_owned(),
        };
        assert_eq!(
            render_unavailable(&note),
            "-- no records before seq 120 shown: records before seq 120 were rotated out of the \
             audit log"
        );
        let line = serde_json::to_string(&note).unwrap();
        assert!(
            serde_json::from_str::<AuditRecord>(&line).is_err(),
            "never read as a record"
        );
    }

    #[test]
    fn status_prints_every_part() {
        assert_eq!(
            render_status(&round_trip(&status())),
            "node node-a (spiffe://example.org/enforcer/node/node-a), pid 42, up 7s\n\
             policy v3 mode audit sha256 0123456789abcdef from /etc/enforcer/policy.toml\n\
             datapath /sys/fs/cgroup/unified/enforcer in /sys/fs/bpf/enforcer (adopted from a previous run)\n\
             packet sockets of enrolled processes: NOT refused (the kernel does not run the BPF LSM program)\n\
             same-node flows: direct, authorized in the kernel\n\
             \x20 connect4       cgroup /sys/fs/cgroup/unified/enforcer\n\
             listeners outbound [\"127.0.0.1:15001\"] inbound 0.0.0.0:15008 metrics -; 0 workload namespaces served\n\
             workload api off\n\
             workloads 2 processes, 1 with an identity; 4 open flows\n\
             \x20 svid spiffe://example.org/ns/web expires 2026-11-24T11:00:00Z (in 3500s)\n\
             lost kernel events 0, dropped audit records 1\n\
             kernel counters: connect=5\n\
             tunnel counters: tunnel_flows_opened_total=1\n"
        );
    }

    #[test]
    fn policy_prints_a_header_then_the_text() {
        let policy = v1::Policy {
            version: 2,
            hash: "abc".to_owned(),
            file: "p.toml".to_owned(),
            mode: v1::Mode::Enforce,
            since: "2026-11-24T10:00:00Z".to_owned(),
            text: "trust_domain = \"example.org\"\n".to_owned(),
        };
        assert_eq!(
            render_policy(&round_trip(&policy)),
            "# version 2 mode enforce sha256 abc\n# from p.toml since 2026-11-24T10:00:00Z\n\
             trust_domain = \"example.org\"\n"
        );
    }

    #[test]
    fn reload_prints_the_outcome() {
        let outcome = v1::ReloadOutcome {
            applied: true,
            previous_version: 1,
            version: 2,
            hash: "0123456789abcdef0123".to_owned(),
            changes: vec!["+ allow web -> db:5432".to_owned()],
            warnings: vec!["p.toml:3:1: warning: unused".to_owned()],
            missing_cgroups: vec!["/sys/fs/cgroup/unified/gone".to_owned()],
            closed: 1,
        };
        let outcome = round_trip(&outcome);
        assert_eq!(
            render_reload("p.toml", false, &outcome),
            "p.toml:3:1: warning: unused\n\
             policy version 2 in force (was 1), sha256 0123456789abcdef…: 1 changes, 1 open flows closed\n\
             \x20 + allow web -> db:5432\n\
             warning: enrolled cgroup /sys/fs/cgroup/unified/gone does not exist yet\n"
        );
        assert!(
            render_reload("p.toml", true, &outcome)
                .contains("dry run: p.toml would become version 2 (1 changes); nothing applied\n")
        );
    }

    #[test]
    fn refusals_reach_the_operator_as_their_error_text() {
        let refusal = v1::Refusal {
            error: "invalid policy; version 1 stays in force\np.toml:1:1: error: bad".to_owned(),
            diagnostics: vec!["p.toml:1:1: error: bad".to_owned()],
        };
        let body = serde_json::to_vec(&round_trip(&refusal)).unwrap();
        let parsed: v1::ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.error, refusal.error);
    }

    #[test]
    fn workloads_print_as_a_table() {
        let workload =
            |pid, spiffe_id: Option<&str>, state: &str, reason: Option<&str>| v1::Workload {
                pid,
                exe: "/usr/bin/python3".to_owned(),
                sha256: "00112233445566778899".to_owned(),
                cgroup: "/enforcer/web".to_owned(),
                cgroup_id: Some(9),
                uid: 0,
                spiffe_id: spiffe_id.map(id),
                entry: spiffe_id.map(|_| 1),
                state: state.to_owned(),
                reason: reason.map(str::to_owned),
                listening: vec!["127.0.0.1:8080".parse().unwrap()],
                container_id: (pid == 10).then(|| "0123456789ab".repeat(5) + "cdef"),
                pod_uid: None,
                netns: 4_026_531_840,
            };
        let workloads = vec![
            workload(10, Some("spiffe://example.org/ns/web"), "matched", None),
            workload(11, None, "refused", Some("owned by uid 1000")),
            workload(12, None, "unmatched", None),
        ];
        assert_eq!(
            render_workloads(&round_trip(&workloads)),
            "    PID  EXE               SHA256        CGROUP         CONTAINER     ENTRY  SPIFFE ID\n\
             \x20    10  /usr/bin/python3  001122334455  /enforcer/web  0123456789ab  1      spiffe://example.org/ns/web\n\
             \x20    11  /usr/bin/python3  001122334455  /enforcer/web  -             -      (refused: owned by uid 1000)\n\
             \x20    12  /usr/bin/python3  001122334455  /enforcer/web  -             -      (unmatched)\n"
        );
    }

    #[test]
    fn svid_prints_its_times_then_the_chain() {
        let svid = v1::Svid {
            spiffe_id: id("spiffe://example.org/ns/web"),
            not_before: "2026-11-24T10:00:00Z".to_owned(),
            not_after: "2026-11-24T11:00:00Z".to_owned(),
            expires_in_s: 3599,
            chain_pem: "-----BEGIN CERTIFICATE-----\n".to_owned(),
        };
        assert_eq!(
            render_svid(&round_trip(&svid)),
            "spiffe_id  spiffe://example.org/ns/web\nnot_before 2026-11-24T10:00:00Z\n\
             not_after  2026-11-24T11:00:00Z (in 3599s)\n-----BEGIN CERTIFICATE-----\n"
        );
    }

    #[test]
    fn flows_lines_parse_as_audit_records_and_queries_encode_as_the_daemon_reads_them() {
        let query = v1::FlowsQuery {
            verdict: Some(Verdict::Deny),
            id: Some("spiffe://example.org/ns/web".to_owned()),
            limit: Some(5),
            follow: true,
        };
        let encoded = serde_urlencoded::to_string(&query).unwrap();
        assert_eq!(
            encoded,
            "verdict=deny&id=spiffe%3A%2F%2Fexample.org%2Fns%2Fweb&limit=5&follow=true"
        );
        assert_eq!(
            serde_urlencoded::from_str::<v1::FlowsQuery>(&encoded).unwrap(),
            query
        );
        assert_eq!(
            serde_urlencoded::from_str::<v1::FlowsQuery>("follow=1").unwrap(),
            v1::FlowsQuery {
                follow: true,
                ..v1::FlowsQuery::default()
            }
        );
        let bad = serde_urlencoded::from_str::<v1::FlowsQuery>("verdict=maybe").unwrap_err();
        assert!(bad.to_string().contains("maybe"), "{bad}");
        let lagged = round_trip(&v1::Lagged {
            lagged: 3,
            note: "skipped".to_owned(),
        });
        assert_eq!(lagged.lagged, 3);
    }
}

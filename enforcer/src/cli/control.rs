//! The CLI commands that talk to a running daemon over its control socket: `status`,
//! `policy reload|show`, `workloads`, `flows` and `svid show`.

use std::{io::Write as _, path::Path, process::ExitCode};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::Value;

use crate::{
    audit::{AuditRecord, Verdict},
    control::{Client, ClientError, encode_query},
    identity::SpiffeId,
};

/// Run `work` with a client of `socket` on a single-threaded runtime.
fn with_client<T>(
    socket: &Path,
    work: impl AsyncFnOnce(&Client) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let client = Client::new(socket);
    runtime.block_on(work(&client))
}

/// `enforcer status [--json]`.
pub(super) fn status(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let status: Value = with_client(socket, async |client| {
        Ok(client.get("/v1/status").await?.json()?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let policy = &status["policy"];
    let datapath = &status["datapath"];
    println!(
        "node {} ({}), pid {}, up {}s",
        text(&status["node"]),
        text(&status["node_id"]),
        text(&status["pid"]),
        text(&status["uptime_s"])
    );
    println!(
        "policy v{} mode {} sha256 {} from {}",
        text(&policy["version"]),
        text(&status["mode"]),
        text(&policy["hash"]).get(..16).unwrap_or_default(),
        text(&policy["file"])
    );
    println!(
        "datapath {} in {}{}",
        text(&datapath["scope_cgroup"]),
        text(&datapath["pin_dir"]),
        if datapath["adopted"] == Value::Bool(true) {
            " (adopted from a previous run)"
        } else {
            ""
        }
    );
    println!(
        "packet sockets of enrolled processes: {}",
        if datapath["refuses_packet_sockets"] == Value::Bool(true) {
            "refused (BPF LSM)"
        } else {
            "NOT refused (the kernel does not run the BPF LSM program)"
        }
    );
    for attachment in datapath["attachments"].as_array().into_iter().flatten() {
        println!(
            "  {:<14} {}",
            text(&attachment["program"]),
            text(&attachment["attached_to"])
        );
    }
    let listeners = &status["listeners"];
    println!(
        "listeners outbound {} inbound {} metrics {}",
        text(&listeners["outbound"]),
        text(&listeners["inbound"]),
        text(&listeners["metrics"])
    );
    println!(
        "workloads {} processes, {} with an identity; {} open flows",
        text(&status["workloads"]["processes"]),
        text(&status["workloads"]["with_identity"]),
        text(&status["open_flows"])
    );
    for svid in status["svids"].as_array().into_iter().flatten() {
        println!(
            "  svid {} expires {} (in {}s)",
            text(&svid["spiffe_id"]),
            text(&svid["not_after"]),
            text(&svid["expires_in_s"])
        );
    }
    println!(
        "lost kernel events {}, dropped audit records {}",
        text(&status["lost"]["kernel_events"]),
        text(&status["lost"]["audit_records"])
    );
    for (group, counters) in status["counters"].as_object().into_iter().flatten() {
        let line: Vec<String> = counters
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("{group} counters: {}", line.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer policy reload FILE [--dry-run]`.
pub(super) fn reload(socket: &Path, file: &Path, dry_run: bool) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
    let name = file.display().to_string();
    let mut pairs = vec![("file", name.as_str())];
    if dry_run {
        pairs.push(("dry_run", "true"));
    }
    let path = format!("/v1/policy?{}", encode_query(&pairs));
    let result = with_client(socket, async |client| {
        Ok(client.post(&path, Bytes::from(text)).await)
    })?;
    let outcome: Value = match result {
        Ok(response) => response.json()?,
        Err(ClientError::Status { message, .. }) => {
            eprintln!("{message}");
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error.into()),
    };
    for warning in outcome["warnings"].as_array().into_iter().flatten() {
        println!("{}", warning.as_str().unwrap_or_default());
    }
    let changes = outcome["changes"].as_array().cloned().unwrap_or_default();
    if dry_run {
        println!(
            "dry run: {} would become version {} ({} changes); nothing applied",
            name,
            outcome["version"],
            changes.len()
        );
    } else {
        println!(
            "policy version {} in force (was {}), sha256 {}…: {} changes, {} open flows closed",
            outcome["version"],
            outcome["previous_version"],
            outcome["hash"]
                .as_str()
                .and_then(|hash| hash.get(..16))
                .unwrap_or_default(),
            changes.len(),
            outcome["closed"]
        );
    }
    for change in &changes {
        println!("  {}", change.as_str().unwrap_or_default());
    }
    for missing in outcome["missing_cgroups"].as_array().into_iter().flatten() {
        println!(
            "warning: enrolled cgroup {} does not exist yet",
            missing.as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer policy show`.
pub(super) fn show(socket: &Path) -> anyhow::Result<ExitCode> {
    let policy: Value = with_client(socket, async |client| {
        Ok(client.get("/v1/policy").await?.json()?)
    })?;
    println!(
        "# version {} mode {} sha256 {}\n# from {} since {}",
        policy["version"],
        policy["mode"].as_str().unwrap_or_default(),
        policy["hash"].as_str().unwrap_or_default(),
        policy["file"].as_str().unwrap_or_default(),
        policy["since"].as_str().unwrap_or_default()
    );
    print!("{}", policy["text"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

/// `enforcer workloads [--json]`.
pub(super) fn workloads(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let workloads: Vec<Value> = with_client(socket, async |client| {
        Ok(client.get("/v1/workloads").await?.json()?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&workloads)?);
        return Ok(ExitCode::SUCCESS);
    }
    let text = |w: &Value, key: &str| w[key].as_str().unwrap_or_default().to_owned();
    let width = |key: &str, header: &str| {
        workloads
            .iter()
            .map(|w| text(w, key).chars().count())
            .chain([header.len()])
            .max()
            .unwrap_or_default()
    };
    let (exe_width, cgroup_width) = (width("exe", "EXE"), width("cgroup", "CGROUP"));
    println!(
        "{:>7}  {:<exe_width$}  {:<12}  {:<cgroup_width$}  {:<5}  SPIFFE ID",
        "PID", "EXE", "SHA256", "CGROUP", "ENTRY"
    );
    for w in &workloads {
        println!(
            "{:>7}  {:<exe_width$}  {:<12}  {:<cgroup_width$}  {:<5}  {}",
            w["pid"],
            text(w, "exe"),
            text(w, "sha256").get(..12).unwrap_or_default(),
            text(w, "cgroup"),
            w["entry"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |e| e.to_string()),
            w["spiffe_id"].as_str().map_or_else(
                || match w["reason"].as_str() {
                    Some(reason) => format!("({}: {reason})", text(w, "state")),
                    None => format!("({})", text(w, "state")),
                },
                str::to_owned
            )
        );
    }
    Ok(ExitCode::SUCCESS)
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
    let limit = query.limit.to_string();
    let verdict = query.verdict.map(|v| v.as_str().to_owned());
    let id = query.id.as_ref().map(ToString::to_string);
    let mut pairs = vec![("limit", limit.as_str())];
    if let Some(verdict) = &verdict {
        pairs.push(("verdict", verdict));
    }
    if let Some(id) = &id {
        pairs.push(("id", id));
    }
    if query.follow {
        pairs.push(("follow", "true"));
    }
    let path = format!("/v1/flows?{}", encode_query(&pairs));
    let json = query.json;
    let print = move |line: &str| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{line}")?;
        } else if let Ok(record) = serde_json::from_str::<AuditRecord>(line) {
            writeln!(out, "{record}")?;
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

/// `enforcer svid show SPIFFE_ID`.
pub(super) fn svid_show(socket: &Path, id: &SpiffeId) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/svid?{}", encode_query(&[("id", id.as_ref())]));
    let svid: Value = with_client(socket, async |client| {
        Ok(client.get(&path).await?.json()?)
    })?;
    println!(
        "spiffe_id  {}",
        svid["spiffe_id"].as_str().unwrap_or_default()
    );
    println!(
        "not_before {}",
        svid["not_before"].as_str().unwrap_or_default()
    );
    println!(
        "not_after  {} (in {}s)",
        svid["not_after"].as_str().unwrap_or_default(),
        svid["expires_in_s"]
    );
    print!("{}", svid["chain_pem"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

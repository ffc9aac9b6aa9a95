//! The run loop of a built daemon: start serving (a first scan, the kernel event reader, the
//! tunnel's listeners, the control API, the Workload API), then answer signals and ticks until SIGTERM or SIGINT
//! (SIGHUP reloads the policy file), then drain open flows with a deadline and shut down.
#![forbid(unsafe_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};

use super::{
    DaemonError, Recorder, api::Api, events::EventPump, events::EventThread,
    namespaces::NamespaceServer, node::NodeFacts, reload::Reloader, upkeep::Upkeep,
};
use crate::{
    audit::{self, Entry},
    control,
    policy::PolicySnapshot,
    report::report,
    tunnel::{Namespace, Tunnel},
    workload_api::{self, WorkloadApi},
};

/// The longest wait between two looks for SVIDs due for rotation (each look also waits for
/// the earliest rotation time the cache names).
const SVID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest wait between two looks, so a renewal that keeps failing does not spin.
const SVID_REFRESH_MIN: Duration = Duration::from_millis(100);
/// How long the Workload API's clients get to close their connections at the stop.
const WORKLOAD_API_GRACE: Duration = Duration::from_secs(2);

/// The daemon's bound listeners, registered with the kernel, not yet serving.
pub(crate) struct Listeners {
    /// The outbound (redirect) listeners: IPv4, and IPv6 when the host has it.
    pub(crate) outbound: Vec<TcpListener>,
    /// The inbound (peer) listener.
    pub(crate) inbound: TcpListener,
    /// The control socket.
    pub(crate) control: UnixListener,
    /// The metrics listener, when configured.
    pub(crate) metrics: Option<TcpListener>,
    /// The Workload API socket and service, when enabled.
    pub(crate) workload_api: Option<(UnixListener, WorkloadApi)>,
}

/// A built daemon: every component, wired, with its listeners bound.
pub(crate) struct Running {
    /// What this daemon is and where it serves.
    pub(crate) node: Arc<NodeFacts>,
    /// Its listeners.
    pub(crate) listeners: Listeners,
    /// The kernel event reader, not yet started.
    pub(crate) events: EventPump,
    /// The tunnel.
    pub(crate) tunnel: Tunnel,
    /// Periodic work.
    pub(crate) upkeep: Arc<Upkeep>,
    /// Policy reloads (SIGHUP).
    pub(crate) reloader: Arc<Reloader>,
    /// The control API.
    pub(crate) api: Arc<Api>,
    /// The audit trail.
    pub(crate) recorder: Recorder,
    /// The policy in force.
    pub(crate) policy: PolicySnapshot,
    /// Turned true at shutdown: the control API and the Workload API end their streams.
    pub(crate) stop: watch::Sender<bool>,
}

/// What serves while the loop runs, stopped in order at the end.
struct Serving {
    accepting: Vec<JoinHandle<()>>,
    control: JoinHandle<()>,
    metrics: Option<JoinHandle<()>>,
    workload_api: Option<JoinHandle<()>>,
    events: EventThread,
    stop: watch::Sender<bool>,
}

/// Serve until SIGTERM or SIGINT, then drain and stop.
pub(crate) async fn serve(daemon: Running) -> Result<(), DaemonError> {
    let Running {
        node,
        listeners,
        events,
        tunnel,
        upkeep,
        reloader,
        api,
        recorder,
        policy,
        stop,
    } = daemon;
    let seen = upkeep.scan();
    let serving = start_serving(listeners, events, (&tunnel, &upkeep), api, stop)?;
    record_lifecycle(
        &recorder,
        &policy,
        audit::Event::Start,
        start_detail(&node, &recorder, seen),
    );
    announce(&node, seen);
    wait_for_stop(&node, &upkeep, &reloader).await?;
    let left = drain(&serving, (&tunnel, &upkeep), node.config.drain_timeout).await;
    shut_down(serving, &node).await;
    let flushing = recorder.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.flush(Duration::from_secs(5))).await;
    record_lifecycle(
        &recorder,
        &policy,
        audit::Event::Stop,
        format!("drained; {left} flows cut at the deadline"),
    );
    recorder.audit.close(Duration::from_secs(5));
    tracing::info!(
        open_flows_cut = left,
        "stopped; the datapath stays pinned and fails closed until the next start"
    );
    Ok(())
}

/// Start the event reader, the tunnel's listeners and the control and metrics servers.
fn start_serving(
    listeners: Listeners,
    events: EventPump,
    (tunnel, upkeep): (&Tunnel, &Upkeep),
    api: Arc<Api>,
    stop: watch::Sender<bool>,
) -> Result<Serving, DaemonError> {
    let events =
        EventThread::start(events).map_err(DaemonError::io("failed to start the event reader"))?;
    let mut accepting: Vec<_> = listeners
        .outbound
        .into_iter()
        .map(|listener| tunnel.serve_outbound(listener, Namespace::HOME))
        .collect();
    accepting.push(tunnel.serve_inbound(listeners.inbound, Namespace::HOME));
    accepting.push(tokio::spawn(follow_namespaces(Arc::clone(
        &upkeep.namespaces,
    ))));
    let stopped = stop.subscribe();
    let workload_api = listeners.workload_api.map(|(listener, service)| {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            if let Err(error) = workload_api::serve(listener, service, stopped).await {
                tracing::error!(error = %report(&error), "the Workload API stopped");
            }
        })
    });
    let control = tokio::spawn(control::serve_unix(
        listeners.control,
        Arc::clone(&api),
        stopped.clone(),
    ));
    let metrics = listeners
        .metrics
        .map(|listener| tokio::spawn(control::serve_tcp(listener, api, stopped)));
    Ok(Serving {
        accepting,
        control,
        metrics,
        workload_api,
        events,
        stop,
    })
}

/// Serve the network namespaces of registered workloads as they come and go: each change the
/// registrar reports brings the served set in line (off the async workers).
async fn follow_namespaces(server: Arc<NamespaceServer>) {
    let changed = server.changed();
    loop {
        changed.notified().await;
        let server = Arc::clone(&server);
        let _ = tokio::task::spawn_blocking(move || server.reconcile()).await;
    }
}

/// Answer signals and ticks until SIGTERM or SIGINT.
async fn wait_for_stop(
    node: &NodeFacts,
    upkeep: &Arc<Upkeep>,
    reloader: &Arc<Reloader>,
) -> Result<(), DaemonError> {
    let stream = |kind: SignalKind| -> Result<Signal, DaemonError> {
        signal(kind).map_err(DaemonError::io("failed to install a signal handler"))
    };
    let (mut term, mut int, mut hup) = (
        stream(SignalKind::terminate())?,
        stream(SignalKind::interrupt())?,
        stream(SignalKind::hangup())?,
    );
    let mut rescan = tokio::time::interval(node.config.rescan_interval);
    loop {
        let refresh = tokio::time::sleep(next_rotation(upkeep));
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); return Ok(()); }
            _ = hup.recv() => reload_from_file(node, reloader).await,
            _ = rescan.tick() => {
                let upkeep = Arc::clone(upkeep);
                let _ = tokio::task::spawn_blocking(move || upkeep.scan()).await;
            }
            () = refresh => {
                let upkeep = Arc::clone(upkeep);
                let _ = tokio::task::spawn_blocking(move || upkeep.rotate()).await;
            }
        }
    }
}

/// How long until the SVID cache's earliest rotation, within [`SVID_REFRESH_MIN`] and
/// [`SVID_REFRESH_INTERVAL`].
fn next_rotation(upkeep: &Upkeep) -> Duration {
    upkeep
        .svids
        .next_deadline()
        .map_or(SVID_REFRESH_INTERVAL, |deadline| {
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
        .clamp(SVID_REFRESH_MIN, SVID_REFRESH_INTERVAL)
}

/// Stop accepting (new redirects now fail closed) and let open flows finish until `timeout`.
/// Returns how many were still open.
async fn drain(
    serving: &Serving,
    (tunnel, upkeep): (&Tunnel, &Upkeep),
    timeout: Duration,
) -> usize {
    for task in &serving.accepting {
        task.abort();
    }
    upkeep.namespaces.close_all();
    let _ = serving.stop.send(true);
    let deadline = Instant::now() + timeout;
    while tunnel.open_flows() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = tunnel.open_flows();
    if left > 0 {
        tracing::warn!(
            open_flows = left,
            ?timeout,
            "drain deadline passed; closing the remaining flows"
        );
    }
    left
}

/// Wait for the control and metrics servers, remove the control socket, stop the event reader.
async fn shut_down(serving: Serving, node: &NodeFacts) {
    let _ = serving.control.await;
    // Gone, not stale: the CLI then says no daemon is running.
    let _ = std::fs::remove_file(&node.config.control_socket);
    if let Some(metrics) = serving.metrics {
        let _ = metrics.await;
    }
    if let Some(mut workload_api) = serving.workload_api {
        // Its streams end at the stop; a client that holds its connection open (or reads
        // nothing) does not hold the daemon.
        if tokio::time::timeout(WORKLOAD_API_GRACE, &mut workload_api)
            .await
            .is_err()
        {
            workload_api.abort();
            tracing::warn!(
                grace = ?WORKLOAD_API_GRACE,
                "Workload API connections still open at the stop were cut"
            );
        }
        if let Some(socket) = node
            .config
            .workload_api
            .enabled
            .then_some(&node.config.workload_api.socket)
        {
            let _ = std::fs::remove_file(socket);
        }
    }
    serving.events.stop();
}

/// SIGHUP: reload the configured policy file.
async fn reload_from_file(node: &NodeFacts, reloader: &Arc<Reloader>) {
    let Some(path) = node.config.policy.clone() else {
        tracing::warn!("SIGHUP: the embedded policy is in force; there is no file to reload");
        return;
    };
    let reloader = Arc::clone(reloader);
    let outcome = tokio::task::spawn_blocking(move || {
        let text = std::fs::read_to_string(&path)
            .map_err(|error| format!("failed to read {}: {error}", path.display()))?;
        reloader
            .reload(&path.display().to_string(), &text, false)
            .map_err(|error| error.to_string())
    })
    .await;
    match outcome {
        Ok(Ok(outcome)) => tracing::info!(
            version = outcome.version,
            changes = outcome.changes.len(),
            closed = outcome.closed,
            "SIGHUP: policy reloaded"
        ),
        Ok(Err(error)) => {
            tracing::error!("SIGHUP: reload refused; the old policy stays in force: {error}");
        }
        Err(error) => tracing::error!(%error, "SIGHUP: reload task failed"),
    }
}

/// The start log line, once everything serves.
fn announce(node: &NodeFacts, seen: usize) {
    tracing::info!(
        node = %node.config.node_name,
        trust_domain = %node.trust_domain,
        outbound = ?node.outbound,
        inbound = %node.inbound,
        control = %node.config.control_socket.display(),
        metrics = ?node.config.metrics_addr,
        audit = %node.config.audit_path().display(),
        enrolled_processes = seen,
        "enforcer running"
    );
}

/// The start record's detail: the listeners, the enrolled processes found, and how the
/// previous run ended as the audit log found it ("previous run stopped cleanly at seq 41").
fn start_detail(node: &NodeFacts, recorder: &Recorder, enrolled: usize) -> String {
    format!(
        "pid {}; outbound {:?}, inbound {}; {enrolled} enrolled processes; {}",
        std::process::id(),
        node.outbound,
        node.inbound,
        recorder.audit.previous_run(),
    )
}

/// A daemon lifecycle record (start, stop), under the version in force.
fn record_lifecycle(
    recorder: &Recorder,
    policy: &PolicySnapshot,
    event: audit::Event,
    detail: String,
) {
    recorder.submit(Entry {
        policy_version: policy.load().version(),
        detail: Some(detail),
        ..Entry::new(
            audit::Source::Daemon,
            event,
            audit::Verdict::Info,
            event.as_str(),
        )
    });
}

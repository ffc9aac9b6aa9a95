//! `enforcer run`: the daemon. It wires the kernel datapath, attestation, identity issuance,
//! the policy, the tunnel, the audit trail and the control API together, then runs until
//! SIGTERM or SIGINT (drain open flows, with a deadline) and reloads its policy file on SIGHUP.
//!
//! Start-up order keeps the node fail-closed: the listeners are bound before the kernel is told
//! where to redirect, and the pinned datapath stays attached when the daemon stops or dies, so
//! enrolled workloads cannot connect anywhere but through a running daemon.

mod api;
mod events;
mod flow_entry;
mod own_cgroup;
mod reload;
pub(crate) mod sockets;
mod sources;
mod telemetry;
mod workloads;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::DirBuilderExt as _},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

pub use self::own_cgroup::OwnCgroupError;
pub use self::sources::KernelSources;
use self::{
    api::Api,
    events::{EventPump, EventThread},
    reload::Enforced,
    telemetry::{MeteredIssuer, Telemetry},
    workloads::Registrar,
};
use crate::{
    attest::{AttestOptions, Attestor},
    audit::{self, AuditConfig, AuditLog, Entry},
    config::{Config, EMBEDDED_POLICY_NAME},
    control,
    identity::{
        CacheConfig, SpiffeId, StoreError, SvidCache, SystemClock, TrustBundleSet, TrustDomain,
        load_or_init,
    },
    kernel::{
        DaemonConfig, Datapath, DatapathOptions, ListenerSlot, Maps,
        cgroup::cgroup2_mount,
        loader::{LoadError, PROGRAMS},
        maps::MapsError,
        netns::netns_cookie,
    },
    policy::{Diagnostic, diagnostic::render},
    report::report,
    tunnel::{
        FlowRecord, LocalWorkloads, Origins, PolicyView, RecordSink, SocketTagger, Tunnel,
        TunnelConfig, TunnelError, TunnelParts,
    },
};

/// How often SVIDs due for rotation are renewed.
const SVID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The policy file could not be read.
    #[error("failed to read policy {}", path.display())]
    ReadPolicy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The policy is invalid.
    #[error("invalid policy:\n{}", render(.0))]
    Policy(Vec<Diagnostic>),
    /// The policy enrolls the daemon's own cgroup.
    #[error(transparent)]
    OwnCgroup(#[from] OwnCgroupError),
    /// cgroup v2 could not be found.
    #[error("cgroup v2")]
    Cgroup(#[from] crate::kernel::cgroup::CgroupError),
    /// The datapath could not be installed or adopted.
    #[error("failed to install the datapath")]
    Datapath(#[source] Box<LoadError>),
    /// A kernel map could not be written.
    #[error("failed to program the kernel")]
    Maps(#[from] MapsError),
    /// The policy could not be applied to the kernel.
    #[error("failed to apply the policy")]
    Apply(#[from] crate::policy::apply::ApplyError),
    /// The CA could not be loaded or created.
    #[error("failed to load the node CA")]
    Pki(#[from] StoreError),
    /// The tunnel could not be built.
    #[error("failed to build the tunnel")]
    Tunnel(#[from] TunnelError),
    /// The audit log could not be opened.
    #[error("failed to open the audit log")]
    Audit(#[from] crate::audit::AuditError),
    /// The control socket could not be bound.
    #[error("failed to open the control socket")]
    Control(#[from] control::ControlError),
    /// A listener, thread or runtime could not be created.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node name makes no SPIFFE ID.
    #[error("node name {0:?} makes no SPIFFE ID path segment")]
    NodeName(String),
}

impl From<LoadError> for DaemonError {
    fn from(error: LoadError) -> Self {
        Self::Datapath(Box::new(error))
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Run the daemon with `config` until it is told to stop.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("enforcer")
        .enable_all()
        .build()
        .map_err(io_error("failed to start the async runtime"))?;
    runtime.block_on(async move {
        let (daemon, parts) = Daemon::start(config).await?;
        daemon.serve(parts).await
    })
}

/// Where the records of every component go: the audit log, counted by verdict. It also holds
/// the daemon's audit log and telemetry for everything else that reads them.
#[derive(Clone)]
pub(crate) struct Recorder {
    audit: AuditLog,
    telemetry: Arc<Telemetry>,
    registrar: Arc<Registrar>,
}

impl Recorder {
    /// Write `entry` to the audit log.
    pub(crate) fn submit(&self, entry: Entry) {
        self.telemetry.verdict(entry.source, entry.verdict);
        self.audit.submit(entry);
    }
}

impl RecordSink for Recorder {
    /// A tunnel record, with the binary hash and cgroup path of its client added when the
    /// client runs on this node.
    fn record(&self, record: FlowRecord) {
        let mut entry = flow_entry::from_flow(&record);
        if let Some(known) = record
            .src
            .pid
            .and_then(|pid| self.registrar.provenance(pid))
        {
            entry.src.sha256 = Some(known.sha256);
            entry.src.cgroup = Some(known.cgroup);
        }
        self.submit(entry);
    }
}

/// The state every part of the running daemon shares.
pub(crate) struct Daemon {
    config: Config,
    trust_domain: TrustDomain,
    node_id: SpiffeId,
    started: SystemTime,
    mount: PathBuf,
    scope: PathBuf,
    adopted: bool,
    refuses_packet_sockets: bool,
    maps: Arc<Mutex<Maps>>,
    enforced: Mutex<Arc<Enforced>>,
    tunnel: Tunnel,
    sources: Arc<KernelSources>,
    registrar: Arc<Registrar>,
    svids: Arc<SvidCache<SystemClock, MeteredIssuer>>,
    recorder: Recorder,
    outbound: Vec<SocketAddr>,
    inbound: SocketAddr,
}

/// What `start` hands to `serve`: the listeners and the event reader.
struct Serving {
    outbound: Vec<TcpListener>,
    inbound: TcpListener,
    control: tokio::net::UnixListener,
    metrics: Option<TcpListener>,
    events: EventPump,
}

impl Daemon {
    #[expect(
        clippy::too_many_lines,
        reason = "start-up is one ordered sequence (listeners before the kernel redirects to them); \
                  each step is already a call"
    )]
    async fn start(config: Config) -> Result<(Arc<Self>, Serving), DaemonError> {
        let started = SystemTime::now();
        let (name, text, policy) = load_policy(&config)?;
        own_cgroup::refuse_enrolling_the_daemon(&policy.enroll)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(io_error(format!(
                "failed to create the state directory {}",
                config.state_dir.display()
            )))?;
        // First of all: a second daemon must fail here, before it touches the kernel's config.
        let control = control::bind_control_socket(&config.control_socket)?;
        let trust_domain = policy.trust_domain.clone();
        let node_id: SpiffeId =
            format!("spiffe://{trust_domain}/enforcer/node/{}", config.node_name)
                .parse()
                .map_err(|_| DaemonError::NodeName(config.node_name.clone()))?;
        let mount = cgroup2_mount()?;
        let scope = mount.join(config.kernel.scope_cgroup.trim_start_matches('/'));
        let datapath = install(&config, &scope)?;
        let adopted = !datapath.attached_now();
        let refuses_packet_sockets = datapath.refuses_packet_sockets();

        // Listeners first, in the kernel's listener map before it is told the ports: from then
        // on the ports are this daemon's, whoever else binds them.
        let (outbound, outbound_listeners) = bind_outbound(config.tunnel.outbound_port).await?;
        let inbound_listener = bind_free(config.tunnel.inbound_addr, "inbound").await?;
        let inbound = inbound_listener
            .local_addr()
            .map_err(io_error("inbound listener address"))?;

        let mut maps = Maps::open(&datapath.pin_dir().join("maps"))?;
        let previous_version = maps.active_policy()?.version;
        // Identity numbers are this run's (file order of the policy it compiles): the ones an
        // earlier run left would stamp connections with other workloads' identities. Until the
        // first scan, enrolled processes are attested when they connect.
        maps.clear_identities()?;
        for (addr, listener) in outbound.iter().zip(&outbound_listeners) {
            let slot = match addr {
                SocketAddr::V4(_) => ListenerSlot::Outbound4,
                SocketAddr::V6(_) => ListenerSlot::Outbound6,
            };
            maps.set_listener(slot, listener.as_fd())?;
        }
        let inbound_slot = match inbound {
            SocketAddr::V4(_) => ListenerSlot::Inbound4,
            SocketAddr::V6(_) => ListenerSlot::Inbound6,
        };
        maps.set_listener(inbound_slot, inbound_listener.as_fd())?;
        maps.set_config(&DaemonConfig {
            outbound_v4: outbound.iter().find_map(|a| match a {
                SocketAddr::V4(a) => Some(*a.ip()),
                SocketAddr::V6(_) => None,
            }),
            outbound_v6: outbound.iter().find_map(|a| match a {
                SocketAddr::V6(a) => Some(*a.ip()),
                SocketAddr::V4(_) => None,
            }),
            outbound_port: config.tunnel.outbound_port,
            inbound_port: config.tunnel.inbound_addr.port(),
            netns_cookie: netns_cookie(inbound_listener.as_fd())
                .map_err(io_error("namespace cookie of the inbound listener"))?,
        })?;
        let maps = Arc::new(Mutex::new(maps));

        let telemetry = Arc::new(Telemetry::default());
        let attestor = Arc::new(Attestor::new(AttestOptions {
            cgroup2_mount: Some(mount.clone()),
            ..AttestOptions::default()
        }));
        let sources = Arc::new(KernelSources::new(
            Arc::clone(&maps),
            datapath.socket_tags()?,
            Arc::clone(&attestor),
            config.tunnel.outbound_port,
        ));
        let registrar = Arc::new(Registrar::new(
            attestor,
            Arc::clone(&maps),
            mount.clone(),
            Arc::clone(&telemetry),
        ));

        // Versions keep rising across restarts: every record names a distinct policy.
        let version = previous_version + 1;
        let (compiled, missing_cgroups) =
            reload::put_in_force(&maps, &mount, &sources, &registrar, &policy, None, version)?;
        for missing in &missing_cgroups {
            tracing::warn!(cgroup = %missing, "enrolled cgroup does not exist (yet)");
        }

        let (bundles, svids) = identity(&config, &trust_domain, started, &telemetry)?;

        let audit_path = config.audit_path();
        let audit = AuditLog::open(
            AuditConfig::new(
                audit_path.clone(),
                config.audit.max_bytes,
                config.audit.keep,
            ),
            &config.node_name,
        )?;
        let recorder = Recorder {
            audit: audit.clone(),
            telemetry: Arc::clone(&telemetry),
            registrar: Arc::clone(&registrar),
        };

        let tunnel = Tunnel::new(TunnelParts {
            config: TunnelConfig {
                connect_timeout: config.tunnel.connect_timeout,
                handshake_timeout: config.tunnel.handshake_timeout,
                idle_timeout: Some(config.tunnel.idle_timeout),
                ..TunnelConfig::default()
            },
            node_id: node_id.clone(),
            bundles: Arc::new(bundles),
            svids: Arc::clone(&svids) as _,
            workloads: Arc::clone(&sources) as Arc<dyn LocalWorkloads>,
            origins: Arc::clone(&sources) as Arc<dyn Origins>,
            records: Arc::new(recorder.clone()),
            tags: Arc::clone(&sources) as Arc<dyn SocketTagger>,
            policy: PolicyView::new(&policy, version),
        })?;

        let events = EventPump {
            reader: datapath.events()?,
            maps: Arc::clone(&maps),
            registrar: Arc::clone(&registrar),
            recorder: recorder.clone(),
            lost_file: config.state_dir.join("kernel-lost-events"),
        };
        let metrics = match config.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(io_error(format!(
                "failed to bind the metrics listener on {addr}"
            )))?),
            None => None,
        };

        let enforced = Enforced::new(policy, compiled, name, &text);
        tracing::info!(
            node = %config.node_name,
            trust_domain = %trust_domain,
            policy = %enforced.name,
            version,
            hash = %enforced.hash,
            mode = ?enforced.policy.mode,
            workloads = enforced.policy.workloads.len(),
            rules = enforced.policy.rules.len(),
            "policy in force"
        );
        let daemon = Arc::new(Self {
            trust_domain,
            node_id,
            started,
            mount,
            scope,
            adopted,
            refuses_packet_sockets,
            maps,
            enforced: Mutex::new(Arc::new(enforced)),
            tunnel,
            sources,
            registrar,
            svids,
            recorder,
            outbound,
            inbound,
            config,
        });
        Ok((
            daemon,
            Serving {
                outbound: outbound_listeners,
                inbound: inbound_listener,
                control,
                metrics,
                events,
            },
        ))
    }

    async fn serve(self: Arc<Self>, parts: Serving) -> Result<(), DaemonError> {
        self.refresh_local_addrs();
        let seen = self.registrar.rescan();
        self.issue_svids();
        let events = EventThread::start(parts.events)
            .map_err(io_error("failed to start the event reader"))?;
        let mut accepting: Vec<_> = parts
            .outbound
            .into_iter()
            .map(|listener| self.tunnel.serve_outbound(listener))
            .collect();
        accepting.push(self.tunnel.serve_inbound(parts.inbound));
        let (stop, stopped) = watch::channel(false);
        let api = Arc::new(Api::new(Arc::clone(&self)));
        let control = tokio::spawn(control::serve_unix(
            parts.control,
            Arc::clone(&api),
            stopped.clone(),
        ));
        let metrics = parts.metrics.map(|listener| {
            tokio::spawn(control::serve_tcp(
                listener,
                Arc::clone(&api),
                stopped.clone(),
            ))
        });
        self.announce(seen);

        let signal_stream =
            |kind: SignalKind| signal(kind).map_err(io_error("failed to install a signal handler"));
        let mut term = signal_stream(SignalKind::terminate())?;
        let mut int = signal_stream(SignalKind::interrupt())?;
        let mut hup = signal_stream(SignalKind::hangup())?;
        let mut rescan = tokio::time::interval(self.config.rescan_interval);
        let mut refresh = tokio::time::interval(SVID_REFRESH_INTERVAL);
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
                _ = hup.recv() => self.reload_from_file().await,
                _ = rescan.tick() => {
                    let daemon = Arc::clone(&self);
                    let _ = tokio::task::spawn_blocking(move || {
                        daemon.refresh_local_addrs();
                        daemon.registrar.rescan();
                        daemon.issue_svids();
                    }).await;
                }
                _ = refresh.tick() => {
                    for (id, error) in self.svids.refresh_due() {
                        tracing::warn!(%id, error = %report(&error), "SVID rotation failed");
                    }
                }
            }
        }

        // Drain: stop accepting (new redirects now fail closed), let open flows finish.
        for task in &accepting {
            task.abort();
        }
        let _ = stop.send(true);
        let deadline = Instant::now() + self.config.drain_timeout;
        while self.tunnel.open_flows() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.tunnel.open_flows();
        if left > 0 {
            tracing::warn!(open_flows = left, timeout = ?self.config.drain_timeout, "drain deadline passed; closing the remaining flows");
        }
        let _ = control.await;
        // Gone, not stale: the CLI then says no daemon is running.
        let _ = std::fs::remove_file(&self.config.control_socket);
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        events.stop();
        self.record_lifecycle(
            audit::Event::Stop,
            format!("drained; {left} flows cut at the deadline"),
        );
        self.recorder.audit.close(Duration::from_secs(5));
        tracing::info!(
            open_flows_cut = left,
            "stopped; the datapath stays pinned and fails closed until the next start"
        );
        Ok(())
    }

    /// The start record and log line, once everything serves.
    fn announce(&self, seen: usize) {
        self.record_lifecycle(audit::Event::Start, self.start_detail(seen));
        tracing::info!(
            node = %self.config.node_name,
            trust_domain = %self.trust_domain,
            outbound = ?self.outbound,
            inbound = %self.inbound,
            control = %self.config.control_socket.display(),
            metrics = ?self.config.metrics_addr,
            audit = %self.config.audit_path().display(),
            enrolled_processes = seen,
            "enforcer running"
        );
    }

    /// Tell the kernel and the tunnel this node's addresses: a wildcard listener owns a
    /// destination only at one of them, so the tunnel never delivers to another host.
    fn refresh_local_addrs(&self) {
        let addrs: Vec<IpAddr> = match if_addrs::get_if_addrs() {
            Ok(interfaces) => interfaces
                .iter()
                .map(if_addrs::Interface::ip)
                .filter(|ip| !ip.is_loopback())
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "failed to list this node's addresses; keeping the last list");
                return;
            }
        };
        tracing::debug!(?addrs, "this node's addresses");
        let result = self
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace_local_addrs(&addrs);
        if let Err(error) = result {
            tracing::warn!(error = %report(&error), "failed to give the kernel this node's addresses");
        }
        self.sources.set_local_addrs(addrs);
    }

    /// Issue (or keep) the SVID of every identity a registered process holds.
    fn issue_svids(&self) {
        let mut ids: Vec<String> = self
            .registrar
            .workloads()
            .into_iter()
            .filter_map(|w| w.spiffe_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Ok(id) = id.parse::<SpiffeId>()
                && let Err(error) = self.svids.get(&id)
            {
                tracing::warn!(%id, error = %report(&error), "no SVID");
            }
        }
    }

    /// The start record's detail: the listeners, the enrolled processes found, and how the
    /// previous run ended as the audit log found it ("previous run stopped cleanly at seq 41").
    fn start_detail(&self, enrolled: usize) -> String {
        format!(
            "pid {}; outbound {:?}, inbound {}; {enrolled} enrolled processes; {}",
            std::process::id(),
            self.outbound,
            self.inbound,
            self.recorder.audit.previous_run(),
        )
    }

    /// A daemon lifecycle record (start, stop, reload).
    fn record_lifecycle(&self, event: audit::Event, detail: String) {
        let version = self.enforced().version();
        self.recorder.submit(Entry {
            policy_version: version,
            detail: Some(detail),
            ..Entry::new(
                audit::Source::Daemon,
                event,
                audit::Verdict::Info,
                event.as_str(),
            )
        });
    }

    /// SIGHUP: reload the configured policy file.
    async fn reload_from_file(self: &Arc<Self>) {
        let Some(path) = self.config.policy.clone() else {
            tracing::warn!("SIGHUP: the embedded policy is in force; there is no file to reload");
            return;
        };
        let daemon = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || {
            let text = std::fs::read_to_string(&path)
                .map_err(|error| format!("failed to read {}: {error}", path.display()))?;
            daemon
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

    /// The policy in force.
    pub(crate) fn enforced(&self) -> Arc<Enforced> {
        Arc::clone(&self.enforced.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The policy file named by `config`, or the embedded default: (name, text, policy).
fn load_policy(config: &Config) -> Result<(String, String, crate::policy::Policy), DaemonError> {
    let (name, text) = match &config.policy {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|source| DaemonError::ReadPolicy {
                path: path.clone(),
                source,
            })?,
        ),
        None => (
            EMBEDDED_POLICY_NAME.to_owned(),
            crate::policy::DEFAULT_POLICY.to_owned(),
        ),
    };
    let (policy, warnings) =
        crate::policy::parse(&name, text.as_bytes()).map_err(DaemonError::Policy)?;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    Ok((name, text, policy))
}

/// Attach the programs to `scope` and pin them, or adopt the pins of an earlier run.
fn install(config: &Config, scope: &std::path::Path) -> Result<Datapath, DaemonError> {
    let datapath = Datapath::install(&DatapathOptions::new(&config.kernel.pin_dir, scope))?;
    if datapath.attached_now() {
        tracing::info!(
            cgroup = %scope.display(),
            pin_dir = %config.kernel.pin_dir.display(),
            programs = %PROGRAMS.join(", "),
            "attached the eBPF programs"
        );
    } else {
        tracing::info!(pin_dir = %config.kernel.pin_dir.display(), "adopted the pinned datapath (enforcement never stopped)");
    }
    Ok(datapath)
}

/// The node CA (loaded or created) as an SVID cache, and the trust bundles.
fn identity(
    config: &Config,
    trust_domain: &TrustDomain,
    now: SystemTime,
    telemetry: &Arc<Telemetry>,
) -> Result<(TrustBundleSet, Arc<SvidCache<SystemClock, MeteredIssuer>>), DaemonError> {
    let pki = load_or_init(&config.ca_dir(), trust_domain, &config.node_name, now)?;
    tracing::info!(ca_dir = %config.ca_dir().display(), %trust_domain, "node CA ready");
    let mut bundles = TrustBundleSet::new();
    bundles.insert(pki.bundle);
    let svids = Arc::new(SvidCache::new(
        SystemClock,
        MeteredIssuer {
            ca: pki.node,
            telemetry: Arc::clone(telemetry),
        },
        CacheConfig::default(),
    ));
    Ok((bundles, svids))
}

/// Bind the outbound listener for the redirect port on `127.0.0.1` and, when the host has IPv6
/// loopback, on `[::1]` (without it the kernel refuses enrolled IPv6 connects: fail closed).
/// The kernel hands the redirect port to these sockets; see [`bind_free`] for where they bind.
async fn bind_outbound(port: u16) -> Result<(Vec<SocketAddr>, Vec<TcpListener>), DaemonError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = bind_free(v4, "outbound").await?;
    let mut addrs = vec![v4];
    let mut listeners = vec![listener];
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match bind_free(v6, "outbound").await {
        Ok(listener) => {
            addrs.push(v6);
            listeners.push(listener);
        }
        Err(error) => {
            tracing::warn!(%v6, error = %report(&error), "no IPv6 outbound listener: enrolled IPv6 connects are refused");
        }
    }
    Ok((addrs, listeners))
}

/// Bind a listener for `addr`: at `addr` itself when it is free, otherwise at a port the kernel
/// chooses on the same IP. The kernel's `sk_lookup` hands connections for `addr`'s port to the
/// socket the daemon registers, wherever it is bound, so a process that took the port while
/// the daemon was down neither receives a connection nor keeps the daemon from starting.
async fn bind_free(addr: SocketAddr, what: &str) -> Result<TcpListener, DaemonError> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            let listener = TcpListener::bind(fallback).await.map_err(io_error(format!(
                "failed to bind the {what} listener on {fallback}"
            )))?;
            tracing::warn!(
                %addr,
                bound = ?listener.local_addr().ok(),
                "another process holds the {what} port; the kernel hands its connections to this daemon anyway"
            );
            Ok(listener)
        }
        Err(source) => Err(DaemonError::Io {
            what: format!("failed to bind the {what} listener on {addr}"),
            source,
        }),
    }
}

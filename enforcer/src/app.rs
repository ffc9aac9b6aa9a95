//! The wiring place: builds and binds every component of the daemon in start-up order, then
//! hands the result to the run loop ([`daemon::serve`]).
//!
//! The order keeps the node fail-closed; it is the README's ("The daemon"):
//! 1. read and validate the policy; refuse one that enrolls the daemon's own cgroup;
//! 2. bind the control socket (a second daemon fails here, before it touches the kernel);
//! 3. attach the eBPF programs to the scope cgroup and pin them, or adopt an earlier run's pins;
//! 4. bind the outbound and inbound listeners, put them in the kernel's listener map, then
//!    tell the kernel the ports (from then on they are this daemon's, whoever else binds
//!    them); forget the identities an earlier run left;
//! 5. compile the policy, apply it to the kernel, publish it as the one snapshot in force;
//! 6. load or create the node CA and the trust domain's JWT key;
//! 7. open the audit log;
//! 8. build the registrar, the tunnel, the kernel event reader, the control API and the
//!    Workload API (its socket bound), whose first scan and serving (step 9) are the run
//!    loop's.
//!
//! The pinned datapath stays attached when the daemon stops or dies, so enrolled workloads
//! cannot connect anywhere but through a running daemon.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::DirBuilderExt as _},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};

use crate::{
    attest::{AttestOptions, Attestor},
    audit::{AuditConfig, AuditLog},
    config::{Config, EMBEDDED_POLICY_NAME},
    control,
    daemon::{
        self, Api, ApiCallers, ApiFigures, DaemonError, EventPump, KernelFlows, KernelSources,
        Listeners, MeteredIssuer, NamespaceServer, Namespaces, NodeCredentials, NodeFacts,
        OwnCgroupError, Recorder, Registrar, Reloader, Running, Svids, Telemetry, Upkeep,
    },
    identity::{
        CacheConfig, JwtAuthority, JwtError, SpiffeId, StoreError, SvidCache, SystemClock,
        TrustBundleSet, TrustDomain, load_or_init,
    },
    kernel::{
        CgroupError, DaemonConfig, Datapath, DatapathOptions, ListenerSlot, LoadError, Maps,
        MapsError, Netns, PROGRAMS, SocketTags, cgroup2_mount,
    },
    policy::{ApplyError, Diagnostic, Policy, PolicyPublisher, PolicySnapshot, render},
    report::report,
    tunnel::{Tunnel, TunnelConfig, TunnelError, TunnelParts},
    workload_api::{self, ApiMetrics, Changes, Limits, WorkloadApi, WorkloadApiError},
};

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
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
    Cgroup(#[from] CgroupError),
    /// The datapath could not be installed or adopted.
    #[error("failed to install the datapath")]
    Datapath(#[source] Box<LoadError>),
    /// A kernel map could not be written.
    #[error("failed to program the kernel")]
    Maps(#[from] MapsError),
    /// The policy could not be applied to the kernel.
    #[error("failed to apply the policy")]
    Apply(#[from] ApplyError),
    /// The CA could not be loaded or created.
    #[error("failed to load the node CA")]
    Pki(#[from] StoreError),
    /// The trust domain's JWT signing key could not be loaded or created.
    #[error("failed to load the JWT signing key")]
    Jwt(#[from] JwtError),
    /// The Workload API socket could not be bound.
    #[error("failed to open the Workload API socket")]
    WorkloadApi(#[from] WorkloadApiError),
    /// The tunnel could not be built.
    #[error("failed to build the tunnel")]
    Tunnel(#[from] TunnelError),
    /// The audit log could not be opened.
    #[error("failed to open the audit log")]
    Audit(#[from] crate::audit::AuditError),
    /// The control socket could not be bound.
    #[error("failed to open the control socket")]
    Control(#[from] control::ControlError),
    /// A directory, listener or runtime could not be created.
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
    /// The run loop failed.
    #[error(transparent)]
    Serve(#[from] DaemonError),
}

impl From<LoadError> for AppError {
    fn from(error: LoadError) -> Self {
        Self::Datapath(Box::new(error))
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let what = what.into();
    move |source| AppError::Io { what, source }
}

/// Run the daemon with `config` until it is told to stop.
pub fn run(config: Config) -> Result<(), AppError> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking work (procfs, hashing, map syscalls, signing) queues rather than grow the
        // pool without bound: every thread costs a stack and a malloc arena.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("enforcer")
        .enable_all()
        .build()
        .map_err(io_error("failed to start the async runtime"))?;
    runtime.block_on(async move {
        let running = build(config).await?;
        Ok(daemon::serve(running).await?)
    })
}

/// glibc's malloc gives threads that allocate at once arenas of their own, up to eight per
/// core, and keeps what each one grew to: the blocking pool's threads (a thousand Workload API
/// streams looking again after a rotation) would hold megabytes that way. Two arenas serve
/// the two async workers and the pool.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter, and runs before the runtime starts
    // any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Other C libraries have no such arenas.
#[cfg(not(target_env = "gnu"))]
fn limit_malloc_arenas() {}

/// A policy as read: where from, its text, and what it says.
struct Source {
    name: String,
    text: String,
    policy: Policy,
}

/// What start-up learns of the kernel side before the policy is applied.
struct Kernel {
    datapath: Datapath,
    /// The maps as the registrar, the event reader and reloads write and read them.
    maps: Arc<Mutex<Maps>>,
    /// A handle of the same maps for the tunnel's lookups alone, so that they never wait for
    /// the long holders of `maps` (a reload, a rescan).
    lookups: Arc<Mutex<Maps>>,
    /// The network namespaces served: this daemon's own, and its workloads'.
    namespaces: Arc<Namespaces>,
    mount: PathBuf,
    scope: PathBuf,
    previous_version: u64,
    /// The same-node flows the kernel authorizes.
    direct: Arc<KernelFlows>,
    /// Whether allowed same-node flows go direct ([`same_node_direct`]).
    same_node_direct: bool,
}

/// Build and bind every component, in start-up order (see the module docs).
async fn build(config: Config) -> Result<Running, AppError> {
    let started = SystemTime::now();
    let source = load_policy(&config)?;
    daemon::refuse_enrolling_the_daemon(&source.policy.enroll)?;
    create_state_dir(&config)?;
    let control = control::bind_control_socket(&config.control_socket)?;
    let trust_domain = source.policy.trust_domain.clone();
    let node_id = node_id(&config, &trust_domain)?;
    let datapath = install(&config)?;
    let bound = bind_tunnel_listeners(&config).await?;
    let (kernel, tags) = program_kernel(datapath, &config, &bound)?;
    let publisher = put_in_force(&kernel, source)?;
    let policy = publisher.snapshot();
    let telemetry = Arc::new(Telemetry::default());
    let changes = Changes::default();
    let (bundles, svids, jwt) = identity(&config, &trust_domain, started, (&telemetry, &changes))?;
    let audit = open_audit(&config)?;
    let parts = Parts::new(&config, &kernel, tags, &policy, (telemetry, audit))?;
    let bundles = Arc::new(bundles);
    let tunnel = build_tunnel(&config, node_id.clone(), &bundles, &svids, &parts, &policy)?;
    let (stop, stopped) = watch::channel(false);
    let served_api = build_workload_api(
        (&config, changes),
        &parts,
        &policy,
        NodeCredentials::new(
            Arc::clone(&svids),
            bundles,
            jwt,
            config.identity.jwt_svid_ttl,
        ),
        stopped,
    )?;
    let node = Arc::new(NodeFacts {
        trust_domain,
        node_id,
        started,
        adopted: !kernel.datapath.attached_now(),
        refuses_packet_sockets: kernel.datapath.refuses_packet_sockets(),
        same_node_direct: kernel.same_node_direct,
        outbound: bound.outbound_addrs,
        inbound: bound.inbound_addr,
        mount: kernel.mount.clone(),
        scope: kernel.scope.clone(),
        config,
    });
    let listeners = Listeners {
        outbound: bound.outbound,
        inbound: bound.inbound,
        control,
        metrics: bind_metrics(&node.config).await?,
        workload_api: served_api.listener,
    };
    assemble(
        (node, listeners, stop),
        &kernel,
        parts,
        tunnel,
        (svids, served_api.figures, served_api.changes),
        publisher,
    )
}

/// The most threads blocking work runs on at once.
const MAX_BLOCKING_THREADS: usize = 32;

/// How often a Workload API stream looks again with no change reported: kernel events can be
/// lost (a full ring buffer), and a process attested as refused may be refused no longer.
const STREAM_RECHECK: Duration = Duration::from_secs(10);

/// The Workload API as built: its service and socket (when enabled), and where the daemon
/// reports changes to its streams.
struct ServedApi {
    listener: Option<(UnixListener, WorkloadApi)>,
    figures: Option<ApiFigures>,
    changes: Changes,
}

/// The Workload API service answering from attestation and the node's credentials, its socket
/// bound, when the configuration enables it.
fn build_workload_api(
    (config, changes): (&Config, Changes),
    parts: &Parts,
    policy: &PolicySnapshot,
    credentials: NodeCredentials,
    stopped: watch::Receiver<bool>,
) -> Result<ServedApi, AppError> {
    let settings = &config.workload_api;
    if !settings.enabled {
        return Ok(ServedApi {
            listener: None,
            figures: None,
            changes,
        });
    }
    let callers = ApiCallers::new(
        Arc::clone(&parts.attestor),
        Arc::clone(&parts.lookups),
        policy.clone(),
        parts.recorder.clone(),
    );
    let limits = Limits::new(settings.max_streams_per_caller, settings.max_streams);
    let counters = Arc::new(ApiMetrics::default());
    let api = WorkloadApi::new(
        (Arc::new(callers), Arc::new(credentials)),
        changes.clone(),
        (Arc::clone(&limits), Arc::clone(&counters)),
        STREAM_RECHECK,
        stopped,
    );
    let listener = workload_api::bind(&settings.socket)?;
    tracing::info!(socket = %settings.socket.display(), "Workload API socket bound");
    Ok(ServedApi {
        listener: Some((listener, api)),
        figures: Some(ApiFigures { counters, limits }),
        changes,
    })
}

/// The components built from the kernel and the policy, before the tunnel.
struct Parts {
    sources: Arc<KernelSources>,
    registrar: Arc<Registrar>,
    recorder: Recorder,
    /// The attestor the registrar, the tunnel's sources and the Workload API share.
    attestor: Arc<Attestor>,
    /// The kernel maps handle of quick lookups.
    lookups: Arc<Mutex<Maps>>,
}

impl Parts {
    fn new(
        config: &Config,
        kernel: &Kernel,
        tags: SocketTags,
        policy: &PolicySnapshot,
        (telemetry, audit): (Arc<Telemetry>, AuditLog),
    ) -> Result<Self, AppError> {
        let attestor = Arc::new(Attestor::new(AttestOptions {
            cgroup2_mount: Some(kernel.mount.clone()),
            ..AttestOptions::default()
        }));
        let sources = Arc::new(KernelSources::new(
            Arc::clone(&kernel.lookups),
            tags,
            Arc::clone(&attestor),
            policy.clone(),
            (Arc::clone(&kernel.namespaces), config.tunnel.outbound_port),
        ));
        let registrar = Arc::new(Registrar::new(
            Arc::clone(&attestor),
            (Arc::clone(&kernel.maps), Arc::clone(&kernel.namespaces)),
            kernel.mount.clone(),
            policy.clone(),
            Arc::clone(&telemetry),
        ));
        let recorder = Recorder::start(audit, telemetry, Arc::clone(&registrar))
            .map_err(io_error("failed to start the recorder thread"))?;
        Ok(Self {
            sources,
            registrar,
            recorder,
            attestor,
            lookups: Arc::clone(&kernel.lookups),
        })
    }
}

/// The running daemon's handles, each component given only what it reads.
fn assemble(
    (node, listeners, stop): (Arc<NodeFacts>, Listeners, watch::Sender<bool>),
    kernel: &Kernel,
    parts: Parts,
    tunnel: Tunnel,
    (svids, workload_figures, changes): (Arc<Svids>, Option<ApiFigures>, Changes),
    publisher: PolicyPublisher,
) -> Result<Running, AppError> {
    let Parts {
        sources,
        registrar,
        recorder,
        ..
    } = parts;
    let policy = publisher.snapshot();
    let namespaces = Arc::new(NamespaceServer::new(
        Arc::clone(&kernel.namespaces),
        Arc::clone(&registrar),
        tunnel.clone(),
        (Arc::clone(&kernel.maps), sources),
        policy.clone(),
        (
            node.config.tunnel.outbound_port,
            node.config.tunnel.inbound_addr.port(),
        ),
    ));
    let reloader = Arc::new(Reloader {
        publisher,
        maps: Arc::clone(&kernel.maps),
        mount: kernel.mount.clone(),
        tunnel: tunnel.clone(),
        kernel_flows: Arc::clone(&kernel.direct),
        registrar: Arc::clone(&registrar),
        recorder: recorder.clone(),
        changes: changes.clone(),
        one_at_a_time: Mutex::default(),
    });
    let api = Arc::new(Api {
        node: Arc::clone(&node),
        policy: policy.clone(),
        reloader: Arc::clone(&reloader),
        registrar: Arc::clone(&registrar),
        audit: recorder.audit.clone(),
        telemetry: Arc::clone(&recorder.telemetry),
        svids: Arc::clone(&svids),
        tunnel: tunnel.clone(),
        maps: Arc::clone(&kernel.maps),
        namespaces: Arc::clone(&namespaces),
        workload_figures,
    });
    let events = EventPump {
        reader: kernel.datapath.events()?,
        maps: Arc::clone(&kernel.maps),
        policy: policy.clone(),
        registrar: Arc::clone(&registrar),
        recorder: recorder.clone(),
        lost_file: node.config.state_dir.join("kernel-lost-events"),
        changes: changes.clone(),
        kernel_flows: Arc::clone(&kernel.direct),
    };
    let upkeep = Arc::new(Upkeep {
        namespaces,
        registrar,
        svids,
        kernel_flows: Arc::clone(&kernel.direct),
    });
    Ok(Running {
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
    })
}

/// The policy file named by `config`, or the embedded default.
fn load_policy(config: &Config) -> Result<Source, AppError> {
    let (name, text) = match &config.policy {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|source| AppError::ReadPolicy {
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
        crate::policy::parse(&name, text.as_bytes()).map_err(AppError::Policy)?;
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    Ok(Source { name, text, policy })
}

/// The state directory, private to root.
fn create_state_dir(config: &Config) -> Result<(), AppError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(io_error(format!(
            "failed to create the state directory {}",
            config.state_dir.display()
        )))
}

/// The node's own SPIFFE ID.
fn node_id(config: &Config, trust_domain: &TrustDomain) -> Result<SpiffeId, AppError> {
    format!("spiffe://{trust_domain}/enforcer/node/{}", config.node_name)
        .parse()
        .map_err(|_| AppError::NodeName(config.node_name.clone()))
}

/// Attach the programs to the scope cgroup and pin them, or adopt the pins of an earlier run.
fn install(config: &Config) -> Result<(Datapath, PathBuf, PathBuf), AppError> {
    let mount = cgroup2_mount()?;
    let scope = mount.join(config.kernel.scope_cgroup.trim_start_matches('/'));
    let datapath = Datapath::install(&DatapathOptions::new(&config.kernel.pin_dir, &scope))?;
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
    Ok((datapath, mount, scope))
}

/// Register the listeners in the kernel's listener map, then tell it the ports and this
/// namespace; forget the identities an earlier run left; open the socket tags the tunnel's
/// sockets make themselves known with.
fn program_kernel(
    (datapath, mount, scope): (Datapath, PathBuf, PathBuf),
    config: &Config,
    bound: &Bound,
) -> Result<(Kernel, SocketTags), AppError> {
    let mut maps = Maps::open(&datapath.pin_dir().join("maps"))?;
    let previous_version = maps.active_policy()?.version;
    let home = Netns::current().map_err(io_error("the daemon's own network namespace"))?;
    // Identity numbers are this run's (file order of the policy it compiles): the ones an
    // earlier run left would stamp connections with other workloads' identities. Until the
    // first scan, enrolled processes are attested when they connect.
    maps.clear_identities()?;
    let addrs = &bound.outbound_addrs;
    for (addr, listener) in addrs.iter().zip(&bound.outbound) {
        let slot = match addr {
            SocketAddr::V4(_) => ListenerSlot::Outbound4,
            SocketAddr::V6(_) => ListenerSlot::Outbound6,
        };
        maps.set_listener(slot, listener.as_fd())?;
    }
    let inbound_slot = match bound.inbound_addr {
        SocketAddr::V4(_) => ListenerSlot::Inbound4,
        SocketAddr::V6(_) => ListenerSlot::Inbound6,
    };
    maps.set_listener(inbound_slot, bound.inbound.as_fd())?;
    let direct = same_node_direct(config);
    maps.set_config(&DaemonConfig {
        outbound_v4: addrs.iter().find_map(|a| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        }),
        outbound_v6: addrs.iter().find_map(|a| match a {
            SocketAddr::V6(a) => Some(*a.ip()),
            SocketAddr::V4(_) => None,
        }),
        outbound_port: config.tunnel.outbound_port,
        inbound_port: config.tunnel.inbound_addr.port(),
        netns_cookie: home.cookie(),
        kernel_flows: direct,
    })?;
    // Served from now on: this namespace, and (until the first scan finds which are still
    // there) the workload namespaces an earlier run served, whose ports the bind hooks keep.
    let mut served = maps.served();
    served.push(home.cookie());
    maps.replace_served(&served)?;
    let tags = datapath.socket_tags()?;
    let lookups = Maps::open(&datapath.pin_dir().join("maps"))?;
    let maps = Arc::new(Mutex::new(maps));
    let namespaces = Arc::new(Namespaces::new(home));
    let kernel_flows = Arc::new(KernelFlows::new(Arc::clone(&maps), Arc::clone(&namespaces)));
    // Their identity numbers were the earlier run's: closed, as a restart ends tunnelled flows.
    let closed = kernel_flows.close_all();
    if closed > 0 {
        tracing::info!(
            closed,
            "closed the same-node connections an earlier run authorized"
        );
    }
    let kernel = Kernel {
        datapath,
        maps,
        lookups: Arc::new(Mutex::new(lookups)),
        namespaces,
        mount,
        scope,
        previous_version,
        direct: kernel_flows,
        same_node_direct: direct,
    };
    Ok((kernel, tags))
}

/// Whether same-node flows go direct, authorized in the kernel: configured, and the kernel
/// can close one a reload denies.
fn same_node_direct(config: &Config) -> bool {
    if !config.kernel.same_node_direct {
        tracing::info!("same-node flows go through the daemon ([kernel] same_node_direct = false)");
        return false;
    }
    if KernelFlows::supported() {
        tracing::info!("same-node flows that policy allows go direct, authorized in the kernel");
        true
    } else {
        tracing::warn!(
            "this kernel cannot close a socket on request (CONFIG_INET_DIAG_DESTROY): same-node flows go through the daemon, which can close them when a reload denies them"
        );
        false
    }
}

/// Compile the policy, apply it to the kernel and publish it as the first policy in force.
/// Versions keep rising across restarts: every record names a distinct policy.
fn put_in_force(kernel: &Kernel, source: Source) -> Result<PolicyPublisher, AppError> {
    let version = kernel.previous_version + 1;
    let (in_force, missing_cgroups) = daemon::compile_and_apply(
        &kernel.maps,
        &kernel.mount,
        (&source.name, &source.text),
        source.policy,
        None,
        version,
    )?;
    for missing in &missing_cgroups {
        tracing::warn!(cgroup = %missing, "enrolled cgroup does not exist (yet)");
    }
    tracing::info!(
        trust_domain = %in_force.policy.trust_domain,
        policy = %in_force.name,
        version,
        hash = %in_force.hash,
        mode = ?in_force.policy.mode,
        workloads = in_force.policy.workloads.len(),
        rules = in_force.policy.rules.len(),
        "policy in force"
    );
    Ok(PolicyPublisher::new(in_force))
}

/// The node CA (loaded or created) as an SVID cache, the trust bundles, and the trust domain's
/// JWT signing key (loaded or created).
fn identity(
    config: &Config,
    trust_domain: &TrustDomain,
    now: SystemTime,
    (telemetry, changes): (&Arc<Telemetry>, &Changes),
) -> Result<(TrustBundleSet, Arc<Svids>, JwtAuthority), AppError> {
    let pki = load_or_init(&config.ca_dir(), trust_domain, &config.node_name, now)?;
    tracing::info!(ca_dir = %config.ca_dir().display(), %trust_domain, "node CA ready");
    let (jwt, created) = JwtAuthority::load_or_create(&config.ca_dir(), trust_domain)?;
    if created {
        tracing::warn!(
            ca_dir = %config.ca_dir().display(),
            kid = jwt.kid(),
            "created the trust domain's JWT signing key (jwt.key): give every node of the trust domain the same file, or JWT-SVIDs minted here do not validate there"
        );
    }
    let mut bundles = TrustBundleSet::new();
    bundles.insert(pki.bundle);
    let svids = Arc::new(SvidCache::new(
        SystemClock,
        MeteredIssuer {
            ca: pki.node,
            ttl: config.identity.svid_ttl,
            telemetry: Arc::clone(telemetry),
            changes: changes.clone(),
        },
        CacheConfig::default(),
    ));
    Ok((bundles, svids, jwt))
}

/// The audit log.
fn open_audit(config: &Config) -> Result<AuditLog, AppError> {
    Ok(AuditLog::open(
        AuditConfig::new(
            config.audit_path(),
            config.audit.max_bytes,
            config.audit.keep,
            config.audit.recent_bytes,
        ),
        &config.node_name,
    )?)
}

/// The tunnel, answering its questions from the kernel sources and recording to the audit log.
fn build_tunnel(
    config: &Config,
    node_id: SpiffeId,
    bundles: &Arc<TrustBundleSet>,
    svids: &Arc<Svids>,
    parts: &Parts,
    policy: &PolicySnapshot,
) -> Result<Tunnel, AppError> {
    Ok(Tunnel::new(TunnelParts {
        config: TunnelConfig {
            connect_timeout: config.tunnel.connect_timeout,
            handshake_timeout: config.tunnel.handshake_timeout,
            idle_timeout: Some(config.tunnel.idle_timeout),
            ..TunnelConfig::default()
        },
        node_id,
        bundles: Arc::clone(bundles),
        svids: Arc::clone(svids) as _,
        workloads: Arc::clone(&parts.sources) as _,
        origins: Arc::clone(&parts.sources) as _,
        records: Arc::new(parts.recorder.clone()),
        tags: Arc::clone(&parts.sources) as _,
        policy: policy.clone(),
    })?)
}

/// The metrics listener, when configured.
async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, AppError> {
    match config.metrics_addr {
        Some(addr) => Ok(Some(TcpListener::bind(addr).await.map_err(io_error(
            format!("failed to bind the metrics listener on {addr}"),
        ))?)),
        None => Ok(None),
    }
}

/// The tunnel's listeners, bound but not yet serving.
struct Bound {
    /// The redirect addresses the outbound listeners stand for (`127.0.0.1`, `[::1]`).
    outbound_addrs: Vec<SocketAddr>,
    outbound: Vec<TcpListener>,
    /// Where the inbound listener is bound.
    inbound_addr: SocketAddr,
    inbound: TcpListener,
}

/// Bind the outbound listeners for the redirect port and the inbound listener.
async fn bind_tunnel_listeners(config: &Config) -> Result<Bound, AppError> {
    let (outbound_addrs, outbound) = bind_outbound(config.tunnel.outbound_port).await?;
    let inbound = bind_free(config.tunnel.inbound_addr, "inbound").await?;
    let inbound_addr = inbound
        .local_addr()
        .map_err(io_error("inbound listener address"))?;
    Ok(Bound {
        outbound_addrs,
        outbound,
        inbound_addr,
        inbound,
    })
}

/// Bind the outbound listener for the redirect port on `127.0.0.1` and, when the host has IPv6
/// loopback, on `[::1]` (without it the kernel refuses enrolled IPv6 connects: fail closed).
/// The kernel hands the redirect port to these sockets; see [`bind_free`] for where they bind.
async fn bind_outbound(port: u16) -> Result<(Vec<SocketAddr>, Vec<TcpListener>), AppError> {
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
async fn bind_free(addr: SocketAddr, what: &str) -> Result<TcpListener, AppError> {
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
        Err(source) => Err(AppError::Io {
            what: format!("failed to bind the {what} listener on {addr}"),
            source,
        }),
    }
}

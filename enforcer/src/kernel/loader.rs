//! Loading, attaching, pinning, re-adopting and uninstalling the datapath.
//!
//! Pin layout under the daemon's bpffs directory `DIR`:
//! - `DIR/maps/<MAP>`: every map (the loader reuses existing pins, so state survives restarts);
//! - `DIR/links/<program>`: one `bpf_link` per program. A pinned link keeps its program attached
//!   after the daemon exits, so enforcement continues (fail-closed) while the daemon is down.
//!
//! Where each program attaches: the cgroup programs to the scope cgroup, `sk_lookup` to the
//! network namespace the daemon serves, the tracepoints and the LSM program globally. The LSM
//! program (which refuses packet sockets to enrolled processes) is attached only where the
//! kernel runs the BPF LSM; everything else is required.
//!
//! `install` loads and attaches when nothing is pinned, and re-adopts an existing installation
//! otherwise; `uninstall` removes the link pins (which detaches the programs) and the map pins.
#![forbid(unsafe_code)]

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    pin::PinError,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, Lsm, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
    },
};
use enforcer_ebpf::{DEFAULT_RING_BYTES, DEFAULT_TABLE_ENTRIES, map_names, program_names};

use super::{
    bpffs::{BpffsError, ensure_bpffs},
    btf::{BtfError, running_layout},
    events::{EventError, EventReader},
    features::{self, FeatureError},
    maps::{Maps, MapsError},
};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

/// Every program an installation must have, in attach order; also the link pin names.
pub(crate) const PROGRAMS: [&str; 14] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::BIND4,
    program_names::BIND6,
    program_names::SOCK_CREATE,
    program_names::SOCK_OPS,
    program_names::INGRESS,
    program_names::EGRESS,
    program_names::SK_LOOKUP,
    program_names::EXEC,
    program_names::EXIT,
    program_names::CGROUP_MKDIR,
    program_names::CGROUP_RMDIR,
    program_names::CGROUP_ATTACH,
];

/// The programs that attach to BTF tracepoints, with their tracepoints.
pub(crate) const TRACEPOINTS: [(&str, &str); 5] = [
    (program_names::EXEC, "sched_process_exec"),
    (program_names::EXIT, "sched_process_exit"),
    (program_names::CGROUP_MKDIR, "cgroup_mkdir"),
    (program_names::CGROUP_RMDIR, "cgroup_rmdir"),
    (program_names::CGROUP_ATTACH, "cgroup_attach_task"),
];

/// The optional LSM program and its hook: attached only where the BPF LSM runs.
pub(crate) const LSM: (&str, &str) = (program_names::SOCKET_LSM, "socket_create");

/// The kernel's list of active LSMs; the BPF LSM runs when it names `bpf`.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";

/// Errors of the loader.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// bpffs could not be found or mounted.
    #[error("bpffs is not available")]
    Bpffs(#[from] BpffsError),
    /// The running kernel lacks something the programs need.
    #[error(transparent)]
    Kernel(#[from] FeatureError),
    /// A file or directory operation failed.
    #[error("{operation} {}", path.display())]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Kernel BTF could not be read (needed by the tracepoints).
    #[error("failed to read kernel BTF from /sys/kernel/btf/vmlinux")]
    Btf(#[source] aya::BtfError),
    /// The kernel structure offsets the cgroup tracepoints read could not be found.
    #[error("failed to find the kernel structure layout")]
    Layout(#[from] BtfError),
    /// The object could not be loaded.
    #[error("failed to load the eBPF object")]
    Object(#[source] Box<EbpfError>),
    /// A program is missing from the object.
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded or attached.
    #[error("program {name}: {operation} failed")]
    Program {
        /// The program.
        name: &'static str,
        /// What was attempted.
        operation: &'static str,
        /// Why.
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be converted, pinned or opened.
    #[error("link of program {name}")]
    Link {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// A link could not be pinned.
    #[error("failed to pin link {}", path.display())]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// Why.
        #[source]
        source: PinError,
    },
    /// The pins in the directory are not a complete installation.
    #[error("incomplete installation in {}: link {missing} is not pinned (run `enforcer uninstall`)", dir.display())]
    Incomplete {
        /// The pin directory.
        dir: PathBuf,
        /// The first missing link.
        missing: &'static str,
    },
    /// Unpinned links were still attached after the timeout (something else holds them).
    #[error("programs still attached {timeout:?} after their links were unpinned")]
    StillAttached {
        /// How long was waited.
        timeout: Duration,
    },
    /// The maps could not be opened.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The event ring buffer could not be opened.
    #[error(transparent)]
    Events(#[from] EventError),
}

/// Where and how to install the datapath.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// The daemon's directory on bpffs (its parent must be, or become, a bpffs mount).
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory the hooks attach to: they see every process below it.
    pub scope_cgroup: PathBuf,
    /// The network namespace whose connections to the daemon's ports `sk_lookup` hands to the
    /// daemon's listeners (a `/proc/<pid>/ns/net` or `/run/netns/<name>` file).
    pub netns: PathBuf,
    /// Byte size of the event ring buffer (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Capacity of the services table (listening sockets of enrolled processes).
    pub service_entries: u32,
}

impl DatapathOptions {
    /// Options with the default sizes, steering in the caller's network namespace.
    #[must_use]
    pub fn new(pin_dir: impl Into<PathBuf>, scope_cgroup: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            scope_cgroup: scope_cgroup.into(),
            netns: PathBuf::from("/proc/self/ns/net"),
            ring_bytes: DEFAULT_RING_BYTES,
            service_entries: DEFAULT_TABLE_ENTRIES,
        }
    }
}

/// Run-time statistics of one attached program (from `kernel.bpf_stats_enabled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's name.
    pub name: &'static str,
    /// How many times it ran since stats were enabled.
    pub run_count: u64,
    /// Total time spent in it, in nanoseconds.
    pub run_time_ns: u64,
}

/// An installed datapath: programs attached through pinned links, and handles to its maps.
pub struct Datapath {
    pin_dir: PathBuf,
    maps: Maps,
    /// Whether this call attached the programs (false: an existing installation was adopted).
    fresh: bool,
}

impl Datapath {
    /// Load and attach the programs and pin everything, or adopt what is already pinned.
    pub fn install(options: &DatapathOptions) -> Result<Self, LoadError> {
        if let Some(bpffs_root) = options.pin_dir.parent() {
            ensure_bpffs(bpffs_root)?;
        }
        if links_dir(&options.pin_dir).exists() {
            return Self::adopt(&options.pin_dir);
        }
        if let Err(error) = load_and_attach(options) {
            // Leave nothing half-installed behind.
            let _ = Self::uninstall(&options.pin_dir);
            return Err(error);
        }
        let mut datapath = Self::adopt(&options.pin_dir)?;
        datapath.fresh = true;
        Ok(datapath)
    }

    /// Re-adopt an installation pinned in `pin_dir` (after a daemon restart).
    pub fn adopt(pin_dir: &Path) -> Result<Self, LoadError> {
        let links = links_dir(pin_dir);
        if let Some(missing) = PROGRAMS.into_iter().find(|name| !links.join(name).exists()) {
            return Err(LoadError::Incomplete {
                dir: pin_dir.to_owned(),
                missing,
            });
        }
        let mut maps = Maps::open(&maps_dir(pin_dir))?;
        maps.set_layout(&running_layout()?)?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            maps,
            fresh: false,
        })
    }

    /// Remove every pin under `pin_dir`: the links (detaching the programs) and the maps.
    /// Removing an installation that is not there is not an error.
    ///
    /// The kernel releases an unpinned link asynchronously (it frees the link's id before it
    /// detaches), so this waits, up to [`DETACH_TIMEOUT`], until every program the links held
    /// is unloaded: a program is freed only after its last link detached it. When this
    /// returns, no program of this installation runs any more.
    pub fn uninstall(pin_dir: &Path) -> Result<(), LoadError> {
        let program_ids: Vec<u32> = PROGRAMS
            .into_iter()
            .chain([LSM.0])
            .filter_map(|name| PinnedLink::from_pin(links_dir(pin_dir).join(name)).ok())
            .filter_map(|link| FdLink::from(link).info().ok())
            .map(|info| info.program_id())
            .collect();
        for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(io_error("failed to list", &dir)(source)),
            };
            for entry in entries {
                let path = entry.map_err(io_error("failed to list", &dir))?.path();
                std::fs::remove_file(&path).map_err(io_error("failed to remove", &path))?;
            }
            std::fs::remove_dir(&dir).map_err(io_error("failed to remove", &dir))?;
        }
        match std::fs::remove_dir(pin_dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error("failed to remove", pin_dir)(source)),
        }
        wait_until_unloaded(&program_ids)
    }

    /// Whether this value attached the programs itself (false when it adopted existing pins).
    #[must_use]
    pub fn attached_now(&self) -> bool {
        self.fresh
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The maps.
    #[must_use]
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps, for writing.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// A handle for tagging the daemon's own sockets.
    pub fn socket_tags(&self) -> Result<super::SocketTags, LoadError> {
        Ok(super::SocketTags::open(&maps_dir(&self.pin_dir))?)
    }

    /// A reader of the event ring buffer.
    pub fn events(&self) -> Result<EventReader, LoadError> {
        Ok(EventReader::open(&maps_dir(&self.pin_dir))?)
    }

    /// Whether the LSM program that refuses packet sockets to enrolled processes is attached
    /// (the kernel runs the BPF LSM).
    #[must_use]
    pub fn refuses_packet_sockets(&self) -> bool {
        links_dir(&self.pin_dir).join(LSM.0).exists()
    }

    /// Run counts and times of the attached programs (zero unless `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, LoadError> {
        let mut ids = Vec::with_capacity(PROGRAMS.len() + 1);
        let optional = self.refuses_packet_sockets().then_some(LSM.0);
        for name in PROGRAMS.into_iter().chain(optional) {
            let link = PinnedLink::from_pin(links_dir(&self.pin_dir).join(name))
                .map_err(|source| LoadError::Link { name, source })?;
            let info = FdLink::from(link)
                .info()
                .map_err(|source| LoadError::Link { name, source })?;
            ids.push((name, info.program_id()));
        }
        let mut stats: Vec<ProgramStats> = ids
            .iter()
            .map(|&(name, _)| ProgramStats {
                name,
                run_count: 0,
                run_time_ns: 0,
            })
            .collect();
        for info in loaded_programs().filter_map(Result::ok) {
            if let Some(index) = ids.iter().position(|&(_, id)| id == info.id()) {
                stats[index].run_count = info.run_count();
                stats[index].run_time_ns =
                    u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            }
        }
        Ok(stats)
    }
}

/// How long [`Datapath::uninstall`] waits for the kernel to release unpinned links.
pub(super) const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait until none of the programs `ids` is loaded any more.
fn wait_until_unloaded(ids: &[u32]) -> Result<(), LoadError> {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let alive = loaded_programs()
            .filter_map(Result::ok)
            .any(|info| ids.contains(&info.id()));
        if !alive {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LoadError::StillAttached {
                timeout: DETACH_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LoadError {
    let path = path.to_owned();
    move |source| LoadError::Io {
        operation,
        path,
        source,
    }
}

fn program_error(
    name: &'static str,
    operation: &'static str,
) -> impl FnOnce(ProgramError) -> LoadError {
    move |source| LoadError::Program {
        name,
        operation,
        source: Box::new(source),
    }
}

/// Load the object (reusing pinned maps), attach every program and pin its link.
///
/// Cgroup attachments are `bpf_link`s, which the kernel always attaches in multi mode (other
/// programs on the same cgroup keep running); `CgroupAttachMode::Single` is the mode links
/// accept.
fn load_and_attach(options: &DatapathOptions) -> Result<(), LoadError> {
    features::check_running()?;
    let maps = maps_dir(&options.pin_dir);
    let links = links_dir(&options.pin_dir);
    for dir in [&maps, &links] {
        std::fs::create_dir_all(dir).map_err(io_error("failed to create", dir))?;
    }
    let cgroup = File::open(&options.scope_cgroup)
        .map_err(io_error("failed to open cgroup", &options.scope_cgroup))?;
    let netns =
        File::open(&options.netns).map_err(io_error("failed to open netns", &options.netns))?;
    let btf = Btf::from_sys_fs().map_err(LoadError::Btf)?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .default_map_pin_directory(&maps)
        .map_max_entries(map_names::EVENTS, options.ring_bytes)
        .map_max_entries(map_names::SERVICES, options.service_entries)
        .load(OBJECT)
        .map_err(|error| LoadError::Object(Box::new(error)))?;
    // The tracepoints read kernel structures at these offsets: set them before they run.
    Maps::open(&maps)?.set_layout(&running_layout()?)?;

    attach_sock_addr(&mut ebpf, &cgroup, &links)?;

    let name = program_names::SOCK_CREATE;
    let sock_create: &mut CgroupSock = program(&mut ebpf, name)?;
    sock_create.load().map_err(program_error(name, "load"))?;
    let id = sock_create
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(program_error(name, "attach"))?;
    let link = sock_create
        .take_link(id)
        .map_err(program_error(name, "take link"))?;
    pin(FdLink::try_from(link), name, &links)?;

    let name = program_names::SOCK_OPS;
    let sock_ops: &mut SockOps = program(&mut ebpf, name)?;
    sock_ops.load().map_err(program_error(name, "load"))?;
    let id = sock_ops
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(program_error(name, "attach"))?;
    let link = sock_ops
        .take_link(id)
        .map_err(program_error(name, "take link"))?;
    pin(FdLink::try_from(link), name, &links)?;

    for (name, direction) in [
        (program_names::INGRESS, CgroupSkbAttachType::Ingress),
        (program_names::EGRESS, CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = program(&mut ebpf, name)?;
        program.load().map_err(program_error(name, "load"))?;
        let id = program
            .attach(&cgroup, direction, CgroupAttachMode::Single)
            .map_err(program_error(name, "attach"))?;
        let link = program
            .take_link(id)
            .map_err(program_error(name, "take link"))?;
        pin(FdLink::try_from(link), name, &links)?;
    }

    let name = program_names::SK_LOOKUP;
    let steer: &mut SkLookup = program(&mut ebpf, name)?;
    steer.load().map_err(program_error(name, "load"))?;
    let id = steer
        .attach(&netns)
        .map_err(program_error(name, "attach"))?;
    let link = steer
        .take_link(id)
        .map_err(program_error(name, "take link"))?;
    pin(Ok(FdLink::from(link)), name, &links)?;

    for (name, tracepoint) in TRACEPOINTS {
        let program: &mut BtfTracePoint = program(&mut ebpf, name)?;
        program
            .load(tracepoint, &btf)
            .map_err(program_error(name, "load"))?;
        let id = program.attach().map_err(program_error(name, "attach"))?;
        let link = program
            .take_link(id)
            .map_err(program_error(name, "take link"))?;
        pin(Ok(FdLink::from(link)), name, &links)?;
    }

    if bpf_lsm_active() {
        if let Err(error) = attach_lsm(&mut ebpf, &btf, &links) {
            tracing::warn!(
                error = %crate::report::report(&error),
                "the kernel lists the BPF LSM but refused its program: packet sockets of enrolled processes are not refused"
            );
        }
    } else {
        tracing::warn!(
            "the kernel does not run the BPF LSM: packet sockets of enrolled processes are not refused"
        );
    }
    Ok(())
}

/// Load and attach the LSM program and pin its link.
/// Attach the connect and bind hooks to `cgroup` and pin their links in `links`.
fn attach_sock_addr(ebpf: &mut Ebpf, cgroup: &File, links: &Path) -> Result<(), LoadError> {
    for name in [
        program_names::CONNECT4,
        program_names::CONNECT6,
        program_names::BIND4,
        program_names::BIND6,
    ] {
        let program: &mut CgroupSockAddr = program(ebpf, name)?;
        program.load().map_err(program_error(name, "load"))?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error(name, "attach"))?;
        let link = program
            .take_link(id)
            .map_err(program_error(name, "take link"))?;
        pin(FdLink::try_from(link), name, links)?;
    }
    Ok(())
}

fn attach_lsm(ebpf: &mut Ebpf, btf: &Btf, links: &Path) -> Result<(), LoadError> {
    let (name, hook) = LSM;
    let program: &mut Lsm = program(ebpf, name)?;
    program
        .load(hook, btf)
        .map_err(program_error(name, "load"))?;
    let id = program.attach().map_err(program_error(name, "attach"))?;
    let link = program
        .take_link(id)
        .map_err(program_error(name, "take link"))?;
    pin(Ok(FdLink::from(link)), name, links)
}

/// Whether the running kernel runs the BPF LSM (`lsm=...,bpf` in the active list, read from
/// securityfs, which is mounted when it is not).
fn bpf_lsm_active() -> bool {
    if !Path::new(ACTIVE_LSMS).exists() {
        let mounted = rustix::mount::mount(
            "securityfs",
            "/sys/kernel/security",
            "securityfs",
            rustix::mount::MountFlags::empty(),
            None,
        );
        if let Err(error) = mounted {
            tracing::debug!(%error, "failed to mount securityfs");
        }
    }
    std::fs::read_to_string(ACTIVE_LSMS)
        .is_ok_and(|lsms| lsms.trim().split(',').any(|lsm| lsm == "bpf"))
}

/// The program `name` of `ebpf`, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name, "type check"))
}

/// Pin a link as `links/name`; the pin keeps the program attached after this process exits.
fn pin(link: Result<FdLink, LinkError>, name: &'static str, links: &Path) -> Result<(), LoadError> {
    let path = links.join(name);
    link.map_err(|source| LoadError::Link { name, source })?
        .pin(&path)
        .map_err(|source| LoadError::Pin { path, source })?;
    Ok(())
}

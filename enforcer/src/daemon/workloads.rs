//! The registrar: finds the processes of enrolled cgroups, attests them, and gives each the
//! identity number of the workload entry it matches in the kernel, for the image generation it
//! attested (so `connect()` can be refused before a packet leaves, and an exec or a cgroup move
//! since voids it). The kernel records the listening sockets of enrolled processes itself; the
//! registrar adopts the ones it could not see start listening (sockets older than the datapath,
//! or carried into an enrolled cgroup), and forgets services nobody listens on any more. It
//! runs at start-up, on every rescan tick, on each policy change, and for single processes on
//! the kernel's listen, exec and move events.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
use tokio::sync::Notify;

use super::{
    namespaces::Namespaces,
    sockets::{self, Listener},
    telemetry::Telemetry,
};
use crate::{
    attest::{Attestor, ContainerInfo, ProcessFacts},
    identity::SpiffeId,
    kernel::{ListenerOwner, Maps},
    policy::{Identification, Identities, PolicySnapshot},
    report::report,
};

/// Deepest cgroup nesting below an enrolled cgroup that is scanned (the kernel looks 16
/// levels up, so nothing deeper is enrolled anyway).
const MAX_DEPTH: usize = 16;

/// One process of an enrolled cgroup, as `enforcer workloads` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WorkloadInfo {
    /// Process id.
    pub(crate) pid: u32,
    /// Its binary.
    pub(crate) exe: String,
    /// SHA-256 of the running binary.
    pub(crate) sha256: String,
    /// cgroup v2 path.
    pub(crate) cgroup: String,
    /// cgroup id.
    pub(crate) cgroup_id: Option<u64>,
    /// Effective uid.
    pub(crate) uid: u32,
    /// The identity it was given.
    pub(crate) spiffe_id: Option<SpiffeId>,
    /// The workload entry that matched (1-based, file order).
    pub(crate) entry: Option<usize>,
    /// `matched`, `unmatched`, `ambiguous` or `refused`.
    pub(crate) state: &'static str,
    /// Why the entry that matched gave no identity (state `refused`).
    pub(crate) reason: Option<String>,
    /// TCP addresses it listens on.
    pub(crate) listening: Vec<SocketAddr>,
    /// The image generation it was attested for.
    pub(crate) generation: u64,
    /// The inode of its network namespace.
    pub(crate) netns: u64,
    /// The container it runs in and the pod it belongs to, from its cgroup path.
    pub(crate) container: ContainerInfo,
}

/// Where a process comes from, as audit records name it.
pub(crate) struct Provenance {
    /// Its binary.
    pub(crate) exe: String,
    /// SHA-256 of the running binary.
    pub(crate) sha256: String,
    /// cgroup v2 path.
    pub(crate) cgroup: String,
    /// The container it runs in and the pod it belongs to, from its cgroup path.
    pub(crate) container: ContainerInfo,
}

/// Attests and registers the processes of enrolled cgroups.
pub(crate) struct Registrar {
    attestor: Arc<Attestor>,
    maps: Arc<Mutex<Maps>>,
    namespaces: Arc<Namespaces>,
    mount: PathBuf,
    policy: PolicySnapshot,
    table: Mutex<BTreeMap<u32, WorkloadInfo>>,
    /// Listening sockets already adopted or found known to the kernel: (pid, inode).
    adopted: Mutex<HashSet<(u32, u64)>>,
    telemetry: Arc<Telemetry>,
    /// Woken when the set of network namespaces the registered processes live in changes.
    namespaces_changed: Arc<Notify>,
}

impl Registrar {
    /// A registrar writing to `maps`, resolving enrolled paths below `mount` and identities
    /// in the policy in force.
    pub(crate) fn new(
        attestor: Arc<Attestor>,
        (maps, namespaces): (Arc<Mutex<Maps>>, Arc<Namespaces>),
        mount: PathBuf,
        policy: PolicySnapshot,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            attestor,
            maps,
            namespaces,
            mount,
            policy,
            table: Mutex::new(BTreeMap::new()),
            adopted: Mutex::new(HashSet::new()),
            telemetry,
            namespaces_changed: Arc::new(Notify::new()),
        }
    }

    /// Woken whenever the set of network namespaces the registered processes live in changes
    /// (see [`Registrar::namespaces`]).
    pub(crate) fn namespaces_changed(&self) -> Arc<Notify> {
        Arc::clone(&self.namespaces_changed)
    }

    /// The network namespaces (by inode) the registered processes live in, each with one of
    /// its processes.
    pub(crate) fn namespaces(&self) -> HashMap<u64, u32> {
        self.table()
            .values()
            .map(|info| (info.netns, info.pid))
            .collect()
    }

    /// Register every process of every enrolled cgroup, and forget processes that left.
    /// Returns how many processes were seen.
    pub(crate) fn rescan(&self) -> usize {
        let in_force = self.policy.load();
        let identities = &in_force.identities;
        let mut pids = Vec::new();
        for path in &identities.enroll {
            collect_pids(&self.mount.join(path.trim_start_matches('/')), 0, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        // Stale services first: a listener waiting for its address takes it over in this scan.
        self.forget_stale_services();
        for &pid in &pids {
            self.register_with(identities, pid);
        }
        let before = self.namespaces().len();
        self.table()
            .retain(|pid, _| pids.binary_search(pid).is_ok());
        if self.namespaces().len() != before {
            self.namespaces_changed.notify_one();
        }
        self.adopted()
            .retain(|(pid, _)| pids.binary_search(pid).is_ok());
        self.forget_identities_outside(&pids, &identities.enroll);
        pids.len()
    }

    /// Take the kernel identity of every process that is neither in `scanned` (sorted) nor, read
    /// again now, in a cgroup below one of `enroll`: one whose cgroup left the policy keeps no
    /// identity a reused pid could inherit, and one that started during the scan keeps its own.
    fn forget_identities_outside(&self, scanned: &[u32], enroll: &[String]) {
        let mut maps = self.maps();
        for pid in maps.identity_pids() {
            if scanned.binary_search(&pid).is_ok() || in_enrolled_cgroup(pid, enroll) {
                continue;
            }
            if let Err(error) = maps.remove_identity(pid) {
                tracing::warn!(pid, error = %report(&error), "failed to forget an identity");
            }
        }
    }

    /// Register one process (after the kernel reported it started listening, exec'd or moved
    /// to another cgroup).
    pub(crate) fn register(&self, pid: u32) {
        self.register_with(&self.policy.load().identities, pid);
    }

    /// Forget a process that exited.
    pub(crate) fn forget(&self, pid: u32) {
        self.attestor.forget(pid);
        self.remove(pid);
        self.adopted().retain(|&(owner, _)| owner != pid);
    }

    /// Take `pid` out of the table; the last process of a namespace wakes the namespace server.
    fn remove(&self, pid: u32) {
        let mut table = self.table();
        if let Some(info) = table.remove(&pid)
            && !table.values().any(|other| other.netns == info.netns)
        {
            self.namespaces_changed.notify_one();
        }
    }

    /// A process that exec'd or moved: its cached attestation describes its old image.
    pub(crate) fn reattest(&self, pid: u32) {
        self.attestor.forget(pid);
        self.register(pid);
    }

    /// Every registered process, by pid.
    pub(crate) fn workloads(&self) -> Vec<WorkloadInfo> {
        self.table().values().cloned().collect()
    }

    /// What an audit record says of process `pid`: from its registered entry, else from a
    /// fresh attestation (the process may be gone: then nothing).
    pub(crate) fn provenance(&self, pid: u32) -> Option<Provenance> {
        if let Some(info) = self.table().get(&pid) {
            return Some(Provenance {
                exe: info.exe.clone(),
                sha256: info.sha256.clone(),
                cgroup: info.cgroup.clone(),
                container: info.container.clone(),
            });
        }
        let generation = self.maps().generation(pid).ok()?;
        let facts = self.attestor.attest_for(pid, generation).ok()?;
        Some(Provenance {
            exe: facts.exe.display().to_string(),
            sha256: facts.sha256.to_string(),
            cgroup: facts.cgroup,
            container: facts.container,
        })
    }

    /// The container and pod of the registered processes in cgroup `cgroup_id` (the owner of
    /// a socket the kernel reported by its cgroup), if any is registered.
    pub(crate) fn container_of_cgroup(&self, cgroup_id: u64) -> Option<ContainerInfo> {
        self.table()
            .values()
            .find(|info| info.cgroup_id == Some(cgroup_id))
            .map(|info| info.container.clone())
    }

    fn register_with(&self, identities: &Identities, pid: u32) {
        let started = Instant::now();
        // The generation before attesting: an identity written for it is void if the process
        // exec'd or moved meanwhile, however the two race.
        let generation = self.maps().generation(pid).unwrap_or_default();
        let facts = match self.attestor.attest_for(pid, generation) {
            Ok(facts) => {
                self.telemetry.attested(started.elapsed(), true);
                facts
            }
            Err(error) => {
                self.telemetry.attested(started.elapsed(), false);
                tracing::debug!(pid, error = %report(&error), "attestation failed");
                self.remove(pid);
                return;
            }
        };
        let identification = identities.registry.identify(&facts);
        let number = match &identification {
            Identification::Matched { id, .. } => identities.numbers.get(id),
            Identification::Unmatched | Identification::Refused { .. } => None,
            Identification::Ambiguous(ids) => {
                tracing::warn!(pid, exe = %facts.exe.display(), ?ids, "several workload entries match; no identity given");
                None
            }
        };
        let listeners = sockets::listeners_of(pid);
        self.program(pid, number, generation);
        let holder = ListenerOwner {
            tgid: pid,
            cgroup_id: facts.cgroup_id.unwrap_or_default(),
            generation,
        };
        self.adopt_listeners(holder, facts.netns, &listeners);
        let listening = listeners.iter().map(|listener| listener.addr).collect();
        let info = describe(&facts, &identification, listening, generation);
        let mut table = self.table();
        if !table.values().any(|other| other.netns == info.netns) {
            self.namespaces_changed.notify_one();
        }
        if table.get(&pid) != Some(&info) {
            tracing::info!(
                pid,
                exe = %info.exe,
                cgroup = %info.cgroup,
                id = info.spiffe_id.as_ref().map_or("-", AsRef::as_ref),
                listening = ?info.listening,
                "workload registered"
            );
        }
        table.insert(pid, info);
    }

    /// Give `pid` its identity number for image `generation` in the kernel (or take it away).
    /// An entry written while the process exec'd or exited is taken back at once: the kernel
    /// bumped the generation before the write, and a reused pid must never find it.
    fn program(&self, pid: u32, number: Option<u32>, generation: u64) {
        let mut maps = self.maps();
        let result = match number {
            Some(number) if maps.identity(pid).ok().flatten() != Some(number) => {
                maps.set_identity(pid, number, generation).and_then(|()| {
                    if maps.generation(pid)? == generation {
                        Ok(())
                    } else {
                        maps.remove_identity(pid)
                    }
                })
            }
            Some(_) => Ok(()),
            None => maps.remove_identity(pid),
        };
        if let Err(error) = result {
            tracing::warn!(pid, error = %report(&error), "failed to set a process's identity");
        }
    }

    /// Protect and record the listening sockets `holder` holds that the kernel did not see
    /// start listening, or whose owner is no longer the image that took them (it exec'd or
    /// exited, and `holder` inherited or was passed the socket): taken from the process with
    /// `pidfd_getfd`, checked to be the same socket, then tagged and recorded like the kernel
    /// does. A socket whose address another listener holds (a shared `SO_REUSEPORT`
    /// group) is protected and tried again at the next scan, so it takes the address over once
    /// the holder is gone.
    fn adopt_listeners(&self, holder: ListenerOwner, netns: u64, listeners: &[Listener]) {
        let pid = holder.tgid;
        // Until its namespace is served, a listener seen once counts as settled.
        let cookie = self.namespaces.cookie_of_inode(netns);
        self.adopted().retain(|&(owner, inode)| {
            owner != pid || listeners.iter().any(|listener| listener.inode == inode)
        });
        for listener in listeners {
            // Nothing to do while the address's service has a valid owner, and this socket is
            // either that owner's own or was looked at before.
            let seen = self.adopted().contains(&(pid, listener.inode));
            let settled = match cookie {
                Some(cookie) => {
                    let maps = self.maps();
                    maps.service(cookie, listener.addr)
                        .ok()
                        .flatten()
                        .filter(|service| {
                            maps.generation(service.tgid).ok() == Some(service.generation)
                        })
                        .is_some_and(|service| {
                            service.tgid == pid && service.generation == holder.generation || seen
                        })
                }
                None => seen,
            };
            if !settled {
                match self.adopt(holder, listener) {
                    Ok(true) => {
                        tracing::info!(pid, addr = %listener.addr, "protected a listening socket the kernel did not see start listening, or whose owner changed");
                    }
                    Ok(false) => {
                        tracing::debug!(pid, addr = %listener.addr, "a listening socket shares its address with another's: protected, the address stays the other's");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(pid, addr = %listener.addr, %error, "failed to protect a listening socket");
                        continue;
                    }
                }
            }
            self.adopted().insert((pid, listener.inode));
        }
    }

    /// Protect one listener `holder` holds; whether it is its address's service.
    fn adopt(&self, holder: ListenerOwner, listener: &Listener) -> Result<bool, String> {
        let process =
            Pid::from_raw(i32::try_from(holder.tgid).map_err(|e| e.to_string())?).ok_or("pid 0")?;
        let pidfd = pidfd_open(process, PidfdFlags::empty()).map_err(|e| e.to_string())?;
        let socket = pidfd_getfd(&pidfd, listener.fd, PidfdGetfdFlags::empty())
            .map_err(|e| format!("pidfd_getfd: {e}"))?;
        let inode = rustix::fs::fstat(&socket)
            .map_err(|e| e.to_string())?
            .st_ino;
        if inode != listener.inode {
            return Err(format!(
                "descriptor {} no longer holds socket {}",
                listener.fd, listener.inode
            ));
        }
        self.maps()
            .adopt_listener(socket.as_fd(), listener.addr, holder)
            .map_err(|error| report(&error))
    }

    /// Forget services whose owner is gone (a listener the kernel recorded is removed when it
    /// closes; one the daemon adopted, or one a child inherited, is removed here, and whoever
    /// still listens there is adopted again by the scan that follows).
    fn forget_stale_services(&self) {
        let stale: Vec<(u64, SocketAddr, u64)> = self
            .maps()
            .services()
            .into_iter()
            .filter(|(_, _, service)| !Path::new(&format!("/proc/{}", service.tgid)).exists())
            .map(|(netns, addr, service)| (netns, addr, service.cookie))
            .collect();
        let mut maps = self.maps();
        for (netns, addr, cookie) in stale {
            if let Err(error) = maps.remove_service(netns, addr, cookie) {
                tracing::warn!(%addr, error = %report(&error), "failed to forget a stale service");
            }
        }
    }

    fn adopted(&self) -> MutexGuard<'_, HashSet<(u32, u64)>> {
        self.adopted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<u32, WorkloadInfo>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn describe(
    facts: &ProcessFacts,
    identification: &Identification,
    listening: Vec<SocketAddr>,
    generation: u64,
) -> WorkloadInfo {
    let (spiffe_id, entry, state) = match identification {
        Identification::Matched { id, entry } => (Some(id.clone()), Some(entry + 1), "matched"),
        Identification::Unmatched => (None, None, "unmatched"),
        Identification::Ambiguous(_) => (None, None, "ambiguous"),
        Identification::Refused { entry, .. } => (None, Some(entry + 1), "refused"),
    };
    let reason = match identification {
        Identification::Refused { reasons, .. } => Some(
            reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    };
    WorkloadInfo {
        pid: facts.pid,
        exe: facts.exe.display().to_string(),
        sha256: facts.sha256.to_string(),
        cgroup: facts.cgroup.clone(),
        cgroup_id: facts.cgroup_id,
        uid: facts.uid,
        spiffe_id,
        entry,
        state,
        reason,
        listening,
        generation,
        netns: facts.netns,
        container: facts.container.clone(),
    }
}

/// Whether process `pid` is now in a cgroup at or below one of `enroll` (paths from the
/// cgroup v2 root, like `/proc/<pid>/cgroup` gives them).
pub(super) fn in_enrolled_cgroup(pid: u32, enroll: &[String]) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.strip_prefix("0::"))
        .any(|path| enroll.iter().any(|entry| below(path, entry)))
}

/// Whether cgroup `path` is `entry` or below it (whole components: `/a/bc` is not below `/a/b`).
pub(super) fn below(path: &str, entry: &str) -> bool {
    path.strip_prefix(entry)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The pids of `dir` and the cgroups below it, down to [`MAX_DEPTH`] levels.
fn collect_pids(dir: &Path, depth: usize, pids: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            text.lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            collect_pids(&entry.path(), depth + 1, pids);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{below, collect_pids, describe};
    use crate::{
        attest::{ContainerInfo, LoadedCodeIssue, MappingProblem, ProcessFacts, Sha256Digest},
        policy::Identification,
    };

    #[test]
    fn a_refused_process_shows_its_entry_and_reason_but_no_identity() {
        let reasons = vec![
            LoadedCodeIssue::LoaderVariable {
                name: "LD_PRELOAD",
                value: "/tmp/evil.so".into(),
            },
            LoadedCodeIssue::Mapping {
                path: "/tmp/evil.so".into(),
                problem: MappingProblem::Owner(1000),
            },
        ];
        let facts = ProcessFacts {
            pid: 7,
            start_time: 1,
            uid: 1000,
            gid: 1000,
            user: None,
            group: None,
            exe: PathBuf::from("/usr/bin/web"),
            sha256: Sha256Digest([0; 32]),
            cgroup: "/web".into(),
            cgroup_id: None,
            container: ContainerInfo::default(),
            netns: 1,
            loaded_code: reasons.clone(),
        };
        let refused = Identification::Refused {
            id: "spiffe://x/web".parse().unwrap(),
            entry: 2,
            reasons,
        };
        let info = describe(&facts, &refused, Vec::new(), 0);
        assert_eq!(
            (info.spiffe_id, info.entry, info.state),
            (None, Some(3), "refused")
        );
        assert_eq!(
            info.reason.as_deref(),
            Some(
                "the initial environment sets LD_PRELOAD=\"/tmp/evil.so\"; \
                 executable mapping of /tmp/evil.so: owned by uid 1000, not root"
            )
        );
    }

    #[test]
    fn collects_pids_of_nested_cgroups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a").join("b");
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(dir.path().join("cgroup.procs"), "1\n2\n").expect("write");
        std::fs::write(nested.join("cgroup.procs"), "30\n").expect("write");
        let mut pids = Vec::new();
        collect_pids(dir.path(), 0, &mut pids);
        pids.sort_unstable();
        assert_eq!(pids, [1, 2, 30]);
        let mut none = Vec::new();
        collect_pids(&dir.path().join("missing"), 0, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn a_cgroup_is_below_an_entry_by_whole_components() {
        assert!(below("/a/b", "/a/b"));
        assert!(below("/a/b/c", "/a/b"));
        assert!(!below("/a/bc", "/a/b"));
        assert!(!below("/a", "/a/b"));
    }
}

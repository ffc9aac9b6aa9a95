//! Typed, validated access to the pinned maps.
//!
//! Every writer checks its keys and values before they reach the kernel and names the offending
//! entry on error; a rejected write changes nothing. The policy is double-buffered: a new table
//! is written into the inactive slot and becomes visible to the programs in one word write that
//! flips the active slot, so each `connect()` sees the old policy or the new one, never a mix.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray, SkStorage, SockMap,
    lpm_trie::{Key, LpmTrie},
};
use enforcer_ebpf::{
    Config, Counter, EgressKey, EgressRule, IdentityEntry, KernelFlow as RawKernelFlow, Layout,
    MAX_PATH_BYTES, NsSockKey, OrigDst, PolicyEntry, PolicyKey, PolicyMeta, Service, SockTag,
    UNKNOWN_IDENTITY, map_names, path_hash,
};

use super::{
    addr::{from_words, sock_key, socket_addr, to_words},
    netns::netns_cookie,
};

/// The map update flag that refuses to replace an existing entry.
const BPF_NOEXIST: u64 = 1;

/// A process holding a listening socket, as [`Maps::adopt_listener`] records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerOwner {
    /// Its pid.
    pub tgid: u32,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// Its image generation ([`Maps::generation`]) when it was attested.
    pub generation: u64,
}

/// cgroup id of the root of a cgroup v2 hierarchy: enrolling it would enroll every process.
const ROOT_CGROUP_ID: u64 = 1;

/// Errors of map access.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A pinned map could not be opened.
    #[error("failed to open pinned map {}", path.display())]
    Open {
        /// The pin path.
        path: PathBuf,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A map operation failed in the kernel.
    #[error("{operation} on map {map} failed")]
    Kernel {
        /// The map's name.
        map: &'static str,
        /// What was attempted, naming the entry.
        operation: String,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A socket handed in could not be inspected.
    #[error("failed to read the cookie of {what}")]
    Socket {
        /// The socket, named as the caller knows it.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A value was rejected before it reached the kernel.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The entry, named as the caller knows it.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl MapsError {
    fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Where the programs send connections to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// IPv4 redirect address, if the daemon listens on IPv4 (a loopback address).
    pub outbound_v4: Option<std::net::Ipv4Addr>,
    /// IPv6 redirect address, if the daemon listens on IPv6 (a loopback address).
    pub outbound_v6: Option<std::net::Ipv6Addr>,
    /// The redirect port (the same on both families): `sk_lookup` hands connections to it to
    /// the daemon's outbound listeners.
    pub outbound_port: u16,
    /// The tunnel's inbound port, the daemon's on every local address.
    pub inbound_port: u16,
    /// The cookie of the daemon's own network namespace ([`super::netns::netns_cookie`]),
    /// where `sk_lookup` keeps the two ports the daemon's.
    pub netns_cookie: u64,
    /// Same-node connections between known workloads that policy allows go direct,
    /// authorized in the kernel; only for a daemon that can close them when a reload denies
    /// them ([`super::SockDestroyer`]).
    pub kernel_flows: bool,
}

impl DaemonConfig {
    fn validate(&self) -> Result<Config, MapsError> {
        let what = "daemon config";
        if self.outbound_port == 0 {
            return Err(MapsError::invalid(what, "outbound_port must not be 0"));
        }
        if self.inbound_port == self.outbound_port {
            return Err(MapsError::invalid(
                what,
                "the inbound and outbound ports must differ",
            ));
        }
        if self.outbound_v4.is_none() && self.outbound_v6.is_none() {
            return Err(MapsError::invalid(what, "no outbound listener address"));
        }
        if let Some(v4) = self.outbound_v4.filter(|v4| !v4.is_loopback()) {
            return Err(MapsError::invalid(
                what,
                format!("outbound address {v4} is not a loopback address"),
            ));
        }
        if let Some(v6) = self.outbound_v6.filter(|v6| !v6.is_loopback()) {
            return Err(MapsError::invalid(
                what,
                format!("outbound address {v6} must be the IPv6 loopback address"),
            ));
        }
        Ok(Config {
            outbound_ip4: self
                .outbound_v4
                .map_or(0, |v4| u32::from_ne_bytes(v4.octets())),
            outbound_ip6: self.outbound_v6.map_or([0; 4], |v6| to_words(v6.into())),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            netns_cookie: self.netns_cookie,
            flags: if self.kernel_flows {
                Config::FLAG_KERNEL_FLOWS
            } else {
                0
            },
            pad: 0,
        })
    }
}

/// Which of the daemon's listeners a socket is, in `ENF_LISTENERS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerSlot {
    /// The IPv4 outbound listener (redirected connections).
    Outbound4,
    /// The IPv6 outbound listener.
    Outbound6,
    /// The IPv4 inbound listener (peers' tunnel connections).
    Inbound4,
    /// The IPv6 inbound listener.
    Inbound6,
}

impl ListenerSlot {
    fn index(self) -> u32 {
        match self {
            Self::Outbound4 => enforcer_ebpf::LISTENER_OUTBOUND4,
            Self::Outbound6 => enforcer_ebpf::LISTENER_OUTBOUND6,
            Self::Inbound4 => enforcer_ebpf::LISTENER_INBOUND4,
            Self::Inbound6 => enforcer_ebpf::LISTENER_INBOUND6,
        }
    }
}

/// The IP protocol of a plaintext egress permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
    /// ICMP (IP protocol 1); for IPv6 destinations, `ICMPv6`.
    Icmp,
}

impl IpProtocol {
    /// The IANA protocol number the kernel tables use (`ICMPv6` is stored as ICMP).
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
        }
    }
}

/// One plaintext egress permission, as the kernel stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EgressEntry {
    /// The network address (host bits zero).
    pub network: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The protocol permitted.
    pub protocol: IpProtocol,
    /// The destination port; `None` for every port (always `None` for ICMP).
    pub port: Option<u16>,
    /// The egress entry's number (1-based, file order), stamped on events.
    pub rule: u32,
}

/// Global policy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PolicyMode {
    /// Denied flows fail.
    #[default]
    Enforce,
    /// Denied flows are let through and reported.
    Audit,
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// Allow the flow (through the tunnel).
    Allow,
    /// Deny the flow at `connect()`.
    Deny,
    /// Deny in principle, but this rule is in audit mode: allow and report.
    Audit,
}

/// One compiled (source, destination, port) rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// Destination port; `None` matches every port.
    pub port: Option<u16>,
    /// What the rule does.
    pub action: PolicyAction,
    /// Rule number, stamped on events.
    pub rule: u32,
}

/// A complete policy, applied atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTable {
    /// Version stamped on events decided under this table (non-zero).
    pub version: u64,
    /// Global mode.
    pub mode: PolicyMode,
    /// The rules; at most one per (source, destination, port).
    pub rules: Vec<PolicyRule>,
}

impl PolicyTable {
    /// Check every rule and build the kernel entries, naming the first bad rule.
    fn compile(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, MapsError> {
        if self.version == 0 {
            return Err(MapsError::invalid("policy table", "version must not be 0"));
        }
        let mut seen: StdHashMap<PolicyKey, usize> = StdHashMap::new();
        let mut entries = Vec::with_capacity(self.rules.len());
        for (index, rule) in self.rules.iter().enumerate() {
            let what = || format!("policy rule #{index} ({rule:?})");
            if rule.src_id == UNKNOWN_IDENTITY || rule.dst_id == UNKNOWN_IDENTITY {
                return Err(MapsError::invalid(what(), "identity number 0 is reserved"));
            }
            if rule.port == Some(0) {
                return Err(MapsError::invalid(what(), "port 0; use None for any port"));
            }
            let key = PolicyKey {
                src_id: rule.src_id,
                dst_id: rule.dst_id,
                port: rule.port.unwrap_or(0),
                pad: 0,
            };
            if let Some(first) = seen.insert(key, index) {
                return Err(MapsError::invalid(
                    what(),
                    format!("same source, destination and port as rule #{first}"),
                ));
            }
            let action = match rule.action {
                PolicyAction::Allow => PolicyEntry::ACTION_ALLOW,
                PolicyAction::Deny => PolicyEntry::ACTION_DENY,
                PolicyAction::Audit => PolicyEntry::ACTION_AUDIT,
            };
            entries.push((
                key,
                PolicyEntry {
                    action,
                    rule: rule.rule,
                },
            ));
        }
        Ok(entries)
    }
}

/// A same-node connection the kernel authorized (it went direct, not through the tunnel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFlow {
    /// The client socket's cookie.
    pub cookie: u64,
    /// The client socket's network namespace.
    pub netns: u64,
    /// Whether the client socket is an IPv6 one (an IPv4 destination is then v4-mapped).
    pub ipv6_socket: bool,
    /// The client's address and port; `None` until its SYN is built.
    pub local: Option<SocketAddr>,
    /// The destination.
    pub dst: SocketAddr,
    /// The client's process id.
    pub tgid: u32,
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// Version of the policy that allowed it.
    pub policy_version: u64,
    /// Whether its handshake completed.
    pub established: bool,
    /// `CLOCK_MONOTONIC` time of its `connect()`, or of its establishment.
    pub since: Duration,
}

impl From<RawKernelFlow> for KernelFlow {
    fn from(flow: RawKernelFlow) -> Self {
        Self {
            cookie: flow.cookie,
            netns: flow.netns,
            ipv6_socket: u32::from(flow.family) == libc::AF_INET6.cast_unsigned(),
            local: (flow.local.port != 0).then(|| socket_addr(&flow.local)),
            dst: socket_addr(&flow.dst),
            tgid: flow.tgid,
            src_id: flow.src_id,
            dst_id: flow.dst_id,
            policy_version: flow.policy_version,
            established: flow.state == RawKernelFlow::ESTABLISHED,
            since: Duration::from_nanos(flow.since_ns),
        }
    }
}

/// What the kernel recorded about a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    /// The destination the client asked for.
    pub dst: SocketAddr,
    /// The client's process id.
    pub tgid: u32,
    /// The client's cgroup id.
    pub cgroup_id: u64,
    /// The client socket's cookie.
    pub cookie: u64,
    /// The client process's image generation at `connect()` time (0: none).
    pub generation: u64,
    /// Source identity number at `connect()` time (0: not attested then).
    pub src_id: u32,
    /// Destination identity number at `connect()` time (0 when unknown).
    pub dst_id: u32,
    /// The audit rule that let a denied flow through, 0 otherwise.
    pub audit_rule: u32,
}

impl From<OrigDst> for Original {
    fn from(orig: OrigDst) -> Self {
        Self {
            dst: socket_addr(&orig.dst),
            tgid: orig.tgid,
            cgroup_id: orig.cgroup_id,
            cookie: orig.cookie,
            generation: orig.generation,
            src_id: orig.src_id,
            dst_id: orig.dst_id,
            audit_rule: orig.rule,
        }
    }
}

/// Handles to every pinned map except the ring buffer (see [`super::EventReader`]) and the
/// daemon's socket tags (see [`super::SocketTags`]).
pub struct Maps {
    config: Array<MapData, Config>,
    layout: Array<MapData, Layout>,
    enrolled: HashMap<MapData, u64, u32>,
    enroll_paths: HashMap<MapData, u64, u32>,
    identities: HashMap<MapData, u32, IdentityEntry>,
    generations: HashMap<MapData, u32, u64>,
    services: HashMap<MapData, NsSockKey, Service>,
    service_ports: Array<MapData, u32>,
    local_addrs: HashMap<MapData, [u32; 4], u64>,
    netns: HashMap<MapData, u64, u32>,
    socks: SkStorage<MapData, SockTag>,
    listeners: SockMap<MapData>,
    peers: LpmTrie<MapData, [u32; 4], u32>,
    policy: [HashMap<MapData, PolicyKey, PolicyEntry>; 2],
    policy_meta: Array<MapData, PolicyMeta>,
    policy_slot: Array<MapData, u32>,
    egress: LpmTrie<MapData, EgressKey, EgressRule>,
    orig_by_tuple: HashMap<MapData, NsSockKey, OrigDst>,
    kernel_flows: HashMap<MapData, u64, RawKernelFlow>,
    counters: PerCpuArray<MapData, u64>,
}

/// Open the map pinned as `name` under `dir` and convert it to its typed handle.
pub(crate) fn open_pinned<T>(dir: &Path, name: &str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let open = |source| MapsError::Open {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open)?;
    let map = Map::from_map_data(data).map_err(open)?;
    T::try_from(map).map_err(open)
}

impl Maps {
    /// Open the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            config: open_pinned(dir, map_names::CONFIG)?,
            layout: open_pinned(dir, map_names::LAYOUT)?,
            enrolled: open_pinned(dir, map_names::ENROLLED)?,
            enroll_paths: open_pinned(dir, map_names::ENROLL_PATHS)?,
            identities: open_pinned(dir, map_names::IDENTITIES)?,
            generations: open_pinned(dir, map_names::GENERATIONS)?,
            services: open_pinned(dir, map_names::SERVICES)?,
            service_ports: open_pinned(dir, map_names::SERVICE_PORTS)?,
            local_addrs: open_pinned(dir, map_names::LOCAL_ADDRS)?,
            netns: open_pinned(dir, map_names::NETNS)?,
            socks: open_pinned(dir, map_names::SOCKS)?,
            listeners: open_pinned(dir, map_names::LISTENERS)?,
            peers: open_pinned(dir, map_names::PEERS)?,
            policy: [
                open_pinned(dir, map_names::POLICY_0)?,
                open_pinned(dir, map_names::POLICY_1)?,
            ],
            policy_meta: open_pinned(dir, map_names::POLICY_META)?,
            policy_slot: open_pinned(dir, map_names::POLICY_SLOT)?,
            egress: open_pinned(dir, map_names::EGRESS)?,
            orig_by_tuple: open_pinned(dir, map_names::ORIG_BY_TUPLE)?,
            kernel_flows: open_pinned(dir, map_names::KERNEL_FLOWS)?,
            counters: open_pinned(dir, map_names::COUNTERS)?,
        })
    }

    /// Write the global configuration.
    pub fn set_config(&mut self, config: &DaemonConfig) -> Result<(), MapsError> {
        let value = config.validate()?;
        self.config
            .set(0, value, 0)
            .map_err(kernel(map_names::CONFIG, || "set config".into()))
    }

    /// The global configuration as the kernel holds it.
    pub fn config(&self) -> Result<Config, MapsError> {
        self.config
            .get(&0, 0)
            .map_err(kernel(map_names::CONFIG, || "read config".into()))
    }

    /// Enroll a cgroup (and so every cgroup below it).
    pub fn enroll(&mut self, cgroup_id: u64) -> Result<(), MapsError> {
        let what = || format!("enrolled cgroup {cgroup_id}");
        if cgroup_id == 0 {
            return Err(MapsError::invalid(what(), "cgroup id 0 does not exist"));
        }
        if cgroup_id == ROOT_CGROUP_ID {
            return Err(MapsError::invalid(
                what(),
                "refusing to enroll the root cgroup (it would enroll every process)",
            ));
        }
        self.enrolled
            .insert(cgroup_id, 1, 0)
            .map_err(kernel(map_names::ENROLLED, what))
    }

    /// Whether the cgroup `cgroup_id` itself is in the enrolled set.
    pub fn is_enrolled(&self, cgroup_id: u64) -> Result<bool, MapsError> {
        lookup(&self.enrolled, &cgroup_id, map_names::ENROLLED, || {
            format!("enrolled cgroup {cgroup_id}")
        })
        .map(|found| found.is_some())
    }

    /// Stop enrolling a cgroup.
    pub fn unenroll(&mut self, cgroup_id: u64) -> Result<(), MapsError> {
        remove_if_present(&mut self.enrolled, &cgroup_id, map_names::ENROLLED, || {
            format!("unenroll cgroup {cgroup_id}")
        })
    }

    /// Write the kernel structure offsets the tracepoints read.
    pub fn set_layout(&mut self, layout: &Layout) -> Result<(), MapsError> {
        self.layout
            .set(0, layout, 0)
            .map_err(kernel(map_names::LAYOUT, || "set layout".into()))
    }

    /// Record that process `tgid` holds `identity` for its image `generation` (read with
    /// [`Maps::generation`] before attesting it): if the process exec'd, exited or moved since,
    /// its generation differs and the kernel ignores the entry.
    pub fn set_identity(
        &mut self,
        tgid: u32,
        identity: u32,
        generation: u64,
    ) -> Result<(), MapsError> {
        let what = || format!("identity of pid {tgid}");
        if tgid == 0 {
            return Err(MapsError::invalid(what(), "pid 0"));
        }
        if identity == UNKNOWN_IDENTITY {
            return Err(MapsError::invalid(what(), "identity number 0 is reserved"));
        }
        let entry = IdentityEntry {
            identity,
            pad: 0,
            generation,
        };
        self.identities
            .insert(tgid, entry, 0)
            .map_err(kernel(map_names::IDENTITIES, what))
    }

    /// Forget the identity of a process.
    pub fn remove_identity(&mut self, tgid: u32) -> Result<(), MapsError> {
        remove_if_present(&mut self.identities, &tgid, map_names::IDENTITIES, || {
            format!("remove identity of pid {tgid}")
        })
    }

    /// The pids that have an identity entry (valid for their image or not).
    #[must_use]
    pub fn identity_pids(&self) -> Vec<u32> {
        self.identities.keys().filter_map(Result::ok).collect()
    }

    /// Forget every process's identity: a daemon that starts numbers identities afresh, so
    /// numbers an earlier run wrote would name other workloads.
    pub fn clear_identities(&mut self) -> Result<(), MapsError> {
        for tgid in self.identity_pids() {
            self.remove_identity(tgid)?;
        }
        Ok(())
    }

    /// The identity number a process holds now: the entry written for its current image
    /// generation, if any.
    pub fn identity(&self, tgid: u32) -> Result<Option<u32>, MapsError> {
        let entry = lookup(&self.identities, &tgid, map_names::IDENTITIES, || {
            format!("identity of pid {tgid}")
        })?;
        let generation = self.generation(tgid)?;
        Ok(entry
            .filter(|entry| entry.generation == generation)
            .map(|entry| entry.identity))
    }

    /// The image generation of a process (0 when it has none): changed by the kernel on
    /// exec, exit and moves between cgroups.
    pub fn generation(&self, tgid: u32) -> Result<u64, MapsError> {
        lookup(&self.generations, &tgid, map_names::GENERATIONS, || {
            format!("generation of pid {tgid}")
        })
        .map(Option::unwrap_or_default)
    }

    /// Record a listening socket the kernel did not see start listening (one that existed
    /// before the datapath, was carried into an enrolled cgroup, or outlived its owner's
    /// image): protect it like the kernel protects the ones it sees, and record it as the
    /// service at `addr` (`0.0.0.0` or `::`: every local address of that family). `socket`
    /// must be that listening socket (e.g. taken from a holder with `pidfd_getfd`), and
    /// `holder` a process holding it. A socket whose owner is still the image that took it
    /// keeps that owner; otherwise `holder` becomes its owner.
    ///
    /// Returns whether the socket is the address's service: `false` when another listener
    /// holds the address (as in the kernel, the first one keeps it; this socket is protected
    /// all the same).
    pub fn adopt_listener(
        &mut self,
        socket: BorrowedFd<'_>,
        addr: SocketAddr,
        holder: ListenerOwner,
    ) -> Result<bool, MapsError> {
        let what = || format!("listener {addr} of pid {}", holder.tgid);
        if addr.port() == 0 {
            return Err(MapsError::invalid(what(), "port 0"));
        }
        let socket_error = |source| MapsError::Socket {
            what: what(),
            source,
        };
        let cookie = socket_cookie(socket).map_err(socket_error)?;
        let netns = netns_cookie(socket).map_err(socket_error)?;
        let current = match self.socks.get(&socket, 0) {
            Ok(tag) => Some(tag),
            Err(MapError::KeyNotFound) => None,
            Err(error) => return Err(kernel(map_names::SOCKS, what)(error)),
        };
        let tag = match current {
            Some(tag) if tag.flags & SockTag::PROTECTED != 0 && self.owns(&tag)? => tag,
            _ => {
                let tag = SockTag {
                    tgid: holder.tgid,
                    flags: SockTag::PROTECTED,
                    cgroup_id: current.map_or(holder.cgroup_id, |tag| tag.cgroup_id),
                    generation: holder.generation,
                };
                self.socks
                    .insert(&socket, tag, 0)
                    .map_err(kernel(map_names::SOCKS, what))?;
                tag
            }
        };
        let service = Service {
            tgid: tag.tgid,
            pad: 0,
            cgroup_id: tag.cgroup_id,
            cookie,
            generation: tag.generation,
        };
        // The hint first: the programs must never see a service whose port is not hinted.
        self.service_ports
            .set(u32::from(addr.port()), 1, 0)
            .map_err(kernel(map_names::SERVICE_PORTS, || {
                format!("hint port {}", addr.port())
            }))?;
        let key = ns_key(netns, addr);
        let flags = match self.service(netns, addr)? {
            Some(recorded) if recorded.cookie == cookie => 0,
            _ => BPF_NOEXIST,
        };
        match self.services.insert(key, service, flags) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(error) => Err(kernel(map_names::SERVICES, what)(error)),
        }
    }

    /// Whether the owner a socket's tag names is still the image that took the socket.
    fn owns(&self, tag: &SockTag) -> Result<bool, MapsError> {
        Ok(tag.tgid != 0 && self.generation(tag.tgid)? == tag.generation)
    }

    /// Whether some service was ever recorded on `port` (the hint the programs consult before
    /// the services table; a `false` spares the table lookups).
    pub fn port_hinted(&self, port: u16) -> Result<bool, MapsError> {
        self.service_ports
            .get(&u32::from(port), 0)
            .map(|hint| hint != 0)
            .map_err(kernel(map_names::SERVICE_PORTS, || {
                format!("read the hint of port {port}")
            }))
    }

    /// The listening socket recorded at exactly `addr` in network namespace `netns` (`0.0.0.0`
    /// and `::` are each their own family's any-address entry), if any.
    pub fn service(&self, netns: u64, addr: SocketAddr) -> Result<Option<Service>, MapsError> {
        lookup(
            &self.services,
            &ns_key(netns, addr),
            map_names::SERVICES,
            || format!("service {addr} in namespace {netns}"),
        )
    }

    /// Every recorded service: (network namespace, address, listening socket).
    #[must_use]
    pub fn services(&self) -> Vec<(u64, SocketAddr, Service)> {
        self.services
            .iter()
            .filter_map(Result::ok)
            .map(|(key, service)| (key.netns, socket_addr(&key.addr), service))
            .collect()
    }

    /// Forget the service at `addr` in `netns`, if it is still the socket `cookie`.
    pub fn remove_service(
        &mut self,
        netns: u64,
        addr: SocketAddr,
        cookie: u64,
    ) -> Result<(), MapsError> {
        if self
            .service(netns, addr)?
            .is_some_and(|service| service.cookie == cookie)
        {
            remove_if_present(
                &mut self.services,
                &ns_key(netns, addr),
                map_names::SERVICES,
                || format!("remove service {addr} in namespace {netns}"),
            )?;
        }
        Ok(())
    }

    /// Make `addrs` this node's own addresses (besides loopback, which always is), each with
    /// the network namespace it is configured in: a wildcard listener owns a destination only
    /// at an address of its own namespace. New entries first, then stale ones removed.
    pub fn replace_local_addrs(&mut self, addrs: &[(IpAddr, u64)]) -> Result<(), MapsError> {
        let entries: Vec<([u32; 4], u64)> = addrs
            .iter()
            .map(|&(addr, netns)| (to_words(addr), netns))
            .collect();
        replace_entries(
            &mut self.local_addrs,
            &entries,
            map_names::LOCAL_ADDRS,
            |&words| format!("address {}", from_words(words)),
        )
    }

    /// Make `served` the network namespaces the daemon serves (its listeners are there):
    /// enrolled connects are redirected only in them, and their daemon ports are the daemon's.
    /// New entries first, then stale ones removed.
    pub fn replace_served(&mut self, served: &[u64]) -> Result<(), MapsError> {
        if served.contains(&0) {
            return Err(MapsError::invalid("served namespace", "cookie 0"));
        }
        let entries: Vec<(u64, u32)> = served.iter().map(|&netns| (netns, 1)).collect();
        replace_entries(&mut self.netns, &entries, map_names::NETNS, |netns| {
            format!("served namespace {netns}")
        })
    }

    /// The network namespaces the kernel counts as served.
    #[must_use]
    pub fn served(&self) -> Vec<u64> {
        self.netns.keys().filter_map(Result::ok).collect()
    }

    /// Make `networks` the mesh's (peers' addresses and the workload networks behind them):
    /// connections there always go to the tunnel, never as plaintext egress. New entries
    /// first, then stale ones removed.
    pub fn replace_peers(&mut self, networks: &[(IpAddr, u8)]) -> Result<(), MapsError> {
        let name = map_names::PEERS;
        let mut keep = Vec::with_capacity(networks.len());
        for &(network, prefix_len) in networks {
            let key = peer_key(network, prefix_len)?;
            self.peers.insert(&key, 1, 0).map_err(kernel(name, || {
                format!("peer network {network}/{prefix_len}")
            }))?;
            keep.push((key.prefix_len(), key.data()));
        }
        let stale: Vec<Key<[u32; 4]>> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !keep.contains(&(key.prefix_len(), key.data())))
            .collect();
        for key in stale {
            match self.peers.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(MapsError::Kernel {
                        map: name,
                        operation: "remove a stale peer network".into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Hand connections of `slot` to `listener` (the daemon's own listening socket).
    pub fn set_listener(
        &mut self,
        slot: ListenerSlot,
        listener: BorrowedFd<'_>,
    ) -> Result<(), MapsError> {
        self.listeners
            .set(slot.index(), &listener, 0)
            .map_err(kernel(map_names::LISTENERS, || {
                format!("set listener {slot:?}")
            }))
    }

    /// Make `cgroup_ids` the enrolled set: new ids first, then the ones no longer listed are
    /// removed (so a cgroup in both sets is never briefly unenrolled).
    pub fn replace_enrolled(&mut self, cgroup_ids: &[u64]) -> Result<(), MapsError> {
        for &id in cgroup_ids {
            self.enroll(id)?;
        }
        let stale: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !cgroup_ids.contains(id))
            .collect();
        for id in stale {
            self.unenroll(id)?;
        }
        Ok(())
    }

    /// Make `entries` the egress set: new entries first, then stale ones removed.
    pub fn replace_egress(&mut self, entries: &[EgressEntry]) -> Result<(), MapsError> {
        let mut keep = Vec::with_capacity(entries.len());
        for entry in entries {
            let key = egress_key(entry)?;
            self.egress
                .insert(&key, EgressRule { rule: entry.rule }, 0)
                .map_err(kernel(map_names::EGRESS, || {
                    format!("egress {}/{}", entry.network, entry.prefix_len)
                }))?;
            keep.push((key.prefix_len(), key.data()));
        }
        let stale: Vec<Key<EgressKey>> = self
            .egress
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !keep.contains(&(key.prefix_len(), key.data())))
            .collect();
        for key in stale {
            match self.egress.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(MapsError::Kernel {
                        map: map_names::EGRESS,
                        operation: "remove a stale egress entry".into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Make `paths` (cgroup v2 paths below the mount, `/a/b`) the enrolled paths: a cgroup
    /// created at one of them is enrolled at once, in the kernel.
    pub fn replace_enroll_paths(&mut self, paths: &[String]) -> Result<(), MapsError> {
        let mut keep = HashSet::with_capacity(paths.len());
        for path in paths {
            let what = || format!("enrolled path {path}");
            if !path.starts_with('/') || path.len() > MAX_PATH_BYTES - 1 {
                return Err(MapsError::invalid(
                    what(),
                    format!(
                        "must start with / and be at most {} bytes",
                        MAX_PATH_BYTES - 1
                    ),
                ));
            }
            let hash = path_hash(path.trim_end_matches('/').as_bytes());
            self.enroll_paths
                .insert(hash, 1, 0)
                .map_err(kernel(map_names::ENROLL_PATHS, what))?;
            keep.insert(hash);
        }
        let stale: Vec<u64> = self
            .enroll_paths
            .keys()
            .filter_map(Result::ok)
            .filter(|hash| !keep.contains(hash))
            .collect();
        for hash in stale {
            remove_if_present(
                &mut self.enroll_paths,
                &hash,
                map_names::ENROLL_PATHS,
                || "remove a stale enrolled path".into(),
            )?;
        }
        Ok(())
    }

    /// Atomically replace the policy: [`Maps::stage_policy`], then [`Maps::activate_slot`].
    ///
    /// On error nothing the programs read has changed: the active slot is untouched.
    pub fn apply_policy(&mut self, table: &PolicyTable) -> Result<u32, MapsError> {
        let slot = self.stage_policy(table)?;
        self.activate_slot(slot)?;
        Ok(slot)
    }

    /// Write `table` (rules, version and mode) into the inactive slot and return that slot.
    /// The programs keep reading the active slot until [`Maps::activate_slot`].
    pub fn stage_policy(&mut self, table: &PolicyTable) -> Result<u32, MapsError> {
        let entries = table.compile()?;
        let inactive = 1 - self.active_slot()?;
        let name = policy_map_name(inactive);
        let map = &mut self.policy[inactive as usize];
        let stale: Vec<PolicyKey> = map.keys().filter_map(Result::ok).collect();
        for key in &stale {
            remove_if_present(map, key, name, || format!("clear {key:?}"))?;
        }
        for (key, entry) in &entries {
            map.insert(key, entry, 0)
                .map_err(kernel(name, || format!("insert {key:?}")))?;
        }
        let meta = PolicyMeta {
            version: table.version,
            mode: match table.mode {
                PolicyMode::Enforce => PolicyMeta::MODE_ENFORCE,
                PolicyMode::Audit => PolicyMeta::MODE_AUDIT,
            },
            pad: 0,
        };
        self.policy_meta
            .set(inactive, meta, 0)
            .map_err(kernel(map_names::POLICY_META, || {
                format!("set meta of slot {inactive}")
            }))?;
        Ok(inactive)
    }

    /// Make `slot` the one the programs read: a single word write, so every decision sees
    /// either the old slot or the new one.
    pub fn activate_slot(&mut self, slot: u32) -> Result<(), MapsError> {
        if slot > 1 {
            return Err(MapsError::invalid(
                format!("policy slot {slot}"),
                "must be 0 or 1",
            ));
        }
        self.policy_slot
            .set(0, slot, 0)
            .map_err(kernel(map_names::POLICY_SLOT, || {
                format!("activate slot {slot}")
            }))
    }

    /// The slot the programs currently read (0 or 1).
    pub fn active_slot(&self) -> Result<u32, MapsError> {
        self.policy_slot
            .get(&0, 0)
            .map(|slot| slot & 1)
            .map_err(kernel(map_names::POLICY_SLOT, || "read active slot".into()))
    }

    /// Version and mode of the active policy.
    pub fn active_policy(&self) -> Result<PolicyMeta, MapsError> {
        let slot = self.active_slot()?;
        self.policy_meta
            .get(&slot, 0)
            .map_err(kernel(map_names::POLICY_META, || {
                format!("read slot {slot}")
            }))
    }

    /// The original destination and source of an accepted redirected connection, keyed by the
    /// network namespace of the outbound listener that accepted it and the peer address it
    /// sees.
    pub fn original(&self, netns: u64, peer: SocketAddr) -> Result<Option<Original>, MapsError> {
        lookup(
            &self.orig_by_tuple,
            &ns_key(netns, peer),
            map_names::ORIG_BY_TUPLE,
            || format!("original destination of {peer} in namespace {netns}"),
        )
        .map(|found| found.map(Original::from))
    }

    /// The same-node connections authorized in the kernel that are open (or connecting) now.
    pub fn kernel_flows(&self) -> Vec<KernelFlow> {
        self.kernel_flows
            .iter()
            .filter_map(Result::ok)
            .map(|(_, flow)| KernelFlow::from(flow))
            .collect()
    }

    /// Forget the kernel flow of client socket `cookie` (one whose socket never got as far as
    /// its SYN, so no close callback will remove it).
    pub fn forget_kernel_flow(&mut self, cookie: u64) -> Result<(), MapsError> {
        remove_if_present(
            &mut self.kernel_flows,
            &cookie,
            map_names::KERNEL_FLOWS,
            || format!("remove kernel flow {cookie}"),
        )
    }

    /// A counter, summed over CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, MapsError> {
        self.counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .map_err(kernel(map_names::COUNTERS, || {
                format!("read counter {}", counter.name())
            }))
    }
}

/// The trie key of the peer network `network/prefix_len` (IPv4 as its v4-mapped IPv6 form).
fn peer_key(network: IpAddr, prefix_len: u8) -> Result<Key<[u32; 4]>, MapsError> {
    let (max, offset) = match network {
        IpAddr::V4(_) => (32, 96),
        IpAddr::V6(_) => (128, 0),
    };
    if prefix_len > max {
        return Err(MapsError::invalid(
            format!("peer network {network}/{prefix_len}"),
            format!("prefix longer than {max} bits"),
        ));
    }
    Ok(Key::new(u32::from(prefix_len) + offset, to_words(network)))
}

/// The LPM key of an egress entry, rejecting bad prefixes, networks with host bits set and
/// ports where the protocol has none.
fn egress_key(entry: &EgressEntry) -> Result<Key<EgressKey>, MapsError> {
    let EgressEntry {
        network,
        prefix_len,
        protocol,
        port,
        ..
    } = *entry;
    let what = || format!("egress network {network}/{prefix_len}");
    // A v4-mapped IPv6 network is the IPv4 network it maps.
    let (network, prefix_len) = match network {
        IpAddr::V6(v6) if prefix_len >= 96 => {
            v6.to_ipv4_mapped().map_or((network, prefix_len), |v4| {
                (IpAddr::V4(v4), prefix_len - 96)
            })
        }
        _ => (network, prefix_len),
    };
    let (max, offset) = match network {
        IpAddr::V4(_) => (32, 96),
        IpAddr::V6(_) => (128, 0),
    };
    if prefix_len > max {
        return Err(MapsError::invalid(
            what(),
            format!("prefix longer than {max} bits"),
        ));
    }
    let bits = match network {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    let host_bits = bits.checked_shl(u32::from(prefix_len)).unwrap_or(0);
    if prefix_len < max && host_bits != 0 {
        return Err(MapsError::invalid(what(), "host bits are set"));
    }
    if port == Some(0) {
        return Err(MapsError::invalid(what(), "port 0; use None for any port"));
    }
    if protocol == IpProtocol::Icmp && port.is_some() {
        return Err(MapsError::invalid(what(), "ICMP has no ports"));
    }
    Ok(Key::new(
        32 + offset + u32::from(prefix_len),
        EgressKey {
            proto_port: EgressKey::proto_port(
                network.is_ipv6(),
                protocol.number(),
                port.unwrap_or(0),
            ),
            addr: to_words(network),
        },
    ))
}

/// The key of `addr` in network namespace `netns`.
fn ns_key(netns: u64, addr: SocketAddr) -> NsSockKey {
    NsSockKey {
        netns,
        addr: sock_key(addr),
        pad: 0,
    }
}

/// The kernel's cookie of `socket` (`SO_COOKIE`).
fn socket_cookie(socket: BorrowedFd<'_>) -> std::io::Result<u64> {
    rustix::net::sockopt::socket_cookie(socket).map_err(std::io::Error::from)
}

fn policy_map_name(slot: u32) -> &'static str {
    if slot == 0 {
        map_names::POLICY_0
    } else {
        map_names::POLICY_1
    }
}

/// A closure turning a kernel map error into [`MapsError::Kernel`].
fn kernel(
    map: &'static str,
    operation: impl FnOnce() -> String,
) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Kernel {
        map,
        operation: operation(),
        source,
    }
}

fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
    what: impl FnOnce() -> String,
) -> Result<Option<V>, MapsError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(kernel(name, what)(source)),
    }
}

/// Make `map` hold exactly `entries`: every entry written first (a lookup meanwhile finds the
/// old value or the new one, never nothing), then the keys not among them removed. `describe`
/// names a key in errors.
fn replace_entries<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: &[(K, V)],
    name: &'static str,
    describe: impl Fn(&K) -> String,
) -> Result<(), MapsError> {
    for (key, value) in entries {
        map.insert(key, value, 0)
            .map_err(kernel(name, || format!("write {}", describe(key))))?;
    }
    let keep: HashSet<K> = entries.iter().map(|&(key, _)| key).collect();
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !keep.contains(key))
        .collect();
    for key in stale {
        remove_if_present(map, &key, name, || {
            format!("remove stale {}", describe(&key))
        })?;
    }
    Ok(())
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
    what: impl FnOnce() -> String,
) -> Result<(), MapsError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(kernel(name, what)(source)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{
        DaemonConfig, EgressEntry, IpProtocol, MapsError, PolicyAction, PolicyRule, PolicyTable,
        egress_key,
    };

    fn rule(src_id: u32, dst_id: u32, port: Option<u16>) -> PolicyRule {
        PolicyRule {
            src_id,
            dst_id,
            port,
            action: PolicyAction::Deny,
            rule: 1,
        }
    }

    fn invalid_reason(result: Result<impl std::fmt::Debug, MapsError>) -> String {
        match result {
            Err(MapsError::Invalid { what, reason }) => format!("{what}: {reason}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn policy_table_names_the_bad_rule() {
        let table = PolicyTable {
            version: 1,
            rules: vec![rule(1, 2, Some(80)), rule(1, 0, Some(80))],
            ..PolicyTable::default()
        };
        let reason = invalid_reason(table.compile());
        assert!(reason.starts_with("policy rule #1"), "{reason}");
        assert!(reason.contains("reserved"), "{reason}");
    }

    #[test]
    fn policy_table_rejects_duplicates_and_version_zero() {
        let table = PolicyTable {
            version: 1,
            rules: vec![rule(1, 2, None), rule(3, 4, Some(1)), rule(1, 2, None)],
            ..PolicyTable::default()
        };
        assert!(invalid_reason(table.compile()).contains("as rule #0"));
        let table = PolicyTable::default();
        assert!(invalid_reason(table.compile()).contains("version"));
        let table = PolicyTable {
            version: 1,
            rules: vec![rule(1, 2, Some(0))],
            ..PolicyTable::default()
        };
        assert!(invalid_reason(table.compile()).contains("port 0"));
    }

    fn entry(
        network: IpAddr,
        prefix_len: u8,
        protocol: IpProtocol,
        port: Option<u16>,
    ) -> EgressEntry {
        EgressEntry {
            network,
            prefix_len,
            protocol,
            port,
            rule: 1,
        }
    }

    #[test]
    fn egress_keys_are_checked() {
        let ten = Ipv4Addr::new(10, 0, 0, 0).into();
        let key = egress_key(&entry(ten, 8, IpProtocol::Tcp, Some(443))).unwrap();
        let prefix_len = key.prefix_len();
        assert_eq!(prefix_len, 32 + 96 + 8);
        let prefix = |key: super::Key<super::EgressKey>| key.prefix_len();
        let host = Ipv4Addr::new(10, 0, 0, 1).into();
        let host_bits = egress_key(&entry(host, 8, IpProtocol::Tcp, None)).map(prefix);
        assert!(invalid_reason(host_bits).contains("host bits"));
        let long = egress_key(&entry(ten, 33, IpProtocol::Tcp, None)).map(prefix);
        assert!(invalid_reason(long).contains("longer than 32"));
        assert!(egress_key(&entry(host, 32, IpProtocol::Udp, Some(53))).is_ok());
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        assert!(egress_key(&entry(any, 0, IpProtocol::Icmp, None)).is_ok());
        let icmp_port = egress_key(&entry(any, 0, IpProtocol::Icmp, Some(7))).map(prefix);
        assert!(invalid_reason(icmp_port).contains("no ports"));
    }

    #[test]
    fn egress_keys_carry_the_protocol_before_the_port() {
        let dns = Ipv4Addr::new(10, 0, 0, 53).into();
        let udp = egress_key(&entry(dns, 32, IpProtocol::Udp, Some(53))).unwrap();
        let tcp = egress_key(&entry(dns, 32, IpProtocol::Tcp, Some(53))).unwrap();
        assert_eq!(udp.data().proto_port, (0x0411_0035_u32).to_be());
        assert_ne!(udp.data().proto_port, tcp.data().proto_port);
    }

    #[test]
    fn daemon_config_is_checked() {
        let good = DaemonConfig {
            outbound_v4: Some(Ipv4Addr::LOCALHOST),
            outbound_v6: None,
            outbound_port: 15001,
            inbound_port: 15008,
            netns_cookie: 1,
            kernel_flows: true,
        };
        assert!(good.validate().is_ok());
        let bad = DaemonConfig {
            outbound_port: 0,
            ..good
        };
        assert!(invalid_reason(bad.validate()).contains("outbound_port"));
        let bad = DaemonConfig {
            inbound_port: 15001,
            ..good
        };
        assert!(invalid_reason(bad.validate()).contains("must differ"));
        let bad = DaemonConfig {
            outbound_v4: Some(Ipv4Addr::UNSPECIFIED),
            ..good
        };
        assert!(invalid_reason(bad.validate()).contains("loopback"));
        let bad = DaemonConfig {
            outbound_v6: Some("::ffff:127.0.0.1".parse().unwrap()),
            ..good
        };
        assert!(invalid_reason(bad.validate()).contains("IPv6 loopback"));
    }
}

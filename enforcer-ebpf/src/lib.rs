//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `pad` fields are always
//! zero) and is read by both sides byte for byte. Addresses are always 16 bytes: IPv4 in its
//! v4-mapped IPv6 form (`::ffff:a.b.c.d`), each `u32` word in network byte order, exactly as the
//! kernel hands out `user_ip6`. Ports are in host byte order everywhere.
//!
//! The userspace side derives `aya::Pod` for them behind the `user` feature.
#![no_std]

// The bpf build of this library only provides types; the programs in the binary use aya-ebpf.
#[cfg(target_arch = "bpf")]
use aya_ebpf as _;

/// Names of the maps, as pinned under the bpffs directory and looked up by userspace.
pub mod map_names {
    /// [`crate::Config`] at index 0: where redirected connections go.
    pub const CONFIG: &str = "ENF_CONFIG";
    /// [`crate::Layout`] at index 0: offsets of the kernel structures the tracepoints read.
    pub const LAYOUT: &str = "ENF_LAYOUT";
    /// Enrolled cgroup ids (`u64` -> `u32` flags); descendants of an enrolled cgroup are enrolled.
    pub const ENROLLED: &str = "ENF_ENROLLED";
    /// Enrolled cgroup paths by [`crate::path_hash`] (`u64` -> `u32`): a cgroup created at one
    /// of these paths is enrolled the moment it is created.
    pub const ENROLL_PATHS: &str = "ENF_ENROLL_PATHS";
    /// Attested processes: tgid (`u32`) -> [`crate::IdentityEntry`].
    pub const IDENTITIES: &str = "ENF_IDENTITIES";
    /// Process image generations: tgid (`u32`) -> `u64`, rewritten on exec, exit and a move
    /// between cgroups, so an identity attested for an older image never applies to a newer.
    pub const GENERATIONS: &str = "ENF_GENERATIONS";
    /// Listening sockets of enrolled processes: [`crate::NsSockKey`] -> [`crate::Service`].
    pub const SERVICES: &str = "ENF_SERVICES";
    /// Ports that may have an entry in [`map_names::SERVICES`] (`u32` per port, non-zero =
    /// maybe): an array lookup that spares the hash lookups for the common miss. Never cleared
    /// by the kernel; a stale hint only costs the hash lookup.
    pub const SERVICE_PORTS: &str = "ENF_SERVICE_PORTS";
    /// This node's own addresses, besides loopback, each with the cookie of the network
    /// namespace it is configured in (16-byte address -> `u64`): the host's addresses and
    /// every served container's. A wildcard service owns a destination only when the
    /// destination is an address of the service's own namespace.
    pub const LOCAL_ADDRS: &str = "ENF_LOCAL_ADDRS";
    /// The network namespaces the daemon serves, by cookie (`u64` -> `u32`, non-zero): the
    /// daemon's own and every enrolled container's where its listeners are up. An enrolled
    /// `connect()` is redirected only in one of them (elsewhere nothing of the daemon's
    /// listens on the redirect address), and the daemon's ports there are its alone.
    pub const NETNS: &str = "ENF_NETNS";
    /// Socket storage of enrolled processes' sockets: [`crate::SockTag`], cloned to accepted
    /// sockets.
    pub const SOCKS: &str = "ENF_SOCKS";
    /// Socket storage of the daemon's own sockets: [`crate::DaemonTag`], written by the daemon.
    pub const DAEMON_SOCKS: &str = "ENF_DAEMON_SOCKS";
    /// The daemon's listeners (`SOCKMAP`), indexed by the `LISTENER_*` constants.
    pub const LISTENERS: &str = "ENF_LISTENERS";
    /// Policy slot 0: [`crate::PolicyKey`] -> [`crate::PolicyEntry`].
    pub const POLICY_0: &str = "ENF_POLICY_0";
    /// Policy slot 1: [`crate::PolicyKey`] -> [`crate::PolicyEntry`].
    pub const POLICY_1: &str = "ENF_POLICY_1";
    /// Per-slot [`crate::PolicyMeta`] (two entries).
    pub const POLICY_META: &str = "ENF_POLICY_META";
    /// The active policy slot (`u32` at index 0): flipping it is the atomic swap.
    pub const POLICY_SLOT: &str = "ENF_POLICY_SLOT";
    /// Plaintext egress LPM trie: [`crate::EgressKey`] -> [`crate::EgressRule`].
    pub const EGRESS: &str = "ENF_EGRESS";
    /// The mesh's networks, an LPM trie over 16-byte addresses (`u32` values): each peer's
    /// address and the workload networks behind it. Connections there always go to the tunnel.
    pub const PEERS: &str = "ENF_PEERS";
    /// Redirected sockets by cookie, between `connect()` and establishment.
    pub const ORIG_BY_COOKIE: &str = "ENF_ORIG_BY_COOKIE";
    /// Redirected sockets by the client's network namespace and local address
    /// ([`crate::NsSockKey`]), for the outbound listener of that namespace.
    pub const ORIG_BY_TUPLE: &str = "ENF_ORIG_BY_TUPLE";
    /// Same-node connections authorized in the kernel, by the client socket's cookie
    /// ([`crate::KernelFlow`]), from `connect()` until the client socket closes.
    pub const KERNEL_FLOWS: &str = "ENF_KERNEL_FLOWS";
    /// The addresses of those connections ([`crate::FlowKey`] -> client socket cookie), from
    /// the moment the client's SYN is built until the client socket closes: what the ingress
    /// hook admits to a protected listener besides the daemon's hops.
    pub const ADMITTED: &str = "ENF_ADMITTED";
    /// Scratch space for cgroup paths (per-CPU, one [`crate::PathBuf`]).
    pub const PATH_SCRATCH: &str = "ENF_PATH_SCRATCH";
    /// Per-CPU counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "ENF_COUNTERS";
    /// Ring buffer of [`crate::Event`]s.
    pub const EVENTS: &str = "ENF_EVENTS";
}

/// Names of the programs in the object, also the file names of their pinned links.
pub mod program_names {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "enf_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "enf_connect6";
    /// `cgroup/sock_create`.
    pub const SOCK_CREATE: &str = "enf_sock_create";
    /// `sockops`.
    pub const SOCK_OPS: &str = "enf_sock_ops";
    /// `cgroup_skb/ingress`.
    pub const INGRESS: &str = "enf_ingress";
    /// `cgroup_skb/egress`.
    pub const EGRESS: &str = "enf_egress";
    /// `sk_lookup`, attached to the daemon's network namespace.
    pub const SK_LOOKUP: &str = "enf_sk_lookup";
    /// `tp_btf/sched_process_exec`.
    pub const EXEC: &str = "enf_exec";
    /// `tp_btf/sched_process_exit`.
    pub const EXIT: &str = "enf_exit";
    /// `tp_btf/cgroup_mkdir`.
    pub const CGROUP_MKDIR: &str = "enf_cgroup_mkdir";
    /// `tp_btf/cgroup_attach_task`.
    pub const CGROUP_ATTACH: &str = "enf_cgroup_attach";
    /// `tp_btf/cgroup_rmdir`.
    pub const CGROUP_RMDIR: &str = "enf_cgroup_rmdir";
    /// `lsm/socket_create` (only where the kernel runs the BPF LSM).
    pub const SOCKET_LSM: &str = "enf_socket_lsm";
    /// `cgroup/bind4`.
    pub const BIND4: &str = "enf_bind4";
    /// `cgroup/bind6`.
    pub const BIND6: &str = "enf_bind6";
}

/// Identity number meaning "not attested (yet)".
pub const UNKNOWN_IDENTITY: u32 = 0;

/// How many ancestor levels the programs walk to decide whether a cgroup is enrolled.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Default capacity of the maps keyed by connection or process.
pub const DEFAULT_TABLE_ENTRIES: u32 = 65_536;

/// Default byte size of the event ring buffer (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Longest cgroup path (in bytes, without the terminating NUL) the tracepoints match against
/// enrolled paths; longer enrolled paths are refused by the loader.
pub const MAX_PATH_BYTES: usize = 511;

/// Index of the daemon's IPv4 outbound listener in [`map_names::LISTENERS`].
pub const LISTENER_OUTBOUND4: u32 = 0;
/// Index of the daemon's IPv6 outbound listener in [`map_names::LISTENERS`].
pub const LISTENER_OUTBOUND6: u32 = 1;
/// Index of the daemon's IPv4 inbound listener in [`map_names::LISTENERS`].
pub const LISTENER_INBOUND4: u32 = 2;
/// Index of the daemon's IPv6 inbound listener in [`map_names::LISTENERS`].
pub const LISTENER_INBOUND6: u32 = 3;
/// Slots of [`map_names::LISTENERS`].
pub const LISTENER_SLOTS: u32 = 4;

/// FNV-1a, 64 bits: the hash of a cgroup path in [`map_names::ENROLL_PATHS`]. The programs
/// compute it byte by byte over the path a tracepoint reports (`/a/b`, no trailing slash).
#[must_use]
pub const fn path_hash(path: &[u8]) -> u64 {
    let mut hash = PATH_HASH_SEED;
    let mut i = 0;
    while i < path.len() {
        hash = path_hash_step(hash, path[i]);
        i += 1;
    }
    hash
}

/// The FNV-1a 64 offset basis.
pub const PATH_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One FNV-1a 64 step.
#[must_use]
#[expect(
    clippy::inline_always,
    reason = "the programs call it in a loop the verifier walks; a BPF call there costs states"
)]
#[inline(always)]
pub const fn path_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
}

/// Where redirected connections go, written by the daemon at start-up (index 0 of
/// [`map_names::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// IPv4 redirect address (network byte order); zero when there is none.
    pub outbound_ip4: u32,
    /// IPv6 redirect address (network byte order words); all zero when there is none.
    pub outbound_ip6: [u32; 4],
    /// Redirect port (host byte order); zero means "no daemon yet": redirects fail closed.
    /// `sk_lookup` hands connections to it to the daemon's outbound listener, or refuses them.
    pub outbound_port: u16,
    /// The tunnel's inbound port (host byte order): `sk_lookup` hands connections to it, on
    /// any local address, to the daemon's inbound listener, or refuses them. Zero: none.
    pub inbound_port: u16,
    /// The cookie of the daemon's own network namespace, where `sk_lookup` keeps its ports
    /// its own; in every other served namespace the bind hooks do. Zero: none yet.
    pub netns_cookie: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Always zero.
    pub pad: u32,
}

impl Config {
    /// Same-node connections between known workloads that policy allows go direct,
    /// authorized in the kernel ([`map_names::KERNEL_FLOWS`]); set only by a daemon that can
    /// close such a connection when a reload denies it.
    pub const FLAG_KERNEL_FLOWS: u32 = 1;
}

/// Byte offsets of the kernel structure members the tracepoints read, found in the running
/// kernel's BTF by the loader (index 0 of [`map_names::LAYOUT`]). All zero: the tracepoints
/// that need them do nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// `struct cgroup`, member `kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct cgroup`, member `root` (`struct cgroup_root *`).
    pub cgroup_root: u32,
    /// `struct cgroup_root`, member `hierarchy_id` (`int`; 0 is the cgroup v2 hierarchy).
    pub root_hierarchy_id: u32,
    /// `struct kernfs_node`, member `id` (`u64`: the cgroup id).
    pub kernfs_id: u32,
    /// `struct task_struct`, member `tgid` (`pid_t`).
    pub task_tgid: u32,
    /// Non-zero once the offsets are set.
    pub valid: u32,
}

/// What the kernel knows of an attested process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityEntry {
    /// Its identity number.
    pub identity: u32,
    /// Always zero.
    pub pad: u32,
    /// The process image generation ([`map_names::GENERATIONS`], 0 when none) the attestation
    /// was made for; the entry holds only while the process's generation is still this one.
    pub generation: u64,
}

/// An IP address (v4-mapped for IPv4) and a port: a socket's local side or a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Address words in network byte order. In [`map_names::SERVICES`], an unspecified
    /// address is its family's "any address": `::ffff:0.0.0.0` for IPv4, `::` for IPv6.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
}

/// A [`SockKey`] in one network namespace: the key of the tables that hold addresses, since
/// every container has its own `127.0.0.1` and two of them may listen on the same address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsSockKey {
    /// The network namespace's cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    pub netns: u64,
    /// The address and port.
    pub addr: SockKey,
    /// Always zero.
    pub pad: u32,
}

/// A listening socket of an enrolled process: who owns a destination address and port. Its
/// identity is the owner's identity now ([`map_names::IDENTITIES`]), never a stored copy, and
/// only while the owner is still the image it was when the socket started listening: after
/// an exec, an exit or a cgroup move of the owner the socket is nobody's until the daemon
/// finds who holds it now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// tgid of the process that owns the listening socket.
    pub tgid: u32,
    /// Always zero.
    pub pad: u32,
    /// cgroup id of the socket's creator.
    pub cgroup_id: u64,
    /// The listening socket's cookie.
    pub cookie: u64,
    /// The owner's image generation ([`map_names::GENERATIONS`]) when it took the socket.
    pub generation: u64,
}

/// Socket storage of a socket an enrolled process created ([`map_names::SOCKS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTag {
    /// tgid of the owning process: the creator, or whoever the daemon found holding a
    /// listener whose owner is gone.
    pub tgid: u32,
    /// `SOCK_*` flags.
    pub flags: u32,
    /// cgroup id of the creating process.
    pub cgroup_id: u64,
    /// The owner's image generation when it created the socket, or when it started listening.
    pub generation: u64,
}

impl SockTag {
    /// The socket listens (or was accepted from one that does): only the daemon's hops may
    /// reach it.
    pub const PROTECTED: u32 = 1;
}

/// Socket storage of one of the daemon's own sockets ([`map_names::DAEMON_SOCKS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonTag {
    /// One of the `KIND_*` constants.
    pub kind: u32,
    /// For a hop: the identity number the receiving listener's owner must hold.
    pub identity: u32,
}

impl DaemonTag {
    /// A socket of the daemon (its connects pass untouched).
    pub const KIND_DAEMON: u32 = 1;
    /// The daemon's connection to a local workload: the one thing that may reach a protected
    /// listener, and only one whose owner holds the identity the daemon meant.
    pub const KIND_HOP: u32 = 2;
}

/// Key of the policy maps: (source identity, destination identity, destination port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// Destination port, host byte order; zero matches any port.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
}

/// What a policy entry says about a (source, destination, port) triple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    /// One of the `ACTION_*` constants.
    pub action: u32,
    /// The rule's number, stamped on events for the audit trail.
    pub rule: u32,
}

impl PolicyEntry {
    /// The flow is allowed (through the tunnel).
    pub const ACTION_ALLOW: u32 = 1;
    /// The flow is denied: `connect()` fails with `EPERM`.
    pub const ACTION_DENY: u32 = 2;
    /// The flow would be denied, but the rule is in audit mode: allow and flag.
    pub const ACTION_AUDIT: u32 = 3;
}

/// Metadata of one policy slot, swapped together with its rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMeta {
    /// Policy version stamped on every event decided under this slot.
    pub version: u64,
    /// [`PolicyMeta::MODE_ENFORCE`] or [`PolicyMeta::MODE_AUDIT`].
    pub mode: u32,
    /// Always zero.
    pub pad: u32,
}

impl PolicyMeta {
    /// Denied flows fail.
    pub const MODE_ENFORCE: u32 = 0;
    /// Denied flows are allowed and reported as [`EventKind::Audit`].
    pub const MODE_AUDIT: u32 = 1;
}

/// The data part of an [`map_names::EGRESS`] LPM key: family, protocol and port first, so that
/// a rule for one port and a rule for every port (port zero) are two lookups in one trie, and
/// an IPv6 network never covers an IPv4 destination (whose address is v4-mapped).
///
/// The LPM prefix length covers `proto_port` (32 bits, always fully matched) plus the address
/// bits: `32 + 96 + n` for an IPv4 `/n`, `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressKey {
    /// `family << 24 | protocol << 16 | port` in network byte order (so the trie compares it
    /// byte by byte); family is 4 or 6, port zero = any port, and the protocol is 6 (TCP),
    /// 17 (UDP) or 1 (ICMP, and `ICMPv6` for IPv6).
    pub proto_port: u32,
    /// Address words, network byte order.
    pub addr: [u32; 4],
}

impl EgressKey {
    /// The `proto_port` word of an IPv4 (`v6` false) or IPv6 destination, `protocol` and `port`.
    #[must_use]
    pub const fn proto_port(v6: bool, protocol: u8, port: u16) -> u32 {
        let family: u32 = if v6 { 6 } else { 4 };
        ((family << 24) | ((protocol as u32) << 16) | port as u32).to_be()
    }
}

/// The value of an egress trie entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressRule {
    /// The rule's number, stamped on [`EventKind::Egress`] events.
    pub rule: u32,
}

/// What the connect hook remembered about a redirected socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// cgroup id of the connecting process.
    pub cgroup_id: u64,
    /// The connecting process's image generation at `connect()` (0 when none).
    pub generation: u64,
    /// The destination the process asked for.
    pub dst: SockKey,
    /// tgid of the connecting process.
    pub tgid: u32,
    /// Source identity number at `connect()` time (0: not attested then).
    pub src_id: u32,
    /// Destination identity number at `connect()` time, if the kernel knew it.
    pub dst_id: u32,
    /// The audit-mode rule that let a denied flow through, zero otherwise.
    pub rule: u32,
    /// Address family of the socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// Always zero.
    pub pad: u16,
}

/// A same-node connection the connect hook authorized in the kernel: it goes direct, and the
/// ingress hook admits its handshake to the destination's listener
/// ([`map_names::KERNEL_FLOWS`], by the client socket's cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFlow {
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// cgroup id of the connecting process.
    pub cgroup_id: u64,
    /// Version of the policy that allowed it.
    pub policy_version: u64,
    /// `bpf_ktime_get_ns()` at `connect()`, then at establishment.
    pub since_ns: u64,
    /// The client socket's network namespace (where the daemon closes it).
    pub netns: u64,
    /// cgroup id of the process whose listener the destination is: only a listener of that
    /// cgroup admits the connection.
    pub dst_cgroup: u64,
    /// The client's local address and port, once the SYN is built (zero before).
    pub local: SockKey,
    /// The destination.
    pub dst: SockKey,
    /// tgid of the connecting process.
    pub tgid: u32,
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// The allowing rule's number.
    pub rule: u32,
    /// Address family of the client socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// [`KernelFlow::CONNECTING`] or [`KernelFlow::ESTABLISHED`].
    pub state: u16,
    /// Always zero.
    pub pad: u32,
}

impl KernelFlow {
    /// Between `connect()` and the handshake's end.
    pub const CONNECTING: u16 = 0;
    /// The handshake completed (an open event was sent).
    pub const ESTABLISHED: u16 = 1;
}

/// The addresses of one connection, as its packets carry them ([`map_names::ADMITTED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address and port.
    pub src: SockKey,
    /// The server's.
    pub dst: SockKey,
}

/// Kinds of [`Event`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An enrolled `connect()` was rewritten to the outbound listener.
    Redirect = 1,
    /// Refused: a `connect()` (`EPERM`) by policy, or non-TCP traffic nothing permits.
    Deny = 2,
    /// Policy would deny, but audit mode let the connection through (redirected).
    Audit = 3,
    /// Plaintext egress permitted by an egress rule.
    Egress = 4,
    /// A packet to an enrolled workload that did not come through the tunnel was dropped.
    Drop = 5,
    /// An enrolled process's socket started listening (a service).
    Listen = 6,
    /// An enrolled process called `exec()`; its identity was revoked.
    Exec = 7,
    /// An enrolled process exited.
    Exit = 8,
    /// An enrolled `connect()` could not be redirected (no daemon configured): refused.
    NoListener = 9,
    /// A process with an identity, or one entering an enrolled cgroup, changed cgroup; its
    /// identity was revoked.
    Move = 10,
    /// A cgroup was created at an enrolled path and enrolled at once.
    Enroll = 11,
    /// A same-node connection authorized in the kernel completed its handshake.
    FlowOpen = 12,
    /// A same-node connection authorized in the kernel closed (bytes and duration set).
    FlowClose = 13,
}

impl EventKind {
    /// Decode the `kind` field of an [`Event`].
    #[must_use]
    pub const fn from_u32(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::Redirect,
            2 => Self::Deny,
            3 => Self::Audit,
            4 => Self::Egress,
            5 => Self::Drop,
            6 => Self::Listen,
            7 => Self::Exec,
            8 => Self::Exit,
            9 => Self::NoListener,
            10 => Self::Move,
            11 => Self::Enroll,
            12 => Self::FlowOpen,
            13 => Self::FlowClose,
            _ => return None,
        })
    }
}

/// Why the kernel refused or dropped something ([`Event::reason`]).
pub mod reasons {
    /// Policy denies the (source, destination, port) triple.
    pub const POLICY: u32 = 1;
    /// Non-TCP traffic that no egress entry permits.
    pub const PROTOCOL: u32 = 2;
    /// A raw or packet socket of an enrolled process.
    pub const RAW_SOCKET: u32 = 3;
    /// Plaintext to a protected listener that did not come from the daemon.
    pub const BYPASS: u32 = 4;
    /// A daemon hop that reached a listener whose owner does not hold the identity the daemon
    /// meant (the socket changed hands).
    pub const MISDELIVERED: u32 = 5;
    /// Non-TCP traffic to an enrolled workload that is not a reply from a permitted egress
    /// destination.
    pub const INBOUND: u32 = 6;
    /// A listening socket that did not fit in the services table: protected, but nobody can
    /// reach it.
    pub const TABLE_FULL: u32 = 7;
    /// A listening socket on an address another listener already serves (an `SO_REUSEPORT`
    /// group): protected, and the address stays the first listener's. Hops meant for that
    /// listener's owner pass through this socket only when its own owner holds the same
    /// identity.
    pub const SHARED: u32 = 8;
    /// An enrolled `connect()` in a network namespace the daemon does not serve (yet): no
    /// listener of the daemon's is there to take it.
    pub const NAMESPACE: u32 = 9;
    /// A bind to one of the daemon's ports in a namespace it serves (or by an enrolled
    /// process anywhere): those ports are the daemon's.
    pub const RESERVED_PORT: u32 = 10;
}

/// One record in the event ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) when the event happened.
    pub timestamp_ns: u64,
    /// Socket cookie, zero for process events (ENROLL: the new cgroup id).
    pub cookie: u64,
    /// cgroup id of the process or of the receiving socket.
    pub cgroup_id: u64,
    /// Version of the policy slot that decided.
    pub policy_version: u64,
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// tgid of the process (for DROP: the owner of the listening socket).
    pub tgid: u32,
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// Matching rule number, zero when none.
    pub rule: u32,
    /// One of the [`reasons`], zero when none.
    pub reason: u32,
    /// Source address and port (DROP: the sender; LISTEN: the listening address).
    pub src: SockKey,
    /// Destination address and port (the original destination for connect events).
    pub dst: SockKey,
    /// Address family (`AF_INET` or `AF_INET6`), zero for process events.
    pub family: u32,
    /// IP protocol number (6 for TCP), zero for process events.
    pub protocol: u32,
    /// For a flow close: bytes the client sent that the server acknowledged.
    pub bytes_up: u64,
    /// For a flow close: bytes the client received.
    pub bytes_down: u64,
    /// For a flow close: nanoseconds from the handshake's end to the close.
    pub duration_ns: u64,
    /// For a flow open or close: the cgroup id of the destination listener's owner.
    pub dst_cgroup_id: u64,
}

/// A cgroup path as the tracepoints copy it, NUL-terminated ([`map_names::PATH_SCRATCH`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathBuf {
    /// The bytes.
    pub bytes: [u8; MAX_PATH_BYTES + 1],
}

/// Indices into [`map_names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` calls seen by the connect hooks.
    Connect = 0,
    /// Passed because the socket is the daemon's.
    PassDaemon = 1,
    /// Passed because the caller's cgroup is not enrolled.
    PassUnenrolled = 2,
    /// Rewritten to the outbound listener.
    Redirect = 3,
    /// Refused by policy at `connect()`.
    Deny = 4,
    /// Allowed in audit mode although policy denies.
    Audit = 5,
    /// Allowed as plaintext egress.
    Egress = 6,
    /// Ingress packets dropped.
    Drop = 7,
    /// Listening sockets of enrolled processes recorded.
    Listen = 8,
    /// Exec events.
    Exec = 9,
    /// Exit events.
    Exit = 10,
    /// Events lost because the ring buffer was full.
    LostEvents = 11,
    /// Refused because no daemon is configured.
    NoListener = 12,
    /// Redirected sockets linked to their local address by `sock_ops`.
    Linked = 13,
    /// Records that could not be stored (a table full).
    TableFull = 14,
    /// Non-TCP traffic of enrolled workloads refused (connect, sendmsg, egress packets).
    ProtocolDenied = 15,
    /// Raw and packet sockets refused to enrolled processes.
    RawRefused = 16,
    /// Connections `sk_lookup` handed to the daemon's listeners.
    Steered = 17,
    /// Connections to the daemon's ports refused because no daemon listener is there.
    Unserved = 18,
    /// cgroups enrolled at creation.
    Enrolled = 19,
    /// Processes whose identity a cgroup move revoked.
    Moved = 20,
    /// Listening sockets that stopped listening (their service removed).
    Unlisten = 21,
    /// Enrolled cgroups removed (their ids forgotten).
    Unenrolled = 22,
    /// Binds to the daemon's ports refused (see [`reasons::RESERVED_PORT`]).
    ReservedPort = 23,
    /// Same-node connections authorized in the kernel (they go direct).
    KernelFlow = 24,
    /// Handshake packets of those admitted by the ingress hook.
    Admitted = 25,
}

impl Counter {
    /// Number of counter slots in the map.
    pub const COUNT: u32 = 32;

    /// Every counter, in index order.
    pub const ALL: [Self; 26] = [
        Self::Connect,
        Self::PassDaemon,
        Self::PassUnenrolled,
        Self::Redirect,
        Self::Deny,
        Self::Audit,
        Self::Egress,
        Self::Drop,
        Self::Listen,
        Self::Exec,
        Self::Exit,
        Self::LostEvents,
        Self::NoListener,
        Self::Linked,
        Self::TableFull,
        Self::ProtocolDenied,
        Self::RawRefused,
        Self::Steered,
        Self::Unserved,
        Self::Enrolled,
        Self::Moved,
        Self::Unlisten,
        Self::Unenrolled,
        Self::ReservedPort,
        Self::KernelFlow,
        Self::Admitted,
    ];

    /// A short `snake_case` name for logs and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::PassDaemon => "pass_daemon",
            Self::PassUnenrolled => "pass_unenrolled",
            Self::Redirect => "redirect",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Egress => "egress",
            Self::Drop => "drop",
            Self::Listen => "listen",
            Self::Exec => "exec",
            Self::Exit => "exit",
            Self::LostEvents => "lost_events",
            Self::NoListener => "no_listener",
            Self::Linked => "linked",
            Self::TableFull => "table_full",
            Self::ProtocolDenied => "protocol_denied",
            Self::RawRefused => "raw_refused",
            Self::Steered => "steered",
            Self::Unserved => "unserved",
            Self::Enrolled => "enrolled",
            Self::Moved => "moved",
            Self::Unlisten => "unlisten",
            Self::Unenrolled => "unenrolled",
            Self::ReservedPort => "reserved_port",
            Self::KernelFlow => "kernel_flow",
            Self::Admitted => "admitted",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for the shared types: each is `#[repr(C)]`, `Copy`, has no implicit padding
    //! and every bit pattern is a valid value.
    use super::{
        Config, DaemonTag, EgressKey, EgressRule, Event, FlowKey, IdentityEntry, KernelFlow,
        Layout, NsSockKey, OrigDst, PolicyEntry, PolicyKey, PolicyMeta, Service, SockKey, SockTag,
    };

    // SAFETY: see the module comment; each type is plain integers with explicit padding.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Layout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IdentityEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NsSockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockTag {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DaemonTag {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EgressKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EgressRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::{
        Config, DaemonTag, Event, FlowKey, IdentityEntry, KernelFlow, Layout, NsSockKey, OrigDst,
        PolicyKey, Service, SockKey, SockTag, path_hash,
    };
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SockKey>(), 20);
        assert_eq!(size_of::<NsSockKey>(), 8 + 20 + 4);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<Layout>(), 24);
        assert_eq!(size_of::<IdentityEntry>(), 16);
        assert_eq!(size_of::<Service>(), 32);
        assert_eq!(size_of::<SockTag>(), 24);
        assert_eq!(size_of::<DaemonTag>(), 8);
        assert_eq!(size_of::<OrigDst>(), 3 * 8 + 20 + 4 * 4 + 4);
        assert_eq!(size_of::<Event>(), 4 * 8 + 6 * 4 + 2 * 20 + 2 * 4 + 4 * 8);
        assert_eq!(size_of::<KernelFlow>(), 6 * 8 + 2 * 20 + 4 * 4 + 2 * 2 + 4);
        assert_eq!(size_of::<FlowKey>(), 2 * 20);
    }

    #[test]
    fn path_hash_is_fnv1a_64() {
        // Reference values of FNV-1a 64.
        assert_eq!(path_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(path_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(path_hash(b"/a/b"), path_hash(b"/a/c"));
    }
}

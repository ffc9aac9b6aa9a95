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
    /// [`crate::Config`] at index 0.
    pub const CONFIG: &str = "ENF_CONFIG";
    /// Enrolled cgroup ids (`u64` -> `u32` flags); descendants of an enrolled cgroup are enrolled.
    pub const ENROLLED: &str = "ENF_ENROLLED";
    /// Attested processes: tgid (`u32`) -> identity number (`u32`).
    pub const IDENTITIES: &str = "ENF_IDENTITIES";
    /// Who owns a destination: [`crate::SockKey`] -> [`crate::Service`].
    pub const SERVICES: &str = "ENF_SERVICES";
    /// Ports that may have an entry in [`map_names::SERVICES`] (`u32` per port, non-zero =
    /// maybe): an array lookup that spares the hash lookups for the common miss. Never cleared
    /// by the kernel; a stale hint only costs the hash lookup.
    pub const SERVICE_PORTS: &str = "ENF_SERVICE_PORTS";
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
    /// Redirected sockets by cookie, between `connect()` and establishment.
    pub const ORIG_BY_COOKIE: &str = "ENF_ORIG_BY_COOKIE";
    /// Redirected sockets by the client's local address, for the outbound listener.
    pub const ORIG_BY_TUPLE: &str = "ENF_ORIG_BY_TUPLE";
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
    /// `cgroup/bind4`.
    pub const BIND4: &str = "enf_bind4";
    /// `cgroup/bind6`.
    pub const BIND6: &str = "enf_bind6";
    /// `sockops`.
    pub const SOCK_OPS: &str = "enf_sock_ops";
    /// `cgroup_skb/ingress`.
    pub const INGRESS: &str = "enf_ingress";
    /// `tp_btf/sched_process_exec`.
    pub const EXEC: &str = "enf_exec";
    /// `tp_btf/sched_process_exit`.
    pub const EXIT: &str = "enf_exit";
}

/// Identity number meaning "not attested (yet)".
pub const UNKNOWN_IDENTITY: u32 = 0;

/// How many ancestor levels the programs walk to decide whether a cgroup is enrolled.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Default capacity of the maps keyed by connection or process.
pub const DEFAULT_TABLE_ENTRIES: u32 = 65_536;

/// Default byte size of the event ring buffer (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Global configuration, written by the daemon at start-up (index 0 of [`map_names::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The daemon's tgid: its own sockets always pass untouched.
    pub daemon_tgid: u32,
    /// `SO_MARK` the daemon sets on sockets it opens to local workloads; only such traffic may
    /// reach an enrolled workload's listening port. Setting a mark needs `CAP_NET_ADMIN`, so an
    /// unprivileged process cannot forge it. Zero disables the exemption (everything is dropped).
    pub tunnel_mark: u32,
    /// IPv4 outbound listener address (network byte order); zero when there is none.
    pub outbound_ip4: u32,
    /// IPv6 outbound listener address (network byte order words); all zero when there is none.
    pub outbound_ip6: [u32; 4],
    /// Outbound listener port (host byte order); zero means "no listener": redirect fails closed.
    pub outbound_port: u16,
    /// Always zero.
    pub pad: u16,
}

/// An IP address (v4-mapped for IPv4) and a port: a socket's local side or a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Address words in network byte order; all zero means "any address" in
    /// [`map_names::SERVICES`].
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
}

/// The identity that owns a destination address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Identity number of the owner, [`UNKNOWN_IDENTITY`] until attested.
    pub identity: u32,
    /// tgid that bound the port (zero when the entry was written by the daemon).
    pub tgid: u32,
    /// cgroup id of the binding process (zero when the entry was written by the daemon).
    pub cgroup_id: u64,
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

/// The data part of an [`map_names::EGRESS`] LPM key: port first, so that a rule for one port
/// and a rule for every port (port zero) are two lookups in one trie.
///
/// The LPM prefix length covers `port` (32 bits, always fully matched) plus the address bits:
/// `32 + 96 + n` for an IPv4 `/n`, `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressKey {
    /// Port in network byte order in a `u32` (so the trie compares it byte by byte); zero = any.
    pub port_be: u32,
    /// Address words, network byte order.
    pub addr: [u32; 4],
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
    /// The destination the process asked for.
    pub dst: SockKey,
    /// tgid of the connecting process.
    pub tgid: u32,
    /// Source identity number at `connect()` time.
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

/// Kinds of [`Event`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An enrolled `connect()` was rewritten to the outbound listener.
    Redirect = 1,
    /// `connect()` was refused with `EPERM` by policy.
    Deny = 2,
    /// Policy would deny, but audit mode let the connection through (redirected).
    Audit = 3,
    /// Plaintext egress permitted by an egress rule.
    Egress = 4,
    /// A packet to an enrolled workload port that did not come through the tunnel was dropped.
    Drop = 5,
    /// An enrolled process bound a socket.
    Bind = 6,
    /// An enrolled process called `exec()`; its identity was revoked.
    Exec = 7,
    /// An enrolled process exited.
    Exit = 8,
    /// An enrolled `connect()` could not be redirected (no outbound listener): refused.
    NoListener = 9,
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
            6 => Self::Bind,
            7 => Self::Exec,
            8 => Self::Exit,
            9 => Self::NoListener,
            _ => return None,
        })
    }
}

/// One record in the event ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) when the event happened.
    pub timestamp_ns: u64,
    /// Socket cookie, zero for process events.
    pub cookie: u64,
    /// cgroup id of the process or of the receiving socket.
    pub cgroup_id: u64,
    /// Version of the policy slot that decided.
    pub policy_version: u64,
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// tgid of the process (for DROP: the tgid that bound the port).
    pub tgid: u32,
    /// Source identity number.
    pub src_id: u32,
    /// Destination identity number.
    pub dst_id: u32,
    /// Matching rule number, zero when none.
    pub rule: u32,
    /// Always zero.
    pub pad: u32,
    /// Source address and port (DROP: the sender; BIND: the bound address).
    pub src: SockKey,
    /// Destination address and port (the original destination for connect events).
    pub dst: SockKey,
    /// Address family (`AF_INET` or `AF_INET6`), zero for process events.
    pub family: u32,
    /// IP protocol number (6 for TCP), zero for process events.
    pub protocol: u32,
}

/// Indices into [`map_names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` calls seen by the connect hooks.
    Connect = 0,
    /// Passed because the caller is the daemon.
    PassDaemon = 1,
    /// Passed because the caller's cgroup is not enrolled.
    PassUnenrolled = 2,
    /// Rewritten to the outbound listener.
    Redirect = 3,
    /// Refused by policy.
    Deny = 4,
    /// Allowed in audit mode although policy denies.
    Audit = 5,
    /// Allowed as plaintext egress.
    Egress = 6,
    /// Ingress packets dropped.
    Drop = 7,
    /// Bind events.
    Bind = 8,
    /// Exec events.
    Exec = 9,
    /// Exit events.
    Exit = 10,
    /// Events lost because the ring buffer was full.
    LostEvents = 11,
    /// Refused because no outbound listener is configured.
    NoListener = 12,
    /// Redirected sockets linked to their local address by `sock_ops`.
    Linked = 13,
    /// Redirect records that could not be stored (map full).
    TableFull = 14,
}

impl Counter {
    /// Number of counter slots in the map.
    pub const COUNT: u32 = 16;

    /// Every counter, in index order.
    pub const ALL: [Self; 15] = [
        Self::Connect,
        Self::PassDaemon,
        Self::PassUnenrolled,
        Self::Redirect,
        Self::Deny,
        Self::Audit,
        Self::Egress,
        Self::Drop,
        Self::Bind,
        Self::Exec,
        Self::Exit,
        Self::LostEvents,
        Self::NoListener,
        Self::Linked,
        Self::TableFull,
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
            Self::Bind => "bind",
            Self::Exec => "exec",
            Self::Exit => "exit",
            Self::LostEvents => "lost_events",
            Self::NoListener => "no_listener",
            Self::Linked => "linked",
            Self::TableFull => "table_full",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for the shared types: each is `#[repr(C)]`, `Copy`, has no implicit padding
    //! and every bit pattern is a valid value.
    use super::{
        Config, EgressKey, EgressRule, Event, OrigDst, PolicyEntry, PolicyKey, PolicyMeta, Service,
        SockKey,
    };

    // SAFETY: see the module comment; each type is plain integers with explicit padding.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Service {}
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
}

#[cfg(test)]
mod tests {
    use super::{Config, Event, OrigDst, PolicyKey, SockKey};
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SockKey>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<Config>(), 32);
        assert_eq!(size_of::<OrigDst>(), 8 + 8 + 20 + 4 * 4 + 4);
        assert_eq!(size_of::<Event>(), 4 * 8 + 6 * 4 + 2 * 20 + 2 * 4);
    }
}

//! Reads of the shared state that several programs need: configuration, identities, services,
//! socket tags, policy, egress and peers.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_pid_tgid, bpf_sk_fullsock, generated::bpf_sk_storage_get},
    programs::SkBuffContext,
};
use enforcer_ebpf::{
    Config, DaemonTag, EgressKey, IdentityEntry, Layout, NsSockKey, PolicyEntry, PolicyKey,
    PolicyMeta, Service, SockKey, SockTag, UNKNOWN_IDENTITY,
};

use super::maps::{
    CONFIG, DAEMON_SOCKS, EGRESS, GENERATIONS, IDENTITIES, LAYOUT, LOCAL_ADDRS, NETNS, PEERS,
    POLICY_0, POLICY_1, POLICY_META, POLICY_SLOT, SERVICE_PORTS, SERVICES, SOCKS,
};

/// `AF_INET`.
pub(crate) const AF_INET: u32 = 2;
/// `AF_INET6`.
pub(crate) const AF_INET6: u32 = 10;
/// `IPPROTO_ICMP`.
pub(crate) const IPPROTO_ICMP: u32 = 1;
/// `IPPROTO_TCP`.
pub(crate) const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP`.
pub(crate) const IPPROTO_UDP: u32 = 17;
/// `IPPROTO_ICMPV6`.
pub(crate) const IPPROTO_ICMPV6: u32 = 58;
/// `SOCK_STREAM`.
pub(crate) const SOCK_STREAM: u32 = 1;
/// `SOCK_RAW`.
pub(crate) const SOCK_RAW: u32 = 3;

/// The port in a `user_port` field of `bpf_sock_addr` (network byte order in the low 16 bits).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the port is the low 16 bits"
)]
pub(crate) fn port_from_be(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

/// A port kept in host byte order in a 32-bit field (`local_port`, `src_port`).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the port is the low 16 bits"
)]
pub(crate) fn host_port(raw: u32) -> u16 {
    raw as u16
}

/// The v4-mapped IPv6 form of an IPv4 address (network byte order in, words out).
#[inline(always)]
pub(crate) fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, 0xffff_u32.to_be(), ip4]
}

/// Read a 16-byte address out of a context structure one 32-bit word at a time: the verifier
/// rejects the memcpy the compiler would emit for a plain array copy from a context pointer.
///
/// # Safety
/// `words` must point into the program's context (or a socket the verifier knows).
#[inline(always)]
pub(crate) unsafe fn read_words(words: *const [u32; 4]) -> [u32; 4] {
    let first = words.cast::<u32>();
    // SAFETY: the caller guarantees `words` is readable; each read is one aligned word.
    unsafe {
        [
            core::ptr::read_volatile(first),
            core::ptr::read_volatile(first.add(1)),
            core::ptr::read_volatile(first.add(2)),
            core::ptr::read_volatile(first.add(3)),
        ]
    }
}

/// Whether `addr` is a v4-mapped IPv6 address.
#[inline(always)]
pub(crate) fn is_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be()
}

/// Where redirected connections go (all zero until the daemon writes it: enrolled traffic then
/// fails closed because there is no redirect port).
#[inline(always)]
pub(crate) fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// The kernel structure offsets, when the loader has found them.
#[inline(always)]
pub(crate) fn layout() -> Option<Layout> {
    LAYOUT.get(0).copied().filter(|layout| layout.valid != 0)
}

/// The calling task's tgid.
#[inline(always)]
pub(crate) fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The image generation of `tgid` (0 when it has none).
#[inline(always)]
pub(crate) fn generation_of(tgid: u32) -> u64 {
    match GENERATIONS.get_ptr(tgid) {
        // SAFETY: the pointer comes from a successful lookup and points to a u64 map value.
        Some(generation) => unsafe { *generation },
        None => 0,
    }
}

/// The identity number the daemon attested for `tgid` at `generation`, if the attestation
/// still holds for that generation.
#[inline(always)]
pub(crate) fn identity_at(tgid: u32, generation: u64) -> u32 {
    match IDENTITIES.get_ptr(tgid) {
        Some(entry) => {
            // SAFETY: the pointer comes from a successful lookup and points to an entry.
            let entry: IdentityEntry = unsafe { *entry };
            if entry.generation == generation {
                entry.identity
            } else {
                UNKNOWN_IDENTITY
            }
        }
        None => UNKNOWN_IDENTITY,
    }
}

/// The identity `tgid` holds now.
#[inline(always)]
pub(crate) fn identity_of(tgid: u32) -> u32 {
    identity_at(tgid, generation_of(tgid))
}

/// The identity `tgid` holds now, if it is still the image it was at `generation` (a socket
/// it took then is its own only while it is).
#[inline(always)]
pub(crate) fn identity_at_since(tgid: u32, generation: u64) -> u32 {
    if generation_of(tgid) == generation {
        identity_at(tgid, generation)
    } else {
        UNKNOWN_IDENTITY
    }
}

/// Whether `addr` is a loopback address (`127.0.0.0/8` or `::1`).
#[inline(always)]
fn is_loopback(addr: &[u32; 4]) -> bool {
    let loopback4 = is_mapped(addr) && u32::from_be(addr[3]) >> 24 == 127;
    let loopback6 = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1_u32.to_be();
    loopback4 || loopback6
}

/// The network namespace in which `addr` is a local address, seen from namespace `own`:
/// loopback is `own`'s; any other address is the namespace the daemon listed it for (the
/// host's, or a served container's); `None` when it is no address of this node.
#[inline(always)]
pub(crate) fn netns_of(own: u64, addr: &[u32; 4]) -> Option<u64> {
    if is_loopback(addr) {
        return Some(own);
    }
    let netns = LOCAL_ADDRS.get_ptr(addr)?;
    // SAFETY: the pointer comes from a successful lookup and points to a u64 map value.
    Some(unsafe { *netns })
}

/// Whether the daemon serves network namespace `netns` (its listeners are there).
#[inline(always)]
pub(crate) fn is_served(netns: u64) -> bool {
    NETNS.get_ptr(netns).is_some()
}

/// The listening socket that owns `key` as reached from namespace `own`, only ever at one of
/// this node's own addresses, in the namespace that address belongs to (a socket bound
/// elsewhere, e.g. with `IP_FREEBIND`, owns nothing): the exact (address, port) entry first,
/// then the any-address entry of the address's family, then (for IPv4) the IPv6 any-address
/// entry, which dual-stack listeners hold. The port hint array answers the common "nobody"
/// without touching the hash maps.
#[inline(always)]
pub(crate) fn service_at(own: u64, key: &SockKey) -> Option<Service> {
    if !service_port_hinted(key.port) {
        return None;
    }
    let netns = netns_of(own, &key.addr)?;
    let mut probe = NsSockKey {
        netns,
        addr: *key,
        pad: 0,
    };
    if let Some(found) = SERVICES.get_ptr(probe) {
        // SAFETY: the pointer comes from a successful lookup and points to a Service value.
        return Some(unsafe { *found });
    }
    if is_mapped(&key.addr) {
        probe.addr.addr = mapped(0);
        if let Some(found) = SERVICES.get_ptr(probe) {
            // SAFETY: as above.
            return Some(unsafe { *found });
        }
    }
    probe.addr.addr = [0; 4];
    let found = SERVICES.get_ptr(probe)?;
    // SAFETY: as above.
    Some(unsafe { *found })
}

/// Whether some service was ever recorded on `port`.
#[inline(always)]
pub(crate) fn service_port_hinted(port: u16) -> bool {
    SERVICE_PORTS.get(u32::from(port)).copied().unwrap_or(0) != 0
}

/// Mark `port` as possibly owned by a service.
#[inline(always)]
pub(crate) fn hint_service_port(port: u16) {
    if let Some(hint) = SERVICE_PORTS.get_ptr_mut(u32::from(port)) {
        // SAFETY: the pointer is to an array slot; concurrent writers all store 1.
        unsafe { *hint = 1 };
    }
}

/// Whether `addr` is a mesh peer's or in a peer's workload networks (its connections always
/// go to the tunnel).
#[inline(always)]
pub(crate) fn is_peer(addr: &[u32; 4]) -> bool {
    PEERS
        .get(aya_ebpf::maps::lpm_trie::Key::new(128, *addr))
        .is_some()
}

/// The egress rule that permits plaintext `protocol` to `addr` on `port`, if any: the
/// port-specific entry first, then the any-port entry.
#[inline(always)]
pub(crate) fn egress_rule(protocol: u32, addr: &[u32; 4], port: u16) -> Option<u32> {
    let protocol = if protocol == IPPROTO_ICMPV6 {
        IPPROTO_ICMP
    } else {
        protocol
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the protocols looked up are below 256"
    )]
    let protocol = protocol as u8;
    let v6 = !is_mapped(addr);
    let mut key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        EgressKey {
            proto_port: EgressKey::proto_port(v6, protocol, port),
            addr: *addr,
        },
    );
    if port != 0 {
        if let Some(rule) = EGRESS.get(&key) {
            return Some(rule.rule);
        }
        key.data.proto_port = EgressKey::proto_port(v6, protocol, 0);
    }
    EGRESS.get(&key).map(|rule| rule.rule)
}

/// The active policy slot and its metadata.
#[inline(always)]
pub(crate) fn active_policy() -> (u32, PolicyMeta) {
    let slot = POLICY_SLOT.get(0).copied().unwrap_or(0) & 1;
    let meta = POLICY_META.get(slot).copied().unwrap_or_default();
    (slot, meta)
}

/// The entry for `(src, dst, port)` in `slot`, falling back to the any-port entry.
#[inline(always)]
pub(crate) fn policy_entry(slot: u32, src_id: u32, dst_id: u32, port: u16) -> Option<PolicyEntry> {
    let map = if slot == 0 { &POLICY_0 } else { &POLICY_1 };
    let exact = PolicyKey {
        src_id,
        dst_id,
        port,
        pad: 0,
    };
    let any_port = PolicyKey { port: 0, ..exact };
    let found = match map.get_ptr(exact) {
        Some(found) => found,
        None => map.get_ptr(any_port)?,
    };
    // SAFETY: the pointer comes from a successful lookup and points to a PolicyEntry value.
    Some(unsafe { *found })
}

/// The tag of a socket an enrolled process created, if `sk` is one.
///
/// # Safety
/// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get` (a full socket
/// from the context or a lookup).
#[inline(always)]
pub(crate) unsafe fn sock_tag(sk: *mut core::ffi::c_void) -> Option<*mut SockTag> {
    // SAFETY: the caller guarantees `sk`; no value and no flags: a plain lookup.
    let tag = unsafe { bpf_sk_storage_get(SOCKS.as_ptr(), sk, core::ptr::null_mut(), 0) };
    (!tag.is_null()).then_some(tag.cast())
}

/// Tag `sk` as created by an enrolled process; `None` when the kernel could not store it.
///
/// # Safety
/// As for [`sock_tag`].
#[inline(always)]
pub(crate) unsafe fn tag_sock(sk: *mut core::ffi::c_void, tag: &mut SockTag) -> Option<()> {
    // SAFETY: the caller guarantees `sk`; `tag` is the initial value of a created entry.
    let stored = unsafe {
        bpf_sk_storage_get(
            SOCKS.as_ptr(),
            sk,
            core::ptr::from_mut(tag).cast(),
            u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    (!stored.is_null()).then_some(())
}

/// The daemon's tag of `sk`, if the daemon tagged it.
///
/// # Safety
/// As for [`sock_tag`].
#[inline(always)]
pub(crate) unsafe fn daemon_tag(sk: *mut core::ffi::c_void) -> Option<DaemonTag> {
    // SAFETY: the caller guarantees `sk`; a plain lookup.
    let tag = unsafe { bpf_sk_storage_get(DAEMON_SOCKS.as_ptr(), sk, core::ptr::null_mut(), 0) };
    if tag.is_null() {
        return None;
    }
    // SAFETY: a non-null storage pointer points to the map's value type.
    Some(unsafe { *tag.cast::<DaemonTag>() })
}

/// The full socket a packet belongs to, if it has one (a request or time-wait socket has not).
#[inline(always)]
pub(crate) fn full_socket(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: the context pointer is valid for the whole program run.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the non-null socket pointer the kernel put in the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    (!sk.is_null()).then_some(sk)
}

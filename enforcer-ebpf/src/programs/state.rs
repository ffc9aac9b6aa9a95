//! Reads of the shared state that several programs need.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use enforcer_ebpf::{
    Config, PolicyEntry, PolicyKey, PolicyMeta, Service, SockKey, UNKNOWN_IDENTITY,
};

use super::maps::{
    CONFIG, IDENTITIES, POLICY_0, POLICY_1, POLICY_META, POLICY_SLOT, SERVICE_PORTS, SERVICES,
};

/// `AF_INET`.
pub(crate) const AF_INET: u32 = 2;
/// `AF_INET6`.
pub(crate) const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub(crate) const IPPROTO_TCP: u32 = 6;

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

/// The daemon's configuration (all zero until the daemon writes it: enrolled traffic then
/// fails closed because there is no outbound listener).
#[inline(always)]
pub(crate) fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// The calling task's tgid.
#[inline(always)]
pub(crate) fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The identity number the daemon attested for `tgid`.
#[inline(always)]
pub(crate) fn identity_of(tgid: u32) -> u32 {
    match IDENTITIES.get_ptr(tgid) {
        // SAFETY: the pointer comes from a successful lookup and points to a u32 map value.
        Some(id) => unsafe { *id },
        None => UNKNOWN_IDENTITY,
    }
}

/// Who owns `key`: an exact (address, port) entry first, then the any-address entry. The port
/// hint array answers the common "nobody" without touching the hash map.
#[inline(always)]
pub(crate) fn service_at(key: &SockKey) -> Option<Service> {
    if SERVICE_PORTS.get(u32::from(key.port)).copied().unwrap_or(0) == 0 {
        return None;
    }
    let any = SockKey {
        addr: [0; 4],
        port: key.port,
        pad: 0,
    };
    let found = match SERVICES.get_ptr(key) {
        Some(found) => found,
        None => SERVICES.get_ptr(any)?,
    };
    // SAFETY: the pointer comes from a successful lookup and points to a Service value.
    Some(unsafe { *found })
}

/// Mark `port` as possibly owned by a service.
#[inline(always)]
pub(crate) fn hint_service_port(port: u16) {
    if let Some(hint) = SERVICE_PORTS.get_ptr_mut(u32::from(port)) {
        // SAFETY: the pointer is to an array slot; concurrent writers all store 1.
        unsafe { *hint = 1 };
    }
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

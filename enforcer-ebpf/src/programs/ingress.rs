//! `cgroup_skb/ingress`: what may reach an enrolled workload.
//!
//! TCP: a listening socket of an enrolled process is *protected* (see `sockops`). A packet to
//! it passes only when it comes from one of the daemon's hops: it arrived over loopback, the
//! sending socket, found by the packet's own addresses in this namespace, carries the daemon's
//! hop tag (socket storage only the daemon can write, gone when the socket closes), and the
//! identity the hop was meant for is the one the listener's owner holds now, while the owner
//! is still the image that made the socket. Anything else is dropped: plaintext from anyone
//! else (a mark, an address or a port proves nothing), and a hop that reached a socket which
//! changed hands. Connections accepted from a protected listener were admitted when their
//! handshake reached it, so their packets pass without a second look. An untagged listener in
//! an enrolled cgroup (made before the cgroup was enrolled, or by the kernel) is protected as
//! one of no identity. A listener no enrolled process made takes anyone's packets but a hop's:
//! a hop is meant for a workload, so one that reached such a socket (a squatter in the
//! workload's `SO_REUSEPORT` group) is dropped as well. For untagged listeners only the SYN is
//! looked at.
//!
//! A same-node connection the connect hook authorized in the kernel passes to a protected
//! listener too: its addresses are admitted (from the moment its SYN was built until its
//! client socket closes), the listener is one of the cgroup the connect hook found as the
//! destination's, and its owner still holds the identity policy allowed.
//!
//! Other protocols: a datagram to a socket of an enrolled process (or an untagged one in an
//! enrolled cgroup) passes only when it comes from a destination an egress entry of its
//! protocol permits (a reply); everything else is dropped.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple},
    helpers::{bpf_sk_release, bpf_skb_cgroup_id, generated::bpf_sk_lookup_tcp},
    programs::SkBuffContext,
};
use enforcer_ebpf::{Counter, DaemonTag, Event, EventKind, FlowKey, SockKey, SockTag, reasons};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    enroll::socket_enrolled_cgroup,
    maps::{ADMITTED, KERNEL_FLOWS},
    state::{
        AF_INET, AF_INET6, IPPROTO_TCP, active_policy, daemon_tag, egress_rule, full_socket,
        identity_at_since, mapped, service_port_hinted, sock_tag,
    },
};

pub(crate) fn try_ingress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(sk) = full_socket(ctx) else {
        return PROCEED;
    };
    // SAFETY: `sk` is a full socket returned by bpf_sk_fullsock.
    let (protocol, state) = unsafe { ((*sk).protocol, (*sk).state) };
    if protocol == IPPROTO_TCP && state != BPF_TCP_LISTEN {
        return PROCEED;
    }
    // SAFETY: `sk` is a full socket.
    let tag = match unsafe { sock_tag(sk.cast()) } {
        // SAFETY: a storage pointer from a successful lookup.
        Some(tag) => unsafe { *tag },
        None if protocol == IPPROTO_TCP => return untagged_listener(ctx, skb),
        // A datagram socket in an enrolled cgroup that no enrolled process tagged (made
        // before the cgroup was enrolled, or by the kernel) is an enrolled one of no identity.
        None => match socket_enrolled_cgroup(skb) {
            Some(cgroup_id) => SockTag {
                cgroup_id,
                ..SockTag::default()
            },
            None => return PROCEED,
        },
    };
    let Some(packet) = Packet::parse(ctx) else {
        // Not an IP packet this program can read: fail closed for a socket of an enrolled process.
        return drop_packet(ctx, &tag, &Packet::default(), reasons::BYPASS, 0);
    };
    if protocol != IPPROTO_TCP {
        if egress_rule(packet.protocol, &packet.src.addr, packet.src.port).is_some() {
            return PROCEED;
        }
        return drop_packet(ctx, &tag, &packet, reasons::INBOUND, 0);
    }
    if tag.flags & SockTag::PROTECTED == 0 {
        return PROCEED;
    }
    guarded(ctx, &tag, &packet)
}

/// A packet to a protected listener (`tag`): only a hop meant for the identity its owner
/// holds now passes.
#[inline(always)]
fn guarded(ctx: &SkBuffContext, tag: &SockTag, packet: &Packet) -> i32 {
    let owner = identity_at_since(tag.tgid, tag.generation);
    if owner != 0 && admitted(tag, packet, owner) {
        count(Counter::Admitted);
        return PROCEED;
    }
    match hop_identity(ctx, packet) {
        Some(meant) if meant != 0 && meant == owner => PROCEED,
        Some(_) => drop_packet(ctx, tag, packet, reasons::MISDELIVERED, owner),
        None => drop_packet(ctx, tag, packet, reasons::BYPASS, owner),
    }
}

/// Whether `packet` belongs to a kernel flow authorized to reach a listener of `tag`'s cgroup
/// whose owner holds `owner`.
#[inline(always)]
fn admitted(tag: &SockTag, packet: &Packet, owner: u32) -> bool {
    let key = FlowKey {
        src: packet.src,
        dst: packet.dst,
    };
    let Some(cookie) = ADMITTED.get_ptr(key) else {
        return false;
    };
    // SAFETY: the pointer comes from a successful lookup and points to a u64 map value.
    let Some(flow) = KERNEL_FLOWS.get_ptr(unsafe { *cookie }) else {
        return false;
    };
    // SAFETY: as above, a KernelFlow value.
    let (dst_cgroup, dst_id) = unsafe { ((*flow).dst_cgroup, (*flow).dst_id) };
    dst_cgroup == tag.cgroup_id && dst_id == owner
}

/// A packet to a listener no enrolled process tagged. Only a connection's first packet, the
/// SYN, is looked at: one whose SYN was dropped never completes, and every other listener on
/// the node pays for no more than that.
/// - In an enrolled cgroup (made before the cgroup was enrolled, or by the kernel, like an
///   MPTCP or SMC subflow): protected, of no identity, until the daemon adopts it.
/// - Elsewhere: anyone may reach it, except a daemon hop, which is meant for a workload and
///   never for this socket (say, one that joined the workload's `SO_REUSEPORT` group). A hop's
///   source address is its destination address (it binds there) and its port a service's, so
///   only such packets pay for the sender lookup.
#[inline(always)]
fn untagged_listener(ctx: &SkBuffContext, skb: *mut __sk_buff) -> i32 {
    let packet = Packet::parse(ctx);
    if packet.is_some_and(|packet| packet.protocol == IPPROTO_TCP && !packet.syn) {
        return PROCEED;
    }
    if let Some(cgroup_id) = socket_enrolled_cgroup(skb) {
        let tag = SockTag {
            flags: SockTag::PROTECTED,
            cgroup_id,
            ..SockTag::default()
        };
        return match packet {
            Some(packet) => guarded(ctx, &tag, &packet),
            None => drop_packet(ctx, &tag, &Packet::default(), reasons::BYPASS, 0),
        };
    }
    let Some(packet) = packet else {
        return PROCEED;
    };
    if packet.src.addr != packet.dst.addr
        || !service_port_hinted(packet.dst.port)
        || hop_identity(ctx, &packet).is_none()
    {
        return PROCEED;
    }
    drop_packet(ctx, &SockTag::default(), &packet, reasons::MISDELIVERED, 0)
}

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Offset of the flags byte in the TCP header, and the SYN flag.
const TCP_FLAGS_AT: usize = 13;
const TCP_SYN: u8 = 0x02;

/// The addresses and protocol of a packet.
#[derive(Clone, Copy, Default)]
struct Packet {
    family: u32,
    protocol: u32,
    src: SockKey,
    dst: SockKey,
    /// TCP only: the SYN flag is set (a connection's first packet).
    syn: bool,
}

impl Packet {
    /// Parse the IP header and the transport ports (zero for protocols without ports).
    #[inline(always)]
    fn parse(ctx: &SkBuffContext) -> Option<Self> {
        let first = ctx.load::<u8>(0).ok()?;
        let mut packet = Self::default();
        let ports_at = if first >> 4 == 4 {
            packet.family = AF_INET;
            packet.protocol = u32::from(ctx.load::<u8>(9).ok()?);
            packet.src.addr = mapped(ctx.load::<u32>(12).ok()?);
            packet.dst.addr = mapped(ctx.load::<u32>(16).ok()?);
            usize::from(first & 0x0f) * 4
        } else if first >> 4 == 6 {
            packet.family = AF_INET6;
            packet.protocol = u32::from(ctx.load::<u8>(6).ok()?);
            packet.src.addr = ctx.load::<[u32; 4]>(8).ok()?;
            packet.dst.addr = ctx.load::<[u32; 4]>(24).ok()?;
            40
        } else {
            return None;
        };
        if packet.protocol == IPPROTO_TCP || packet.protocol == super::state::IPPROTO_UDP {
            packet.src.port = u16::from_be(ctx.load::<u16>(ports_at).ok()?);
            packet.dst.port = u16::from_be(ctx.load::<u16>(ports_at + 2).ok()?);
        }
        if packet.protocol == IPPROTO_TCP {
            packet.syn = ctx.load::<u8>(ports_at + TCP_FLAGS_AT).ok()? & TCP_SYN != 0;
        }
        Some(packet)
    }
}

/// The identity a daemon hop that sent `packet` was meant for; `None` when the sender is not
/// one of the daemon's hops (or not a socket of this namespace at all).
#[inline(always)]
fn hop_identity(ctx: &SkBuffContext, packet: &Packet) -> Option<u32> {
    // Hops are local: a packet that came in on any other device is nobody's hop, whatever
    // addresses it carries.
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != LOOPBACK_IFINDEX {
        return None;
    }
    // The sender's socket is the one that would receive a packet going the other way.
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if packet.family == AF_INET {
        tuple.__bindgen_anon_1.ipv4.saddr = packet.dst.addr[3];
        tuple.__bindgen_anon_1.ipv4.daddr = packet.src.addr[3];
        tuple.__bindgen_anon_1.ipv4.sport = packet.dst.port.to_be();
        tuple.__bindgen_anon_1.ipv4.dport = packet.src.port.to_be();
        12
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr = packet.dst.addr;
        tuple.__bindgen_anon_1.ipv6.daddr = packet.src.addr;
        tuple.__bindgen_anon_1.ipv6.sport = packet.dst.port.to_be();
        tuple.__bindgen_anon_1.ipv6.dport = packet.src.port.to_be();
        36
    };
    // SAFETY: the context is this program's skb; the tuple is initialised for `size` bytes.
    let sender = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &raw mut tuple,
            size,
            u64::from(BPF_F_CURRENT_NETNS.cast_unsigned()),
            0,
        )
    };
    if sender.is_null() {
        return None;
    }
    // SAFETY: `sender` is a referenced full socket from the lookup; released right after.
    let tag = unsafe { daemon_tag(sender.cast()) };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sender.cast()) };
    let tag = tag?;
    (tag.kind == DaemonTag::KIND_HOP).then_some(tag.identity)
}

/// Drop `packet` (to a socket of the enrolled process `tag` names, whose identity is `owner`)
/// with a DROP event.
#[inline(always)]
fn drop_packet(
    ctx: &SkBuffContext,
    tag: &SockTag,
    packet: &Packet,
    reason: u32,
    owner: u32,
) -> i32 {
    let (_, meta) = active_policy();
    count(Counter::Drop);
    emit(
        EventKind::Drop,
        Event {
            // SAFETY: the helper reads the cgroup of the socket in the context.
            cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
            policy_version: meta.version,
            tgid: tag.tgid,
            dst_id: owner,
            reason,
            src: packet.src,
            dst: packet.dst,
            family: packet.family,
            protocol: packet.protocol,
            ..Event::default()
        },
    );
    REFUSE
}

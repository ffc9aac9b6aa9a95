//! `cgroup_skb/egress`: every packet an enrolled process's socket sends that is not TCP (TCP
//! was decided at `connect()`) passes only to a destination an egress entry of its protocol
//! permits: unconnected UDP (`sendto`), ping sockets, anything else. So does a socket made in
//! an enrolled cgroup that carries no tag (made before the cgroup was enrolled). Refused
//! packets fail the send with `EPERM` and are reported.

use aya_ebpf::programs::SkBuffContext;
use enforcer_ebpf::{Counter, Event, EventKind, SockKey, SockTag, reasons};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    enroll::socket_enrolled_cgroup,
    state::{
        AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_STREAM, active_policy, egress_rule,
        full_socket, mapped, sock_tag,
    },
};

pub(crate) fn try_egress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(sk) = full_socket(ctx) else {
        return PROCEED;
    };
    // SAFETY: `sk` is a full socket returned by bpf_sk_fullsock.
    let (protocol, kind) = unsafe { ((*sk).protocol, (*sk).type_) };
    if protocol == IPPROTO_TCP && kind == SOCK_STREAM {
        return PROCEED;
    }
    // SAFETY: `sk` is a full socket.
    let tag = match unsafe { sock_tag(sk.cast()) } {
        // SAFETY: a storage pointer from a successful lookup.
        Some(tag) => unsafe { *tag },
        None => match socket_enrolled_cgroup(skb) {
            Some(cgroup_id) => SockTag {
                cgroup_id,
                ..SockTag::default()
            },
            None => return PROCEED,
        },
    };
    let mut event = Event {
        cgroup_id: tag.cgroup_id,
        tgid: tag.tgid,
        reason: reasons::PROTOCOL,
        ..Event::default()
    };
    if let Some((family, protocol, dst)) = destination(ctx) {
        if egress_rule(protocol, &dst.addr, dst.port).is_some() {
            return PROCEED;
        }
        event.family = family;
        event.protocol = protocol;
        event.dst = dst;
    }
    let (_, meta) = active_policy();
    event.policy_version = meta.version;
    count(Counter::ProtocolDenied);
    emit(EventKind::Deny, event);
    REFUSE
}

/// The packet's family, protocol and destination (port zero for protocols without ports).
#[inline(always)]
fn destination(ctx: &SkBuffContext) -> Option<(u32, u32, SockKey)> {
    let first = ctx.load::<u8>(0).ok()?;
    let mut dst = SockKey::default();
    let (family, protocol, ports_at) = if first >> 4 == 4 {
        dst.addr = mapped(ctx.load::<u32>(16).ok()?);
        (
            AF_INET,
            u32::from(ctx.load::<u8>(9).ok()?),
            usize::from(first & 0x0f) * 4,
        )
    } else if first >> 4 == 6 {
        dst.addr = ctx.load::<[u32; 4]>(24).ok()?;
        (AF_INET6, u32::from(ctx.load::<u8>(6).ok()?), 40)
    } else {
        return None;
    };
    if protocol == IPPROTO_UDP {
        dst.port = u16::from_be(ctx.load::<u16>(ports_at + 2).ok()?);
    }
    Some((family, protocol, dst))
}

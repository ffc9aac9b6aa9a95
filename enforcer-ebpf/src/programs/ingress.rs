//! `cgroup_skb/ingress`: TCP to an enrolled workload's port must come through the daemon.
//!
//! The daemon marks the sockets it opens to local workloads with `SO_MARK = tunnel_mark`.
//! Setting a mark needs `CAP_NET_ADMIN`, so an unprivileged process cannot forge it, whatever
//! source address it binds. Anything else addressed to a socket whose local (address, port) is a
//! known service is dropped, with a DROP event.

use aya_ebpf::{
    helpers::{bpf_sk_fullsock, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use enforcer_ebpf::{Counter, Event, EventKind, SockKey};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    state::{
        AF_INET, IPPROTO_TCP, active_policy, config, host_port, mapped, read_words, service_at,
    },
};

pub(crate) fn try_ingress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let cfg = config();
    // SAFETY: the context pointer is valid for the whole program run.
    let (mark, sk) = unsafe { ((*skb).mark, (*skb).__bindgen_anon_2.sk) };
    if cfg.tunnel_mark != 0 && mark == cfg.tunnel_mark {
        return PROCEED;
    }
    if sk.is_null() {
        return PROCEED;
    }
    // SAFETY: `sk` is the non-null socket pointer the kernel put in the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return PROCEED;
    }
    // SAFETY: `sk` is a full socket returned by bpf_sk_fullsock.
    let (protocol, family, port, ip4, ip6) = unsafe {
        (
            (*sk).protocol,
            (*sk).family,
            (*sk).src_port,
            (*sk).src_ip4,
            read_words(&raw const (*sk).src_ip6),
        )
    };
    if protocol != IPPROTO_TCP {
        return PROCEED;
    }
    let local = SockKey {
        addr: if family == AF_INET { mapped(ip4) } else { ip6 },
        port: host_port(port),
        pad: 0,
    };
    let Some(service) = service_at(&local) else {
        return PROCEED;
    };

    let (_, meta) = active_policy();
    let (src, ip_family) = sender(ctx);
    count(Counter::Drop);
    emit(
        EventKind::Drop,
        Event {
            // SAFETY: the helper reads the cgroup of the socket in the context.
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            policy_version: meta.version,
            tgid: service.tgid,
            dst_id: service.identity,
            src,
            dst: local,
            family: ip_family,
            protocol,
            ..Event::default()
        },
    );
    REFUSE
}

/// The sender's address and TCP port, parsed from the packet (best effort: zero when the
/// headers cannot be read), and the IP family of the packet.
#[inline(always)]
fn sender(ctx: &SkBuffContext) -> (SockKey, u32) {
    let mut key = SockKey::default();
    let Ok(first) = ctx.load::<u8>(0) else {
        return (key, 0);
    };
    if first >> 4 == 4 {
        let header_len = usize::from(first & 0x0f) * 4;
        if let Ok(ip4) = ctx.load::<u32>(12) {
            key.addr = mapped(ip4);
        }
        if let Ok(port) = ctx.load::<u16>(header_len) {
            key.port = u16::from_be(port);
        }
        (key, AF_INET)
    } else {
        if let Ok(ip6) = ctx.load::<[u32; 4]>(8) {
            key.addr = ip6;
        }
        if let Ok(port) = ctx.load::<u16>(40) {
            key.port = u16::from_be(port);
        }
        (key, super::state::AF_INET6)
    }
}

//! `cgroup/bind4` and `cgroup/bind6`: the daemon's two ports are the daemon's.
//!
//! In every network namespace the daemon serves but its own, nothing else may bind the
//! redirect or the inbound port (in its own namespace `sk_lookup` hands those ports to the
//! daemon's sockets, whoever else binds them); an enrolled process may bind neither anywhere.
//! A workload that binds one first would otherwise receive its neighbours' redirected
//! plaintext, or keep the daemon from serving its namespace. Refused binds fail with `EPERM`
//! and are reported. The daemon's own sockets (tagged before they bind) pass.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, programs::SockAddrContext,
};
use enforcer_ebpf::{Counter, Event, EventKind, SockKey, reasons};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    enroll::current_enrolled_cgroup,
    state::{
        AF_INET, AF_INET6, IPPROTO_TCP, active_policy, config, current_tgid, daemon_tag, is_served,
        mapped, port_from_be, read_words, sock_tag,
    },
};

pub(crate) fn try_bind4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip4, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let local = SockKey {
        addr: mapped(ip4),
        port: port_from_be(port),
        pad: 0,
    };
    decide(ctx, &local, AF_INET)
}

pub(crate) fn try_bind6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip6, port) = unsafe { (read_words(&raw const (*sa).user_ip6), (*sa).user_port) };
    let local = SockKey {
        addr: ip6,
        port: port_from_be(port),
        pad: 0,
    };
    decide(ctx, &local, AF_INET6)
}

/// Whether the current task may bind its socket to `local`.
#[inline(always)]
fn decide(ctx: &SockAddrContext, local: &SockKey, family: u32) -> i32 {
    let cfg = config();
    let reserved =
        local.port != 0 && (local.port == cfg.outbound_port || local.port == cfg.inbound_port);
    if !reserved {
        return PROCEED;
    }
    // SAFETY: the context's socket is a full socket the verifier knows.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk.cast() };
    // SAFETY: as above.
    if unsafe { daemon_tag(sk) }.is_some() {
        return PROCEED;
    }
    let creator = || {
        // SAFETY: as above.
        unsafe { sock_tag(sk) }.map(|tag| {
            // SAFETY: a storage pointer from a successful lookup.
            unsafe { (*tag).cgroup_id }
        })
    };
    let enrolled = current_enrolled_cgroup().or_else(creator);
    // SAFETY: the context pointer is valid; the helper reads the socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let guarded = netns != cfg.netns_cookie && is_served(netns);
    if enrolled.is_none() && !guarded {
        return PROCEED;
    }
    let (_, meta) = active_policy();
    count(Counter::ReservedPort);
    emit(
        EventKind::Deny,
        Event {
            cgroup_id: enrolled.unwrap_or(0),
            policy_version: meta.version,
            tgid: current_tgid(),
            reason: reasons::RESERVED_PORT,
            src: *local,
            family,
            protocol: IPPROTO_TCP,
            ..Event::default()
        },
    );
    REFUSE
}

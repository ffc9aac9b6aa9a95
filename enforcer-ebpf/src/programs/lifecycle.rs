//! Process and socket lifecycle of enrolled workloads: bind, exec, exit.
//!
//! bind: a TCP port bound by an enrolled process becomes a service (owned by the process's
//! identity, or by "unknown" until the daemon attests it), so ingress protection starts before
//! the first connection. exec: the process loses its identity at once (re-attestation on exec).
//! exit: the identity is forgotten.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use enforcer_ebpf::{Counter, Event, EventKind, Service, SockKey};

use super::{
    emit::{count, emit},
    enroll::current_enrolled_cgroup,
    maps::{IDENTITIES, SERVICES},
    state::{
        AF_INET, AF_INET6, IPPROTO_TCP, active_policy, current_tgid, hint_service_port,
        identity_of, mapped, port_from_be, read_words,
    },
};

pub(crate) fn on_bind4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip4, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    on_bind(ctx, mapped(ip4), port, protocol, AF_INET);
}

pub(crate) fn on_bind6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip6, port, protocol) = unsafe {
        (
            read_words(&raw const (*sa).user_ip6),
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    on_bind(ctx, ip6, port, protocol, AF_INET6);
}

#[inline(always)]
fn on_bind(ctx: &SockAddrContext, addr: [u32; 4], port_be: u32, protocol: u32, family: u32) {
    let Some(cgroup_id) = current_enrolled_cgroup() else {
        return;
    };
    let tgid = current_tgid();
    let identity = identity_of(tgid);
    let key = SockKey {
        // An IPv4 wildcard bind is stored as the all-zero "any" address, like `::`.
        addr: if addr == mapped(0) { [0; 4] } else { addr },
        port: port_from_be(port_be),
        pad: 0,
    };
    if protocol == IPPROTO_TCP && key.port != 0 {
        let service = Service {
            identity,
            tgid,
            cgroup_id,
        };
        hint_service_port(key.port);
        if SERVICES.insert(key, service, 0).is_err() {
            count(Counter::TableFull);
        }
    }
    let (_, meta) = active_policy();
    count(Counter::Bind);
    emit(
        EventKind::Bind,
        Event {
            // SAFETY: the context pointer is valid; the helper reads the socket behind it.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            cgroup_id,
            policy_version: meta.version,
            tgid,
            src_id: identity,
            src: key,
            family,
            protocol,
            ..Event::default()
        },
    );
}

/// A process event: revoke the identity of the current tgid and report it.
#[inline(always)]
fn process_event(kind: EventKind, counter: Counter) {
    let Some(cgroup_id) = current_enrolled_cgroup() else {
        return;
    };
    let tgid = current_tgid();
    let identity = identity_of(tgid);
    let _ = IDENTITIES.remove(tgid);
    let (_, meta) = active_policy();
    count(counter);
    emit(
        kind,
        Event {
            cgroup_id,
            policy_version: meta.version,
            tgid,
            src_id: identity,
            ..Event::default()
        },
    );
}

pub(crate) fn on_exec() {
    process_event(EventKind::Exec, Counter::Exec);
}

pub(crate) fn on_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread-group leader's exit ends the process's identity.
    if pid_tgid & 0xffff_ffff == pid_tgid >> 32 {
        process_event(EventKind::Exit, Counter::Exit);
    }
}

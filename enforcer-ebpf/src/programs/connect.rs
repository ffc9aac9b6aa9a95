//! `cgroup/connect4` and `cgroup/connect6`: pass, refuse, allow as egress, or redirect.
//!
//! TCP of an enrolled process is refused when policy denies the pair, passes as plaintext
//! egress only to a destination that is neither a local workload nor a mesh peer, and is
//! otherwise redirected to the daemon's outbound listener on the loopback of the process's own
//! network namespace, or refused when the daemon does not serve that namespace (yet). Which
//! local workload a destination is comes from the namespace the destination address belongs
//! to: loopback is the caller's own, any other local address the namespace it is configured in
//! (the host's, or a container's). Every other protocol (UDP, ping sockets) passes only
//! where an egress entry for that protocol permits it.
//!
//! A same-node connection between two known workloads that policy allows (not in audit mode)
//! goes direct when the daemon turned kernel flows on: it is recorded as a [`KernelFlow`] by
//! the client socket's cookie, `sock_ops` records its addresses when the SYN is built, and
//! the ingress hook admits exactly that handshake to the destination's listener. Nothing is
//! encrypted or proxied: both ends are on this node, and the kernel knows both identities.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, generated::bpf_get_netns_cookie},
    programs::SockAddrContext,
};
use enforcer_ebpf::{
    Config, Counter, Event, EventKind, KernelFlow, OrigDst, PolicyEntry, PolicyMeta, Service,
    SockKey, UNKNOWN_IDENTITY, reasons,
};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    enroll::current_enrolled_cgroup,
    maps::{KERNEL_FLOWS, ORIG_BY_COOKIE},
    state::{
        AF_INET, AF_INET6, IPPROTO_TCP, active_policy, config, current_tgid, daemon_tag,
        egress_rule, generation_of, identity_at, identity_at_since, is_mapped, is_peer, is_served,
        mapped, policy_entry, port_from_be, read_words, service_at, sock_tag,
    },
};

/// What to do with one `connect()`.
enum Decision {
    /// Let it through unchanged.
    Proceed,
    /// Fail it with `EPERM`.
    Refuse,
    /// Rewrite the destination to this address and port.
    Redirect([u32; 4], u16),
}

pub(crate) fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip4, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let dst = SockKey {
        addr: mapped(ip4),
        port: port_from_be(port),
        pad: 0,
    };
    match decide(ctx, &dst, AF_INET, protocol) {
        Decision::Proceed => PROCEED,
        Decision::Refuse => REFUSE,
        Decision::Redirect(addr, port) => {
            // SAFETY: as above; connect4 may rewrite user_ip4 and user_port.
            unsafe {
                (*sa).user_ip4 = addr[3];
                (*sa).user_port = u32::from(port.to_be());
            }
            PROCEED
        }
    }
}

pub(crate) fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip6, port, protocol) = unsafe {
        (
            read_words(&raw const (*sa).user_ip6),
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    let dst = SockKey {
        addr: ip6,
        port: port_from_be(port),
        pad: 0,
    };
    match decide(ctx, &dst, AF_INET6, protocol) {
        Decision::Proceed => PROCEED,
        Decision::Refuse => REFUSE,
        Decision::Redirect(addr, port) => {
            // SAFETY: as above; connect6 may rewrite user_ip6 (word by word) and user_port.
            unsafe {
                (*sa).user_ip6[0] = addr[0];
                (*sa).user_ip6[1] = addr[1];
                (*sa).user_ip6[2] = addr[2];
                (*sa).user_ip6[3] = addr[3];
                (*sa).user_port = u32::from(port.to_be());
            }
            PROCEED
        }
    }
}

/// The decision for a `connect()` from the current task to `dst`.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: &SockKey, family: u32, protocol: u32) -> Decision {
    count(Counter::Connect);
    // SAFETY: the context's socket is a full socket the verifier knows.
    if unsafe { daemon_tag((*ctx.sock_addr).__bindgen_anon_1.sk.cast()) }.is_some() {
        count(Counter::PassDaemon);
        return Decision::Proceed;
    }
    // An enrolled process's socket stays enrolled in anyone's hands (a descriptor passed to
    // an unenrolled process): decided as the caller's, which has no identity.
    let creator = || {
        // SAFETY: the context's socket is a full socket the verifier knows.
        unsafe { sock_tag((*ctx.sock_addr).__bindgen_anon_1.sk.cast()) }.map(|tag| {
            // SAFETY: a storage pointer from a successful lookup.
            unsafe { (*tag).cgroup_id }
        })
    };
    let Some(cgroup_id) = current_enrolled_cgroup().or_else(creator) else {
        count(Counter::PassUnenrolled);
        return Decision::Proceed;
    };
    let tgid = current_tgid();
    let (slot, meta) = active_policy();
    // SAFETY: the context pointer is valid; the helper reads the socket behind it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = Event {
        cookie,
        cgroup_id,
        policy_version: meta.version,
        tgid,
        dst: *dst,
        family,
        protocol,
        ..Event::default()
    };
    if protocol != IPPROTO_TCP {
        return datagram(&mut event, dst);
    }

    let generation = generation_of(tgid);
    let src_id = identity_at(tgid, generation);
    // SAFETY: the context pointer is valid; the helper reads the socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let service = service_at(netns, dst);
    let dst_id = service.map_or(UNKNOWN_IDENTITY, |service| {
        identity_at_since(service.tgid, service.generation)
    });
    event.src_id = src_id;
    event.dst_id = dst_id;

    let cfg = config();
    let mut audit_rule = 0;
    if src_id != UNKNOWN_IDENTITY && dst_id != UNKNOWN_IDENTITY {
        // Both ends are known: policy decides here, before any packet leaves. No entry means
        // default deny.
        let entry = policy_entry(slot, src_id, dst_id, dst.port);
        let (action, rule) = entry.map_or((PolicyEntry::ACTION_DENY, 0), |e| (e.action, e.rule));
        event.rule = rule;
        if action != PolicyEntry::ACTION_ALLOW {
            if action == PolicyEntry::ACTION_AUDIT || meta.mode == PolicyMeta::MODE_AUDIT {
                count(Counter::Audit);
                emit(EventKind::Audit, event);
                audit_rule = rule;
            } else {
                count(Counter::Deny);
                event.reason = reasons::POLICY;
                emit(EventKind::Deny, event);
                return Decision::Refuse;
            }
        } else if meta.mode == PolicyMeta::MODE_ENFORCE
            && let Some(service) = service
            && direct(&cfg, &event, &service, netns)
        {
            return Decision::Proceed;
        }
    }

    // Local workloads and mesh peers are never plaintext egress.
    if service.is_none()
        && !is_peer(&dst.addr)
        && let Some(rule) = egress_rule(IPPROTO_TCP, &dst.addr, dst.port)
    {
        event.rule = rule;
        count(Counter::Egress);
        emit(EventKind::Egress, event);
        return Decision::Proceed;
    }

    redirect(&mut event, &cfg, netns, generation, audit_rule)
}

/// Remember where the connection was going and send it to the outbound listener of its own
/// namespace; refuse it when nothing of the daemon's can take it.
#[inline(always)]
fn redirect(
    event: &mut Event,
    cfg: &Config,
    netns: u64,
    generation: u64,
    audit_rule: u32,
) -> Decision {
    if !is_served(netns) {
        // Nothing of the daemon's listens on this namespace's loopback (yet): fail closed.
        count(Counter::NoListener);
        event.reason = reasons::NAMESPACE;
        emit(EventKind::NoListener, *event);
        return Decision::Refuse;
    }
    let Some(target) = redirect_target(cfg, event.family, &event.dst.addr) else {
        count(Counter::NoListener);
        emit(EventKind::NoListener, *event);
        return Decision::Refuse;
    };
    let orig = OrigDst {
        cookie: event.cookie,
        cgroup_id: event.cgroup_id,
        generation,
        dst: event.dst,
        tgid: event.tgid,
        src_id: event.src_id,
        dst_id: event.dst_id,
        rule: audit_rule,
        family: if event.family == AF_INET { 2 } else { 10 },
        pad: 0,
    };
    if ORIG_BY_COOKIE.insert(event.cookie, orig, 0).is_err() {
        // Without the record the listener cannot route the connection: fail closed.
        count(Counter::TableFull);
        return Decision::Refuse;
    }
    count(Counter::Redirect);
    emit(EventKind::Redirect, *event);
    Decision::Redirect(target, cfg.outbound_port)
}

/// Authorize an allowed same-node connection (`event`, to `service`'s listener) in the kernel
/// so that it goes direct; false when kernel flows are off, the client's namespace is not one
/// the daemon serves (it could not close the connection on a reload), or the table is full:
/// the connection then takes the tunnel like any other.
#[inline(always)]
fn direct(cfg: &Config, event: &Event, service: &Service, netns: u64) -> bool {
    if cfg.flags & Config::FLAG_KERNEL_FLOWS == 0 || !is_served(netns) {
        return false;
    }
    let flow = KernelFlow {
        cookie: event.cookie,
        cgroup_id: event.cgroup_id,
        policy_version: event.policy_version,
        // SAFETY: the helper has no preconditions.
        since_ns: unsafe { bpf_ktime_get_ns() },
        netns,
        dst_cgroup: service.cgroup_id,
        dst: event.dst,
        tgid: event.tgid,
        src_id: event.src_id,
        dst_id: event.dst_id,
        rule: event.rule,
        #[expect(clippy::cast_possible_truncation, reason = "AF_INET and AF_INET6 fit")]
        family: event.family as u16,
        ..KernelFlow::default()
    };
    if KERNEL_FLOWS.insert(event.cookie, flow, 0).is_err() {
        count(Counter::TableFull);
        return false;
    }
    count(Counter::KernelFlow);
    true
}

/// A `connect()` of a datagram socket (UDP, ping): permitted only by an egress entry of its
/// protocol.
#[inline(always)]
fn datagram(event: &mut Event, dst: &SockKey) -> Decision {
    if let Some(rule) = egress_rule(event.protocol, &dst.addr, dst.port) {
        event.rule = rule;
        count(Counter::Egress);
        emit(EventKind::Egress, *event);
        return Decision::Proceed;
    }
    count(Counter::ProtocolDenied);
    event.reason = reasons::PROTOCOL;
    emit(EventKind::Deny, *event);
    Decision::Refuse
}

/// Where to send a redirected socket of `family` going to `dst`: the IPv4 address for IPv4
/// and v4-mapped destinations, the IPv6 address otherwise. `None` when the daemon has not
/// configured one.
#[inline(always)]
fn redirect_target(cfg: &Config, family: u32, dst: &[u32; 4]) -> Option<[u32; 4]> {
    if cfg.outbound_port == 0 {
        return None;
    }
    if family == AF_INET || is_mapped(dst) {
        (cfg.outbound_ip4 != 0).then(|| mapped(cfg.outbound_ip4))
    } else {
        (cfg.outbound_ip6 != [0; 4]).then_some(cfg.outbound_ip6)
    }
}

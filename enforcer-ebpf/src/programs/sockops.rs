//! `sock_ops`: the life of sockets the datapath tracks.
//!
//! - a redirected socket, once established, has its record re-keyed by the client's network
//!   namespace and local address and port (what the outbound listener of that namespace sees
//!   as the peer); the record goes when the socket closes;
//! - a socket of an enrolled process that starts listening becomes a service: protected (only
//!   the daemon's hops may reach it, see `ingress`), recorded by address so connects and the
//!   daemon can find its owner, and removed again when it stops listening. The first listener
//!   on an address keeps it (a later one joining its `SO_REUSEPORT` group does not take it
//!   over). A listener that does not fit in the table stays protected, so nobody can reach
//!   it, and is reported.
//! - a same-node connection authorized in the kernel (see `connect`) has its addresses
//!   admitted when its SYN is built, an open event once established, and a close event with
//!   its byte counts when it closes, when its records go.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, generated::bpf_get_netns_cookie},
    programs::SockOpsContext,
};
use enforcer_ebpf::{
    Counter, Event, EventKind, FlowKey, KernelFlow, NsSockKey, Service, SockKey, SockTag, reasons,
};

use super::{
    emit::{count, emit},
    maps::{ADMITTED, KERNEL_FLOWS, ORIG_BY_COOKIE, ORIG_BY_TUPLE, SERVICES},
    state::{
        AF_INET, IPPROTO_TCP, active_policy, hint_service_port, host_port, identity_of, mapped,
        read_words, sock_tag,
    },
};

pub(crate) fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => admit(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            link(ctx);
            opened(ctx);
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => listen(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ctx.arg(0) == BPF_TCP_LISTEN {
                unlisten(ctx);
            } else {
                unlink(ctx);
                closed(ctx);
            }
        }
        _ => {}
    }
}

/// The socket's network namespace and local address and port (an unspecified address is its
/// family's any-address: `::ffff:0.0.0.0` for IPv4, `::` for IPv6).
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> NsSockKey {
    let addr = if ctx.family() == AF_INET {
        mapped(ctx.local_ip4())
    } else {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { read_words(&raw const (*ctx.ops).local_ip6) }
    };
    NsSockKey {
        // SAFETY: the context pointer is valid; the helper reads the socket's namespace.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: SockKey {
            addr,
            port: host_port(ctx.local_port()),
            pad: 0,
        },
        pad: 0,
    }
}

/// The socket's cookie.
#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Ask for state changes, so the socket's records are removed when it closes.
#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG.cast_signed());
}

#[inline(always)]
fn link(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(orig) = ORIG_BY_COOKIE.get_ptr(cookie) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and points to an OrigDst value.
    let orig = unsafe { *orig };
    if ORIG_BY_TUPLE.insert(local_key(ctx), orig, 0).is_ok() {
        count(Counter::Linked);
        watch_close(ctx);
    } else {
        count(Counter::TableFull);
    }
    let _ = ORIG_BY_COOKIE.remove(cookie);
}

#[inline(always)]
fn unlink(ctx: &SockOpsContext) {
    let key = local_key(ctx);
    let Some(orig) = ORIG_BY_TUPLE.get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and points to an OrigDst value.
    // Only the socket that created the record removes it (a later socket may reuse the port).
    if unsafe { (*orig).cookie } == cookie(ctx) {
        let _ = ORIG_BY_TUPLE.remove(key);
    }
}

/// A kernel flow's SYN is being built: its addresses are known now; admit them.
#[inline(always)]
fn admit(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(flow) = KERNEL_FLOWS.get_ptr_mut(cookie) else {
        return;
    };
    let local = local_key(ctx);
    // SAFETY: the pointer comes from a successful lookup and points to a KernelFlow value;
    // only this socket's callbacks write it.
    let key = unsafe {
        (*flow).local = local.addr;
        FlowKey {
            src: local.addr,
            dst: (*flow).dst,
        }
    };
    watch_close(ctx);
    if ADMITTED.insert(key, cookie, 0).is_err() {
        // Unreachable while both tables have the same capacity; the SYN is then dropped.
        count(Counter::TableFull);
    }
}

/// A kernel flow completed its handshake: its open event.
#[inline(always)]
fn opened(ctx: &SockOpsContext) {
    let Some(flow) = KERNEL_FLOWS.get_ptr_mut(cookie(ctx)) else {
        return;
    };
    // SAFETY: as in `admit`.
    let flow = unsafe {
        (*flow).state = KernelFlow::ESTABLISHED;
        (*flow).since_ns = bpf_ktime_get_ns();
        *flow
    };
    emit(EventKind::FlowOpen, flow_event(&flow));
}

/// A kernel flow's socket closed: its close event (if it ever opened), and its records go.
#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(flow) = KERNEL_FLOWS.get_ptr(cookie) else {
        return;
    };
    // SAFETY: as in `admit`.
    let flow = unsafe { *flow };
    let _ = ADMITTED.remove(FlowKey {
        src: flow.local,
        dst: flow.dst,
    });
    let _ = KERNEL_FLOWS.remove(cookie);
    if flow.state != KernelFlow::ESTABLISHED {
        return;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let (acked, received) = unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
    let mut event = flow_event(&flow);
    (event.bytes_up, event.bytes_down) = payload(ctx.arg(0), acked, received);
    // SAFETY: the helper has no preconditions.
    event.duration_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(flow.since_ns);
    emit(EventKind::FlowClose, event);
}

/// The payload bytes of a connection that closed from state `from`, out of the kernel's
/// sequence-space counts: `acked` counts the SYN and, once acknowledged, the FIN; `received`
/// counts the peer's FIN. From `FIN_WAIT2` the peer's FIN may or may not have come: it is
/// counted as a byte then.
#[inline(always)]
fn payload(from: u32, acked: u64, received: u64) -> (u64, u64) {
    let own_fin_acked = matches!(
        from,
        BPF_TCP_FIN_WAIT2 | BPF_TCP_TIME_WAIT | BPF_TCP_LAST_ACK
    );
    let peer_fin = matches!(
        from,
        BPF_TCP_CLOSE_WAIT | BPF_TCP_LAST_ACK | BPF_TCP_CLOSING | BPF_TCP_TIME_WAIT
    );
    (
        acked.saturating_sub(1 + u64::from(own_fin_acked)),
        received.saturating_sub(u64::from(peer_fin)),
    )
}

/// The event fields every record of `flow` carries.
#[inline(always)]
fn flow_event(flow: &KernelFlow) -> Event {
    Event {
        cookie: flow.cookie,
        cgroup_id: flow.cgroup_id,
        policy_version: flow.policy_version,
        tgid: flow.tgid,
        src_id: flow.src_id,
        dst_id: flow.dst_id,
        rule: flow.rule,
        src: flow.local,
        dst: flow.dst,
        family: u32::from(flow.family),
        protocol: IPPROTO_TCP,
        dst_cgroup_id: flow.dst_cgroup,
        ..Event::default()
    }
}

/// `EEXIST` (helpers return errors negated).
const EEXIST: i32 = 17;

/// A socket started listening: if an enrolled process made it, it becomes a service.
#[inline(always)]
fn listen(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is valid; `sk` is the listening socket (checked non-null).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is the context's full socket.
    let Some(tag) = (unsafe { sock_tag(sk.cast()) }) else {
        return;
    };
    // SAFETY: a storage pointer from a successful lookup; this program is its only writer.
    let owner = unsafe {
        (*tag).flags |= SockTag::PROTECTED;
        *tag
    };
    let key = local_key(ctx);
    let cookie = cookie(ctx);
    let service = Service {
        tgid: owner.tgid,
        pad: 0,
        cgroup_id: owner.cgroup_id,
        cookie,
        generation: owner.generation,
    };
    watch_close(ctx);
    hint_service_port(key.addr.port);
    let (_, meta) = active_policy();
    let mut event = Event {
        cookie,
        cgroup_id: owner.cgroup_id,
        policy_version: meta.version,
        tgid: owner.tgid,
        src_id: identity_of(owner.tgid),
        src: key.addr,
        family: ctx.family(),
        protocol: IPPROTO_TCP,
        ..Event::default()
    };
    // The first listener keeps the address: a later one in its reuseport group (perhaps
    // another workload's) must not take the address's identity over.
    match SERVICES.insert(key, service, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(error) if error == -EEXIST => event.reason = reasons::SHARED,
        Err(_) => {
            count(Counter::TableFull);
            event.reason = reasons::TABLE_FULL;
        }
    }
    count(Counter::Listen);
    emit(EventKind::Listen, event);
}

/// A listening socket closed: forget its service, unless another socket owns the entry now.
#[inline(always)]
fn unlisten(ctx: &SockOpsContext) {
    let key = local_key(ctx);
    let Some(service) = SERVICES.get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and points to a Service value.
    if unsafe { (*service).cookie } == cookie(ctx) {
        let _ = SERVICES.remove(key);
        count(Counter::Unlisten);
    }
}

//! `sock_ops`: when a redirected socket is established, re-key its record by the client's local
//! address and port (what the outbound listener sees as the peer); forget it on close.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    programs::SockOpsContext,
};
use enforcer_ebpf::{Counter, SockKey};

use super::{
    emit::count,
    maps::{ORIG_BY_COOKIE, ORIG_BY_TUPLE},
    state::{AF_INET, host_port, mapped, read_words},
};

pub(crate) fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => link(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => unlink(ctx),
        _ => {}
    }
}

/// The socket's local address and port.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> SockKey {
    let addr = if ctx.family() == AF_INET {
        mapped(ctx.local_ip4())
    } else {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { read_words(&raw const (*ctx.ops).local_ip6) }
    };
    SockKey {
        addr,
        port: host_port(ctx.local_port()),
        pad: 0,
    }
}

/// The socket's cookie.
#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
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
        // Ask for state changes so the record is removed when the socket closes.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG.cast_signed());
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

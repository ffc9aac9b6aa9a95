//! Socket creation by enrolled processes.
//!
//! `cgroup/sock_create` tags every IPv4/IPv6 socket an enrolled process creates with its
//! creator (tgid, cgroup, image generation), which is how the other programs know the socket
//! is an enrolled workload's, and refuses raw sockets outright (they could forge any packet)
//! and MPTCP sockets (their subflows are sockets the kernel makes untagged). Sockets are made
//! in any network namespace: a container's own is served by the daemon's listeners there, and
//! until it is, the connect hooks refuse its redirects. A socket that cannot be tagged is
//! refused too (fail closed). `lsm/socket_create`, where the kernel runs
//! the BPF LSM, refuses packet sockets (`AF_PACKET`), which no socket hook sees.

use aya_ebpf::programs::{LsmContext, SockContext};
use enforcer_ebpf::{Counter, Event, EventKind, SockTag, reasons};

use super::{
    PROCEED, REFUSE,
    emit::{count, emit},
    enroll::current_enrolled_cgroup,
    state::{SOCK_RAW, active_policy, current_tgid, generation_of, tag_sock},
};

/// `AF_PACKET`.
const AF_PACKET: i32 = 17;
/// `IPPROTO_MPTCP`.
const IPPROTO_MPTCP: u32 = 262;
/// What an LSM hook returns to refuse: `-EPERM`.
const LSM_EPERM: i32 = -1;

pub(crate) fn try_sock_create(ctx: &SockContext) -> i32 {
    let Some(cgroup_id) = current_enrolled_cgroup() else {
        return PROCEED;
    };
    let tgid = current_tgid();
    // SAFETY: the context's socket is valid for the whole program run.
    let (family, kind, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    if kind == SOCK_RAW {
        refuse(cgroup_id, tgid, family, protocol, reasons::RAW_SOCKET);
        return REFUSE;
    }
    if protocol == IPPROTO_MPTCP {
        // Its subflows are sockets the kernel makes, which no hook here sees; applications
        // fall back to TCP (as Go's listeners do when the protocol is refused).
        refuse(cgroup_id, tgid, family, protocol, reasons::PROTOCOL);
        return REFUSE;
    }
    let mut tag = SockTag {
        tgid,
        flags: 0,
        cgroup_id,
        generation: generation_of(tgid),
    };
    // SAFETY: the context's socket is a full socket the verifier knows.
    if unsafe { tag_sock(ctx.sock.cast(), &mut tag) }.is_none() {
        count(Counter::TableFull);
        return REFUSE;
    }
    PROCEED
}

pub(crate) fn try_socket_lsm(ctx: &LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if kern != 0 || family != AF_PACKET {
        return 0;
    }
    let Some(cgroup_id) = current_enrolled_cgroup() else {
        return 0;
    };
    let protocol: i32 = ctx.arg(2);
    refuse(
        cgroup_id,
        current_tgid(),
        family.cast_unsigned(),
        protocol.cast_unsigned(),
        reasons::RAW_SOCKET,
    );
    LSM_EPERM
}

/// Count and report a refused socket: raw or packet (`reasons::RAW_SOCKET`), or of a protocol
/// the datapath cannot follow (`reasons::PROTOCOL`).
#[inline(always)]
fn refuse(cgroup_id: u64, tgid: u32, family: u32, protocol: u32, reason: u32) {
    let (_, meta) = active_policy();
    count(if reason == reasons::RAW_SOCKET {
        Counter::RawRefused
    } else {
        Counter::ProtocolDenied
    });
    emit(
        EventKind::Deny,
        Event {
            cgroup_id,
            policy_version: meta.version,
            tgid,
            reason,
            family,
            protocol,
            ..Event::default()
        },
    );
}

//! Program entry points, one per hook.
//!
//! Every helper is `#[inline(always)]`: a BPF-to-BPF call cannot carry the context and map
//! value pointers the verifier tracks, so each program must be one function after inlining.
#![expect(clippy::inline_always, reason = "see the module comment")]

mod bind;
mod connect;
mod egress;
mod emit;
mod enroll;
mod ingress;
mod lifecycle;
mod maps;
mod sockets;
mod sockops;
mod state;
mod steer;

/// Return code of cgroup hooks that lets the operation proceed.
const PROCEED: i32 = 1;
/// Return code of cgroup hooks that refuses it (`EPERM` for connect and socket creation, drop
/// for skb).
const REFUSE: i32 = 0;

/// The entry points: each calls its module's logic and returns the hook's verdict.
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macros hand each program its context by value"
)]
mod entry {
    use super::{bind, connect, egress, ingress, lifecycle, sockets, sockops, steer};
    use aya_ebpf::{
        macros::{
            btf_tracepoint, cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm, sk_lookup, sock_ops,
        },
        programs::{
            BtfTracePointContext, LsmContext, SkBuffContext, SkLookupContext, SockAddrContext,
            SockContext, SockOpsContext,
        },
    };

    #[cgroup_sock_addr(connect4)]
    pub(crate) fn enf_connect4(ctx: SockAddrContext) -> i32 {
        connect::try_connect4(&ctx)
    }

    #[cgroup_sock_addr(connect6)]
    pub(crate) fn enf_connect6(ctx: SockAddrContext) -> i32 {
        connect::try_connect6(&ctx)
    }

    #[cgroup_sock_addr(bind4)]
    pub(crate) fn enf_bind4(ctx: SockAddrContext) -> i32 {
        bind::try_bind4(&ctx)
    }

    #[cgroup_sock_addr(bind6)]
    pub(crate) fn enf_bind6(ctx: SockAddrContext) -> i32 {
        bind::try_bind6(&ctx)
    }

    #[cgroup_sock(sock_create)]
    pub(crate) fn enf_sock_create(ctx: SockContext) -> i32 {
        sockets::try_sock_create(&ctx)
    }

    #[sock_ops]
    pub(crate) fn enf_sock_ops(ctx: SockOpsContext) -> u32 {
        sockops::on_sock_ops(&ctx);
        1
    }

    #[cgroup_skb]
    pub(crate) fn enf_ingress(ctx: SkBuffContext) -> i32 {
        ingress::try_ingress(&ctx)
    }

    #[cgroup_skb]
    pub(crate) fn enf_egress(ctx: SkBuffContext) -> i32 {
        egress::try_egress(&ctx)
    }

    #[sk_lookup]
    pub(crate) fn enf_sk_lookup(ctx: SkLookupContext) -> u32 {
        steer::try_sk_lookup(&ctx)
    }

    #[btf_tracepoint(function = "sched_process_exec")]
    pub(crate) fn enf_exec(_ctx: BtfTracePointContext) -> i32 {
        lifecycle::on_exec();
        0
    }

    #[btf_tracepoint(function = "sched_process_exit")]
    pub(crate) fn enf_exit(_ctx: BtfTracePointContext) -> i32 {
        lifecycle::on_exit();
        0
    }

    #[btf_tracepoint(function = "cgroup_mkdir")]
    pub(crate) fn enf_cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
        lifecycle::on_cgroup_mkdir(&ctx);
        0
    }

    #[btf_tracepoint(function = "cgroup_rmdir")]
    pub(crate) fn enf_cgroup_rmdir(ctx: BtfTracePointContext) -> i32 {
        lifecycle::on_cgroup_rmdir(&ctx);
        0
    }

    #[btf_tracepoint(function = "cgroup_attach_task")]
    pub(crate) fn enf_cgroup_attach(ctx: BtfTracePointContext) -> i32 {
        lifecycle::on_cgroup_attach(&ctx);
        0
    }

    #[lsm(hook = "socket_create")]
    pub(crate) fn enf_socket_lsm(ctx: LsmContext) -> i32 {
        sockets::try_socket_lsm(&ctx)
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

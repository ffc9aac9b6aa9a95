//! `sk_lookup` (attached to the daemon's network namespace): connections to the daemon's two
//! ports go to the daemon's own listening sockets or nowhere.
//!
//! The redirect address (`outbound_port` on the configured loopback addresses) and the inbound
//! port (on every local address) belong to the daemon: the socket that receives them is the
//! one the daemon put in `ENF_LISTENERS`, whatever else is bound there. When the daemon is gone
//! its sockets have left the map (a closed socket leaves every sockmap), and the connection is
//! refused: a process that binds the port while the daemon is down receives nothing, and
//! cannot keep a restarted daemon from serving.

use aya_ebpf::programs::SkLookupContext;
use enforcer_ebpf::{
    Counter, LISTENER_INBOUND4, LISTENER_INBOUND6, LISTENER_OUTBOUND4, LISTENER_OUTBOUND6,
};

use super::{
    emit::count,
    maps::LISTENERS,
    state::{AF_INET, IPPROTO_TCP, config, host_port, read_words},
};

/// `SK_PASS`: carry on (with the socket assigned, if one was).
const SK_PASS: u32 = 1;
/// `SK_DROP`: refuse the connection.
const SK_DROP: u32 = 0;
/// `bpf_sk_assign` flag: skip the reuseport selection.
const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 2;

pub(crate) fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: the context pointer is valid for the whole program run.
    let (protocol, family, port) =
        unsafe { ((*lookup).protocol, (*lookup).family, (*lookup).local_port) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let cfg = config();
    let port = host_port(port);
    let slot = if port != 0 && port == cfg.inbound_port {
        if family == AF_INET {
            LISTENER_INBOUND4
        } else {
            LISTENER_INBOUND6
        }
    } else if port != 0 && port == cfg.outbound_port {
        if family == AF_INET {
            // SAFETY: as above.
            if unsafe { (*lookup).local_ip4 } != cfg.outbound_ip4 {
                return SK_PASS;
            }
            LISTENER_OUTBOUND4
        } else {
            // SAFETY: as above.
            if unsafe { read_words(&raw const (*lookup).local_ip6) } != cfg.outbound_ip6 {
                return SK_PASS;
            }
            LISTENER_OUTBOUND6
        }
    } else {
        return SK_PASS;
    };
    // Exactly the daemon's socket, never another member of a reuseport group it might be in.
    if LISTENERS
        .redirect_sk_lookup(ctx, slot, BPF_SK_LOOKUP_F_NO_REUSEPORT)
        .is_ok()
    {
        count(Counter::Steered);
        SK_PASS
    } else {
        count(Counter::Unserved);
        SK_DROP
    }
}

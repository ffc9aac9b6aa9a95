//! Enrollment: a cgroup is enrolled when it, or one of its ancestors, is in `ENF_ENROLLED`.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
};
use enforcer_ebpf::MAX_CGROUP_DEPTH;

use super::maps::ENROLLED;

/// Whether `id` is enrolled itself.
#[inline(always)]
fn listed(id: u64) -> bool {
    ENROLLED.get_ptr(id).is_some()
}

/// `own` (a cgroup id), if it or one of its ancestors (`ancestor(level)`, 0 above `own`'s own
/// level) is enrolled.
#[inline(always)]
fn enrolled_at_or_below(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<u64> {
    if listed(own) {
        return Some(own);
    }
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 || id == own {
            return None;
        }
        if listed(id) {
            return Some(own);
        }
        level += 1;
    }
    None
}

/// The current task's cgroup id, if the task is in an enrolled cgroup (or below one).
#[inline(always)]
pub(crate) fn current_enrolled_cgroup() -> Option<u64> {
    // SAFETY: the helper has no preconditions.
    let own = unsafe { bpf_get_current_cgroup_id() };
    enrolled_at_or_below(own, |level| {
        // SAFETY: as above; it returns 0 above the task's own level.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    })
}

/// The cgroup id of the socket behind `skb` (the cgroup its creator was in), if that cgroup is
/// enrolled (or below one): for sockets no enrolled process created, yet in an enrolled
/// cgroup (made before the cgroup was enrolled, or by the kernel for an enrolled process).
#[inline(always)]
pub(crate) fn socket_enrolled_cgroup(skb: *mut __sk_buff) -> Option<u64> {
    // SAFETY: `skb` is the program's context, valid for the whole run.
    let own = unsafe { bpf_skb_cgroup_id(skb) };
    enrolled_at_or_below(own, |level| {
        // SAFETY: as above; it returns 0 above the socket's own level.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    })
}

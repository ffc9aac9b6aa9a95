//! Enrollment: a cgroup is enrolled when it, or one of its ancestors, is in `ENF_ENROLLED`.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use enforcer_ebpf::MAX_CGROUP_DEPTH;

use super::maps::ENROLLED;

/// Whether `id` is enrolled itself.
#[inline(always)]
fn listed(id: u64) -> bool {
    ENROLLED.get_ptr(id).is_some()
}

/// The current task's cgroup id, if the task is in an enrolled cgroup (or below one).
#[inline(always)]
pub(crate) fn current_enrolled_cgroup() -> Option<u64> {
    // SAFETY: the helper has no preconditions.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if listed(own) {
        return Some(own);
    }
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: the helper has no preconditions; it returns 0 above the task's own level.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            return None;
        }
        if listed(ancestor) {
            return Some(own);
        }
        level += 1;
    }
    None
}

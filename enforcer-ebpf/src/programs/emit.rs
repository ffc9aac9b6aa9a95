//! Events into the ring buffer and per-CPU counters.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use enforcer_ebpf::{Counter, Event, EventKind};

use super::maps::{COUNTERS, EVENTS};

/// Add one to a per-CPU counter.
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is to this CPU's slot of a per-CPU array; programs on one CPU do
        // not run concurrently with each other for the same slot.
        unsafe { *slot += 1 };
    }
}

/// Submit `event` (its kind and timestamp filled in here); a full ring buffer counts a loss.
#[inline(always)]
pub(crate) fn emit(kind: EventKind, mut event: Event) {
    event.kind = kind as u32;
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    if EVENTS.output::<Event>(&event, 0).is_err() {
        count(Counter::LostEvents);
    }
}

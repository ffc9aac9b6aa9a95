//! Process and cgroup lifecycle: exec, exit, moves between cgroups, and cgroups created at
//! enrolled paths.
//!
//! A process's identity holds for one *image generation*: exec, exit and a move to another
//! cgroup give the process a new generation (the time it happened), so an identity the daemon
//! attested for the old image, even one written after the change, never applies to the new
//! one. A cgroup created at an enrolled path is enrolled inside `mkdir`, before any process can
//! enter it, and forgotten when it is removed.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    programs::BtfTracePointContext,
};
use enforcer_ebpf::{
    Counter, Event, EventKind, Layout, MAX_PATH_BYTES, PATH_HASH_SEED, path_hash_step,
};

use super::{
    emit::{count, emit},
    enroll::current_enrolled_cgroup,
    maps::{ENROLL_PATHS, ENROLLED, GENERATIONS, IDENTITIES, PATH_SCRATCH},
    state::{active_policy, current_tgid, layout},
};

/// Give `tgid` a new image generation and drop the identity of its old one.
#[inline(always)]
fn new_generation(tgid: u32) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = GENERATIONS.insert(tgid, now, 0);
    let _ = IDENTITIES.remove(tgid);
}

/// A process event of the current task, if it is enrolled or holds an identity (its cgroup
/// may have left the policy since): new generation, then report it.
#[inline(always)]
fn process_event(kind: EventKind, counter: Counter) {
    let tgid = current_tgid();
    let cgroup_id = current_enrolled_cgroup();
    if cgroup_id.is_none() && IDENTITIES.get_ptr(tgid).is_none() {
        return;
    }
    let cgroup_id = cgroup_id.unwrap_or_default();
    new_generation(tgid);
    let (_, meta) = active_policy();
    count(counter);
    emit(
        kind,
        Event {
            cgroup_id,
            policy_version: meta.version,
            tgid,
            ..Event::default()
        },
    );
}

pub(crate) fn on_exec() {
    process_event(EventKind::Exec, Counter::Exec);
}

pub(crate) fn on_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread-group leader's exit ends the process.
    if pid_tgid & 0xffff_ffff == pid_tgid >> 32 {
        process_event(EventKind::Exit, Counter::Exit);
    }
}

/// `cgroup_mkdir(struct cgroup *cgrp, const char *path)`: a cgroup v2 directory created at an
/// enrolled path is enrolled at once.
pub(crate) fn on_cgroup_mkdir(ctx: &BtfTracePointContext) {
    let Some(layout) = layout() else {
        return;
    };
    let cgroup: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let Some(hash) = hash_path(path, false) else {
        return;
    };
    if ENROLL_PATHS.get_ptr(hash).is_none() {
        return;
    }
    let Some(id) = v2_cgroup_id(cgroup, &layout) else {
        return;
    };
    if ENROLLED.insert(id, 1, 0).is_err() {
        count(Counter::TableFull);
        return;
    }
    let (_, meta) = active_policy();
    count(Counter::Enrolled);
    emit(
        EventKind::Enroll,
        Event {
            cookie: id,
            cgroup_id: id,
            policy_version: meta.version,
            ..Event::default()
        },
    );
}

/// `cgroup_rmdir(struct cgroup *cgrp, const char *path)`: a removed cgroup v2 directory is no
/// longer enrolled, so re-created and short-lived cgroups never fill the enrolled table.
pub(crate) fn on_cgroup_rmdir(ctx: &BtfTracePointContext) {
    let Some(layout) = layout() else {
        return;
    };
    let cgroup: *const u8 = ctx.arg(0);
    let Some(id) = v2_cgroup_id(cgroup, &layout) else {
        return;
    };
    if ENROLLED.remove(id).is_ok() {
        count(Counter::Unenrolled);
    }
}

/// `cgroup_attach_task(struct cgroup *dst, const char *path, struct task_struct *task, bool)`:
/// a process that held an identity, or that enters an enrolled cgroup (or one below), gets a
/// new generation and is reported, so the daemon attests it (and its sockets) again.
pub(crate) fn on_cgroup_attach(ctx: &BtfTracePointContext) {
    let Some(layout) = layout() else {
        return;
    };
    let cgroup: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let task: *const u8 = ctx.arg(2);
    let Some(dst_id) = v2_cgroup_id(cgroup, &layout) else {
        return;
    };
    let Some(tgid) = read_kernel::<u32>(task, layout.task_tgid) else {
        return;
    };
    let attested = IDENTITIES.get_ptr(tgid).is_some();
    if !attested && hash_path(path, true).is_none() {
        return;
    }
    new_generation(tgid);
    let (_, meta) = active_policy();
    count(Counter::Moved);
    emit(
        EventKind::Move,
        Event {
            cgroup_id: dst_id,
            policy_version: meta.version,
            tgid,
            ..Event::default()
        },
    );
}

/// The id of `cgroup` when it belongs to the cgroup v2 hierarchy (`hierarchy_id` 0).
#[inline(always)]
fn v2_cgroup_id(cgroup: *const u8, layout: &Layout) -> Option<u64> {
    let root = read_kernel::<*const u8>(cgroup, layout.cgroup_root)?;
    if read_kernel::<i32>(root, layout.root_hierarchy_id)? != 0 {
        return None;
    }
    let node = read_kernel::<*const u8>(cgroup, layout.cgroup_kn)?;
    read_kernel::<u64>(node, layout.kernfs_id)
}

/// The `T` at `offset` bytes into the kernel object at `base` (an offset the loader found in
/// the kernel's BTF); `None` when the kernel refuses the read.
#[inline(always)]
fn read_kernel<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copes with any address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// Hash the cgroup path at `path` (kernel memory) with [`enforcer_ebpf::path_hash`]. With
/// `prefixes`, return the hash of the first of its prefixes (`/a`, `/a/b`, ..., the whole
/// path) that is an enrolled path, `None` when none is; without, the hash of the whole path,
/// `None` when it is too long to be an enrolled path.
#[inline(always)]
fn hash_path(path: *const u8, prefixes: bool) -> Option<u64> {
    let scratch = PATH_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the scratch slot is this CPU's; `path` is the tracepoint's string.
    let bytes = unsafe { &mut (*scratch).bytes };
    // SAFETY: reads at most the buffer's length from kernel memory and NUL-terminates.
    let len = unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(path, bytes) }
        .ok()?
        .len();
    let truncated = len >= MAX_PATH_BYTES;
    let mut hash = PATH_HASH_SEED;
    for (index, &byte) in bytes.iter().take(MAX_PATH_BYTES + 1).enumerate() {
        let boundary = byte == 0 || (byte == b'/' && index > 0);
        if prefixes && boundary && ENROLL_PATHS.get_ptr(hash).is_some() {
            return Some(hash);
        }
        if byte == 0 {
            return (!prefixes && !truncated).then_some(hash);
        }
        hash = path_hash_step(hash, byte);
    }
    None
}

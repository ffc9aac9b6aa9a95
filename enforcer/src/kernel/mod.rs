//! The kernel side: loading, attaching and pinning the eBPF programs, typed and validated
//! access to their maps, and decoding of their events.

mod addr;
mod bpffs;
mod btf;
mod cgroup;
mod events;
mod features;
mod loader;
mod maps;
mod netns;
mod tags;

pub(crate) use addr::from_words;
pub use bpffs::{ensure_bpffs, is_bpffs};
pub use cgroup::{CgroupError, cgroup_id, cgroup2_mount};
pub use enforcer_ebpf::{Counter, EventKind, PolicyMeta};
pub use events::{EventReader, KernelEvent};
pub use loader::{Datapath, DatapathOptions, LoadError};
pub(crate) use loader::{LSM, PROGRAMS, TRACEPOINTS};
pub(crate) use maps::ListenerOwner;
pub use maps::{
    DaemonConfig, EgressEntry, IpProtocol, ListenerSlot, Maps, MapsError, Original, PolicyAction,
    PolicyMode, PolicyRule, PolicyTable,
};
pub use netns::netns_cookie;
pub use tags::SocketTags;

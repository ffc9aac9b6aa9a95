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
mod sock_destroy;
mod tags;

pub(crate) use addr::from_words;
pub use bpffs::{BpffsError, ensure_bpffs, is_bpffs};
pub use btf::BtfError;
pub use cgroup::{CgroupError, cgroup_id, cgroup2_mount};
pub(crate) use enforcer_ebpf::PolicyMeta;
pub use enforcer_ebpf::{Counter, EventKind};
pub use events::{EventError, EventReader, KernelEvent};
pub use features::{Feature, FeatureError, KernelVersion};
pub use loader::{Datapath, DatapathOptions, LoadError, ProgramStats};
pub(crate) use loader::{LSM, PROGRAMS, TRACEPOINTS};
pub use maps::{
    DaemonConfig, EgressEntry, IpProtocol, KernelFlow, ListenerOwner, ListenerSlot, Maps,
    MapsError, Original, PolicyAction, PolicyMode, PolicyRule, PolicyTable,
};
pub use netns::{Netns, netns_cookie};
pub use sock_destroy::{DestroyError, SockDestroyer};
pub use tags::SocketTags;

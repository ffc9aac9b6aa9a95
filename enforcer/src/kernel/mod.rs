//! The kernel side: loading, attaching and pinning the eBPF programs, typed and validated
//! access to their maps, and decoding of their events.

pub mod addr;
pub mod bpffs;
pub mod btf;
pub mod cgroup;
pub mod events;
pub mod features;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod tags;

pub use enforcer_ebpf::{Counter, EventKind, PolicyMeta};
pub use events::{EventReader, KernelEvent};
pub use loader::{Datapath, DatapathOptions};
pub use maps::{
    DaemonConfig, EgressEntry, IpProtocol, ListenerSlot, Maps, Original, PolicyAction, PolicyMode,
    PolicyRule, PolicyTable,
};
pub use tags::SocketTags;

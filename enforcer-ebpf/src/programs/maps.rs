//! Map definitions. Every map is pinned by name under the daemon's bpffs directory, so a
//! restarted daemon re-adopts the same maps and enforcement continues while it is down.
//!
//! Most maps use aya's classic definitions. The two socket storages are BTF maps (the kernel
//! requires type information for them), defined here with [`SocketStorage`] because aya's own
//! BTF socket storage neither clones to accepted sockets nor pins.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap},
};
use enforcer_ebpf::{
    Config, DEFAULT_RING_BYTES, DEFAULT_TABLE_ENTRIES, DaemonTag, EgressKey, EgressRule, FlowKey,
    IdentityEntry, KernelFlow, LISTENER_SLOTS, Layout, NsSockKey, OrigDst, PathBuf, PolicyEntry,
    PolicyKey, PolicyMeta, Service, SockTag,
};

#[map(name = "ENF_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "ENF_LAYOUT")]
pub(crate) static LAYOUT: Array<Layout> = Array::pinned(1, 0);

#[map(name = "ENF_ENROLLED")]
pub(crate) static ENROLLED: HashMap<u64, u32> = HashMap::pinned(4096, 0);

#[map(name = "ENF_ENROLL_PATHS")]
pub(crate) static ENROLL_PATHS: HashMap<u64, u32> = HashMap::pinned(4096, 0);

#[map(name = "ENF_IDENTITIES")]
pub(crate) static IDENTITIES: HashMap<u32, IdentityEntry> =
    HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_GENERATIONS")]
pub(crate) static GENERATIONS: LruHashMap<u32, u64> = LruHashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_SERVICES")]
pub(crate) static SERVICES: HashMap<NsSockKey, Service> = HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_SERVICE_PORTS")]
pub(crate) static SERVICE_PORTS: Array<u32> = Array::pinned(65_536, 0);

#[map(name = "ENF_LOCAL_ADDRS")]
pub(crate) static LOCAL_ADDRS: HashMap<[u32; 4], u64> = HashMap::pinned(4096, 0);

#[map(name = "ENF_NETNS")]
pub(crate) static NETNS: HashMap<u64, u32> = HashMap::pinned(4096, 0);

#[map(name = "ENF_LISTENERS")]
pub(crate) static LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

#[map(name = "ENF_POLICY_0")]
pub(crate) static POLICY_0: HashMap<PolicyKey, PolicyEntry> =
    HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_POLICY_1")]
pub(crate) static POLICY_1: HashMap<PolicyKey, PolicyEntry> =
    HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_POLICY_META")]
pub(crate) static POLICY_META: Array<PolicyMeta> = Array::pinned(2, 0);

#[map(name = "ENF_POLICY_SLOT")]
pub(crate) static POLICY_SLOT: Array<u32> = Array::pinned(1, 0);

#[map(name = "ENF_EGRESS")]
pub(crate) static EGRESS: LpmTrie<EgressKey, EgressRule> = LpmTrie::pinned(4096, 0);

#[map(name = "ENF_PEERS")]
pub(crate) static PEERS: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(1024, 0);

#[map(name = "ENF_ORIG_BY_COOKIE")]
pub(crate) static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_ORIG_BY_TUPLE")]
pub(crate) static ORIG_BY_TUPLE: LruHashMap<NsSockKey, OrigDst> =
    LruHashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

// Not LRU: an entry evicted while its connection is open would escape revocation. When the
// table is full, the connection takes the tunnel instead. `ENF_ADMITTED` has the same
// capacity, so an authorized flow always finds room for its addresses.
#[map(name = "ENF_KERNEL_FLOWS")]
pub(crate) static KERNEL_FLOWS: HashMap<u64, KernelFlow> =
    HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_ADMITTED")]
pub(crate) static ADMITTED: HashMap<FlowKey, u64> = HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_PATH_SCRATCH")]
pub(crate) static PATH_SCRATCH: PerCpuArray<PathBuf> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "ENF_COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::pinned(enforcer_ebpf::Counter::COUNT, 0);

#[map(name = "ENF_EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

#[btf_map(name = "ENF_SOCKS")]
pub(crate) static SOCKS: SocketStorage<SockTag, { (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize }> =
    SocketStorage::new();

#[btf_map(name = "ENF_DAEMON_SOCKS")]
pub(crate) static DAEMON_SOCKS: SocketStorage<DaemonTag, { BPF_F_NO_PREALLOC as usize }> =
    SocketStorage::new();

/// `LIBBPF_PIN_BY_NAME`: the loader pins the map under its pin directory by its name.
const PIN_BY_NAME: usize = 1;

/// A pinned `BPF_MAP_TYPE_SK_STORAGE` in the BTF map layout: each field is a pointer whose
/// pointee type encodes one attribute (the loader reads the array lengths and pointee types
/// from BTF, never the values). `FLAGS` must include `BPF_F_NO_PREALLOC`; with `BPF_F_CLONE`
/// the kernel copies a listener's storage to the sockets it accepts.
#[repr(C)]
pub(crate) struct SocketStorage<T, const FLAGS: usize> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; FLAGS],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are placeholders the loader replaces with the map; they are never
// dereferenced, so sharing the definition between program runs is sound.
unsafe impl<T, const FLAGS: usize> Sync for SocketStorage<T, FLAGS> {}

impl<T, const FLAGS: usize> SocketStorage<T, FLAGS> {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    /// The map, as helpers take it.
    #[inline(always)]
    pub(crate) fn as_ptr(&self) -> *mut core::ffi::c_void {
        ptr::from_ref(self).cast_mut().cast()
    }
}

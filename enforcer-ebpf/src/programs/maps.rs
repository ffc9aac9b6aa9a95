//! Map definitions. Every map is pinned by name under the daemon's bpffs directory, so a
//! restarted daemon re-adopts the same maps and enforcement continues while it is down.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_ebpf::{
    Config, Counter, DEFAULT_RING_BYTES, DEFAULT_TABLE_ENTRIES, EgressKey, EgressRule, OrigDst,
    PolicyEntry, PolicyKey, PolicyMeta, Service, SockKey,
};

#[map(name = "ENF_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "ENF_ENROLLED")]
pub(crate) static ENROLLED: HashMap<u64, u32> = HashMap::pinned(4096, 0);

#[map(name = "ENF_IDENTITIES")]
pub(crate) static IDENTITIES: HashMap<u32, u32> = HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_SERVICES")]
pub(crate) static SERVICES: HashMap<SockKey, Service> = HashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_SERVICE_PORTS")]
pub(crate) static SERVICE_PORTS: Array<u32> = Array::pinned(65_536, 0);

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

#[map(name = "ENF_ORIG_BY_COOKIE")]
pub(crate) static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_ORIG_BY_TUPLE")]
pub(crate) static ORIG_BY_TUPLE: LruHashMap<SockKey, OrigDst> =
    LruHashMap::pinned(DEFAULT_TABLE_ENTRIES, 0);

#[map(name = "ENF_COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[map(name = "ENF_EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

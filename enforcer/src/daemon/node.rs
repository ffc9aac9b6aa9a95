//! What this daemon is and where it serves, fixed at start-up: the facts `status` reports and
//! the run loop announces.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, time::SystemTime};

use crate::{
    config::Config,
    identity::{SpiffeId, TrustDomain},
};

/// This daemon's configuration, identity, datapath and listening addresses.
#[derive(Debug)]
pub(crate) struct NodeFacts {
    /// The configuration it runs with.
    pub(crate) config: Config,
    /// The trust domain of the policy it started with (a reload cannot change it).
    pub(crate) trust_domain: TrustDomain,
    /// The node's own SPIFFE ID.
    pub(crate) node_id: SpiffeId,
    /// When it started.
    pub(crate) started: SystemTime,
    /// The cgroup v2 mount.
    pub(crate) mount: PathBuf,
    /// The cgroup the programs are attached to.
    pub(crate) scope: PathBuf,
    /// Whether it adopted the pins of an earlier run instead of attaching.
    pub(crate) adopted: bool,
    /// Whether the LSM hook that refuses packet sockets is attached.
    pub(crate) refuses_packet_sockets: bool,
    /// Whether allowed same-node flows go direct, authorized in the kernel.
    pub(crate) same_node_direct: bool,
    /// The outbound (redirect) listener addresses.
    pub(crate) outbound: Vec<SocketAddr>,
    /// The inbound (peer) listener address.
    pub(crate) inbound: SocketAddr,
}

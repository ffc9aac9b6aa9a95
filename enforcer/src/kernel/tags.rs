//! The daemon's tags on its own sockets (`ENF_DAEMON_SOCKS`): how the kernel tells the daemon's
//! sockets from everyone else's without trusting a pid, a mark or an address.
//!
//! A tag is socket storage: only a process that holds both the pinned map and the socket can
//! write it (root, the daemon), it cannot be copied to another socket, and it dies with the
//! socket. The connect hooks let tagged sockets pass; the ingress hook admits a connection to
//! a protected listener only from a socket tagged as a hop, and only to a listener whose owner
//! holds the identity the hop names.
#![forbid(unsafe_code)]

use std::{
    os::fd::BorrowedFd,
    path::Path,
    sync::{Mutex, PoisonError},
};

use aya::maps::{MapData, SkStorage};
use enforcer_ebpf::{DaemonTag, UNKNOWN_IDENTITY, map_names};

use super::maps::{MapsError, open_pinned};

/// A handle for tagging the daemon's sockets; cheap to share between threads.
pub struct SocketTags {
    storage: Mutex<SkStorage<MapData, DaemonTag>>,
}

impl SocketTags {
    /// Open the tag storage pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            storage: Mutex::new(open_pinned(maps_dir, map_names::DAEMON_SOCKS)?),
        })
    }

    /// Tag `socket` as the daemon's: its connects pass the hooks untouched.
    pub fn tag_daemon(&self, socket: BorrowedFd<'_>) -> Result<(), MapsError> {
        self.tag(
            socket,
            DaemonTag {
                kind: DaemonTag::KIND_DAEMON,
                identity: UNKNOWN_IDENTITY,
            },
        )
    }

    /// Tag `socket` as a hop to the local workload that holds `identity`: the only kind of
    /// connection a protected listener accepts, and only when its owner holds `identity`.
    pub fn tag_hop(&self, socket: BorrowedFd<'_>, identity: u32) -> Result<(), MapsError> {
        if identity == UNKNOWN_IDENTITY {
            return Err(MapsError::Invalid {
                what: "hop tag".into(),
                reason: "identity number 0 is reserved".into(),
            });
        }
        self.tag(
            socket,
            DaemonTag {
                kind: DaemonTag::KIND_HOP,
                identity,
            },
        )
    }

    fn tag(&self, socket: BorrowedFd<'_>, tag: DaemonTag) -> Result<(), MapsError> {
        self.storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(&socket, tag, 0)
            .map_err(|source| MapsError::Kernel {
                map: map_names::DAEMON_SOCKS,
                operation: format!("tag socket as {tag:?}"),
                source,
            })
    }
}

//! Decoding of the kernel's event ring buffer.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use enforcer_ebpf::{Event, EventKind, map_names};

use super::{
    addr::socket_addr,
    maps::{MapsError, open_pinned},
};

/// Errors of event decoding.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The ring buffer could not be opened.
    #[error("failed to open the event ring buffer")]
    Open(#[source] MapsError),
    /// A record had the wrong size.
    #[error("event record is {len} bytes, expected {expected}")]
    Size {
        /// Bytes received.
        len: usize,
        /// Bytes of an [`Event`].
        expected: usize,
    },
    /// A record had an unknown kind.
    #[error("event record has unknown kind {0}")]
    Kind(u32),
}

/// One decoded kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// What happened.
    pub kind: EventKind,
    /// `CLOCK_MONOTONIC` time of the event, in nanoseconds.
    pub timestamp_ns: u64,
    /// Socket cookie (0 for process events).
    pub cookie: u64,
    /// cgroup id of the process, or of the receiving socket for DROP.
    pub cgroup_id: u64,
    /// Version of the policy that decided.
    pub policy_version: u64,
    /// Process id (for DROP: the process that bound the port).
    pub tgid: u32,
    /// Source identity number (0 = unknown).
    pub src_id: u32,
    /// Destination identity number (0 = unknown).
    pub dst_id: u32,
    /// Rule number (0 = none).
    pub rule: u32,
    /// Why the kernel refused or dropped (one of [`enforcer_ebpf::reasons`]; 0 = none).
    pub reason: u32,
    /// Source address (DROP: the sender; LISTEN: the listening address).
    pub src: SocketAddr,
    /// Destination address (the original destination for connect events).
    pub dst: SocketAddr,
    /// IP protocol number.
    pub protocol: u32,
    /// For a flow close: bytes the client sent that the server acknowledged.
    pub bytes_up: u64,
    /// For a flow close: bytes the client received.
    pub bytes_down: u64,
    /// For a flow close: how long the connection was open.
    pub duration: Duration,
    /// For a flow open or close: the cgroup id of the destination listener's owner.
    pub dst_cgroup_id: u64,
}

impl KernelEvent {
    /// Decode one ring-buffer record, rejecting anything that is not exactly an [`Event`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        let expected = size_of::<Event>();
        if bytes.len() != expected {
            return Err(EventError::Size {
                len: bytes.len(),
                expected,
            });
        }
        let u64_at =
            |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let u32_at =
            |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let key_at = |at: usize| enforcer_ebpf::SockKey {
            addr: std::array::from_fn(|i| u32_at(at + 4 * i)),
            port: u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]),
            pad: 0,
        };
        let raw_kind = u32_at(32);
        let kind = EventKind::from_u32(raw_kind).ok_or(EventError::Kind(raw_kind))?;
        Ok(Self {
            kind,
            timestamp_ns: u64_at(0),
            cookie: u64_at(8),
            cgroup_id: u64_at(16),
            policy_version: u64_at(24),
            tgid: u32_at(36),
            src_id: u32_at(40),
            dst_id: u32_at(44),
            rule: u32_at(48),
            reason: u32_at(52),
            src: socket_addr(&key_at(56)),
            dst: socket_addr(&key_at(76)),
            protocol: u32_at(100),
            bytes_up: u64_at(104),
            bytes_down: u64_at(112),
            duration: Duration::from_nanos(u64_at(120)),
            dst_cgroup_id: u64_at(128),
        })
    }
}

/// Reader of the pinned event ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Open the ring buffer pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, EventError> {
        let ring = open_pinned(maps_dir, map_names::EVENTS).map_err(EventError::Open)?;
        Ok(Self { ring })
    }

    /// Every event available now, without waiting. Undecodable records are returned as errors
    /// in place, so one bad record never hides the others.
    pub fn drain(&mut self) -> Vec<Result<KernelEvent, EventError>> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            out.push(KernelEvent::decode(&item));
        }
        out
    }

    /// Wait up to `timeout` for an event that satisfies `want`, polling the ring buffer; events
    /// that do not match are discarded.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&KernelEvent) -> bool,
    ) -> Option<KernelEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(item) = self.ring.next() {
                if let Ok(event) = KernelEvent::decode(&item)
                    && want(&event)
                {
                    return Some(event);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use enforcer_ebpf::{Event, EventKind, SockKey};

    use super::{EventError, KernelEvent};

    fn bytes_of(event: &Event) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [
            event.timestamp_ns,
            event.cookie,
            event.cgroup_id,
            event.policy_version,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        for word in [
            event.kind,
            event.tgid,
            event.src_id,
            event.dst_id,
            event.rule,
            event.reason,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        for key in [event.src, event.dst] {
            for word in key.addr {
                out.extend_from_slice(&word.to_ne_bytes());
            }
            out.extend_from_slice(&key.port.to_ne_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out.extend_from_slice(&event.family.to_ne_bytes());
        out.extend_from_slice(&event.protocol.to_ne_bytes());
        for word in [
            event.bytes_up,
            event.bytes_down,
            event.duration_ns,
            event.dst_cgroup_id,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out
    }

    #[test]
    fn offsets_match_the_shared_layout() {
        assert_eq!(offset_of!(Event, kind), 32);
        assert_eq!(offset_of!(Event, rule), 48);
        assert_eq!(offset_of!(Event, src), 56);
        assert_eq!(offset_of!(Event, dst), 76);
        assert_eq!(offset_of!(Event, protocol), 100);
        assert_eq!(offset_of!(Event, bytes_up), 104);
        assert_eq!(offset_of!(Event, bytes_down), 112);
        assert_eq!(offset_of!(Event, duration_ns), 120);
        assert_eq!(offset_of!(Event, dst_cgroup_id), 128);
    }

    #[test]
    fn decodes_a_deny() {
        let event = Event {
            timestamp_ns: 7,
            cookie: 9,
            cgroup_id: 1234,
            policy_version: 3,
            kind: EventKind::Deny as u32,
            tgid: 42,
            src_id: 1,
            dst_id: 2,
            rule: 5,
            dst: crate::kernel::addr::sock_key("10.0.0.1:80".parse().unwrap()),
            src: SockKey::default(),
            family: 2,
            protocol: 6,
            reason: 1,
            ..Event::default()
        };
        let decoded = KernelEvent::decode(&bytes_of(&event)).unwrap();
        assert_eq!(decoded.kind, EventKind::Deny);
        assert_eq!(decoded.tgid, 42);
        assert_eq!(decoded.cgroup_id, 1234);
        assert_eq!(decoded.dst, "10.0.0.1:80".parse().unwrap());
        assert_eq!(
            (
                decoded.rule,
                decoded.policy_version,
                decoded.protocol,
                decoded.reason
            ),
            (5, 3, 6, 1)
        );
    }

    #[test]
    fn decodes_a_flow_close_with_its_counts() {
        let event = Event {
            kind: EventKind::FlowClose as u32,
            bytes_up: 1_000,
            bytes_down: 2_000_000,
            duration_ns: 1_500_000_000,
            dst_cgroup_id: 77,
            ..Event::default()
        };
        let decoded = KernelEvent::decode(&bytes_of(&event)).unwrap();
        assert_eq!(decoded.kind, EventKind::FlowClose);
        assert_eq!((decoded.bytes_up, decoded.bytes_down), (1_000, 2_000_000));
        assert_eq!(decoded.duration, std::time::Duration::from_millis(1_500));
        assert_eq!(decoded.dst_cgroup_id, 77);
    }

    #[test]
    fn rejects_bad_records() {
        assert!(matches!(
            KernelEvent::decode(&[0; 3]),
            Err(EventError::Size { len: 3, .. })
        ));
        let mut bytes = bytes_of(&Event::default());
        bytes[32] = 200;
        assert!(matches!(
            KernelEvent::decode(&bytes),
            Err(EventError::Kind(200))
        ));
    }
}

//! How much one caller, and all callers together, may hold open: connections and streams.
//! A caller over its share is refused at once (its connection closed, its stream
//! `ResourceExhausted`), so one process that opens thousands of connections costs the daemon
//! a bounded number of descriptors and never keeps the others from being served.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Connection,
    Stream,
}

/// The limits and what is open now, per caller (by pid) and in total.
#[derive(Debug)]
pub struct Limits {
    per_caller: usize,
    total: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    by_caller: HashMap<(u32, Kind), usize>,
    total: HashMap<Kind, usize>,
}

impl Limits {
    /// Each caller may hold `per_caller` connections and as many streams; all callers together
    /// `total` of each.
    #[must_use]
    pub fn new(per_caller: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_caller: per_caller.max(1),
            total: total.max(1),
            open: Mutex::default(),
        })
    }

    /// The streams one caller may have open on one connection (the HTTP/2 setting).
    #[must_use]
    pub fn per_caller(&self) -> usize {
        self.per_caller
    }

    /// A connection of `pid`, if it is within its share and the total.
    pub(crate) fn connection(self: &Arc<Self>, pid: u32) -> Option<ConnectionSlot> {
        self.take(pid, Kind::Connection).map(ConnectionSlot)
    }

    /// A stream of `pid`, if it is within its share and the total.
    pub(crate) fn stream(self: &Arc<Self>, pid: u32) -> Option<StreamSlot> {
        self.take(pid, Kind::Stream).map(StreamSlot)
    }

    /// Streams open now, all callers together.
    #[must_use]
    pub fn open_streams(&self) -> usize {
        self.lock().total.get(&Kind::Stream).copied().unwrap_or(0)
    }

    fn take(self: &Arc<Self>, pid: u32, kind: Kind) -> Option<Slot> {
        let mut open = self.lock();
        let total = open.total.get(&kind).copied().unwrap_or(0);
        let mine = open.by_caller.get(&(pid, kind)).copied().unwrap_or(0);
        if total >= self.total || mine >= self.per_caller {
            return None;
        }
        open.total.insert(kind, total + 1);
        open.by_caller.insert((pid, kind), mine + 1);
        Some(Slot {
            limits: Arc::clone(self),
            pid,
            kind,
        })
    }

    fn give_back(&self, pid: u32, kind: Kind) {
        let mut open = self.lock();
        if let Some(total) = open.total.get_mut(&kind) {
            *total = total.saturating_sub(1);
        }
        if let Some(mine) = open.by_caller.get_mut(&(pid, kind)) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.by_caller.remove(&(pid, kind));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One counted thing, given back when dropped.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    pid: u32,
    kind: Kind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.give_back(self.pid, self.kind);
    }
}

/// An open connection's place in the limits.
#[derive(Debug)]
pub(crate) struct ConnectionSlot(#[expect(dead_code, reason = "held for its Drop")] Slot);

/// An open stream's place in the limits.
#[derive(Debug)]
pub(crate) struct StreamSlot(#[expect(dead_code, reason = "held for its Drop")] Slot);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_share_and_the_total_caps_everyone() {
        let limits = Limits::new(2, 3);
        let a1 = limits.stream(1).expect("first");
        let _a2 = limits.stream(1).expect("second");
        assert!(limits.stream(1).is_none(), "over the caller's share");
        let _b1 = limits.stream(2).expect("another caller");
        assert!(limits.stream(3).is_none(), "over the total");
        assert_eq!(limits.open_streams(), 3);
        drop(a1);
        assert_eq!(limits.open_streams(), 2);
        let _c1 = limits.stream(3).expect("a slot was given back");
        let _conn = limits.connection(1).expect("connections are counted apart");
    }
}

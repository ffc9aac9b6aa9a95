//! What makes the open streams look again: a change that may touch every caller (an SVID
//! rotated, a policy reloaded, bundles replaced) or one process (it execed, exited or moved,
//! as the kernel reported). The daemon reports them; each stream re-derives its message and
//! sends it only when it differs from the last one sent. Changes are versions, not wake-ups:
//! one reported while a stream is busy is seen when it next waits.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use tokio::sync::watch;

/// A version that rises with every change.
type Epoch = watch::Sender<u64>;

/// How many processes' entries [`Changes`] keeps before it sweeps out those with no stream.
const SWEEP_AT: usize = 1024;

/// The daemon's side: reports changes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Changes {
    everything: Arc<Epoch>,
    processes: Arc<Mutex<HashMap<u32, Weak<Epoch>>>>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            everything: Arc::new(Epoch::new(0)),
            processes: Arc::default(),
        }
    }
}

impl Changes {
    /// Something every caller may see differently now.
    pub fn everything(&self) {
        bump(&self.everything);
    }

    /// Process `pid` may hold another identity now (exec, exit, cgroup move).
    pub fn process(&self, pid: u32) {
        let mut processes = self.lock();
        match processes.get(&pid).and_then(Weak::upgrade) {
            Some(epoch) => bump(&epoch),
            None => {
                processes.remove(&pid);
            }
        }
    }

    /// What a stream of `pid` waits on.
    pub(crate) fn watch(&self, pid: u32) -> Watch {
        let mut processes = self.lock();
        // Processes whose streams all ended and that never execed or exited since leave an
        // entry behind; sweep them when there are more than a busy node's worth.
        if processes.len() >= SWEEP_AT {
            processes.retain(|_, epoch| epoch.strong_count() > 0);
        }
        let epoch = processes
            .get(&pid)
            .and_then(Weak::upgrade)
            .unwrap_or_else(|| {
                let epoch = Arc::new(Epoch::new(0));
                processes.insert(pid, Arc::downgrade(&epoch));
                epoch
            });
        Watch {
            everything: self.everything.subscribe(),
            process: epoch.subscribe(),
            _epoch: epoch,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Weak<Epoch>>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn bump(epoch: &Epoch) {
    epoch.send_modify(|version| *version = version.wrapping_add(1));
}

/// One stream's view of [`Changes`].
#[derive(Debug)]
pub(crate) struct Watch {
    everything: watch::Receiver<u64>,
    process: watch::Receiver<u64>,
    /// Keeps the process's epoch while a stream of it is open.
    _epoch: Arc<Epoch>,
}

impl Watch {
    /// Waits for the next change that concerns this stream's caller (at once when one came
    /// since the last wait).
    pub(crate) async fn changed(&mut self) {
        tokio::select! {
            _ = self.everything.changed() => {}
            _ = self.process.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn woke(watch: &mut Watch) -> bool {
        tokio::time::timeout(Duration::from_millis(100), watch.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_stream_sees_changes_to_everything_and_to_its_own_process_only() {
        let changes = Changes::default();
        let mut mine = changes.watch(7);
        let mut same_pid = changes.watch(7);
        changes.process(8);
        assert!(!woke(&mut mine).await, "another process's change");
        changes.process(7);
        assert!(woke(&mut mine).await, "its own process");
        assert!(woke(&mut same_pid).await, "every stream of the process");
        assert!(!woke(&mut mine).await, "seen once");
        changes.everything();
        assert!(woke(&mut mine).await, "everything");
        drop((mine, same_pid));
        changes.process(7);
        assert!(changes.lock().is_empty(), "forgotten with its last stream");
    }

    #[test]
    fn entries_of_processes_without_streams_are_swept() {
        let changes = Changes::default();
        for pid in 0..u32::try_from(SWEEP_AT).expect("small") {
            drop(changes.watch(pid));
        }
        let _kept = changes.watch(u32::MAX);
        assert_eq!(changes.lock().len(), 1, "only the process with a stream");
    }
}

//! Open flows and their identities, so a policy reload can close the ones the new policy
//! denies (late rejection).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

use crate::policy::PolicyView;
use crate::{identity::SpiffeId, policy::Decision};

/// Why a tracked flow was told to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Revocation {
    /// The policy version that denies it.
    pub policy_version: u64,
    /// The deciding rule, `None` for the default deny.
    pub rule: Option<u32>,
}

struct Shared {
    notify: Notify,
    revocation: Mutex<Option<Revocation>>,
}

struct Entry {
    src: SpiffeId,
    dst: SpiffeId,
    port: u16,
    shared: Arc<Shared>,
}

/// The open flows of one endpoint.
#[derive(Default)]
pub(super) struct Tracker {
    next: AtomicU64,
    flows: Mutex<HashMap<u64, Entry>>,
}

impl Tracker {
    /// Track the flow `src` -> `dst` on `port` until the returned guard drops.
    pub(super) fn track(
        self: &Arc<Self>,
        src: &SpiffeId,
        dst: &SpiffeId,
        port: u16,
    ) -> TrackedFlow {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            notify: Notify::new(),
            revocation: Mutex::new(None),
        });
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Entry {
                    src: src.clone(),
                    dst: dst.clone(),
                    port,
                    shared: Arc::clone(&shared),
                },
            );
        TrackedFlow {
            tracker: Arc::clone(self),
            id,
            shared,
        }
    }

    /// Tell every open flow that `view` denies to close; returns how many were told.
    /// Flows that audit mode would let through stay open.
    pub(super) fn revoke_denied(&self, view: &PolicyView) -> usize {
        let flows = self.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut revoked = 0;
        for entry in flows.values() {
            let Decision { allowed, rule, .. } = view.decide(&entry.src, &entry.dst, entry.port);
            if allowed {
                continue;
            }
            *entry
                .shared
                .revocation
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Revocation {
                policy_version: view.version,
                rule,
            });
            entry.shared.notify.notify_one();
            revoked += 1;
        }
        revoked
    }

    /// How many flows are open.
    #[must_use]
    pub(super) fn len(&self) -> usize {
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A tracked open flow; dropping it stops tracking.
pub(super) struct TrackedFlow {
    tracker: Arc<Tracker>,
    id: u64,
    shared: Arc<Shared>,
}

impl TrackedFlow {
    /// Completes when a reload revokes the flow (at once if it already did).
    pub(super) async fn revoked(&self) -> Revocation {
        loop {
            if let Some(revocation) = self.revocation() {
                return revocation;
            }
            self.shared.notify.notified().await;
        }
    }

    /// Stop tracking the flow (it ended) and return its revocation, if a reload revoked it. A
    /// reload that counted this flow as closed is always seen here, even when the flow ended
    /// for another reason at the same moment (the peer's side of a revoked flow resets the
    /// stream, which can arrive first).
    #[must_use]
    pub(super) fn finish(self) -> Option<Revocation> {
        let shared = Arc::clone(&self.shared);
        // Dropping stops tracking under the tracker's lock, which a reload holds while it
        // revokes: once that lock is released, any revocation of this flow is visible.
        drop(self);
        *shared
            .revocation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The revocation, if the flow was revoked.
    #[must_use]
    pub(super) fn revocation(&self) -> Option<Revocation> {
        *self
            .shared
            .revocation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for TrackedFlow {
    fn drop(&mut self) {
        self.tracker
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    fn view(allow_db: bool, version: u64) -> PolicyView {
        let mut text = String::from(
            r#"trust_domain = "example.org"
[[allow]]
from = "spiffe://example.org/web"
to = "spiffe://example.org/api"
"#,
        );
        if allow_db {
            text.push_str(
                "[[allow]]\nfrom = \"spiffe://example.org/web\"\nto = \"spiffe://example.org/db\"\n",
            );
        }
        PolicyView::new(&parse("t.toml", text.as_bytes()).unwrap().0, version)
    }

    #[tokio::test]
    async fn reload_revokes_only_denied_flows() {
        let tracker = Arc::new(Tracker::default());
        let web: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let api: SpiffeId = "spiffe://example.org/api".parse().unwrap();
        let db: SpiffeId = "spiffe://example.org/db".parse().unwrap();
        let to_api = tracker.track(&web, &api, 80);
        let to_db = tracker.track(&web, &db, 80);
        assert_eq!(tracker.revoke_denied(&view(true, 1)), 0);
        assert_eq!(tracker.revoke_denied(&view(false, 2)), 1);
        assert_eq!(to_api.revocation(), None);
        assert_eq!(
            to_db.revoked().await,
            Revocation {
                policy_version: 2,
                rule: None
            }
        );
        drop(to_db);
        assert_eq!(tracker.len(), 1);
        drop(to_api);
        assert_eq!(tracker.len(), 0);
    }
}

//! The policy in force: one immutable, versioned snapshot ([`InForce`]) of everything derived
//! from a policy file (its text and hash, its compilation, the tunnel's view, the identity
//! registry), published by one [`PolicyPublisher`] to every reader's [`PolicySnapshot`]. The
//! tunnel, the registrar, the kernel sources and the control API read it; a reload compiles,
//! programs the kernel, then publishes once, so no reader ever sees half of two policies.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};

use super::{Compiled, Identities, IdentityNumbers, Policy, PolicyView, compile};
use crate::attest::Sha256Digest;

/// A policy and everything derived from it, as one version.
#[derive(Debug)]
pub struct InForce {
    /// The file it was read from, or the embedded default's name.
    pub name: String,
    /// Its source text.
    pub text: String,
    /// SHA-256 of the source text, in hex.
    pub hash: String,
    /// When it was compiled to be put in force.
    pub since: SystemTime,
    /// The policy.
    pub policy: Policy,
    /// Its compilation: identity numbers, the kernel table (with the version), egress, peers.
    pub compiled: Compiled,
    /// The tunnel's view: authorization, peers, TCP egress.
    pub view: Arc<PolicyView>,
    /// The workload entries and identity numbers that attestation resolves against.
    pub identities: Identities,
}

impl InForce {
    /// Compile `policy` (read from `name`, whose source is `text`) as `version`; its IDs keep
    /// the numbers they had in `previous`.
    #[must_use]
    pub fn compile(
        name: impl Into<String>,
        text: impl Into<String>,
        policy: Policy,
        previous: Option<&IdentityNumbers>,
        version: u64,
    ) -> Self {
        let text = text.into();
        let compiled = compile(&policy, previous, version);
        Self {
            name: name.into(),
            hash: hash(&text),
            text,
            since: SystemTime::now(),
            view: Arc::new(PolicyView::new(&policy, version)),
            identities: Identities::new(&policy, &compiled.numbers),
            compiled,
            policy,
        }
    }

    /// Its version: every record decided under it names this number.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.compiled.table.version
    }
}

/// SHA-256 of a policy's text, in hex.
#[must_use]
pub fn hash(text: &str) -> String {
    Sha256Digest(Sha256::digest(text.as_bytes()).into()).to_string()
}

/// The one handle readers hold to the policy in force. Cheap to clone; every clone sees each
/// publication of the [`PolicyPublisher`] it came from.
#[derive(Clone)]
pub struct PolicySnapshot(Arc<ArcSwap<InForce>>);

impl PolicySnapshot {
    /// A handle to `only`, which nothing will replace (tests, benchmarks, fixed nodes).
    #[must_use]
    pub fn fixed(only: InForce) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(only)))
    }

    /// The policy in force now. A reader keeps the version it loaded for as long as it holds
    /// it, whatever is published meanwhile.
    #[must_use]
    pub fn load(&self) -> Arc<InForce> {
        self.0.load_full()
    }
}

/// The one place a new policy is put in force: the daemon's reload owns it, and every reader
/// holds a [`PolicySnapshot`] made from it.
#[derive(Debug)]
pub struct PolicyPublisher(PolicySnapshot);

impl PolicyPublisher {
    /// A publisher whose first policy in force is `first`.
    #[must_use]
    pub fn new(first: InForce) -> Self {
        Self(PolicySnapshot::fixed(first))
    }

    /// A reader's handle.
    #[must_use]
    pub fn snapshot(&self) -> PolicySnapshot {
        self.0.clone()
    }

    /// The policy in force now.
    #[must_use]
    pub fn load(&self) -> Arc<InForce> {
        self.0.load()
    }

    /// Put `next` in force for every reader at once.
    pub fn publish(&self, next: InForce) {
        self.0.0.store(Arc::new(next));
    }
}

impl std::fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PolicySnapshot")
            .field(&self.load().version())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    const TEXT: &str = r#"
trust_domain = "example.org"
[[workload]]
id = "spiffe://example.org/db"
selectors = ["unix:uid:0"]
"#;

    fn in_force(version: u64) -> InForce {
        let (policy, _) = parse("t.toml", TEXT.as_bytes()).unwrap_or_else(|d| panic!("{d:?}"));
        InForce::compile("t.toml", TEXT, policy, None, version)
    }

    #[test]
    fn a_snapshot_names_its_version_text_and_hash() {
        let first = in_force(3);
        assert_eq!(first.version(), 3);
        assert_eq!(first.view.version, 3);
        assert_eq!(first.hash, hash(TEXT));
        assert_eq!(first.hash.len(), 64);
        assert_eq!(first.text, TEXT);
        assert_eq!(first.name, "t.toml");
        let db = "spiffe://example.org/db".parse().unwrap();
        assert!(first.identities.numbers.get(&db).is_some());
    }

    #[test]
    fn a_reader_keeps_what_it_loaded_and_the_next_load_sees_the_publication() {
        let publisher = PolicyPublisher::new(in_force(1));
        let snapshot = publisher.snapshot();
        let held = snapshot.load();
        publisher.publish(in_force(2));
        assert_eq!(held.version(), 1);
        assert_eq!(snapshot.load().version(), 2);
    }
}

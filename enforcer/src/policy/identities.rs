//! Registration: which workload entry, if any, a process's facts select.
//!
//! An entry matches when every one of its selectors holds (SPIRE semantics). The outcome is
//! deterministic: exactly one matching entry gives its SPIFFE ID; none gives no identity; two
//! or more entries (which always carry different IDs: the policy rejects duplicate IDs) give
//! no identity either, reported as ambiguous and logged, never whichever entry came first.
//!
//! An entry that pins `unix:sha256` vouches for the binary image *and* for the code the
//! dynamic loader maps into it. When such an entry is the one that matches but the process has
//! [loaded-code issues](crate::attest::LoadedCodeIssue) (a loader variable such as `LD_PRELOAD` in its
//! initial environment, or an executable mapping of a file a non-root user could have
//! written), the match is refused: no identity, with the issues as the reason. Entries without
//! a `unix:sha256` selector never promised anything about loaded code and are not affected.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use super::{IdentityNumbers, Policy, Workload};
use crate::{
    attest::{LoadedCodeIssue, ProcessFacts, Selector},
    identity::SpiffeId,
};

/// The result of matching a process against the registered entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identification {
    /// Exactly one entry matched.
    Matched {
        /// Its SPIFFE ID.
        id: SpiffeId,
        /// Its index among the entries (file order).
        entry: usize,
    },
    /// No entry matched.
    Unmatched,
    /// Several entries matched: no identity is given.
    Ambiguous(Vec<SpiffeId>),
    /// Exactly one entry matched, but it pins `unix:sha256` and the process runs code the
    /// binary's hash does not vouch for: no identity is given.
    Refused {
        /// The SPIFFE ID the entry would have given.
        id: SpiffeId,
        /// Its index among the entries (file order).
        entry: usize,
        /// Why: the process's loaded-code issues (never empty).
        reasons: Vec<LoadedCodeIssue>,
    },
}

/// The workload entries of the policy in force.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    workloads: Vec<Workload>,
}

impl Registry {
    /// A registry of `workloads`.
    #[must_use]
    pub fn new(workloads: Vec<Workload>) -> Self {
        Self { workloads }
    }

    /// Match `facts` against every entry.
    #[must_use]
    pub fn identify(&self, facts: &ProcessFacts) -> Identification {
        let mut matched = self.workloads.iter().enumerate().filter(|(_, workload)| {
            workload
                .selectors
                .iter()
                .all(|selector| selector.matches(facts))
        });
        let Some((entry, first)) = matched.next() else {
            return Identification::Unmatched;
        };
        let others: Vec<SpiffeId> = matched.map(|(_, w)| w.id.clone()).collect();
        if others.is_empty() {
            return vouched(facts, first, entry);
        }
        let mut ids = vec![first.id.clone()];
        ids.extend(others);
        tracing::warn!(
            pid = facts.pid,
            ids = ?ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "several workload entries match this process; it gets no identity"
        );
        Identification::Ambiguous(ids)
    }
}

/// The outcome for `workload`, the one entry (at index `entry`) that matches `facts`: refused
/// if it pins the binary's hash and the process runs code that hash does not vouch for.
fn vouched(facts: &ProcessFacts, workload: &Workload, entry: usize) -> Identification {
    let pins_hash = workload
        .selectors
        .iter()
        .any(|selector| matches!(selector, Selector::Sha256(_)));
    if !pins_hash || facts.loaded_code.is_empty() {
        return Identification::Matched {
            id: workload.id.clone(),
            entry,
        };
    }
    tracing::warn!(
        pid = facts.pid,
        id = %workload.id,
        reasons = ?facts.loaded_code.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "the process runs code its pinned binary does not vouch for; it gets no identity"
    );
    Identification::Refused {
        id: workload.id.clone(),
        entry,
        reasons: facts.loaded_code.clone(),
    }
}

/// The identities of the policy in force, as attestation and the kernel's identity numbers
/// need them; built once per policy and shared by everything that names workloads.
#[derive(Debug, Default)]
pub struct Identities {
    /// Workload entries.
    pub registry: Registry,
    /// Identity numbers by SPIFFE ID.
    pub numbers: IdentityNumbers,
    /// SPIFFE IDs by identity number.
    by_number: HashMap<u32, SpiffeId>,
    /// Enrolled cgroup paths (relative to the cgroup2 mount).
    pub enroll: Vec<String>,
}

impl Identities {
    /// The identities of `policy`, whose IDs carry `numbers` in the kernel.
    #[must_use]
    pub fn new(policy: &Policy, numbers: &IdentityNumbers) -> Self {
        Self {
            registry: Registry::new(policy.workloads.clone()),
            numbers: numbers.clone(),
            by_number: numbers
                .iter()
                .map(|(id, number)| (number, id.clone()))
                .collect(),
            enroll: policy.enroll.clone(),
        }
    }

    /// The SPIFFE ID of identity number `number` (0 is unknown).
    #[must_use]
    pub fn id(&self, number: u32) -> Option<&SpiffeId> {
        self.by_number.get(&number)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Identification, Registry};
    use crate::{
        attest::{ContainerInfo, LoadedCodeIssue, MappingProblem, ProcessFacts, Sha256Digest},
        policy::Workload,
    };

    fn facts(uid: u32, cgroup: &str) -> ProcessFacts {
        ProcessFacts {
            pid: 7,
            start_time: 1,
            uid,
            gid: 0,
            user: None,
            group: None,
            exe: PathBuf::from("/usr/bin/x"),
            sha256: Sha256Digest([0; 32]),
            cgroup: cgroup.into(),
            cgroup_id: None,
            container: ContainerInfo::default(),
            netns: 1,
            loaded_code: Vec::new(),
        }
    }

    fn workload(id: &str, selectors: &[&str]) -> Workload {
        Workload {
            id: id.parse().unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn all_selectors_must_hold_and_ambiguity_gives_no_identity() {
        let registry = Registry::new(vec![
            workload("spiffe://x/web", &["unix:uid:1000", "cgroup:path:/web"]),
            workload("spiffe://x/batch", &["cgroup:path:/batch"]),
            workload(
                "spiffe://x/any-1000",
                &["unix:uid:1000", "cgroup:path:/batch"],
            ),
        ]);
        assert_eq!(
            registry.identify(&facts(1000, "/web/app")),
            Identification::Matched {
                id: "spiffe://x/web".parse().unwrap(),
                entry: 0
            }
        );
        assert_eq!(
            registry.identify(&facts(0, "/web")),
            Identification::Unmatched
        );
        assert_eq!(
            registry.identify(&facts(1000, "/batch")),
            Identification::Ambiguous(vec![
                "spiffe://x/batch".parse().unwrap(),
                "spiffe://x/any-1000".parse().unwrap(),
            ])
        );
        assert_eq!(
            Registry::default().identify(&facts(0, "/")),
            Identification::Unmatched
        );
    }

    #[test]
    fn a_sha256_entry_is_refused_when_the_process_runs_code_its_hash_does_not_vouch_for() {
        let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let pinned = format!("unix:sha256:{sha}");
        let registry = Registry::new(vec![
            workload("spiffe://x/pinned", &[&pinned, "cgroup:path:/pinned"]),
            workload("spiffe://x/by-path", &["cgroup:path:/by-path"]),
        ]);
        let issues = vec![
            LoadedCodeIssue::LoaderVariable {
                name: "LD_PRELOAD",
                value: "/tmp/evil.so".into(),
            },
            LoadedCodeIssue::Mapping {
                path: "/tmp/evil.so".into(),
                problem: MappingProblem::Owner(1000),
            },
        ];
        let process = |cgroup: &str, loaded_code: &[LoadedCodeIssue]| ProcessFacts {
            sha256: sha.parse().unwrap(),
            loaded_code: loaded_code.to_vec(),
            ..facts(1000, cgroup)
        };
        assert_eq!(
            registry.identify(&process("/pinned", &[])),
            Identification::Matched {
                id: "spiffe://x/pinned".parse().unwrap(),
                entry: 0
            }
        );
        assert_eq!(
            registry.identify(&process("/pinned", &issues)),
            Identification::Refused {
                id: "spiffe://x/pinned".parse().unwrap(),
                entry: 0,
                reasons: issues.clone(),
            }
        );
        // An entry that does not pin the hash never vouched for loaded code.
        assert_eq!(
            registry.identify(&process("/by-path", &issues)),
            Identification::Matched {
                id: "spiffe://x/by-path".parse().unwrap(),
                entry: 1
            }
        );
    }
}

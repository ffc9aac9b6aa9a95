//! The daemon's answers to the Workload API's questions:
//! - who a caller is: attested exactly like a redirected client (the same workload entries,
//!   the same selectors, the attestation cache keyed by the kernel's image generation), and
//!   only while it is a process of an enrolled cgroup (checked first, from
//!   `/proc/<pid>/cgroup`, before anything is hashed): the node vouches only for processes
//!   whose traffic it enforces. A connection serves the process image that opened it: after an
//!   exec or a cgroup move (a new image generation) it serves nothing, like a redirected
//!   connection never gets the identity of an image that execed after `connect()`. A refusal
//!   is an audit record (`workload-api deny`) with the caller's pid, binary, sha256 and cgroup,
//!   once a minute per process image and at most [`REFUSAL_RECORDS_PER_MINUTE`] a minute in
//!   all (the next record says how many were left out);
//! - what the node hands out: the SVID cache's X.509-SVIDs (the ones the tunnel presents for
//!   the same identity), the trust bundles, and JWT-SVIDs signed with the trust domain's key.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use super::{
    Recorder, Svids,
    workloads::{below, in_enrolled_cgroup},
};
use crate::{
    attest::{Attestor, ProcessFacts},
    audit::{self, Entry},
    identity::{
        JwtAuthority, JwtBundleSet, JwtError, JwtSvid, SpiffeId, TrustBundleSet, ValidatedJwt,
        X509Svid, validate_jwt_svid,
    },
    kernel::Maps,
    policy::{Identification, PolicySnapshot},
    report::report,
    workload_api::{Caller, CallerIdentity, Credentials, Denial},
};

/// How often one process image's refusal is recorded at most.
const REFUSAL_RECORD_INTERVAL: Duration = Duration::from_mins(1);
/// Refusal records a minute, all callers together.
const REFUSAL_RECORDS_PER_MINUTE: u32 = 120;

/// Attests Workload API callers.
pub(crate) struct ApiCallers {
    attestor: Arc<Attestor>,
    /// The kernel maps handle the tunnel's lookups use (never held long).
    maps: Arc<Mutex<Maps>>,
    policy: PolicySnapshot,
    recorder: Recorder,
    /// Which refusals were recorded lately.
    recorded: Mutex<Recorded>,
}

/// The refusal records of the last minute.
#[derive(Debug, Default)]
struct Recorded {
    /// When each (pid, image generation)'s refusal was last recorded.
    images: HashMap<(u32, u64), Instant>,
    /// When the current minute began, and the records written in it.
    minute: Option<Instant>,
    written: u32,
    /// Refusals left out since the last record.
    left_out: u64,
}

impl Recorded {
    /// Whether to record a refusal of `image` now; if so, how many were left out before it.
    fn admit(&mut self, image: (u32, u64), now: Instant) -> Option<u64> {
        if self
            .images
            .get(&image)
            .is_some_and(|at| now.duration_since(*at) < REFUSAL_RECORD_INTERVAL)
        {
            return None;
        }
        if self
            .minute
            .is_none_or(|start| now.duration_since(start) >= REFUSAL_RECORD_INTERVAL)
        {
            self.minute = Some(now);
            self.written = 0;
            self.images
                .retain(|_, at| now.duration_since(*at) < REFUSAL_RECORD_INTERVAL);
        }
        if self.written >= REFUSAL_RECORDS_PER_MINUTE {
            self.left_out += 1;
            return None;
        }
        self.written += 1;
        self.images.insert(image, now);
        Some(std::mem::take(&mut self.left_out))
    }
}

impl ApiCallers {
    /// Callers attested with `attestor` (the registrar's and the tunnel's), their image
    /// generations read from `maps`, identified by the policy in force, refusals recorded.
    pub(crate) fn new(
        attestor: Arc<Attestor>,
        maps: Arc<Mutex<Maps>>,
        policy: PolicySnapshot,
        recorder: Recorder,
    ) -> Self {
        Self {
            attestor,
            maps,
            policy,
            recorder,
            recorded: Mutex::default(),
        }
    }

    fn generation(&self, pid: u32) -> u64 {
        self.maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .generation(pid)
            .unwrap_or_default()
    }

    /// The facts of `caller`'s current image, confirmed to be the caller's: it still runs (so
    /// its pid named it throughout), is the image that opened the connection, is in an
    /// enrolled cgroup (checked before anything is hashed), and did not exec meanwhile.
    fn facts(&self, caller: &Caller) -> Result<(ProcessFacts, u64), Denial> {
        let pid = caller.pid();
        let generation = self.generation(pid);
        if !caller.is_image(generation) {
            return Err(Denial::Execed { pid });
        }
        if !in_enrolled_cgroup(pid, &self.policy.load().policy.enroll) {
            return Err(Denial::NotEnrolled {
                pid,
                exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map_or_else(|_| "?".to_owned(), |exe| exe.display().to_string()),
            });
        }
        let facts =
            self.attestor
                .attest_for(pid, generation)
                .map_err(|error| Denial::Unattested {
                    pid,
                    why: report(&error),
                })?;
        if !caller.alive() {
            return Err(Denial::Unattested {
                pid,
                why: "it exited".to_owned(),
            });
        }
        if self.generation(pid) != generation {
            return Err(Denial::Unattested {
                pid,
                why: "it execed or moved while it was attested".to_owned(),
            });
        }
        Ok((facts, generation))
    }

    /// The identity of `facts`' process under the policy in force.
    fn identity_of(&self, facts: &ProcessFacts) -> Result<SpiffeId, Denial> {
        let in_force = self.policy.load();
        let exe = facts.exe.display().to_string();
        let enrolled = in_force
            .policy
            .enroll
            .iter()
            .any(|entry| below(&facts.cgroup, entry));
        if !enrolled {
            return Err(Denial::NotEnrolled {
                pid: facts.pid,
                exe,
            });
        }
        let why = match in_force.identities.registry.identify(facts) {
            Identification::Matched { id, .. } => return Ok(id),
            Identification::Unmatched => "no entry selects it".to_owned(),
            Identification::Ambiguous(ids) => format!(
                "{} entries select it ({})",
                ids.len(),
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Identification::Refused { id, reasons, .. } => format!(
                "the entry of {id} refuses it: {}",
                reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        Err(Denial::NoIdentity {
            pid: facts.pid,
            exe,
            why,
        })
    }

    /// Records `denial` of `caller` (with its facts when it was attested), unless this image's
    /// refusal was recorded less than a minute ago or the minute's records are spent.
    fn record(
        &self,
        caller: &Caller,
        generation: u64,
        facts: Option<&ProcessFacts>,
        denial: &Denial,
    ) {
        let Some(left_out) = self
            .recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit((caller.pid(), generation), Instant::now())
        else {
            return;
        };
        let reason = match denial {
            Denial::NotEnrolled { .. } => "not-enrolled",
            Denial::NoIdentity { .. } => "no-identity",
            Denial::Execed { .. } => "execed",
            Denial::Unattested { .. } => "unattested",
        };
        let left_out = if left_out > 0 {
            format!(
                "; {left_out} more refusals were not recorded (at most {REFUSAL_RECORDS_PER_MINUTE} a minute)"
            )
        } else {
            String::new()
        };
        let detail = format!("uid {}: {denial}{left_out}", caller.uid());
        self.recorder.submit(Entry {
            policy_version: self.policy.load().version(),
            src: audit::Src {
                pid: Some(caller.pid()),
                exe: facts.map(|facts| facts.exe.display().to_string()),
                sha256: facts.map(|facts| facts.sha256.to_string()),
                cgroup: facts.map(|facts| facts.cgroup.clone()),
                cgroup_id: facts.and_then(|facts| facts.cgroup_id),
                container_id: facts.and_then(|facts| facts.container.container_id.clone()),
                pod_uid: facts.and_then(|facts| facts.container.pod_uid.clone()),
                ..audit::Src::default()
            },
            detail: Some(detail),
            ..Entry::new(
                audit::Source::WorkloadApi,
                audit::Event::Deny,
                audit::Verdict::Deny,
                reason,
            )
        });
    }
}

impl CallerIdentity for ApiCallers {
    fn identify(&self, caller: &Caller) -> Result<SpiffeId, Denial> {
        let (facts, generation) = match self.facts(caller) {
            Ok(found) => found,
            Err(denial) => {
                self.record(caller, self.generation(caller.pid()), None, &denial);
                return Err(denial);
            }
        };
        self.identity_of(&facts).inspect_err(|denial| {
            self.record(caller, generation, Some(&facts), denial);
        })
    }
}

/// What this node hands out: its SVIDs, bundles and JWT-SVIDs.
pub(crate) struct NodeCredentials {
    svids: Arc<Svids>,
    bundles: Arc<TrustBundleSet>,
    jwt: JwtAuthority,
    jwt_bundles: Arc<JwtBundleSet>,
    jwt_ttl: Duration,
}

impl NodeCredentials {
    /// Credentials from the SVID cache, the trust bundles and the trust domain's JWT key,
    /// minting JWT-SVIDs valid for `jwt_ttl`.
    pub(crate) fn new(
        svids: Arc<Svids>,
        bundles: Arc<TrustBundleSet>,
        jwt: JwtAuthority,
        jwt_ttl: Duration,
    ) -> Self {
        let mut jwt_bundles = JwtBundleSet::default();
        jwt_bundles.insert(jwt.bundle());
        Self {
            svids,
            bundles,
            jwt,
            jwt_bundles: Arc::new(jwt_bundles),
            jwt_ttl,
        }
    }
}

impl Credentials for NodeCredentials {
    fn x509_svid(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, String> {
        self.svids.get(id).map_err(|error| report(&error))
    }

    fn x509_bundles(&self) -> Arc<TrustBundleSet> {
        Arc::clone(&self.bundles)
    }

    fn jwt_svid(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, JwtError> {
        self.jwt.mint(id, audience, SystemTime::now(), self.jwt_ttl)
    }

    fn jwt_bundles(&self) -> Arc<JwtBundleSet> {
        Arc::clone(&self.jwt_bundles)
    }

    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError> {
        validate_jwt_svid(token, audience, &self.jwt_bundles, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recorded_once_a_minute_per_image_and_within_a_budget() {
        let mut recorded = Recorded::default();
        let start = Instant::now();
        assert_eq!(recorded.admit((1, 0), start), Some(0));
        assert_eq!(recorded.admit((1, 0), start), None, "the same image again");
        assert_eq!(recorded.admit((1, 5), start), Some(0), "a new image");
        for pid in 2..REFUSAL_RECORDS_PER_MINUTE {
            assert!(recorded.admit((pid, 0), start).is_some());
        }
        assert_eq!(
            recorded.admit((9_999, 0), start),
            None,
            "the budget is spent"
        );
        assert_eq!(recorded.admit((9_998, 0), start), None);
        let later = start + REFUSAL_RECORD_INTERVAL;
        assert_eq!(
            recorded.admit((9_997, 0), later),
            Some(2),
            "the next minute's first record counts what was left out"
        );
        assert_eq!(recorded.admit((1, 0), later), Some(0), "a minute later");
    }
}

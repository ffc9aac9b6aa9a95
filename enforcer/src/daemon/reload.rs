//! Policy reload: validate -> diff -> (dry run stops here) -> compile and atomic apply in the
//! kernel -> publish the new snapshot (the tunnel, registrar, kernel sources and API see it at
//! once) -> close the open flows it denies (the tunnel's, and the same-node ones the kernel
//! authorized) -> re-register every enrolled process. A policy
//! that fails validation changes nothing: the old one keeps enforcing.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::Serialize;

use super::{
    Recorder,
    kernel_flows::KernelFlows,
    own_cgroup::{OwnCgroupError, refuse_enrolling_the_daemon},
    workloads::Registrar,
};
use crate::{
    audit::{self, Entry},
    identity::TrustDomain,
    kernel::Maps,
    policy::{
        ApplyError, Diagnostic, IdentityNumbers, InForce, Policy, PolicyPublisher, Severity, apply,
        diff, hash, parse, render,
    },
    tunnel::Tunnel,
    workload_api::Changes,
};

/// How long after the first pass over the kernel's flows a second one looks again: a
/// `connect()` that read the old policy slot just before the swap records its flow within
/// microseconds, after the first pass may have run.
const SECOND_PASS_AFTER: Duration = Duration::from_millis(50);

/// Compile `policy` (read from `name` as `text`) as `version`, its IDs keeping their
/// `previous` numbers, and program the kernel with it. Returns the compiled policy, ready to be
/// published, and the enrolled cgroups that do not exist yet.
pub(crate) fn compile_and_apply(
    maps: &Mutex<Maps>,
    mount: &std::path::Path,
    (name, text): (&str, &str),
    policy: Policy,
    previous: Option<&IdentityNumbers>,
    version: u64,
) -> Result<(InForce, Vec<String>), ApplyError> {
    let in_force = InForce::compile(name, text, policy, previous, version);
    let applied = apply(
        &mut maps.lock().unwrap_or_else(PoisonError::into_inner),
        &in_force.policy,
        &in_force.compiled,
        mount,
    )?;
    Ok((in_force, applied.missing_cgroups))
}

/// Why a reload was refused; the old policy stays in force.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The new policy does not validate.
    #[error("invalid policy:\n{}", render(.0))]
    Invalid(Vec<Diagnostic>),
    /// The new policy names another trust domain (that needs a restart with a new CA).
    #[error(
        "{file}: trust domain `{found}` differs from `{expected}` in force; changing the trust domain needs a restart"
    )]
    TrustDomain {
        /// The file.
        file: String,
        /// The new policy's trust domain.
        found: TrustDomain,
        /// The trust domain in force.
        expected: TrustDomain,
    },
    /// The new policy enrolls the daemon's own cgroup.
    #[error("{file}: {error}")]
    OwnCgroup {
        /// The file.
        file: String,
        /// Which entry, and the daemon's cgroup.
        error: OwnCgroupError,
    },
    /// Programming the kernel failed.
    #[error("failed to apply the policy to the kernel")]
    Apply(#[from] ApplyError),
}

/// What a reload did (or, for a dry run, would do).
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    /// Whether it was put in force (false for a dry run).
    pub(crate) applied: bool,
    /// The version in force before.
    pub(crate) previous_version: u64,
    /// The new version (for a dry run: the version it would get).
    pub(crate) version: u64,
    /// SHA-256 of the new text.
    pub(crate) hash: String,
    /// What changed, one line each (`+`, `-`, `~`).
    pub(crate) changes: Vec<String>,
    /// Warnings of validation.
    pub(crate) warnings: Vec<String>,
    /// Enrolled cgroups that do not exist yet.
    pub(crate) missing_cgroups: Vec<String>,
    /// Open flows the new policy denies, closed.
    pub(crate) closed: usize,
}

/// Puts new policies in force: one at a time, in the documented order (validate, diff, program
/// the kernel, publish the snapshot, close the flows it denies, re-register every process).
pub(crate) struct Reloader {
    /// The policy in force, published here and nowhere else.
    pub(crate) publisher: PolicyPublisher,
    /// The kernel maps the policy is applied to.
    pub(crate) maps: Arc<Mutex<Maps>>,
    /// The cgroup2 mount enrolled paths are resolved below.
    pub(crate) mount: PathBuf,
    /// The tunnel, whose open flows the new policy may deny.
    pub(crate) tunnel: Tunnel,
    /// The same-node flows the kernel authorized, which the new policy may deny.
    pub(crate) kernel_flows: Arc<KernelFlows>,
    /// The registrar, which re-registers every enrolled process under the new policy.
    pub(crate) registrar: Arc<Registrar>,
    /// Where the reload record goes.
    pub(crate) recorder: Recorder,
    /// Where a reload is reported (Workload API streams look again).
    pub(crate) changes: Changes,
    /// Held for the whole of a reload: one at a time.
    pub(crate) one_at_a_time: Mutex<()>,
}

impl Reloader {
    /// Reload the policy from `text` (named `file` in diagnostics); a dry run only validates and
    /// diffs.
    pub(crate) fn reload(
        &self,
        file: &str,
        text: &str,
        dry_run: bool,
    ) -> Result<Outcome, ReloadError> {
        let result = self.try_reload(file, text, dry_run);
        if !dry_run {
            self.recorder.telemetry.reloaded(result.is_ok());
        }
        if let Err(error) = &result {
            tracing::warn!(
                file,
                dry_run,
                "reload refused; the policy in force is unchanged: {error}"
            );
        }
        result
    }

    fn try_reload(&self, file: &str, text: &str, dry_run: bool) -> Result<Outcome, ReloadError> {
        let (policy, warnings) = parse(file, text.as_bytes()).map_err(ReloadError::Invalid)?;
        let one = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.publisher.load();
        if policy.trust_domain != current.policy.trust_domain {
            return Err(ReloadError::TrustDomain {
                file: file.to_owned(),
                found: policy.trust_domain,
                expected: current.policy.trust_domain.clone(),
            });
        }
        refuse_enrolling_the_daemon(&policy.enroll).map_err(|error| ReloadError::OwnCgroup {
            file: file.to_owned(),
            error,
        })?;
        let previous_version = current.version();
        let version = previous_version + 1;
        let mut outcome = Outcome {
            applied: false,
            previous_version,
            version,
            hash: hash(text),
            changes: diff(&current.policy, &policy)
                .iter()
                .map(ToString::to_string)
                .collect(),
            warnings: warnings
                .iter()
                .filter(|d| d.severity == Severity::Warning)
                .map(ToString::to_string)
                .collect(),
            missing_cgroups: Vec::new(),
            closed: 0,
        };
        if dry_run {
            return Ok(outcome);
        }
        let (next, missing_cgroups) = compile_and_apply(
            &self.maps,
            &self.mount,
            (file, text),
            policy,
            Some(&current.compiled.numbers),
            version,
        )?;
        self.publisher.publish(next);
        outcome.closed = self.tunnel.revoke_denied() + self.revoke_kernel_flows();
        outcome.applied = true;
        outcome.missing_cgroups = missing_cgroups;
        drop(one);
        self.registrar.rescan();
        self.changes.everything();
        self.record(file, &outcome);
        Ok(outcome)
    }

    /// Close the kernel's same-node flows the policy now in force denies, in two passes (see
    /// [`SECOND_PASS_AFTER`]); returns how many were closed.
    fn revoke_kernel_flows(&self) -> usize {
        let in_force = self.publisher.load();
        let first = self.kernel_flows.revoke_denied(&in_force);
        std::thread::sleep(SECOND_PASS_AFTER);
        first + self.kernel_flows.revoke_denied(&in_force)
    }

    /// The log line and the audit record of a reload put in force.
    fn record(&self, file: &str, outcome: &Outcome) {
        let Outcome {
            previous_version,
            version,
            ..
        } = *outcome;
        tracing::info!(
            file,
            version,
            hash = %outcome.hash,
            changes = outcome.changes.len(),
            closed = outcome.closed,
            "policy reloaded"
        );
        self.recorder.submit(Entry {
            policy_version: version,
            detail: Some(format!(
                "{file} v{previous_version} -> v{version} ({} changes, {} open flows closed): {}",
                outcome.changes.len(),
                outcome.closed,
                outcome.changes.join("; ")
            )),
            ..Entry::new(
                audit::Source::Daemon,
                audit::Event::Reload,
                audit::Verdict::Info,
                "reload",
            )
        });
    }
}

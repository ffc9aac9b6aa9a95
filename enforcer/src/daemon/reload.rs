//! Policy reload: validate -> diff -> (dry run stops here) -> atomic apply in the kernel ->
//! the tunnel's view (closing open flows the new policy denies) -> re-registration of every
//! enrolled process. A policy that fails validation changes nothing: the old one keeps
//! enforcing.
#![forbid(unsafe_code)]

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{
    Daemon,
    own_cgroup::{OwnCgroupError, refuse_enrolling_the_daemon},
    sources::KernelSources,
    workloads::Registrar,
};
use crate::{
    audit::{self, Entry},
    identity::TrustDomain,
    kernel::Maps,
    policy::{
        Compiled, Diagnostic, Identities, IdentityNumbers, Policy, Severity,
        apply::{ApplyError, apply},
        compile,
        diagnostic::render,
        diff::diff,
        parse,
    },
    tunnel::PolicyView,
};

/// The policy in force and where it came from.
#[derive(Debug)]
pub(crate) struct Enforced {
    /// The policy.
    pub(crate) policy: Policy,
    /// Its compilation (numbers, kernel table, version).
    pub(crate) compiled: Compiled,
    /// The file it was read from, or the embedded default's name.
    pub(crate) name: String,
    /// Its source text.
    pub(crate) text: String,
    /// SHA-256 of the source text.
    pub(crate) hash: String,
    /// When it was put in force.
    pub(crate) since: SystemTime,
}

impl Enforced {
    pub(crate) fn new(policy: Policy, compiled: Compiled, name: String, text: &str) -> Self {
        Self {
            policy,
            compiled,
            name,
            hash: hash(text),
            text: text.to_owned(),
            since: SystemTime::now(),
        }
    }

    /// Its version.
    pub(crate) fn version(&self) -> u64 {
        self.compiled.table.version
    }
}

/// Compile `policy` as `version` (its IDs keep their `previous` numbers), program the kernel,
/// and hand the policy's identities to the tunnel's sources and the registrar. Returns the
/// compilation and the enrolled cgroups that do not exist yet.
pub(super) fn put_in_force(
    maps: &Mutex<Maps>,
    mount: &Path,
    sources: &KernelSources,
    registrar: &Registrar,
    policy: &Policy,
    previous: Option<&IdentityNumbers>,
    version: u64,
) -> Result<(Compiled, Vec<String>), ApplyError> {
    let compiled = compile(policy, previous, version);
    let applied = apply(
        &mut maps.lock().unwrap_or_else(PoisonError::into_inner),
        policy,
        &compiled,
        mount,
    )?;
    let identities = Arc::new(Identities::new(policy, &compiled.numbers));
    sources.update(Arc::clone(&identities));
    registrar.update(identities);
    Ok((compiled, applied.missing_cgroups))
}

/// SHA-256 of a policy's text, in hex.
fn hash(text: &str) -> String {
    crate::attest::Sha256Digest(Sha256::digest(text.as_bytes()).into()).to_string()
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

impl Daemon {
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
        // One reload at a time: the lock is held until the new policy is in force.
        let mut current = self.enforced.lock().unwrap_or_else(PoisonError::into_inner);
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
        let changes: Vec<String> = diff(&current.policy, &policy)
            .iter()
            .map(ToString::to_string)
            .collect();
        let warnings: Vec<String> = warnings
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .map(ToString::to_string)
            .collect();
        let mut outcome = Outcome {
            applied: false,
            previous_version,
            version,
            hash: hash(text),
            changes,
            warnings,
            missing_cgroups: Vec::new(),
            closed: 0,
        };
        if dry_run {
            return Ok(outcome);
        }
        let (compiled, missing_cgroups) = put_in_force(
            &self.maps,
            &self.mount,
            &self.sources,
            &self.registrar,
            &policy,
            Some(&current.compiled.numbers),
            version,
        )?;
        outcome.closed = self.tunnel.reload(PolicyView::new(&policy, version));
        outcome.applied = true;
        outcome.missing_cgroups = missing_cgroups;
        *current = Arc::new(Enforced::new(policy, compiled, file.to_owned(), text));
        drop(current);
        self.registrar.rescan();
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
        Ok(outcome)
    }
}

//! Programming the kernel with a compiled policy.
#![forbid(unsafe_code)]

use std::path::Path;

use super::{compile::Compiled, model::Policy};
use crate::kernel::{Maps, MapsError};

/// Errors of applying a policy to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A map write failed or was refused; the active policy slot is unchanged when the rules
    /// themselves failed.
    #[error("failed to program the kernel")]
    Maps(#[from] MapsError),
}

/// What applying did beyond the obvious.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Enrolled cgroup paths that do not exist (yet): nothing to enroll until they do.
    pub missing_cgroups: Vec<String>,
}

/// Program `maps` with `compiled` (the compilation of `policy`): swap the rules in atomically,
/// then the mesh peers (before the egress entries, so a peer is never plaintext egress even
/// for a moment), the egress entries, the enrolled paths (so a cgroup created from now on at
/// one is enrolled by the kernel itself), and last the enrolled cgroups that exist (resolved
/// below `cgroup2_mount`).
pub fn apply(
    maps: &mut Maps,
    policy: &Policy,
    compiled: &Compiled,
    cgroup2_mount: &Path,
) -> Result<ApplyReport, ApplyError> {
    maps.apply_policy(&compiled.table)?;
    maps.replace_peers(&compiled.peers)?;
    maps.replace_egress(&compiled.egress)?;
    maps.replace_enroll_paths(&policy.enroll)?;
    let mut report = ApplyReport::default();
    let mut ids = Vec::new();
    for path in &policy.enroll {
        match crate::kernel::cgroup_id(&cgroup2_mount.join(path.trim_start_matches('/'))) {
            Ok(id) => ids.push(id),
            Err(_) => report.missing_cgroups.push(path.clone()),
        }
    }
    maps.replace_enrolled(&ids)?;
    Ok(report)
}

//! The daemon's own cgroup is never enrolled. The kernel tags every socket an enrolled process
//! creates with its creator and redirects its connects; the daemon's own sockets would then be
//! an enrolled workload's, and every hop and peer connection it makes dropped or redirected
//! back to itself. A policy whose `enroll` names the daemon's cgroup, or an ancestor of it, is
//! refused at start and at reload (the policy in force stays).
#![forbid(unsafe_code)]

use crate::attest::parse_cgroup_v2;

/// Where the kernel says which cgroup the daemon is in.
const OWN_CGROUP_FILE: &str = "/proc/self/cgroup";

/// Why a policy was refused for the daemon's own cgroup.
#[derive(Debug, thiserror::Error)]
pub enum OwnCgroupError {
    /// An `enroll` entry is the daemon's cgroup or one of its ancestors.
    #[error(
        "enroll entry `{entry}` enrolls the daemon's own cgroup `{cgroup}` (the entry is that \
         cgroup or an ancestor of it): the daemon's sockets would be tagged as an enrolled \
         workload's and every connection it makes for a workload dropped; run the daemon \
         outside the enrolled cgroups"
    )]
    Enrolled {
        /// The entry, as the policy writes it.
        entry: String,
        /// The daemon's cgroup v2 path.
        cgroup: String,
    },
    /// The daemon's own cgroup could not be read.
    #[error("cannot tell the daemon's own cgroup from {OWN_CGROUP_FILE}: {0}")]
    Unknown(String),
}

/// Refuse `enroll` (a policy's enrolled cgroup paths) if it enrolls the cgroup this process
/// runs in.
pub(crate) fn refuse_enrolling_the_daemon(enroll: &[String]) -> Result<(), OwnCgroupError> {
    let text = std::fs::read_to_string(OWN_CGROUP_FILE)
        .map_err(|error| OwnCgroupError::Unknown(error.to_string()))?;
    let cgroup = parse_cgroup_v2(&text)
        .ok_or_else(|| OwnCgroupError::Unknown("it has no cgroup v2 (`0::`) line".to_owned()))?;
    match enrolling_entry(enroll, &cgroup) {
        Some(entry) => Err(OwnCgroupError::Enrolled {
            entry: entry.to_owned(),
            cgroup,
        }),
        None => Ok(()),
    }
}

/// The first entry of `enroll` that is `cgroup` or an ancestor of it (by whole components:
/// `/a/b` is below `/a`, `/a/bc` is not below `/a/b`).
fn enrolling_entry<'p>(enroll: &'p [String], cgroup: &str) -> Option<&'p str> {
    enroll.iter().map(String::as_str).find(|entry| {
        let entry = entry.trim_end_matches('/');
        entry.is_empty()
            || cgroup
                .strip_prefix(entry)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::{OwnCgroupError, enrolling_entry};

    fn enroll(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|&path| path.to_owned()).collect()
    }

    #[test]
    fn the_daemons_cgroup_and_its_ancestors_enroll_it_and_nothing_else_does() {
        let daemon = "/a/b";
        for (paths, found) in [
            (&["/a/b"][..], Some("/a/b")),
            (&["/a"], Some("/a")),
            (&["/"], Some("/")),
            (&["/x", "/a"], Some("/a")),
            (&["/a/bc"], None),
            (&["/a/b/c"], None),
            (&["/a/"], Some("/a/")),
            (&["/ab", "/a/bb", "/x"], None),
            (&[], None),
        ] {
            assert_eq!(enrolling_entry(&enroll(paths), daemon), found, "{paths:?}");
        }
        // A sibling sharing a prefix: the daemon at /a/bc is not below /a/b.
        assert_eq!(enrolling_entry(&enroll(&["/a/b"]), "/a/bc"), None);
        // A daemon in the root cgroup is below only the root.
        assert_eq!(enrolling_entry(&enroll(&["/a"]), "/"), None);
        assert_eq!(enrolling_entry(&enroll(&["/"]), "/"), Some("/"));
    }

    #[test]
    fn the_refusal_names_the_entry_and_the_daemons_cgroup() {
        let error = OwnCgroupError::Enrolled {
            entry: "/a".to_owned(),
            cgroup: "/a/b".to_owned(),
        };
        let text = error.to_string();
        assert!(
            text.starts_with("enroll entry `/a` enrolls the daemon's own cgroup `/a/b`"),
            "{text}"
        );
    }
}

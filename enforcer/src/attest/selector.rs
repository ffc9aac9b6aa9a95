//! Selectors: the facts a workload entry requires of a process (SPIRE-style `type:key:value`).
//!
//! | selector | matches when |
//! |---|---|
//! | `unix:uid:<n>` / `unix:gid:<n>` | the effective uid / gid is `n` |
//! | `unix:user:<name>` / `unix:group:<name>` | the uid / gid has that name in `/etc/passwd` / `/etc/group` |
//! | `unix:path:<abs path>` | the running binary's path is exactly this (a deleted binary never matches) |
//! | `unix:sha256:<64 hex>` | the running binary's SHA-256 is this (and the entry's match is refused when the process runs code the hash does not vouch for: see [`policy::identities`](crate::policy::identities)) |
//! | `cgroup:path:<abs path>` | the cgroup v2 path is this path or below it (whole components; the path is written as the kernel writes one: no `//`, `.`, `..` or trailing `/`) |
//! | `container:id:<64 hex>` | the container id parsed from the cgroup path is this |
//! | `k8s:pod-uid:<uuid>` | the pod uid parsed from the cgroup path is this |
//! | `pid:<n>` | the process id is `n` |
#![forbid(unsafe_code)]

use std::{fmt, path::PathBuf, str::FromStr};

use super::{ProcessFacts, hash::Sha256Digest};

/// One requirement on a process's facts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `unix:uid:<n>`.
    Uid(u32),
    /// `unix:gid:<n>`.
    Gid(u32),
    /// `unix:user:<name>`.
    User(String),
    /// `unix:group:<name>`.
    Group(String),
    /// `unix:path:<absolute path>`.
    Path(PathBuf),
    /// `unix:sha256:<64 hex digits>`.
    Sha256(Sha256Digest),
    /// `cgroup:path:<absolute path>` (prefix by whole path components).
    CgroupPath(String),
    /// `container:id:<64 hex digits>`.
    ContainerId(String),
    /// `k8s:pod-uid:<uuid>`.
    PodUid(String),
    /// `pid:<n>`.
    Pid(u32),
}

/// Errors of parsing a selector.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The selector type is not one of the known ones.
    #[error(
        "unknown selector `{0}` (expected unix:uid, unix:gid, unix:user, unix:group, unix:path, unix:sha256, cgroup:path, container:id, k8s:pod-uid or pid)"
    )]
    Unknown(String),
    /// The value is missing or malformed.
    #[error("selector `{selector}`: {reason}")]
    Value {
        /// The selector type, e.g. `unix:uid`.
        selector: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

impl Selector {
    /// Whether `facts` satisfy this selector.
    #[must_use]
    pub fn matches(&self, facts: &ProcessFacts) -> bool {
        match self {
            Self::Uid(uid) => facts.uid == *uid,
            Self::Gid(gid) => facts.gid == *gid,
            Self::User(name) => facts.user.as_deref() == Some(name.as_str()),
            Self::Group(name) => facts.group.as_deref() == Some(name.as_str()),
            Self::Path(path) => facts.exe == *path,
            Self::Sha256(digest) => facts.sha256 == *digest,
            Self::CgroupPath(prefix) => cgroup_below(&facts.cgroup, prefix),
            Self::ContainerId(id) => facts.container.container_id.as_deref() == Some(id.as_str()),
            Self::PodUid(uid) => facts.container.pod_uid.as_deref() == Some(uid.as_str()),
            Self::Pid(pid) => facts.pid == *pid,
        }
    }
}

/// `cgroup` is `prefix` or a descendant of it (`/a/b` is below `/a`, `/ab` is not).
fn cgroup_below(cgroup: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || cgroup == prefix
        || cgroup
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Why `path` is not a cgroup v2 path as the kernel writes one in `/proc/<pid>/cgroup`: `/`,
/// or `/` followed by components separated by single `/`, none empty, `.` or `..`, with no
/// trailing `/`. `None` when it is one. Paths are compared (and, for enrollment, hashed in the
/// kernel) as text, so any other spelling of a cgroup would silently match nothing.
#[must_use]
pub(crate) fn cgroup_path_problem(path: &str) -> Option<&'static str> {
    let Some(components) = path.strip_prefix('/') else {
        return Some("it is not an absolute path");
    };
    if components.is_empty() {
        return None;
    }
    if components.ends_with('/') {
        return Some("it ends in `/`");
    }
    components.split('/').find_map(|component| match component {
        "" => Some("it contains `//`"),
        "." => Some("it contains a `.` component"),
        ".." => Some("it contains a `..` component"),
        _ => None,
    })
}

fn value_error(selector: &'static str, reason: impl Into<String>) -> SelectorError {
    SelectorError::Value {
        selector,
        reason: reason.into(),
    }
}

fn number(selector: &'static str, value: &str) -> Result<u32, SelectorError> {
    value
        .parse()
        .map_err(|_| value_error(selector, format!("`{value}` is not a non-negative integer")))
}

fn name(selector: &'static str, value: &str) -> Result<String, SelectorError> {
    if value.is_empty() || value.contains(':') || value.chars().any(char::is_whitespace) {
        return Err(value_error(
            selector,
            format!("`{value}` is not a valid name"),
        ));
    }
    Ok(value.to_owned())
}

fn absolute(selector: &'static str, value: &str) -> Result<String, SelectorError> {
    if !value.starts_with('/') {
        return Err(value_error(
            selector,
            format!("`{value}` is not an absolute path"),
        ));
    }
    Ok(value.to_owned())
}

fn cgroup_path(value: &str) -> Result<String, SelectorError> {
    match cgroup_path_problem(value) {
        None => Ok(value.to_owned()),
        Some(problem) => Err(value_error(
            "cgroup:path",
            format!("`{value}` is not a cgroup path as the kernel writes one: {problem}"),
        )),
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(value) = text.strip_prefix("pid:") {
            return number("pid", value).map(Self::Pid);
        }
        let mut parts = text.splitn(3, ':');
        let kind = format!(
            "{}:{}",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        let value = parts
            .next()
            .ok_or_else(|| SelectorError::Unknown(text.to_owned()))?;
        Ok(match kind.as_str() {
            "unix:uid" => Self::Uid(number("unix:uid", value)?),
            "unix:gid" => Self::Gid(number("unix:gid", value)?),
            "unix:user" => Self::User(name("unix:user", value)?),
            "unix:group" => Self::Group(name("unix:group", value)?),
            "unix:path" => Self::Path(absolute("unix:path", value)?.into()),
            "unix:sha256" => Self::Sha256(
                value
                    .parse()
                    .map_err(|error| value_error("unix:sha256", format!("{error}")))?,
            ),
            "cgroup:path" => Self::CgroupPath(cgroup_path(value)?),
            "container:id" => {
                let digest: Result<Sha256Digest, _> = value.parse();
                if digest.is_err() {
                    return Err(value_error(
                        "container:id",
                        "a container id is 64 lowercase hex digits",
                    ));
                }
                Self::ContainerId(value.to_owned())
            }
            "k8s:pod-uid" => {
                let uuid = value.len() == 36
                    && value.chars().enumerate().all(|(i, c)| {
                        if [8, 13, 18, 23].contains(&i) {
                            c == '-'
                        } else {
                            c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                        }
                    });
                if !uuid {
                    return Err(value_error("k8s:pod-uid", "a pod uid is a lowercase UUID"));
                }
                Self::PodUid(value.to_owned())
            }
            _ => return Err(SelectorError::Unknown(kind)),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "unix:uid:{uid}"),
            Self::Gid(gid) => write!(f, "unix:gid:{gid}"),
            Self::User(name) => write!(f, "unix:user:{name}"),
            Self::Group(name) => write!(f, "unix:group:{name}"),
            Self::Path(path) => write!(f, "unix:path:{}", path.display()),
            Self::Sha256(digest) => write!(f, "unix:sha256:{digest}"),
            Self::CgroupPath(path) => write!(f, "cgroup:path:{path}"),
            Self::ContainerId(id) => write!(f, "container:id:{id}"),
            Self::PodUid(uid) => write!(f, "k8s:pod-uid:{uid}"),
            Self::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Selector, SelectorError, cgroup_path_problem};
    use crate::attest::{ContainerInfo, ProcessFacts, Sha256Digest};

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const POD: &str = "0c3e2e7a-8f1a-4d0b-9b9e-1f2a3b4c5d6e";

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 42,
            start_time: 1,
            uid: 1000,
            gid: 100,
            user: Some("alice".into()),
            group: Some("users".into()),
            exe: PathBuf::from("/usr/bin/web"),
            sha256: SHA.parse::<Sha256Digest>().unwrap(),
            cgroup: "/system.slice/web.service".into(),
            cgroup_id: Some(7),
            container: ContainerInfo {
                container_id: Some(SHA.into()),
                pod_uid: Some(POD.into()),
            },
            netns: 9,
            loaded_code: Vec::new(),
        }
    }

    #[test]
    fn parse_display_round_trip_and_match() {
        let matching = [
            "unix:uid:1000".to_owned(),
            "unix:gid:100".to_owned(),
            "unix:user:alice".to_owned(),
            "unix:group:users".to_owned(),
            "unix:path:/usr/bin/web".to_owned(),
            format!("unix:sha256:{SHA}"),
            "cgroup:path:/system.slice".to_owned(),
            "cgroup:path:/system.slice/web.service".to_owned(),
            "cgroup:path:/".to_owned(),
            format!("container:id:{SHA}"),
            format!("k8s:pod-uid:{POD}"),
            "pid:42".to_owned(),
        ];
        for text in matching {
            let selector: Selector = text.parse().unwrap();
            assert_eq!(selector.to_string(), text);
            assert!(selector.matches(&facts()), "{text}");
        }
        let not_matching = [
            "unix:uid:0",
            "unix:user:bob",
            "unix:path:/usr/bin/we",
            "cgroup:path:/system",
            "cgroup:path:/system.slice/web",
            "pid:43",
        ];
        for text in not_matching {
            assert!(
                !text.parse::<Selector>().unwrap().matches(&facts()),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_selectors_name_the_problem() {
        let cases = [
            ("unix:uid:-1", "unix:uid"),
            ("unix:uid:", "unix:uid"),
            ("unix:user:a b", "unix:user"),
            ("unix:path:relative", "unix:path"),
            ("unix:sha256:abc", "unix:sha256"),
            ("cgroup:path:x", "cgroup:path"),
            ("cgroup:path:/a//b", "cgroup:path"),
            ("cgroup:path:/a/./b", "cgroup:path"),
            ("cgroup:path:/a/../b", "cgroup:path"),
            ("cgroup:path:/a/", "cgroup:path"),
            ("container:id:123", "container:id"),
            ("k8s:pod-uid:nope", "k8s:pod-uid"),
            ("pid:x", "pid"),
        ];
        for (text, kind) in cases {
            match text.parse::<Selector>() {
                Err(SelectorError::Value { selector, .. }) => assert_eq!(selector, kind, "{text}"),
                other => panic!("{text}: expected a value error, got {other:?}"),
            }
        }
        assert!(matches!(
            "docker:label:x".parse::<Selector>(),
            Err(SelectorError::Unknown(_))
        ));
        assert!(matches!(
            "unix".parse::<Selector>(),
            Err(SelectorError::Unknown(_))
        ));
    }

    #[test]
    fn only_cgroup_paths_as_the_kernel_writes_them_pass() {
        for good in [
            "/",
            "/a",
            "/a/b",
            "/system.slice/web.service",
            "/a/..b",
            "/a/.b",
        ] {
            assert_eq!(cgroup_path_problem(good), None, "{good}");
        }
        for (bad, problem) in [
            ("", "it is not an absolute path"),
            ("a/b", "it is not an absolute path"),
            ("//", "it ends in `/`"),
            ("/a/", "it ends in `/`"),
            ("//a", "it contains `//`"),
            ("/a//b", "it contains `//`"),
            ("/a/./b", "it contains a `.` component"),
            ("/a/.", "it contains a `.` component"),
            ("/a/../b", "it contains a `..` component"),
            ("/..", "it contains a `..` component"),
        ] {
            assert_eq!(cgroup_path_problem(bad), Some(problem), "{bad}");
        }
        let error = "cgroup:path:/a//b".parse::<Selector>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "selector `cgroup:path`: `/a//b` is not a cgroup path as the kernel writes one: it contains `//`"
        );
    }
}

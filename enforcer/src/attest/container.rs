//! Container ids and Kubernetes pod uids, read from a process's cgroup path.
//!
//! Layouts understood (cgroup v2 paths, and the path part of v1 `N:controllers:/path` lines):
//! - docker, cgroupfs driver: `/docker/<id>`;
//! - docker / podman / containerd / cri-o, systemd driver: `.../docker-<id>.scope`,
//!   `libpod-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`;
//! - Kubernetes, cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>`;
//! - Kubernetes, systemd driver: `/kubepods.slice/kubepods-<qos>.slice/
//!   kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`.
//!
//! A container id is 64 lowercase hex digits; a pod uid is a UUID, returned with dashes.
#![forbid(unsafe_code)]

/// Container id and pod uid found in a cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The container id (64 hex digits), if the process runs in a container.
    pub container_id: Option<String>,
    /// The Kubernetes pod uid (UUID with dashes), if the container belongs to a pod.
    pub pod_uid: Option<String>,
}

/// Parse a cgroup path (or a whole `/proc/<pid>/cgroup` line).
#[must_use]
pub(super) fn parse(cgroup: &str) -> ContainerInfo {
    // A v1 line is `hierarchy:controllers:path`; keep the path.
    let path = cgroup.splitn(3, ':').nth(2).unwrap_or(cgroup);
    let mut info = ContainerInfo::default();
    for segment in path.split('/') {
        if let Some(uid) = pod_uid(segment) {
            info.pod_uid = Some(uid);
        }
        if let Some(id) = container_id(segment) {
            info.container_id = Some(id.to_owned());
        }
    }
    info
}

/// A container id in one path segment: the bare id or `<runtime>-<id>.scope`.
fn container_id(segment: &str) -> Option<&str> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = stem.rsplit('-').next().unwrap_or(stem);
    is_container_id(id).then_some(id)
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A pod uid in one path segment: `pod<uuid>` (cgroupfs) or `kubepods-<qos>-pod<uuid_>.slice`
/// (systemd, dashes written as underscores).
fn pod_uid(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".slice").unwrap_or(segment);
    let at = stem.rfind("pod")?;
    let uid = stem[at + 3..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::{ContainerInfo, parse};

    const ID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904b825dc642cb6eb9a060e54bf";
    const POD: &str = "0c3e2e7a-8f1a-4d0b-9b9e-1f2a3b4c5d6e";

    fn info(container: bool, pod: bool) -> ContainerInfo {
        ContainerInfo {
            container_id: container.then(|| ID.to_owned()),
            pod_uid: pod.then(|| POD.to_owned()),
        }
    }

    #[test]
    fn real_world_layouts() {
        let pod_ = POD.replace('-', "_");
        let cases = [
            (format!("0::/docker/{ID}"), info(true, false)),
            (
                format!("0::/system.slice/docker-{ID}.scope"),
                info(true, false),
            ),
            (format!("12:memory:/docker/{ID}"), info(true, false)),
            (
                format!("0::/machine.slice/libpod-{ID}.scope/container"),
                info(true, false),
            ),
            (
                format!("/kubepods/burstable/pod{POD}/{ID}"),
                info(true, true),
            ),
            (format!("/kubepods/pod{POD}/{ID}"), info(true, true)),
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{ID}.scope"
                ),
                info(true, true),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/crio-{ID}.scope"
                ),
                info(true, true),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{pod_}.slice"),
                info(false, true),
            ),
            (
                "0::/user.slice/user-1000.slice/session-2.scope".to_owned(),
                info(false, false),
            ),
            (
                "0::/system.slice/nginx.service".to_owned(),
                info(false, false),
            ),
            ("0::/".to_owned(), info(false, false)),
            // Not 64 hex digits: not a container id.
            (format!("0::/docker/{}", &ID[..63]), info(false, false)),
            (
                format!("0::/docker/{}", ID.to_uppercase()),
                info(false, false),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse(&path), want, "{path}");
        }
    }
}

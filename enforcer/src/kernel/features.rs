//! What the datapath needs from the kernel, the release that introduced each piece, and a
//! probe of the running kernel that names the first missing piece before anything is loaded.
//!
//! Features are probed directly where the kernel can be asked (aya's program, map and helper
//! probes, the BTF file), so a distribution kernel with backports is judged by what it has, not
//! by its number. Two are judged by the release instead: [`Feature::CgroupLink`], because aya
//! itself chooses between `bpf_link` and the legacy attach by the release number, and
//! [`Feature::BtfTracepoint`], because aya's probe for tracing programs loads an `fentry`
//! program, which kernels without ftrace direct calls refuse although `tp_btf` works there.
#![forbid(unsafe_code)]

use std::{fmt, fs, io, path::Path};

use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType},
    sys::{BpfHelper, SyscallError, is_helper_supported, is_map_supported, is_program_supported},
};

/// Where the running kernel's release string is read from.
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// The kernel's own type information, needed for the `tp_btf` programs.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The oldest kernel that has every [`Feature`]: the newest of their `since` releases.
pub(super) const MINIMUM_KERNEL: KernelVersion = KernelVersion::new(5, 15);

/// A kernel release reduced to `major.minor`, the granularity at which features arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    /// The major number (`6` in `6.1.0-56-cloud-amd64`).
    pub major: u32,
    /// The minor number (`1` in `6.1.0-56-cloud-amd64`).
    pub minor: u32,
}

impl KernelVersion {
    /// The release `major.minor`.
    #[must_use]
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Reads `major.minor` from the front of a release string such as `6.12.117+deb12-cloud-amd64`
    /// or `5.15.90.1-microsoft-standard-WSL2`; `None` when it does not start that way.
    #[must_use]
    pub fn parse(release: &str) -> Option<Self> {
        let (major, rest) = release.split_once('.')?;
        let minor = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        Some(Self::new(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One thing the eBPF programs or the loader need from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `/sys/kernel/btf/vmlinux` (`CONFIG_DEBUG_INFO_BTF`), read by the loader.
    VmlinuxBtf,
    /// `BPF_PROG_TYPE_CGROUP_SKB`, the ingress drop of plaintext to enrolled services.
    CgroupSkb,
    /// `BPF_PROG_TYPE_SOCK_OPS`, which links accepted sockets to their original destination.
    SockOps,
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` with `connect4`/`connect6`.
    CgroupSockAddr,
    /// `bpf_get_socket_cookie` from the connect hooks.
    SocketCookieInSockAddr,
    /// `bpf_get_current_ancestor_cgroup_id` from the connect hooks (enrollment).
    AncestorCgroupInSockAddr,
    /// `bpf_sk_fullsock` from the ingress program.
    SkFullsockInCgroupSkb,
    /// `BPF_PROG_TYPE_TRACING` (`tp_btf`) for the exec and exit tracepoints.
    BtfTracepoint,
    /// Cgroup programs attached through `bpf_link`, which the loader pins.
    CgroupLink,
    /// `BPF_MAP_TYPE_RINGBUF`, the event stream.
    RingBuffer,
    /// `BPF_MAP_TYPE_SK_STORAGE`, the tags on enrolled processes' and the daemon's sockets.
    SocketStorage,
    /// `bpf_sk_storage_get` from the ingress and egress programs.
    SocketStorageInCgroupSkb,
    /// `bpf_sk_lookup_tcp` from the ingress program (who sent a packet to a listener).
    SocketLookupInCgroupSkb,
    /// `BPF_PROG_TYPE_SK_LOOKUP`, which hands the daemon's ports to its own listeners.
    SkLookup,
    /// `bpf_sk_storage_get` from `cgroup/sock_create` (tagging enrolled processes' sockets).
    SocketStorageInCgroupSock,
    /// `bpf_get_netns_cookie` from the connect and bind hooks: which network namespace (which
    /// container) an address belongs to.
    NetnsCookieInSockAddr,
    /// `bpf_get_netns_cookie` from `sock_ops`: listeners and redirected sockets recorded with
    /// their network namespace.
    NetnsCookieInSockOps,
}

impl Feature {
    /// Every feature, oldest first: the order they are probed in, so the one reported
    /// missing is the oldest the kernel lacks.
    pub const ALL: [Self; 17] = [
        Self::CgroupSkb,
        Self::SockOps,
        Self::CgroupSockAddr,
        Self::SocketCookieInSockAddr,
        Self::SkFullsockInCgroupSkb,
        Self::SocketStorage,
        Self::SocketStorageInCgroupSkb,
        Self::SocketLookupInCgroupSkb,
        Self::VmlinuxBtf,
        Self::BtfTracepoint,
        Self::AncestorCgroupInSockAddr,
        Self::CgroupLink,
        Self::NetnsCookieInSockAddr,
        Self::RingBuffer,
        Self::SkLookup,
        Self::SocketStorageInCgroupSock,
        Self::NetnsCookieInSockOps,
    ];

    /// What the feature is, as an operator would search for it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::VmlinuxBtf => "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)",
            Self::CgroupSkb => "cgroup skb programs (BPF_PROG_TYPE_CGROUP_SKB)",
            Self::SockOps => "sock_ops programs (BPF_PROG_TYPE_SOCK_OPS)",
            Self::CgroupSockAddr => "cgroup connect hooks (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
            Self::SocketCookieInSockAddr => "bpf_get_socket_cookie in cgroup connect hooks",
            Self::AncestorCgroupInSockAddr => {
                "bpf_get_current_ancestor_cgroup_id in cgroup connect hooks"
            }
            Self::SkFullsockInCgroupSkb => "bpf_sk_fullsock in cgroup skb programs",
            Self::BtfTracepoint => "BTF tracepoints (tp_btf, BPF_PROG_TYPE_TRACING)",
            Self::CgroupLink => "bpf_link attachment of cgroup programs",
            Self::RingBuffer => "BPF ring buffer (BPF_MAP_TYPE_RINGBUF)",
            Self::SocketStorage => "socket storage maps (BPF_MAP_TYPE_SK_STORAGE)",
            Self::SocketStorageInCgroupSkb => "bpf_sk_storage_get in cgroup skb programs",
            Self::SocketLookupInCgroupSkb => "bpf_sk_lookup_tcp in cgroup skb programs",
            Self::SkLookup => "sk_lookup programs (BPF_PROG_TYPE_SK_LOOKUP)",
            Self::SocketStorageInCgroupSock => {
                "bpf_sk_storage_get in cgroup socket-creation programs"
            }
            Self::NetnsCookieInSockAddr => "bpf_get_netns_cookie in cgroup connect hooks",
            Self::NetnsCookieInSockOps => "bpf_get_netns_cookie in sock_ops programs",
        }
    }

    /// The mainline release that introduced the feature.
    #[must_use]
    pub const fn since(self) -> KernelVersion {
        match self {
            Self::VmlinuxBtf => KernelVersion::new(5, 4),
            Self::CgroupSkb => KernelVersion::new(4, 10),
            Self::SockOps => KernelVersion::new(4, 13),
            Self::CgroupSockAddr => KernelVersion::new(4, 17),
            Self::SocketCookieInSockAddr => KernelVersion::new(4, 19),
            Self::SkFullsockInCgroupSkb => KernelVersion::new(5, 1),
            Self::SocketStorage
            | Self::SocketStorageInCgroupSkb
            | Self::SocketLookupInCgroupSkb => KernelVersion::new(5, 2),
            Self::BtfTracepoint => KernelVersion::new(5, 5),
            Self::AncestorCgroupInSockAddr | Self::CgroupLink | Self::NetnsCookieInSockAddr => {
                KernelVersion::new(5, 7)
            }
            Self::RingBuffer => KernelVersion::new(5, 8),
            Self::SkLookup => KernelVersion::new(5, 9),
            Self::SocketStorageInCgroupSock => KernelVersion::new(5, 10),
            Self::NetnsCookieInSockOps => KernelVersion::new(5, 15),
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the kernel feature check.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The running kernel's release could not be read.
    #[error("failed to read the kernel release from {OSRELEASE}")]
    Release(#[source] io::Error),
    /// The release string does not start with `major.minor`.
    #[error("cannot tell the kernel version from the release {0:?}")]
    UnknownRelease(String),
    /// The running kernel lacks a feature the datapath needs.
    #[error(
        "kernel {release} lacks {feature}, which Linux {since} introduced; \
         enforcer needs Linux {MINIMUM_KERNEL} or newer"
    )]
    Missing {
        /// The running kernel's release string.
        release: String,
        /// The first missing feature.
        feature: Feature,
        /// The release that introduced it.
        since: KernelVersion,
    },
    /// Probing a program type or helper failed for another reason than its absence.
    #[error("failed to probe the kernel for {feature}")]
    ProgramProbe {
        /// The feature being probed.
        feature: Feature,
        /// What the probe reported.
        #[source]
        source: Box<ProgramError>,
    },
    /// Probing a map type failed for another reason than its absence.
    #[error("failed to probe the kernel for {feature}")]
    MapProbe {
        /// The feature being probed.
        feature: Feature,
        /// What the probe reported.
        #[source]
        source: SyscallError,
    },
}

/// Checks that the running kernel has every feature; the error names the first one missing
/// and the release that introduced it. Probing loads tiny programs, so it needs privileges.
pub(super) fn check_running() -> Result<(), FeatureError> {
    let release = fs::read_to_string(OSRELEASE).map_err(FeatureError::Release)?;
    let release = release.trim();
    let version = KernelVersion::parse(release)
        .ok_or_else(|| FeatureError::UnknownRelease(release.to_owned()))?;
    check(release, |feature| probe(feature, version))
}

/// Asks `has` about every feature in [`Feature::ALL`] order and fails on the first it lacks.
pub(super) fn check(
    release: &str,
    mut has: impl FnMut(Feature) -> Result<bool, FeatureError>,
) -> Result<(), FeatureError> {
    for feature in Feature::ALL {
        if !has(feature)? {
            return Err(FeatureError::Missing {
                release: release.to_owned(),
                feature,
                since: feature.since(),
            });
        }
    }
    Ok(())
}

/// Whether the running kernel, of release `version`, has `feature`.
fn probe(feature: Feature, version: KernelVersion) -> Result<bool, FeatureError> {
    let program = |program_type| {
        is_program_supported(program_type).map_err(|source| FeatureError::ProgramProbe {
            feature,
            source: Box::new(source),
        })
    };
    let helper = |program_type, helper: BpfHelper| {
        is_helper_supported(program_type, helper).map_err(|source| FeatureError::ProgramProbe {
            feature,
            source: Box::new(source),
        })
    };
    match feature {
        Feature::VmlinuxBtf => Ok(Path::new(VMLINUX_BTF).exists()),
        Feature::CgroupSkb => program(ProgramType::CgroupSkb),
        Feature::SockOps => program(ProgramType::SockOps),
        Feature::CgroupSockAddr => program(ProgramType::CgroupSockAddr),
        Feature::SocketCookieInSockAddr => helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
        Feature::AncestorCgroupInSockAddr => helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
        Feature::SkFullsockInCgroupSkb => {
            helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_fullsock)
        }
        Feature::BtfTracepoint | Feature::CgroupLink => Ok(version >= feature.since()),
        Feature::RingBuffer => is_map_supported(MapType::RingBuf)
            .map_err(|source| FeatureError::MapProbe { feature, source }),
        Feature::SocketStorage => is_map_supported(MapType::SkStorage)
            .map_err(|source| FeatureError::MapProbe { feature, source }),
        Feature::SocketStorageInCgroupSkb => {
            helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_storage_get)
        }
        Feature::SocketLookupInCgroupSkb => {
            helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_lookup_tcp)
        }
        Feature::SkLookup => program(ProgramType::SkLookup),
        Feature::SocketStorageInCgroupSock => {
            helper(ProgramType::CgroupSock, BpfHelper::BPF_FUNC_sk_storage_get)
        }
        Feature::NetnsCookieInSockAddr => helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
        Feature::NetnsCookieInSockOps => {
            helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_release_strings() {
        for (release, major, minor) in [
            ("6.1.0-56-cloud-amd64", 6, 1),
            ("6.12.117+deb12-cloud-amd64", 6, 12),
            ("6.18.44-fc-v669", 6, 18),
            ("5.15.90.1-microsoft-standard-WSL2", 5, 15),
            ("4.19.0", 4, 19),
            ("5.8", 5, 8),
            ("6.10-rc1", 6, 10),
        ] {
            assert_eq!(
                KernelVersion::parse(release),
                Some(KernelVersion::new(major, minor)),
                "{release}"
            );
        }
    }

    #[test]
    fn rejects_releases_without_major_and_minor() {
        for release in ["", "6", "6.", "linux-6.1", ".1", "6.x", "six.one"] {
            assert_eq!(KernelVersion::parse(release), None, "{release:?}");
        }
    }

    #[test]
    fn versions_order_numerically() {
        assert!(KernelVersion::new(5, 10) > KernelVersion::new(5, 8));
        assert!(KernelVersion::new(6, 1) > KernelVersion::new(5, 19));
        assert_eq!(KernelVersion::new(6, 12).to_string(), "6.12");
    }

    #[test]
    fn features_are_listed_oldest_first() {
        assert!(Feature::ALL.is_sorted_by_key(|feature| feature.since()));
    }

    #[test]
    fn minimum_kernel_is_the_newest_feature() {
        let newest = Feature::ALL.iter().map(|feature| feature.since()).max();
        assert_eq!(newest, Some(MINIMUM_KERNEL));
    }

    #[test]
    fn a_kernel_with_everything_passes() {
        let mut asked = Vec::new();
        check("6.1.0-56-cloud-amd64", |feature| {
            asked.push(feature);
            Ok(true)
        })
        .unwrap();
        assert_eq!(asked, Feature::ALL);
    }

    #[test]
    fn the_first_missing_feature_is_named_with_its_release() {
        let error = check("5.4.0-150-generic", |feature| {
            Ok(feature.since() <= KernelVersion::new(5, 4))
        })
        .unwrap_err();
        assert!(matches!(
            error,
            FeatureError::Missing { feature: Feature::BtfTracepoint, since, .. }
                if since == KernelVersion::new(5, 5)
        ));
        assert_eq!(
            error.to_string(),
            "kernel 5.4.0-150-generic lacks BTF tracepoints (tp_btf, BPF_PROG_TYPE_TRACING), \
             which Linux 5.5 introduced; enforcer needs Linux 5.15 or newer"
        );
    }

    #[test]
    fn a_backported_feature_counts_whatever_the_release() {
        check("4.18.0-553.el8_10.x86_64", |_| Ok(true)).unwrap();
        let error = check("6.1.0-56-cloud-amd64", |feature| {
            Ok(feature != Feature::RingBuffer)
        })
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "kernel 6.1.0-56-cloud-amd64 lacks BPF ring buffer (BPF_MAP_TYPE_RINGBUF), \
             which Linux 5.8 introduced; enforcer needs Linux 5.15 or newer"
        );
    }

    #[test]
    fn a_probe_error_stops_the_check() {
        let error = check("6.1.0", |feature| {
            if feature == Feature::SockOps {
                Err(FeatureError::UnknownRelease("probe".to_owned()))
            } else {
                Ok(true)
            }
        })
        .unwrap_err();
        assert!(matches!(error, FeatureError::UnknownRelease(_)));
    }
}

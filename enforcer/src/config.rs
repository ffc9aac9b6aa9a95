//! The daemon's configuration: one TOML file, every key optional. With no file at all,
//! `enforcer run` uses the embedded default: a state directory under `/var/lib/enforcer`, a CA
//! it creates there, the embedded `policies/default.toml` (which enrolls nothing), the hooks
//! attached at the root of the cgroup v2 hierarchy, and bpffs mounted if needed.
//!
//! Unknown keys are errors, and every error names `file:line:col`.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{policy::line_col, tunnel};

/// The name diagnostics and `enforcer policy show` give the embedded default policy
/// ([`crate::policy::DEFAULT_POLICY`]).
pub const EMBEDDED_POLICY_NAME: &str = "<embedded policies/default.toml>";
/// The daemon's bpffs directory by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/enforcer";
/// Where the CLI and the daemon find the control socket by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/enforcer/control.sock";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("{file}:{line}:{col}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration, defaults filled in.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name: its SPIFFE ID is `spiffe://<trust domain>/enforcer/node/<name>` and
    /// every audit record carries it. Default: the host name.
    pub node_name: String,
    /// Where the daemon keeps its CA and audit log. Default `/var/lib/enforcer`.
    pub state_dir: PathBuf,
    /// The policy file; `None` enforces the embedded `policies/default.toml`.
    pub policy: Option<PathBuf>,
    /// The control API's Unix socket. Default `/run/enforcer/control.sock`.
    pub control_socket: PathBuf,
    /// Where Prometheus scrapes `/metrics`; `None` (the key set to `""`) serves metrics only
    /// on the control socket. Default `127.0.0.1:15020`.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long SIGTERM waits for open flows to finish. Default `10s`.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// How often enrolled cgroups are rescanned for processes and listening sockets. Between
    /// scans the kernel's events act on one process at once: `listen` registers it, `exec` and
    /// a cgroup move re-attest it, exit forgets it. Default `2s`.
    #[serde(deserialize_with = "duration")]
    pub rescan_interval: Duration,
    /// The kernel side.
    pub kernel: KernelConfig,
    /// The tunnel.
    pub tunnel: TunnelSettings,
    /// Identity issuance.
    pub identity: IdentityConfig,
    /// The audit trail.
    pub audit: AuditSettings,
    /// The SPIFFE Workload API.
    pub workload_api: WorkloadApiSettings,
}

/// `[kernel]`: where the eBPF programs attach and pin.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// The daemon's directory on bpffs. Default `/sys/fs/bpf/enforcer`.
    pub pin_dir: PathBuf,
    /// The cgroup the hooks attach to, relative to the cgroup v2 mount: they see every process
    /// below it, and act only on enrolled ones. Default `/` (the whole node).
    pub scope_cgroup: String,
    /// Same-node connections between known workloads that policy allows go direct, authorized
    /// in the kernel, where the kernel can close one a reload denies
    /// (`CONFIG_INET_DIAG_DESTROY`); `false` sends them through the daemon. Default `true`.
    pub same_node_direct: bool,
}

/// `[tunnel]`: the listeners and their timeouts.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelSettings {
    /// The redirect port on `127.0.0.1` and `::1`: the kernel hands connections to it to the
    /// daemon's outbound listener, whatever else is bound there. Default 15001.
    pub outbound_port: u16,
    /// Address of the inbound listener peers dial. Its port is the daemon's on every local
    /// address: the kernel hands connections to it to the daemon. Default `0.0.0.0:15008`.
    pub inbound_addr: SocketAddr,
    /// Timeout of a TCP connect. Default `5s`.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Timeout of the TLS and HTTP/2 handshakes. Default `10s`.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// A flow idle this long is closed. Default `1h`.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
}

/// `[identity]`: the CA and SVIDs.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// The CA directory (`root.pem`, `root.key`, `node.pem`, `node.key`, `jwt.key`); missing
    /// files are created. Default `<state_dir>/ca`.
    pub ca_dir: Option<PathBuf>,
    /// How long an X.509-SVID is valid; it is rotated at half its life. Default `1h`; at
    /// least `1s`.
    #[serde(deserialize_with = "lifetime")]
    pub svid_ttl: Duration,
    /// How long a JWT-SVID is valid. Default `5m`; at least `1s`.
    #[serde(deserialize_with = "lifetime")]
    pub jwt_svid_ttl: Duration,
}

/// `[workload_api]`: the SPIFFE Workload API socket.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadApiSettings {
    /// Whether the daemon serves it. Default `true`.
    pub enabled: bool,
    /// The Unix socket (`/path` or `unix:///path`), created 0666: attestation is the gate.
    /// A TCP address is refused: a caller there cannot be attested. Default
    /// `/run/enforcer/public/api.sock`.
    #[serde(deserialize_with = "unix_socket")]
    pub socket: PathBuf,
    /// Streams (and connections) one caller process may hold open. Default 64; at least 1.
    #[serde(deserialize_with = "at_least_one")]
    pub max_streams_per_caller: usize,
    /// Streams (and connections) all callers together may hold open. Default 4096; at least 1.
    #[serde(deserialize_with = "at_least_one")]
    pub max_streams: usize,
}

/// `[audit]`: the hash-chained audit log.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// The current log file; rotated files get `.1`, `.2`, ... Default
    /// `<state_dir>/audit/audit.jsonl`.
    pub path: Option<PathBuf>,
    /// Rotate when the file reaches this many bytes. Default 64 MiB.
    pub max_bytes: u64,
    /// Rotated files kept. Default 10.
    pub keep: usize,
    /// Bytes of the newest records kept in memory for `enforcer flows` (each costs its JSON
    /// line and about 50 bytes more); older ones are read from the files. Default 4 MiB.
    pub recent_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: host_name(),
            state_dir: PathBuf::from("/var/lib/enforcer"),
            policy: None,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 15020))),
            drain_timeout: Duration::from_secs(10),
            rescan_interval: Duration::from_secs(2),
            kernel: KernelConfig::default(),
            tunnel: TunnelSettings::default(),
            identity: IdentityConfig::default(),
            audit: AuditSettings::default(),
            workload_api: WorkloadApiSettings::default(),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            ca_dir: None,
            svid_ttl: crate::identity::DEFAULT_SVID_TTL,
            jwt_svid_ttl: crate::identity::DEFAULT_JWT_SVID_TTL,
        }
    }
}

impl Default for WorkloadApiSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(crate::workload_api::DEFAULT_SOCKET),
            max_streams_per_caller: 64,
            max_streams: 4096,
        }
    }
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            scope_cgroup: "/".to_owned(),
            same_node_direct: true,
        }
    }
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            outbound_port: tunnel::DEFAULT_OUTBOUND_PORT,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], crate::policy::DEFAULT_PEER_PORT)),
            connect_timeout: tunnel::DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: tunnel::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: tunnel::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            path: None,
            max_bytes: 64 << 20,
            keep: 10,
            recent_bytes: 4 << 20,
        }
    }
}

impl Config {
    /// Load `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&path.display().to_string(), &text)?;
        // A relative policy path is relative to the configuration file.
        if let (Some(policy), Some(dir)) = (&config.policy, path.parent())
            && policy.is_relative()
        {
            config.policy = Some(dir.join(policy));
        }
        Ok(config)
    }

    /// Parse the text of configuration file `file`.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|error| {
            let (line, col) = error
                .span()
                .map_or((1, 1), |span| line_col(text, span.start));
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                col,
                message: error.message().to_owned(),
            }
        })
    }

    /// The CA directory.
    #[must_use]
    pub fn ca_dir(&self) -> PathBuf {
        self.identity
            .ca_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ca"))
    }

    /// The current audit log file.
    #[must_use]
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit").join("audit.jsonl"))
    }
}

/// The kernel's host name, `localhost` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A duration written as `10s`, `500ms`, `1h`, `2m 30s`.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|error| serde::de::Error::custom(format!("bad duration {text:?}: {error}")))
}

/// A duration of at least one second (a certificate or token lives whole seconds).
fn lifetime<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let value = duration(deserializer)?;
    if value < Duration::from_secs(1) {
        return Err(serde::de::Error::custom(format!(
            "{value:?} is too short: a lifetime is at least 1s"
        )));
    }
    Ok(value)
}

/// A count of at least one.
fn at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let value = usize::deserialize(deserializer)?;
    if value == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(value)
}

/// A Unix socket path, written `/path` or `unix:///path`.
fn unix_socket<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::workload_api::socket_path(&text).map_err(serde::de::Error::custom)
}

/// A socket address, or `""` for none.
fn optional_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|error| serde::de::Error::custom(format!("bad address {text:?}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_embedded_default() {
        assert_eq!(
            Config::parse("c.toml", "").expect("parse"),
            Config::default()
        );
        let config = Config::default();
        assert_eq!(config.ca_dir(), Path::new("/var/lib/enforcer/ca"));
        assert_eq!(
            config.audit_path(),
            Path::new("/var/lib/enforcer/audit/audit.jsonl")
        );
        assert_eq!(config.kernel.scope_cgroup, "/");
    }

    #[test]
    fn every_key_parses() {
        let text = r#"
node_name = "a"
state_dir = "/s"
policy = "/p.toml"
control_socket = "/c.sock"
metrics_addr = ""
drain_timeout = "3s"
rescan_interval = "250ms"
[kernel]
pin_dir = "/sys/fs/bpf/x"
scope_cgroup = "/x"
same_node_direct = false
[tunnel]
outbound_port = 1
inbound_addr = "10.0.0.1:2"
connect_timeout = "1s"
handshake_timeout = "2s"
idle_timeout = "5m"
[identity]
ca_dir = "/ca"
svid_ttl = "20s"
jwt_svid_ttl = "1m"
[audit]
path = "/a.jsonl"
max_bytes = 1000
keep = 2
[workload_api]
enabled = false
socket = "unix:///run/x/api.sock"
max_streams_per_caller = 3
max_streams = 9
"#;
        let config = Config::parse("c.toml", text).expect("parse");
        assert_eq!(config.node_name, "a");
        assert_eq!(config.metrics_addr, None);
        assert_eq!(config.rescan_interval, Duration::from_millis(250));
        assert_eq!(config.kernel.scope_cgroup, "/x");
        assert!(!config.kernel.same_node_direct);
        assert_eq!(
            config.tunnel.inbound_addr,
            "10.0.0.1:2".parse().expect("addr")
        );
        assert_eq!(config.tunnel.idle_timeout, Duration::from_mins(5));
        assert_eq!(config.ca_dir(), Path::new("/ca"));
        assert_eq!(config.audit_path(), Path::new("/a.jsonl"));
        assert_eq!(config.audit.keep, 2);
        assert_eq!(config.identity.svid_ttl, Duration::from_secs(20));
        assert_eq!(config.identity.jwt_svid_ttl, Duration::from_mins(1));
        assert!(!config.workload_api.enabled);
        assert_eq!(config.workload_api.socket, Path::new("/run/x/api.sock"));
        assert_eq!(config.workload_api.max_streams_per_caller, 3);
        assert_eq!(config.workload_api.max_streams, 9);
    }

    #[test]
    fn lifetimes_and_limits_that_cannot_work_are_refused_with_their_location() {
        for (text, at) in [
            ("[identity]\nsvid_ttl = \"0s\"\n", "c.toml:2:12: "),
            ("[identity]\njwt_svid_ttl = \"500ms\"\n", "c.toml:2:16: "),
            ("[workload_api]\nmax_streams = 0\n", "c.toml:2:15: "),
            (
                "[workload_api]\nmax_streams_per_caller = 0\n",
                "c.toml:2:26: ",
            ),
        ] {
            let error = Config::parse("c.toml", text).expect_err(text).to_string();
            assert!(error.starts_with(at), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_workload_api_endpoint_that_cannot_tell_who_calls_is_refused() {
        for socket in [
            "tcp://127.0.0.1:8081",
            "127.0.0.1:8081",
            "relative/api.sock",
        ] {
            let text = format!("[workload_api]\nsocket = \"{socket}\"\n");
            let error = Config::parse("c.toml", &text).expect_err(socket);
            let text = error.to_string();
            assert!(
                text.starts_with("c.toml:2:10: ") && text.contains("must be a Unix socket"),
                "{socket}: {text}"
            );
        }
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let error = Config::parse("c.toml", "node_name = \"a\"\n[tunnel]\nbogus = 1\n")
            .expect_err("unknown key");
        let text = error.to_string();
        assert!(
            text.starts_with("c.toml:3:1: unknown field `bogus`"),
            "{text}"
        );

        let error =
            Config::parse("c.toml", "drain_timeout = \"soon\"\n").expect_err("bad duration");
        assert!(
            error
                .to_string()
                .starts_with("c.toml:1:17: bad duration \"soon\""),
            "{error}"
        );
    }

    #[test]
    fn a_relative_policy_path_is_relative_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("enforcer.toml");
        std::fs::write(&file, "policy = \"policy.toml\"\n").expect("write");
        let config = Config::load(Some(&file)).expect("load");
        assert_eq!(config.policy, Some(dir.path().join("policy.toml")));
    }
}

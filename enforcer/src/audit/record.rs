//! Audit records: what happened, to whom, and why, as one JSON object per line.
//!
//! Producers submit an [`Entry`]; the writer numbers it, names the node, links it to the
//! previous record and so makes it an [`AuditRecord`]. Field order in the JSON is the order of
//! the struct's fields, which the hash chain relies on (see [`crate::audit`]).
#![forbid(unsafe_code)]

use std::{
    fmt,
    path::Path,
    str::FromStr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Errors of parsing a record's field from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The text is not one of the values of the field.
    #[error("unknown {field} {value:?}: expected one of {allowed}")]
    Unknown {
        /// Which field: `source`, `event` or `verdict`.
        field: &'static str,
        /// The text given.
        value: String,
        /// The allowed values, comma-separated.
        allowed: String,
    },
}

/// The value of `all` whose name is `text`, or an error listing the names.
fn parse_name<T: Copy>(
    field: &'static str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    text: &str,
) -> Result<T, RecordError> {
    all.iter()
        .copied()
        .find(|&value| name(value) == text)
        .ok_or_else(|| RecordError::Unknown {
            field,
            value: text.to_owned(),
            allowed: all.iter().map(|&v| name(v)).collect::<Vec<_>>().join(", "),
        })
}

/// Which part of the node wrote a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The eBPF socket hooks, reported through the event ring buffer.
    Kernel,
    /// The tunnel's outbound listener, on the client's node.
    Outbound,
    /// The tunnel's inbound listener, on the destination's node.
    Inbound,
    /// The daemon itself: start, stop, reload, and losses of records.
    Daemon,
    /// The SPIFFE Workload API: a caller refused.
    #[serde(rename = "workload-api")]
    WorkloadApi,
}

impl Source {
    /// Every source.
    pub const ALL: [Self; 5] = [
        Self::Kernel,
        Self::Outbound,
        Self::Inbound,
        Self::Daemon,
        Self::WorkloadApi,
    ];

    /// The name used in JSON and on the command line.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::Daemon => "daemon",
            Self::WorkloadApi => "workload-api",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = RecordError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_name("source", &Self::ALL, Self::as_str, text)
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// Kernel: a connection was redirected to the tunnel.
    Redirect,
    /// Kernel or tunnel: a connection was refused.
    Deny,
    /// Kernel: policy denies a connection, but audit mode let it through.
    Audit,
    /// Kernel: plaintext egress was permitted.
    Egress,
    /// Kernel: a packet or connection was dropped.
    Drop,
    /// Tunnel: a flow was opened.
    Open,
    /// Tunnel: an open flow ended.
    Close,
    /// Daemon: events or records were lost.
    Loss,
    /// Daemon: the daemon started.
    Start,
    /// Daemon: the daemon stopped.
    Stop,
    /// Daemon: a new policy was loaded.
    Reload,
}

impl Event {
    /// Every event.
    pub const ALL: [Self; 11] = [
        Self::Redirect,
        Self::Deny,
        Self::Audit,
        Self::Egress,
        Self::Drop,
        Self::Open,
        Self::Close,
        Self::Loss,
        Self::Start,
        Self::Stop,
        Self::Reload,
    ];

    /// The name used in JSON and on the command line.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Egress => "egress",
            Self::Drop => "drop",
            Self::Open => "open",
            Self::Close => "close",
            Self::Loss => "loss",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reload => "reload",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Event {
    type Err = RecordError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_name("event", &Self::ALL, Self::as_str, text)
    }
}

/// The outcome a record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Policy allowed it.
    Allow,
    /// Policy refused it.
    Deny,
    /// Policy denies it, but audit mode let it through.
    Audit,
    /// It was dropped.
    Drop,
    /// Events or records were lost (see `lost`).
    Loss,
    /// Nothing was decided; the record informs (start, stop, reload).
    Info,
    /// The kernel handed the connection to the tunnel, which decides (see its own record).
    Redirect,
}

impl Verdict {
    /// Every verdict.
    pub const ALL: [Self; 7] = [
        Self::Allow,
        Self::Deny,
        Self::Audit,
        Self::Drop,
        Self::Loss,
        Self::Info,
        Self::Redirect,
    ];

    /// The name used in JSON and on the command line.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Drop => "drop",
            Self::Loss => "loss",
            Self::Info => "info",
            Self::Redirect => "redirect",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Verdict {
    type Err = RecordError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_name("verdict", &Self::ALL, Self::as_str, text)
    }
}

/// The client side of a record: who connected, from which process and address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Src {
    /// Its SPIFFE ID, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Its process id (on the client's node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its binary's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Its binary's SHA-256, 64 lowercase hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Its cgroup path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Its cgroup id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// The container it runs in, when its cgroup path names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The Kubernetes pod it belongs to, when its cgroup path names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Its address, `ip:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// The destination side of a record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dst {
    /// Its SPIFFE ID, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The container of the workload listening there, when it runs on the recording node
    /// and its cgroup path names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The Kubernetes pod of that workload, when its cgroup path names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Its address, `ip:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// What a producer submits to the audit log: a record without its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// When the event happened.
    pub time: SystemTime,
    /// Who reports it.
    pub source: Source,
    /// What happened.
    pub event: Event,
    /// The outcome.
    pub verdict: Verdict,
    /// Why, e.g. `policy`, `no-route`, `revoked`, `ring-buffer-full`.
    pub reason: String,
    /// The deciding policy rule (file order, 1-based).
    pub rule: Option<u32>,
    /// The policy version in force.
    pub policy_version: u64,
    /// The client.
    pub src: Src,
    /// The destination.
    pub dst: Dst,
    /// Bytes from client to destination (close records).
    pub bytes_up: Option<u64>,
    /// Bytes from destination to client (close records).
    pub bytes_down: Option<u64>,
    /// How long the flow was open, in milliseconds (close records).
    pub duration_ms: Option<u64>,
    /// How many events or records were lost (loss records).
    pub lost: Option<u64>,
    /// Free text, e.g. the summary of a reload's policy diff.
    pub detail: Option<String>,
}

impl Entry {
    /// An entry stamped now, with no parties, counters or detail.
    #[must_use]
    pub(crate) fn new(
        source: Source,
        event: Event,
        verdict: Verdict,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            source,
            event,
            verdict,
            reason: reason.into(),
            rule: None,
            policy_version: 0,
            src: Src::default(),
            dst: Dst::default(),
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            lost: None,
            detail: None,
        }
    }

    /// A daemon record that `lost` events or records were lost, and why.
    #[must_use]
    pub(crate) fn loss(reason: impl Into<String>, lost: u64, detail: Option<String>) -> Self {
        Self {
            lost: Some(lost),
            detail,
            ..Self::new(Source::Daemon, Event::Loss, Verdict::Loss, reason)
        }
    }
}

/// RFC 3339 UTC with microseconds; times outside what RFC 3339 can name (before 1970 or after
/// 9999) are clamped to its ends rather than refused, so that no record is lost to a bad clock.
pub(super) fn format_time(time: SystemTime) -> String {
    // 9999-12-31T23:59:59.999999Z, the last instant humantime formats.
    let last = SystemTime::UNIX_EPOCH + Duration::new(253_402_300_799, 999_999_000);
    let clamped = time.clamp(SystemTime::UNIX_EPOCH, last);
    humantime::format_rfc3339_micros(clamped).to_string()
}

/// One record of the audit trail, as written on one line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain: 1 for the first record ever, +1 per record, across files.
    pub seq: u64,
    /// When the event happened, RFC 3339 UTC with microseconds.
    pub time: String,
    /// The node that wrote the record.
    pub node: String,
    /// Who reports it.
    pub source: Source,
    /// What happened.
    pub event: Event,
    /// The outcome.
    pub verdict: Verdict,
    /// Why.
    pub reason: String,
    /// The deciding policy rule (file order, 1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// The policy version in force.
    pub policy_version: u64,
    /// The client.
    pub src: Src,
    /// The destination.
    pub dst: Dst,
    /// Bytes from client to destination (close records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    /// Bytes from destination to client (close records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// How long the flow was open, in milliseconds (close records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How many events or records were lost (loss records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The previous record's hash, 64 lowercase hex digits; all zeros for the first record.
    pub prev: String,
}

impl AuditRecord {
    /// The record `entry` becomes as record `seq` of `node`, following the record hashed `prev`.
    pub(super) fn new(entry: Entry, seq: u64, node: &str, prev: String) -> Self {
        Self {
            seq,
            time: format_time(entry.time),
            node: node.to_owned(),
            source: entry.source,
            event: entry.event,
            verdict: entry.verdict,
            reason: entry.reason,
            rule: entry.rule,
            policy_version: entry.policy_version,
            src: entry.src,
            dst: entry.dst,
            bytes_up: entry.bytes_up,
            bytes_down: entry.bytes_down,
            duration_ms: entry.duration_ms,
            lost: entry.lost,
            detail: entry.detail,
            prev,
        }
    }

    /// Whether the record has `verdict` (if given) and names `id` (if given) exactly as its
    /// source or destination.
    #[must_use]
    pub fn matches(&self, verdict: Option<Verdict>, id: Option<&str>) -> bool {
        verdict.is_none_or(|v| v == self.verdict)
            && id.is_none_or(|id| {
                self.src.spiffe_id.as_deref() == Some(id)
                    || self.dst.spiffe_id.as_deref() == Some(id)
            })
    }
}

/// Text from a record, with control characters escaped so that a hostile name (a binary
/// called `x\n2026-... ALLOW`) cannot forge lines or terminal escapes in `enforcer flows`.
struct Clean<'a>(&'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// `spiffe://td/web [pid 812 curl] 10.0.0.1:40112`, leaving out what is unknown; `-` if nothing is.
struct SrcText<'a>(&'a Src);

impl fmt::Display for SrcText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self.0;
        let mut parts = Vec::new();
        if let Some(id) = &src.spiffe_id {
            parts.push(Clean(id).to_string());
        }
        let exe = src.exe.as_deref().map(|exe| {
            Path::new(exe)
                .file_name()
                .map_or(exe.into(), |n| n.to_string_lossy())
        });
        match (src.pid, exe) {
            (Some(pid), Some(exe)) => parts.push(format!("[pid {pid} {}]", Clean(&exe))),
            (Some(pid), None) => parts.push(format!("[pid {pid}]")),
            (None, Some(exe)) => parts.push(format!("[{}]", Clean(&exe))),
            (None, None) => {}
        }
        parts.extend(container_text(src.container_id.as_deref()));
        if let Some(addr) = &src.addr {
            parts.push(Clean(addr).to_string());
        }
        write_parts(f, &parts)
    }
}

/// `spiffe://td/db [container 0123456789ab] 10.0.0.2:5432`, leaving out what is unknown; `-`
/// if nothing is.
struct DstText<'a>(&'a Dst);

impl fmt::Display for DstText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dst = self.0;
        let mut parts: Vec<String> = dst
            .spiffe_id
            .iter()
            .map(|id| Clean(id).to_string())
            .collect();
        parts.extend(container_text(dst.container_id.as_deref()));
        parts.extend(dst.addr.iter().map(|addr| Clean(addr).to_string()));
        write_parts(f, &parts)
    }
}

/// `[container 0123456789ab]` (the id's first 12 digits, as docker shows it), if any.
fn container_text(id: Option<&str>) -> Option<String> {
    id.map(|id| format!("[container {}]", Clean(id.get(..12).unwrap_or(id))))
}

fn write_parts(f: &mut fmt::Formatter<'_>, parts: &[String]) -> fmt::Result {
    if parts.is_empty() {
        f.write_str("-")
    } else {
        f.write_str(&parts.join(" "))
    }
}

/// One line for `enforcer flows`:
/// `<time> <node> <source> <event> <VERDICT> [<src> -> <dst> rule <n|->] v<policy> <reason>`,
/// then `up <n>B down <n>B <n>ms` when known (close records), `lost <n>` (loss records) and
/// the detail in parentheses. Daemon records have no `src -> dst` and show a rule only if set.
impl fmt::Display for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            Clean(&self.time),
            Clean(&self.node),
            self.source,
            self.event,
            self.verdict.as_str().to_ascii_uppercase()
        )?;
        if self.source != Source::Daemon {
            write!(f, " {} -> {}", SrcText(&self.src), DstText(&self.dst))?;
            match self.rule {
                Some(rule) => write!(f, " rule {rule}")?,
                None => f.write_str(" rule -")?,
            }
        } else if let Some(rule) = self.rule {
            write!(f, " rule {rule}")?;
        }
        write!(f, " v{} {}", self.policy_version, Clean(&self.reason))?;
        if let Some(up) = self.bytes_up {
            write!(f, " up {up}B")?;
        }
        if let Some(down) = self.bytes_down {
            write!(f, " down {down}B")?;
        }
        if let Some(ms) = self.duration_ms {
            write!(f, " {ms}ms")?;
        }
        if let Some(lost) = self.lost {
            write!(f, " lost {lost}")?;
        }
        if let Some(detail) = &self.detail {
            write!(f, " ({})", Clean(detail))?;
        }
        Ok(())
    }
}

/// Entries and records for the tests of every audit module.
#[cfg(test)]
pub(crate) mod samples {
    use std::time::{Duration, SystemTime};

    use super::{Dst, Entry, Event, Source, Src, Verdict};

    /// 2026-11-24T10:00:00.123456Z.
    pub(crate) fn time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_514_400_123_456)
    }

    /// The entry the daemon makes of an outbound flow's close record.
    pub(crate) fn outbound_close() -> Entry {
        Entry {
            time: time(),
            source: Source::Outbound,
            event: Event::Close,
            verdict: Verdict::Allow,
            reason: "finished".to_owned(),
            rule: Some(3),
            policy_version: 9,
            src: Src {
                spiffe_id: Some("spiffe://td/web".to_owned()),
                pid: Some(812),
                exe: Some("/usr/bin/curl".to_owned()),
                sha256: None,
                cgroup: None,
                cgroup_id: Some(77),
                addr: Some("10.0.0.1:40112".to_owned()),
                ..Src::default()
            },
            dst: Dst {
                spiffe_id: Some("spiffe://td/db".to_owned()),
                addr: Some("10.0.0.2:5432".to_owned()),
                ..Dst::default()
            },
            bytes_up: Some(1200),
            bytes_down: Some(5300),
            duration_ms: Some(1520),
            lost: None,
            detail: None,
        }
    }

    /// A kernel deny of `web` (pid 812, curl) connecting to `db`, numbered `n` in its rule.
    pub(in crate::audit) fn kernel_deny(n: u32) -> Entry {
        Entry {
            time: time(),
            rule: Some(n),
            policy_version: 1,
            src: Src {
                spiffe_id: Some("spiffe://td/web".to_owned()),
                pid: Some(812),
                exe: Some("/usr/bin/curl".to_owned()),
                sha256: Some("ab".repeat(32)),
                cgroup: Some("/kubepods/web".to_owned()),
                cgroup_id: Some(4242),
                addr: Some("10.0.0.1:40112".to_owned()),
                ..Src::default()
            },
            dst: Dst {
                spiffe_id: Some("spiffe://td/db".to_owned()),
                addr: Some("10.0.0.2:5432".to_owned()),
                ..Dst::default()
            },
            ..Entry::new(Source::Kernel, Event::Deny, Verdict::Deny, "policy")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        samples::{kernel_deny, outbound_close},
        *,
    };

    fn record(entry: Entry) -> AuditRecord {
        AuditRecord::new(entry, 7, "node-a", "0".repeat(64))
    }

    #[test]
    fn record_round_trips_through_json_in_field_order() {
        let mut record = record(kernel_deny(2));
        record.detail = Some("why \"not\"".to_owned());
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            json.starts_with(
                r#"{"seq":7,"time":"2026-11-24T10:00:00.123456Z","node":"node-a","source":"kernel","event":"deny","verdict":"deny","reason":"policy","rule":2,"policy_version":1,"src":{"spiffe_id":"spiffe://td/web","pid":812,"exe":"/usr/bin/curl","#
            ),
            "{json}"
        );
        assert!(json.ends_with(&format!(
            r#""detail":"why \"not\"","prev":"{}"}}"#,
            "0".repeat(64)
        )));
        assert!(
            !json.contains("bytes_up"),
            "None fields are left out: {json}"
        );
        let back: AuditRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn names_parse_and_unknown_names_list_the_allowed_ones() {
        for verdict in Verdict::ALL {
            assert_eq!(verdict.as_str().parse::<Verdict>(), Ok(verdict));
        }
        for event in Event::ALL {
            assert_eq!(event.as_str().parse::<Event>(), Ok(event));
        }
        for source in Source::ALL {
            assert_eq!(source.as_str().parse::<Source>(), Ok(source));
        }
        let error = "permit".parse::<Verdict>().unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"unknown verdict "permit": expected one of allow, deny, audit, drop, loss, info, redirect"#
        );
        assert!("Deny".parse::<Verdict>().is_err(), "names are lowercase");
    }

    #[test]
    fn verdicts_round_trip_in_json_and_all_is_in_declaration_order() {
        for (index, verdict) in Verdict::ALL.into_iter().enumerate() {
            assert_eq!(
                verdict as usize, index,
                "{verdict}: counters are indexed by declaration order"
            );
            let json = serde_json::to_string(&verdict).unwrap();
            assert_eq!(json, format!("\"{verdict}\""));
            assert_eq!(serde_json::from_str::<Verdict>(&json).unwrap(), verdict);
        }
        let redirect = record(Entry {
            time: samples::time(),
            ..Entry::new(
                Source::Kernel,
                Event::Redirect,
                Verdict::Redirect,
                "to-tunnel",
            )
        });
        assert!(redirect.matches(Some(Verdict::Redirect), None));
        assert!(
            !redirect.matches(Some(Verdict::Allow), None),
            "a redirect is not an allow: the tunnel decides"
        );
        assert_eq!(
            redirect.to_string(),
            "2026-11-24T10:00:00.123456Z node-a kernel redirect REDIRECT - -> - rule - v0 to-tunnel"
        );
    }

    #[test]
    fn times_outside_rfc3339_are_clamped() {
        assert_eq!(format_time(samples::time()), "2026-11-24T10:00:00.123456Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_time(before), "1970-01-01T00:00:00.000000Z");
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_801);
        assert_eq!(format_time(after), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn matches_filters_by_verdict_and_either_identity() {
        let record = record(kernel_deny(2));
        assert!(record.matches(None, None));
        assert!(record.matches(Some(Verdict::Deny), None));
        assert!(!record.matches(Some(Verdict::Allow), None));
        assert!(record.matches(None, Some("spiffe://td/web")));
        assert!(record.matches(Some(Verdict::Deny), Some("spiffe://td/db")));
        assert!(
            !record.matches(None, Some("spiffe://td/we")),
            "identities match exactly"
        );
        assert!(!record.matches(Some(Verdict::Allow), Some("spiffe://td/db")));
    }

    #[test]
    fn display_shows_each_kind_on_one_line() {
        assert_eq!(
            record(kernel_deny(2)).to_string(),
            "2026-11-24T10:00:00.123456Z node-a kernel deny DENY spiffe://td/web [pid 812 curl] \
             10.0.0.1:40112 -> spiffe://td/db 10.0.0.2:5432 rule 2 v1 policy"
        );
        assert_eq!(
            record(outbound_close()).to_string(),
            "2026-11-24T10:00:00.123456Z node-a outbound close ALLOW spiffe://td/web [pid 812 curl] \
             10.0.0.1:40112 -> spiffe://td/db 10.0.0.2:5432 rule 3 v9 finished up 1200B down 5300B \
             1520ms"
        );
        let mut contained = outbound_close();
        contained.src.container_id = Some("0123456789ab".repeat(5) + "cdef");
        contained.dst.container_id = Some("fedcba987654".to_owned() + &"0".repeat(52));
        assert_eq!(
            record(contained).to_string(),
            "2026-11-24T10:00:00.123456Z node-a outbound close ALLOW spiffe://td/web [pid 812 curl] \
             [container 0123456789ab] 10.0.0.1:40112 -> spiffe://td/db [container fedcba987654] \
             10.0.0.2:5432 rule 3 v9 finished up 1200B down 5300B 1520ms"
        );
        let inbound = Entry {
            time: samples::time(),
            policy_version: 9,
            src: Src {
                addr: Some("10.0.0.1:40112".to_owned()),
                ..Src::default()
            },
            dst: Dst {
                spiffe_id: None,
                addr: Some("10.0.0.2:5432".to_owned()),
                ..Dst::default()
            },
            ..Entry::new(Source::Inbound, Event::Deny, Verdict::Deny, "no-route")
        };
        assert_eq!(
            record(inbound).to_string(),
            "2026-11-24T10:00:00.123456Z node-a inbound deny DENY 10.0.0.1:40112 -> 10.0.0.2:5432 \
             rule - v9 no-route"
        );
        let loss = Entry {
            time: samples::time(),
            ..Entry::loss("ring-buffer-full", 17, None)
        };
        assert_eq!(
            record(loss).to_string(),
            "2026-11-24T10:00:00.123456Z node-a daemon loss LOSS v0 ring-buffer-full lost 17"
        );
        let reload = Entry {
            time: samples::time(),
            policy_version: 4,
            detail: Some("1 rule added\n2 removed".to_owned()),
            ..Entry::new(Source::Daemon, Event::Reload, Verdict::Info, "policy")
        };
        assert_eq!(
            record(reload).to_string(),
            "2026-11-24T10:00:00.123456Z node-a daemon reload INFO v4 policy (1 rule added\\n2 removed)"
        );
    }

    #[test]
    fn display_escapes_control_characters_in_names() {
        let mut entry = kernel_deny(2);
        entry.src.exe = Some("/tmp/x\n2026 ALLOW\u{1b}[2J".to_owned());
        let line = record(entry).to_string();
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(line.contains(r"[pid 812 x\n2026 ALLOW\u{1b}[2J]"), "{line}");
    }
}

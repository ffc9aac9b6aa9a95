//! The daemon's own counters and latency histograms (attestation, SVID issuance, verdicts,
//! reloads), and the SVID issuer that feeds them. The tunnel and the kernel keep their own;
//! the `/metrics` endpoint exports all three.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    audit::{Source, Verdict},
    identity::{CertificateAuthority, SpiffeId, SvidError, SvidIssuer, X509Svid},
    metrics::{self, Histogram},
    workload_api::Changes,
};

/// Counters and histograms of the daemon itself.
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    attest_seconds: Histogram,
    attest_failures: AtomicU64,
    issue_seconds: Histogram,
    issue_failures: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    kernel_events: AtomicU64,
    /// Audit records by source and verdict (indexed in declaration order).
    verdicts: [[AtomicU64; Verdict::ALL.len()]; Source::ALL.len()],
}

impl Telemetry {
    /// One attestation took `elapsed`.
    pub(crate) fn attested(&self, elapsed: Duration, ok: bool) {
        self.attest_seconds.observe(elapsed);
        if !ok {
            self.attest_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One policy reload was applied (`ok`) or refused.
    pub(crate) fn reloaded(&self, ok: bool) {
        let counter = if ok {
            &self.reloads
        } else {
            &self.reload_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One kernel event was read.
    pub(crate) fn kernel_event(&self) {
        self.kernel_events.fetch_add(1, Ordering::Relaxed);
    }

    /// One audit record with `verdict` was written by `source`.
    pub(crate) fn verdict(&self, source: Source, verdict: Verdict) {
        self.verdicts[source as usize][verdict as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The daemon's own families, read at scrape time.
impl Collector for Telemetry {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let out = &mut out;
        let verdicts = Source::ALL.into_iter().flat_map(|source| {
            Verdict::ALL.into_iter().filter_map(move |verdict| {
                let count =
                    self.verdicts[source as usize][verdict as usize].load(Ordering::Relaxed);
                (count > 0).then_some((
                    [("source", source.as_str()), ("verdict", verdict.as_str())],
                    count,
                ))
            })
        });
        metrics::labelled_counters(
            out,
            "enforcer_verdicts_total",
            "Audit records by the component that decided and the verdict.",
            verdicts,
        )?;
        metrics::counter(
            out,
            "enforcer_attestations_total",
            "Process attestations by the registrar.",
            self.attest_seconds.count(),
        )?;
        metrics::counter(
            out,
            "enforcer_attestation_failures_total",
            "Attestations that failed (process gone, binary unreadable).",
            self.attest_failures.load(Ordering::Relaxed),
        )?;
        metrics::histogram(
            out,
            "enforcer_attestation_seconds",
            "Time to attest one process.",
            &self.attest_seconds,
        )?;
        metrics::counter(
            out,
            "enforcer_svids_issued_total",
            "X.509-SVIDs issued by the node CA (first issuance and rotations).",
            self.issue_seconds.count() - self.issue_failures.load(Ordering::Relaxed),
        )?;
        metrics::counter(
            out,
            "enforcer_svid_issue_failures_total",
            "SVID issuances that failed.",
            self.issue_failures.load(Ordering::Relaxed),
        )?;
        metrics::histogram(
            out,
            "enforcer_svid_issue_seconds",
            "Time to issue one SVID (key generation and signing).",
            &self.issue_seconds,
        )?;
        metrics::counter(
            out,
            "enforcer_policy_reloads_total",
            "Policy reloads applied.",
            self.reloads.load(Ordering::Relaxed),
        )?;
        metrics::counter(
            out,
            "enforcer_policy_reload_failures_total",
            "Policy reloads refused (invalid policy or failed apply).",
            self.reload_failures.load(Ordering::Relaxed),
        )?;
        metrics::counter(
            out,
            "enforcer_kernel_events_read_total",
            "Events read from the kernel's ring buffer.",
            self.kernel_events.load(Ordering::Relaxed),
        )
    }
}

/// The node CA as an [`SvidIssuer`] that counts and times every issuance, and reports each new
/// SVID to the Workload API's streams (rotated by the cache's schedule or on demand, they all
/// look again).
pub(crate) struct MeteredIssuer {
    /// The node's intermediate CA.
    pub(crate) ca: CertificateAuthority,
    /// How long each SVID is valid.
    pub(crate) ttl: Duration,
    /// Where the figures go.
    pub(crate) telemetry: Arc<Telemetry>,
    /// Where a new SVID is reported.
    pub(crate) changes: Changes,
}

impl SvidIssuer for MeteredIssuer {
    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<X509Svid, SvidError> {
        let started = Instant::now();
        let result = self.ca.issue_svid(id, self.ttl, now);
        self.telemetry.issue_seconds.observe(started.elapsed());
        match &result {
            Ok(_) => {
                tracing::info!(%id, "issued an SVID");
                self.changes.everything();
            }
            Err(_) => {
                self.telemetry
                    .issue_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_verdicts_and_histograms() {
        let telemetry = Telemetry::default();
        telemetry.verdict(Source::Kernel, Verdict::Deny);
        telemetry.verdict(Source::Kernel, Verdict::Deny);
        telemetry.verdict(Source::Inbound, Verdict::Allow);
        telemetry.verdict(Source::Kernel, Verdict::Redirect);
        telemetry.attested(Duration::from_micros(300), true);
        telemetry.attested(Duration::from_micros(300), false);
        telemetry.reloaded(true);
        let text = metrics::exposition(telemetry);
        for line in [
            "enforcer_verdicts_total{source=\"kernel\",verdict=\"deny\"} 2\n",
            "enforcer_verdicts_total{source=\"inbound\",verdict=\"allow\"} 1\n",
            "enforcer_verdicts_total{source=\"kernel\",verdict=\"redirect\"} 1\n",
            "enforcer_attestations_total 2\n",
            "enforcer_attestation_failures_total 1\n",
            "enforcer_attestation_seconds_count 2\n",
            "enforcer_policy_reloads_total 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}

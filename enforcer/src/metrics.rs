//! Metrics exposition: `/metrics` is written by `prometheus-client` (the Prometheus project's
//! Rust client) in the `OpenMetrics` text format, from collectors that read our counters at
//! scrape time; this module adds the few helpers they share.
//!
//! What it keeps of its own, and why: the latency [`Histogram`]. The crate's histogram takes a
//! lock on every observation; ours is a fixed array of atomics, so the tunnel's hot paths
//! (`observe` on every dial and every redirected connection) never wait. It is encoded through
//! the crate's encoder all the same. The counters stay our atomics too (the kernel's live in
//! BPF maps, the tunnel's in an array indexed by [`Metric`](crate::tunnel::Metric)), reported
//! as constant samples at each scrape.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// The `Content-Type` of [`exposition`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds: 50 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
    10.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`]; lock-free, shared by reference.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot counts those above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// How many observations were recorded.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// A copy of the values recorded so far (for a scrape that reads them before encoding).
impl Clone for Histogram {
    fn clone(&self) -> Self {
        Self {
            buckets: std::array::from_fn(|slot| {
                AtomicU64::new(self.buckets[slot].load(Ordering::Relaxed))
            }),
            sum_ns: AtomicU64::new(self.sum_ns.load(Ordering::Relaxed)),
        }
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // The encoder takes per-bucket counts and writes them cumulatively; `f64::MAX` is `+Inf`.
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .chain([&f64::MAX])
            .zip(&self.buckets)
            .map(|(&bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, count)| count).sum();
        #[expect(
            clippy::cast_precision_loss,
            reason = "a sum of nanoseconds far below 2^53 s; Prometheus sums are floats"
        )]
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The `OpenMetrics` text of what `collector` reports, ending with `# EOF`.
pub fn exposition(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("encoding into a String does not fail");
    text
}

/// A counter family with one unlabelled sample named `name`.
///
/// `name` is the sample's name, ending in `_total`: `OpenMetrics` puts that suffix on samples
/// and not on the family, so the encoder adds it back to the family name it is given.
pub fn counter(out: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(out.encode_descriptor(family(name), help, None, counter.metric_type())?)
}

/// A counter family whose samples, named `name` (ending in `_total`), carry labels.
pub fn labelled_counters<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = out.encode_descriptor(family(name), help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family with one unlabelled sample.
pub fn gauge(out: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(out.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// A histogram family (in seconds) from `histogram`.
pub fn histogram(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &Histogram,
) -> fmt::Result {
    histogram.encode(out.encode_descriptor(name, help, None, histogram.metric_type())?)
}

/// The family name of counter samples named `name`.
fn family(name: &str) -> &str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports what `write` encodes.
    struct Families<F>(F);

    impl<F> fmt::Debug for Families<F> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Families")
        }
    }

    impl<F> Collector for Families<F>
    where
        F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
    {
        fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
            (self.0)(&mut out)
        }
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let observed = Histogram::default();
        observed.observe(Duration::from_micros(40));
        observed.observe(Duration::from_millis(3));
        observed.observe(Duration::from_secs(20));
        assert_eq!(observed.count(), 3);
        let copy = observed.clone();
        observed.observe(Duration::from_secs(1));
        assert_eq!(copy.count(), 3, "a clone is a copy of the values then");
        let text = exposition(Families(move |out: &mut DescriptorEncoder| {
            histogram(out, "x_seconds", "X.", &copy)
        }));
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
        for line in [
            "x_seconds_bucket{le=\"0.00005\"} 1\n",
            "x_seconds_bucket{le=\"0.0025\"} 1\n",
            "x_seconds_bucket{le=\"0.005\"} 2\n",
            "x_seconds_bucket{le=\"10.0\"} 2\n",
            "x_seconds_bucket{le=\"+Inf\"} 3\n",
            "x_seconds_sum 20.00304\n",
            "x_seconds_count 3\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn families_and_labels_follow_the_openmetrics_text_format() {
        let text = exposition(Families(|out: &mut DescriptorEncoder| {
            labelled_counters(
                out,
                "v_total",
                "Verdicts.",
                [([("verdict", "deny"), ("by", "kernel")], 2)],
            )?;
            counter(out, "c_total", "A counter.", 3)?;
            gauge(out, "g", "A gauge.", 7)
        }));
        assert_eq!(
            text,
            "# HELP v Verdicts.\n# TYPE v counter\nv_total{verdict=\"deny\",by=\"kernel\"} 2\n\
             # HELP c A counter.\n# TYPE c counter\nc_total 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 7\n# EOF\n"
        );
    }
}

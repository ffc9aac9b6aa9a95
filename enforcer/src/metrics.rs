//! Prometheus text exposition: latency histograms with fixed buckets, and a writer of the
//! text format (version 0.0.4) that the daemon's `/metrics` endpoint serves.
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

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

/// The metric types the writer emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Cumulative buckets with a sum and a count.
    Histogram,
}

/// Builds one exposition, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Start a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family, with `labels` (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) -> &mut Self {
        let _ = writeln!(self.text, "{name}{} {value}", render_labels(labels));
        self
    }

    /// A counter family with a single unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, Kind::Counter, help)
            .sample(name, &[], value)
    }

    /// A gauge family with a single unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, Kind::Gauge, help)
            .sample(name, &[], value)
    }

    /// A histogram family (in seconds) from `histogram`.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) -> &mut Self {
        self.family(name, Kind::Histogram, help);
        let mut cumulative = 0;
        for (slot, count) in histogram.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS
                .get(slot)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(self.text, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "a sum of nanoseconds far below 2^53 s; Prometheus sums are floats"
        )]
        let sum = histogram.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(self.text, "{name}_sum {sum}");
        let _ = writeln!(self.text, "{name}_count {cumulative}");
        self
    }

    /// The finished text.
    #[must_use]
    pub fn finish(self) -> String {
        self.text
    }
}

/// `{a="x",b="y"}`, or nothing without labels; values escaped as the format requires.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(name, value)| {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{name}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(40));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(20));
        assert_eq!(histogram.count(), 3);
        let mut exposition = Exposition::default();
        exposition.histogram("x_seconds", "X.", &histogram);
        let text = exposition.finish();
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
        assert!(
            text.contains("x_seconds_bucket{le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{le=\"0.0025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_sum 20.00304\n"), "{text}");
        assert!(text.contains("x_seconds_count 3\n"), "{text}");
    }

    #[test]
    fn families_and_labels_follow_the_text_format() {
        let mut exposition = Exposition::default();
        exposition
            .family("v_total", Kind::Counter, "Verdicts.")
            .sample("v_total", &[("verdict", "deny"), ("by", "a\"b")], 2);
        exposition.gauge("g", "A gauge.", 7);
        assert_eq!(
            exposition.finish(),
            "# HELP v_total Verdicts.\n# TYPE v_total counter\nv_total{verdict=\"deny\",by=\"a\\\"b\"} 2\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 7\n"
        );
    }
}

//! Counters of one tunnel endpoint: connections, streams, refusals, bytes, and the bad input it
//! turned away. The daemon's metrics endpoint exports them.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::Histogram;

/// One counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Connections accepted by the outbound listener.
    OutboundAccepted,
    /// Outbound flows refused (any reason).
    OutboundDenied,
    /// TLS connections the outbound side dialled to peers.
    PoolDials,
    /// Streams opened on an already established pooled connection.
    PoolReuses,
    /// Connections accepted by the inbound listener.
    InboundAccepted,
    /// Inbound TLS handshakes that failed (bad certificate, non-TLS bytes, wrong ALPN).
    InboundHandshakeFailures,
    /// Inbound connections closed for not finishing a handshake in time (slow clients).
    InboundHandshakeTimeouts,
    /// Inbound HTTP/2 connections that ended with a protocol error.
    InboundProtocolErrors,
    /// Inbound CONNECT requests refused (any status).
    InboundRefused,
    /// Inbound CONNECT requests refused as malformed (400) or with oversized headers (431).
    InboundBadRequests,
    /// Flows opened (either side).
    FlowsOpened,
    /// Flows closed (either side).
    FlowsClosed,
    /// Open flows closed because a policy reload denies them.
    FlowsRevoked,
    /// Bytes copied from clients towards destinations.
    BytesUp,
    /// Bytes copied from destinations towards clients.
    BytesDown,
    /// Bytes of clients sent on CONNECT streams before their status arrived (optimistic send;
    /// also counted in [`Metric::BytesUp`] once the stream is accepted).
    BytesBeforeStatus,
}

impl Metric {
    /// Every counter.
    pub const ALL: [Self; 16] = [
        Self::OutboundAccepted,
        Self::OutboundDenied,
        Self::PoolDials,
        Self::PoolReuses,
        Self::InboundAccepted,
        Self::InboundHandshakeFailures,
        Self::InboundHandshakeTimeouts,
        Self::InboundProtocolErrors,
        Self::InboundRefused,
        Self::InboundBadRequests,
        Self::FlowsOpened,
        Self::FlowsClosed,
        Self::FlowsRevoked,
        Self::BytesUp,
        Self::BytesDown,
        Self::BytesBeforeStatus,
    ];

    /// The exported name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::OutboundAccepted => "tunnel_outbound_accepted_total",
            Self::OutboundDenied => "tunnel_outbound_denied_total",
            Self::PoolDials => "tunnel_pool_dials_total",
            Self::PoolReuses => "tunnel_pool_reuses_total",
            Self::InboundAccepted => "tunnel_inbound_accepted_total",
            Self::InboundHandshakeFailures => "tunnel_inbound_handshake_failures_total",
            Self::InboundHandshakeTimeouts => "tunnel_inbound_handshake_timeouts_total",
            Self::InboundProtocolErrors => "tunnel_inbound_protocol_errors_total",
            Self::InboundRefused => "tunnel_inbound_refused_total",
            Self::InboundBadRequests => "tunnel_inbound_bad_requests_total",
            Self::FlowsOpened => "tunnel_flows_opened_total",
            Self::FlowsClosed => "tunnel_flows_closed_total",
            Self::FlowsRevoked => "tunnel_flows_revoked_total",
            Self::BytesUp => "tunnel_bytes_up_total",
            Self::BytesDown => "tunnel_bytes_down_total",
            Self::BytesBeforeStatus => "tunnel_bytes_before_status_total",
        }
    }
}

/// The counters and latency histograms of one endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: [AtomicU64; Metric::ALL.len()],
    /// Time to dial a peer: TCP connect, TLS 1.3 and HTTP/2 handshakes.
    pub handshake: Histogram,
    /// Time from accepting a redirected connection to its route: the kernel's redirect
    /// record, attestation of the client, and the destination's owner.
    pub outbound_decision: Histogram,
}

impl Metrics {
    /// Add one to `metric`.
    pub fn inc(&self, metric: Metric) {
        self.add(metric, 1);
    }

    /// Add `n` to `metric`.
    pub fn add(&self, metric: Metric, n: u64) {
        self.counters[metric as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The value of `metric`.
    #[must_use]
    pub fn get(&self, metric: Metric) -> u64 {
        self.counters[metric as usize].load(Ordering::Relaxed)
    }

    /// Every counter with its value.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(Metric, u64)> {
        Metric::ALL.iter().map(|&m| (m, self.get(m))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_distinct() {
        let metrics = Metrics::default();
        for (i, metric) in Metric::ALL.into_iter().enumerate() {
            assert_eq!(metric as usize, i, "ALL is in declaration order");
            metrics.add(metric, i as u64);
        }
        for (metric, value) in metrics.snapshot() {
            assert_eq!(value, metric as u64, "{}", metric.name());
        }
        let names: std::collections::HashSet<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), Metric::ALL.len());
    }
}

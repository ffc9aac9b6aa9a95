//! The Workload API's counters: requests by method and the gRPC status they were answered
//! with, connections refused over the limits, and X.509-SVID messages sent on streams.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::encoding::DescriptorEncoder;
use tonic::Code;

use crate::metrics;

/// The methods of the Workload API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    /// `FetchX509SVID`.
    FetchX509Svid,
    /// `FetchX509Bundles`.
    FetchX509Bundles,
    /// `FetchJWTSVID`.
    FetchJwtSvid,
    /// `FetchJWTBundles`.
    FetchJwtBundles,
    /// `ValidateJWTSVID`.
    ValidateJwtSvid,
}

impl Method {
    /// The method's name in the service.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FetchX509Svid => "FetchX509SVID",
            Self::FetchX509Bundles => "FetchX509Bundles",
            Self::FetchJwtSvid => "FetchJWTSVID",
            Self::FetchJwtBundles => "FetchJWTBundles",
            Self::ValidateJwtSvid => "ValidateJWTSVID",
        }
    }
}

/// The counters, shared by the service and the daemon's `/metrics`.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    requests: Mutex<BTreeMap<(Method, i32), u64>>,
    refused_connections: AtomicU64,
    x509_pushed: AtomicU64,
}

impl ApiMetrics {
    /// A request to `method` answered with `code` (a stream: the code it opened with).
    pub(crate) fn request(&self, method: Method, code: Code) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((method, code as i32))
            .or_default() += 1;
    }

    /// A connection closed at once: its caller was over its share or the total.
    pub(crate) fn refused_connection(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// An `X509SVIDResponse` sent on a stream (the first one and every push).
    pub(crate) fn x509_pushed(&self) {
        self.x509_pushed.fetch_add(1, Ordering::Relaxed);
    }

    /// The requests answered so far with `code` by `method`.
    #[must_use]
    pub fn requests(&self, method: Method, code: Code) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(method, code as i32))
            .copied()
            .unwrap_or(0)
    }

    /// Writes the families, with `open_streams` as the gauge of streams open now.
    pub fn encode(&self, out: &mut DescriptorEncoder, open_streams: usize) -> fmt::Result {
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        metrics::labelled_counters(
            out,
            "enforcer_workload_api_requests_total",
            "Workload API requests by method and the gRPC status code they were answered with.",
            requests.into_iter().map(|((method, code), value)| {
                (
                    [
                        ("method", method.as_str()),
                        ("code", code_name(Code::from_i32(code))),
                    ],
                    value,
                )
            }),
        )?;
        metrics::gauge(
            out,
            "enforcer_workload_api_streams",
            "Workload API streams open now.",
            u64::try_from(open_streams).unwrap_or(u64::MAX),
        )?;
        metrics::counter(
            out,
            "enforcer_workload_api_svids_pushed_total",
            "X509SVIDResponse messages sent on FetchX509SVID streams (the first and every update).",
            self.x509_pushed.load(Ordering::Relaxed),
        )?;
        metrics::counter(
            out,
            "enforcer_workload_api_refused_connections_total",
            "Workload API connections closed at once: the caller held its share, or all callers the total.",
            self.refused_connections.load(Ordering::Relaxed),
        )
    }
}

/// The gRPC name of `code` (`OK`, `PERMISSION_DENIED`, ...).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_method_and_code() {
        let counted = ApiMetrics::default();
        counted.request(Method::FetchX509Svid, Code::Ok);
        counted.request(Method::FetchX509Svid, Code::PermissionDenied);
        counted.request(Method::FetchX509Svid, Code::PermissionDenied);
        counted.x509_pushed();
        assert_eq!(
            counted.requests(Method::FetchX509Svid, Code::PermissionDenied),
            2
        );
        let text = crate::metrics::exposition(Families(counted));
        for line in [
            "enforcer_workload_api_requests_total{method=\"FetchX509SVID\",code=\"PERMISSION_DENIED\"} 2\n",
            "enforcer_workload_api_requests_total{method=\"FetchX509SVID\",code=\"OK\"} 1\n",
            "enforcer_workload_api_streams 3\n",
            "enforcer_workload_api_svids_pushed_total 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[derive(Debug)]
    struct Families(ApiMetrics);

    impl prometheus_client::collector::Collector for Families {
        fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
            self.0.encode(&mut out, 3)
        }
    }
}

//! enforcer: a node-wide, sidecar-less workload identity enforcer for Linux.
//!
//! The library holds everything the `enforcer` binary wires together; `main.rs` stays thin.
//!
//! Feature `testing` adds [`testing`], the privileged test harness the integration tests,
//! benchmarks and the demo example are built on. Those targets turn it on through the crate's
//! dev-dependency on itself; `cargo build` of the daemon leaves it out.

pub mod app;
pub mod attest;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod kernel;
pub mod metrics;
pub mod policy;
pub mod report;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tunnel;
pub mod workload_api;

// The `spiffe` dev-dependency serves tests/identity_spiffe_crate.rs (interop with code nobody
// here wrote); naming it keeps the library's own test build from calling it unused.
#[cfg(test)]
use spiffe as _;
// The crate's dev-dependency on itself turns the `testing` feature on for tests, benchmarks and
// examples; the library's own test build links the library's regular build without using it.
#[cfg(test)]
use enforcer as _;

//! enforcer: a node-wide, sidecar-less workload identity enforcer for Linux.
//!
//! The library holds everything the `enforcer` binary wires together; `main.rs` stays thin.

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
pub mod testing;
pub mod tunnel;

// The `spiffe` dev-dependency serves tests/identity_spiffe_crate.rs (interop with code nobody
// here wrote); naming it keeps the library's own test build from calling it unused.
#[cfg(test)]
use spiffe as _;

//! enforcer: a node-wide, sidecar-less workload identity enforcer for Linux.
//!
//! The library holds everything the `enforcer` binary wires together; `main.rs` stays thin.

pub mod attest;
pub mod cli;
pub mod identity;
pub mod kernel;
pub mod policy;
pub mod testing;

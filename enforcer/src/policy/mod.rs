//! The policy language: one TOML file of workloads, rules, egress and peers; its validation
//! with located diagnostics, its compilation to identity numbers and kernel tables, the
//! userspace authorizer, the workload registry that gives attested processes their identity,
//! and diffs between versions.

pub mod apply;
pub mod compile;
pub mod diagnostic;
pub mod diff;
pub mod identities;
mod in_force;
pub mod model;
pub mod parse;
mod view;

pub use compile::{Authorizer, Compiled, Decision, IdentityNumbers, compile};
pub use diagnostic::{Diagnostic, Severity};
pub use identities::{Identification, Identities, Registry};
pub use in_force::{InForce, PolicySnapshot, hash};
pub use model::{Action, Egress, IdPattern, Mode, Peer, Policy, Ports, Protocol, Rule, Workload};
pub use parse::{load, parse};
pub use view::PolicyView;

/// The embedded default policy (`policies/default.toml`): safe on any machine, it enrolls
/// nothing.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");

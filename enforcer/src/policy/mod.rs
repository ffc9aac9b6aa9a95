//! The policy language: one TOML file of workloads, rules, egress and peers; its validation
//! with located diagnostics, its compilation to identity numbers and kernel tables, the
//! userspace authorizer, the workload registry that gives attested processes their identity,
//! and diffs between versions.

mod apply;
mod compile;
mod diagnostic;
mod diff;
mod identities;
mod in_force;
mod model;
mod parse;
mod view;

pub use apply::{ApplyError, ApplyReport, apply};
pub use compile::{Authorizer, Compiled, Decision, IdentityNumbers, compile};
pub use diagnostic::{Diagnostic, Severity};
pub(crate) use diagnostic::{line_col, render};
pub use diff::{Change, diff};
pub use identities::{Identification, Identities, Registry};
pub use in_force::{InForce, PolicyPublisher, PolicySnapshot, hash};
pub(crate) use model::DEFAULT_PEER_PORT;
pub use model::{
    Action, Egress, IdPattern, Mode, Network, Peer, Policy, Ports, Protocol, Rule, Workload,
};
pub use parse::{MAX_POLICY_BYTES, load, parse};
pub use view::PolicyView;

/// The embedded default policy (`policies/default.toml`): safe on any machine, it enrolls
/// nothing.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");

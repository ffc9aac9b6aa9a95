//! The audit trail: every decision of the kernel hooks and the tunnel, and what the daemon
//! itself did, as identity-tagged JSON lines in a hash chain that shows any edit, removal or
//! reordering of a record.
//!
//! ```text
//! kernel events, tunnel FlowRecords, daemon events
//!     --submit(Entry), never waits--> bounded queue --> writer thread
//!     --> audit.jsonl (rotated by size to audit.jsonl.1 .. .<keep>)
//!     --> audit.head (both ends of the chain, replaced after every batch and rotation)
//!     --> recent records, bounded in bytes, and a broadcast channel (enforcer flows [--follow];
//!         older records are read back from the files)
//! ```
//!
//! # The hash chain
//!
//! Record `seq` 1 is the first record ever; each next record has `seq` one more, across
//! rotated files and daemon restarts. A line is the record's JSON, fields in the order of
//! [`AuditRecord`]'s struct, with one more last field:
//!
//! ```text
//! {"seq":1,"time":"...",...,"prev":"<64 hex>","hash":"<64 lowercase hex>"}
//! ```
//!
//! where `hash` is the SHA-256 of the bytes of the record's JSON without the hash field,
//! exactly as written (`{"seq":1,...,"prev":"<64 hex>"}`), and `prev` is the previous
//! record's `hash` (64 zeros for record 1). To check a line, take off its last
//! `,"hash":"<64 hex>"}`, put back the `}`, hash those bytes and compare; then the record's
//! `prev` must be the previous line's hash and its `seq` the previous seq plus one. An edited
//! record (the last one included) fails its hash; a removed or reordered record fails the
//! link to its predecessor; a torn last line (no newline) is reported as torn.
//!
//! # The head
//!
//! What is left of a chain cut at either end is still a chain: records removed from the end,
//! or files removed from the start beyond what rotation deletes, do not break a link. So the
//! writer keeps a head beside the log (`audit.jsonl` -> `audit.head`) naming the last record
//! written (seq and hash) and the oldest retained (seq and `prev`), and `verify` checks both
//! ends of the chain against it. On restart the writer checks the log against the head and
//! writes a loss record for what is missing; after a cut the chain continues after the head's
//! last record, so the gap stays in the chain and `verify` names the record that reported it.
//! The head protects against cuts by anyone who cannot also rewrite the head; ship the log and
//! the head off the node for more.
#![forbid(unsafe_code)]

mod chain;
mod files;
mod head;
mod history;
mod log;
mod recent;
mod record;
mod verify;

pub use chain::ChainError;
pub use head::HeadError;
pub use history::HistoryError;
pub use log::AuditError;
pub(crate) use log::{AuditConfig, AuditLog, AuditStats};
pub(crate) use recent::{Filter, RecentRecord};
pub(crate) use record::Entry;
#[cfg(test)]
pub(crate) use record::samples;
pub use record::{AuditRecord, Dst, Event, RecordError, Source, Src, Verdict};
pub use verify::{AuditVerifyError, Finding, HeadCheck, VerifyReport, verify};

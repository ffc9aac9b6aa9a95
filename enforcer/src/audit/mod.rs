//! The audit trail: every decision of the kernel hooks and the tunnel, and what the daemon
//! itself did, as identity-tagged JSON lines in a hash chain that shows any edit, removal or
//! reordering of a record.
//!
//! ```text
//! kernel events, tunnel FlowRecords, daemon events
//!     --submit(Entry), never waits--> bounded queue --> writer thread
//!     --> audit.jsonl (rotated by size to audit.jsonl.1 .. .<keep>)
//!     --> recent records and a broadcast channel (enforcer flows [--follow])
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
//! link to its predecessor; a torn last line (no newline) is reported as torn. Removing
//! records from the start, as rotation does, is visible only as a chain that does not start
//! at record 1 ([`VerifyReport::anchored`]).
#![forbid(unsafe_code)]

mod chain;
mod files;
mod log;
mod record;
mod verify;

pub use chain::ChainError;
pub use log::{AuditConfig, AuditError, AuditLog, AuditStats};
pub use record::{AuditRecord, Dst, Entry, Event, RecordError, Source, Src, Verdict};
pub use verify::{VerifyError, VerifyReport, verify};

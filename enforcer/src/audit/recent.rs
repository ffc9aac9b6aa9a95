//! The newest records in memory, for `enforcer flows`: each kept as the line the log holds
//! (one allocation of the line's length, shared with `--follow` subscribers), the window
//! bounded in bytes, not in records, so its cost does not depend on what the records carry.
#![forbid(unsafe_code)]

use std::{collections::VecDeque, sync::Arc};

use serde::Deserialize;

use super::record::{AuditRecord, Verdict};

/// What one record costs the window beyond its line: the record's fixed part, the reference
/// count of its `Arc`, and the window's slot.
pub(super) const OVERHEAD: usize =
    size_of::<RecentRecord>() + 2 * size_of::<usize>() + size_of::<Arc<RecentRecord>>();

/// A written record as `enforcer flows` serves it: its seq, its verdict, and its line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RecentRecord {
    seq: u64,
    verdict: Verdict,
    /// The line exactly as the log holds it, without its newline.
    line: Box<str>,
}

/// Which records `enforcer flows` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Only records with this verdict.
    pub(crate) verdict: Option<Verdict>,
    /// Only records naming this SPIFFE ID at either end.
    pub(crate) id: Option<String>,
}

/// The two SPIFFE IDs of a line, read without the rest of the record.
#[derive(Deserialize)]
struct Parties<'a> {
    #[serde(borrow, default)]
    src: Party<'a>,
    #[serde(borrow, default)]
    dst: Party<'a>,
}

#[derive(Default, Deserialize)]
struct Party<'a> {
    #[serde(borrow, default)]
    spiffe_id: Option<std::borrow::Cow<'a, str>>,
}

impl RecentRecord {
    /// The record `record`, whose line in the log is `line` (without its newline).
    pub(super) fn new(record: &AuditRecord, line: &str) -> Self {
        Self {
            seq: record.seq,
            verdict: record.verdict,
            line: line.into(),
        }
    }

    /// The record's seq.
    #[must_use]
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The record's line as the log holds it, without its newline.
    #[must_use]
    pub(crate) fn line(&self) -> &str {
        &self.line
    }

    /// Whether the record is one `filter` asks for.
    #[must_use]
    pub(crate) fn matches(&self, filter: &Filter) -> bool {
        if filter
            .verdict
            .is_some_and(|verdict| verdict != self.verdict)
        {
            return false;
        }
        let Some(id) = filter.id.as_deref() else {
            return true;
        };
        serde_json::from_str::<Parties<'_>>(&self.line).is_ok_and(|parties| {
            parties.src.spiffe_id.as_deref() == Some(id)
                || parties.dst.spiffe_id.as_deref() == Some(id)
        })
    }

    /// What keeping the record costs the window, in bytes.
    #[must_use]
    pub(super) fn cost(&self) -> usize {
        self.line.len() + OVERHEAD
    }
}

/// The newest records, oldest first, costing at most `capacity` bytes together.
#[derive(Debug)]
pub(super) struct Window {
    records: VecDeque<Arc<RecentRecord>>,
    bytes: usize,
    capacity: usize,
    /// The seq of the next record to come: the files hold every record before the window's.
    next_seq: u64,
}

impl Window {
    /// An empty window of `capacity` bytes whose first record will be seq `next_seq`.
    pub(super) fn new(capacity: usize, next_seq: u64) -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            capacity,
            next_seq,
        }
    }

    /// Adds the newest records, in seq order, dropping the oldest until the window fits its
    /// capacity.
    pub(super) fn extend(&mut self, records: impl IntoIterator<Item = Arc<RecentRecord>>) {
        for record in records {
            self.bytes += record.cost();
            self.next_seq = record.seq + 1;
            self.records.push_back(record);
        }
        while self.bytes > self.capacity {
            let Some(oldest) = self.records.pop_front() else {
                break;
            };
            self.bytes -= oldest.cost();
        }
        if self.records.capacity() > 2 * self.records.len().max(16) {
            self.records.shrink_to_fit();
        }
    }

    /// The records held, oldest first.
    pub(super) fn records(&self) -> Vec<Arc<RecentRecord>> {
        self.records.iter().cloned().collect()
    }

    /// The seq of the oldest record held (the next to come, when none is): older ones are
    /// only in the files.
    pub(super) fn oldest_seq(&self) -> u64 {
        self.records
            .front()
            .map_or(self.next_seq, |record| record.seq)
    }

    /// The seq of the next record to come.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// What the records held cost, in bytes.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{
        chain,
        record::samples::{kernel_deny, outbound_close},
    };

    fn recent(entry: crate::audit::Entry, seq: u64) -> Arc<RecentRecord> {
        let record = AuditRecord::new(entry, seq, "node-a", chain::GENESIS.to_string());
        let (line, _) = chain::seal(&record);
        Arc::new(RecentRecord::new(&record, &line))
    }

    #[test]
    fn the_window_holds_the_newest_records_within_its_bytes() {
        let one = recent(kernel_deny(1), 1).cost();
        let mut window = Window::new(3 * one + one / 2, 1);
        window.extend((1..=10).map(|seq| recent(kernel_deny(1), seq)));
        let seqs: Vec<u64> = window.records().iter().map(|r| r.seq()).collect();
        assert_eq!(seqs, [8, 9, 10]);
        let held: usize = window.records().iter().map(|r| r.cost()).sum();
        assert_eq!(window.bytes(), held);
        assert!(held <= 3 * one + one / 2, "{held}");
        assert_eq!((window.oldest_seq(), window.next_seq()), (8, 11));
        window.extend([recent(outbound_close(), 11)]);
        assert!(window.bytes() <= 3 * one + one / 2, "{}", window.bytes());
        assert_eq!(window.records().last().unwrap().seq(), 11);

        let mut none = Window::new(0, 1);
        none.extend([recent(kernel_deny(1), 1)]);
        assert!(none.records().is_empty());
        assert_eq!(none.bytes(), 0);
        assert_eq!(none.oldest_seq(), 2, "the files hold record 1");
    }

    #[test]
    fn a_record_costs_its_line_and_a_small_fixed_part() {
        let record = recent(outbound_close(), 7);
        assert_eq!(record.cost(), record.line().len() + OVERHEAD);
        const { assert!(OVERHEAD <= 64, "the fixed part of a record stays small") };
        assert!(
            record.line().ends_with("\"}"),
            "the sealed line, hash included"
        );
        assert!(record.line().contains("\"hash\":\""));
    }

    #[test]
    fn filters_read_the_verdict_and_either_identity() {
        let record = recent(kernel_deny(2), 1);
        let filter = |verdict, id: Option<&str>| Filter {
            verdict,
            id: id.map(str::to_owned),
        };
        assert!(record.matches(&Filter::default()));
        assert!(record.matches(&filter(Some(Verdict::Deny), None)));
        assert!(!record.matches(&filter(Some(Verdict::Allow), None)));
        assert!(record.matches(&filter(None, Some("spiffe://td/web"))));
        assert!(record.matches(&filter(Some(Verdict::Deny), Some("spiffe://td/db"))));
        assert!(!record.matches(&filter(None, Some("spiffe://td/we"))));
    }
}

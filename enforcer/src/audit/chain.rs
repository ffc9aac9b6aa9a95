//! The hash chain, shared by the writer and the verifier: how a record is sealed into a line,
//! how a line is opened and checked, and which record may follow which. The rule itself is
//! described in [`crate::audit`].
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use super::record::AuditRecord;
use crate::attest::Sha256Digest;

/// The `prev` of the first record ever: 64 zeros.
pub(super) const GENESIS: Sha256Digest = Sha256Digest([0; 32]);

/// What comes between a record's JSON (without its closing brace) and the hash's hex digits.
const HASH_FIELD: &str = ",\"hash\":\"";

/// The length of `,"hash":"<64 hex>"}`.
const SEAL_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// What is wrong with one line of an audit log, or with its place in the chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The last line of a file has no newline: the writer stopped in the middle of it.
    #[error(
        "the line has no newline at its end: the record was torn (the writer stopped mid-write)"
    )]
    Torn,
    /// The line is not UTF-8.
    #[error("malformed line: not UTF-8")]
    NotUtf8,
    /// The line does not end with the hash field.
    #[error(r#"malformed line: it does not end with ,"hash":"<64 lowercase hex digits>"}}"#)]
    NoHash,
    /// What precedes the hash field is not an audit record.
    #[error("malformed line: not an audit record")]
    NotARecord(#[source] serde_json::Error),
    /// The record's hash does not match its content.
    #[error("record seq {seq} was edited (hash mismatch)")]
    Edited {
        /// The seq the record claims.
        seq: u64,
    },
    /// The record's `prev` is not the hash of the record before it.
    #[error(
        "record seq {seq}: prev does not match record seq {previous}: a record was dropped or reordered"
    )]
    BrokenLink {
        /// The record's seq.
        seq: u64,
        /// The seq of the record before it.
        previous: u64,
    },
    /// The record's seq is not one more than the previous record's.
    #[error("record seq {seq} where seq {expected} was due: a record was dropped or reordered")]
    Sequence {
        /// The record's seq.
        seq: u64,
        /// The seq that should follow the previous record.
        expected: u64,
    },
}

/// The end of a chain: the seq and hash of its last record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Head {
    /// The last record's seq (0 before the first record).
    pub(super) seq: u64,
    /// The last record's hash ([`GENESIS`] before the first record).
    pub(super) hash: Sha256Digest,
}

impl Head {
    /// The head of a chain without records.
    pub(super) const GENESIS: Self = Self {
        seq: 0,
        hash: GENESIS,
    };

    /// Checks that `record` may follow this head: its `prev` is this head's hash and its seq
    /// is one more.
    pub(super) fn check_next(&self, record: &AuditRecord) -> Result<(), ChainError> {
        if record.prev != self.hash.to_string() {
            return Err(ChainError::BrokenLink {
                seq: record.seq,
                previous: self.seq,
            });
        }
        let expected = self.seq + 1;
        if record.seq != expected {
            return Err(ChainError::Sequence {
                seq: record.seq,
                expected,
            });
        }
        Ok(())
    }
}

fn sha256(bytes: &str) -> Sha256Digest {
    Sha256Digest(Sha256::digest(bytes).into())
}

/// The line for `record` (without its newline) and the record's hash.
pub(super) fn seal(record: &AuditRecord) -> (String, Sha256Digest) {
    let mut line = serde_json::to_string(record)
        .expect("an audit record holds only strings, numbers and enums, which always serialize");
    let hash = sha256(&line);
    line.pop();
    write!(line, "{HASH_FIELD}{hash}\"}}").expect("writing to a String cannot fail");
    (line, hash)
}

/// The record on `line` (without its newline) and its hash, once the hash is checked.
pub(super) fn open(line: &[u8]) -> Result<(AuditRecord, Sha256Digest), ChainError> {
    let line = std::str::from_utf8(line).map_err(|_| ChainError::NotUtf8)?;
    let (body, seal) = line
        .len()
        .checked_sub(SEAL_LEN)
        .and_then(|at| line.split_at_checked(at))
        .ok_or(ChainError::NoHash)?;
    let claimed: Sha256Digest = seal
        .strip_prefix(HASH_FIELD)
        .and_then(|rest| rest.strip_suffix("\"}"))
        .and_then(|hex| hex.parse().ok())
        .ok_or(ChainError::NoHash)?;
    let body = format!("{body}}}");
    let record: AuditRecord = serde_json::from_str(&body).map_err(ChainError::NotARecord)?;
    let hash = sha256(&body);
    if hash != claimed {
        return Err(ChainError::Edited { seq: record.seq });
    }
    Ok((record, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::samples::kernel_deny;

    fn record(seq: u64, prev: Sha256Digest) -> AuditRecord {
        AuditRecord::new(kernel_deny(1), seq, "node-a", prev.to_string())
    }

    #[test]
    fn a_sealed_line_is_the_record_plus_the_hash_of_its_json() {
        let record = record(1, GENESIS);
        let (line, hash) = seal(&record);
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(hash, sha256(&json));
        assert_eq!(
            line,
            format!("{},\"hash\":\"{hash}\"}}", &json[..json.len() - 1])
        );
        let (opened, opened_hash) = open(line.as_bytes()).unwrap();
        assert_eq!((opened, opened_hash), (record, hash));
    }

    #[test]
    fn open_refuses_lines_without_a_valid_hash_field() {
        let (line, hash) = seal(&record(1, GENESIS));
        let upper = line.replace(&hash.to_string(), &hash.to_string().to_uppercase());
        for bad in [
            "",
            "{}",
            "not json at all, but long enough to hold a hash field......",
            &upper,
        ] {
            assert!(
                matches!(open(bad.as_bytes()), Err(ChainError::NoHash)),
                "{bad:?}"
            );
        }
        let not_a_record = format!("{{\"seq\":1{HASH_FIELD}{hash}\"}}");
        assert!(matches!(
            open(not_a_record.as_bytes()),
            Err(ChainError::NotARecord(_))
        ));
        assert!(matches!(open(b"\xff\xfe"), Err(ChainError::NotUtf8)));
        let edited = line.replace("\"rule\":1", "\"rule\":2");
        assert!(matches!(
            open(edited.as_bytes()),
            Err(ChainError::Edited { seq: 1 })
        ));
    }

    #[test]
    fn check_next_wants_the_previous_hash_and_the_next_seq() {
        let (_, first) = seal(&record(1, GENESIS));
        assert!(Head::GENESIS.check_next(&record(1, GENESIS)).is_ok());
        assert!(matches!(
            Head::GENESIS.check_next(&record(2, GENESIS)),
            Err(ChainError::Sequence {
                seq: 2,
                expected: 1
            })
        ));
        let head = Head {
            seq: 1,
            hash: first,
        };
        assert!(head.check_next(&record(2, first)).is_ok());
        assert!(matches!(
            head.check_next(&record(3, GENESIS)),
            Err(ChainError::BrokenLink {
                seq: 3,
                previous: 1
            })
        ));
    }
}

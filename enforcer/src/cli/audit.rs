//! `enforcer audit ...`: check audit log files.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::{
    audit::{self, VerifyError, VerifyReport},
    report::report,
};

/// `enforcer audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of audit log files.
    ///
    /// Files may be given in any order, e.g. `/var/lib/enforcer/audit/audit.jsonl*`. Exits 1
    /// at the first edited, missing, reordered or torn record, naming its file and line.
    Verify {
        /// Audit log files: the current one and rotated ones.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

impl AuditCommand {
    /// Run the command.
    #[must_use]
    pub fn run(&self) -> ExitCode {
        match self {
            Self::Verify { files } => {
                let result = audit::verify(files);
                println!("{}", message(&result));
                if result.is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// What `verify` prints: the summary, or `FAILED: <file>:<line>: <what is wrong>`.
fn message(result: &Result<VerifyReport, VerifyError>) -> String {
    match result {
        Ok(verified) => summary(verified),
        Err(error) => format!("FAILED: {}", report(error)),
    }
}

/// `ok: 1234 records (seq 1..1234) in 3 files, chain intact from genesis`.
fn summary(report: &VerifyReport) -> String {
    let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let files = plural(report.files as u64, "file");
    if report.records == 0 {
        return format!("ok: no records in {files}");
    }
    let start = if report.anchored {
        "from genesis".to_owned()
    } else {
        format!("from seq {} (older files rotated away)", report.first_seq)
    };
    format!(
        "ok: {} (seq {}..{}) in {files}, chain intact {start}",
        plural(report.records, "record"),
        report.first_seq,
        report.last_seq,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::Sha256Digest;

    fn report(records: u64, files: usize, first_seq: u64, anchored: bool) -> VerifyReport {
        VerifyReport {
            records,
            files,
            first_seq,
            last_seq: first_seq + records.saturating_sub(1),
            anchored,
            last_hash: Sha256Digest([7; 32]),
        }
    }

    #[test]
    fn summary_says_how_much_was_checked_and_from_where() {
        assert_eq!(
            summary(&report(1234, 3, 1, true)),
            "ok: 1234 records (seq 1..1234) in 3 files, chain intact from genesis"
        );
        assert_eq!(
            summary(&report(1, 1, 501, false)),
            "ok: 1 record (seq 501..501) in 1 file, chain intact from seq 501 (older files rotated away)"
        );
        assert_eq!(summary(&report(0, 0, 0, true)), "ok: no records in 0 files");
    }

    #[test]
    fn a_failure_names_file_line_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log =
            audit::AuditLog::open(audit::AuditConfig::new(path.clone(), 1 << 20, 1), "node-a")
                .unwrap();
        for _ in 0..2 {
            log.submit(audit::Entry::new(
                audit::Source::Daemon,
                audit::Event::Start,
                audit::Verdict::Info,
                "started",
            ));
        }
        log.close(std::time::Duration::from_secs(30));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("started", "restarted", 2)).unwrap();
        assert_eq!(
            message(&audit::verify(std::slice::from_ref(&path))),
            format!(
                "FAILED: {}:1: record seq 1 was edited (hash mismatch)",
                path.display()
            )
        );

        std::fs::write(&path, "{}\n").unwrap();
        assert!(
            message(&audit::verify(std::slice::from_ref(&path))).starts_with(&format!(
                "FAILED: {}:1: malformed line: it does not end with",
                path.display()
            ))
        );
    }

    #[test]
    fn verify_exits_1_on_a_bad_file_and_0_on_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("audit.jsonl");
        std::fs::write(&empty, "").unwrap();
        let bad = dir.path().join("audit.jsonl.1");
        std::fs::write(&bad, "not a record\n").unwrap();
        let verify = |files: Vec<PathBuf>| AuditCommand::Verify { files }.run();
        assert_eq!(verify(vec![empty.clone()]), ExitCode::SUCCESS);
        assert_eq!(verify(vec![empty, bad]), ExitCode::FAILURE);
    }
}

//! `enforcer audit ...`: check audit log files.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::{
    audit::{self, AuditVerifyError, HeadCheck, VerifyReport},
    report::report,
};

/// `enforcer audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of audit log files, and both of its ends against the log's head.
    ///
    /// Files may be given in any order, e.g. `/var/lib/enforcer/audit/audit.jsonl*`; the head
    /// is found beside them, named after the log (`audit.head`). Exits 1 at the first edited,
    /// reordered or torn record, naming its file and line, and when records are missing from
    /// the start or the end of the log, or were cut and reported by the daemon, naming them.
    Verify {
        /// Audit log files: the current one and rotated ones.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The log's head, when it is not beside the files.
        #[arg(long, value_name = "PATH", conflicts_with = "no_head")]
        head: Option<PathBuf>,
        /// Check the chain alone: records cut from its start or end then do not show.
        #[arg(long)]
        no_head: bool,
    },
}

impl AuditCommand {
    /// Run the command.
    #[must_use]
    pub fn run(&self) -> ExitCode {
        match self {
            Self::Verify {
                files,
                head,
                no_head,
            } => {
                let check = match (head, no_head) {
                    (_, true) => HeadCheck::Skip,
                    (Some(head), false) => HeadCheck::At(head.clone()),
                    (None, false) => HeadCheck::Beside,
                };
                let result = audit::verify(files, &check);
                println!("{}", message(&result));
                if result.is_ok_and(|report| report.intact()) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// What `verify` prints: the summary, or `FAILED: <file>:<line>: <what is wrong>`, or one
/// `FAILED: <what is missing>` line per failing finding; then `note: ...` lines.
fn message(result: &Result<VerifyReport, AuditVerifyError>) -> String {
    let verified = match result {
        Ok(verified) => verified,
        Err(error) => return format!("FAILED: {}", report(error)),
    };
    let mut lines = Vec::new();
    if verified.intact() {
        lines.push(summary(verified));
    }
    for finding in &verified.findings {
        let label = if finding.is_failure() {
            "FAILED"
        } else {
            "note"
        };
        lines.push(format!("{label}: {finding}"));
    }
    lines.join("\n")
}

/// `ok: 1234 records (seq 1..1234) in 3 files, chain intact from genesis; both ends match the
/// head /var/lib/enforcer/audit/audit.head`.
fn summary(report: &VerifyReport) -> String {
    let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let files = plural(report.files as u64, "file");
    let ends = match &report.head {
        Some(head) => format!("both ends match the head {}", head.display()),
        None => "the ends were not checked (--no-head): records cut from the start or the end \
                 would not show"
            .to_owned(),
    };
    if report.records == 0 {
        return format!("ok: no records in {files}; {ends}");
    }
    let start = if report.anchored {
        "from genesis".to_owned()
    } else {
        format!("from seq {} (older files rotated away)", report.first_seq)
    };
    format!(
        "ok: {} (seq {}..{}) in {files}, chain intact {start}; {ends}",
        plural(report.records, "record"),
        report.first_seq,
        report.last_seq,
    )
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path, time::Duration};

    use super::*;
    use crate::{
        attest::Sha256Digest,
        audit::{AuditConfig, AuditLog, Entry, Event, Finding, Source, Verdict},
    };

    fn report(records: u64, files: usize, first_seq: u64, anchored: bool) -> VerifyReport {
        VerifyReport {
            records,
            files,
            first_seq,
            last_seq: first_seq + records.saturating_sub(1),
            anchored,
            last_hash: Sha256Digest([7; 32]),
            head: Some(PathBuf::from("/var/lib/enforcer/audit/audit.head")),
            findings: Vec::new(),
        }
    }

    /// A closed log of `count` daemon records in `dir`, with its head.
    fn log(dir: &Path, count: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(
            AuditConfig::new(path.clone(), 1 << 20, 1, 1 << 20),
            "node-a",
        )
        .unwrap();
        for _ in 0..count {
            log.submit(Entry::new(
                Source::Daemon,
                Event::Start,
                Verdict::Info,
                "started",
            ));
        }
        log.close(Duration::from_secs(30));
        path
    }

    fn verify_command(files: Vec<PathBuf>, head: Option<PathBuf>, no_head: bool) -> ExitCode {
        AuditCommand::Verify {
            files,
            head,
            no_head,
        }
        .run()
    }

    #[test]
    fn summary_says_how_much_was_checked_from_where_and_that_both_ends_match_the_head() {
        assert_eq!(
            summary(&report(1234, 3, 1, true)),
            "ok: 1234 records (seq 1..1234) in 3 files, chain intact from genesis; both ends \
             match the head /var/lib/enforcer/audit/audit.head"
        );
        assert_eq!(
            summary(&report(1, 1, 501, false)),
            "ok: 1 record (seq 501..501) in 1 file, chain intact from seq 501 (older files \
             rotated away); both ends match the head /var/lib/enforcer/audit/audit.head"
        );
        let unchecked = VerifyReport {
            head: None,
            ..report(0, 0, 0, true)
        };
        assert_eq!(
            summary(&unchecked),
            "ok: no records in 0 files; the ends were not checked (--no-head): records cut from \
             the start or the end would not show"
        );
    }

    #[test]
    fn findings_are_failed_lines_and_notes_follow_the_summary() {
        let failed = VerifyReport {
            findings: vec![
                Finding::MissingAtStart { from: 1, to: 4 },
                Finding::MissingAtEnd { from: 8, to: 10 },
            ],
            ..report(3, 1, 5, false)
        };
        assert_eq!(
            message(&Ok(failed)),
            "FAILED: records 1..4 are missing from the start of the log (the head says the \
             oldest retained record is seq 1; were all of its files given?)\n\
             FAILED: records 8..10 are missing from the end of the log (the head says the last \
             record is seq 10)"
        );
        let noted = VerifyReport {
            findings: vec![Finding::AfterHead { from: 4, to: 5 }],
            ..report(5, 1, 1, true)
        };
        let text = message(&Ok(noted));
        assert!(text.starts_with("ok: 5 records"), "{text}");
        assert!(
            text.ends_with(
                "\nnote: records 4..5 were written after the head was last updated (a running \
                 daemon updates it after every batch)"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_failure_names_file_line_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = log(dir.path(), 2);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replacen("started", "restarted", 2)).unwrap();
        let verify = |path: &Path| audit::verify(&[path.to_owned()], &HeadCheck::Beside);
        assert_eq!(
            message(&verify(&path)),
            format!(
                "FAILED: {}:1: record seq 1 was edited (hash mismatch)",
                path.display()
            )
        );

        fs::write(&path, "{}\n").unwrap();
        assert!(message(&verify(&path)).starts_with(&format!(
            "FAILED: {}:1: malformed line: it does not end with",
            path.display()
        )));
    }

    #[test]
    fn verify_exits_1_on_a_cut_or_a_missing_head_and_0_when_both_ends_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = log(dir.path(), 3);
        let head = dir.path().join("audit.head");
        assert_eq!(
            message(&audit::verify(
                std::slice::from_ref(&path),
                &HeadCheck::Beside
            )),
            format!(
                "ok: 3 records (seq 1..3) in 1 file, chain intact from genesis; both ends match \
                 the head {}",
                head.display()
            )
        );
        assert_eq!(
            verify_command(vec![path.clone()], None, false),
            ExitCode::SUCCESS
        );

        let text = fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        fs::write(&path, format!("{first}\n")).unwrap();
        assert_eq!(
            message(&audit::verify(
                std::slice::from_ref(&path),
                &HeadCheck::Beside
            )),
            "FAILED: records 2..3 are missing from the end of the log (the head says the last \
             record is seq 3)"
        );
        assert_eq!(
            verify_command(vec![path.clone()], None, false),
            ExitCode::FAILURE
        );
        assert_eq!(
            verify_command(vec![path.clone()], None, true),
            ExitCode::SUCCESS,
            "the chain alone cannot see the cut"
        );

        let moved = dir.path().join("elsewhere.head");
        fs::rename(&head, &moved).unwrap();
        assert_eq!(
            message(&audit::verify(
                std::slice::from_ref(&path),
                &HeadCheck::Beside
            )),
            format!(
                "FAILED: the head {} is missing: the ends of the log cannot be checked",
                head.display()
            )
        );
        assert_eq!(
            verify_command(vec![path.clone()], None, false),
            ExitCode::FAILURE
        );
        assert_eq!(
            verify_command(vec![path.clone()], Some(moved), false),
            ExitCode::FAILURE,
            "the named head still says records 2..3"
        );

        let bad = dir.path().join("audit.jsonl.1");
        fs::write(&bad, "not a record\n").unwrap();
        assert_eq!(
            verify_command(vec![path, bad], None, true),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn an_empty_log_with_its_head_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = log(dir.path(), 0);
        assert_eq!(verify_command(vec![path], None, false), ExitCode::SUCCESS);
    }
}

//! Problems found in a policy file, each located as `file:line:col`.
#![forbid(unsafe_code)]

use std::{fmt, ops::Range};

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The policy is usable, but probably not what was meant.
    Warning,
    /// The policy cannot be used.
    Error,
}

/// One problem, located in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file's name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{}:{}:{}: {severity}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Collects diagnostics for one source text.
#[derive(Debug)]
pub(super) struct Diagnostics<'s> {
    file: String,
    source: &'s str,
    found: Vec<Diagnostic>,
}

impl<'s> Diagnostics<'s> {
    /// A collector for `source`, read from `file`.
    #[must_use]
    pub(super) fn new(file: impl Into<String>, source: &'s str) -> Self {
        Self {
            file: file.into(),
            source,
            found: Vec::new(),
        }
    }

    /// Record an error at byte range `span`.
    pub(super) fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into());
    }

    /// Record a warning at byte range `span`.
    pub(super) fn warning(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, span, message.into());
    }

    fn push(&mut self, severity: Severity, span: &Range<usize>, message: String) {
        let (line, col) = line_col(self.source, span.start);
        self.found.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line,
            col,
            message,
        });
    }

    /// The source text being checked.
    #[must_use]
    pub(super) fn source(&self) -> &'s str {
        self.source
    }

    /// Whether any error (not warning) was recorded.
    #[must_use]
    pub(super) fn has_errors(&self) -> bool {
        self.found.iter().any(|d| d.severity == Severity::Error)
    }

    /// Everything recorded, in source order.
    #[must_use]
    pub(super) fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.found.sort_by_key(|d| (d.line, d.col));
        self.found
    }
}

/// `diagnostics`, one per line.
#[must_use]
pub(crate) fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
#[must_use]
pub(crate) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::{Diagnostics, line_col};

    #[test]
    fn lines_and_columns_are_one_based() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 3));
        assert_eq!(line_col(text, 999), (3, 1));
    }

    #[test]
    fn renders_file_line_col() {
        let mut diagnostics = Diagnostics::new("p.toml", "x\ny = 2\n");
        diagnostics.error(&(2..3), "bad");
        diagnostics.warning(&(0..1), "hmm");
        let rendered: Vec<String> = diagnostics
            .into_sorted()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            rendered,
            ["p.toml:1:1: warning: hmm", "p.toml:2:1: error: bad"]
        );
    }
}

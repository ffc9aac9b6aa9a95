//! Running the `openssl` command line, for interop tests against code nobody here wrote.

use std::{
    path::Path,
    process::{Command, Output},
};

/// `openssl ARGS...` run in `dir`; panics only if it cannot be started.
#[must_use]
pub fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `openssl {}`: {e}", args.join(" ")))
}

/// Standard output then standard error of a finished command, for assertions and messages.
#[must_use]
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `openssl x509 -text` of the certificate in `file` (relative to `dir`), each line trimmed so
/// an extension's header and value can be matched together (`"X509v3 Key Usage: critical\n..."`).
#[must_use]
pub fn x509_text(dir: &Path, file: &str) -> String {
    let out = openssl(dir, &["x509", "-in", file, "-noout", "-text"]);
    assert!(
        out.status.success(),
        "openssl x509 {file}:\n{}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

//! Running external programs: echo the command line, inherit stdio, and fail naming the
//! command and its exit status.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root; xtask lives one directory below it.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// Where `cargo install` puts binaries, by cargo's own rules: `$CARGO_INSTALL_ROOT/bin`,
/// else `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub(crate) fn cargo_bin_dir() -> Option<PathBuf> {
    let root = env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(root.join("bin"))
}

/// A command for `program` that runs in the workspace root with cargo's bin directory on
/// `PATH`, so tools that setup installed (bpf-linker) are found by it and by its children.
pub(crate) fn new(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    let current = env::var_os("PATH").unwrap_or_default();
    if let Some(path) = cargo_bin_dir().and_then(|dir| path_with(&dir, &current)) {
        cmd.env("PATH", path);
    }
    cmd
}

/// The search path `current` with `dir` prepended, or `None` when `dir` is already on it.
fn path_with(dir: &Path, current: &OsStr) -> Option<OsString> {
    if env::split_paths(current).any(|entry| entry == dir) {
        return None;
    }
    // An empty entry would put the current directory on the search path.
    let rest = env::split_paths(current).filter(|entry| !entry.as_os_str().is_empty());
    let entries = std::iter::once(dir.to_path_buf()).chain(rest);
    env::join_paths(entries).ok()
}

/// Prints the command line, runs it with inherited stdio and fails unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Like [`run`], but the child's stdout is copied to `out` line by line and each line is also
/// handed to `on_line` (used to read libtest's summary lines while still showing them).
pub(crate) fn run_tee(
    cmd: &mut Command,
    out: &mut impl Write,
    mut on_line: impl FnMut(&str),
) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("failed to read the output of `{line}`"))?;
        if read == 0 {
            break;
        }
        out.write_all(&buf)
            .and_then(|()| out.flush())
            .with_context(|| format!("failed to pass on the output of `{line}`"))?;
        on_line(String::from_utf8_lossy(&buf).trim_end());
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` without echoing it and returns its stdout; fails with its stderr otherwise.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Runs `cmd` quietly; its stdout if it started and exited 0, `None` otherwise. For checks
/// whose failure only means "not installed".
pub(crate) fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as a shell would accept it: explicit environment (except `PATH`),
/// program, arguments.
fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        (key != "PATH").then(|| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let program = std::iter::once(quote(cmd.get_program()));
    let args = cmd.get_args().map(quote);
    envs.chain(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Single-quotes a word unless it only holds characters no shell treats specially.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_words_that_need_it() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--test", "*", "--version", "^0.13", "it's"])
            .env("LLVM_PREFIX", "/tmp/p")
            .env("PATH", "/bin");
        assert_eq!(
            display(&cmd),
            r"LLVM_PREFIX=/tmp/p cargo test --test '*' --version '^0.13' 'it'\''s'"
        );
    }

    #[test]
    fn display_quotes_empty_and_spaced_arguments() {
        let mut cmd = Command::new("echo");
        cmd.args(["", "a b"]);
        assert_eq!(display(&cmd), "echo '' 'a b'");
    }

    #[test]
    fn path_with_prepends_a_missing_dir_only() {
        let dir = Path::new("/root/.cargo/bin");
        assert_eq!(
            path_with(dir, OsStr::new("/usr/bin:/bin")),
            Some(OsString::from("/root/.cargo/bin:/usr/bin:/bin"))
        );
        assert_eq!(
            path_with(dir, OsStr::new("/usr/bin:/root/.cargo/bin")),
            None
        );
        assert_eq!(
            path_with(dir, OsStr::new("")),
            Some(OsString::from("/root/.cargo/bin"))
        );
    }

    #[test]
    fn run_names_the_command_and_status_on_failure() {
        let err = run(&mut Command::new("false")).unwrap_err().to_string();
        assert_eq!(err, "`false` failed with exit status: 1");
    }

    #[test]
    fn run_names_a_command_that_cannot_start() {
        let err = run(&mut Command::new("/nonexistent/xtask-test"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "failed to start `/nonexistent/xtask-test`");
    }

    #[test]
    fn run_tee_hands_every_line_over() {
        let (mut out, mut lines) = (Vec::new(), Vec::new());
        run_tee(
            Command::new("printf").arg("one\ntwo\n"),
            &mut out,
            |line: &str| lines.push(line.to_owned()),
        )
        .unwrap();
        assert_eq!(out, b"one\ntwo\n");
        assert_eq!(lines, ["one", "two"]);
    }

    #[test]
    fn probe_is_none_for_failures() {
        assert_eq!(probe(&mut Command::new("false")), None);
        assert_eq!(probe(&mut Command::new("/nonexistent/xtask-test")), None);
        assert_eq!(
            probe(Command::new("echo").arg("hi")).as_deref(),
            Some("hi\n")
        );
    }
}

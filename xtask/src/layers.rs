//! `cargo xtask layers`: the enforcer crate's modules depend on each other one way only
//! (`daemon` -> the rest; the tunnel knows only its traits). Every file under a module's directory is read, comments
//! and literals are skipped, and each `crate::` path is followed to the top-level module it
//! names, grouped `use crate::{a::b, kernel::{...}}` trees included. A path that [`RULES`]
//! forbid fails the check with its file and line.
//!
//! Only `crate::` paths are followed: code leaves its own module that way in this crate
//! (`super::` stays inside a module's directory).

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The directory whose files are checked, relative to the workspace root.
const SOURCE_DIR: &str = "enforcer/src";

/// Which top-level modules the files under one module's directory must not name.
struct Rule {
    /// The module whose directory (`enforcer/src/<module>/`) the rule covers.
    module: &'static str,
    /// The modules its files must not name.
    forbidden: &'static [&'static str],
    /// Why, for the failure message.
    why: &'static str,
}

/// The layering of the enforcer crate.
const RULES: &[Rule] = &[
    Rule {
        module: "tunnel",
        forbidden: &["kernel", "attest", "daemon"],
        why: "the tunnel knows the world only through its traits (tunnel/state.rs); \
              the daemon backs them",
    },
    Rule {
        module: "attest",
        forbidden: &["policy"],
        why: "attestation reads process facts; the policy matches them, not the other way",
    },
    Rule {
        module: "audit",
        forbidden: &["tunnel"],
        why: "the audit trail takes entries; the daemon turns flow records into them",
    },
    Rule {
        module: "policy",
        forbidden: &["daemon", "tunnel"],
        why: "the policy is data and decisions; the daemon and the tunnel apply it",
    },
];

/// Checks the enforcer crate's sources against [`RULES`].
pub(crate) fn run() -> Result<()> {
    let root = cmd::workspace_root().join(SOURCE_DIR);
    let mut violations = Vec::new();
    let mut files = 0;
    for rule in RULES {
        for path in rust_files(&root.join(rule.module))? {
            let source = fs::read_to_string(&path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            let shown = path.strip_prefix(cmd::workspace_root()).unwrap_or(&path);
            violations.extend(check(rule, shown, &source));
            files += 1;
        }
    }
    if violations.is_empty() {
        eprintln!("layers: ok ({files} files, {} rules)", RULES.len());
        return Ok(());
    }
    for violation in &violations {
        eprintln!("{violation}");
    }
    bail!(
        "{} import(s) against the module layering (see xtask/src/layers.rs)",
        violations.len()
    )
}

/// One forbidden `crate::` path in a file.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    /// The file, as shown.
    file: PathBuf,
    /// 1-based line of the forbidden module's name.
    line: usize,
    /// The module whose rule is broken.
    module: &'static str,
    /// The module named.
    named: String,
    /// Why the rule exists.
    why: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: `{}` must not import `crate::{}`: {}",
            self.file.display(),
            self.line,
            self.module,
            self.named,
            self.why
        )
    }
}

/// The `.rs` files under `dir`, recursively, in a stable order.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries =
        fs::read_dir(dir).with_context(|| format!("failed to read directory {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("failed to read directory {}", dir.display()))?
            .path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The violations of `rule` in `source`, the text of `file`.
fn check(rule: &Rule, file: &Path, source: &str) -> Vec<Violation> {
    crate_modules(source)
        .into_iter()
        .filter(|(name, _)| rule.forbidden.contains(&name.as_str()))
        .map(|(named, line)| Violation {
            file: file.to_owned(),
            line,
            module: rule.module,
            named,
            why: rule.why,
        })
        .collect()
}

/// A token of Rust source: an identifier, `::`, or one punctuation character, with its line.
#[derive(Debug, PartialEq, Eq)]
struct Token<'a> {
    text: &'a str,
    line: usize,
}

/// The top-level module each `crate::` path in `source` names, with its line: `crate::a::b`
/// names `a`; `crate::{a::b, c::{d, e}}` names `a` and `c`.
fn crate_modules(source: &str) -> Vec<(String, usize)> {
    let tokens = tokens(source);
    let mut modules = Vec::new();
    for (at, token) in tokens.iter().enumerate() {
        let follows_path = at > 0 && tokens[at - 1].text == "::";
        if token.text != "crate" || follows_path {
            continue;
        }
        if tokens.get(at + 1).map(|t| t.text) != Some("::") {
            continue;
        }
        match tokens.get(at + 2) {
            Some(group) if group.text == "{" => modules.extend(group_heads(&tokens[at + 3..])),
            Some(name) if is_identifier(name.text) => {
                modules.push((name.text.to_owned(), name.line));
            }
            _ => {}
        }
    }
    modules
}

/// The first segment of every item of a `{ ... }` use group, given the tokens after its `{`.
fn group_heads(tokens: &[Token<'_>]) -> Vec<(String, usize)> {
    let mut heads = Vec::new();
    let mut depth = 1;
    let mut item_start = true;
    for token in tokens {
        match token.text {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => {
                item_start = true;
                continue;
            }
            name if depth == 1 && item_start && is_identifier(name) && name != "self" => {
                heads.push((name.to_owned(), token.line));
            }
            _ => {}
        }
        item_start = false;
    }
    heads
}

/// Whether `text` is an identifier token.
fn is_identifier(text: &str) -> bool {
    text.starts_with(|c: char| c.is_alphabetic() || c == '_')
}

/// The identifiers and punctuation of `source`; comments, string and character literals and
/// lifetimes are left out.
fn tokens(source: &str) -> Vec<Token<'_>> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut at = 0;
    while at < bytes.len() {
        let rest = &source[at..];
        let skipped = if rest.starts_with("//") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            block_comment(rest)
        } else if let Some(len) = string_literal(rest) {
            len
        } else if rest.starts_with('\'') {
            char_or_lifetime(rest)
        } else if rest.starts_with(|c: char| c.is_alphabetic() || c == '_') {
            let len = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            tokens.push(Token {
                text: &rest[..len],
                line,
            });
            len
        } else if rest.starts_with("::") {
            tokens.push(Token { text: "::", line });
            2
        } else {
            let len = rest.chars().next().map_or(1, char::len_utf8);
            if !rest.starts_with(char::is_whitespace) {
                tokens.push(Token {
                    text: &rest[..len],
                    line,
                });
            }
            len
        };
        line += rest[..skipped].matches('\n').count();
        at += skipped;
    }
    tokens
}

/// The length of the (possibly nested) block comment `text` starts with.
fn block_comment(text: &str) -> usize {
    let mut depth = 0;
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        if rest.starts_with("/*") {
            depth += 1;
            at += 2;
        } else if rest.starts_with("*/") {
            depth -= 1;
            at += 2;
            if depth == 0 {
                return at;
            }
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    text.len()
}

/// The length of the string literal (`"..."`, `b"..."`, `c"..."`, `r#"..."#`, `br"..."`) that
/// `text` starts with, if it starts with one.
fn string_literal(text: &str) -> Option<usize> {
    let prefix = text
        .find(|c: char| c != 'b' && c != 'c' && c != 'r')
        .unwrap_or(text.len());
    let (letters, rest) = text.split_at(prefix);
    if !matches!(letters, "" | "b" | "c" | "r" | "br" | "cr") {
        return None;
    }
    if letters.ends_with('r') {
        let hashes = rest.len() - rest.trim_start_matches('#').len();
        let body = rest[hashes..].strip_prefix('"')?;
        let closing = format!("\"{}", "#".repeat(hashes));
        let end = body
            .find(&closing)
            .map_or(body.len(), |end| end + closing.len());
        return Some(prefix + hashes + 1 + end);
    }
    let body = rest.strip_prefix('"')?;
    let mut escaped = false;
    for (at, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(prefix + 1 + at + 1),
            _ => {}
        }
    }
    Some(text.len())
}

/// The length of the character literal or lifetime `text` starts with (at its `'`).
fn char_or_lifetime(text: &str) -> usize {
    let body = &text[1..];
    if let Some(escape) = body.strip_prefix('\\') {
        let escaped = escape.chars().next().map_or(0, char::len_utf8);
        return escape[escaped..]
            .find('\'')
            .map_or(text.len(), |end| 2 + escaped + end + 1);
    }
    let mut chars = body.char_indices();
    match (chars.next(), chars.next()) {
        (Some(_), Some((end, '\''))) => 1 + end + 1,
        _ => {
            1 + body
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(body.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel_rule() -> &'static Rule {
        &RULES[0]
    }

    fn lines(source: &str) -> Vec<(String, usize)> {
        check(tunnel_rule(), Path::new("tunnel/x.rs"), source)
            .into_iter()
            .map(|violation| (violation.named, violation.line))
            .collect()
    }

    #[test]
    fn a_grouped_use_over_several_lines_is_caught_at_the_module_line() {
        let source = "use std::sync::Arc;\n\
                      use crate::{\n    \
                          identity::SpiffeId,\n    \
                          kernel::{Maps, SocketTags},\n    \
                          tunnel::Tunnel,\n\
                      };\n";
        assert_eq!(lines(source), [("kernel".to_owned(), 4)]);
    }

    #[test]
    fn plain_paths_in_code_and_nested_groups_are_caught() {
        let source = "fn f() { let _ = crate::daemon::sockets::listeners(x); }\n\
                      use {crate::attest::Attestor, std::fmt};\n";
        assert_eq!(
            lines(source),
            [("daemon".to_owned(), 1), ("attest".to_owned(), 2)]
        );
    }

    #[test]
    fn comments_and_literals_do_not_trip_it() {
        let source = "// use crate::kernel::Maps;\n\
                      /* crate::kernel /* nested */ crate::attest */\n\
                      /// See [`crate::daemon`].\n\
                      const A: &str = \"crate::kernel\";\n\
                      const B: &str = r#\"crate::\"attest\"#;\n\
                      const C: char = '\"';\n\
                      const D: char = '\\'';\n\
                      const E: &str = \"crate::kernel\";\n\
                      fn g<'a>(x: &'a str) -> &'a str { x }\n";
        assert_eq!(lines(source), []);
    }

    #[test]
    fn allowed_imports_and_visibility_pass() {
        let source = "use crate::{identity::SpiffeId, policy::Decision, report::report};\n\
                      pub(crate) fn f() {}\n\
                      pub(in crate::tunnel) fn g() {}\n\
                      use super::state::Origins;\n";
        assert_eq!(lines(source), []);
    }

    #[test]
    fn the_message_names_file_line_and_rule() {
        let violations = check(
            tunnel_rule(),
            Path::new("enforcer/src/tunnel/x.rs"),
            "\nuse crate::kernel::Maps;\n",
        );
        assert_eq!(
            violations[0].to_string(),
            format!(
                "enforcer/src/tunnel/x.rs:2: `tunnel` must not import `crate::kernel`: {}",
                tunnel_rule().why
            )
        );
    }

    #[test]
    fn every_other_rule_forbids_what_the_design_says() {
        let named = |module: &str| {
            RULES
                .iter()
                .find(|rule| rule.module == module)
                .map(|rule| rule.forbidden)
        };
        assert_eq!(named("attest"), Some(&["policy"][..]));
        assert_eq!(named("audit"), Some(&["tunnel"][..]));
        assert_eq!(named("policy"), Some(&["daemon", "tunnel"][..]));
    }
}

//! Which apt a kernel comes from: the machine's own, or, for a series only another Debian
//! release carries (5.10 from bullseye), an isolated apt that reads that release from the
//! mirror the machine already uses.
//!
//! The isolated apt lives entirely under its own directory (`target/vm-test/apt-<release>/`):
//! its own sources list, package lists, caches and an empty dpkg status, given to apt as the
//! file `APT_CONFIG` names. `-o Dir::...` options alone would not do: apt reads the machine's
//! `apt.conf.d` before the command line, and its hooks (`APT::Update::Post-Invoke*`, such as a
//! docker image's cache clean-up or appstream's refresh) would run on the machine's state.
//! Pointing `Dir::Etc` at an empty directory keeps them out, so `/etc/apt` and `/var/lib/apt`
//! are only ever read (the sources, for the mirror), never written. The machine's proxy
//! settings in `apt.conf.d` are left out with the rest; apt still honours `http_proxy`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The keyring Debian's releases are signed with (`debian-archive-keyring`; bookworm's holds
/// bullseye's keys too).
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The machine's apt sources, in the order apt reads them.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_PARTS: &str = "/etc/apt/sources.list.d";

/// Where the machine's release codename is read from.
const OS_RELEASE: &str = "/etc/os-release";

/// Series that the machine's Debian release does not carry, and the release that does.
const OTHER_RELEASES: [(&str, &str); 1] = [("5.10", "bullseye")];

/// The apt that `apt-cache` and `apt-get download` run as.
#[derive(Debug)]
pub(super) enum Apt {
    /// The machine's own configuration and package lists.
    Machine,
    /// An isolated configuration for another Debian release.
    Isolated {
        /// The release's codename (`bullseye`).
        release: &'static str,
        /// The file `APT_CONFIG` names.
        config: PathBuf,
    },
}

impl Apt {
    /// The apt for kernel series `version`: an isolated one, set up under `cache` and with
    /// its package lists read once, when another release carries the series; the machine's
    /// otherwise.
    pub(super) fn for_series(version: &str, cache: &Path) -> Result<Self> {
        let Some(release) = other_release(version) else {
            return Ok(Self::Machine);
        };
        let dir = cache.join(format!("apt-{release}"));
        let mirror = machine_mirror()?;
        let config = isolate(&dir, &source_line(&mirror, release))?;
        Ok(Self::Isolated { release, config })
    }

    /// A command running `program` (apt-get, apt-cache) with this apt's configuration.
    pub(super) fn command(&self, program: &str) -> Command {
        let mut command = cmd::new(program);
        if let Self::Isolated { config, .. } = self {
            command.env("APT_CONFIG", config);
        }
        command
    }

    /// How the user makes this apt's package lists current, for error messages.
    pub(super) fn refresh_hint(&self) -> String {
        match self {
            Self::Machine => "run `apt-get update` if the lists are empty".to_owned(),
            Self::Isolated { release, config } => format!(
                "{release}'s lists were read by `APT_CONFIG={} apt-get update`; remove {} to \
                 read them again",
                config.display(),
                config.parent().unwrap_or(config).display()
            ),
        }
    }
}

/// The Debian release that carries `version`, when it is not the machine's own.
fn other_release(version: &str) -> Option<&'static str> {
    OTHER_RELEASES
        .iter()
        .find(|(series, _)| *series == version)
        .map(|(_, release)| *release)
}

/// The one `sources.list` line of the isolated apt: `release`'s main component from `mirror`.
fn source_line(mirror: &str, release: &str) -> String {
    format!("deb [arch=amd64 signed-by={ARCHIVE_KEYRING}] {mirror} {release} main\n")
}

/// Lays out the isolated apt in `dir` with `sources` as its only source, reads the package
/// lists unless an earlier run read them for the same source, and returns its config file.
fn isolate(dir: &Path, sources: &str) -> Result<PathBuf> {
    let etc = dir.join("etc");
    let state = dir.join("state");
    let cache = dir.join("cache");
    // Empty directories where apt looks for configuration parts, so it reads none of the
    // machine's (and does not warn about missing ones).
    for sub in [
        etc.join("apt.conf.d"),
        etc.join("auth.conf.d"),
        etc.join("preferences.d"),
        etc.join("sources.list.d"),
        etc.join("trusted.gpg.d"),
        state.join("lists/partial"),
        cache.join("archives/partial"),
    ] {
        fs::create_dir_all(&sub).with_context(|| format!("failed to create {}", sub.display()))?;
    }
    let status = state.join("status");
    if !status.exists() {
        fs::write(&status, "").with_context(|| format!("failed to write {}", status.display()))?;
    }
    let config = dir.join("apt.conf");
    let text = format!(
        "// The isolated apt of cargo xtask vm-test; nothing here reads the machine's apt.conf.d.\n\
         Dir::Etc \"{etc}/\";\n\
         Dir::State \"{state}/\";\n\
         Dir::State::status \"{status}\";\n\
         Dir::Cache \"{cache}/\";\n\
         Acquire::Languages \"none\";\n",
        etc = etc.display(),
        state = state.display(),
        status = status.display(),
        cache = cache.display(),
    );
    fs::write(&config, text).with_context(|| format!("failed to write {}", config.display()))?;

    let list = etc.join("sources.list");
    let unchanged = fs::read_to_string(&list).is_ok_and(|old| old == sources);
    if unchanged && has_package_lists(&state.join("lists"))? {
        return Ok(config);
    }
    fs::write(&list, sources).with_context(|| format!("failed to write {}", list.display()))?;
    cmd::run(cmd::new("apt-get").arg("update").env("APT_CONFIG", &config)).with_context(|| {
        format!(
            "failed to read the package lists of `{}` (with APT_CONFIG={})",
            sources.trim(),
            config.display()
        )
    })?;
    Ok(config)
}

/// Whether `lists` holds a `Packages` index from an earlier `apt-get update`.
fn has_package_lists(lists: &Path) -> Result<bool> {
    for entry in
        fs::read_dir(lists).with_context(|| format!("failed to list {}", lists.display()))?
    {
        if entry?.file_name().to_string_lossy().contains("_Packages") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The Debian mirror the machine's own apt sources use for its release.
fn machine_mirror() -> Result<String> {
    let os_release =
        fs::read_to_string(OS_RELEASE).with_context(|| format!("failed to read {OS_RELEASE}"))?;
    let codename = os_codename(&os_release)
        .with_context(|| format!("{OS_RELEASE} names no VERSION_CODENAME"))?;
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string(SOURCES_LIST) {
        sources.extend(one_line_sources(&text));
    }
    if let Ok(entries) = fs::read_dir(SOURCES_PARTS) {
        let mut paths: Vec<PathBuf> = entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("failed to list {SOURCES_PARTS}"))?;
        paths.sort();
        for path in paths {
            let parse = match path.extension().and_then(|ext| ext.to_str()) {
                Some("list") => one_line_sources,
                Some("sources") => deb822_sources,
                _ => continue,
            };
            let text = fs::read_to_string(&path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            sources.extend(parse(&text));
        }
    }
    let Some(mirror) = archive_mirror(&sources, codename) else {
        bail!(
            "no apt source of this machine offers `deb <mirror> {codename} main` \
             ({SOURCES_LIST}, {SOURCES_PARTS}/*.list, *.sources); vm-test takes the Debian \
             mirror for other releases from there"
        );
    };
    Ok(mirror.to_owned())
}

/// `VERSION_CODENAME` from the text of `/etc/os-release` (`bookworm`).
fn os_codename(os_release: &str) -> Option<&str> {
    os_release.lines().find_map(|line| {
        let value = line.strip_prefix("VERSION_CODENAME=")?.trim();
        let value = value.trim_matches(['"', '\'']);
        (!value.is_empty()).then_some(value)
    })
}

/// One apt source, from either format.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    types: Vec<String>,
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    enabled: bool,
}

/// The first mirror that serves the `deb` packages of `codename`'s main component: the
/// machine's Debian archive (a third-party repository seldom names a Debian codename with a
/// `main` component; one that does is caught by apt, since the isolated source trusts only
/// Debian's archive key).
fn archive_mirror<'a>(sources: &'a [Source], codename: &str) -> Option<&'a str> {
    let has = |values: &[String], wanted: &str| values.iter().any(|value| value == wanted);
    sources
        .iter()
        .find(|source| {
            source.enabled
                && has(&source.types, "deb")
                && has(&source.suites, codename)
                && has(&source.components, "main")
        })
        .and_then(|source| source.uris.first())
        .map(|uri| uri.trim_end_matches('/'))
}

/// The sources of a one-line-style list (`deb [options] uri suite component...`).
fn one_line_sources(text: &str) -> Vec<Source> {
    text.lines()
        .filter_map(|line| {
            let line = line
                .split_once('#')
                .map_or(line, |(before, _)| before)
                .trim();
            let (kind, rest) = line.split_once(char::is_whitespace)?;
            let rest = rest.trim_start();
            // Options are bracketed and may hold spaces: `[ arch=amd64 signed-by=... ]`.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace().map(str::to_owned);
            Some(Source {
                types: vec![kind.to_owned()],
                uris: vec![words.next()?],
                suites: vec![words.next()?],
                components: words.collect(),
                enabled: true,
            })
        })
        .collect()
}

/// The sources of a deb822-style file: stanzas of `Field: value` lines separated by blank
/// lines, with `#` comments and indented continuation lines (an inline `Signed-By` key).
fn deb822_sources(text: &str) -> Vec<Source> {
    let mut sources = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain([""]) {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !stanza.is_empty() {
                sources.push(deb822_source(&stanza));
                stanza.clear();
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((field, value)) = line.split_once(':') {
            stanza.push((field.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    sources
}

/// One deb822 stanza as a [`Source`].
fn deb822_source(stanza: &[(String, String)]) -> Source {
    let words = |field: &str| -> Vec<String> {
        stanza
            .iter()
            .filter(|(name, _)| name == field)
            .flat_map(|(_, value)| value.split_whitespace().map(str::to_owned))
            .collect()
    };
    Source {
        types: words("types"),
        uris: words("uris"),
        suites: words("suites"),
        components: words("components"),
        enabled: !words("enabled").iter().any(|value| value == "no"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's `/etc/apt/sources.list.d/debian.sources`.
    const DEBIAN_SOURCES: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn the_mirror_of_the_machines_release_is_found_in_deb822() {
        let sources = deb822_sources(DEBIAN_SOURCES);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            archive_mirror(&sources, "bookworm"),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(archive_mirror(&sources, "trixie"), None);
    }

    #[test]
    fn disabled_third_party_and_source_stanzas_are_skipped() {
        let text = "\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: https://download.docker.com/linux/debian
Suites: bookworm
Components: stable

types: deb deb-src
uris: http://ftp.de.debian.org/debian/
suites: bookworm
components: main contrib
signed-by:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL0BUBEADmW5NlOVsZ
 -----END PGP PUBLIC KEY BLOCK-----
";
        let sources = deb822_sources(text);
        assert_eq!(sources.len(), 5);
        assert_eq!(
            archive_mirror(&sources, "bookworm"),
            Some("http://ftp.de.debian.org/debian")
        );
    }

    #[test]
    fn one_line_sources_with_options_and_comments() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb [ arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] http://mirror.example/debian/ bookworm main non-free-firmware # the archive
deb http://security.debian.org/debian-security bookworm-security main
";
        let sources = one_line_sources(text);
        assert_eq!(sources.len(), 3);
        assert_eq!(
            sources[1],
            Source {
                types: vec!["deb".to_owned()],
                uris: vec!["http://mirror.example/debian/".to_owned()],
                suites: vec!["bookworm".to_owned()],
                components: vec!["main".to_owned(), "non-free-firmware".to_owned()],
                enabled: true,
            }
        );
        assert_eq!(
            archive_mirror(&sources, "bookworm"),
            Some("http://mirror.example/debian")
        );
        assert_eq!(one_line_sources("deb [broken http://x bookworm main\n"), []);
    }

    #[test]
    fn codename_comes_from_os_release() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\n\
                    VERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(os_codename(text), Some("bookworm"));
        assert_eq!(os_codename("VERSION_CODENAME=\"trixie\"\n"), Some("trixie"));
        assert_eq!(os_codename("ID=debian\nVERSION_CODENAME=\n"), None);
    }

    #[test]
    fn only_series_another_release_carries_use_an_isolated_apt() {
        assert_eq!(other_release("5.10"), Some("bullseye"));
        assert_eq!(other_release("6.1"), None);
        assert_eq!(other_release("5.1"), None);
    }

    #[test]
    fn the_isolated_source_is_bullseye_main_from_the_machines_mirror() {
        assert_eq!(
            source_line("http://deb.debian.org/debian", "bullseye"),
            "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian bullseye main\n"
        );
    }
}

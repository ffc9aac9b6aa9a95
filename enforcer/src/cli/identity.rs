//! `enforcer ca ...`, `enforcer svid ...` and `enforcer bundle ...`: an operator's PKI on disk.
//!
//! `ca init` makes the trust domain's root and its JWT-SVID signing key, `ca issue-node` a
//! node intermediate below the root (and the bundle beside it), `svid issue` a workload SVID
//! from that node CA, and `bundle show` prints a bundle as PEM or SPIFFE bundle JSON. The files
//! are the ones the daemon's state directory holds (`root.pem`, `jwt.key`, `node.pem`,
//! `bundle.pem`, ...), so a directory made here can be handed to the daemon as is.

use std::{
    fs,
    num::{IntErrorKind, ParseIntError},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Subcommand, ValueEnum};
use x509_parser::time::ASN1Time;

use crate::identity::{
    BUNDLE_PEM, CaKind, CertificateAuthority, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_ROOT_VALIDITY,
    DEFAULT_SVID_TTL, JWT_KEY_FILE, JwtAuthority, NODE_FILE_STEM, PeerRole, ROOT_FILE_STEM,
    SpiffeId, TrustBundle, TrustBundleSet, TrustDomain, read_file, verify_svid_chain,
    write_private, write_public,
};

/// File name of an issued SVID's chain (leaf, then the node intermediate).
const SVID_PEM: &str = "svid.pem";
/// File name of an issued SVID's private key.
const SVID_KEY: &str = "key.pem";
/// Longest node name: the subject common name upper bound of RFC 5280 (`ub-common-name`).
const MAX_NODE_NAME_LEN: usize = 64;

/// `enforcer ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a self-signed root CA for a trust domain, DIR/root.pem and DIR/root.key (0600),
    /// and its JWT-SVID signing key DIR/jwt.key (0600; an existing one is kept).
    Init {
        /// The trust domain, e.g. `example.org`.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Where to write the root and JWT key; created (0700) if missing. An existing root is
        /// refused, an existing jwt.key kept.
        #[arg(long)]
        dir: PathBuf,
        /// Validity, e.g. `365d`, `12h` (units s, m, h, d) [default: 365d].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Issue a node intermediate CA from the root in CA/: OUT/node.pem, OUT/node.key (0600)
    /// and OUT/bundle.pem (the root).
    IssueNode {
        /// Directory holding root.pem and root.key (made by `ca init` or by your own PKI).
        #[arg(long)]
        ca: PathBuf,
        /// Node name, written into the subject common name.
        #[arg(long)]
        node: String,
        /// Where to write the node CA and bundle; created (0700) if missing.
        #[arg(long)]
        out: PathBuf,
        /// Validity, never beyond the root's [default: 30d].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

/// `enforcer svid ...`.
#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Issue an X.509-SVID from the node CA in CA/: DIR/svid.pem (leaf, then intermediate),
    /// DIR/key.pem (0600) and DIR/bundle.pem (the root).
    Issue {
        /// Directory holding node.pem, node.key and bundle.pem (made by `ca issue-node`).
        #[arg(long)]
        ca: PathBuf,
        /// The workload's SPIFFE ID, e.g. `spiffe://example.org/ns/prod/web`.
        #[arg(long)]
        id: SpiffeId,
        /// Where to write the SVID; created (0700) if missing.
        #[arg(long)]
        out: PathBuf,
        /// Validity, never beyond the node CA's [default: 1h].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Show the current SVID the running daemon holds for a local workload identity.
    Show {
        /// The workload's SPIFFE ID.
        id: SpiffeId,
    },
}

/// `enforcer bundle ...`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print a trust bundle read from a PEM file or a directory's bundle.pem.
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// A PEM file of CA certificates, or a directory holding bundle.pem.
        #[arg(long)]
        bundle: PathBuf,
    },
}

/// How `bundle show` prints a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// Concatenated PEM certificates.
    Pem,
    /// SPIFFE bundle JSON (a JWK set); several trust domains give an object keyed by domain.
    Spiffe,
}

impl CaCommand {
    /// Run the command.
    pub fn run(&self) -> anyhow::Result<()> {
        match self {
            Self::Init {
                trust_domain,
                dir,
                ttl,
            } => ca_init(trust_domain, dir, ttl.unwrap_or(DEFAULT_ROOT_VALIDITY)),
            Self::IssueNode { ca, node, out, ttl } => {
                issue_node(ca, node, out, ttl.unwrap_or(DEFAULT_INTERMEDIATE_VALIDITY))
            }
        }
    }
}

impl SvidCommand {
    /// Run the command; `show` asks the daemon on `socket`.
    pub fn run(&self, socket: &Path) -> anyhow::Result<ExitCode> {
        match self {
            Self::Issue { ca, id, out, ttl } => {
                issue_svid(ca, id, out, ttl.unwrap_or(DEFAULT_SVID_TTL)).map(|()| ExitCode::SUCCESS)
            }
            Self::Show { id } => super::control::svid_show(socket, id),
        }
    }
}

impl BundleCommand {
    /// Run the command.
    pub fn run(&self) -> anyhow::Result<()> {
        match self {
            Self::Show { format, bundle } => show_bundle(*format, bundle),
        }
    }
}

/// Creates the root CA and, unless DIR/jwt.key exists (then it is checked and kept), the JWT
/// signing key. Refuses to replace a root; writes the root last, so a bad jwt.key stops the
/// command before any root is written.
fn ca_init(trust_domain: &TrustDomain, dir: &Path, ttl: Duration) -> anyhow::Result<()> {
    for stem in ["pem", "key"] {
        let path = dir.join(format!("{ROOT_FILE_STEM}.{stem}"));
        ensure!(
            !path.exists(),
            "{} already exists; refusing to replace an existing root CA",
            path.display()
        );
    }
    let root = CertificateAuthority::new_root(trust_domain, ttl, SystemTime::now())
        .context("failed to create the root CA")?;
    create_dir(dir)?;
    let jwt_key = dir.join(JWT_KEY_FILE);
    let (jwt, created) = JwtAuthority::load_or_create(dir, trust_domain)
        .context("failed to load or create the JWT-SVID signing key")?;
    root.write(dir, ROOT_FILE_STEM)?;
    println!(
        "wrote {} and {}.key: root CA {}, valid until {}",
        dir.join(format!("{ROOT_FILE_STEM}.pem")).display(),
        ROOT_FILE_STEM,
        trust_domain.id(),
        display_time(root.not_after())
    );
    let action = if created { "wrote" } else { "kept existing" };
    println!(
        "{action} {}: JWT-SVID signing key for {}, kid {}",
        jwt_key.display(),
        trust_domain.id(),
        jwt.kid()
    );
    Ok(())
}

fn issue_node(ca_dir: &Path, node: &str, out: &Path, ttl: Duration) -> anyhow::Result<()> {
    check_node_name(node)?;
    let root_pem = ca_dir.join(format!("{ROOT_FILE_STEM}.pem"));
    let root = CertificateAuthority::load(ca_dir, ROOT_FILE_STEM)
        .with_context(|| format!("failed to load the root CA from {}", ca_dir.display()))?;
    ensure!(
        root.kind() == CaKind::Root,
        "{}: not a self-signed root CA; `ca issue-node` signs with the trust domain's root",
        root_pem.display()
    );
    let intermediate = root
        .issue_intermediate(node, ttl, SystemTime::now())
        .with_context(|| format!("failed to issue a node CA with {}", root_pem.display()))?;
    let bundle = TrustBundle::new(
        root.trust_domain().clone(),
        vec![root.certificate().clone()],
    )
    .with_context(|| format!("{}: unusable as a trust bundle", root_pem.display()))?;
    create_dir(out)?;
    intermediate.write(out, NODE_FILE_STEM)?;
    write_public(&out.join(BUNDLE_PEM), &bundle.to_pem())?;
    println!(
        "wrote {}, {}.key and {BUNDLE_PEM}: node CA `{node}` for {}, valid until {}",
        out.join(format!("{NODE_FILE_STEM}.pem")).display(),
        NODE_FILE_STEM,
        root.trust_domain().id(),
        display_time(intermediate.not_after())
    );
    Ok(())
}

fn issue_svid(ca_dir: &Path, id: &SpiffeId, out: &Path, ttl: Duration) -> anyhow::Result<()> {
    let node_pem = ca_dir.join(format!("{NODE_FILE_STEM}.pem"));
    let node = CertificateAuthority::load(ca_dir, NODE_FILE_STEM)
        .with_context(|| format!("failed to load the node CA from {}", ca_dir.display()))?;
    let bundle_path = ca_dir.join(BUNDLE_PEM);
    let bundle = TrustBundle::from_pem(
        node.trust_domain().clone(),
        &read_file(&bundle_path)?,
        &bundle_path.display().to_string(),
    )?;
    let now = SystemTime::now();
    let svid = node
        .issue_svid(id, ttl, now)
        .with_context(|| format!("failed to issue an SVID with {}", node_pem.display()))?;
    let mut bundles = TrustBundleSet::new();
    bundles.insert(bundle.clone());
    verify_svid_chain(&bundles, svid.chain(), now, PeerRole::Client).with_context(|| {
        format!(
            "{} does not chain to {}",
            node_pem.display(),
            bundle_path.display()
        )
    })?;
    create_dir(out)?;
    write_private(&out.join(SVID_KEY), &svid.key_pem())?;
    write_public(&out.join(SVID_PEM), &svid.chain_pem())?;
    write_public(&out.join(BUNDLE_PEM), &bundle.to_pem())?;
    println!(
        "wrote {}, {SVID_KEY} and {BUNDLE_PEM}: SVID {id}, valid until {}",
        out.join(SVID_PEM).display(),
        display_time(svid.not_after())
    );
    Ok(())
}

fn show_bundle(format: BundleFormat, path: &Path) -> anyhow::Result<()> {
    let file = if path.is_dir() {
        path.join(BUNDLE_PEM)
    } else {
        path.to_owned()
    };
    let set = TrustBundleSet::from_pem(&read_file(&file)?, &file.display().to_string())?;
    let text = match (format, set.iter().collect::<Vec<_>>().as_slice()) {
        (BundleFormat::Pem, _) => set.to_pem(),
        (BundleFormat::Spiffe, [one]) => one.to_json()? + "\n",
        (BundleFormat::Spiffe, _) => set.to_json()? + "\n",
    };
    print!("{text}");
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
fn create_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create directory {}", dir.display()))
}

/// Node names go into the subject common name: 1 to 64 printable characters.
fn check_node_name(node: &str) -> anyhow::Result<()> {
    if node.is_empty() || node.chars().count() > MAX_NODE_NAME_LEN {
        bail!("invalid node name `{node}`: must be 1 to {MAX_NODE_NAME_LEN} characters");
    }
    if node.chars().any(char::is_control) {
        bail!("invalid node name {node:?}: control characters are not allowed");
    }
    Ok(())
}

/// A validity end as X.509 prints it, e.g. `Jan  2 03:04:05 2027 +00:00`.
fn display_time(time: SystemTime) -> String {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .and_then(|secs| ASN1Time::from_timestamp(secs).ok())
        .map_or_else(|| format!("{time:?}"), |t| t.to_string())
}

/// Parses a duration such as `90s`, `30m`, `1h` or `365d`: a positive whole number and one
/// unit (s, m, h, d).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit; use s, m, h or d, e.g. `30m`"))?;
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`; use s, m, h or d")),
    };
    let count: u64 = number.parse().map_err(|e: ParseIntError| match e.kind() {
        IntErrorKind::PosOverflow => format!("`{text}` is too long"),
        _ => format!("`{text}`: expected a whole number before the unit"),
    })?;
    if count == 0 {
        return Err(format!("`{text}`: must be greater than zero"));
    }
    count
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_one_unit() {
        for (text, secs) in [
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("365d", 365 * 86400),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for (text, expected) in [
            ("", "no unit"),
            ("10", "no unit"),
            ("h", "whole number"),
            ("-1h", "unknown unit"),
            ("1.5h", "unknown unit"),
            ("1w", "unknown unit"),
            ("1h30m", "unknown unit"),
            ("1 h", "unknown unit"),
            ("0s", "greater than zero"),
            ("99999999999999999999s", "too long"),
            ("999999999999999999d", "too long"),
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn node_names_are_checked() {
        assert!(check_node_name("node-1").is_ok());
        assert!(check_node_name("").is_err());
        assert!(check_node_name(&"n".repeat(65)).is_err());
        assert!(check_node_name("a\nb").is_err());
    }
}

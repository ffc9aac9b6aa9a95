//! PEM reading and writing for certificates and PKCS#8 keys, and file writes with the right
//! permissions (private keys 0600, public material 0644).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use rustls_pki_types::{
    CertificateDer, PrivatePkcs8KeyDer,
    pem::{self, PemObject as _, SectionKind},
};

/// Why PEM input could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// A PEM section is malformed (bad base64, missing END line, ...).
    #[error("{what}: malformed PEM in section {section}")]
    Malformed {
        /// What was being read, e.g. `root certificate`.
        what: String,
        /// 1-based number of the section (BEGIN/END block) that failed.
        section: usize,
        /// The parser's description.
        #[source]
        source: pem::Error,
    },
    /// No `CERTIFICATE` section was found.
    #[error("{what}: no CERTIFICATE section in the PEM input")]
    NoCertificate {
        /// What was being read.
        what: String,
    },
    /// No `PRIVATE KEY` (PKCS#8) section was found.
    #[error("{what}: no PKCS#8 `PRIVATE KEY` section in the PEM input")]
    NoPrivateKey {
        /// What was being read.
        what: String,
    },
    /// More than one private key was found where exactly one is expected.
    #[error("{what}: more than one private key in the PEM input")]
    SeveralPrivateKeys {
        /// What was being read.
        what: String,
    },
    /// Reading or writing a file failed.
    #[error("failed to {action} {}", path.display())]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The PEM sections of `input`, each malformed one reported with its 1-based position.
fn sections<'a>(
    input: &'a str,
    what: &'a str,
) -> impl Iterator<Item = Result<(SectionKind, Vec<u8>), PemError>> + 'a {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(input.as_bytes())
        .enumerate()
        .map(move |(index, item)| {
            item.map_err(|source| PemError::Malformed {
                what: what.to_owned(),
                section: index + 1,
                source,
            })
        })
}

/// Reads every `CERTIFICATE` section of `input`, in order; other sections are skipped.
pub fn parse_certificates(
    input: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut certs = Vec::new();
    for item in sections(input, what) {
        let (kind, der) = item?;
        if kind == SectionKind::Certificate {
            certs.push(CertificateDer::from(der));
        }
    }
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the single PKCS#8 `PRIVATE KEY` section of `input`.
pub fn parse_private_key(input: &str, what: &str) -> Result<PrivatePkcs8KeyDer<'static>, PemError> {
    let mut key = None;
    for item in sections(input, what) {
        let (kind, der) = item?;
        if kind == SectionKind::PrivateKey {
            if key.is_some() {
                return Err(PemError::SeveralPrivateKeys {
                    what: what.to_owned(),
                });
            }
            key = Some(PrivatePkcs8KeyDer::from(der));
        }
    }
    key.ok_or_else(|| PemError::NoPrivateKey {
        what: what.to_owned(),
    })
}

/// Encodes DER bytes as one PEM section with the given label (64-column base64 lines).
#[must_use]
pub(super) fn encode(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Encodes certificates as concatenated `CERTIFICATE` sections, in order.
#[must_use]
pub fn encode_certificates(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| encode("CERTIFICATE", c)).collect()
}

/// Encodes a PKCS#8 key as a `PRIVATE KEY` section.
#[must_use]
pub fn encode_private_key(key: &PrivatePkcs8KeyDer<'_>) -> String {
    encode("PRIVATE KEY", key.secret_pkcs8_der())
}

/// Reads a whole file as text, naming the file on error.
pub(crate) fn read_file(path: &Path) -> Result<String, PemError> {
    fs::read_to_string(path).map_err(|source| PemError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key file: mode 0600 from creation, replacing any old file atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PemError> {
    write_atomically(path, contents, 0o600)
}

/// Writes public material (certificates, bundles) with mode 0644, atomically.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PemError> {
    write_atomically(path, contents, 0o644)
}

/// Writes `contents` to a temporary file created with `mode` next to `path`, then renames it.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), PemError> {
    let io_err = |source| PemError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A stale temporary file may have other permissions; start from nothing.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    // The umask may have cleared bits of `mode`; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_round_trip_and_errors_name_the_section() {
        let certs = [
            CertificateDer::from(vec![1u8; 100]),
            CertificateDer::from(vec![2u8; 3]),
        ];
        let text = encode_certificates(&certs);
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(parse_certificates(&text, "test").expect("parses"), certs);

        let broken =
            format!("{text}-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let err = parse_certificates(&broken, "bundle.pem").expect_err("bad base64");
        assert!(
            matches!(err, PemError::Malformed { section: 3, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("bundle.pem: malformed PEM in section 3")
        );

        let err = parse_certificates("no pem here", "x").expect_err("empty");
        assert!(matches!(err, PemError::NoCertificate { .. }), "{err:?}");
    }

    #[test]
    fn private_keys_need_exactly_one_pkcs8_section() {
        let key = PrivatePkcs8KeyDer::from(vec![7u8; 40]);
        let text = encode_private_key(&key);
        assert_eq!(
            parse_private_key(&text, "k")
                .expect("parses")
                .secret_pkcs8_der(),
            key.secret_pkcs8_der()
        );
        let err = parse_private_key(&format!("{text}{text}"), "k").expect_err("two keys");
        assert!(
            matches!(err, PemError::SeveralPrivateKeys { .. }),
            "{err:?}"
        );
        let err = parse_private_key(&encode("EC PRIVATE KEY", &[1]), "k").expect_err("sec1");
        assert!(matches!(err, PemError::NoPrivateKey { .. }), "{err:?}");
    }

    #[test]
    fn private_files_are_0600_and_public_files_0644() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("x.key");
        let cert = dir.path().join("x.pem");
        // An existing world-readable file must not keep its mode.
        fs::write(&key, "old").expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o666)).expect("chmod");
        write_private(&key, "secret").expect("write key");
        write_public(&cert, "public").expect("write cert");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(fs::read_to_string(&key).expect("read"), "secret");
        let err = write_public(&dir.path().join("missing/dir/x.pem"), "x").expect_err("no dir");
        assert!(err.to_string().contains("missing/dir/x.pem"), "{err}");
    }
}

//! The CA files in the daemon's state directory, and the start-up rule that uses them:
//! load what the operator provided, create what is missing (the single-node embedded
//! default), and renew the node intermediate once half its life has passed.
//!
//! Files: `root.pem` (root certificate, also the trust bundle), `root.key` (absent when the
//! root key stays offline), `node.pem` + `node.key` (this node's intermediate), and the
//! published bundle as `bundle.pem` and `bundle.json` (SPIFFE bundle format).

use std::{
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{
    bundle::{BundleError, TrustBundle},
    ca::{
        CaError, CertificateAuthority, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_ROOT_VALIDITY,
        NODE_FILE_STEM, ROOT_FILE_STEM,
    },
    pem::{self, PemError},
    spiffe_id::TrustDomain,
};

/// File name of the published PEM bundle.
pub(crate) const BUNDLE_PEM: &str = "bundle.pem";
/// File name of the published SPIFFE bundle JSON.
pub(super) const BUNDLE_JSON: &str = "bundle.json";

/// Why the state directory's PKI could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating the state directory failed.
    #[error("failed to create state directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A CA could not be loaded, created or written.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The bundle could not be built or written.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Writing a published file failed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// A CA in the directory belongs to another trust domain than the configured one.
    #[error("{}: CA is for trust domain `{found}`, configuration says `{expected}`", path.display())]
    TrustDomainMismatch {
        /// The CA certificate file.
        path: PathBuf,
        /// Its trust domain.
        found: TrustDomain,
        /// The configured trust domain.
        expected: TrustDomain,
    },
    /// `root.pem` is missing while other CA files exist, so nothing can be trusted.
    #[error("{}: missing; it is the trust bundle of this node", path.display())]
    MissingRoot {
        /// The expected root certificate file.
        path: PathBuf,
    },
    /// The node CA must be (re)issued but the root key is not in the directory.
    #[error("{}: node CA is missing or due for renewal, and root.key is not available to sign it", dir.display())]
    NeedRootKey {
        /// The state directory.
        dir: PathBuf,
    },
}

/// What a node needs to issue SVIDs and verify peers of its own trust domain.
#[derive(Debug)]
pub(crate) struct NodePki {
    /// The node's intermediate CA, which signs workload SVIDs.
    pub node: CertificateAuthority,
    /// The trust domain's bundle (the root certificate).
    pub bundle: TrustBundle,
}

/// Loads the node PKI from `dir`, creating the root and/or node CA that are missing, and
/// renewing the node CA once half its validity has passed (when the root key is present).
/// Writes `bundle.pem` and `bundle.json` on every call.
pub(crate) fn load_or_init(
    dir: &Path,
    trust_domain: &TrustDomain,
    node_name: &str,
    now: SystemTime,
) -> Result<NodePki, StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    let file = |name: &str| dir.join(name);
    let root_pem = file(&format!("{ROOT_FILE_STEM}.pem"));
    let root_key = file(&format!("{ROOT_FILE_STEM}.key"));
    let node_files = [
        file(&format!("{NODE_FILE_STEM}.pem")),
        file(&format!("{NODE_FILE_STEM}.key")),
    ];
    let have_node = node_files.iter().all(|p| p.exists());

    let root = if root_pem.exists() {
        if root_key.exists() {
            let root = CertificateAuthority::load(dir, ROOT_FILE_STEM)?;
            check_domain(&root, &root_pem, trust_domain)?;
            Some(root)
        } else {
            None
        }
    } else if have_node || root_key.exists() {
        return Err(StoreError::MissingRoot { path: root_pem });
    } else {
        let root = CertificateAuthority::new_root(trust_domain, DEFAULT_ROOT_VALIDITY, now)?;
        root.write(dir, ROOT_FILE_STEM)?;
        Some(root)
    };

    let existing = if have_node {
        let node = CertificateAuthority::load(dir, NODE_FILE_STEM)?;
        check_domain(&node, &node_files[0], trust_domain)?;
        Some(node)
    } else {
        None
    };
    let node = match (existing, &root) {
        (Some(node), _) if !due_for_renewal(&node, now) => node,
        (_, Some(root)) => {
            let node = root.issue_intermediate(node_name, DEFAULT_INTERMEDIATE_VALIDITY, now)?;
            node.write(dir, NODE_FILE_STEM)?;
            node
        }
        // Past half-life but still valid: keep serving; the operator must renew it.
        (Some(node), None) if now < node.not_after() => node,
        (_, None) => {
            return Err(StoreError::NeedRootKey {
                dir: dir.to_owned(),
            });
        }
    };

    let bundle = TrustBundle::from_pem(
        trust_domain.clone(),
        &pem::read_file(&root_pem)?,
        &root_pem.display().to_string(),
    )?;
    pem::write_public(&file(BUNDLE_PEM), &bundle.to_pem())?;
    pem::write_public(&file(BUNDLE_JSON), &bundle.to_json()?)?;
    Ok(NodePki { node, bundle })
}

/// Whether the node CA has used up half of its validity (or is not valid at `now`).
fn due_for_renewal(node: &CertificateAuthority, now: SystemTime) -> bool {
    let lifetime = node
        .not_after()
        .duration_since(node.not_before())
        .unwrap_or_default();
    now < node.not_before() || now >= node.not_before() + lifetime / 2
}

/// Checks that a loaded CA belongs to the configured trust domain.
fn check_domain(
    ca: &CertificateAuthority,
    path: &Path,
    expected: &TrustDomain,
) -> Result<(), StoreError> {
    if ca.trust_domain() == expected {
        Ok(())
    } else {
        Err(StoreError::TrustDomainMismatch {
            path: path.to_owned(),
            found: ca.trust_domain().clone(),
            expected: expected.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt as _, time::Duration};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        name.parse().expect("td")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn creates_a_root_and_node_ca_once_and_reuses_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let now = SystemTime::now();
        let first = load_or_init(&state, &td("example.org"), "n1", now).expect("init");
        assert_eq!(mode(&state), 0o700);
        for (name, expected) in [
            ("root.key", 0o600),
            ("node.key", 0o600),
            ("root.pem", 0o644),
            ("node.pem", 0o644),
            ("bundle.pem", 0o644),
            ("bundle.json", 0o644),
        ] {
            assert_eq!(mode(&state.join(name)), expected, "{name}");
        }
        let again = load_or_init(&state, &td("example.org"), "n1", now).expect("reload");
        assert_eq!(again.node.certificate(), first.node.certificate());
        assert_eq!(again.bundle, first.bundle);

        let err = load_or_init(&state, &td("other.org"), "n1", now).expect_err("wrong domain");
        assert!(
            matches!(err, StoreError::TrustDomainMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn renews_the_node_ca_at_half_life_when_the_root_key_is_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let first = load_or_init(dir.path(), &td("example.org"), "n1", now).expect("init");
        let later = now + DEFAULT_INTERMEDIATE_VALIDITY / 2 + Duration::from_mins(2);
        let renewed = load_or_init(dir.path(), &td("example.org"), "n1", later).expect("renew");
        assert_ne!(renewed.node.certificate(), first.node.certificate());

        // With the root key offline, a node CA past half-life is kept until it expires.
        fs::remove_file(dir.path().join("root.key")).expect("rm root.key");
        let much_later = later + DEFAULT_INTERMEDIATE_VALIDITY / 2 + Duration::from_mins(2);
        let kept = load_or_init(dir.path(), &td("example.org"), "n1", much_later).expect("kept");
        assert_eq!(kept.node.certificate(), renewed.node.certificate());
        let expired = much_later + DEFAULT_INTERMEDIATE_VALIDITY;
        let err = load_or_init(dir.path(), &td("example.org"), "n1", expired).expect_err("expired");
        assert!(matches!(err, StoreError::NeedRootKey { .. }), "{err:?}");
    }

    #[test]
    fn node_files_without_a_root_certificate_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        load_or_init(dir.path(), &td("example.org"), "n1", now).expect("init");
        fs::remove_file(dir.path().join("root.pem")).expect("rm root.pem");
        let err = load_or_init(dir.path(), &td("example.org"), "n1", now).expect_err("no root");
        assert!(matches!(err, StoreError::MissingRoot { .. }), "{err:?}");
        assert!(err.to_string().contains("root.pem"), "{err}");
    }
}

//! Debian cloud kernels: which package a version names (from the machine's apt, or for a
//! series only another release carries, from an isolated apt; see [`super::apt`]),
//! downloading it once into the cache, and unpacking it with a `modules.dep` so modules can be
//! loaded in dependency order.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::apt::Apt;
use crate::cmd;

/// One kernel ready to boot: its image and its module tree, unpacked in the cache.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// The version asked for (`6.1`).
    pub(crate) version: String,
    /// The full release, as `uname -r` prints it (`6.1.0-56-cloud-amd64`).
    pub(crate) release: String,
    /// The bootable image.
    pub(crate) vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub(crate) modules: PathBuf,
}

/// Finds the cloud kernel package for `version`, downloads it into `cache/kernels` unless an
/// earlier run did, and unpacks it there (an isolated apt, when one is needed, lives in
/// `cache/apt-<release>`).
pub(crate) fn fetch(version: &str, cache: &Path) -> Result<Kernel> {
    let apt = Apt::for_series(version, cache)?;
    let package = image_package(&apt, version)?;
    let release = package
        .strip_prefix("linux-image-")
        .expect("image_package returns linux-image-*")
        .to_owned();
    let dir = cache.join("kernels").join(&release);
    let tree = dir.join("tree");
    let complete = dir.join("complete");
    if complete.exists() {
        eprintln!("vm-test: {package} is cached in {}", dir.display());
    } else {
        unpack(&apt, &package, &release, &dir, &tree)?;
        fs::write(&complete, "")
            .with_context(|| format!("failed to write {}", complete.display()))?;
    }
    let kernel = Kernel {
        version: version.to_owned(),
        vmlinuz: tree.join(format!("boot/vmlinuz-{release}")),
        modules: tree.join("lib/modules").join(&release),
        release,
    };
    ensure!(
        kernel.vmlinuz.is_file() && kernel.modules.join("modules.dep").is_file(),
        "{package} unpacked into {} has no boot/vmlinuz-{} or modules.dep; remove {} and rerun",
        tree.display(),
        kernel.release,
        dir.display()
    );
    Ok(kernel)
}

/// Downloads (unless a `.deb` is already there) and unpacks `package` into `tree`, then
/// writes the `modules.dep` that the package leaves to its install scripts.
fn unpack(apt: &Apt, package: &str, release: &str, dir: &Path, tree: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let deb = if let Some(deb) = find_deb(dir, package)? {
        deb
    } else {
        cmd::run(
            apt.command("apt-get")
                .args(["download", package])
                .current_dir(dir),
        )
        .with_context(|| format!("failed to download {package} ({})", apt.refresh_hint()))?;
        find_deb(dir, package)?.with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                dir.display()
            )
        })?
    };
    if tree.exists() {
        fs::remove_dir_all(tree)
            .with_context(|| format!("failed to remove the partial {}", tree.display()))?;
    }
    cmd::run(cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(tree))?;
    cmd::run(cmd::new("depmod").arg("-b").arg(tree).arg(release))
}

/// The `.deb` of `package` in `dir`, if one was downloaded before.
fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(&*name)));
        }
    }
    Ok(None)
}

/// The versioned image package for `version`: what `linux-image-<version>-cloud-amd64`
/// (Debian's meta-package for a non-default series) or else `linux-image-cloud-amd64` (the
/// release's default series) currently depends on, in the package lists of `apt`.
fn image_package(apt: &Apt, version: &str) -> Result<String> {
    let metas = [
        format!("linux-image-{version}-cloud-amd64"),
        "linux-image-cloud-amd64".to_owned(),
    ];
    for meta in &metas {
        let Some(depends) = cmd::probe(apt.command("apt-cache").args(["depends", meta])) else {
            continue;
        };
        if let Some(package) = image_dependency(&depends).filter(|p| is_series(p, version)) {
            return Ok(package.to_owned());
        }
    }
    bail!(
        "no Debian cloud kernel {version}: neither {} nor {} depends on a linux-image-{version}.* \
         package (`apt-cache search linux-image-.*cloud` lists what the apt sources offer; {})",
        metas[0],
        metas[1],
        apt.refresh_hint()
    )
}

/// The `linux-image-*-cloud-amd64` package in `apt-cache depends` output.
fn image_dependency(depends: &str) -> Option<&str> {
    depends.lines().find_map(|line| {
        let package = line.trim().strip_prefix("Depends: ")?;
        (package.starts_with("linux-image-") && package.ends_with("-cloud-amd64"))
            .then_some(package)
    })
}

/// Whether `package` (`linux-image-6.1.0-56-cloud-amd64`) belongs to the series `version`
/// (`6.1`): `6.12.*` is not `6.1`.
fn is_series(package: &str, version: &str) -> bool {
    package
        .strip_prefix("linux-image-")
        .and_then(|release| release.strip_prefix(version))
        .is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_image_a_meta_package_depends_on() {
        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            image_dependency(depends),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let depends = "linux-image-6.12-cloud-amd64\n  \
                       Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            image_dependency(depends),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-5.10.0-32-cloud-amd64\n";
        assert_eq!(
            image_dependency(depends),
            Some("linux-image-5.10.0-32-cloud-amd64")
        );
        assert_eq!(image_dependency("foo\n  Depends: libc6\n"), None);
        assert_eq!(image_dependency(""), None);
    }

    #[test]
    fn series_match_on_whole_numbers() {
        assert!(is_series("linux-image-6.1.0-56-cloud-amd64", "6.1"));
        assert!(is_series("linux-image-6.12.117+deb12-cloud-amd64", "6.12"));
        assert!(!is_series("linux-image-6.12.117+deb12-cloud-amd64", "6.1"));
        assert!(!is_series("linux-image-6.1.0-56-cloud-amd64", "6.12"));
        assert!(!is_series("linux-image-6.1.0-56-cloud-amd64", "5.1"));
        assert!(is_series("linux-image-5.10.0-35-cloud-amd64", "5.10"));
        assert!(!is_series("linux-image-5.10.0-35-cloud-amd64", "5.1"));
        assert!(!is_series("linux-image-5.10.0-35-cloud-amd64", "6.1"));
    }
}

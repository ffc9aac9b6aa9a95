//! `cargo xtask setup`: the idempotent toolchain bootstrap. Every step checks first and acts
//! only when something is missing, so a second run changes nothing.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, root};

/// The bpf-linker release series the eBPF build is known to work with (LLVM 22 support).
const BPF_LINKER_SERIES: (u64, u64) = (0, 13);

/// Debian packages the privileged tests and the demo use as workloads and tools (stunnel4 is
/// the TLS peer of the tunnel interop tests, runc the OCI runtime of the container tests,
/// python3-venv builds the venv that pyspiffe runs in), and what `vm-test` boots kernels with:
/// qemu (with its virtiofsd), a static busybox for the initramfs, dpkg-deb and xz to unpack
/// kernel packages, and Debian's archive keyring, which the isolated apt for bullseye's kernel
/// trusts.
const PACKAGES: [&str; 17] = [
    "iproute2",
    "bpftool",
    "python3",
    "python3-venv",
    "curl",
    "iperf3",
    "openssl",
    "procps",
    "util-linux",
    "kmod",
    "stunnel4",
    "qemu-system-x86",
    "busybox-static",
    "dpkg",
    "xz-utils",
    "debian-archive-keyring",
    "runc",
];

/// The venv holding pyspiffe, the SPIFFE project's Python Workload API client that the Workload
/// API tests run as a client nobody here wrote. It lives outside the checkout, readable and
/// executable by every user, because the tests run it as root and as an unprivileged uid (and
/// root's home is 0700). The enforcer tests name the same path.
const PYSPIFFE_VENV: &str = "/opt/enforcer-tests/pyspiffe";

/// The pyspiffe release (the Python package `spiffe`) the venv holds: the newest that installs on
/// bookworm's Python 3.11. Its dependencies are whatever pip resolves for it.
const PYSPIFFE_VERSION: &str = "0.3.2";

/// Debian's interpreter, which every user can run (unlike a pyenv under root's home).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Checks every prerequisite and installs the missing ones.
pub(crate) fn run() -> Result<()> {
    let mut installed = Vec::new();
    nightly(&mut installed)?;
    rust_src(&mut installed)?;
    bpf_linker(&mut installed)?;
    packages(&mut installed)?;
    pyspiffe(&mut installed)?;
    if installed.is_empty() {
        eprintln!("setup: nothing to do");
    } else {
        eprintln!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}

/// The nightly toolchain that builds the eBPF crate.
fn nightly(installed: &mut Vec<String>) -> Result<()> {
    let list = cmd::output(cmd::new("rustup").args(["toolchain", "list"]))?;
    if !has_nightly(&list) {
        eprintln!("missing: nightly toolchain");
        cmd::run(cmd::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the eBPF crate needs a nightly toolchain and it could not be installed")?;
        installed.push("nightly toolchain".to_owned());
    }
    let version = cmd::output(cmd::new("rustc").args(["+nightly", "--version"]))?;
    eprintln!("ok: nightly toolchain ({})", version.trim());
    Ok(())
}

/// The standard library sources the nightly needs to build `core` for the BPF target.
fn rust_src(installed: &mut Vec<String>) -> Result<()> {
    let library = nightly_sysroot()?.join("lib/rustlib/src/rust/library");
    if !library.is_dir() {
        eprintln!("missing: rust-src for nightly");
        cmd::run(cmd::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        ensure!(
            library.is_dir(),
            "rust-src was added but {} does not exist",
            library.display()
        );
        installed.push("rust-src".to_owned());
    }
    eprintln!("ok: rust-src for nightly");
    Ok(())
}

/// bpf-linker, linked against the nightly's own LLVM because this machine has no system LLVM.
fn bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    let (major, minor) = BPF_LINKER_SERIES;
    match bpf_linker_version() {
        Some(version) if version.is_series(major, minor) => {
            eprintln!("ok: bpf-linker {version}");
            return Ok(());
        }
        Some(version) => eprintln!("missing: bpf-linker {major}.{minor} (found {version})"),
        None => eprintln!("missing: bpf-linker {major}.{minor}"),
    }
    install_bpf_linker()?;
    match bpf_linker_version() {
        Some(version) if version.is_series(major, minor) => {
            eprintln!("ok: bpf-linker {version}");
            installed.push(format!("bpf-linker {version}"));
            Ok(())
        }
        other => bail!(
            "installed bpf-linker {major}.{minor} but `bpf-linker --version` now reports {}",
            other.map_or_else(|| "nothing".to_owned(), |version| version.to_string())
        ),
    }
}

/// The version of the bpf-linker found on `PATH` or in cargo's bin directory.
fn bpf_linker_version() -> Option<Version> {
    cmd::probe(cmd::new("bpf-linker").arg("--version"))
        .and_then(|out| parse_bpf_linker_version(&out))
}

/// `cargo install bpf-linker` with `LLVM_PREFIX` pointing at a directory whose
/// `lib/libLLVM.so` is the nightly's LLVM, and an rpath so the binary finds it at run time.
fn install_bpf_linker() -> Result<()> {
    let lib_dir = nightly_sysroot()?.join("lib");
    let names = fs::read_dir(&lib_dir)
        .with_context(|| format!("failed to list {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect::<Vec<_>>();
    let (libllvm, llvm_major) = find_libllvm(&names).with_context(|| {
        format!(
            "no libLLVM.so.<version>-rust-<version>-nightly in {}; the nightly must ship its LLVM",
            lib_dir.display()
        )
    })?;

    let prefix = cmd::workspace_root().join("target/llvm-prefix");
    let link = prefix.join("lib/libLLVM.so");
    link_libllvm(&lib_dir.join(libllvm), &link)?;

    let (major, minor) = BPF_LINKER_SERIES;
    cmd::run(
        cmd::new("cargo")
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("^{major}.{minor}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            ),
    )
}

/// Points `link` at `target`, replacing whatever link an earlier run left there.
fn link_libllvm(target: &Path, link: &Path) -> Result<()> {
    let dir = link.parent().expect("the link path has a parent");
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("failed to remove {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("failed to link {} to {}", link.display(), target.display()))
}

/// The Debian packages the tests run as workloads and tools.
fn packages(installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_packages()?;
    if !missing.is_empty() {
        eprintln!("missing: Debian packages {}", missing.join(" "));
        root::require(&format!(
            "installing the Debian packages {} needs root",
            missing.join(" ")
        ))?;
        cmd::run(
            cmd::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        cmd::run(
            cmd::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        let still = missing_packages()?;
        ensure!(
            still.is_empty(),
            "apt-get install succeeded but these packages are still not installed: {}",
            still.join(" ")
        );
        installed.extend(missing.iter().map(|package| (*package).to_owned()));
    }
    eprintln!("ok: Debian packages {}", PACKAGES.join(" "));
    Ok(())
}

/// The packages of [`PACKAGES`] that dpkg does not report as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when any package is unknown but still reports the rest, so
    // read its stdout whatever the status.
    let out = cmd::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES)
        .output()
        .context(
            "failed to run dpkg-query: setup installs the test tools with apt (Debian/Ubuntu)",
        )?;
    let status = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .into_iter()
        .filter(|package| !is_installed(package, &status))
        .collect())
}

/// pyspiffe at [`PYSPIFFE_VERSION`] in the venv at [`PYSPIFFE_VENV`], built with Debian's
/// python3. Anything else there (no venv, a broken one, another version) is replaced by a
/// fresh venv, so no stale dependency survives a version change.
fn pyspiffe(installed: &mut Vec<String>) -> Result<()> {
    let venv = Path::new(PYSPIFFE_VENV);
    match pyspiffe_version(venv) {
        Some(version) if version == PYSPIFFE_VERSION => {
            eprintln!("ok: pyspiffe {version} in {}", venv.display());
            return Ok(());
        }
        Some(version) => eprintln!("missing: pyspiffe {PYSPIFFE_VERSION} (found {version})"),
        None => eprintln!("missing: pyspiffe {PYSPIFFE_VERSION} in {}", venv.display()),
    }
    root::require(&format!("creating {} needs root", venv.display()))?;
    let parent = venv.parent().expect("the venv path has a parent");
    fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to make {} world-readable", parent.display()))?;
    if venv.symlink_metadata().is_ok() {
        eprintln!("removing {}", venv.display());
        fs::remove_dir_all(venv).with_context(|| format!("failed to remove {}", venv.display()))?;
    }
    cmd::run(
        umask_022(SYSTEM_PYTHON)
            .args(["-I", "-m", "venv"])
            .arg(venv),
    )?;
    let requirement = format!("spiffe=={PYSPIFFE_VERSION}");
    cmd::run(umask_022(venv.join("bin/python")).args([
        "-I",
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        &requirement,
    ]))?;
    match pyspiffe_version(venv) {
        Some(version) if version == PYSPIFFE_VERSION => {
            eprintln!("ok: pyspiffe {version} in {}", venv.display());
            installed.push(format!("pyspiffe {version}"));
            Ok(())
        }
        other => bail!(
            "installed {requirement} in {} but `import spiffe` there now reports {}",
            venv.display(),
            other.unwrap_or_else(|| "an error".to_owned())
        ),
    }
}

/// The pyspiffe version that the venv's python imports (isolated: not from the current
/// directory or `PYTHONPATH`), or `None` when the venv, its python or the import is missing or
/// broken.
fn pyspiffe_version(venv: &Path) -> Option<String> {
    let check = "import importlib.metadata, spiffe; print(importlib.metadata.version('spiffe'))";
    let out = cmd::probe(Command::new(venv.join("bin/python")).args(["-I", "-c", check]))?;
    Some(out.trim().to_owned())
}

/// A command running `program` (add its arguments) under umask 022, so every file it creates
/// is world-readable whatever the caller's umask; through `sh`, as std cannot set a child's
/// umask without unsafe code.
fn umask_022(program: impl AsRef<OsStr>) -> Command {
    let mut command = cmd::new("sh");
    command
        .args(["-c", "umask 022 && exec \"$@\"", "sh"])
        .arg(program);
    command
}

/// Whether `dpkg-query -W -f='${Package} ${Status}\n'` output reports `package` installed.
fn is_installed(package: &str, dpkg_output: &str) -> bool {
    dpkg_output.lines().any(|line| {
        line.split_once(' ')
            .is_some_and(|(name, status)| name == package && status == "install ok installed")
    })
}

/// Whether `rustup toolchain list` holds the toolchain that `+nightly` resolves to
/// (`nightly-<host>`, not a dated `nightly-YYYY-MM-DD-<host>`).
fn has_nightly(toolchains: &str) -> bool {
    toolchains.lines().any(|line| {
        line.split_whitespace().next().is_some_and(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    })
}

/// The nightly toolchain's sysroot (`rustc +nightly --print sysroot`).
fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd::output(cmd::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

/// Picks the nightly's `libLLVM.so.<major>.<minor>-rust-<rustc>-nightly` among the file
/// names of its `lib` directory; returns it with the LLVM major version.
fn find_libllvm(names: &[String]) -> Option<(&str, u32)> {
    names.iter().find_map(|name| {
        let version = name.strip_prefix("libLLVM.so.")?;
        let (llvm, rustc) = version.split_once("-rust-")?;
        rustc.strip_suffix("-nightly")?;
        let major = llvm.split('.').next()?.parse().ok()?;
        Some((name.as_str(), major))
    })
}

/// A `major.minor.patch` version as `bpf-linker --version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    major: u64,
    minor: u64,
    patch: u64,
}

impl Version {
    /// Whether this version belongs to the `major.minor` series (any patch).
    fn is_series(self, major: u64, minor: u64) -> bool {
        self.major == major && self.minor == minor
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses `bpf-linker 0.13.0` (a pre-release or build suffix on the patch is ignored).
fn parse_bpf_linker_version(output: &str) -> Option<Version> {
    let mut words = output.split_whitespace();
    if words.next()? != "bpf-linker" {
        return None;
    }
    let mut parts = words.next()?.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?;
    let digits = patch
        .find(|c: char| !c.is_ascii_digit())
        .map_or(patch, |end| &patch[..end]);
    let patch = digits.parse().ok()?;
    Some(Version {
        major,
        minor,
        patch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpf_linker_version() {
        let version = parse_bpf_linker_version("bpf-linker 0.13.0\n").unwrap();
        assert_eq!(version.to_string(), "0.13.0");
        assert!(version.is_series(0, 13));
        assert!(!version.is_series(0, 12));
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.13.2-rc.1"),
            Some(Version {
                major: 0,
                minor: 13,
                patch: 2
            })
        );
    }

    #[test]
    fn rejects_other_version_output() {
        assert_eq!(parse_bpf_linker_version(""), None);
        assert_eq!(parse_bpf_linker_version("rustc 1.95.0"), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker"), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker 0.13"), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker x.13.0"), None);
    }

    #[test]
    fn dpkg_status_must_be_fully_installed() {
        let output = "iproute2 install ok installed\n\
                      curl deinstall ok config-files\n\
                      kmod install ok half-configured\n\
                      util-linux install ok installed\n";
        assert!(is_installed("iproute2", output));
        assert!(is_installed("util-linux", output));
        assert!(!is_installed("curl", output));
        assert!(!is_installed("kmod", output));
        assert!(!is_installed("iperf3", output));
        assert!(!is_installed("iproute", output));
    }

    #[test]
    fn umask_022_applies_to_the_program() {
        let out =
            cmd::output(umask_022("sh").args(["-c", "umask; echo \"$0\" \"$1\"", "a b", "c"]))
                .unwrap();
        assert_eq!(out, "0022\na b c\n");
    }

    #[test]
    fn nightly_means_the_undated_channel() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(has_nightly("nightly\n"));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2025-06-01-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_nightly("no installed toolchains\n"));
    }

    #[test]
    fn finds_the_nightly_libllvm_and_its_major() {
        let names = [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ]
        .map(String::from);
        assert_eq!(
            find_libllvm(&names),
            Some(("libLLVM.so.22.1-rust-1.97.0-nightly", 22))
        );
        assert_eq!(find_libllvm(&names[..2]), None);
        assert_eq!(
            find_libllvm(&["libLLVM.so.22.1-rust-1.95.0-stable".to_owned()]),
            None
        );
    }
}

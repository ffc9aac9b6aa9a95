//! The initramfs: a static busybox, the kernel modules that mounting the host's root needs
//! (in dependency order), and a first-stage `/init` that mounts the host's root read-only over
//! virtiofs under a tmpfs overlay and switches into it.
//!
//! The archive is written here in the kernel's `newc` cpio format rather than by `cpio(1)`:
//! it is a dozen lines and keeps the entries (owner root, fixed paths) exactly as intended.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;
use super::shell_quote;
use crate::cmd;

/// The static busybox that setup installs (Debian's `busybox-static`).
pub(super) const BUSYBOX: &str = "/bin/busybox";

/// Modules the first stage needs: the virtio PCI transport, virtiofs and overlayfs. Their
/// dependencies come from `modules.dep`; those built into the kernel are skipped.
const BOOT_MODULES: [&str; 3] = ["virtio_pci", "virtiofs", "overlay"];

/// The virtiofs tag qemu exports the host's `/` under.
pub(super) const ROOT_TAG: &str = "hostroot";

/// Writes the initramfs for `kernel` to `out`; its `/init` ends by running `stage2` (a path
/// on the host, seen at the same path in the guest) as process 1.
pub(super) fn write(kernel: &Kernel, stage2: &Path, out: &Path) -> Result<()> {
    let read = |name: &str| {
        let path = kernel.modules.join(name);
        fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
    };
    let order = load_order(
        &read("modules.dep")?,
        &read("modules.builtin")?,
        &BOOT_MODULES,
    )?;

    let mut archive = Newc::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "lib",
        "lib/modules",
        "lower",
        "rw",
        "root",
    ] {
        archive.dir(dir);
    }
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("failed to read {BUSYBOX} (the busybox-static package; `cargo xtask setup`)")
    })?;
    archive.file("bin/busybox", 0o755, &busybox);
    let mut names = Vec::new();
    for module in &order {
        let name = format!("lib/modules/{}.ko", module_name(module));
        archive.file(&name, 0o644, &module_bytes(&kernel.modules.join(module))?);
        names.push(name);
    }
    archive.file("init", 0o755, init_script(&names, stage2).as_bytes());
    fs::write(out, archive.finish()).with_context(|| format!("failed to write {}", out.display()))
}

/// A module file's contents, uncompressed (busybox `insmod` takes plain ELF objects).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("failed to read {}", path.display()));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        bail!("{} is neither .ko, .ko.xz nor .ko.zst", path.display());
    };
    let out = cmd::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("failed to run {tool} on {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "`{tool} -d -c {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The first stage, run by busybox as process 1: load the modules, mount the host's root
/// read-only with a tmpfs overlay for writes, and hand over to `stage2` inside it.
fn init_script(modules: &[String], stage2: &Path) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         # The vm-test first stage (written by cargo xtask vm-test).\n\
         bb=/bin/busybox\n\
         fail() { echo \"VMTEST-ERROR initramfs: $*\"; $bb poweroff -f; }\n\
         $bb mount -t proc proc /proc || fail 'mount /proc'\n\
         $bb mount -t devtmpfs devtmpfs /dev || fail 'mount /dev'\n",
    );
    for module in modules {
        writeln!(script, "$bb insmod /{module} || fail 'insmod {module}'")
            .expect("writing to a String cannot fail");
    }
    write!(
        script,
        "$bb mount -t virtiofs -o ro {ROOT_TAG} /lower || fail 'mount the host root (virtiofs {ROOT_TAG})'\n\
         $bb mount -t tmpfs -o mode=0755 rw /rw || fail 'mount the tmpfs for writes'\n\
         $bb mkdir -p /rw/upper /rw/work\n\
         $bb mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /root \
         || fail 'mount the overlay'\n\
         $bb umount /proc /dev\n\
         exec $bb switch_root /root {}\n",
        shell_quote(&stage2.to_string_lossy())
    )
    .expect("writing to a String cannot fail");
    script
}

/// The module paths (relative to `lib/modules/<release>`) to load, in order, so that `wanted`
/// are loaded with every dependency before its user. `dep` is `modules.dep` (`path: deps...`,
/// each line listing all dependencies, the ones to load first last) and `builtin` is
/// `modules.builtin`; a wanted module built into the kernel needs nothing.
fn load_order(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let deps: HashMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((module.trim(), deps.split_whitespace().collect()))
        })
        .collect();
    let by_name: HashMap<String, &str> =
        deps.keys().map(|path| (module_name(path), *path)).collect();
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();

    let mut order = Vec::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let Some(path) = by_name.get(&name) else {
            bail!("module {name} is neither in modules.dep nor built in");
        };
        let own = deps.get(path).map_or(&[][..], Vec::as_slice);
        for module in own.iter().rev().chain([path]) {
            if !order.iter().any(|seen| seen == module) {
                order.push((*module).to_owned());
            }
        }
    }
    Ok(order)
}

/// A module's name as the kernel knows it: the file name without `.ko[.xz|.zst]`, with `-`
/// read as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

/// A cpio archive in the `newc` format the kernel unpacks as initramfs.
#[derive(Default)]
struct Newc {
    bytes: Vec<u8>,
    inode: u32,
}

impl Newc {
    /// Adds a directory (mode 0755).
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    /// Adds a regular file with permission bits `mode`.
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    /// The archive with its trailer.
    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }

    /// One header, the NUL-terminated name and the data, each padded to 4 bytes.
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        if name != "TRAILER!!!" {
            self.inode += 1;
        }
        let size = u32::try_from(data.len()).expect("initramfs members are below 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check.
        let fields = [
            self.inode, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name_size, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/fuse/fuse.ko:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let order = load_order(DEP, "", &BOOT_MODULES).unwrap();
        let names: Vec<String> = order.iter().map(|path| module_name(path)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "fuse",
                "virtiofs",
                "overlay"
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let dep = "kernel/fs/overlayfs/overlay.ko.xz:\n";
        let builtin = "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse/virtiofs.ko\n";
        assert_eq!(
            load_order(dep, builtin, &BOOT_MODULES).unwrap(),
            ["kernel/fs/overlayfs/overlay.ko.xz"]
        );
    }

    #[test]
    fn a_missing_module_is_an_error() {
        let error = load_order("", "", &["virtiofs"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "module virtiofs is neither in modules.dep nor built in"
        );
    }

    #[test]
    fn module_names_drop_the_suffix_and_dashes() {
        assert_eq!(module_name("kernel/fs/fuse/virtiofs.ko"), "virtiofs");
        assert_eq!(module_name("kernel/a/virtio-rng.ko.xz"), "virtio_rng");
        assert_eq!(module_name("kernel/a/overlay.ko.zst"), "overlay");
    }

    #[test]
    fn init_loads_modules_then_switches_root() {
        let script = init_script(
            &["lib/modules/virtiofs.ko".to_owned()],
            Path::new("/work/target/vm-test/run 1/stage2"),
        );
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        let insmod = script.find("insmod /lib/modules/virtiofs.ko").unwrap();
        let mount = script.find("-t virtiofs -o ro hostroot /lower").unwrap();
        assert!(insmod < mount);
        assert!(script.ends_with("switch_root /root '/work/target/vm-test/run 1/stage2'\n"));
    }

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut archive = Newc::default();
        archive.dir("bin");
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(
            header,
            "070701\
             00000001000041ed000000000000000000000002\
             0000000000000000000000000000000000000000\
             000000000000000400000000"
        );
        assert_eq!(&bytes[110..114], b"bin\0");
        let file = 116;
        assert_eq!(&bytes[file..file + 6], b"070701");
        assert_eq!(&bytes[file + 14..file + 22], b"000081ed");
        assert_eq!(&bytes[file + 54..file + 62], b"0000000a");
        let trailer = bytes.len() - 124;
        assert_eq!(&bytes[trailer + 110..trailer + 121], b"TRAILER!!!\0");
    }
}

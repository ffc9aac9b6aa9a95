//! Booting one kernel: virtiofsd exports the host's `/`, qemu runs under TCG with the serial
//! console on a pipe, and a wall-clock limit kills qemu (by its pid) if the guest hangs.
//! Both processes are killed and reaped on every path out, errors and panics included.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::guest::{Exit, Transcript};
use super::initramfs::ROOT_TAG;
use super::kernel::Kernel;
use crate::cmd;

/// The virtiofs daemon that qemu 7.2 (Debian bookworm) ships.
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// Guest memory; virtiofs needs it shared with virtiofsd, hence a memfd backend.
const MEMORY: &str = "3G";

/// How long virtiofsd may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// A child process that is killed and reaped when dropped.
struct Reaped {
    child: Child,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Killing an already exited child fails harmlessly; waiting reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots `kernel` with `initramfs`, echoes the console to stdout with a `[version]` prefix,
/// feeds every line to `transcript`, and returns how qemu ended. `run_dir` holds the
/// virtiofsd socket and log.
pub(super) fn boot(
    kernel: &Kernel,
    initramfs: &Path,
    run_dir: &Path,
    limit: Duration,
    transcript: &mut Transcript,
) -> Result<Exit> {
    let socket = run_dir.join("virtiofsd.sock");
    let log_path = run_dir.join("virtiofsd.log");
    let _virtiofsd = start_virtiofsd(&socket, &log_path)?;

    let mut qemu = cmd::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", MEMORY])
        .args(["-object"])
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEMORY},share=on"
        ))
        .args(["-numa", "node,memdev=mem", "-chardev"])
        .arg(format!("socket,id=hostroot,path={}", socket.display()))
        .args(["-device"])
        .arg(format!(
            "vhost-user-fs-pci,queue-size=1024,chardev=hostroot,tag={ROOT_TAG}"
        ))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-nic", "none", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("$ {qemu:?}");
    let mut qemu = Reaped {
        child: qemu.spawn().context("failed to start qemu-system-x86_64")?,
    };
    let console = qemu.child.stdout.take().expect("stdout is piped");
    let (lines, received) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut console = BufReader::new(console);
        let mut buf = Vec::new();
        while matches!(console.read_until(b'\n', &mut buf), Ok(read) if read > 0) {
            if lines
                .send(String::from_utf8_lossy(&buf).into_owned())
                .is_err()
            {
                break;
            }
            buf.clear();
        }
    });

    let deadline = Instant::now() + limit;
    let prefix = format!("[{}] ", kernel.version);
    let mut stdout = io::stdout();
    let exit = loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let line = line.trim_end_matches(['\r', '\n']);
                // The console is only echoed; a closed stdout must not stop the run.
                let _ = writeln!(stdout, "{prefix}{line}");
                transcript.feed(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                eprintln!(
                    "vm-test: {} still running after {}; killing qemu (pid {})",
                    kernel.release,
                    super::minutes(limit),
                    qemu.child.id()
                );
                qemu.child
                    .kill()
                    .context("failed to kill qemu after the time limit")?;
                break Exit::TimedOut(limit);
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = qemu.child.wait().context("failed to wait for qemu")?;
                break Exit::Exited(status);
            }
        }
    };
    drop(qemu);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader panicked"))?;
    Ok(exit)
}

/// Starts virtiofsd exporting `/` on `socket` (the guest mounts it read-only) and waits for
/// the socket; virtiofsd exits by itself when qemu disconnects.
fn start_virtiofsd(socket: &Path, log_path: &Path) -> Result<Reaped> {
    if socket.exists() {
        fs::remove_file(socket)
            .with_context(|| format!("failed to remove the stale {}", socket.display()))?;
    }
    let log = File::create(log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    let mut command = cmd::new(VIRTIOFSD);
    command
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", "source=/", "-o", "sandbox=chroot", "-o", "cache=auto"])
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("failed to share the virtiofsd log")?,
        )
        .stderr(log);
    eprintln!("$ {command:?}");
    let mut virtiofsd = Reaped {
        child: command.spawn().with_context(|| {
            format!("failed to start {VIRTIOFSD} (qemu-system-x86 ships it; `cargo xtask setup`)")
        })?,
    };
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if let Some(status) = virtiofsd.child.try_wait()? {
            bail!(
                "virtiofsd exited with {status} before creating its socket; see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "virtiofsd did not create {} within {SOCKET_WAIT:?}; see {}",
                socket.display(),
                log_path.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(virtiofsd)
}

//! Workload API callers for tests: a world-readable directory that holds what an unprivileged
//! caller runs (a copy of the `enforcer` binary, the client scripts) and the API socket, the
//! pyspiffe client, and connections made by a caller process and handed to the test.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
use tempfile::TempDir;

use super::{ScratchCgroup, Spawn, Spawned};

/// Where `cargo xtask setup` installs the pyspiffe venv (world-readable, outside the checkout).
pub const PYSPIFFE_VENV: &str = "/opt/enforcer-tests/pyspiffe";
/// Debian's python3 (the venv's python is this one too): callers run it by path, so that
/// whatever python3 comes first in `PATH` does not change who they are.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// The pyspiffe client script.
const PYSPIFFE_CLIENT: &str = include_str!("../../tests/fixtures/pyspiffe_client.py");
/// The script that connects and hands the connection over.
const CONNECT: &str = include_str!("../../tests/fixtures/wapi_connect.py");
/// How long a caller gets to connect and hand its connection over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// A directory every user can enter and read, removed when dropped: the API socket, the
/// scripts, and a copy of a binary live here, so a caller of any uid can reach them wherever
/// the checkout is.
#[derive(Debug)]
pub struct PublicDir {
    dir: TempDir,
}

impl PublicDir {
    /// A new directory (0755) with the client scripts in it.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("enf-wapi-")
            .tempdir()
            .expect("temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("open the directory to every user");
        let public = Self { dir };
        public.write("pyspiffe_client.py", PYSPIFFE_CLIENT, 0o644);
        public.write("wapi_connect.py", CONNECT, 0o644);
        public
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The Workload API socket's path in it.
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.path().join("api.sock")
    }

    /// `[workload_api]` configuration serving the socket here (and `extra` keys).
    #[must_use]
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[workload_api]\nsocket = \"{}\"\n{extra}",
            self.socket().display()
        )
    }

    /// Copies `binary` here as `name` (0755); returns the copy's path.
    #[must_use]
    pub fn copy(&self, binary: &Path, name: &str) -> PathBuf {
        let copy = self.path().join(name);
        fs::copy(binary, &copy)
            .unwrap_or_else(|error| panic!("copy {} here: {error}", binary.display()));
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod the copy");
        copy
    }

    fn write(&self, name: &str, text: &str, mode: u32) {
        let path = self.path().join(name);
        fs::write(&path, text).unwrap_or_else(|error| panic!("write {name}: {error}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// The pyspiffe client running `args` against this directory's socket in `cgroup`,
    /// as uid 0, or as `uid` when given (its gid the same, no supplementary groups).
    pub fn pyspiffe(&self, cgroup: &ScratchCgroup, uid: Option<u32>, args: &[&str]) -> Spawn {
        let python = pyspiffe_python();
        let script = self.path().join("pyspiffe_client.py");
        as_uid(uid, &python)
            .arg(script)
            .args(args)
            .env(
                crate::workload_api::ENDPOINT_ENV,
                format!("unix://{}", self.socket().display()),
            )
            .cgroup(cgroup)
    }

    /// A python3 process in `cgroup` that connects to the API socket and hands the connection
    /// to the test: the daemon attests that process as the caller of everything sent on it.
    #[must_use]
    pub fn handed_connection(&self, cgroup: &ScratchCgroup) -> HandedConnection {
        let handover_path = self
            .path()
            .join(format!("handover-{}", super::unique_name("h")));
        let listener = std::os::unix::net::UnixListener::bind(&handover_path)
            .expect("bind the handover socket");
        let process = Spawn::new(SYSTEM_PYTHON)
            .arg(self.path().join("wapi_connect.py"))
            .arg(self.socket())
            .arg(&handover_path)
            .cgroup(cgroup)
            .stdin_piped()
            .spawn();
        listener
            .set_nonblocking(false)
            .expect("blocking handover listener");
        let (handover, _) = listener
            .accept()
            .expect("the caller connects to the handover");
        handover
            .set_read_timeout(Some(HANDOVER_TIMEOUT))
            .expect("read timeout");
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0_u8; 8];
        recvmsg(
            &handover,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .expect("receive the connection");
        let fd = control
            .drain()
            .find_map(|message| match message {
                RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                _ => None,
            })
            .expect("the caller sent its connection");
        let line = process.read_line(HANDOVER_TIMEOUT);
        assert_eq!(
            line.as_deref(),
            Some("handed"),
            "the caller did not hand its connection over: {}",
            process.stderr()
        );
        let _ = fs::remove_file(&handover_path);
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true).expect("non-blocking");
        HandedConnection {
            process,
            stream: Some(stream),
        }
    }
}

impl Default for PublicDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A caller process and the Workload API connection it made, now the test's.
#[derive(Debug)]
pub struct HandedConnection {
    /// The caller (python3, until told to exec).
    pub process: Spawned,
    stream: Option<std::os::unix::net::UnixStream>,
}

impl HandedConnection {
    /// The connection, for a client (once).
    pub fn take(&mut self) -> tokio::net::UnixStream {
        tokio::net::UnixStream::from_std(self.stream.take().expect("the connection, once"))
            .expect("a tokio stream (call within a runtime)")
    }

    /// Tells the caller to become `argv[0]` with `argv` (its connection stays open here).
    pub fn exec(&mut self, argv: &[&str]) {
        self.process.write_line(&format!("exec {}", argv.join(" ")));
    }
}

/// The venv's python, or a panic saying how to install it.
#[must_use]
pub fn pyspiffe_python() -> PathBuf {
    let python = Path::new(PYSPIFFE_VENV).join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it installs pyspiffe there)",
        python.display()
    );
    python
}

/// `program` run as `uid` (with the same gid, no supplementary groups) through `setpriv`, or
/// as is for `None`.
pub fn as_uid(uid: Option<u32>, program: &Path) -> Spawn {
    match uid {
        Some(uid) => Spawn::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(program),
        None => Spawn::new(program),
    }
}

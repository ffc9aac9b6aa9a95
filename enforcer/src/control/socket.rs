//! Binding the daemon's Unix sockets (the control socket, and the Workload API's): the parent
//! directory created with the mode asked for, a stale socket from a crash replaced, a live
//! daemon's socket or any other file left alone, and a socket that is never reachable with
//! another mode than the one asked for (0600 for the control socket).
#![forbid(unsafe_code)]

use std::{
    fs, io,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process,
};

/// Why the control socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path has no parent directory or no file name.
    #[error("{}: not a usable socket path (it needs a directory and a file name)", .path.display())]
    BadPath {
        /// The socket path.
        path: PathBuf,
    },
    /// The missing parent directory could not be created.
    #[error("failed to create the socket directory {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The filesystem error.
        #[source]
        source: io::Error,
    },
    /// A daemon already answers on the socket.
    #[error("another daemon is serving {}", .path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path; it is left alone.
    #[error("{} exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// What is at the path could not be checked, or a stale socket could not be removed.
    #[error("failed to replace the stale socket {}", .path.display())]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The error probing or removing it.
        #[source]
        source: io::Error,
    },
    /// Binding the socket, or moving it into place, failed.
    #[error("failed to bind the socket {}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The socket or filesystem error.
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket at `path` with mode 0600, creating its parent directory (0711) if
/// missing and replacing a stale socket nobody answers on. Must be called within a tokio
/// runtime. The listener's `local_addr` names the private staging path it was bound at, which
/// no longer exists; `path` is where clients connect.
pub fn bind_control_socket(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    bind_socket(path, 0o600, 0o711)
}

/// Binds a Unix socket at `path` with mode `mode`, creating its parent directory with mode
/// `dir_mode` if missing and replacing a stale socket nobody answers on; see
/// [`bind_control_socket`].
pub(crate) fn bind_socket(
    path: &Path,
    mode: u32,
    dir_mode: u32,
) -> Result<tokio::net::UnixListener, ControlError> {
    let bad_path = || ControlError::BadPath {
        path: path.to_owned(),
    };
    let name = path.file_name().ok_or_else(bad_path)?;
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .ok_or_else(bad_path)?;
    create_dir(parent, dir_mode)?;
    remove_stale(path)?;

    // A socket file is created by bind() with mode 0777 minus the umask, and connect() needs
    // write permission on it, so binding at `path` and then chmod-ing would leave a window in
    // which anyone could connect whenever `parent` is not private, and a chmod by path follows
    // whatever another user swapped in there meanwhile. Setting a umask first is no cure: it
    // is per process, and the daemon's other threads create files meanwhile. So the socket is
    // bound in a fresh 0700 staging directory nobody else can enter, set to `mode` there, and
    // only then hard-linked to `path`; link() fails rather than replace a file that appeared
    // at `path` since the check above.
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let mut staging_name = std::ffi::OsString::from(".");
    staging_name.push(name);
    staging_name.push(format!(".bind-{}", process::id()));
    let staging = Staging::create(parent.join(staging_name)).map_err(bind_err)?;
    let staged = staging.dir.join(name);
    let listener = UnixListener::bind(&staged).map_err(bind_err)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    fs::hard_link(&staged, path).map_err(bind_err)?;
    drop(staging);

    listener.set_nonblocking(true).map_err(bind_err)?;
    tokio::net::UnixListener::from_std(listener).map_err(bind_err)
}

/// Creates `dir` (and missing ancestors) with mode `mode` if it does not exist; an existing
/// directory is left as it is. The control socket's is 0711: others may pass through it but
/// not list it, since the default Workload API socket lives below it
/// (`/run/enforcer/public/api.sock`), and the control socket beside it is 0600 and answers only
/// uid 0 whatever the directory's mode.
fn create_dir(dir: &Path, mode: u32) -> Result<(), ControlError> {
    if dir.is_dir() {
        return Ok(());
    }
    let create_err = |source| ControlError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(create_err)?;
    // The umask may have cleared bits of `mode`; set it exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(create_err)
}

/// Removes a socket at `path` that nobody answers on; fails if a daemon answers there or if
/// `path` is anything but a socket.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let stale_err = |source| ControlError::Stale {
        path: path.to_owned(),
        source,
    };
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(stale_err(error)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_owned(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(stale_err)
        }
        Err(error) => Err(stale_err(error)),
    }
}

/// A private directory to bind in, removed with what is left in it when dropped.
struct Staging {
    /// The directory.
    dir: PathBuf,
}

impl Staging {
    /// Creates `dir` with mode 0700, first removing one a crashed daemon with our pid left.
    fn create(dir: PathBuf) -> io::Result<Self> {
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(%error, dir = %self.dir.display(), "failed to remove the control socket staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_without_a_directory_or_name_are_refused() {
        for path in ["control.sock", "/", ""] {
            let error = bind_control_socket(Path::new(path)).expect_err(path);
            assert!(
                matches!(error, ControlError::BadPath { .. }),
                "{path}: {error}"
            );
        }
    }
}

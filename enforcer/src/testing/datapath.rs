//! A datapath installed for one test: attached to a scratch cgroup, pinned under a unique
//! bpffs directory, uninstalled (links detached, pins removed) when dropped.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use crate::kernel::{DaemonConfig, Datapath, DatapathOptions};

use super::{ScratchCgroup, report, unique_name};

/// The bpffs mount the scratch pin directories live under (mounted if needed).
pub(super) const BPFFS: &str = "/sys/fs/bpf";

/// An installed datapath that uninstalls itself.
pub struct ScratchDatapath {
    datapath: Option<Datapath>,
    pin_dir: PathBuf,
    // Keeps the scope cgroup alive until the programs are detached.
    _scope: ScratchCgroup,
}

impl ScratchDatapath {
    /// Install the programs on `scope` with the default options.
    #[must_use]
    pub fn install(scope: &ScratchCgroup) -> Self {
        Self::install_with(scope, |_| {})
    }

    /// Install the programs on `scope` after `adjust` has changed the options.
    #[must_use]
    pub fn install_with(scope: &ScratchCgroup, adjust: impl FnOnce(&mut DatapathOptions)) -> Self {
        let pin_dir = Path::new(BPFFS).join(unique_name("pins"));
        let mut options = DatapathOptions::new(&pin_dir, scope.path());
        adjust(&mut options);
        let datapath = Datapath::install(&options)
            .unwrap_or_else(|error| panic!("failed to install the datapath: {}", report(&error)));
        Self {
            datapath: Some(datapath),
            pin_dir,
            _scope: scope.clone(),
        }
    }

    /// Close every handle this process holds (as a daemon that exits would) and re-adopt the
    /// pinned installation, returning whether the programs stayed attached meanwhile.
    pub fn restart(&mut self) {
        self.datapath = None;
        let adopted = Datapath::adopt(&self.pin_dir)
            .unwrap_or_else(|error| panic!("failed to re-adopt: {}", report(&error)));
        assert!(!adopted.attached_now(), "adopt must not attach again");
        self.datapath = Some(adopted);
    }

    /// Close every handle without uninstalling (the daemon is "down").
    pub fn stop(&mut self) {
        self.datapath = None;
    }

    /// Make this process the daemon: its outbound listener is on `127.0.0.1` and `::1` at
    /// `port`, and its local hops carry `mark`.
    pub fn serve_on_loopback(&mut self, port: u16, mark: u32) {
        self.maps_mut()
            .set_config(&DaemonConfig {
                daemon_tgid: std::process::id(),
                tunnel_mark: mark,
                outbound_v4: Some(Ipv4Addr::LOCALHOST),
                outbound_v6: Some(Ipv6Addr::LOCALHOST),
                outbound_port: port,
            })
            .unwrap_or_else(|error| panic!("failed to configure: {}", report(&error)));
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Deref for ScratchDatapath {
    type Target = Datapath;

    fn deref(&self) -> &Datapath {
        self.datapath
            .as_ref()
            .expect("the datapath is stopped; call restart() first")
    }
}

impl DerefMut for ScratchDatapath {
    fn deref_mut(&mut self) -> &mut Datapath {
        self.datapath
            .as_mut()
            .expect("the datapath is stopped; call restart() first")
    }
}

impl Drop for ScratchDatapath {
    fn drop(&mut self) {
        self.datapath = None;
        if let Err(error) = Datapath::uninstall(&self.pin_dir) {
            eprintln!(
                "warning: failed to uninstall {}: {}",
                self.pin_dir.display(),
                report(&error)
            );
        }
    }
}

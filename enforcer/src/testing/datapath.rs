//! A datapath installed for one test: attached to a scratch cgroup, steering in a scratch
//! network namespace, pinned under a unique bpffs directory, uninstalled (links detached, pins
//! removed) when dropped.

use std::{
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    ops::{Deref, DerefMut},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use crate::kernel::{
    DaemonConfig, Datapath, DatapathOptions, ListenerSlot, LoadError, netns_cookie,
};

use super::{Netns, ScratchCgroup, report, unique_name};

/// The bpffs mount the scratch pin directories live under (mounted if needed).
pub(super) const BPFFS: &str = "/sys/fs/bpf";

/// An installed datapath that uninstalls itself.
pub struct ScratchDatapath {
    datapath: Option<Datapath>,
    pin_dir: PathBuf,
    // Keep the namespace and the scope cgroup alive until the programs are detached.
    netns: Netns,
    _scope: ScratchCgroup,
}

impl ScratchDatapath {
    /// Install the programs on `scope` with the default options.
    #[must_use]
    pub fn install(scope: &ScratchCgroup) -> Self {
        Self::install_with(scope, |_| {})
    }

    /// Install the programs on `scope`, steering in a new namespace, after `adjust` has
    /// changed the options.
    #[must_use]
    pub fn install_with(scope: &ScratchCgroup, adjust: impl FnOnce(&mut DatapathOptions)) -> Self {
        Self::install_in(scope, &Netns::new("dp"), adjust)
    }

    /// Install the programs on `scope`, steering in `netns`, after `adjust` has changed the
    /// options.
    #[must_use]
    pub fn install_in(
        scope: &ScratchCgroup,
        netns: &Netns,
        adjust: impl FnOnce(&mut DatapathOptions),
    ) -> Self {
        Self::try_install_in(scope, netns, adjust)
            .unwrap_or_else(|error| panic!("failed to install the datapath: {}", report(&error)))
    }

    /// [`install_in`](Self::install_in), returning the loader's error instead of panicking:
    /// for tests that expect a kernel to refuse the datapath.
    pub fn try_install_in(
        scope: &ScratchCgroup,
        netns: &Netns,
        adjust: impl FnOnce(&mut DatapathOptions),
    ) -> Result<Self, LoadError> {
        let pin_dir = Path::new(BPFFS).join(unique_name("pins"));
        let mut options = DatapathOptions::new(&pin_dir, scope.path());
        options.netns = netns.path();
        adjust(&mut options);
        let datapath = Datapath::install(&options)?;
        Ok(Self {
            datapath: Some(datapath),
            pin_dir,
            netns: netns.clone(),
            _scope: scope.clone(),
        })
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

    /// The namespace the datapath steers in (where the tests' clients and servers live).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The cookie of [`netns`](Self::netns), as the kernel's tables name it.
    #[must_use]
    pub fn netns_cookie(&self) -> u64 {
        self.netns.within(|| {
            crate::kernel::Netns::current()
                .unwrap_or_else(|error| panic!("failed to open the test namespace: {error}"))
                .cookie()
        })
    }

    /// Make `v4` and `v6` (listening sockets in [`netns`](Self::netns)) the daemon's outbound
    /// listeners: enrolled connects are redirected to `127.0.0.1:port` and `[::1]:port`, and
    /// the kernel hands those to them; the namespace counts as served. `inbound_port` is
    /// reserved for the daemon too.
    pub fn serve_on_loopback(
        &mut self,
        port: u16,
        inbound_port: u16,
        (v4, v6): (&TcpListener, &TcpListener),
    ) {
        let cookie = netns_cookie(v4.as_fd()).expect("read the namespace cookie");
        let maps = self.maps_mut();
        let configured = maps
            .set_listener(ListenerSlot::Outbound4, v4.as_fd())
            .and_then(|()| maps.set_listener(ListenerSlot::Outbound6, v6.as_fd()))
            .and_then(|()| {
                maps.set_config(&DaemonConfig {
                    outbound_v4: Some(Ipv4Addr::LOCALHOST),
                    outbound_v6: Some(Ipv6Addr::LOCALHOST),
                    outbound_port: port,
                    inbound_port,
                    netns_cookie: cookie,
                    kernel_flows: false,
                })
            })
            .and_then(|()| maps.replace_served(&[cookie]));
        configured.unwrap_or_else(|error| panic!("failed to configure: {}", report(&error)));
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

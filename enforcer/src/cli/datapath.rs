//! `enforcer status` and `enforcer uninstall`: the pinned datapath.

use std::path::Path;

use anyhow::Context as _;

use crate::kernel::{Counter, Datapath, LoadError, PolicyMeta};

/// Print the state of the datapath pinned in `pin_dir`.
pub(super) fn status(pin_dir: &Path) -> anyhow::Result<()> {
    let datapath = match Datapath::adopt(pin_dir) {
        Ok(datapath) => datapath,
        Err(LoadError::Incomplete { missing, .. }) if !pin_dir.exists() => {
            println!(
                "datapath: not installed ({} absent; first link {missing})",
                pin_dir.display()
            );
            return Ok(());
        }
        Err(error) => return Err(error).context("failed to open the datapath"),
    };
    let maps = datapath.maps();
    let policy = maps.active_policy()?;
    let config = maps.config()?;
    println!("datapath: installed at {}", pin_dir.display());
    println!(
        "policy: slot {} version {} mode {}",
        maps.active_slot()?,
        policy.version,
        if policy.mode == PolicyMeta::MODE_AUDIT {
            "audit"
        } else {
            "enforce"
        }
    );
    println!(
        "daemon ports: redirect {} inbound {}",
        config.outbound_port, config.inbound_port
    );
    println!(
        "packet sockets of enrolled processes: {}",
        if datapath.refuses_packet_sockets() {
            "refused (BPF LSM)"
        } else {
            "NOT refused (the kernel does not run the BPF LSM program)"
        }
    );
    for counter in Counter::ALL {
        println!("counter {:<16} {}", counter.name(), maps.counter(counter)?);
    }
    Ok(())
}

/// Detach every program and remove every pin under `pin_dir`.
pub(super) fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    Datapath::uninstall(pin_dir)
        .with_context(|| format!("failed to uninstall {}", pin_dir.display()))?;
    tracing::info!(pin_dir = %pin_dir.display(), "datapath uninstalled");
    Ok(())
}

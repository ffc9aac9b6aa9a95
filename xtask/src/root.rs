//! The one privilege check: tasks that attach eBPF programs or create cgroups and network
//! namespaces refuse to start without root instead of failing halfway or passing vacuously.

use std::fs;

use anyhow::{Context, Result, bail};

/// Fails with `reason` unless this process runs with effective uid 0.
pub(crate) fn require(reason: &str) -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let uid = effective_uid(&status).context("no Uid line in /proc/self/status")?;
    if uid != 0 {
        bail!("{reason} (running as uid {uid}); rerun this xtask command as root");
    }
    Ok(())
}

/// The effective uid from the `Uid:` line of `/proc/<pid>/status` (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status =
            "Name:\tcargo\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
    }

    #[test]
    fn effective_uid_rejects_malformed_status() {
        assert_eq!(effective_uid("Name:\tx\n"), None);
        assert_eq!(effective_uid("Uid:\t0\n"), None);
        assert_eq!(effective_uid("Uid:\t0\troot\n"), None);
    }
}

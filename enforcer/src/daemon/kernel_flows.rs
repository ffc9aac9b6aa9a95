//! Same-node connections the kernel authorized (they go direct, see the connect hook): the
//! daemon closes the ones a reloaded policy denies, and those an earlier run left, whose
//! identity numbers were that run's. Each is closed with `SOCK_DESTROY` in the client's own
//! network namespace; the kernel's close event then becomes the flow's close record, with
//! reason `revoked`.
#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    io,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use super::namespaces::Namespaces;
use crate::{
    kernel::{KernelFlow, Maps, Netns, SockDestroyer},
    policy::InForce,
    report::report,
};

/// How long a kernel flow may wait for its SYN to be built before it counts as a `connect()`
/// that failed early (the SYN is built within the `connect()` call itself).
const STALE_AFTER: Duration = Duration::from_mins(1);

/// The kernel's flows, as the daemon closes them.
pub(crate) struct KernelFlows {
    /// The maps (`ENF_KERNEL_FLOWS` is read).
    maps: Arc<Mutex<Maps>>,
    /// Where each client socket lives.
    namespaces: Arc<Namespaces>,
    /// Cookies of the flows closed here whose close event has not come yet.
    revoked: Mutex<HashSet<u64>>,
}

impl KernelFlows {
    pub(crate) fn new(maps: Arc<Mutex<Maps>>, namespaces: Arc<Namespaces>) -> Self {
        Self {
            maps,
            namespaces,
            revoked: Mutex::default(),
        }
    }

    /// Whether the kernel closes sockets on request here (`CONFIG_INET_DIAG_DESTROY`):
    /// without it the daemon could not end a flow a reload denies, so same-node flows stay
    /// in the tunnel.
    pub(crate) fn supported() -> bool {
        match SockDestroyer::new()
            .map_err(Into::into)
            .and_then(|d| d.supported())
        {
            Ok(supported) => supported,
            Err(error) => {
                tracing::warn!(error = %report(&error), "failed to ask the kernel whether it closes sockets on request");
                false
            }
        }
    }

    /// Close every open kernel flow `in_force` denies; returns how many were closed.
    pub(crate) fn revoke_denied(&self, in_force: &InForce) -> usize {
        self.close_where(|flow| {
            let name = |number| in_force.identities.id(number);
            let (Some(src), Some(dst)) = (name(flow.src_id), name(flow.dst_id)) else {
                return true;
            };
            !in_force.view.decide(src, dst, flow.dst.port()).allowed
        })
    }

    /// Forget the flows whose `connect()` failed before the SYN was built (no route, no free
    /// port): no close callback comes for them. Returns how many went.
    pub(crate) fn sweep(&self) -> usize {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let now = Duration::new(
            u64::try_from(now.tv_sec).unwrap_or(0),
            u32::try_from(now.tv_nsec).unwrap_or(0),
        );
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        let stale: Vec<u64> = maps
            .kernel_flows()
            .iter()
            .filter(|flow| flow.local.is_none() && now.saturating_sub(flow.since) > STALE_AFTER)
            .map(|flow| flow.cookie)
            .collect();
        for cookie in &stale {
            if let Err(error) = maps.forget_kernel_flow(*cookie) {
                tracing::warn!(cookie, error = %report(&error), "failed to forget a stale kernel flow");
            }
        }
        stale.len()
    }

    /// Close every kernel flow (at start: the ones an earlier run authorized).
    pub(crate) fn close_all(&self) -> usize {
        self.close_where(|_| true)
    }

    /// Whether the flow of client socket `cookie` was closed here (asked once, by its close
    /// record).
    pub(crate) fn take_revoked(&self, cookie: u64) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&cookie)
    }

    fn close_where(&self, close: impl Fn(&KernelFlow) -> bool) -> usize {
        let flows = self
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kernel_flows();
        let mut closed = 0;
        for flow in flows.iter().filter(|flow| close(flow)) {
            match self.close(flow) {
                Ok(()) => closed += 1,
                Err(error) => {
                    tracing::warn!(cookie = flow.cookie, pid = flow.tgid, dst = %flow.dst, %error, "failed to close a same-node connection the policy denies");
                }
            }
        }
        closed
    }

    fn close(&self, flow: &KernelFlow) -> Result<(), String> {
        let destroyer = self
            .destroyer_in(flow)
            .map_err(|error| format!("no sock_diag socket in its namespace: {error}"))?;
        if flow.established {
            self.revoked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(flow.cookie);
        }
        destroyer
            .destroy(flow)
            .map_err(|error| report(&error).clone())
    }

    /// A destroyer in `flow`'s client namespace: a served one, or else the one its process
    /// lives in (at start, before the first scan serves the workloads' namespaces).
    fn destroyer_in(&self, flow: &KernelFlow) -> io::Result<SockDestroyer> {
        match self.namespaces.run_in(flow.netns, SockDestroyer::new) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let home = self.namespaces.home();
                let netns = Netns::of_process(flow.tgid, home)?;
                if netns.cookie() != flow.netns {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("process {} left namespace {}", flow.tgid, flow.netns),
                    ));
                }
                netns.run(home, SockDestroyer::new)?
            }
            made => made?,
        }
    }
}

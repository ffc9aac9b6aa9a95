//! The kernel's side of the audit trail: a thread reads the event ring buffer, turns each
//! decision (redirect, deny, audit, egress, drop, no listener) and each same-node flow the
//! kernel authorized (open, close) into an audit record joined with the identities and
//! process facts the daemon knows, hands process events (listen, exec,
//! exit, move) to the registrar, and records every event the kernel lost as a loss record.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use enforcer_ebpf::reasons;

use super::{Recorder, kernel_flows::KernelFlows, workloads::Registrar};
use crate::{
    audit::{self, Entry},
    kernel::{Counter, EventKind, EventReader, KernelEvent, Maps},
    policy::PolicySnapshot,
    report::report,
    workload_api::Changes,
};

/// Longest wait for the ring buffer before the loss counter is checked again.
const POLL_TIMEOUT: Duration = Duration::from_millis(200);

/// Everything the reader needs.
pub(crate) struct EventPump {
    /// The ring buffer.
    pub(crate) reader: EventReader,
    /// For the loss counter.
    pub(crate) maps: Arc<Mutex<Maps>>,
    /// The policy in force, for the identities that numbers in events stand for.
    pub(crate) policy: PolicySnapshot,
    /// Process facts, and the processes to register.
    pub(crate) registrar: Arc<Registrar>,
    /// Where records go.
    pub(crate) recorder: Recorder,
    /// Where the loss counter already reported is kept across restarts.
    pub(crate) lost_file: PathBuf,
    /// Where an exec, exit or move is reported (Workload API streams of the process look
    /// again).
    pub(crate) changes: Changes,
    /// Which kernel flows the daemon closed (their close records say `revoked`).
    pub(crate) kernel_flows: Arc<KernelFlows>,
}

/// The running reader thread; [`stop`](Self::stop) ends it.
pub(crate) struct EventThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EventThread {
    /// Start reading.
    pub(crate) fn start(pump: EventPump) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("kernel-events".to_owned())
            .spawn(move || pump.run(&flag))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Read what is left, then stop.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl EventPump {
    fn run(mut self, stop: &AtomicBool) {
        let mut reported = self.load_reported();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            self.wait();
            for item in self.reader.drain() {
                match item {
                    Ok(event) => self.handle(&event),
                    Err(error) => {
                        tracing::warn!(error = %report(&error), "undecodable kernel event");
                    }
                }
            }
            reported = self.check_losses(reported);
            if stopping {
                return;
            }
        }
    }

    /// Block until the ring buffer has data, or [`POLL_TIMEOUT`].
    fn wait(&self) {
        let mut fds = [PollFd::new(&self.reader, PollFlags::IN)];
        let timeout = Timespec::try_from(POLL_TIMEOUT).ok();
        if let Err(error) = poll(&mut fds, timeout.as_ref()) {
            tracing::debug!(%error, "poll on the event ring buffer failed");
            std::thread::sleep(POLL_TIMEOUT);
        }
    }

    fn handle(&self, event: &KernelEvent) {
        self.recorder.telemetry.kernel_event();
        match event.kind {
            EventKind::Listen if event.reason == reasons::TABLE_FULL => {
                tracing::warn!(pid = event.tgid, addr = %event.src, "the services table is full: this listening socket is protected, but nothing can reach it");
                self.recorder.submit(self.entry(event));
                self.registrar.register(event.tgid);
            }
            EventKind::Listen if event.reason == reasons::SHARED => {
                tracing::info!(pid = event.tgid, addr = %event.src, "a listening socket joined an address another listener serves (SO_REUSEPORT): it is protected, and the address stays the first listener's");
                self.registrar.register(event.tgid);
            }
            EventKind::Listen => self.registrar.register(event.tgid),
            EventKind::Exec | EventKind::Move => {
                self.registrar.reattest(event.tgid);
                self.changes.process(event.tgid);
            }
            EventKind::Exit => {
                self.registrar.forget(event.tgid);
                self.changes.process(event.tgid);
            }
            EventKind::Enroll => {
                tracing::info!(
                    cgroup_id = event.cgroup_id,
                    "a cgroup created at an enrolled path was enrolled by the kernel"
                );
            }
            EventKind::Redirect
            | EventKind::Deny
            | EventKind::Audit
            | EventKind::Egress
            | EventKind::Drop
            | EventKind::NoListener
            | EventKind::FlowOpen => self.recorder.submit(self.entry(event)),
            EventKind::FlowClose => {
                let mut entry = self.entry(event);
                if self.kernel_flows.take_revoked(event.cookie) {
                    "revoked".clone_into(&mut entry.reason);
                }
                entry.bytes_up = Some(event.bytes_up);
                entry.bytes_down = Some(event.bytes_down);
                entry.duration_ms =
                    Some(u64::try_from(event.duration.as_millis()).unwrap_or(u64::MAX));
                self.recorder.submit(entry);
            }
        }
    }

    /// The audit entry of a decision event.
    fn entry(&self, event: &KernelEvent) -> Entry {
        let in_force = self.policy.load();
        let name = |number: u32| in_force.identities.id(number).map(ToString::to_string);
        let (event_kind, verdict, reason) = decision(event);
        let addr = |addr: std::net::SocketAddr| (addr.port() != 0).then(|| addr.to_string());
        let mut dst = audit::Dst {
            spiffe_id: name(event.dst_id),
            addr: addr(event.dst),
            ..audit::Dst::default()
        };
        if matches!(event.kind, EventKind::FlowOpen | EventKind::FlowClose)
            && let Some(container) = self.registrar.container_of_cgroup(event.dst_cgroup_id)
        {
            dst.container_id = container.container_id;
            dst.pod_uid = container.pod_uid;
        }
        let src = if event.kind == EventKind::Drop {
            // The receiver of a dropped packet is the local socket of cgroup `cgroup_id`; its
            // sender is remote or unenrolled: only its address.
            if let Some(container) = self.registrar.container_of_cgroup(event.cgroup_id) {
                dst.container_id = container.container_id;
                dst.pod_uid = container.pod_uid;
            }
            audit::Src {
                addr: addr(event.src),
                ..audit::Src::default()
            }
        } else {
            let known = self.registrar.provenance(event.tgid);
            let container = known.as_ref().map(|known| known.container.clone());
            audit::Src {
                spiffe_id: name(event.src_id),
                pid: Some(event.tgid),
                exe: known.as_ref().map(|known| known.exe.clone()),
                sha256: known.as_ref().map(|known| known.sha256.clone()),
                cgroup: known.map(|known| known.cgroup),
                cgroup_id: Some(event.cgroup_id),
                container_id: container.as_ref().and_then(|c| c.container_id.clone()),
                pod_uid: container.and_then(|c| c.pod_uid),
                addr: addr(event.src),
            }
        };
        Entry {
            time: event_time(event.timestamp_ns),
            rule: (event.rule != 0).then_some(event.rule),
            policy_version: event.policy_version,
            src,
            dst,
            ..Entry::new(audit::Source::Kernel, event_kind, verdict, reason)
        }
    }

    /// Write a loss record when the kernel's lost-event counter moved past `reported`;
    /// returns the counter's value now.
    fn check_losses(&self, reported: u64) -> u64 {
        let lost = match self
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counter(Counter::LostEvents)
        {
            Ok(lost) => lost,
            Err(error) => {
                tracing::warn!(error = %report(&error), "failed to read the lost-event counter");
                return reported;
            }
        };
        if lost <= reported {
            return reported;
        }
        tracing::warn!(
            lost = lost - reported,
            "the kernel lost events: ring buffer full"
        );
        self.recorder.submit(loss_entry(lost - reported));
        if let Err(error) = std::fs::write(&self.lost_file, lost.to_string()) {
            tracing::warn!(path = %self.lost_file.display(), %error, "failed to save the lost-event count");
        }
        lost
    }

    /// The loss counter value an earlier run already recorded (0 for a first start).
    fn load_reported(&self) -> u64 {
        std::fs::read_to_string(&self.lost_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The audit event, verdict and reason of a decision event. A redirect decides nothing: the
/// tunnel's own record of the flow says whether it was allowed.
fn decision(event: &KernelEvent) -> (audit::Event, audit::Verdict, &'static str) {
    let refused = |reason| (audit::Event::Deny, audit::Verdict::Deny, reason);
    match (event.kind, event.reason) {
        (EventKind::Redirect, _) => (
            audit::Event::Redirect,
            audit::Verdict::Redirect,
            "to-tunnel",
        ),
        (EventKind::Audit, _) => (audit::Event::Audit, audit::Verdict::Audit, "policy"),
        (EventKind::Egress, _) => (audit::Event::Egress, audit::Verdict::Allow, "egress"),
        (EventKind::FlowOpen, _) => (audit::Event::Open, audit::Verdict::Allow, "policy"),
        (EventKind::FlowClose, _) => (audit::Event::Close, audit::Verdict::Allow, "finished"),
        (EventKind::NoListener, reasons::NAMESPACE) => refused("namespace-not-served"),
        (EventKind::NoListener, _) => refused("no-listener"),
        (EventKind::Drop, reasons::MISDELIVERED) => {
            (audit::Event::Drop, audit::Verdict::Drop, "misdelivered")
        }
        (EventKind::Drop, reasons::INBOUND) => {
            (audit::Event::Drop, audit::Verdict::Drop, "inbound-protocol")
        }
        (EventKind::Drop, _) => (audit::Event::Drop, audit::Verdict::Drop, "bypass"),
        (_, reasons::PROTOCOL) => refused("protocol"),
        (_, reasons::RAW_SOCKET) => refused("raw-socket"),
        (_, reasons::TABLE_FULL) => refused("table-full"),
        (_, reasons::RESERVED_PORT) => refused("reserved-port"),
        _ => refused("policy"),
    }
}

/// A loss record for `lost` kernel events.
fn loss_entry(lost: u64) -> Entry {
    Entry {
        source: audit::Source::Kernel,
        ..Entry::loss(
            "ring-buffer-full",
            lost,
            Some("kernel events lost: the event ring buffer was full".to_owned()),
        )
    }
}

/// Wall-clock time of a `CLOCK_MONOTONIC` timestamp.
fn event_time(monotonic_ns: u64) -> SystemTime {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let now_ns = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0);
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(monotonic_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, reason: u32) -> KernelEvent {
        let nowhere = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        KernelEvent {
            kind,
            timestamp_ns: 0,
            cookie: 0,
            cgroup_id: 0,
            policy_version: 1,
            tgid: 1,
            src_id: 0,
            dst_id: 0,
            rule: 0,
            reason,
            src: nowhere,
            dst: nowhere,
            protocol: 6,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            dst_cgroup_id: 0,
        }
    }

    #[test]
    fn a_redirect_is_recorded_as_a_redirect_not_an_allow() {
        assert_eq!(
            decision(&event(EventKind::Redirect, 0)),
            (
                audit::Event::Redirect,
                audit::Verdict::Redirect,
                "to-tunnel"
            )
        );
        assert_eq!(
            decision(&event(EventKind::Egress, 0)),
            (audit::Event::Egress, audit::Verdict::Allow, "egress"),
            "plaintext egress is allowed end to end"
        );
    }

    #[test]
    fn refusals_and_drops_name_why() {
        let reason = |kind, code| decision(&event(kind, code)).2;
        assert_eq!(reason(EventKind::Deny, reasons::POLICY), "policy");
        assert_eq!(reason(EventKind::Deny, reasons::PROTOCOL), "protocol");
        assert_eq!(reason(EventKind::Deny, reasons::RAW_SOCKET), "raw-socket");
        assert_eq!(reason(EventKind::Listen, reasons::TABLE_FULL), "table-full");
        assert_eq!(
            reason(EventKind::NoListener, reasons::NAMESPACE),
            "namespace-not-served"
        );
        assert_eq!(reason(EventKind::NoListener, 0), "no-listener");
        assert_eq!(
            reason(EventKind::Deny, reasons::RESERVED_PORT),
            "reserved-port"
        );
        assert_eq!(reason(EventKind::Drop, reasons::BYPASS), "bypass");
        assert_eq!(
            reason(EventKind::Drop, reasons::MISDELIVERED),
            "misdelivered"
        );
        assert_eq!(
            reason(EventKind::Drop, reasons::INBOUND),
            "inbound-protocol"
        );
        assert_eq!(reason(EventKind::NoListener, 0), "no-listener");
        assert_eq!(
            decision(&event(EventKind::Drop, reasons::BYPASS)).1,
            audit::Verdict::Drop
        );
    }

    #[test]
    fn monotonic_timestamps_map_to_wall_clock() {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let ns = u64::try_from(now.tv_sec).expect("secs") * 1_000_000_000
            + u64::try_from(now.tv_nsec).expect("nsecs");
        let then = event_time(ns - 2_000_000_000);
        let ago = SystemTime::now().duration_since(then).expect("in the past");
        assert!(
            ago >= Duration::from_secs(2) && ago < Duration::from_secs(3),
            "{ago:?}"
        );
    }
}

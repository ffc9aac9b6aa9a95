//! The audit entry for a tunnel flow record. The conversion lives with the daemon, which feeds
//! the tunnel's records to the audit trail, so that neither of the two imports the other.
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::{
    audit::{Dst, Entry, Event, Source, Src, Verdict},
    tunnel::{self, FlowEvent, FlowRecord, Party, Side},
};

/// The audit entry for the tunnel flow record `record`: sides become sources, the tunnel's
/// verdicts the audit's, and counters are kept for close records only.
pub(super) fn from_flow(record: &FlowRecord) -> Entry {
    let closed = record.event == FlowEvent::Close;
    let addr = |party: &Party| party.addr.map(|a| a.to_string());
    let id = |party: &Party| party.id.as_ref().map(ToString::to_string);
    Entry {
        time: record.time,
        source: match record.side {
            Side::Outbound => Source::Outbound,
            Side::Inbound => Source::Inbound,
        },
        event: match record.event {
            FlowEvent::Open => Event::Open,
            FlowEvent::Close => Event::Close,
            FlowEvent::Deny => Event::Deny,
        },
        verdict: match record.verdict {
            tunnel::FlowVerdict::Allow => Verdict::Allow,
            tunnel::FlowVerdict::Deny => Verdict::Deny,
            tunnel::FlowVerdict::Audit => Verdict::Audit,
        },
        reason: record.reason.as_str().to_owned(),
        rule: record.rule,
        policy_version: record.policy_version,
        src: Src {
            spiffe_id: id(&record.src),
            pid: record.src.pid,
            exe: record.src.exe.as_ref().map(|p| p.display().to_string()),
            sha256: None,
            cgroup: None,
            cgroup_id: record.src.cgroup_id,
            container_id: record.src.placement.container_id.clone(),
            pod_uid: record.src.placement.pod_uid.clone(),
            addr: addr(&record.src),
        },
        dst: Dst {
            spiffe_id: id(&record.dst),
            container_id: record.dst.placement.container_id.clone(),
            pod_uid: record.dst.placement.pod_uid.clone(),
            addr: addr(&record.dst),
        },
        bytes_up: closed.then_some(record.bytes_up),
        bytes_down: closed.then_some(record.bytes_down),
        duration_ms: closed.then(|| millis(record.duration)),
        lost: None,
        detail: None,
    }
}

/// Whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::PathBuf, time::Duration};

    use super::*;
    use crate::{
        audit::samples,
        tunnel::{Reason, Refusal},
    };

    fn flow(side: Side, event: FlowEvent) -> FlowRecord {
        FlowRecord {
            time: samples::time(),
            side,
            event,
            verdict: tunnel::FlowVerdict::Allow,
            reason: Reason::Finished,
            rule: Some(3),
            policy_version: 9,
            src: Party {
                id: Some("spiffe://td/web".parse().unwrap()),
                addr: Some(SocketAddr::from(([10, 0, 0, 1], 40112))),
                pid: Some(812),
                cgroup_id: Some(77),
                exe: Some(PathBuf::from("/usr/bin/curl")),
                ..Party::default()
            },
            dst: Party {
                id: Some("spiffe://td/db".parse().unwrap()),
                addr: Some(SocketAddr::from(([10, 0, 0, 2], 5432))),
                ..Party::default()
            },
            bytes_up: 1200,
            bytes_down: 5300,
            duration: Duration::from_micros(1_520_900),
        }
    }

    #[test]
    fn from_flow_maps_sides_events_verdicts_and_parties() {
        // Exactly the entry the audit trail's own tests display.
        assert_eq!(
            from_flow(&flow(Side::Outbound, FlowEvent::Close)),
            samples::outbound_close()
        );

        let open = from_flow(&flow(Side::Inbound, FlowEvent::Open));
        assert_eq!((open.source, open.event), (Source::Inbound, Event::Open));
        assert_eq!(
            (open.bytes_up, open.bytes_down, open.duration_ms),
            (None, None, None)
        );

        let mut refused = flow(Side::Inbound, FlowEvent::Deny);
        refused.verdict = tunnel::FlowVerdict::Deny;
        refused.reason = Reason::Refused(Refusal::Denied);
        let deny = from_flow(&refused);
        assert_eq!((deny.event, deny.verdict), (Event::Deny, Verdict::Deny));
        assert_eq!(deny.reason, Refusal::Denied.as_str());
        assert_eq!(deny.bytes_up, None);

        refused.verdict = tunnel::FlowVerdict::Audit;
        assert_eq!(from_flow(&refused).verdict, Verdict::Audit);
    }

    #[test]
    fn the_inbound_no_route_deny_keeps_addresses_only() {
        let mut inbound = flow(Side::Inbound, FlowEvent::Deny);
        inbound.verdict = tunnel::FlowVerdict::Deny;
        inbound.reason = Reason::NoRoute;
        inbound.rule = None;
        inbound.src = Party {
            addr: inbound.src.addr,
            ..Party::default()
        };
        inbound.dst.id = None;
        assert_eq!(
            from_flow(&inbound),
            Entry {
                time: samples::time(),
                policy_version: 9,
                src: Src {
                    addr: Some("10.0.0.1:40112".to_owned()),
                    ..Src::default()
                },
                dst: Dst {
                    spiffe_id: None,
                    addr: Some("10.0.0.2:5432".to_owned()),
                    ..Dst::default()
                },
                ..Entry::new(Source::Inbound, Event::Deny, Verdict::Deny, "no-route")
            }
        );
    }
}

//! The outbound side: the listener the kernel redirects enrolled workloads' connections to.
//!
//! For each accepted connection: find who the client is and where it wanted to go
//! ([`super::Origins`]: off the async worker when the client must be attested now), and
//! whether an enrolled workload of this node listens there ([`super::LocalWorkloads`]), then
//! route it:
//! 1. the destination is an enrolled workload of this node: authorize (source, destination,
//!    port) and connect to it with a hop the kernel admits only to that workload's listener
//!    (same-node flows get the same checks and records as tunnelled ones);
//! 2. the destination's address is a mesh peer: take a pooled connection made with the
//!    source's SVID and send a CONNECT; the server's proven SPIFFE ID must be one policy lets
//!    the source reach on that port before a byte of the client's is sent, and when it is, the
//!    client's first bytes follow the CONNECT without waiting for its status (the peer's node
//!    delivers them only if it accepts);
//! 3. an egress entry permits plaintext to the destination: connect to it directly;
//! 4. otherwise, and on every refusal: reset the client's connection and write a deny record.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};

use super::{
    FlowVerdict, Node, Party, Reason, Side,
    copy::{H2Sink, H2Source, forward_until, tcp_ends, tcp_whole},
    metrics::Metric,
    net::{self, Dial},
    new_record,
    pool::PoolError,
    state::{LocalOwner, Namespace, Origin, OriginError, off_worker},
    verdict,
};
use crate::{policy::PolicyView, report::report};

/// The most of a client's bytes sent on a stream before its status arrives: enough for a first
/// request, little for the peer to hold for a stream it may refuse.
const EARLY_BUDGET: u64 = 64 * 1024;

/// Accept redirected connections, on a listener of namespace `netns`, until the task is
/// aborted.
pub(super) async fn serve(node: Arc<Node>, listener: TcpListener, netns: Namespace) {
    // Accepted sockets inherit TCP_NODELAY; clients are local, so no keepalive.
    if let Err(error) = net::tune(&listener, None) {
        tracing::warn!(%error, "failed to tune the outbound listener");
    }
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                tokio::spawn(handle(Arc::clone(&node), tcp, client, netns));
            }
            Err(error) => {
                tracing::warn!(%error, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One redirected connection, accepted in namespace `netns`: who, where, then the route.
async fn handle(node: Arc<Node>, tcp: TcpStream, client: SocketAddr, netns: Namespace) {
    node.metrics.inc(Metric::OutboundAccepted);
    let accepted = Instant::now();
    let view = node.policy();
    let accepted_at = match tcp.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::debug!(%client, %error, "accepted socket has no local address");
            return;
        }
    };
    let found = if let Some(origin) = node.origins.origin_at_once(netns, client, accepted_at) {
        Some(Ok(origin))
    } else {
        let origins = Arc::clone(&node.origins);
        off_worker(move || origins.origin(netns, client, accepted_at)).await
    };
    let origin = match found {
        None => {
            tracing::debug!(%client, "the runtime is shutting down; connection dropped");
            return;
        }
        Some(Ok(origin)) => origin,
        Some(Err(error)) => {
            tracing::info!(%client, error = %report(&error), "refusing an unidentified client");
            let (src, dst) = error.parties(client);
            let reason = match error {
                OriginError::Changed { .. } => Reason::ChangedSinceConnect,
                OriginError::NotRedirected(_)
                | OriginError::Attest { .. }
                | OriginError::NoIdentity { .. } => Reason::NoIdentity,
            };
            return refuse(&node, &view, tcp, (reason, None), &src, &dst);
        }
    };
    let owner = node.workloads.owner(netns, origin.dst);
    let flow = Flow {
        src: Party {
            id: Some(origin.id.clone()),
            addr: Some(client),
            pid: Some(origin.pid),
            cgroup_id: Some(origin.cgroup_id),
            exe: origin.exe.clone(),
            placement: origin.placement.clone(),
        },
        dst: Party {
            addr: Some(origin.dst),
            ..Party::default()
        },
        origin,
        view,
    };
    node.metrics.outbound_decision.observe(accepted.elapsed());
    if let Some(owner) = owner {
        local(&node, flow, tcp, owner).await;
    } else if let Some(peer) = flow.view.peer(flow.origin.dst.ip()) {
        tunnel(&node, flow, tcp, peer).await;
    } else if let Some(egress) = flow.view.egress(flow.origin.dst) {
        tracing::debug!(dst = %flow.origin.dst, %egress, "plaintext egress");
        plaintext(&node, flow, tcp, netns).await;
    } else {
        flow.refuse(&node, tcp, (Reason::NoRoute, None));
    }
}

/// A redirected connection being routed.
struct Flow {
    origin: Origin,
    view: Arc<PolicyView>,
    src: Party,
    dst: Party,
}

impl Flow {
    /// A record of this flow with `why` (verdict, reason, rule).
    fn record(&self, why: (FlowVerdict, Reason, Option<u32>)) -> super::FlowRecord {
        new_record(Side::Outbound, &self.view, why, &self.src, &self.dst)
    }

    /// Refuse this flow for `why` (reason, rule).
    fn refuse(&self, node: &Node, tcp: TcpStream, why: (Reason, Option<u32>)) {
        refuse(node, &self.view, tcp, why, &self.src, &self.dst);
    }
}

/// Same node: authorize, then connect to the workload with a hop tagged for its identity,
/// made in the workload's network namespace.
async fn local(node: &Node, mut flow: Flow, tcp: TcpStream, owner: LocalOwner) {
    let dst = flow.origin.dst;
    flow.dst.id = Some(owner.id.clone());
    flow.dst.pid = owner.pid;
    flow.dst.placement = owner.placement.clone();
    let decision = flow.view.decide(&flow.origin.id, &owner.id, dst.port());
    if !decision.allowed {
        return flow.refuse(node, tcp, (Reason::Policy, decision.rule));
    }
    let config = &node.config;
    // Boxed, here and below: the connect state would otherwise stay inline in the flow's task
    // for the flow's whole life.
    let connecting = Box::pin(net::connect(
        dst,
        Dial::Hop(&owner),
        node.tags.as_ref(),
        config.connect_timeout,
        None,
    ));
    let upstream = match connecting.await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(%dst, error = %report(&error), "local workload unreachable");
            let why = (Reason::Refused(error.refusal()), decision.rule);
            return flow.refuse(node, tcp, why);
        }
    };
    let open = flow.record((verdict(decision), Reason::Policy, decision.rule));
    node.run_flow((open, 0), tcp_ends(tcp), tcp_ends(upstream))
        .await;
}

/// Mesh peer: CONNECT on a pooled connection as the source, with the client's first bytes sent
/// at once when policy lets the source reach the identity the server proved.
async fn tunnel(node: &Node, mut flow: Flow, tcp: TcpStream, peer: SocketAddr) {
    let dst = flow.origin.dst;
    let svid = match node.svids.svid(&flow.origin.id) {
        Ok(svid) => svid,
        Err(error) => {
            tracing::warn!(id = %flow.origin.id, error = %report(&error), "no SVID for a client");
            return flow.refuse(node, tcp, (Reason::NoSvid, None));
        }
    };
    let leased = match Box::pin(node.pool.lease(&svid, (peer, dst))).await {
        Ok(leased) => leased,
        Err(error) => return refuse_tunnel(node, &flow, tcp, peer, &error),
    };
    flow.dst.id = Some(leased.server_id().clone());
    let decision = flow
        .view
        .decide(&flow.origin.id, leased.server_id(), dst.port());
    let (sender, requested) = match leased.connect(dst, &flow.origin.placement).await {
        Ok(requested) => requested,
        Err(error) => return refuse_tunnel(node, &flow, tcp, peer, &error),
    };
    // Optimistic send: when the server proved an identity the source may reach, the client's
    // first bytes follow the CONNECT without waiting for its status; the peer delivers them
    // only if it accepts the stream, and a refusal resets the client as before. Otherwise
    // nothing of the client's is sent, and the peer's own answer is recorded when it refuses.
    let budget = if decision.allowed { EARLY_BUDGET } else { 0 };
    let (mut client_source, client_sink) = tcp_ends(tcp);
    let mut server_sink = H2Sink(sender);
    let (accepted, early) = forward_until(
        &mut client_source,
        &mut server_sink,
        budget,
        requested.accepted(),
    )
    .await;
    if let Ok(bytes) = &early {
        node.metrics.add(Metric::BytesBeforeStatus, *bytes);
    }
    let (accepted, early) = match (accepted, early) {
        (Ok(accepted), Ok(bytes)) => (accepted, bytes),
        (Err(error), _) => {
            let tcp = tcp_whole(client_source, client_sink);
            return refuse_tunnel(node, &flow, tcp, peer, &error);
        }
        (Ok(_), Err(error)) => {
            tracing::info!(%peer, %dst, %error, "tunnel stream failed before its status");
            let tcp = tcp_whole(client_source, client_sink);
            return flow.refuse(node, tcp, (Reason::PeerUnreachable, None));
        }
    };
    if !decision.allowed {
        // Dropping the stream resets it: the server's workload never sees a byte.
        drop((accepted, server_sink));
        let why = (Reason::ServerNotAuthorized, decision.rule);
        let tcp = tcp_whole(client_source, client_sink);
        return flow.refuse(node, tcp, why);
    }
    let stream = accepted.stream(server_sink.0);
    flow.dst.placement = stream.placement.clone();
    let open = flow.record((verdict(decision), Reason::Policy, decision.rule));
    node.run_flow(
        (open, early),
        (client_source, client_sink),
        (H2Source::new(stream.recv), H2Sink(stream.send)),
    )
    .await;
}

/// Refuse a flow the pool could not carry: `Refused` with the peer's refusal when it gave
/// one, `PeerUnreachable` otherwise.
fn refuse_tunnel(node: &Node, flow: &Flow, tcp: TcpStream, peer: SocketAddr, error: &PoolError) {
    let dst = flow.origin.dst;
    tracing::info!(%peer, %dst, error = %report(error), "tunnel refused");
    let reason = match error {
        PoolError::Refused { refusal, .. } => Reason::Refused(*refusal),
        _ => Reason::PeerUnreachable,
    };
    flow.refuse(node, tcp, (reason, None));
}

/// Permitted plaintext egress: connect directly, from the client's namespace `netns`.
async fn plaintext(node: &Node, flow: Flow, tcp: TcpStream, netns: Namespace) {
    let dst = flow.origin.dst;
    let config = &node.config;
    let connecting = Box::pin(net::connect(
        dst,
        Dial::Out(netns),
        node.tags.as_ref(),
        config.connect_timeout,
        config.keepalive,
    ));
    let upstream = match connecting.await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(%dst, error = %report(&error), "egress destination unreachable");
            let why = (Reason::Refused(error.refusal()), None);
            return flow.refuse(node, tcp, why);
        }
    };
    let open = flow.record((FlowVerdict::Allow, Reason::Egress, None));
    node.run_flow((open, 0), tcp_ends(tcp), tcp_ends(upstream))
        .await;
}

/// Refuse: reset the client at once and write a deny record.
fn refuse(
    node: &Node,
    view: &PolicyView,
    tcp: TcpStream,
    (reason, rule): (Reason, Option<u32>),
    src: &Party,
    dst: &Party,
) {
    node.metrics.inc(Metric::OutboundDenied);
    net::reset(tcp);
    node.deny(new_record(
        Side::Outbound,
        view,
        (FlowVerdict::Deny, reason, rule),
        src,
        dst,
    ));
}

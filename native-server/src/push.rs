//! Server-to-server push (`/corolla/push/1`): a session's step output goes straight to the
//! server of the next span, so a token crosses n + 1 one-way delays instead of 2n.
//!
//! Both ends are named by the client ([`SessionRequest::Link`]): a session pushes only to the
//! peer and session its client named, and takes pushes only from the peer its client named,
//! for its own token. Anything else on a push stream ends that stream.
//!
//! [`SessionRequest::Link`]: swarm::protocol::SessionRequest::Link

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use burn::prelude::*;
use libp2p::{Multiaddr, PeerId, Stream};
use swarm::node;
use swarm::protocol::{ErrorKind, MAX_PUSH_ADDRS, PUSH_PROTOCOL, ProtocolError, PushStep, PushTarget};

use crate::admission::Ticket;
use crate::hosted::refuse;
use crate::io::{self, IoError};
use crate::serve::Context;
use crate::session::Core;

/// The sessions of a span that take pushes, by token.
pub struct Registry<B: Backend> {
    sessions: Mutex<HashMap<u64, Weak<Core<B>>>>,
}

impl<B: Backend> Default for Registry<B> {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

impl<B: Backend> Registry<B> {
    /// Names `core` `token` for pushes, instead of `previous`. A token another live session
    /// holds is refused: tokens are the client's random choice, so a clash is an attack or a bug.
    pub fn register(&self, token: u64, previous: Option<u64>, core: &Arc<Core<B>>) -> Result<(), ProtocolError> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = sessions.get(&token)
            && let Some(other) = held.upgrade()
            && !Arc::ptr_eq(&other, core)
        {
            return Err(refuse(
                ErrorKind::BadRequest,
                "this push token is taken by another session",
            ));
        }
        if let Some(old) = previous {
            sessions.remove(&old);
        }
        // Sessions that ended while a push held them could not take their name out.
        sessions.retain(|_, core| core.strong_count() > 0);
        sessions.insert(token, Arc::downgrade(core));
        Ok(())
    }

    pub fn unregister(&self, token: u64) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&token);
    }

    fn get(&self, token: u64) -> Option<Arc<Core<B>>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&token)
            .and_then(Weak::upgrade)
    }

    /// Whether some session takes pushes from `peer`: streams from anyone else are dropped
    /// unread.
    fn expects(&self, peer: &PeerId) -> bool {
        self.linked(peer) > 0
    }

    /// How many sessions take pushes from `peer`.
    fn linked(&self, peer: &PeerId) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .values()
            .filter_map(Weak::upgrade)
            .filter(|core| core.takes_pushes_from(peer))
            .count()
    }
}

/// Serves one inbound push stream: each frame is a step for the session it names, run as if
/// its client had sent it.
pub async fn serve<B: Backend>(ctx: Arc<Context<B>>, peer: PeerId, mut stream: Stream, ticket: Ticket)
where
    B::Device: Send + Sync,
{
    if !ctx.pushes.expects(&peer) {
        tracing::debug!(%peer, "push stream from a peer no session expects");
        return;
    }
    ctx.metrics.request("push");
    // A push stream lives as long as its sessions; it is not a pending stream after this.
    drop(ticket);
    if let Err(e) = run(&ctx, peer, &mut stream).await {
        ctx.metrics.error(e.kind);
        tracing::debug!(%peer, error = %e, "push stream ended");
    }
}

async fn run<B: Backend>(ctx: &Arc<Context<B>>, peer: PeerId, stream: &mut Stream) -> Result<(), ProtocolError>
where
    B::Device: Send + Sync,
{
    let limits = ctx.admission.limits().clone();
    loop {
        let len = match io::read_len(stream, limits.wire.max_frame_bytes, limits.session_timeout).await {
            Ok(len) => len,
            Err(e) if e.is_closed() => return Ok(()),
            Err(e) => return Err(refuse(ErrorKind::Closed, e.to_string())),
        };
        // The pushing server sends the bytes, so reading them is on its budget, which grows
        // with the sessions that clients linked through it; running the step is work for the
        // session's client (below).
        let linked = u32::try_from(ctx.pushes.linked(&peer)).unwrap_or(u32::MAX);
        let reading = ctx
            .admission
            .memory_within(peer, ctx.cost.frame(len), "a pushed step", linked)
            .await?;
        let step: PushStep = io::read_body(stream, len, limits.open_timeout)
            .await
            .map_err(|e: IoError| refuse(ErrorKind::BadRequest, e.to_string()))?;
        let Some(core) = ctx.pushes.get(step.token) else {
            // The session ended (its client closed it): the push is for nobody.
            continue;
        };
        if !core.takes_pushes_from(&peer) {
            return Err(refuse(
                ErrorKind::BadRequest,
                "pushed to a session that does not take pushes from this peer",
            ));
        }
        if ctx.faults.drops_pushes() {
            tracing::debug!(%peer, "fault injection: dropped a pushed step");
            continue;
        }
        // One server may push for many clients' sessions at once: charged to it, they would
        // share one peer's request and memory budgets and refuse each other. Each runs on its
        // own client's, as the client's own step would.
        let memory = ctx
            .admission
            .memory(core.client(), reading.bytes(), "a pushed step")
            .await;
        drop(reading);
        match memory {
            Ok(mut memory) => {
                ctx.metrics.pushed_steps.inc();
                core.pushed(step, &mut memory).await
            }
            Err(e) => {
                // The client, missing the output, sends the step itself.
                ctx.metrics.error(e.kind);
                tracing::debug!(%peer, client = %core.client(), error = %e, "a pushed step refused on its client's budget");
            }
        }
    }
}

/// How long a failed push target is left alone before it is tried again: the client carries
/// the outputs itself meanwhile, without a dial timeout on every step.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A session's way to the next hop: the target its client named and a stream to it.
pub struct Pusher {
    target: PushTarget,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    stream: Option<Stream>,
    failed_at: Option<Instant>,
}

impl Pusher {
    /// Checks a client's [`PushTarget`]: a peer id, and only addresses of that peer.
    pub fn new(target: PushTarget) -> Result<Pusher, ProtocolError> {
        let peer: PeerId = target
            .peer
            .parse()
            .map_err(|_| refuse(ErrorKind::BadRequest, "the push target is not a peer id"))?;
        if target.addrs.len() > MAX_PUSH_ADDRS {
            return Err(refuse(
                ErrorKind::BadRequest,
                format!("at most {MAX_PUSH_ADDRS} push addresses"),
            ));
        }
        let addrs = target
            .addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter(|a| matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(p)) if p == peer))
            .collect();
        Ok(Pusher {
            target,
            peer,
            addrs,
            stream: None,
            failed_at: None,
        })
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends `hidden` on to the next hop; whether it went.
    pub async fn push(
        &mut self,
        client: &node::Client,
        position: u64,
        start_from: Option<u64>,
        hidden: swarm::wire::WireTensor,
        timeout: Duration,
        max_frame: usize,
    ) -> bool {
        if self.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return false;
        }
        let step = PushStep {
            token: self.target.token,
            position,
            start_from,
            hidden,
        };
        let sent = tokio::time::timeout(timeout, async {
            if self.stream.is_none() {
                for addr in &self.addrs {
                    let _ = client.dial(addr.clone()).await;
                }
                self.stream = Some(client.open_stream(self.peer, PUSH_PROTOCOL).await.ok()?);
            }
            let stream = self.stream.as_mut()?;
            swarm::wire::write_frame(stream, &step, max_frame).await.ok()
        })
        .await;
        match sent {
            Ok(Some(())) => {
                self.failed_at = None;
                true
            }
            _ => {
                tracing::debug!(peer = %self.peer, "push failed; the client carries this output");
                self.stream = None;
                self.failed_at = Some(Instant::now());
                false
            }
        }
    }
}

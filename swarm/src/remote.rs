//! Blocks run by the swarm: a [`BlockRunner`] that routes a session through servers found in
//! the DHT, keeps each hop's input history, and on a failure bans the server, re-routes only
//! the lost span and replays that history, so the output is what an undisturbed run gives.

use std::collections::HashMap;
use std::time::Duration;

#[cfg(not(target_arch = "wasm32"))]
use burn::prelude::*;
use libp2p::{Multiaddr, PeerId};
use shared_model::ModelError;
#[cfg(not(target_arch = "wasm32"))]
use shared_model::generate::BlockRunner;
#[cfg(not(target_arch = "wasm32"))]
use shared_model::model::to_host;
use shared_model::sampling::SamplingError;
use shared_model::weights::HostTensor;

use crate::dht;
use crate::node::Client;
use crate::protocol::{ErrorKind, Limits, MAX_PUSH_ADDRS, PUSH_MAX_TOKENS, PushTarget, ServerInfo};
use crate::routing::{Candidate, Hop, RouteMode, route};
use crate::rt::Instant;
use crate::session::{HopSession, SessionError, SessionSpec};
use crate::wire::WireDtype;

/// Errors of a generation through the swarm.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Settings of remote execution.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub model: String,
    pub model_name: String,
    pub num_layers: usize,
    pub dtype: WireDtype,
    pub step_timeout: Duration,
    pub discovery_timeout: Duration,
    /// Most server replacements within one step before giving up.
    pub max_failovers: usize,
    pub limits: Limits,
    pub route_mode: RouteMode,
    /// Deep prompts `[num_layers, prefix_len, hidden]` the servers add in every session.
    pub deep_prompts: Option<HostTensor>,
    /// Use only servers that announce this LoRA adapter, and have them apply it.
    pub adapter: Option<String>,
    /// The model's hidden size (what one token weighs on the wire).
    pub hidden_size: usize,
    /// Most tokens (per row) sent in one message: long prompts and replays go in pieces.
    pub chunk_tokens: usize,
    /// Share of hop answers spot-checked on another server ([`verify`]); 0 turns it off.
    pub verify_rate: f64,
    /// Seed of the spot checks' sample.
    pub verify_seed: u64,
    /// Decode steps go server to server ([`crate::protocol::PUSH_PROTOCOL`]) instead of
    /// back through the client after each hop.
    pub push: bool,
}

/// The spot-check rate when none is given: one hop answer in twenty.
pub const DEFAULT_VERIFY_RATE: f64 = 0.05;

/// Pieces of a long prompt or replay, in tokens per row (servers may ask for smaller ones).
pub const DEFAULT_CHUNK_TOKENS: usize = 1024;

struct ActiveHop {
    session: HopSession,
    /// The round trip to its server when the hop opened (taken out of its step times).
    rtt: Duration,
    /// Every input this hop has seen, one `[batch, new, hidden]` piece per message (what a
    /// replacement server needs replayed, piece by piece).
    history: Vec<HostTensor>,
    /// The most tokens (per row) this server takes in one message.
    chunk: usize,
    /// Where the server's cache must roll back to before the next step (its history is
    /// already cut there).
    rollback: Option<usize>,
    /// This hop's name in pushes (its `Link` token).
    token: u64,
    /// A pushed output came from this hop: the stream to it from the hop before is open.
    push_seen: bool,
}

/// A session's chain of servers covering every block, driven asynchronously (the browser
/// uses it directly; native code through [`RemoteBlocks`]).
pub struct RemoteChain {
    client: Client,
    config: RemoteConfig,
    servers: Vec<ServerInfo>,
    bans: HashMap<String, (Instant, u32)>,
    /// Servers a spot check caught lying: never used again, unlike those banned for failing.
    liars: std::collections::HashSet<String>,
    hops: Vec<ActiveHop>,
    spec: Option<SessionSpec>,
    /// The last training forward: each hop's server, blocks and input (see [`train`]).
    train: Vec<train::TrainHop>,
    train_deep: Option<HostTensor>,
    /// Step times measured of each server used (routing costs, demotion).
    speeds: SpeedBook,
    verifier: verify::Verifier,
    /// Positions (per row, padding included) the session has sent through every hop.
    position: usize,
    /// The hops are linked for pushes as they stand (cleared when the route changes).
    linked: bool,
    /// Linking failed, or pushed outputs kept not arriving: this session's outputs all come
    /// back through the client.
    push_broken: bool,
    /// Pushed outputs in a row that did not arrive within their deadline.
    push_misses: u32,
}

/// A pushed output may take this many times what its hop is expected to take (its measured
/// or claimed speed, and a round trip) before the client stops waiting for it and runs the
/// step there itself; never less than [`PUSH_STALL_MIN`]. A late push costs a step's
/// recomputation, not a wrong token: the server drops a push for a position it has passed.
pub const PUSH_STALL_FACTOR: u32 = 4;

/// Round trips a server may spend opening its push stream to the next (TCP or QUIC, Noise,
/// Yamux, protocol negotiation), allowed on a hop's first pushed output.
pub const PUSH_SETUP_ROUND_TRIPS: u32 = 6;

/// The shortest wait for a pushed output.
pub const PUSH_STALL_MIN: Duration = Duration::from_secs(1);

/// Pushed outputs missed in a row after which a session stops pushing: a hop that accepts
/// pushes and never runs them (or a pusher that says it pushed and did not) would otherwise
/// cost a stall deadline on every token.
pub const PUSH_MISSES_BEFORE_GIVING_UP: u32 = 3;

pub mod speed;
mod train;
pub mod verify;

use speed::SpeedBook;

impl RemoteChain {
    pub fn new(client: Client, config: RemoteConfig) -> Self {
        let verifier = verify::Verifier::new(config.verify_rate, config.verify_seed);
        Self {
            verifier,
            client,
            config,
            servers: Vec::new(),
            bans: HashMap::new(),
            liars: Default::default(),
            hops: Vec::new(),
            spec: None,
            train: Vec::new(),
            train_deep: None,
            speeds: SpeedBook::default(),
            position: 0,
            linked: false,
            push_broken: false,
            push_misses: 0,
        }
    }

    /// What the spot checks found so far (shared: it keeps counting).
    pub fn verify_report(&self) -> std::sync::Arc<std::sync::Mutex<verify::VerifyReport>> {
        self.verifier.report()
    }

    /// The servers found by the last discovery.
    pub fn servers(&self) -> &[ServerInfo] {
        &self.servers
    }

    /// Ends the current session: returns a future that frees the servers' caches (to run in the
    /// background: a server that is gone would otherwise stall the caller).
    pub fn close(&mut self) -> impl std::future::Future<Output = ()> + use<> {
        let hops: Vec<ActiveHop> = self.hops.drain(..).collect();
        async move {
            for hop in hops {
                hop.session.close().await;
            }
        }
    }

    /// The current route, for display: (peer, start, end).
    pub fn route(&self) -> Vec<(PeerId, usize, usize)> {
        self.hops
            .iter()
            .map(|h| (h.session.peer, h.session.start, h.session.end))
            .collect()
    }

    async fn refresh(&mut self) -> Result<(), SessionError> {
        self.servers = dht::discover(
            &self.client,
            &self.config.model,
            u32::try_from(self.config.num_layers).ok(),
            self.config.discovery_timeout,
        )
        .await?;
        tracing::debug!(
            servers = ?self.servers.iter().map(|s| (&s.peer_id, s.start, s.end, s.throughput)).collect::<Vec<_>>(),
            "discovered servers"
        );
        Ok(())
    }

    /// Takes note that `peer` failed blocks `start..end`: banned, unless it moved to other
    /// blocks (rebalancing: it answers `WrongSpan` and its record, read again, agrees).
    async fn failed(&mut self, peer: &PeerId, start: usize, end: usize, e: &SessionError) {
        let moved = matches!(e, SessionError::Remote { error, .. } if error.kind == ErrorKind::WrongSpan);
        if moved && self.refresh().await.is_ok() {
            let name = peer.to_string();
            let still_claims = self
                .servers
                .iter()
                .any(|s| s.peer_id == name && s.start as usize <= start && end <= s.end as usize);
            if !still_claims {
                tracing::info!(%peer, start, end, "server moved to other blocks");
                return;
            }
        }
        self.ban(peer);
    }

    fn ban(&mut self, peer: &PeerId) {
        let entry = self.bans.entry(peer.to_string()).or_insert((Instant::now(), 0));
        entry.1 += 1;
        // Exponential backoff: a flapping server stays out longer each time.
        entry.0 = Instant::now() + Duration::from_secs(15) * 2u32.pow(entry.1.min(6) - 1);
        tracing::warn!(%peer, failures = entry.1, "banned server");
    }

    /// The servers routing may use: not caught lying, and (unless `banned_too`) not banned.
    async fn candidates(&self, banned_too: bool) -> Vec<Candidate> {
        let now = Instant::now();
        let cap = speed::prior_cap(&self.servers);
        let mut rtts = Vec::with_capacity(self.servers.len());
        for s in &self.servers {
            let rtt = match s.peer_id.parse::<PeerId>() {
                Ok(peer) => self.client.rtt(peer).await,
                Err(_) => None,
            };
            rtts.push(rtt);
        }
        // A server not pinged yet is assumed as near as the typical one that was: an unknown
        // round trip must not decide a route by itself.
        let mut known: Vec<Duration> = rtts.iter().flatten().copied().collect();
        known.sort();
        let typical = known.get(known.len() / 2).copied().unwrap_or(Duration::from_millis(50));
        let mut out = Vec::new();
        for (s, rtt) in self.servers.iter().zip(rtts) {
            if self.liars.contains(&s.peer_id)
                || (!banned_too && self.bans.get(&s.peer_id).is_some_and(|(until, _)| *until > now))
            {
                continue;
            }
            if let Some(adapter) = &self.config.adapter
                && !s.adapters.contains(adapter)
            {
                continue;
            }
            if s.peer_id.parse::<PeerId>().is_err() {
                continue;
            }
            let rtt = rtt.unwrap_or(typical);
            out.push(Candidate {
                peer: s.peer_id.clone(),
                start: s.start as usize,
                end: s.end as usize,
                block_cost: self.speeds.block_cost(s, cap),
                rtt,
            });
        }
        out
    }

    /// [`Self::plan`], waiting up to [`HEAL_WAIT`] (looking again, with backoff) while no
    /// server covers the blocks: mid-generation, servers that moved or joined soon cover what
    /// a failed one held.
    async fn plan_patiently(&mut self, start: usize, end: usize) -> Result<Vec<Hop>, SessionError> {
        let deadline = Instant::now() + HEAL_WAIT;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.plan(start, end).await {
                Err(SessionError::NoRoute { gap, .. }) if Instant::now() + pause < deadline => {
                    tracing::info!(start, end, ?gap, wait = ?pause, "no server covers these blocks now; waiting for the swarm");
                    crate::rt::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    async fn plan(&mut self, start: usize, end: usize) -> Result<Vec<Hop>, SessionError> {
        let mode = self.config.route_mode;
        let seed = self.bans.len() as u64 ^ crate::dht::now_ms();
        let mut found = route(mode, &self.candidates(false).await, start, end, seed);
        if found.is_err() {
            // Servers come and go: look again before giving up.
            self.refresh().await?;
            found = route(mode, &self.candidates(false).await, start, end, seed);
        }
        if found.is_err() {
            // Only banned servers are left for these blocks: one that failed once (a timeout
            // under load) may well answer now. Liars stay out.
            found = route(mode, &self.candidates(true).await, start, end, seed);
            if found.is_ok() {
                tracing::warn!(start, end, "no route without banned servers: trying them again");
            }
        }
        found.map_err(|gap| SessionError::NoRoute {
            gap,
            model: self.config.model_name.clone(),
        })
    }

    async fn open(&self, hop: &Hop, spec: &SessionSpec) -> Result<HopSession, SessionError> {
        let peer: PeerId = hop.peer.parse().map_err(|_| SessionError::Protocol {
            peer: self.client.peer_id(),
        })?;
        if let Some(info) = self.servers.iter().find(|s| s.peer_id == hop.peer) {
            for addr in &info.addrs {
                if let Ok(addr) = addr.parse::<Multiaddr>() {
                    let _ = self.client.dial(addr).await;
                }
            }
        }
        HopSession::open(&self.client, peer, hop.start, hop.end, spec).await
    }

    /// [`Self::open`], asking a busy server again a few times, and dialing again a server
    /// that refused the connection (a server under a connection flood refuses some dials), before
    /// it counts as failed.
    async fn open_patiently(&self, hop: &Hop, spec: &SessionSpec) -> Result<HopSession, SessionError> {
        let (mut busy, mut unreachable) = (0, 0);
        loop {
            match self.open(hop, spec).await {
                Err(e) if matches!(refusal(&e), Refusal::Busy) && busy < BUSY_RETRIES => {
                    busy += 1;
                    tracing::debug!(peer = %hop.peer, attempt = busy, error = %e, "server busy; asking again");
                    crate::rt::sleep(Duration::from_millis(250) * 2u32.pow(busy)).await;
                }
                Err(e @ SessionError::Node(_)) if unreachable < DIAL_RETRIES => {
                    unreachable += 1;
                    tracing::debug!(peer = %hop.peer, attempt = unreachable, error = %e, "server unreachable; dialing again");
                    crate::rt::sleep(Duration::from_millis(150) * 2u32.pow(unreachable)).await;
                }
                other => return other,
            }
        }
    }

    /// Opens sessions over `[start, end)` and replays `history` (one hop's inputs, piece by
    /// piece) through them; returns the new hops.
    async fn connect(
        &mut self,
        start: usize,
        end: usize,
        history: &[HostTensor],
        patient: bool,
    ) -> Result<Vec<ActiveHop>, SessionError> {
        let spec = self.spec.clone().ok_or(SessionError::Protocol {
            peer: self.client.peer_id(),
        })?;
        let mut last = String::from("no candidate");
        for attempt in 0..=self.config.max_failovers {
            // After a server failed here, a gap it leaves is the swarm healing, not a swarm
            // without the blocks: wait for it as a failover does.
            let route = if patient || attempt > 0 {
                self.plan_patiently(start, end).await?
            } else {
                self.plan(start, end).await?
            };
            let mut hops = Vec::new();
            let mut pieces: Vec<HostTensor> = history.to_vec();
            let mut failed = None;
            for hop in &route {
                let attempt = async {
                    let session = self.open_patiently(hop, &spec).await?;
                    let rtt = self.client.rtt(session.peer).await.unwrap_or(Duration::ZERO);
                    let mut active = ActiveHop {
                        session,
                        rtt,
                        history: Vec::new(),
                        chunk: self.chunk_limit(),
                        rollback: None,
                        token: push_token(),
                        push_seen: false,
                    };
                    let mut outputs = Vec::with_capacity(pieces.len());
                    for piece in &pieces {
                        outputs.extend(
                            hop_pieces(&mut active, piece, &self.speeds)
                                .await
                                .map_err(|f| f.error)?,
                        );
                    }
                    Ok::<_, SessionError>((active, outputs))
                };
                match attempt.await {
                    Ok((active, outputs)) => {
                        hops.push(active);
                        pieces = outputs;
                    }
                    Err(e) => {
                        failed = Some((hop.clone(), e));
                        break;
                    }
                }
            }
            match failed {
                None => return Ok(hops),
                Some((hop, e)) => {
                    last = e.to_string();
                    if let Ok(peer) = hop.peer.parse() {
                        tracing::warn!(%peer, error = %e, "server failed while the session was being set up");
                        self.failed(&peer, hop.start, hop.end, &e).await;
                    }
                    for hop in hops {
                        hop.session.close().await;
                    }
                }
            }
        }
        Err(SessionError::Exhausted { start, end, last })
    }

    /// The most tokens (per row) one message carries: the configured chunk, and what fits a
    /// frame at the wire dtype.
    fn chunk_limit(&self) -> usize {
        let per_token = self.spec.as_ref().map_or(1, |s| {
            s.batch.max(1) * self.config.hidden_size.max(1) * self.config.dtype.size()
        });
        // Half a frame: room for the message around the tensor.
        let by_frame = (self.config.limits.max_frame_bytes / 2 / per_token).max(1);
        let by_tokens = self.config.limits.max_step_tokens / self.spec.as_ref().map_or(1, |s| s.batch.max(1));
        self.config.chunk_tokens.min(by_frame).min(by_tokens.max(1)).max(1)
    }

    /// Opens a session for a batch left-padded by `pad[row]` tokens, holding at most
    /// `max_length` tokens, on a fresh route (any previous session is closed).
    pub async fn start(&mut self, pad: Vec<usize>, max_length: usize) -> Result<(), SessionError> {
        for hop in self.hops.drain(..) {
            hop.session.close().await;
        }
        if self.servers.is_empty() {
            self.refresh().await?;
        }
        self.spec = Some(SessionSpec {
            model: self.config.model.clone(),
            batch: pad.len(),
            max_length,
            pad,
            dtype: self.config.dtype,
            timeout: self.config.step_timeout,
            limits: self.config.limits,
            deep_prompts: self.config.deep_prompts.clone(),
            adapter: self.config.adapter.clone(),
        });
        self.position = 0;
        self.linked = false;
        self.push_broken = false;
        self.push_misses = 0;
        // A swarm without a route now fails at once: the user hears of it.
        self.hops = self.connect(0, self.config.num_layers, &[], false).await?;
        tracing::info!(route = ?self.route(), "session route");
        Ok(())
    }

    /// Runs `[batch, new, hidden]` states through every block, in pieces of at most the chunk
    /// size (a long prompt never travels as one message); a failed server is replaced and its
    /// history replayed, piece by piece, so the result is what an undisturbed run gives.
    pub async fn step(&mut self, hidden: HostTensor) -> Result<HostTensor, SessionError> {
        let new = hidden.shape.get(1).copied().unwrap_or(0);
        let mut failovers = 0;
        // Work in token order: each piece goes through every hop before the next starts, so
        // every server sees its inputs in order; (piece, hop it is at).
        let mut queue: std::collections::VecDeque<(HostTensor, usize)> = if self.pushes(new).await {
            match self.push_step(&hidden).await {
                Pushed::Done(output) => {
                    self.position += new;
                    self.move_off_slow_servers().await;
                    return Ok(output);
                }
                Pushed::Stalled { at, input, failure } => {
                    // The route is driven from here on, from the hop that has not answered; hops
                    // after it may have run the step from a push, so they roll it back first.
                    for hop in &mut self.hops[at..] {
                        hop.rollback = Some(hop.rollback.map_or(self.position, |r| r.min(self.position)));
                    }
                    if let Some(failure) = failure {
                        failovers += 1;
                        self.recover(at, failure, failovers).await?;
                    }
                    [(input, at)].into()
                }
            }
        } else {
            split_tokens(&hidden, self.chunk_limit())
                .into_iter()
                .map(|p| (p, 0))
                .collect()
        };
        drop(hidden);
        let mut outputs = Vec::new();
        while let Some((piece, i)) = queue.pop_front() {
            if i == self.hops.len() {
                outputs.push(piece);
                continue;
            }
            let result = match hop_pieces(&mut self.hops[i], &piece, &self.speeds).await {
                Ok(outs) => match self.spot_check(i, &outs).await {
                    verify::Verdict::Keep => Ok(outs),
                    verify::Verdict::HopLied(error) => {
                        // Its answers are thrown away: what it was given goes to a replacement.
                        let keep = self.hops[i].history.len().saturating_sub(outs.len());
                        let rest = self.hops[i].history.split_off(keep);
                        Err(PieceFailure {
                            error,
                            done: Vec::new(),
                            rest,
                        })
                    }
                },
                Err(failure) => Err(failure),
            };
            match result {
                Ok(outs) => {
                    // Its outputs go on to the next hop before anything else.
                    for out in outs.into_iter().rev() {
                        queue.push_front((out, i + 1));
                    }
                }
                Err(PieceFailure { error: e, done, rest }) => {
                    failovers += 1;
                    let k = self.recover(i, e, failovers).await?;
                    // What the failed hop did not take goes to its replacement; what it did
                    // (now replayed) goes on past the replacement, first.
                    for p in rest.into_iter().rev() {
                        queue.push_front((p, i));
                    }
                    for out in done.into_iter().rev() {
                        queue.push_front((out, i + k));
                    }
                }
            }
        }
        let output = concat_all(&outputs).ok_or(SessionError::Protocol {
            peer: self.client.peer_id(),
        })?;
        self.position += new;
        self.move_off_slow_servers().await;
        Ok(output)
    }

    /// Hop `i` failed with `e` (the `failovers`th time this step): bans its server and puts a
    /// replacement in its place, its history replayed. Returns how many hops stand there now.
    async fn recover(&mut self, i: usize, e: SessionError, failovers: usize) -> Result<usize, SessionError> {
        let (peer, start, end) = {
            let s = &self.hops[i].session;
            (s.peer, s.start, s.end)
        };
        tracing::warn!(%peer, start, end, error = %e, "server failed; re-routing its blocks");
        if failovers > self.config.max_failovers {
            return Err(SessionError::Exhausted {
                start,
                end,
                last: e.to_string(),
            });
        }
        self.failed(&peer, start, end, &e).await;
        // The failed server's session is dropped, not closed: it may not answer.
        let replaced = self.replace_hop(i).await?;
        tracing::info!(route = ?self.route(), replayed_pieces = replaced.replayed, "session re-routed");
        Ok(replaced.hops)
    }

    /// Whether a step of `new` positions per row goes by push: the route is linked for it
    /// (now, if the route changed) and the step is small enough.
    async fn pushes(&mut self, new: usize) -> bool {
        if !self.config.push
            || self.push_broken
            || self.hops.len() < 2
            || new == 0
            || new > PUSH_MAX_TOKENS
            || self.hops.iter().any(|h| new > h.chunk)
        {
            return false;
        }
        if !self.linked {
            match self.link().await {
                Ok(()) => self.linked = true,
                Err(e) => {
                    // Every output then comes back through the client, as without push.
                    tracing::warn!(error = %e, "cannot link the route for pushes; the client carries every output");
                    self.push_broken = true;
                    return false;
                }
            }
        }
        true
    }

    /// Tells each hop whose pushes it takes (the hop before) and where it pushes (the hop
    /// after), all at once.
    async fn link(&mut self) -> Result<(), SessionError> {
        let n = self.hops.len();
        let targets: Vec<Option<PushTarget>> = (0..n)
            .map(|i| {
                self.hops.get(i + 1).map(|next| {
                    let peer = next.session.peer.to_string();
                    let addrs = self
                        .servers
                        .iter()
                        .find(|s| s.peer_id == peer)
                        .map(|s| s.addrs.iter().take(MAX_PUSH_ADDRS).cloned().collect())
                        .unwrap_or_default();
                    PushTarget {
                        peer,
                        addrs,
                        token: next.token,
                    }
                })
            })
            .collect();
        let froms: Vec<Option<PeerId>> = (0..n)
            .map(|i| i.checked_sub(1).map(|j| self.hops[j].session.peer))
            .collect();
        let links = self
            .hops
            .iter_mut()
            .zip(targets)
            .zip(froms)
            .map(|((hop, to), from)| hop.session.link(hop.token, from, to));
        futures::future::try_join_all(links).await?;
        tracing::debug!(hops = n, "route linked for pushes");
        Ok(())
    }

    /// One step by push: the client sends it to the first hop, each server pushes its output
    /// to the next, and every server also answers the client, which keeps each hop's input
    /// for failover and spot-checks as usual. Stops at the first hop that does not answer
    /// (or that a spot check catches), saying where the client must take over.
    async fn push_step(&mut self, hidden: &HostTensor) -> Pushed {
        let position = self.position;
        let start_from = self.hops.iter().find_map(|h| h.rollback);
        let shape = hidden.shape.clone();
        let decode = shape.get(1) == Some(&1);
        if let Err(e) = self.hops[0].session.send_push(hidden, start_from).await {
            return Pushed::Stalled {
                at: 0,
                input: hidden.clone(),
                failure: Some(e),
            };
        }
        let mut input = hidden.clone();
        let mut previous = Instant::now();
        for i in 0..self.hops.len() {
            let at = (i > 0).then_some(position);
            let answer = if i == 0 {
                self.hops[i].session.output(at, &shape).await
            } else {
                let deadline = self.push_deadline(i, shape.get(1).copied().unwrap_or(1));
                match self.hops[i].session.output_within(at, &shape, deadline).await {
                    // Only the wait for the output to start is cut short; a timeout of the
                    // step itself is a failure as anywhere.
                    Err(SessionError::Timeout { peer, timeout })
                        if timeout == deadline && deadline < self.hops[i].session.timeout() =>
                    {
                        self.push_misses += 1;
                        tracing::debug!(%peer, ?deadline, misses = self.push_misses, "a pushed output is late; the client runs the step there");
                        if self.push_misses >= PUSH_MISSES_BEFORE_GIVING_UP {
                            tracing::warn!(%peer, "pushed outputs keep not arriving; the client carries every output of this session");
                            self.push_broken = true;
                        }
                        return Pushed::Stalled {
                            at: i,
                            input,
                            failure: None,
                        };
                    }
                    answer => answer,
                }
            };
            let (out, pushed) = match answer {
                Ok(answer) => answer,
                // Busy, or wants smaller pieces: the step did not run there, and the
                // client-driven path asks again or splits, as for any step.
                Err(e) if !matches!(refusal(&e), Refusal::Other) => {
                    return Pushed::Stalled {
                        at: i,
                        input,
                        failure: None,
                    };
                }
                Err(e) => {
                    return Pushed::Stalled {
                        at: i,
                        input,
                        failure: Some(e),
                    };
                }
            };
            let hop = &mut self.hops[i];
            hop.rollback = None;
            hop.history.push(input);
            if decode {
                // What this hop added to the token's time: its compute and about one one-way
                // delay (from the hop before it, instead of from the client).
                let now = Instant::now();
                let blocks = hop.session.end - hop.session.start;
                self.speeds
                    .record(&hop.session.peer.to_string(), blocks, now - previous, hop.rtt / 2);
                previous = now;
            }
            if let verify::Verdict::HopLied(error) = self.spot_check(i, std::slice::from_ref(&out)).await {
                // Its answer is thrown away, and what the hops after it made of it.
                let input = self.hops[i].history.pop().unwrap_or_else(|| hidden.clone());
                return Pushed::Stalled {
                    at: i,
                    input,
                    failure: Some(error),
                };
            }
            input = out;
            if i > 0 {
                self.push_misses = 0;
                self.hops[i].push_seen = true;
            }
            if !pushed && i + 1 < self.hops.len() {
                // The server could not reach the next one: the client carries the output on.
                return Pushed::Stalled {
                    at: i + 1,
                    input,
                    failure: None,
                };
            }
        }
        Pushed::Done(input)
    }

    /// How long the client waits for hop `i`'s pushed output of `new` positions a row (see
    /// [`PUSH_STALL_FACTOR`]): its blocks at the speed measured of its server (or claimed, up
    /// to the swarm's cap), plus a round trip.
    fn push_deadline(&self, i: usize, new: usize) -> Duration {
        let hop = &self.hops[i];
        let peer = hop.session.peer.to_string();
        let per_block = self.speeds.measured_cost(&peer).or_else(|| {
            let cap = speed::prior_cap(&self.servers);
            self.servers
                .iter()
                .find(|s| s.peer_id == peer)
                .map(|s| self.speeds.block_cost(s, cap))
        });
        let blocks = hop.session.end.saturating_sub(hop.session.start).max(1);
        match per_block {
            Some(cost) => {
                let mut expected = Duration::from_secs_f64((cost * (blocks * new.max(1)) as f64).min(3600.0)) + hop.rtt;
                if !hop.push_seen {
                    // The hop before may still be dialling this one: a connection's handshakes
                    // take a few round trips (the client knows its own, not theirs).
                    let rtt = self.hops.iter().map(|h| h.rtt).max().unwrap_or_default();
                    expected += rtt * PUSH_SETUP_ROUND_TRIPS;
                }
                (expected * PUSH_STALL_FACTOR).max(PUSH_STALL_MIN)
            }
            None => hop.session.timeout(),
        }
    }

    /// Forgets every position from `len` on: each hop's history is cut there now, and its
    /// server rolls its cache back with the next step (`Step::start_from`). A failover after
    /// this replays the cut history, so replacements hold what the others do.
    pub fn rollback(&mut self, len: usize) -> Result<(), SessionError> {
        if len > self.position {
            return Err(SessionError::Rollback {
                to: len,
                held: self.position,
            });
        }
        if len == self.position {
            return Ok(());
        }
        for hop in &mut self.hops {
            truncate_history(&mut hop.history, len);
            hop.rollback = Some(len);
        }
        self.position = len;
        Ok(())
    }

    /// Moves the blocks of each hop whose server measured much slower than it claims
    /// ([`SpeedBook::slower_than_claimed`]) to a route without it, if there is one: the hop's
    /// history is replayed there as in a failover, so the tokens do not change. The server is
    /// not banned: routing now prices it at what it measured.
    async fn move_off_slow_servers(&mut self) {
        let mut i = 0;
        while i < self.hops.len() {
            let (peer, start, end) = {
                let s = &self.hops[i].session;
                (s.peer, s.start, s.end)
            };
            let name = peer.to_string();
            let slow = self
                .servers
                .iter()
                .find(|s| s.peer_id == name)
                .is_some_and(|s| self.speeds.slower_than_claimed(s));
            let elsewhere = slow
                && self
                    .plan(start, end)
                    .await
                    .is_ok_and(|route| route.iter().all(|h| h.peer != name));
            if !elsewhere {
                i += 1;
                continue;
            }
            tracing::warn!(%peer, start, end, "server much slower than it claims: moving its blocks");
            match self.replace_hop(i).await {
                Ok(replaced) => {
                    let _ = crate::rt::timeout(Duration::from_secs(1), replaced.old.session.close()).await;
                    tracing::info!(route = ?self.route(), "session re-routed off a slow server");
                    i += replaced.hops;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "could not move off a slow server; staying");
                    i += 1;
                }
            }
        }
    }

    /// Puts new sessions over hop `i`'s blocks in its place, its history replayed through
    /// them. On failure hop `i` stays as it was.
    async fn replace_hop(&mut self, i: usize) -> Result<Replaced, SessionError> {
        let (start, end) = (self.hops[i].session.start, self.hops[i].session.end);
        let history = std::mem::take(&mut self.hops[i].history);
        match self.connect(start, end, &history, true).await {
            Ok(replacement) => {
                // The hops around the new ones must learn of them before the next push.
                self.linked = false;
                let hops = replacement.len();
                let old = self.hops.splice(i..=i, replacement).next();
                let old = old.ok_or(SessionError::Protocol {
                    peer: self.client.peer_id(),
                })?;
                Ok(Replaced {
                    hops,
                    replayed: history.len(),
                    old,
                })
            }
            Err(e) => {
                self.hops[i].history = history;
                Err(e)
            }
        }
    }
}

/// How a step by push ended.
enum Pushed {
    /// The last hop's output.
    Done(HostTensor),
    /// Hop `at` did not answer (`failure`, or it was never given its input: `None`); `input`
    /// is what it needs.
    Stalled {
        at: usize,
        input: HostTensor,
        failure: Option<SessionError>,
    },
}

/// A random name for a hop's session in pushes.
fn push_token() -> u64 {
    use rand::TryRngCore;
    rand::rngs::OsRng
        .try_next_u64()
        .unwrap_or_else(|_| crate::dht::now_ms())
}

/// What [`RemoteChain::replace_hop`] did.
struct Replaced {
    /// Hops now in the replaced one's place.
    hops: usize,
    /// History pieces replayed through them.
    replayed: usize,
    /// The replaced hop (its session still open).
    old: ActiveHop,
}

/// How many times a busy server is asked again before it counts as failed.
const BUSY_RETRIES: u32 = 4;
/// How long a failover waits for some server to cover the failed one's blocks.
const HEAL_WAIT: Duration = Duration::from_secs(30);
/// How many times a server that refused a connection (or a stream) is dialed again when a
/// session opens.
const DIAL_RETRIES: u32 = 4;

/// A hop failed part-way through a piece.
struct PieceFailure {
    error: SessionError,
    /// Outputs of the parts it took (recorded in its history).
    done: Vec<HostTensor>,
    /// The parts it did not take, in order.
    rest: Vec<HostTensor>,
}

/// Sends `piece` through one hop, in smaller pieces if the server says the piece is too large
/// (and how large it may be), asking again a few times if it is busy; records each piece the
/// hop took in its history. Returns the outputs, in order.
async fn hop_pieces(
    hop: &mut ActiveHop,
    piece: &HostTensor,
    speeds: &SpeedBook,
) -> Result<Vec<HostTensor>, PieceFailure> {
    let mut pending: std::collections::VecDeque<HostTensor> = split_tokens(piece, hop.chunk).into();
    let mut outputs = Vec::new();
    let mut busy = 0;
    while let Some(p) = pending.pop_front() {
        let sent = Instant::now();
        match hop.session.step(&p, hop.rollback).await {
            Ok(out) => {
                // Rolled back; sending it again would do no harm, but nothing needs it.
                hop.rollback = None;
                // Decode steps (one token a row) are what routing compares.
                if p.shape[1] == 1 {
                    let blocks = hop.session.end - hop.session.start;
                    speeds.record(&hop.session.peer.to_string(), blocks, sent.elapsed(), hop.rtt);
                }
                busy = 0;
                hop.history.push(p);
                outputs.push(out);
            }
            Err(e) => match refusal(&e) {
                Refusal::Smaller(largest) if largest < p.shape[1] => {
                    tracing::debug!(peer = %hop.session.peer, largest, tokens = p.shape[1], "server asked for smaller pieces");
                    hop.chunk = largest.max(1);
                    for smaller in split_tokens(&p, hop.chunk).into_iter().rev() {
                        pending.push_front(smaller);
                    }
                }
                Refusal::Busy if busy < BUSY_RETRIES => {
                    busy += 1;
                    crate::rt::sleep(Duration::from_millis(250) * 2u32.pow(busy)).await;
                    pending.push_front(p);
                }
                _ => {
                    pending.push_front(p);
                    return Err(PieceFailure {
                        error: e,
                        done: outputs,
                        rest: pending.into(),
                    });
                }
            },
        }
    }
    Ok(outputs)
}

/// What a refused request can still do.
enum Refusal {
    /// Fits when split into pieces of at most this many tokens.
    Smaller(usize),
    /// Try again later.
    Busy,
    Other,
}

fn refusal(e: &SessionError) -> Refusal {
    match e {
        SessionError::Remote { error, .. } => match error.kind {
            ErrorKind::TooLarge => match error.limit.as_ref().and_then(|l| l.largest_tokens) {
                Some(n) if n > 0 => Refusal::Smaller(n as usize),
                _ => Refusal::Other,
            },
            ErrorKind::Busy => Refusal::Busy,
            _ => Refusal::Other,
        },
        SessionError::Dropped { .. } => Refusal::Busy,
        _ => Refusal::Other,
    }
}

/// `[b, t, h]` split along the token axis into pieces of at most `chunk` tokens (one piece
/// when it is short enough, without a copy of the rows' layout).
fn split_tokens(t: &HostTensor, chunk: usize) -> Vec<HostTensor> {
    let (batch, len, h) = (t.shape[0], t.shape[1], t.shape[2]);
    let chunk = chunk.max(1);
    if len <= chunk {
        return vec![t.clone()];
    }
    let mut pieces = Vec::with_capacity(len.div_ceil(chunk));
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        let mut data = Vec::with_capacity(batch * n * h);
        for row in 0..batch {
            let base = (row * len + at) * h;
            data.extend_from_slice(&t.data[base..base + n * h]);
        }
        pieces.push(HostTensor::new(vec![batch, n, h], data));
        at += n;
    }
    pieces
}

/// Cuts a hop's input history (pieces `[b, t_i, h]`, in order) to its first `len` tokens.
fn truncate_history(history: &mut Vec<HostTensor>, len: usize) {
    let mut seen = 0;
    let mut keep = 0;
    while keep < history.len() && seen < len {
        let piece = &mut history[keep];
        let t = piece.shape[1];
        if seen + t > len {
            let (batch, h) = (piece.shape[0], piece.shape[2]);
            let n = len - seen;
            let mut data = Vec::with_capacity(batch * n * h);
            for row in 0..batch {
                data.extend_from_slice(&piece.data[row * t * h..(row * t + n) * h]);
            }
            *piece = HostTensor::new(vec![batch, n, h], data);
            seen = len;
        } else {
            seen += t;
        }
        keep += 1;
    }
    history.truncate(keep);
}

/// All chunks (`[b, t_i, h]`) joined along the token axis in one pass; `None` for no chunks.
fn concat_all(chunks: &[HostTensor]) -> Option<HostTensor> {
    let first = chunks.first()?;
    let (batch, h) = (first.shape[0], first.shape[2]);
    let total: usize = chunks.iter().map(|c| c.shape[1]).sum();
    let mut data = Vec::with_capacity(batch * total * h);
    for row in 0..batch {
        for c in chunks {
            let t = c.shape[1];
            data.extend_from_slice(&c.data[row * t * h..(row + 1) * t * h]);
        }
    }
    Some(HostTensor::new(vec![batch, total, h], data))
}

/// Runs the blocks on remote servers for synchronous callers; each call blocks on the async
/// [`RemoteChain`] through `handle`.
#[cfg(not(target_arch = "wasm32"))]
pub struct RemoteBlocks<B: Backend> {
    handle: tokio::runtime::Handle,
    chain: RemoteChain,
    device: B::Device,
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> RemoteBlocks<B> {
    pub fn new(handle: tokio::runtime::Handle, client: Client, config: RemoteConfig, device: B::Device) -> Self {
        Self {
            handle,
            chain: RemoteChain::new(client, config),
            device,
        }
    }

    /// The current route, for display: (peer, start, end).
    pub fn route(&self) -> Vec<(PeerId, usize, usize)> {
        self.chain.route()
    }

    /// What the spot checks found so far (shared: it keeps counting).
    pub fn verify_report(&self) -> std::sync::Arc<std::sync::Mutex<verify::VerifyReport>> {
        self.chain.verify_report()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> BlockRunner<B> for RemoteBlocks<B> {
    type Error = RemoteError;

    fn start(&mut self, pad: Vec<usize>, max_length: usize) -> Result<(), RemoteError> {
        let handle = self.handle.clone();
        Ok(handle.block_on(self.chain.start(pad, max_length))?)
    }

    fn step(&mut self, hidden: Tensor<B, 3>) -> Result<Tensor<B, 3>, RemoteError> {
        let handle = self.handle.clone();
        let out = handle.block_on(self.chain.step(to_host(hidden)))?;
        Ok(Tensor::from_data(TensorData::new(out.data, out.shape), &self.device))
    }

    fn rollback(&mut self, len: usize) -> Result<(), RemoteError> {
        Ok(self.chain.rollback(len)?)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> Drop for RemoteBlocks<B> {
    fn drop(&mut self) {
        // Closing frees the servers' caches at once instead of at their idle timeout.
        self.handle.spawn(self.chain.close());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_concat_is_the_identity() {
        let data: Vec<f32> = (0..2 * 7 * 3).map(|i| i as f32).collect();
        let t = HostTensor::new(vec![2, 7, 3], data);
        for chunk in [1, 2, 3, 6, 7, 100] {
            let pieces = split_tokens(&t, chunk);
            assert_eq!(pieces.len(), 7usize.div_ceil(chunk), "chunk {chunk}");
            assert!(pieces.iter().all(|p| p.shape[1] <= chunk && p.shape[0] == 2));
            assert_eq!(concat_all(&pieces).expect("pieces"), t, "chunk {chunk}");
        }
    }

    #[test]
    fn a_cut_history_holds_the_first_tokens_of_each_row() {
        let data: Vec<f32> = (0..2 * 7 * 3).map(|i| i as f32).collect();
        let t = HostTensor::new(vec![2, 7, 3], data);
        for chunk in [1, 2, 3, 7] {
            for len in 0..=8 {
                let mut history = split_tokens(&t, chunk);
                truncate_history(&mut history, len);
                let n = len.min(7);
                let expected = split_tokens(&t, 7).remove(0);
                let kept = concat_all(&history);
                if n == 0 {
                    assert!(kept.is_none(), "chunk {chunk} len {len}");
                    continue;
                }
                let kept = kept.expect("pieces");
                assert_eq!(kept.shape, vec![2, n, 3], "chunk {chunk} len {len}");
                for row in 0..2 {
                    assert_eq!(
                        kept.data[row * n * 3..(row + 1) * n * 3],
                        expected.data[row * 21..row * 21 + n * 3]
                    );
                }
            }
        }
    }

    #[test]
    fn concat_keeps_rows_apart() {
        let a = HostTensor::new(vec![2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = HostTensor::new(vec![2, 2, 2], vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
        let c = concat_all(&[a.clone(), b.clone()]).expect("two chunks");
        assert_eq!(c.shape, vec![2, 3, 2]);
        assert_eq!(
            c.data,
            vec![1.0, 2.0, 5.0, 6.0, 7.0, 8.0, 3.0, 4.0, 9.0, 10.0, 11.0, 12.0]
        );
    }
}

//! Every limit of the server, and the one type every handler asks before it reads, allocates
//! or computes anything for a peer.
//!
//! A server is open to anyone, and any peer may be hostile, greedy or many peers at once. The
//! budgets:
//! - **streams** that have not sent their first message yet (`Open`, a span or head request):
//!   bounded in total and per peer, refused at once beyond;
//! - **sessions**: `--max-sessions` in total, `--max-sessions-per-peer` each, taken only after
//!   a valid `Open`;
//! - **KV cache** in tokens (`--cache-tokens`, `--max-cache-tokens-per-peer`): a session is
//!   charged `batch x max_length` (its cache never allocates more: see
//!   `shared_model::cache`) plus its deep prompts, from `Open` to its end;
//! - **request memory** in bytes (`--max-request-memory`): everything a message costs beyond
//!   the weights and KV caches (its frame, the decoded tensors, activations, attention scores,
//!   masks, logits, the reply), reserved from its length prefix before its body is read and
//!   adjusted to the exact cost once its shape is known. A request that could never fit gets
//!   [`ErrorKind::TooLarge`] naming the limit and the largest request that would pass;
//! - **compute slots** (`--compute-slots`): blocks run for at most this many requests at
//!   once, one chunk of a long request at a time;
//! - **requests per peer** (`--max-requests-per-peer`) holding or waiting for memory.
//!
//! Memory, compute and cache are [`FairPool`]s: a request that must wait waits at most
//! `--queue-timeout`, in start-time fair order (a peer's requests queue behind each other,
//! weighed by their size or work, not in front of other peers').

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use libp2p::PeerId;
use swarm::protocol::{ErrorKind, LimitExceeded, Limits, ProtocolError, ServerLoad};

use crate::fair::{FairPool, Lease, Shortage};

/// The server's limits, validated from its flags.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_sessions: u32,
    pub max_sessions_per_peer: u32,
    /// KV cache budget in tokens of the whole span.
    pub cache_tokens: u64,
    pub max_cache_tokens_per_peer: u64,
    /// Bytes all requests in flight may use besides weights and KV caches.
    pub max_request_memory: u64,
    /// Requests whose blocks run at once.
    pub compute_slots: u32,
    pub max_pending_streams: u32,
    pub max_pending_streams_per_peer: u32,
    pub max_requests_per_peer: u32,
    /// A new stream must send its first message within this.
    pub open_timeout: Duration,
    /// A peer must take each reply within this, or loses the stream (and its session).
    pub write_timeout: Duration,
    /// A session idle this long is closed.
    pub session_timeout: Duration,
    /// The longest a request waits for memory, compute or cache before `Busy`.
    pub queue_timeout: Duration,
    /// Long steps and stateless requests run this many tokens (per row) at a time.
    pub chunk_tokens: usize,
    /// Message size limits (frames, tensors, batch, tokens of one message).
    pub wire: Limits,
}

/// What a peer holds now.
#[derive(Debug, Default, Clone, Copy)]
struct PeerLedger {
    pending_streams: u32,
    sessions: u32,
    cache_tokens: u64,
    requests: u32,
}

impl PeerLedger {
    fn is_empty(&self) -> bool {
        self.pending_streams == 0 && self.sessions == 0 && self.cache_tokens == 0 && self.requests == 0
    }
}

#[derive(Debug, Default)]
struct Ledger {
    peers: HashMap<PeerId, PeerLedger>,
    pending_streams: u32,
    sessions: u32,
}

/// The server's budgets; handlers ask it before every read, allocation and computation.
pub struct Admission {
    limits: ServerLimits,
    ledger: Mutex<Ledger>,
    memory: Arc<FairPool>,
    compute: Arc<FairPool>,
    cache: Arc<FairPool>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("limits", &self.limits).finish()
    }
}

/// Which of a peer's counters a [`Ticket`] holds.
#[derive(Debug, Clone, Copy)]
enum Counter {
    PendingStream,
    Session,
    Request,
}

/// One unit of a per-peer counter, given back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    peer: PeerId,
    counter: Counter,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("peer", &self.peer)
            .field("counter", &self.counter)
            .finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut ledger = self.admission.lock();
        let entry = ledger.peers.entry(self.peer).or_default();
        match self.counter {
            Counter::PendingStream => entry.pending_streams = entry.pending_streams.saturating_sub(1),
            Counter::Session => entry.sessions = entry.sessions.saturating_sub(1),
            Counter::Request => entry.requests = entry.requests.saturating_sub(1),
        }
        let empty = entry.is_empty();
        match self.counter {
            Counter::PendingStream => ledger.pending_streams = ledger.pending_streams.saturating_sub(1),
            Counter::Session => ledger.sessions = ledger.sessions.saturating_sub(1),
            Counter::Request => {}
        }
        if empty {
            ledger.peers.remove(&self.peer);
        }
    }
}

/// An open session's share: its slot and its KV cache tokens, held until it ends.
#[derive(Debug)]
pub struct SessionGrant {
    _slot: Ticket,
    _cache: Lease,
    charged: CacheCharge,
}

/// Takes a session's tokens off its peer's ledger when the session ends.
#[derive(Debug)]
struct CacheCharge {
    admission: Arc<Admission>,
    peer: PeerId,
    tokens: u64,
}

impl Drop for CacheCharge {
    fn drop(&mut self) {
        let mut ledger = self.admission.lock();
        if let Some(entry) = ledger.peers.get_mut(&self.peer) {
            entry.cache_tokens = entry.cache_tokens.saturating_sub(self.tokens);
            if entry.is_empty() {
                ledger.peers.remove(&self.peer);
            }
        }
    }
}

impl SessionGrant {
    /// Tokens charged to the session.
    pub fn charged_tokens(&self) -> u64 {
        self.charged.tokens
    }
}

/// Memory reserved for one request, with its per-peer request ticket.
#[derive(Debug)]
pub struct MemoryGrant {
    lease: Lease,
    _ticket: Ticket,
    admission: Arc<Admission>,
}

impl MemoryGrant {
    pub fn bytes(&self) -> u64 {
        self.lease.amount()
    }

    /// Adjusts the reservation to what the decoded request needs (`bytes`); `shape` names it
    /// for the error, and `largest` gives the most tokens a request of this shape could carry
    /// within the whole budget.
    pub async fn fit(
        &mut self,
        bytes: u64,
        what: &str,
        largest: impl Fn(u64) -> Option<u64>,
    ) -> Result<(), ProtocolError> {
        let wait = self.admission.limits.queue_timeout;
        let cost = self.admission.share(
            bytes.saturating_sub(self.lease.amount()),
            self.admission.limits.max_request_memory,
        );
        self.lease
            .resize(bytes, cost, wait)
            .await
            .map_err(|s| self.admission.memory_refusal(s, bytes, what, &largest))
    }
}

impl Admission {
    pub fn new(limits: ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            memory: FairPool::new(limits.max_request_memory),
            compute: FairPool::new(u64::from(limits.compute_slots)),
            cache: FairPool::new(limits.cache_tokens),
            ledger: Mutex::new(Ledger::default()),
            limits,
        })
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// What `amount` of a pool of `capacity` weighs in its fair order.
    fn share(&self, amount: u64, capacity: u64) -> f64 {
        amount as f64 / capacity.max(1) as f64
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new inbound stream, before its first message is read. Refused at once when too many
    /// streams (of all peers, or of this one) are waiting for their first message.
    pub fn stream(self: &Arc<Self>, peer: PeerId) -> Result<Ticket, ProtocolError> {
        let mut ledger = self.lock();
        let mine = ledger.peers.get(&peer).map_or(0, |p| p.pending_streams);
        if ledger.pending_streams >= self.limits.max_pending_streams {
            return Err(busy(format!(
                "{} streams are waiting to send their first message",
                ledger.pending_streams
            )));
        }
        if mine >= self.limits.max_pending_streams_per_peer {
            return Err(busy(format!(
                "this peer has {mine} streams that have not sent their first message"
            )));
        }
        ledger.pending_streams += 1;
        ledger.peers.entry(peer).or_default().pending_streams += 1;
        drop(ledger);
        Ok(Ticket {
            admission: self.clone(),
            peer,
            counter: Counter::PendingStream,
        })
    }

    /// Reserves `bytes` of request memory for `peer` (a frame about to be read), waiting at
    /// most `--queue-timeout`.
    pub async fn memory(self: &Arc<Self>, peer: PeerId, bytes: u64, what: &str) -> Result<MemoryGrant, ProtocolError> {
        self.memory_within(peer, bytes, what, 0).await
    }

    /// As [`Admission::memory`], for a peer allowed `extra` requests beyond
    /// `--max-requests-per-peer`: a server pushing for `extra` sessions whose clients linked it
    /// here, whose pushes arrive together when its batch ends.
    pub async fn memory_within(
        self: &Arc<Self>,
        peer: PeerId,
        bytes: u64,
        what: &str,
        extra: u32,
    ) -> Result<MemoryGrant, ProtocolError> {
        let ticket = {
            let mut ledger = self.lock();
            let entry = ledger.peers.entry(peer).or_default();
            let most = self.limits.max_requests_per_peer.saturating_add(extra);
            if entry.requests >= most {
                return Err(busy(format!(
                    "this peer has {} requests in flight (--max-requests-per-peer {}, and {extra} for the sessions it pushes for)",
                    entry.requests, self.limits.max_requests_per_peer
                )));
            }
            entry.requests += 1;
            Ticket {
                admission: self.clone(),
                peer,
                counter: Counter::Request,
            }
        };
        let lease = self
            .memory
            .acquire(
                peer,
                bytes,
                self.share(bytes, self.limits.max_request_memory),
                self.limits.queue_timeout,
            )
            .await
            .map_err(|s| self.memory_refusal(s, bytes, what, &|_| None))?;
        Ok(MemoryGrant {
            lease,
            _ticket: ticket,
            admission: self.clone(),
        })
    }

    fn memory_refusal(
        &self,
        shortage: Shortage,
        bytes: u64,
        what: &str,
        largest: &dyn Fn(u64) -> Option<u64>,
    ) -> ProtocolError {
        match shortage {
            Shortage::Never { capacity } => ProtocolError::too_large(
                format!("{what} needs {bytes} bytes of request memory; --max-request-memory is {capacity}"),
                LimitExceeded {
                    limit: "--max-request-memory".into(),
                    needed: bytes,
                    allowed: capacity,
                    unit: "bytes".into(),
                    largest_tokens: largest(capacity),
                },
            ),
            Shortage::Timeout { free, capacity } => busy(format!(
                "{what} needs {bytes} bytes of request memory; {free} of {capacity} free after waiting {:?}",
                self.limits.queue_timeout
            )),
        }
    }

    /// A compute slot for one chunk of work of `tokens` (batch x positions): a one-token
    /// decode step weighs a thousandth of a long prompt's chunk in the fair order.
    pub async fn compute(self: &Arc<Self>, peer: PeerId, tokens: usize) -> Result<Lease, ProtocolError> {
        let cost = tokens.max(1) as f64 / self.limits.chunk_tokens.max(1) as f64;
        self.compute
            .acquire(peer, 1, cost, self.limits.queue_timeout)
            .await
            .map_err(|_| {
                busy(format!(
                    "every compute slot stayed busy for {:?}",
                    self.limits.queue_timeout
                ))
            })
    }

    /// A session slot and `tokens` of KV cache for `peer`, after a valid `Open`. Sessions are
    /// refused at once when full; cache tokens are waited for (fairly) up to
    /// `--queue-timeout`.
    pub async fn open_session(self: &Arc<Self>, peer: PeerId, tokens: u64) -> Result<SessionGrant, ProtocolError> {
        let too_large = |limit: &str, needed: u64, allowed: u64, unit: &str| {
            ProtocolError::too_large(
                format!("the session needs {needed} {unit}; {limit} is {allowed}"),
                LimitExceeded {
                    limit: limit.into(),
                    needed,
                    allowed,
                    unit: unit.into(),
                    largest_tokens: Some(allowed),
                },
            )
        };
        if tokens > self.limits.max_cache_tokens_per_peer {
            return Err(too_large(
                "--max-cache-tokens-per-peer",
                tokens,
                self.limits.max_cache_tokens_per_peer,
                "cache tokens",
            ));
        }
        if tokens > self.limits.cache_tokens {
            return Err(too_large(
                "--cache-tokens",
                tokens,
                self.limits.cache_tokens,
                "cache tokens",
            ));
        }
        let (slot, charge) = {
            let mut ledger = self.lock();
            let entry = *ledger.peers.get(&peer).unwrap_or(&PeerLedger::default());
            if ledger.sessions >= self.limits.max_sessions {
                return Err(busy(format!(
                    "this server has {} sessions (--max-sessions)",
                    ledger.sessions
                )));
            }
            if entry.sessions >= self.limits.max_sessions_per_peer {
                return Err(busy(format!(
                    "this peer has {} sessions (--max-sessions-per-peer)",
                    entry.sessions
                )));
            }
            if entry.cache_tokens + tokens > self.limits.max_cache_tokens_per_peer {
                return Err(busy(format!(
                    "this peer holds {} cache tokens; {tokens} more exceed --max-cache-tokens-per-peer {}",
                    entry.cache_tokens, self.limits.max_cache_tokens_per_peer
                )));
            }
            ledger.sessions += 1;
            let entry = ledger.peers.entry(peer).or_default();
            entry.sessions += 1;
            entry.cache_tokens += tokens;
            (
                Ticket {
                    admission: self.clone(),
                    peer,
                    counter: Counter::Session,
                },
                CacheCharge {
                    admission: self.clone(),
                    peer,
                    tokens,
                },
            )
        };
        let cache = self
            .cache
            .acquire(
                peer,
                tokens,
                self.share(tokens, self.limits.cache_tokens),
                self.limits.queue_timeout,
            )
            .await
            .map_err(|s| match s {
                Shortage::Never { capacity } => too_large("--cache-tokens", tokens, capacity, "cache tokens"),
                Shortage::Timeout { free, .. } => busy(format!(
                    "no room for {tokens} cache tokens ({free} free after waiting {:?})",
                    self.limits.queue_timeout
                )),
            })?;
        Ok(SessionGrant {
            _slot: slot,
            _cache: cache,
            charged: charge,
        })
    }

    /// Whether `peer` holds anything here (a connection of such a peer should not be evicted).
    pub fn holds(&self, peer: &PeerId) -> bool {
        self.lock().peers.contains_key(peer)
    }

    /// Free cache tokens now.
    pub fn free_cache_tokens(&self) -> u64 {
        self.cache.free()
    }

    pub fn load(&self) -> ServerLoad {
        let (sessions, pending) = {
            let ledger = self.lock();
            (ledger.sessions, ledger.pending_streams)
        };
        let (memory_waiting, _) = self.memory.queue();
        let (compute_waiting, compute_held) = self.compute.queue();
        ServerLoad {
            sessions,
            max_sessions: self.limits.max_sessions,
            cache_tokens: self.limits.cache_tokens,
            free_cache_tokens: self.cache.free(),
            request_memory: self.limits.max_request_memory,
            free_request_memory: self.memory.free(),
            pending_streams: pending,
            queued: memory_waiting + compute_waiting,
            running: compute_held,
            connections: 0,
            peak_connections: 0,
            connections_refused: 0,
            connections_evicted: 0,
        }
    }
}

fn busy(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::Busy, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            max_sessions: 4,
            max_sessions_per_peer: 2,
            cache_tokens: 1000,
            max_cache_tokens_per_peer: 600,
            max_request_memory: 1 << 20,
            compute_slots: 1,
            max_pending_streams: 3,
            max_pending_streams_per_peer: 2,
            max_requests_per_peer: 2,
            open_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            session_timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_millis(50),
            chunk_tokens: 64,
            wire: Limits::default(),
        }
    }

    #[tokio::test]
    async fn pending_streams_are_capped_in_total_and_per_peer() {
        let a = Admission::new(limits());
        let (p, q, r) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t1 = a.stream(p).expect("1");
        let _t2 = a.stream(p).expect("2");
        assert_eq!(a.stream(p).expect_err("per peer").kind, ErrorKind::Busy);
        let _t3 = a.stream(q).expect("3");
        assert_eq!(a.stream(r).expect_err("total").kind, ErrorKind::Busy);
        drop(t1);
        let _t4 = a.stream(r).expect("freed");
        assert!(a.holds(&p) && a.holds(&r));
    }

    #[tokio::test]
    async fn sessions_and_cache_are_capped_per_peer_and_returned() {
        let a = Admission::new(limits());
        let (p, q) = (PeerId::random(), PeerId::random());
        let s1 = a.open_session(p, 300).await.expect("fits");
        let e = a.open_session(p, 301).await.expect_err("per-peer cache");
        assert_eq!(e.kind, ErrorKind::Busy);
        let e = a.open_session(p, 601).await.expect_err("over the per-peer cap at all");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert_eq!(e.limit.expect("limit").limit, "--max-cache-tokens-per-peer");
        let _s2 = a.open_session(p, 300).await.expect("second");
        let e = a.open_session(p, 1).await.expect_err("session cap per peer");
        assert_eq!(e.kind, ErrorKind::Busy);
        let _s3 = a.open_session(q, 400).await.expect("other peer");
        assert_eq!(a.free_cache_tokens(), 0);
        let e = a.open_session(q, 1).await.expect_err("cache full");
        assert_eq!(e.kind, ErrorKind::Busy);
        drop(s1);
        assert_eq!(a.free_cache_tokens(), 300);
        let _s4 = a.open_session(q, 100).await.expect("freed");
        assert_eq!(a.load().sessions, 3);
    }

    #[tokio::test]
    async fn memory_refuses_what_never_fits_with_the_largest_that_would() {
        let a = Admission::new(limits());
        let p = PeerId::random();
        let mut g = a.memory(p, 1000, "a frame").await.expect("fits");
        let e = g
            .fit(2 << 20, "a step of 4096 tokens", |cap| Some(cap / 512))
            .await
            .expect_err("too large");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        let limit = e.limit.expect("limit");
        assert_eq!((limit.limit.as_str(), limit.allowed), ("--max-request-memory", 1 << 20));
        assert_eq!(limit.largest_tokens, Some(2048));
        g.fit(4000, "a step", |_| None).await.expect("grows");
        assert_eq!(a.load().free_request_memory, (1 << 20) - 4000);
        let _g2 = a.memory(p, 10, "second").await.expect("second request");
        assert_eq!(
            a.memory(p, 10, "third").await.expect_err("per peer").kind,
            ErrorKind::Busy
        );
        drop(g);
        assert_eq!(a.load().free_request_memory, (1 << 20) - 10);
    }
}

//! Connection limits of a node open to the internet: totals and per peer
//! (`libp2p::connection_limits`), new connections refused while the process is above a memory
//! bound (`libp2p::memory_connection_limits`, native only), and [`ConnectionGuard`], which at the
//! total cap closes the oldest inbound connection of an unprotected peer instead of refusing
//! the newcomer.
//!
//! Why eviction: with a plain total cap, a peer with many identities fills every slot once and
//! locks every later user out for as long as it keeps the connections open. Evicting the oldest
//! unprotected connection means the attacker must keep churning to hold the table, and whoever
//! connects still gets in; peers the application protects (sessions, requests in flight,
//! bootstrap relays) are never evicted.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, ListenError, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, connection_limits};

use crate::dht_store::{DhtStoreSnapshot, DhtStoreStats};
use crate::rt::Instant;

/// Invalid [`ConnectionPolicy`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitsError {
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("max_per_peer ({per_peer}) must not exceed max_connections ({total})")]
    PerPeerAboveTotal { per_peer: u32, total: u32 },
    #[error("the memory ceiling fraction must be in (0, 1], not {0}")]
    Fraction(f64),
    #[error("the memory ceiling must be at least 1 byte")]
    ZeroBytes,
}

/// Above what resident memory new connections are refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryCeiling {
    Bytes(usize),
    /// A fraction of the machine's physical memory.
    FractionOfRam(f64),
}

/// Decides whether the application wants a peer's connections kept (it holds a session, has a
/// request in flight, ...). Called on the swarm task at the cap, so it must be quick and must
/// not block on anything slower than a short lock.
#[derive(Clone)]
pub struct Protect(Arc<dyn Fn(&PeerId) -> bool + Send + Sync>);

impl Protect {
    pub fn new(predicate: impl Fn(&PeerId) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(predicate))
    }

    /// Protects no one.
    pub fn none() -> Self {
        Self::new(|_| false)
    }

    pub fn is_protected(&self, peer: &PeerId) -> bool {
        (self.0)(peer)
    }
}

impl Default for Protect {
    fn default() -> Self {
        Self::none()
    }
}

impl fmt::Debug for Protect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Protect(..)")
    }
}

/// A ready-made [`Protect`] source: a peer is protected while some [`Protection`] for it is
/// alive. A server takes one per session or request and lets it drop when the work ends, so a
/// forgotten unprotect is impossible.
#[derive(Clone, Debug, Default)]
pub struct ProtectedPeers(Arc<Mutex<HashMap<PeerId, usize>>>);

impl ProtectedPeers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Protects `peer` until the returned guard is dropped (guards nest).
    pub fn protect(&self, peer: PeerId) -> Protection {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer)
            .or_default() += 1;
        Protection {
            peers: self.clone(),
            peer,
        }
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).contains_key(peer)
    }

    /// How many peers are protected now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The predicate for [`ConnectionPolicy::protect`].
    pub fn predicate(&self) -> Protect {
        let peers = self.clone();
        Protect::new(move |peer| peers.contains(peer))
    }
}

/// Keeps its peer protected while alive; see [`ProtectedPeers::protect`].
#[derive(Debug)]
pub struct Protection {
    peers: ProtectedPeers,
    peer: PeerId,
}

impl Protection {
    pub fn peer(&self) -> PeerId {
        self.peer
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// How many connections a node keeps, and which it gives up first.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// Established connections (inbound and outbound) beyond which a new inbound connection
    /// evicts the oldest evictable inbound one, or is refused when none is evictable.
    pub max_connections: u32,
    /// Established connections one peer id may hold (bootstrap peers are exempt).
    pub max_per_peer: u32,
    /// Connections still in their handshake (noise, yamux) from the outside.
    pub max_pending_incoming: u32,
    /// Dials in progress.
    pub max_pending_outgoing: u32,
    /// New connections (in and out) are refused while resident memory is above this. Native
    /// only; ignored in the browser.
    pub memory_ceiling: Option<MemoryCeiling>,
    /// A connection younger than this is never evicted, so a newcomer has time to open its
    /// session (and become protected) even while an attacker churns connections. The price:
    /// an attacker who opens more than `max_connections / min_evictable_age` connections a
    /// second keeps every slot young, and newcomers are refused until it slows down.
    pub min_evictable_age: Duration,
    /// A connection with no open stream is closed after this long. Session streams keep a
    /// connection open however long they last (libp2p counts open streams), so this only
    /// bounds how long an idle or abandoned connection holds a slot.
    pub idle_timeout: Duration,
    /// Peers whose connections are never evicted and who may connect beyond
    /// `max_connections` (up to the hard cap).
    pub protect: Protect,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_per_peer: 8,
            max_pending_incoming: 64,
            max_pending_outgoing: 128,
            memory_ceiling: None,
            min_evictable_age: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            protect: Protect::none(),
        }
    }
}

impl ConnectionPolicy {
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_per_peer", self.max_per_peer),
            ("max_pending_incoming", self.max_pending_incoming),
            ("max_pending_outgoing", self.max_pending_outgoing),
        ] {
            if value == 0 {
                return Err(LimitsError::Zero { field });
            }
        }
        if self.max_per_peer > self.max_connections {
            return Err(LimitsError::PerPeerAboveTotal {
                per_peer: self.max_per_peer,
                total: self.max_connections,
            });
        }
        match self.memory_ceiling {
            Some(MemoryCeiling::FractionOfRam(f)) if !(f > 0.0 && f <= 1.0) => Err(LimitsError::Fraction(f)),
            Some(MemoryCeiling::Bytes(0)) => Err(LimitsError::ZeroBytes),
            _ => Ok(()),
        }
    }

    /// The total that `connection_limits` enforces outright: `max_connections` plus room for
    /// evicted connections that are still closing and for protected peers.
    pub fn hard_cap(&self) -> u32 {
        self.max_connections.saturating_add((self.max_connections / 8).max(8))
    }
}

/// What the limits did so far; shared with the application (read it with
/// [`ConnectionStats::snapshot`]).
#[derive(Debug, Default)]
pub struct ConnectionStats {
    established: AtomicU64,
    peak_established: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionStatsSnapshot {
    /// Established connections now, counting those being evicted until they are closed.
    pub established: u64,
    /// The most established at once since start.
    pub peak_established: u64,
    /// Inbound connections refused by any limit (total, per peer, pending, memory, guard).
    pub refused: u64,
    /// Inbound connections closed to make room for newer ones.
    pub evicted: u64,
}

impl ConnectionStats {
    pub fn snapshot(&self) -> ConnectionStatsSnapshot {
        ConnectionStatsSnapshot {
            established: self.established.load(Ordering::Relaxed),
            peak_established: self.peak_established.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }
}

/// Every counter of a node's limits, as the application reads them (`Client::net_stats`).
#[derive(Debug, Clone, Default)]
pub struct NetStats {
    pub connections: Arc<ConnectionStats>,
    pub dht: Arc<DhtStoreStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetStatsSnapshot {
    pub connections: ConnectionStatsSnapshot,
    pub dht: DhtStoreSnapshot,
}

impl NetStats {
    pub fn snapshot(&self) -> NetStatsSnapshot {
        NetStatsSnapshot {
            connections: self.connections.snapshot(),
            dht: self.dht.snapshot(),
        }
    }
}

/// Logs at info only now and then, so a flood cannot flood the log too.
fn milestone(n: u64) -> bool {
    n == 1 || n.is_multiple_of(100)
}

/// An established connection as the guard sees it.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub peer: PeerId,
    pub since: Instant,
    pub inbound: bool,
    /// Chosen for eviction, not closed yet.
    pub closing: bool,
}

/// The connection to close so a new inbound one fits: the oldest inbound connection, at least
/// `min_age` old, of a peer that is not protected. `None` when nothing is evictable.
pub fn pick_victim<'a>(
    connections: impl IntoIterator<Item = (&'a ConnectionId, &'a Tracked)>,
    now: Instant,
    min_age: Duration,
    is_protected: impl Fn(&PeerId) -> bool,
) -> Option<(PeerId, ConnectionId)> {
    let mut candidates: Vec<(Instant, ConnectionId, PeerId)> = connections
        .into_iter()
        .filter(|(_, t)| t.inbound && !t.closing && now.saturating_duration_since(t.since) >= min_age)
        .map(|(id, t)| (t.since, *id, t.peer))
        .collect();
    // Oldest first; the protection predicate (a lock) runs only until the first hit.
    candidates.sort_unstable_by_key(|(since, id, _)| (*since, *id));
    candidates
        .into_iter()
        .find(|(_, _, peer)| !is_protected(peer))
        .map(|(_, id, peer)| (peer, id))
}

/// Refused because the node is at `max_connections` and nothing could be evicted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("at the connection limit ({limit}) and no connection is evictable")]
pub struct AtCapacity {
    pub limit: u32,
}

/// Tracks established connections and evicts at the cap; see the module docs.
pub struct ConnectionGuard {
    max_connections: u32,
    min_evictable_age: Duration,
    protect: Protect,
    always_protected: HashSet<PeerId>,
    connections: HashMap<ConnectionId, Tracked>,
    closing: usize,
    to_close: Vec<(PeerId, ConnectionId)>,
    stats: Arc<ConnectionStats>,
}

impl ConnectionGuard {
    pub fn new(policy: &ConnectionPolicy, always_protected: HashSet<PeerId>, stats: Arc<ConnectionStats>) -> Self {
        Self {
            max_connections: policy.max_connections,
            min_evictable_age: policy.min_evictable_age,
            protect: policy.protect.clone(),
            always_protected,
            connections: HashMap::new(),
            closing: 0,
            to_close: Vec::new(),
            stats,
        }
    }

    fn is_protected(&self, peer: &PeerId) -> bool {
        self.always_protected.contains(peer) || self.protect.is_protected(peer)
    }

    /// Established connections that are not on their way out.
    fn live(&self) -> usize {
        self.connections.len() - self.closing
    }

    fn admit_inbound(&mut self, peer: PeerId, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        if self.live() < self.max_connections as usize || self.is_protected(&peer) {
            return Ok(());
        }
        let victim = pick_victim(&self.connections, Instant::now(), self.min_evictable_age, |p| {
            self.is_protected(p)
        });
        let Some((victim_peer, victim_id)) = victim else {
            tracing::debug!(%peer, %remote, limit = self.max_connections, "connection refused: nothing evictable");
            return Err(ConnectionDenied::new(AtCapacity {
                limit: self.max_connections,
            }));
        };
        if let Some(t) = self.connections.get_mut(&victim_id) {
            t.closing = true;
            self.closing += 1;
        }
        self.to_close.push((victim_peer, victim_id));
        let evicted = self.stats.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%peer, %remote, victim = %victim_peer, ?victim_id, "evicting the oldest idle connection");
        if milestone(evicted) {
            let s = self.stats.snapshot();
            tracing::info!(
                evicted,
                refused = s.refused,
                established = s.established,
                limit = self.max_connections,
                "connection limit reached: evicting old connections"
            );
        }
        Ok(())
    }

    fn publish_count(&self) {
        let n = self.connections.len() as u64;
        self.stats.established.store(n, Ordering::Relaxed);
        self.stats.peak_established.fetch_max(n, Ordering::Relaxed);
    }
}

impl NetworkBehaviour for ConnectionGuard {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit_inbound(peer, remote_addr)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Our own dials: the hard cap of `connection_limits` bounds them.
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections.insert(
                    e.connection_id,
                    Tracked {
                        peer: e.peer_id,
                        since: Instant::now(),
                        inbound: matches!(e.endpoint, ConnectedPoint::Listener { .. }),
                        closing: false,
                    },
                );
                self.publish_count();
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(t) = self.connections.remove(&e.connection_id)
                    && t.closing
                {
                    self.closing -= 1;
                }
                self.publish_count();
            }
            FromSwarm::ListenFailure(f) => {
                if let ListenError::Denied { cause } = f.error {
                    let refused = self.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(peer = ?f.peer_id, remote = %f.send_back_addr, %cause, "connection refused");
                    if milestone(refused) {
                        let s = self.stats.snapshot();
                        tracing::info!(
                            refused,
                            evicted = s.evicted,
                            established = s.established,
                            %cause,
                            "connection limits refusing connections"
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _peer: PeerId, _id: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.to_close.pop() {
            Some((peer_id, connection)) => Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(connection),
            }),
            None => Poll::Pending,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
type MemoryLimit = libp2p::swarm::behaviour::toggle::Toggle<libp2p::memory_connection_limits::Behaviour>;
#[cfg(target_arch = "wasm32")]
type MemoryLimit = libp2p::swarm::dummy::Behaviour;

/// Every connection limit of a node in one behaviour, to add as one field of the node's
/// behaviour (first, so a refused connection never reaches the others).
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub struct Connections {
    // Order matters: the outright caps decide first, so the guard never evicts a connection
    // for a newcomer that a later check would refuse anyway.
    limits: connection_limits::Behaviour,
    memory: MemoryLimit,
    guard: ConnectionGuard,
}

impl Connections {
    /// `always_protected` (bootstrap peers, relays) bypass every limit.
    pub fn new(
        policy: &ConnectionPolicy,
        always_protected: impl IntoIterator<Item = PeerId>,
        stats: Arc<ConnectionStats>,
    ) -> Result<Self, LimitsError> {
        policy.validate()?;
        let always_protected: HashSet<PeerId> = always_protected.into_iter().collect();
        let mut limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(policy.max_pending_incoming))
                .with_max_pending_outgoing(Some(policy.max_pending_outgoing))
                .with_max_established_per_peer(Some(policy.max_per_peer))
                .with_max_established(Some(policy.hard_cap())),
        );
        for peer in &always_protected {
            limits.bypass_peer_id(peer);
        }
        Ok(Self {
            limits,
            memory: memory_limit(policy.memory_ceiling),
            guard: ConnectionGuard::new(policy, always_protected, stats),
        })
    }

    /// The memory bound new connections are refused above, in bytes, if any.
    pub fn memory_ceiling_bytes(&self) -> Option<usize> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.memory.as_ref().map(|m| m.max_allowed_bytes())
        }
        #[cfg(target_arch = "wasm32")]
        {
            None
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn memory_limit(ceiling: Option<MemoryCeiling>) -> MemoryLimit {
    use libp2p::memory_connection_limits::Behaviour;
    MemoryLimit::from(ceiling.map(|c| match c {
        MemoryCeiling::Bytes(bytes) => Behaviour::with_max_bytes(bytes),
        MemoryCeiling::FractionOfRam(f) => Behaviour::with_max_percentage(f),
    }))
}

#[cfg(target_arch = "wasm32")]
fn memory_limit(_ceiling: Option<MemoryCeiling>) -> MemoryLimit {
    libp2p::swarm::dummy::Behaviour
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    fn tracked(peer: PeerId, age: Duration, inbound: bool, now: Instant) -> Tracked {
        Tracked {
            peer,
            since: now - age,
            inbound,
            closing: false,
        }
    }

    #[test]
    fn victim_is_the_oldest_unprotected_inbound_old_enough() {
        let now = Instant::now();
        let (old_protected, outbound, closing, young, middle, newer) = (peer(), peer(), peer(), peer(), peer(), peer());
        let mut conns = HashMap::new();
        conns.insert(
            ConnectionId::new_unchecked(1),
            tracked(old_protected, Duration::from_secs(100), true, now),
        );
        conns.insert(
            ConnectionId::new_unchecked(2),
            tracked(outbound, Duration::from_secs(90), false, now),
        );
        let mut c = tracked(closing, Duration::from_secs(80), true, now);
        c.closing = true;
        conns.insert(ConnectionId::new_unchecked(3), c);
        conns.insert(
            ConnectionId::new_unchecked(4),
            tracked(newer, Duration::from_secs(10), true, now),
        );
        conns.insert(
            ConnectionId::new_unchecked(5),
            tracked(middle, Duration::from_secs(50), true, now),
        );
        conns.insert(
            ConnectionId::new_unchecked(6),
            tracked(young, Duration::from_millis(500), true, now),
        );
        let protected = |p: &PeerId| *p == old_protected;
        assert_eq!(
            pick_victim(&conns, now, Duration::from_secs(2), protected),
            Some((middle, ConnectionId::new_unchecked(5)))
        );
        // With `middle` protected too, the next oldest goes.
        let protected = |p: &PeerId| *p == old_protected || *p == middle;
        assert_eq!(
            pick_victim(&conns, now, Duration::from_secs(2), protected),
            Some((newer, ConnectionId::new_unchecked(4)))
        );
        // Only the young one is left unprotected: nothing is evictable.
        let protected = |p: &PeerId| *p != young;
        assert_eq!(pick_victim(&conns, now, Duration::from_secs(2), protected), None);
        // ...unless the minimum age allows it.
        assert_eq!(
            pick_victim(&conns, now, Duration::ZERO, protected),
            Some((young, ConnectionId::new_unchecked(6)))
        );
    }

    #[test]
    fn protections_nest_and_end_with_their_guards() {
        let peers = ProtectedPeers::new();
        let predicate = peers.predicate();
        let p = peer();
        assert!(!predicate.is_protected(&p));
        let a = peers.protect(p);
        let b = peers.protect(p);
        assert!(predicate.is_protected(&p));
        drop(a);
        assert!(predicate.is_protected(&p), "one protection is still alive");
        drop(b);
        assert!(!predicate.is_protected(&p));
        assert!(peers.is_empty());
    }

    fn guard(max: u32, protect: Protect) -> ConnectionGuard {
        let policy = ConnectionPolicy {
            max_connections: max,
            min_evictable_age: Duration::ZERO,
            protect,
            ..ConnectionPolicy::default()
        };
        ConnectionGuard::new(&policy, HashSet::new(), Arc::default())
    }

    fn establish(g: &mut ConnectionGuard, id: usize, peer: PeerId) {
        g.connections.insert(
            ConnectionId::new_unchecked(id),
            Tracked {
                peer,
                since: Instant::now() - Duration::from_secs(1000 - id as u64),
                inbound: true,
                closing: false,
            },
        );
        g.publish_count();
    }

    #[test]
    fn guard_evicts_at_the_cap_and_refuses_when_all_are_protected() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("address");
        let keep = peer();
        let keep2 = keep;
        let mut g = guard(2, Protect::new(move |p| *p == keep2));
        establish(&mut g, 1, keep);
        let first = peer();
        establish(&mut g, 2, first);
        // Full: the newcomer evicts `first` (the oldest unprotected), not `keep`.
        assert!(g.admit_inbound(peer(), &addr).is_ok());
        assert_eq!(g.to_close, vec![(first, ConnectionId::new_unchecked(2))]);
        assert_eq!(g.live(), 1);
        // The victim counts as gone, so the next newcomer fits without another eviction.
        assert!(g.admit_inbound(peer(), &addr).is_ok());
        assert_eq!(g.to_close.len(), 1);
        establish(&mut g, 3, peer());
        // Full again and only `keep` and the closing one besides the newest: evicts the newest.
        assert!(g.admit_inbound(peer(), &addr).is_ok());
        assert_eq!(g.to_close.len(), 2);
        // Now everyone live is protected or closing: refused.
        establish(&mut g, 4, keep);
        assert!(g.admit_inbound(peer(), &addr).is_err());
        // A protected peer still gets in (the hard cap bounds it).
        assert!(g.admit_inbound(keep, &addr).is_ok());
        assert_eq!(g.stats.snapshot().evicted, 2);
        assert_eq!(g.stats.snapshot().peak_established, 4);
    }

    #[test]
    fn policy_validation() {
        assert!(ConnectionPolicy::default().validate().is_ok());
        let bad = ConnectionPolicy {
            max_connections: 0,
            ..ConnectionPolicy::default()
        };
        assert_eq!(
            bad.validate(),
            Err(LimitsError::Zero {
                field: "max_connections"
            })
        );
        let bad = ConnectionPolicy {
            max_connections: 4,
            max_per_peer: 8,
            ..ConnectionPolicy::default()
        };
        assert!(matches!(bad.validate(), Err(LimitsError::PerPeerAboveTotal { .. })));
        let bad = ConnectionPolicy {
            memory_ceiling: Some(MemoryCeiling::FractionOfRam(1.5)),
            ..ConnectionPolicy::default()
        };
        assert!(matches!(bad.validate(), Err(LimitsError::Fraction(_))));
        let p = ConnectionPolicy::default();
        assert!(p.hard_cap() > p.max_connections);
    }
}

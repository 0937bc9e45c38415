//! A countable resource (bytes of memory, compute slots, KV cache tokens) shared fairly among
//! peers, by start-time fair queueing: each request is tagged with a virtual finish time, its
//! peer's previous finish (or the pool's virtual time, whichever is later) plus its cost, and
//! whatever frees goes to the waiter with the earliest tag. A peer's requests therefore queue
//! behind each other, not in front of other peers': a light user's one-token step is served
//! next even behind a flood of large requests from many peers, and a large request is served
//! once the peers ahead of it in virtual time are. Waits are bounded: past its timeout a
//! request gets `Busy`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::oneshot;

/// Why [`FairPool::acquire`] gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// More than the pool holds at all: waiting cannot help.
    Never { capacity: u64 },
    /// Not free within the wait.
    Timeout { free: u64, capacity: u64 },
}

struct Waiter {
    seq: u64,
    peer: PeerId,
    amount: u64,
    start: f64,
    finish: f64,
    grant: oneshot::Sender<Lease>,
}

/// The virtual clock of start-time fair queueing: what [`FairPool`] orders its waiters by,
/// and what the batcher (`crate::batch`) orders queued steps by.
#[derive(Debug, Default)]
pub struct FairTags {
    /// The start tag of the request served last.
    vtime: f64,
    /// Each peer's last finish tag (entries behind `vtime` are dropped: such a peer is as new).
    finish: HashMap<PeerId, f64>,
}

impl FairTags {
    /// Tags a request of `peer` weighing `cost`: (start, finish).
    pub fn tag(&mut self, peer: PeerId, cost: f64) -> (f64, f64) {
        let start = self.vtime.max(self.finish.get(&peer).copied().unwrap_or(0.0));
        let finish = start + cost.max(0.0);
        self.finish.insert(peer, finish);
        (start, finish)
    }

    /// Records that the request tagged to start at `start` is being served.
    pub fn served(&mut self, start: f64) {
        self.vtime = self.vtime.max(start);
        // Bounded by the peers with requests ahead of the clock.
        if self.finish.len() > 256 {
            let vtime = self.vtime;
            self.finish.retain(|_, f| *f > vtime);
        }
    }
}

struct State {
    free: u64,
    next_seq: u64,
    waiters: Vec<Waiter>,
    tags: FairTags,
    /// Granted leases, for the server's load report.
    leased: u32,
}

/// A pool of `capacity` units.
pub struct FairPool {
    capacity: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for FairPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairPool")
            .field("capacity", &self.capacity)
            .field("free", &self.free())
            .finish()
    }
}

impl FairPool {
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            state: Mutex::new(State {
                free: capacity,
                next_seq: 0,
                waiters: Vec::new(),
                tags: FairTags::default(),
                leased: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn free(&self) -> u64 {
        self.lock().free
    }

    /// Requests waiting, and leases held.
    pub fn queue(&self) -> (u32, u32) {
        let state = self.lock();
        (state.waiters.len() as u32, state.leased)
    }

    /// Takes `amount` units for `peer`, waiting at most `wait`; `cost` is what the request
    /// weighs in the fairness order (its amount, or an estimate of its work).
    pub async fn acquire(
        self: &Arc<Self>,
        peer: PeerId,
        amount: u64,
        cost: f64,
        wait: Duration,
    ) -> Result<Lease, Shortage> {
        if amount > self.capacity {
            return Err(Shortage::Never {
                capacity: self.capacity,
            });
        }
        let (tx, mut rx) = oneshot::channel();
        let seq = {
            let mut state = self.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            let (start, finish) = state.tags.tag(peer, cost);
            state.waiters.push(Waiter {
                seq,
                peer,
                amount,
                start,
                finish,
                grant: tx,
            });
            seq
        };
        self.dispatch();
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(lease)) => Ok(lease),
            // The sender lives in the waiter list until granted or removed below.
            Ok(Err(_)) | Err(_) => {
                let free = {
                    let mut state = self.lock();
                    state.waiters.retain(|w| w.seq != seq);
                    state.free
                };
                // Granted between the timeout and the removal: keep it.
                match rx.try_recv() {
                    Ok(lease) => Ok(lease),
                    Err(_) => {
                        // Others may fit now that this one stopped waiting.
                        self.dispatch();
                        Err(Shortage::Timeout {
                            free,
                            capacity: self.capacity,
                        })
                    }
                }
            }
        }
    }

    /// Grants waiters in tag order while the first fits. The first is never skipped for a
    /// smaller request behind it, so a large request is not starved.
    fn dispatch(self: &Arc<Self>) {
        let mut granted = Vec::new();
        {
            let mut state = self.lock();
            loop {
                let best = state
                    .waiters
                    .iter()
                    .enumerate()
                    .min_by(|(_, a), (_, b)| a.finish.total_cmp(&b.finish).then(a.seq.cmp(&b.seq)))
                    .map(|(i, w)| (i, w.amount));
                match best {
                    Some((i, amount)) if amount <= state.free => {
                        let waiter = state.waiters.swap_remove(i);
                        state.free -= amount;
                        state.leased += 1;
                        state.tags.served(waiter.start);
                        granted.push(waiter);
                    }
                    _ => break,
                }
            }
        }
        // Sent outside the lock: a lease whose waiter gave up is dropped here, which returns
        // it to the pool (and takes the lock again).
        for waiter in granted {
            let lease = Lease {
                pool: self.clone(),
                peer: waiter.peer,
                amount: waiter.amount,
            };
            let _ = waiter.grant.send(lease);
        }
    }

    fn give_back(self: &Arc<Self>, amount: u64, lease_ends: bool) {
        {
            let mut state = self.lock();
            state.free = (state.free + amount).min(self.capacity);
            if lease_ends {
                state.leased = state.leased.saturating_sub(1);
            }
        }
        self.dispatch();
    }
}

/// Units held from a [`FairPool`]; returned when dropped.
pub struct Lease {
    pool: Arc<FairPool>,
    peer: PeerId,
    amount: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("peer", &self.peer)
            .field("amount", &self.amount)
            .finish()
    }
}

impl Lease {
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Changes the lease to `amount` units: shrinking returns the rest at once, growing waits
    /// (fairly, at most `wait`, the difference weighing `cost`) for the difference. On failure
    /// the lease is unchanged.
    pub async fn resize(&mut self, amount: u64, cost: f64, wait: Duration) -> Result<(), Shortage> {
        if amount <= self.amount {
            let rest = self.amount - amount;
            self.amount = amount;
            if rest > 0 {
                self.pool.give_back(rest, false);
            }
            return Ok(());
        }
        if amount > self.pool.capacity {
            return Err(Shortage::Never {
                capacity: self.pool.capacity,
            });
        }
        let extra = self.pool.acquire(self.peer, amount - self.amount, cost, wait).await?;
        self.amount += extra.amount;
        // The extra units now belong to this lease.
        extra.merged();
        Ok(())
    }

    /// Ends a lease whose units another lease took over (see [`Lease::resize`]).
    fn merged(self) {
        let mut state = self.pool.lock();
        state.leased = state.leased.saturating_sub(1);
        drop(state);
        std::mem::forget(self);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.give_back(self.amount, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[tokio::test]
    async fn grants_what_fits_and_returns_it() {
        let pool = FairPool::new(10);
        let a = pool.acquire(peer(), 6, 6.0, Duration::ZERO).await.expect("fits");
        assert_eq!(pool.free(), 4);
        assert!(matches!(
            pool.acquire(peer(), 5, 5.0, Duration::from_millis(10)).await,
            Err(Shortage::Timeout { free: 4, capacity: 10 })
        ));
        assert!(matches!(
            pool.acquire(peer(), 11, 11.0, Duration::from_secs(1)).await,
            Err(Shortage::Never { capacity: 10 })
        ));
        drop(a);
        assert_eq!(pool.free(), 10);
        assert_eq!(pool.queue(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_units_when_they_free() {
        let pool = FairPool::new(10);
        let a = pool.acquire(peer(), 10, 10.0, Duration::ZERO).await.expect("fits");
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.acquire(peer(), 7, 7.0, Duration::from_secs(5))
                    .await
                    .map(|l| l.amount())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.queue(), (1, 1));
        drop(a);
        assert_eq!(waiting.await.expect("task"), Ok(7));
        assert_eq!(pool.free(), 10);
    }

    /// Many peers flood the pool with large requests; a light peer's small request, arriving
    /// last, is served as soon as the running one frees its units.
    #[tokio::test]
    async fn a_light_request_is_not_stuck_behind_a_flood() {
        let pool = FairPool::new(100);
        let held = pool.acquire(peer(), 100, 100.0, Duration::ZERO).await.expect("free");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut spawn = |name: &'static str, amount: u64| {
            let (pool, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let lease = pool
                    .acquire(peer(), amount, amount as f64, Duration::from_secs(5))
                    .await
                    .expect("granted");
                order.lock().expect("lock").push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(lease);
            }));
        };
        for _ in 0..4 {
            spawn("flood", 90);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        spawn("light", 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        let order = order.lock().expect("lock").clone();
        assert_eq!(order[0], "light", "{order:?}");
        assert_eq!(order.len(), 5);
    }

    /// One peer's requests queue behind each other: another peer's arrive in between.
    #[tokio::test]
    async fn a_peer_cannot_jump_the_queue_with_many_requests() {
        let pool = FairPool::new(1);
        let held = pool.acquire(peer(), 1, 1.0, Duration::ZERO).await.expect("free");
        let (greedy, other) = (peer(), peer());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (who, name) in [
            (greedy, "greedy"),
            (greedy, "greedy"),
            (greedy, "greedy"),
            (other, "other"),
        ] {
            let (pool, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let lease = pool
                    .acquire(who, 1, 1.0, Duration::from_secs(5))
                    .await
                    .expect("granted");
                order.lock().expect("lock").push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(lease);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        let order = order.lock().expect("lock").clone();
        let other_at = order.iter().position(|n| *n == "other").expect("served");
        assert!(other_at <= 1, "{order:?}");
    }

    #[tokio::test]
    async fn resize_shrinks_at_once_and_grows_by_waiting() {
        let pool = FairPool::new(10);
        let mut a = pool.acquire(peer(), 2, 2.0, Duration::ZERO).await.expect("fits");
        a.resize(8, 6.0, Duration::ZERO).await.expect("grows");
        assert_eq!((a.amount(), pool.free()), (8, 2));
        assert!(a.resize(11, 3.0, Duration::ZERO).await.is_err());
        assert_eq!((a.amount(), pool.free()), (8, 2));
        a.resize(3, 0.0, Duration::ZERO).await.expect("shrinks");
        assert_eq!((a.amount(), pool.free()), (3, 7));
        drop(a);
        assert_eq!(pool.free(), 10);
        assert_eq!(pool.queue(), (0, 0));
    }
}

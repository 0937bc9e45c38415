//! The userspace router: reads each peer's IPv4 packets from its TUN device, passes them
//! through the link to their destination ([`crate::link`]) and writes them to the
//! destination's TUN device when the link lets them out. The kernel has no `netem` here, so
//! the delay lives in this process.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tun_rs::SyncDevice;

use crate::link::{Fate, Link, LinkSpec};

/// The largest packet a TUN device hands over (its MTU is 1500; room for a bigger one).
const MAX_PACKET: usize = 65_536;
/// Packets held at once; beyond it the router drops, as a router out of memory would, so a
/// flood cannot exhaust this process.
const MAX_HELD: usize = 200_000;

/// Counters of one direction of one link.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkCounters {
    pub delivered: u64,
    pub bytes: u64,
    pub lost: u64,
    pub overflow: u64,
}

struct LinkSlot {
    link: Link,
    rng: ChaCha8Rng,
    counters: LinkCounters,
}

struct Held {
    at: Instant,
    seq: u64,
    to: usize,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Shared {
    devices: Vec<SyncDevice>,
    addrs: Vec<Ipv4Addr>,
    /// `links[from * n + to]`.
    links: Vec<Mutex<LinkSlot>>,
    queue: Mutex<BinaryHeap<Reverse<Held>>>,
    wake: Condvar,
    seq: AtomicU64,
    /// Packets no link was for (another subnet, IPv6, malformed).
    unroutable: AtomicU64,
}

/// The router's threads; they run until the process ends (a TUN read cannot be interrupted).
pub struct Router {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("peers", &self.shared.addrs).finish()
    }
}

impl Router {
    /// Routes among `devices` (peer `i` owns `addrs[i]`) with `spec(from, to)` for each
    /// direction of each pair; `seed` fixes the jitter and loss draws.
    pub fn start(
        devices: Vec<SyncDevice>,
        addrs: Vec<Ipv4Addr>,
        spec: impl Fn(usize, usize) -> LinkSpec,
        seed: u64,
    ) -> std::io::Result<Router> {
        let n = devices.len();
        let now = Instant::now();
        let links = (0..n * n)
            .map(|k| {
                Mutex::new(LinkSlot {
                    link: Link::new(spec(k / n, k % n), now),
                    rng: ChaCha8Rng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    counters: LinkCounters::default(),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            devices,
            addrs,
            links,
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            seq: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
        });
        for from in 0..n {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("wan-read-{from}"))
                .spawn(move || read_loop(&shared, from))?;
        }
        let deliver = shared.clone();
        std::thread::Builder::new()
            .name("wan-deliver".into())
            .spawn(move || deliver_loop(&deliver))?;
        Ok(Router { shared })
    }

    /// Each direction's counters so far, as `(from, to, counters)`, skipping unused ones.
    pub fn counters(&self) -> Vec<(usize, usize, LinkCounters)> {
        let n = self.shared.addrs.len();
        let mut out = Vec::new();
        for (k, slot) in self.shared.links.iter().enumerate() {
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            let c = &slot.counters;
            if c.delivered + c.lost + c.overflow > 0 {
                out.push((k / n, k % n, c.clone()));
            }
        }
        out
    }

    pub fn unroutable(&self) -> u64 {
        self.shared.unroutable.load(Ordering::Relaxed)
    }
}

/// The peer an IPv4 packet is for, if it is one of ours.
fn destination(packet: &[u8], addrs: &[Ipv4Addr]) -> Option<usize> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    addrs.iter().position(|a| *a == dst)
}

fn read_loop(shared: &Shared, from: usize) {
    let n = shared.addrs.len();
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let len = match shared.devices[from].recv(&mut buf) {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The device is gone: the emulator is shutting down.
            Err(_) => return,
        };
        let packet = &buf[..len];
        let to = match destination(packet, &shared.addrs) {
            Some(to) if to != from => to,
            _ => {
                shared.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let now = Instant::now();
        let fate = {
            let mut slot = shared.links[from * n + to].lock().unwrap_or_else(|p| p.into_inner());
            let LinkSlot { link, rng, counters } = &mut *slot;
            let fate = link.offer(len, now, rng);
            match fate {
                Fate::Deliver(_) => {
                    counters.delivered += 1;
                    counters.bytes += len as u64;
                }
                Fate::Lost => counters.lost += 1,
                Fate::Overflow => counters.overflow += 1,
            }
            fate
        };
        if let Fate::Deliver(at) = fate {
            let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= MAX_HELD {
                continue;
            }
            let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            let earliest = queue.peek().is_none_or(|Reverse(h)| at < h.at);
            queue.push(Reverse(Held {
                at,
                seq,
                to,
                packet: packet.to_vec(),
            }));
            if earliest {
                shared.wake.notify_one();
            }
        }
    }
}

fn deliver_loop(shared: &Shared) {
    let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        match queue.peek() {
            None => queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner()),
            Some(Reverse(held)) if held.at > now => {
                let wait = held.at - now;
                queue = shared
                    .wake
                    .wait_timeout(queue, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                let Some(Reverse(held)) = queue.pop() else { continue };
                drop(queue);
                // A full device queue drops the packet, as a congested NIC would.
                let _ = shared.devices[held.to].send(&held.packet);
                queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_packets_for_a_known_peer_are_routed() {
        let addrs = [Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2)];
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 201, 0, 2]);
        assert_eq!(destination(&p, &addrs), Some(1));
        p[19] = 3;
        assert_eq!(destination(&p, &addrs), None);
        p[0] = 0x60;
        assert_eq!(destination(&p, &addrs), None, "IPv6");
        assert_eq!(destination(&p[..10], &addrs), None, "truncated");
    }
}

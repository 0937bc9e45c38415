//! What the client measured of each server it used, and what it believes of the others.
//!
//! An announced throughput is a claim. Before a server has been used, its claim is only a
//! prior, and capped: no server is believed more than [`PRIOR_HEADROOM`] times faster per
//! block than the lower median of the model's servers' claims (so one liar among honest
//! servers cannot win every route, or steer new servers' block choice). Once used, the
//! client's own measurements decide: a moving average of each server's decode step time less
//! the round trip, per block. A server measured [`DEMOTE_FACTOR`] times slower than it claims
//! (and by more than [`DEMOTE_SLACK`] a step) is demoted: the client moves its blocks
//! elsewhere if anyone else serves them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::ServerInfo;

/// How much faster per block than the swarm's lower-median claim a claim is believed.
pub const PRIOR_HEADROOM: f64 = 4.0;
/// Measured this many times slower than claimed: demoted.
pub const DEMOTE_FACTOR: f64 = 4.0;
/// ... and by at least this much a step (loopback noise on sub-millisecond steps is no lie).
pub const DEMOTE_SLACK: Duration = Duration::from_millis(20);
/// Decode steps measured before a server can be demoted.
pub const DEMOTE_SAMPLES: u32 = 2;
/// Weight of the newest sample in the moving average.
const EWMA_ALPHA: f64 = 0.3;

/// A server's announced speed, per block: tokens per second times its span.
pub fn claimed_block_speed(info: &ServerInfo) -> f64 {
    let span = info.end.saturating_sub(info.start).max(1) as f64;
    info.throughput.max(0.0) * span
}

/// The most per-block speed a claim among `servers` is believed: [`PRIOR_HEADROOM`] times
/// the lower median claim. Infinite when there are no servers.
pub fn prior_cap(servers: &[ServerInfo]) -> f64 {
    let mut speeds: Vec<f64> = servers.iter().map(claimed_block_speed).collect();
    if speeds.is_empty() {
        return f64::INFINITY;
    }
    speeds.sort_by(f64::total_cmp);
    speeds[(speeds.len() - 1) / 2] * PRIOR_HEADROOM
}

/// Each server's announced throughput (tokens per second through its span), capped as
/// [`prior_cap`] says: what block choice should read.
pub fn capped_throughputs(servers: &[ServerInfo]) -> Vec<f64> {
    let cap = prior_cap(servers);
    servers
        .iter()
        .map(|s| {
            let span = s.end.saturating_sub(s.start).max(1) as f64;
            s.throughput.min(cap / span)
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Seconds per token per block, the round trip taken out (moving average).
    block_cost: f64,
    samples: u32,
}

/// The client's measurements, by peer id. Shared by the hops of a chain (interior mutability:
/// a hop records while the chain is borrowed).
#[derive(Debug, Default)]
pub struct SpeedBook {
    measured: Mutex<HashMap<String, Measured>>,
}

impl SpeedBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Measured>> {
        self.measured.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A decode step of `blocks` blocks on `peer` took `elapsed`, `rtt` of it the network.
    pub fn record(&self, peer: &str, blocks: usize, elapsed: Duration, rtt: Duration) {
        let cost = elapsed.saturating_sub(rtt).as_secs_f64() / blocks.max(1) as f64;
        let mut measured = self.lock();
        let entry = measured.entry(peer.to_string()).or_insert(Measured {
            block_cost: cost,
            samples: 0,
        });
        entry.block_cost = if entry.samples == 0 {
            cost
        } else {
            EWMA_ALPHA * cost + (1.0 - EWMA_ALPHA) * entry.block_cost
        };
        entry.samples = entry.samples.saturating_add(1);
    }

    /// Seconds per token per block that routing uses for `info`: the measured average once
    /// there is one, otherwise the claim, believed at most up to `cap` (see [`prior_cap`]).
    pub fn block_cost(&self, info: &ServerInfo, cap: f64) -> f64 {
        if let Some(m) = self.lock().get(&info.peer_id) {
            // A measured zero (a step faster than the ping) must still cost something.
            return m.block_cost.max(1e-9);
        }
        1.0 / claimed_block_speed(info).min(cap).max(1e-6)
    }

    /// The measured seconds per token per block of `peer`, if any decode step was timed.
    pub fn measured_cost(&self, peer: &str) -> Option<f64> {
        self.lock().get(peer).map(|m| m.block_cost)
    }

    /// Whether `info`'s server measured much slower than it claims (see the module docs).
    pub fn slower_than_claimed(&self, info: &ServerInfo) -> bool {
        let Some(m) = self.lock().get(&info.peer_id).copied() else {
            return false;
        };
        let claimed = 1.0 / claimed_block_speed(info).max(1e-6);
        let blocks = info.end.saturating_sub(info.start).max(1) as f64;
        m.samples >= DEMOTE_SAMPLES
            && m.block_cost > DEMOTE_FACTOR * claimed
            && (m.block_cost - claimed) * blocks > DEMOTE_SLACK.as_secs_f64()
    }

    /// Decode steps measured of `peer`.
    #[cfg(test)]
    pub fn samples(&self, peer: &str) -> u32 {
        self.lock().get(peer).map_or(0, |m| m.samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(peer: &str, start: u32, end: u32, throughput: f64) -> ServerInfo {
        ServerInfo::for_test(peer, start, end, throughput, 0)
    }

    #[test]
    fn one_liar_among_honest_servers_is_believed_only_up_to_the_cap() {
        let servers = [
            server("a", 0, 2, 100.0),
            server("b", 2, 4, 120.0),
            server("liar", 0, 4, 1e5),
        ];
        // Per-block claims 200, 240, 400000: the lower median is 240.
        assert_eq!(prior_cap(&servers), 240.0 * PRIOR_HEADROOM);
        let t = capped_throughputs(&servers);
        assert_eq!(&t[..2], &[100.0, 120.0]);
        assert!((t[2] - 240.0 * PRIOR_HEADROOM / 4.0).abs() < 1e-9, "{t:?}");
        let book = SpeedBook::default();
        let cap = prior_cap(&servers);
        assert!((book.block_cost(&servers[2], cap) - 1.0 / cap).abs() < 1e-12);
        assert!((book.block_cost(&servers[0], cap) - 1.0 / 200.0).abs() < 1e-12);
        assert_eq!(prior_cap(&[]), f64::INFINITY);
    }

    #[test]
    fn measurements_replace_the_claim_and_a_slow_liar_is_demoted() {
        let liar = server("liar", 0, 4, 1e5);
        let honest = server("honest", 0, 4, 100.0);
        let book = SpeedBook::default();
        let rtt = Duration::from_millis(1);
        book.record("liar", 4, Duration::from_millis(301), rtt);
        assert!(!book.slower_than_claimed(&liar), "one sample is not enough");
        book.record("liar", 4, Duration::from_millis(301), rtt);
        assert!(book.slower_than_claimed(&liar));
        assert!((book.block_cost(&liar, f64::INFINITY) - 0.075).abs() < 1e-9);
        // An honest server as fast as it claims (2.5 ms per block) is not demoted; nor is one
        // a little slower than claimed on tiny steps (under the slack).
        for _ in 0..5 {
            book.record("honest", 4, Duration::from_millis(11), rtt);
        }
        assert!(!book.slower_than_claimed(&honest));
        let tiny = server("tiny", 0, 4, 1e4);
        for _ in 0..5 {
            book.record("tiny", 4, Duration::from_micros(1500), Duration::ZERO);
        }
        assert!(!book.slower_than_claimed(&tiny), "4x slower but by 1.1 ms a step");
        // The average moves towards new samples.
        book.record("honest", 4, Duration::from_millis(41), rtt);
        let cost = book.block_cost(&honest, f64::INFINITY);
        assert!(cost > 0.0025 && cost < 0.01, "{cost}");
        assert_eq!(book.samples("honest"), 6);
    }
}

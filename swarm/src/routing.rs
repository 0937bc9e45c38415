//! Choosing a chain of servers that covers blocks `[start, end)`.
//!
//! Like Petals' `min_latency` routing: a shortest path over block boundaries where taking
//! server `s` from block `a` to block `b` costs the round trip to `s` plus `b - a` blocks of its
//! compute time. Overlapping spans let the route switch servers anywhere inside an overlap.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

/// A server as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub peer: String,
    pub start: usize,
    pub end: usize,
    /// Seconds per token per block.
    pub block_cost: f64,
    pub rtt: Duration,
}

/// How a client picks its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteMode {
    /// Lowest expected latency per token: interactive generation.
    #[default]
    MinLatency,
    /// Servers drawn in proportion to their throughput: batch work (fine-tuning, many
    /// clients) spreads over the swarm instead of piling onto the fastest chain.
    MaxThroughput,
}

/// A route for `mode`; `seed` makes the throughput-weighted draw reproducible.
pub fn route(mode: RouteMode, candidates: &[Candidate], start: usize, end: usize, seed: u64) -> Result<Vec<Hop>, Gap> {
    match mode {
        RouteMode::MinLatency => min_latency_route(candidates, start, end),
        RouteMode::MaxThroughput => throughput_route(candidates, start, end, seed),
    }
}

/// Walks the blocks in order; at each block draws one of the servers holding it with
/// probability proportional to its throughput, and stays on it to the end of its span.
pub fn throughput_route(candidates: &[Candidate], start: usize, end: usize, seed: u64) -> Result<Vec<Hop>, Gap> {
    // A small xorshift: routing needs spread, not cryptographic randomness.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut hops = Vec::new();
    let mut block = start;
    while block < end {
        let holders: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.start <= block && block < c.end)
            .collect();
        if holders.is_empty() {
            return Err(first_gap(candidates, start, end));
        }
        // Throughput is the inverse of the per-block cost.
        let weights: Vec<f64> = holders.iter().map(|c| 1.0 / c.block_cost.max(1e-12)).collect();
        let mut pick = next() * weights.iter().sum::<f64>();
        let mut chosen = holders[holders.len() - 1];
        for (c, w) in holders.iter().zip(&weights) {
            if pick < *w {
                chosen = c;
                break;
            }
            pick -= w;
        }
        let stop = chosen.end.min(end);
        hops.push(Hop {
            peer: chosen.peer.clone(),
            start: block,
            end: stop,
        });
        block = stop;
    }
    Ok(hops)
}

/// One hop of a route: `peer` runs blocks `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub peer: String,
    pub start: usize,
    pub end: usize,
}

/// Blocks no candidate covers, for the error a user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no server for blocks {start}..{end}")]
pub struct Gap {
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, PartialEq)]
struct State {
    cost: f64,
    block: usize,
}

impl Eq for State {}

impl Ord for State {
    fn cmp(&self, other: &Self) -> Ordering {
        other.cost.total_cmp(&self.cost).then(other.block.cmp(&self.block))
    }
}

impl PartialOrd for State {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The minimum-latency route over `[start, end)`.
pub fn min_latency_route(candidates: &[Candidate], start: usize, end: usize) -> Result<Vec<Hop>, Gap> {
    let n = end - start;
    let mut best = vec![f64::INFINITY; n + 1];
    let mut prev: Vec<Option<(usize, usize)>> = vec![None; n + 1];
    best[0] = 0.0;
    let mut heap = BinaryHeap::from([State {
        cost: 0.0,
        block: start,
    }]);
    while let Some(State { cost, block }) = heap.pop() {
        if cost > best[block - start] {
            continue;
        }
        if block == end {
            break;
        }
        for (i, c) in candidates.iter().enumerate() {
            if c.start > block || c.end <= block {
                continue;
            }
            let stop = c.end.min(end);
            for next in block + 1..=stop {
                let step = c.rtt.as_secs_f64() + (next - block) as f64 * c.block_cost;
                let total = cost + step;
                if total < best[next - start] {
                    best[next - start] = total;
                    prev[next - start] = Some((i, block));
                    heap.push(State {
                        cost: total,
                        block: next,
                    });
                }
            }
        }
    }
    if best[n].is_infinite() {
        return Err(first_gap(candidates, start, end));
    }
    let mut hops = Vec::new();
    let mut at = end;
    while at > start {
        let Some((i, from)) = prev[at - start] else {
            return Err(first_gap(candidates, start, end));
        };
        hops.push(Hop {
            peer: candidates[i].peer.clone(),
            start: from,
            end: at,
        });
        at = from;
    }
    hops.reverse();
    // Consecutive hops on the same server are one session.
    let mut merged: Vec<Hop> = Vec::with_capacity(hops.len());
    for hop in hops {
        match merged.last_mut() {
            Some(last) if last.peer == hop.peer && last.end == hop.start => last.end = hop.end,
            _ => merged.push(hop),
        }
    }
    Ok(merged)
}

/// The first run of blocks in `[start, end)` that no candidate covers.
pub fn first_gap(candidates: &[Candidate], start: usize, end: usize) -> Gap {
    let covered = |b: usize| candidates.iter().any(|c| c.start <= b && b < c.end);
    let gap_start = (start..end).find(|&b| !covered(b)).unwrap_or(start);
    let gap_end = (gap_start..end).find(|&b| covered(b)).unwrap_or(end);
    Gap {
        start: gap_start,
        end: gap_end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(peer: &str, start: usize, end: usize, ms: u64) -> Candidate {
        Candidate {
            peer: peer.into(),
            start,
            end,
            block_cost: 0.001,
            rtt: Duration::from_millis(ms),
        }
    }

    #[test]
    fn prefers_fewer_hops_when_round_trips_dominate() {
        let route = min_latency_route(&[c("a", 0, 2, 50), c("b", 2, 4, 50), c("big", 0, 4, 50)], 0, 4);
        assert_eq!(route.map(|r| r.len()), Ok(1));
    }

    #[test]
    fn chains_through_overlaps_and_reports_gaps() {
        let cands = [c("a", 0, 3, 10), c("b", 2, 6, 10)];
        let route = min_latency_route(&cands, 0, 6).expect("covered");
        assert_eq!(route.len(), 2);
        assert_eq!((route[0].start, route[1].end), (0, 6));
        assert_eq!(route[0].end, route[1].start);
        let err = min_latency_route(&[c("a", 0, 3, 10), c("b", 5, 6, 10)], 0, 6).unwrap_err();
        assert_eq!(err, Gap { start: 3, end: 5 });
        // Sub-spans route too (failover re-routes only the lost span).
        let sub = min_latency_route(&cands, 3, 5).expect("covered");
        assert_eq!(
            sub,
            vec![Hop {
                peer: "b".into(),
                start: 3,
                end: 5
            }]
        );
    }

    #[test]
    fn throughput_routing_spreads_by_throughput_and_covers_everything() {
        let mut fast = c("fast", 0, 4, 10);
        fast.block_cost = 0.001;
        let mut slow = c("slow", 0, 4, 10);
        slow.block_cost = 0.003;
        let cands = [fast, slow, c("tail", 2, 6, 10)];
        let mut fast_first = 0;
        for seed in 0..400 {
            let r = throughput_route(&cands, 0, 6, seed).expect("covered");
            assert_eq!(r.first().map(|h| h.start), Some(0));
            assert_eq!(r.last().map(|h| h.end), Some(6));
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            fast_first += usize::from(r[0].peer == "fast");
        }
        // 3:1 in favour of the faster server, within sampling noise.
        assert!((250..350).contains(&fast_first), "{fast_first}");
        assert_eq!(throughput_route(&cands, 0, 6, 7), throughput_route(&cands, 0, 6, 7));
        assert_eq!(
            throughput_route(&[c("a", 0, 2, 1)], 0, 4, 1).unwrap_err(),
            Gap { start: 2, end: 4 }
        );
    }

    #[test]
    fn avoids_slow_servers() {
        let mut slow = c("slow", 0, 4, 10);
        slow.block_cost = 1.0;
        let route = min_latency_route(&[slow, c("fast", 0, 4, 10)], 0, 4).expect("covered");
        assert_eq!(route[0].peer, "fast");
    }
}

//! Rebalancing: whether this server should move to other blocks, by Petals' rule (its
//! `block_selection.py`, reimplemented): a move must raise the swarm's weakest block.
//!
//! Every so often (a random period of mean `--balance-period`, so servers do not decide in
//! lockstep) a server takes its own span out of the swarm's per-block throughput, finds the
//! window it would choose now ([`span_choice::choose_start`]), and simulates the move: it moves
//! there, then every other server, in random order, moves to its own best window, until none
//! moves. If the weakest block's throughput before, over the weakest after, is below
//! `--balance-quality`, it moves. It stays if leaving would uncover a block that is covered
//! now, if its best window is where it is, or if the move would not help.

use std::sync::Arc;
use std::time::Duration;

use burn::prelude::*;
use futures::StreamExt;
use libp2p::Multiaddr;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use swarm::dht;
use swarm::node::Client;
use swarm::protocol::ServerInfo;

use crate::args::Balance;
use crate::relocate::Relocator;
use crate::span_choice;

/// The longest a check's look at the swarm may take.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server not connected to this one gets to answer a dial before it counts as gone.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Addresses tried per server.
const DIAL_ADDRS: usize = 4;
/// Servers dialed at once (a model may list hundreds).
const MAX_DIALS: usize = 32;

/// Checks, every random period of mean `balance.period`, whether to move, and moves. Returns
/// only if a move left the server with nothing to serve.
pub async fn run<B: Backend>(
    relocator: Arc<Relocator<B>>,
    client: Client,
    balance: Balance,
    fingerprint: String,
) -> anyhow::Result<()>
where
    B::Device: Send + Sync,
{
    let me = client.peer_id().to_string();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed(&me));
    let num_blocks = relocator.shared.model.num_layers;
    loop {
        tokio::time::sleep(balance.period.mul_f64(rng.random_range(0.0..2.0))).await;
        let Some(own) = relocator.span() else { continue };
        let listed = match dht::discover(&client, &fingerprint, Some(num_blocks as u32), DISCOVER_TIMEOUT).await {
            Ok(servers) => servers,
            Err(e) => {
                tracing::debug!(error = %e, "rebalancing: cannot read the swarm; trying later");
                continue;
            }
        };
        let mut servers = reachable(&client, listed, &me).await;
        // This server's own record may lag its last move: what it serves is what counts.
        let Some(index) = servers.iter().position(|s| s.peer_id == me) else {
            tracing::debug!("rebalancing: this server's record is not in the DHT yet");
            continue;
        };
        servers[index].start = own.start as u32;
        servers[index].end = own.end as u32;
        let placed: Vec<Placed> = servers
            .iter()
            .zip(swarm::remote::speed::capped_throughputs(&servers))
            .map(|(s, throughput)| Placed {
                start: s.start as usize,
                len: s.end.saturating_sub(s.start) as usize,
                throughput,
            })
            .collect();
        let Some(start) = better_start(&placed, index, num_blocks, balance.quality, &mut rng) else {
            tracing::debug!(servers = placed.len(), "rebalancing: staying");
            continue;
        };
        tracing::info!(
            from = ?own,
            to = start,
            servers = placed.len(),
            weakest_block = weakest(&coverage(&placed, num_blocks)),
            "rebalancing: a move raises the swarm's weakest block"
        );
        relocator.move_to(start).await?;
    }
}

/// The servers among `servers` that this one can reach now: those it is connected to, and
/// those that answer a dial ([`MAX_DIALS`] at once, [`DIAL_TIMEOUT`] each). A server that died
/// keeps a live record until it expires, and must not count as covering its blocks meanwhile.
async fn reachable(client: &Client, servers: Vec<ServerInfo>, me: &str) -> Vec<ServerInfo> {
    let checks = servers.into_iter().map(|s| async move {
        if s.peer_id == me {
            return Some(s);
        }
        for addr in s
            .addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .take(DIAL_ADDRS)
        {
            if let Ok(Ok(())) = tokio::time::timeout(DIAL_TIMEOUT, client.dial(addr)).await {
                return Some(s);
            }
        }
        tracing::debug!(peer = %s.peer_id, "rebalancing: a listed server does not answer; not counted");
        None
    });
    futures::stream::iter(checks)
        .buffer_unordered(MAX_DIALS)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// A seed of its own for each server and start: servers must not draw the same periods.
fn seed(peer: &str) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((peer, std::time::SystemTime::now()))
}

/// One server's place in the swarm, as block choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placed {
    pub start: usize,
    pub len: usize,
    /// Tokens per second through its span (capped as clients cap claims).
    pub throughput: f64,
}

/// A throughput this small counts as nothing (and breaks ties toward staying).
const EPS: f64 = 1e-3;
/// Rounds of the others' simulated moves before the simulation stops (it settles in a few;
/// this bounds it whatever the records say).
const MAX_ROUNDS: usize = 64;

/// The start this server (`servers[me]`) should move to, or `None` to stay.
///
/// `quality` is `--balance-quality`: 0 never moves; above 1, a server moves whenever its best
/// window is elsewhere.
pub fn better_start(
    servers: &[Placed],
    me: usize,
    num_blocks: usize,
    quality: f64,
    rng: &mut impl Rng,
) -> Option<usize> {
    if quality <= 0.0 || num_blocks == 0 {
        return None;
    }
    let mut spans: Vec<Placed> = servers
        .iter()
        .map(|s| Placed {
            start: s.start.min(num_blocks - 1),
            len: s.len.clamp(1, num_blocks - s.start.min(num_blocks - 1)),
            throughput: if s.throughput.is_finite() {
                s.throughput.max(0.0)
            } else {
                0.0
            },
        })
        .collect();
    let own = *spans.get(me)?;
    let mut t = vec![0.0; num_blocks];
    for s in &spans {
        add(&mut t, s, s.throughput);
    }
    let before = weakest(&t);
    // Slightly more than its own throughput comes off its window, so the window looks weaker
    // than it is and wins ties: a server never moves for nothing.
    add(&mut t, &own, -own.throughput * (1.0 + EPS));
    if before > EPS && weakest(&t) <= 0.0 {
        return None;
    }
    let target = span_choice::choose_start(&t, own.len);
    if target == own.start {
        return None;
    }
    if quality > 1.0 {
        return Some(target);
    }
    add(&mut t, &own, own.throughput * EPS);
    spans[me].start = target;
    add(&mut t, &spans[me], own.throughput);
    settle(&mut spans, &mut t, rng);
    let after = weakest(&t);
    if after < before || after < EPS {
        return None;
    }
    (before / after < quality - EPS).then_some(target)
}

/// Lets every server move to its best window, in random order, until none moves.
fn settle(spans: &mut [Placed], t: &mut [f64], rng: &mut impl Rng) {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    for _ in 0..MAX_ROUNDS {
        order.shuffle(rng);
        let mut moved = false;
        for &i in &order {
            let s = spans[i];
            add(t, &s, -s.throughput * (1.0 + EPS));
            let start = span_choice::choose_start(t, s.len);
            add(t, &s, s.throughput * EPS);
            if start != s.start {
                spans[i].start = start;
                moved = true;
            }
            add(t, &spans[i], s.throughput);
        }
        if !moved {
            return;
        }
    }
}

fn add(t: &mut [f64], s: &Placed, amount: f64) {
    let end = (s.start + s.len).min(t.len());
    for x in &mut t[s.start.min(end)..end] {
        *x += amount;
    }
}

fn weakest(t: &[f64]) -> f64 {
    t.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The per-block picture of `servers`: block throughputs summed over spans.
pub fn coverage(servers: &[Placed], num_blocks: usize) -> Vec<f64> {
    let mut t = vec![0.0; num_blocks];
    for s in servers {
        add(&mut t, s, s.throughput);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn at(start: usize, len: usize) -> Placed {
        Placed {
            start,
            len,
            throughput: 10.0,
        }
    }

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(7)
    }

    /// Each server in turn applies the rule to what the others do, as a live swarm would
    /// (one decision at a time, each seeing the moves before it).
    fn run_swarm(mut servers: Vec<Placed>, blocks: usize, rounds: usize) -> Vec<Placed> {
        let mut rng = rng();
        for _ in 0..rounds {
            for me in 0..servers.len() {
                if let Some(start) = better_start(&servers, me, blocks, 0.75, &mut rng) {
                    servers[me].start = start;
                }
            }
        }
        servers
    }

    #[test]
    fn servers_piled_on_one_window_spread_until_every_block_is_covered() {
        let spread = run_swarm(vec![at(0, 3); 4], 8, 4);
        let t = coverage(&spread, 8);
        assert!(t.iter().all(|&x| x > 0.0), "{spread:?} leaves a block uncovered: {t:?}");
    }

    #[test]
    fn the_others_recover_the_blocks_of_a_server_that_left() {
        let mut swarm = run_swarm(vec![at(0, 3); 4], 8, 4);
        // Remove the server whose absence uncovers the most blocks.
        let uncovered = |without: usize| {
            let rest: Vec<Placed> = (0..swarm.len()).filter(|&i| i != without).map(|i| swarm[i]).collect();
            coverage(&rest, 8).iter().filter(|&&x| x <= 0.0).count()
        };
        let victim = (0..swarm.len()).max_by_key(|&i| uncovered(i)).unwrap();
        assert!(uncovered(victim) > 0, "some server must be the only one on a block");
        swarm.remove(victim);
        let healed = run_swarm(swarm, 8, 4);
        let t = coverage(&healed, 8);
        assert!(t.iter().all(|&x| x > 0.0), "{healed:?} leaves a block uncovered: {t:?}");
    }

    #[test]
    fn a_balanced_swarm_stays_put() {
        let servers = vec![at(0, 4), at(4, 4), at(0, 4), at(4, 4)];
        for me in 0..4 {
            assert_eq!(better_start(&servers, me, 8, 0.75, &mut rng()), None);
        }
    }

    #[test]
    fn never_uncovers_a_covered_block() {
        // Every block is covered and each server is the only one on some of them: though
        // blocks 3..6 carry twice the others, nobody leaves a block empty to get there.
        let servers = vec![at(0, 3), at(3, 3), at(5, 3), at(3, 2)];
        for me in 0..3 {
            assert_eq!(better_start(&servers, me, 8, 0.75, &mut rng()), None, "server {me}");
        }
    }

    #[test]
    fn quality_sets_how_much_better_a_move_must_be() {
        // Blocks 0..2 carry 30 tok/s, 2..4 carry 10: the weakest would rise from 10 to 20.
        let servers = vec![
            at(0, 2),
            at(0, 2),
            at(0, 2),
            Placed {
                start: 2,
                len: 2,
                throughput: 10.0,
            },
        ];
        // 10 / 20 = 0.5: moves at 0.75, stays at 0.4 and at 0.
        assert_eq!(better_start(&servers, 0, 4, 0.75, &mut rng()), Some(2));
        assert_eq!(better_start(&servers, 0, 4, 0.4, &mut rng()), None);
        assert_eq!(better_start(&servers, 0, 4, 0.0, &mut rng()), None);
    }

    #[test]
    fn odd_records_do_not_break_it() {
        let servers = vec![
            Placed {
                start: 99,
                len: 50,
                throughput: f64::NAN,
            },
            Placed {
                start: 0,
                len: 0,
                throughput: f64::INFINITY,
            },
        ];
        for me in 0..2 {
            let _ = better_start(&servers, me, 4, 0.75, &mut rng());
        }
        assert_eq!(better_start(&servers, 5, 4, 0.75, &mut rng()), None);
        assert_eq!(better_start(&servers, 0, 0, 0.75, &mut rng()), None);
    }
}

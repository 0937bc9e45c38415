//! The swarm's health as the monitor shows it (the relay's `/corolla/v1/state`, the page's
//! Monitor view): per model, each block's coverage and summed throughput, healthy or broken;
//! per server its span, version, throughput, free cache, relayed or direct, the RTT measured
//! from the relay, and whether the relay can reach it. Built only from signed DHT records
//! that verify, so a server can describe only itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::ServerInfo;

/// Where the JSON is served.
pub const STATE_PATH: &str = "/corolla/v1/state";

/// What the relay knows of a server's connection to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// Connected to the relay now.
    Online,
    /// Its last connection to the relay closed (died, or left without withdrawing); it
    /// covers nothing until it reconnects.
    Unreachable,
    /// Never connected to this relay (it may use another): counted, as its record is live.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmState {
    /// When this state was built (ms since the Unix epoch).
    pub updated_ms: u64,
    pub models: Vec<ModelState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub fingerprint: String,
    pub name: String,
    /// The model's blocks, as its servers' records say (else one past the last served block).
    pub num_blocks: u32,
    /// Whether a record said `num_blocks` (servers before that field did not).
    pub num_blocks_known: bool,
    /// Every block is served by some server the relay does not know to be gone.
    pub healthy: bool,
    /// Per block: servers covering it and their summed throughput (tokens/s).
    pub blocks: Vec<BlockState>,
    /// Ranges `[start, end)` of blocks nobody serves.
    pub uncovered: Vec<[u32; 2]>,
    pub servers: Vec<ServerState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockState {
    pub servers: u32,
    pub throughput: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    pub peer_id: String,
    pub name: Option<String>,
    pub start: u32,
    pub end: u32,
    pub version: String,
    pub numerics: String,
    pub throughput: f64,
    pub free_cache_tokens: u64,
    pub cache_tokens: Option<u64>,
    pub sessions: Option<u32>,
    pub relayed: bool,
    pub serves_head: bool,
    pub adapters: Vec<String>,
    /// Round trip from the relay (its latest ping), when connected.
    pub rtt_ms: Option<f64>,
    pub state: Reach,
    /// Until the record expires unless renewed.
    pub expires_in_ms: u64,
}

/// One server as the relay sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub info: ServerInfo,
    pub reach: Reach,
    pub rtt_ms: Option<f64>,
}

/// The state of every model that `servers` (verified, live records) serve.
pub fn build(servers: Vec<Seen>, now_ms: u64) -> SwarmState {
    let mut by_model: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    for seen in servers {
        by_model.entry(seen.info.model.clone()).or_default().push(seen);
    }
    let mut models: Vec<ModelState> = by_model
        .into_iter()
        .map(|(fingerprint, servers)| model_state(fingerprint, servers, now_ms))
        .collect();
    models.sort_by(|a, b| b.servers.len().cmp(&a.servers.len()).then(a.name.cmp(&b.name)));
    SwarmState {
        updated_ms: now_ms,
        models,
    }
}

fn model_state(fingerprint: String, mut servers: Vec<Seen>, now_ms: u64) -> ModelState {
    servers
        .sort_by(|a, b| (a.info.start, a.info.end, &a.info.peer_id).cmp(&(b.info.start, b.info.end, &b.info.peer_id)));
    // The most common name and block count among the servers (a liar cannot outvote them).
    let name = most_common(servers.iter().map(|s| s.info.model_name.clone())).unwrap_or_default();
    let said = most_common(servers.iter().map(|s| s.info.model_blocks).filter(|&n| n > 0));
    let last = servers.iter().map(|s| s.info.end).max().unwrap_or(0);
    let num_blocks = said.unwrap_or(last).max(last);
    let mut blocks = vec![
        BlockState {
            servers: 0,
            throughput: 0.0
        };
        num_blocks as usize
    ];
    for s in servers.iter().filter(|s| s.reach != Reach::Unreachable) {
        for block in &mut blocks[s.info.start as usize..(s.info.end as usize).min(num_blocks as usize)] {
            block.servers += 1;
            block.throughput += s.info.throughput;
        }
    }
    let mut uncovered: Vec<[u32; 2]> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let i = i as u32;
        if b.servers == 0 {
            match uncovered.last_mut() {
                Some(range) if range[1] == i => range[1] = i + 1,
                _ => uncovered.push([i, i + 1]),
            }
        }
    }
    ModelState {
        fingerprint,
        name,
        num_blocks,
        num_blocks_known: said.is_some(),
        healthy: uncovered.is_empty() && num_blocks > 0,
        blocks,
        uncovered,
        servers: servers.into_iter().map(|s| server_state(s, now_ms)).collect(),
    }
}

fn server_state(seen: Seen, now_ms: u64) -> ServerState {
    let Seen { info, reach, rtt_ms } = seen;
    ServerState {
        name: info.public_name,
        start: info.start,
        end: info.end,
        version: info.version,
        numerics: info.numerics,
        throughput: info.throughput,
        free_cache_tokens: info
            .load
            .as_ref()
            .map_or(info.free_cache_tokens, |l| l.free_cache_tokens),
        cache_tokens: info.load.as_ref().map(|l| l.cache_tokens),
        sessions: info.load.as_ref().map(|l| l.sessions),
        relayed: info.relayed,
        serves_head: info.serves_head,
        adapters: info.adapters,
        rtt_ms,
        state: reach,
        expires_in_ms: info.expires_at_ms.saturating_sub(now_ms),
        peer_id: info.peer_id,
    }
}

fn most_common<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(item, _)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(peer: &str, model: &str, span: (u32, u32), blocks: u32, reach: Reach) -> Seen {
        let mut info = ServerInfo::for_test(peer, span.0, span.1, 10.0, 5_000);
        info.model = model.into();
        info.model_blocks = blocks;
        Seen {
            info,
            reach,
            rtt_ms: Some(1.5),
        }
    }

    #[test]
    fn coverage_throughput_and_health_per_model() {
        let state = build(
            vec![
                seen("a", "m", (0, 4), 8, Reach::Online),
                seen("b", "m", (2, 6), 8, Reach::Unknown),
                seen("c", "m", (6, 8), 8, Reach::Unreachable),
                seen("d", "n", (0, 2), 2, Reach::Online),
            ],
            1_000,
        );
        assert_eq!(state.models.len(), 2);
        let m = &state.models[0];
        assert_eq!(
            (m.fingerprint.as_str(), m.num_blocks, m.num_blocks_known),
            ("m", 8, true)
        );
        assert_eq!(
            m.blocks.iter().map(|b| b.servers).collect::<Vec<_>>(),
            [1, 1, 2, 2, 1, 1, 0, 0]
        );
        assert_eq!(m.blocks[2].throughput, 20.0);
        assert_eq!(m.uncovered, vec![[6, 8]], "an unreachable server covers nothing");
        assert!(!m.healthy);
        assert_eq!(m.servers.len(), 3, "but it is listed");
        assert_eq!(m.servers[2].state, Reach::Unreachable);
        assert_eq!(m.servers[0].expires_in_ms, 4_000);
        let n = &state.models[1];
        assert!(n.healthy && n.uncovered.is_empty());
    }

    #[test]
    fn without_a_block_count_the_last_served_block_ends_the_model() {
        let state = build(vec![seen("a", "m", (0, 3), 0, Reach::Online)], 0);
        let m = &state.models[0];
        assert_eq!((m.num_blocks, m.num_blocks_known, m.healthy), (3, false, true));
        let text = serde_json::to_string(&state).expect("json");
        let back: SwarmState = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, state);
    }
}

//! The swarm monitor's data on the relay: which servers' signed records its DHT store holds,
//! whether each is connected to the relay, and the RTT of its latest ping, turned into
//! [`swarm::monitor::SwarmState`] every few seconds for `/corolla/v1/state`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::kad::store::RecordStore;
use swarm::dht;
use swarm::monitor::{Reach, Seen, SwarmState};
use swarm::record::Expect;

/// The JSON served at `/corolla/v1/state`, replaced whole at each refresh.
pub type StateText = Arc<Mutex<Arc<String>>>;

/// Peers that closed their last connection, remembered at most this many (the oldest go).
const MAX_GONE: usize = 4096;

pub struct Monitor {
    rtts: HashMap<PeerId, Duration>,
    /// Peers whose last connection to the relay closed, by when.
    gone: HashMap<PeerId, u64>,
    text: StateText,
}

impl Monitor {
    /// A monitor whose state lists no model yet.
    pub fn new() -> Self {
        let empty = swarm::monitor::build(Vec::new(), dht::now_ms());
        Self {
            rtts: HashMap::new(),
            gone: HashMap::new(),
            text: Arc::new(Mutex::new(Arc::new(serde_json::to_string(&empty).unwrap_or_default()))),
        }
    }

    pub fn text(&self) -> StateText {
        self.text.clone()
    }

    pub fn on_ping(&mut self, peer: PeerId, rtt: Duration) {
        self.rtts.insert(peer, rtt);
    }

    pub fn on_connected(&mut self, peer: PeerId) {
        self.gone.remove(&peer);
    }

    /// A connection closed, `remaining` of the peer's still open.
    pub fn on_closed(&mut self, peer: PeerId, remaining: u32) {
        if remaining > 0 {
            return;
        }
        self.rtts.remove(&peer);
        if self.gone.len() >= MAX_GONE
            && let Some(oldest) = self.gone.iter().min_by_key(|(_, at)| **at).map(|(p, _)| *p)
        {
            self.gone.remove(&oldest);
        }
        self.gone.insert(peer, dht::now_ms());
    }

    /// Rebuilds the state from the servers' records in `store`.
    pub fn refresh(&mut self, store: &mut impl RecordStore, connected: impl Fn(&PeerId) -> bool) {
        let now_ms = dht::now_ms();
        let mut servers: Vec<Seen> = Vec::new();
        for record in store.records() {
            let Some(peer) = std::str::from_utf8(record.key.as_ref())
                .ok()
                .and_then(|k| k.strip_prefix("corolla/peer/"))
                .and_then(|p| p.parse::<PeerId>().ok())
            else {
                continue;
            };
            let expect = Expect {
                peer: &peer,
                model: None,
                num_blocks: None,
                now_ms,
            };
            let Some(info) = dht::live_info(&record.value, &expect) else {
                continue;
            };
            let reach = if connected(&peer) {
                Reach::Online
            } else if self.gone.contains_key(&peer) {
                Reach::Unreachable
            } else {
                Reach::Unknown
            };
            servers.push(Seen {
                info,
                reach,
                rtt_ms: self.rtts.get(&peer).map(|d| d.as_secs_f64() * 1e3),
            });
        }
        // Forget departures older than any record could live.
        let horizon = now_ms.saturating_sub(2 * swarm::record::MAX_ANNOUNCE_TTL.as_millis() as u64);
        self.gone.retain(|_, at| *at >= horizon);
        let state: SwarmState = swarm::monitor::build(servers, now_ms);
        match serde_json::to_string(&state) {
            Ok(text) => {
                if let Ok(mut guard) = self.text.lock() {
                    *guard = Arc::new(text);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the swarm state"),
        }
    }
}

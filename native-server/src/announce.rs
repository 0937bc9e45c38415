//! Announcing the server in the DHT, and answering `/corolla/info/1`, off the request path: a
//! task of its own renews the records every third of `--announce-ttl`, so no request ever
//! waits on a DHT query.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use swarm::dht;
use swarm::node::{Client, InboundEvent};
use swarm::protocol::{PROTOCOL_VERSION, ServerInfo, ServerLoad};
use tokio::sync::{Notify, mpsc};

use crate::admission::Admission;

/// The longest one announcement may take before it is abandoned and retried.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server says about itself, and how to reach it.
pub struct Announcer {
    pub client: Client,
    /// The node's identity key, which signs every record.
    pub keypair: libp2p::identity::Keypair,
    /// The info without addresses, load and expiry (filled in per announcement); its span
    /// changes when the server moves.
    template: Mutex<ServerInfo>,
    ttl: Duration,
    relay_only: bool,
    admission: Arc<Admission>,
    /// Written with the announced addresses after the first announcement.
    addr_file: Option<std::path::PathBuf>,
    /// While the server moves with nothing loaded: no announcements.
    paused: AtomicBool,
    /// Announce now (the span changed).
    now: Notify,
}

impl Announcer {
    pub fn new(
        client: Client,
        keypair: libp2p::identity::Keypair,
        template: ServerInfo,
        ttl: Duration,
        relay_only: bool,
        admission: Arc<Admission>,
        addr_file: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            keypair,
            template: Mutex::new(template),
            ttl,
            relay_only,
            admission,
            addr_file,
            paused: AtomicBool::new(false),
            now: Notify::new(),
        })
    }

    fn template(&self) -> ServerInfo {
        self.template.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Announces `start..end` from now on, at once.
    pub fn set_span(&self, start: usize, end: usize) {
        {
            let mut t = self.template.lock().unwrap_or_else(|e| e.into_inner());
            t.start = start as u32;
            t.end = end as u32;
        }
        self.paused.store(false, Ordering::Release);
        self.now.notify_one();
    }

    /// Stops announcing (the span is being unloaded) until [`Self::set_span`], and withdraws
    /// the server from the model's providers.
    pub async fn pause(&self) {
        self.paused.store(true, Ordering::Release);
        let model = self.template().model;
        if let Err(e) = tokio::time::timeout(ANNOUNCE_TIMEOUT, dht::withdraw(&self.client, &model)).await {
            tracing::debug!(error = %e, "withdrawal timed out");
        }
    }

    /// The current info: addresses, free cache and load now, expiring one TTL from now.
    pub async fn info(&self) -> ServerInfo {
        let (addrs, relayed) = announce_addrs(&self.client, self.client.peer_id(), self.relay_only).await;
        let net = self.client.net_stats().connections;
        let load = ServerLoad {
            connections: net.established,
            peak_connections: net.peak_established,
            connections_refused: net.refused,
            connections_evicted: net.evicted,
            ..self.admission.load()
        };
        ServerInfo {
            free_cache_tokens: load.free_cache_tokens,
            relayed,
            addrs,
            expires_at_ms: dht::now_ms() + self.ttl.as_millis() as u64,
            load: Some(load),
            protocol: PROTOCOL_VERSION,
            ..self.template()
        }
    }

    /// Announces until the node shuts down.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        let mut announced_once = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.now.notified() => {}
            }
            if self.paused.load(Ordering::Acquire) {
                continue;
            }
            let info = self.info().await;
            if info.addrs.is_empty() {
                // Not reachable yet (a relay circuit still being set up): try again soon.
                tick.reset_after(Duration::from_millis(500));
                continue;
            }
            match tokio::time::timeout(ANNOUNCE_TIMEOUT, dht::announce(&self.client, &self.keypair, &info)).await {
                Ok(Ok(())) => {
                    if !announced_once {
                        tracing::info!(addrs = ?info.addrs, "announced in the DHT");
                        if let Some(path) = &self.addr_file
                            && let Err(e) = write_atomically(path, &info.addrs.join("\n"))
                        {
                            tracing::error!(path = %path.display(), error = %e, "cannot write the address file");
                        }
                        announced_once = true;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "announcement failed; retrying");
                    tick.reset_after(Duration::from_secs(1));
                }
                Err(_) => {
                    tracing::warn!(timeout = ?ANNOUNCE_TIMEOUT, "announcement timed out; retrying");
                    tick.reset_after(Duration::from_secs(1));
                }
            }
        }
    }

    /// Answers info requests as they come, each in a task of its own.
    pub async fn answer_info(self: Arc<Self>, mut inbound: mpsc::Receiver<InboundEvent>) {
        while let Some(event) = inbound.recv().await {
            match event {
                InboundEvent::Info { channel, .. } => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let info = this.info().await;
                        let _ = this.client.respond_info(channel, info).await;
                    });
                }
            }
        }
    }
}

/// Addresses others can dial: circuit addresses, plus direct listeners unless relay-only.
async fn announce_addrs(client: &Client, peer: PeerId, relay_only: bool) -> (Vec<String>, bool) {
    let Ok(addrs) = client.addresses().await else {
        return (Vec::new(), false);
    };
    let mut out: Vec<Multiaddr> = addrs
        .external
        .iter()
        .filter(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
        .cloned()
        .collect();
    if !relay_only {
        out.extend(
            addrs
                .listen
                .iter()
                .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))
                .cloned(),
        );
    }
    let full = out
        .into_iter()
        .map(|mut a| {
            if !matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                a.push(Protocol::P2p(peer));
            }
            a.to_string()
        })
        .collect();
    (full, addrs.relayed)
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))?;
    std::fs::rename(&tmp, path)
}

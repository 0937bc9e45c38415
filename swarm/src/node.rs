//! A Corolla peer's libp2p node, in the shape of rust-libp2p's file-sharing example: a
//! cloneable [`Client`] sends [`Command`]s with oneshot replies to an [`EventLoop`] that owns
//! the `Swarm`; requests addressed to this peer come out as [`InboundEvent`]s.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol, Swarm, autonat, dcutr, identify, identity::Keypair, ping, relay,
};
use tokio::sync::{mpsc, oneshot};

use crate::dht_store::{self, CappedStore, DhtStoreLimits, KAD_MAX_PACKET_BYTES};
use crate::identity::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use crate::limits::{ConnectionPolicy, Connections, LimitsError, NetStats, NetStatsSnapshot};
use crate::private::{self, Gate, Standing, SwarmKey};
use crate::protocol::{
    HEAD_PROTOCOL, HeadRequest, HeadResponse, INFO_PROTOCOL, InfoRequest, Limits, SPAN_PROTOCOL, ServerInfo,
    SpanRequest, SpanResponse,
};

/// Errors of the node and of requests made through it.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: String, reason: String },
    #[error("DHT: {0}")]
    Dht(String),
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("cannot open a stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("the node has shut down")]
    Shutdown,
    #[error("invalid connection limits: {0}")]
    Limits(#[from] LimitsError),
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    // First: a connection the allow-list or the limits refuse never reaches the others.
    allow: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    connections: Connections,
    relay_client: relay::client::Behaviour,
    kad: kad::Behaviour<CappedStore>,
    identify: identify::Behaviour,
    autonat: autonat::Behaviour,
    dcutr: dcutr::Behaviour,
    ping: ping::Behaviour,
    streams: libp2p_stream::Behaviour,
    info: request_response::cbor::Behaviour<InfoRequest, ServerInfo>,
}

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub keypair: Keypair,
    /// Addresses to listen on; a `.../p2p/<relay>/p2p-circuit` address listens through a relay
    /// once connected to it.
    pub listen: Vec<Multiaddr>,
    /// Relays / DHT bootstrap peers, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Serve the DHT (servers) or only query it (clients).
    pub dht_server: bool,
    /// How long DHT records and provider records live unless re-announced.
    pub record_ttl: Duration,
    pub limits: Limits,
    pub request_timeout: Duration,
    /// When AutoNAT finds this node unreachable, listen through the bootstrap relays.
    pub auto_relay: bool,
    /// Connection caps, eviction and which peers are protected from it. Bootstrap peers are
    /// always protected and exempt from every cap.
    pub connections: ConnectionPolicy,
    /// What this node stores for other peers when it serves the DHT.
    pub dht_store: DhtStoreLimits,
    /// A private swarm's key (see [`crate::private`]): `pnet` on TCP and circuits, no QUIC,
    /// WebRTC only to dial relays (natively: none), DHT records sealed.
    pub swarm_key: Option<SwarmKey>,
    /// Only these peers (and the bootstrap peers) may connect, if set.
    pub allow_peers: Option<Vec<PeerId>>,
}

impl NodeConfig {
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            dht_server: false,
            record_ttl: Duration::from_secs(300),
            limits: Limits::default(),
            request_timeout: Duration::from_secs(120),
            auto_relay: false,
            connections: ConnectionPolicy::default(),
            dht_store: DhtStoreLimits::default(),
            swarm_key: None,
            allow_peers: None,
        }
    }
}

/// Requests from other peers that the application answers. (Inference sessions, span and
/// head requests come as streams: [`Client::accept`].)
#[derive(Debug)]
pub enum InboundEvent {
    Info {
        peer: PeerId,
        channel: ResponseChannel<ServerInfo>,
    },
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

#[derive(Debug)]
enum Command {
    Dial {
        addr: Multiaddr,
        reply: Reply<()>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    StartProviding {
        key: kad::RecordKey,
        reply: Reply<()>,
    },
    StopProviding {
        key: kad::RecordKey,
    },
    PutRecord {
        key: kad::RecordKey,
        value: Vec<u8>,
        reply: Reply<()>,
    },
    GetProviders {
        key: kad::RecordKey,
        reply: Reply<HashSet<PeerId>>,
    },
    GetRecord {
        key: kad::RecordKey,
        reply: Reply<Vec<Vec<u8>>>,
    },
    Info {
        peer: PeerId,
        reply: Reply<ServerInfo>,
    },
    RespondInfo {
        channel: ResponseChannel<ServerInfo>,
        info: ServerInfo,
    },
    Rtt {
        peer: PeerId,
        reply: oneshot::Sender<Option<Duration>>,
    },
    Addresses {
        reply: oneshot::Sender<NodeAddresses>,
    },
}

/// Where this node can be reached.
#[derive(Debug, Clone, Default)]
pub struct NodeAddresses {
    pub listen: Vec<Multiaddr>,
    /// Addresses confirmed reachable by others (or relay circuit addresses).
    pub external: Vec<Multiaddr>,
    /// Whether some listener is a relay circuit.
    pub relayed: bool,
}

/// A cheap, cloneable handle on the node.
#[derive(Clone)]
pub struct Client {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    limits: Limits,
    stats: NetStats,
    swarm_key: Option<SwarmKey>,
    /// A private swarm's guard on connections no `pnet` protects.
    gate: Option<Gate>,
}

/// Builds the swarm and returns its handle, the inbound request stream and the event loop
/// (to spawn).
pub fn start(config: NodeConfig) -> Result<(Client, mpsc::Receiver<InboundEvent>, EventLoop), NodeError> {
    let limits = config.limits;
    let record_ttl = config.record_ttl;
    let request_timeout = config.request_timeout;
    let dht_server = config.dht_server;
    let stats = NetStats::default();
    let connections = Connections::new(
        &config.connections,
        config.bootstrap.iter().filter_map(peer_of),
        stats.connections.clone(),
    )?;
    tracing::debug!(
        max_connections = config.connections.max_connections,
        max_per_peer = config.connections.max_per_peer,
        hard_cap = config.connections.hard_cap(),
        memory_ceiling_bytes = ?connections.memory_ceiling_bytes(),
        "connection limits"
    );
    let store = CappedStore::new(
        config.keypair.public().to_peer_id(),
        config.dht_store.clone(),
        stats.dht.clone(),
    );
    let idle_timeout = config.connections.idle_timeout;
    let transport_err = |e: &dyn std::fmt::Display| NodeError::Transport(e.to_string());
    let private = config.swarm_key.is_some();
    if private
        && let Some(addr) = config
            .listen
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic)))
    {
        return Err(NodeError::Listen {
            addr: addr.clone(),
            reason: "QUIC cannot carry a private swarm's key: listen on TCP, WebRTC-direct or a relay circuit".into(),
        });
    }
    let local_peer = config.keypair.public().to_peer_id();
    let (relay_transport, relay_client) = relay::client::new(local_peer);
    let transports = crate::transport::Transports {
        psk: config.swarm_key.as_ref().map(SwarmKey::psk),
        relay_client: Some(relay_transport),
        tcp: true,
        // Natively: TCP, QUIC and WebRTC-direct (so browsers can dial servers without a relay
        // in between). In the browser: WebRTC-direct, the one transport a page can dial
        // without a CA-signed certificate. A private swarm turns QUIC off and holds WebRTC
        // connections at its gate until their peer proves the key.
        quic: !private,
        #[cfg(not(target_arch = "wasm32"))]
        webrtc: {
            install_crypto_provider();
            Some(
                libp2p_webrtc::tokio::Certificate::generate(&mut rand_0_10::rng())
                    .map_err(|e| NodeError::Transport(format!("cannot generate a WebRTC certificate: {e}")))?,
            )
        },
        #[cfg(target_arch = "wasm32")]
        webrtc: true,
    };
    let transport = crate::transport::build(&config.keypair, transports)?;
    let allow = config.allow_peers.as_ref().map(|peers| {
        let mut list = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in peers.iter().copied().chain(config.bootstrap.iter().filter_map(peer_of)) {
            list.allow_peer(peer);
        }
        list
    });
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone());
    #[cfg(not(target_arch = "wasm32"))]
    let builder = builder
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| transport_err(&e))?;
    #[cfg(target_arch = "wasm32")]
    let builder = builder
        .with_wasm_bindgen()
        .with_other_transport(|_| transport)
        .map_err(|e| transport_err(&e))?;
    let mut swarm = builder
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config
                .set_record_ttl(Some(record_ttl))
                .set_provider_record_ttl(Some(record_ttl))
                .set_publication_interval(None)
                .set_provider_publication_interval(None)
                .set_query_timeout(Duration::from_secs(20))
                // Other peers' records reach the store only through its ledger (dht_store).
                .set_record_filtering(kad::StoreInserts::FilterBoth)
                .set_max_packet_size(KAD_MAX_PACKET_BYTES);
            let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
            kad.set_mode(Some(if dht_server {
                kad::Mode::Server
            } else {
                kad::Mode::Client
            }));
            let rr_config = request_response::Config::default().with_request_timeout(request_timeout);
            Ok(Behaviour {
                allow: allow.into(),
                connections,
                relay_client,
                kad,
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("corolla/{}", env!("CARGO_PKG_VERSION"))),
                ),
                autonat: autonat::Behaviour::new(
                    peer_id,
                    autonat::Config {
                        only_global_ips: false,
                        ..Default::default()
                    },
                ),
                dcutr: dcutr::Behaviour::new(peer_id),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
                streams: libp2p_stream::Behaviour::new(),
                info: request_response::cbor::Behaviour::new([(INFO_PROTOCOL, ProtocolSupport::Full)], rr_config),
            })
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();

    for addr in &config.bootstrap {
        if let Some(peer) = peer_of(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, strip_peer(addr));
            swarm.add_peer_address(peer, strip_peer(addr));
        }
        swarm.dial(addr.clone()).map_err(|e| NodeError::Dial {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    }
    let mut circuits = Vec::new();
    for addr in &config.listen {
        if addr.iter().any(|p| p == Protocol::P2pCircuit) {
            // Listening through a relay needs the connection to it first.
            circuits.push(addr.clone());
        } else {
            swarm.listen_on(addr.clone()).map_err(|e| NodeError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let relays: Vec<Multiaddr> = if config.auto_relay {
        config
            .bootstrap
            .iter()
            .map(|a| a.clone().with(Protocol::P2pCircuit))
            .collect()
    } else {
        Vec::new()
    };
    let control = swarm.behaviour().streams.new_control();
    let gate = match &config.swarm_key {
        Some(key) => {
            let gate = Gate::default();
            let proofs = control
                .clone()
                .accept(private::AUTH_PROTOCOL)
                .map_err(|e| NodeError::Transport(e.to_string()))?;
            crate::rt::spawn(private::accept_proofs(proofs, key.clone(), local_peer, gate.clone()));
            Some(gate)
        }
        None => None,
    };
    let (unproven_tx, unproven_rx) = mpsc::channel(16);
    if let Some(gate) = &gate {
        crate::rt::spawn(expire_unproven(gate.clone(), unproven_tx.clone()));
    }
    let (commands, command_rx) = mpsc::channel(64);
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    let peer_id = *swarm.local_peer_id();
    let event_loop = EventLoop {
        swarm,
        commands: command_rx,
        inbound: inbound_tx,
        pending_circuits: circuits,
        fallback_circuits: relays,
        bootstrap: config
            .bootstrap
            .iter()
            .filter_map(|a| Some((peer_of(a)?, strip_peer(a))))
            .collect(),
        pending_dials: HashMap::new(),
        pending_queries: HashMap::new(),
        pending_info: HashMap::new(),
        rtt: HashMap::new(),
        relayed: false,
        swarm_key: config.swarm_key.clone(),
        control: control.clone(),
        gate: gate.clone(),
        unproven: (unproven_tx, unproven_rx),
    };
    Ok((
        Client {
            peer_id,
            commands,
            control,
            limits,
            stats,
            swarm_key: config.swarm_key,
            gate,
        },
        inbound_rx,
        event_loop,
    ))
}

pub use crate::transport::MAX_STREAMS_PER_CONNECTION;

/// Peer id at the end of an address, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn strip_peer(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// Routes a request-response event: inbound requests to `on_request`, responses and failures
/// to the waiting caller.
fn on_request_response<Req, Resp>(
    event: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, Reply<Resp>>,
    on_request: impl FnOnce(PeerId, Req, ResponseChannel<Resp>),
) {
    match event {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request { request, channel, .. } => on_request(peer, request, channel),
            request_response::Message::Response { request_id, response } => {
                if let Some(r) = pending.remove(&request_id) {
                    let _ = r.send(Ok(response));
                }
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(r) = pending.remove(&request_id) {
                let _ = r.send(Err(NodeError::Request {
                    peer,
                    reason: error.to_string(),
                }));
            }
        }
        _ => {}
    }
}

enum QueryReply {
    Unit(Reply<()>),
    Providers(Reply<HashSet<PeerId>>, HashSet<PeerId>),
    Records(Reply<Vec<Vec<u8>>>, Vec<Vec<u8>>),
}

/// Owns the swarm; runs until every [`Client`] is dropped.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<InboundEvent>,
    pending_circuits: Vec<Multiaddr>,
    /// Circuits to listen on if AutoNAT says we are behind a NAT.
    fallback_circuits: Vec<Multiaddr>,
    /// Bootstrap peers and their addresses, put back into the DHT routing table on every
    /// connection: kad drops a peer whose dial failed (a relay refusing connections under a
    /// flood), and would otherwise relearn it only after identify, racing the first lookup.
    bootstrap: Vec<(PeerId, Multiaddr)>,
    pending_dials: HashMap<PeerId, Vec<Reply<()>>>,
    pending_queries: HashMap<kad::QueryId, QueryReply>,
    pending_info: HashMap<OutboundRequestId, Reply<ServerInfo>>,
    rtt: HashMap<PeerId, Duration>,
    relayed: bool,
    swarm_key: Option<SwarmKey>,
    control: libp2p_stream::Control,
    gate: Option<Gate>,
    /// Peers that failed to prove the swarm key or ran out of time, to disconnect.
    unproven: (mpsc::Sender<PeerId>, mpsc::Receiver<PeerId>),
}

/// Reports the peers whose proof of the key is overdue, until the event loop is gone.
async fn expire_unproven(gate: Gate, report: mpsc::Sender<PeerId>) {
    while !report.is_closed() {
        crate::rt::sleep(Duration::from_millis(500)).await;
        for (_, peer) in gate.update(|g| g.expired(crate::rt::Instant::now())) {
            tracing::info!(%peer, "no proof of the swarm key in time: disconnecting");
            if report.send(peer).await.is_err() {
                return;
            }
        }
    }
}

impl EventLoop {
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                Some(peer) = self.unproven.1.recv() => {
                    // Whatever it is, it is not a peer of this swarm.
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::Dial { addr, reply } => {
                let peer = peer_of(&addr);
                if let Some(peer) = peer {
                    self.swarm.add_peer_address(peer, strip_peer(&addr));
                    if self.swarm.is_connected(&peer) {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => match peer {
                        Some(peer) => self.pending_dials.entry(peer).or_default().push(reply),
                        None => {
                            let _ = reply.send(Ok(()));
                        }
                    },
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dial {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::AddAddress { peer, addr } => {
                self.swarm.add_peer_address(peer, addr);
            }
            Command::StartProviding { key, reply } => match behaviour.kad.start_providing(key) {
                Ok(id) => {
                    self.pending_queries.insert(id, QueryReply::Unit(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(NodeError::Dht(e.to_string())));
                }
            },
            Command::StopProviding { key } => behaviour.kad.stop_providing(&key),
            Command::PutRecord { key, value, reply } => {
                let mut record = kad::Record::new(key, value);
                record.publisher = Some(*self.swarm.local_peer_id());
                match self.swarm.behaviour_mut().kad.put_record(record, kad::Quorum::One) {
                    Ok(id) => {
                        self.pending_queries.insert(id, QueryReply::Unit(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dht(e.to_string())));
                    }
                }
            }
            Command::GetProviders { key, reply } => {
                let id = behaviour.kad.get_providers(key);
                self.pending_queries
                    .insert(id, QueryReply::Providers(reply, HashSet::new()));
            }
            Command::GetRecord { key, reply } => {
                let id = behaviour.kad.get_record(key);
                self.pending_queries.insert(id, QueryReply::Records(reply, Vec::new()));
            }
            Command::Info { peer, reply } => {
                let id = behaviour.info.send_request(&peer, InfoRequest);
                self.pending_info.insert(id, reply);
            }
            Command::RespondInfo { channel, info } => {
                let _ = behaviour.info.send_response(channel, info);
            }
            Command::Rtt { peer, reply } => {
                let _ = reply.send(self.rtt.get(&peer).copied());
            }
            Command::Addresses { reply } => {
                let _ = reply.send(NodeAddresses {
                    listen: self.swarm.listeners().cloned().collect(),
                    external: self.swarm.external_addresses().cloned().collect(),
                    relayed: self.relayed,
                });
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if let Some(gate) = &self.gate {
                    gate.update(|g| g.on_established(connection_id, peer_id, &endpoint, crate::rt::Instant::now()));
                }
                if endpoint.is_dialer()
                    && !private::pnet_protects(endpoint.get_remote_address())
                    && let Some(key) = &self.swarm_key
                {
                    self.prove_key(peer_id, key.clone());
                }
                for (peer, addr) in self.bootstrap.iter().filter(|(p, _)| *p == peer_id) {
                    self.swarm.behaviour_mut().kad.add_address(peer, addr.clone());
                }
                if let Some(replies) = self.pending_dials.remove(&peer_id) {
                    for r in replies {
                        let _ = r.send(Ok(()));
                    }
                }
                self.listen_through_relays(peer_id);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if let Some(replies) = self.pending_dials.remove(&peer) {
                    for r in replies {
                        let _ = r.send(Err(NodeError::Dial {
                            addr: peer.to_string(),
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                cause,
                num_established,
                ..
            } => {
                if let Some(gate) = &self.gate {
                    gate.update(|g| g.on_closed(connection_id));
                }
                match cause {
                    Some(cause) => tracing::warn!(
                        peer = %peer_id,
                        addr = %endpoint.get_remote_address(),
                        remaining = num_established,
                        %cause,
                        "connection lost"
                    ),
                    None => tracing::debug!(peer = %peer_id, remaining = num_established, "connection closed"),
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if address.iter().any(|p| p == Protocol::P2pCircuit) {
                    self.relayed = true;
                    // A circuit address is how others reach us: advertise it.
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    /// Proves the swarm key to a peer reached over a transport `pnet` cannot wrap (a browser's
    /// WebRTC connection to a relay), and checks that the peer holds it too.
    fn prove_key(&self, peer: PeerId, key: SwarmKey) {
        let mut control = self.control.clone();
        let local = *self.swarm.local_peer_id();
        let report = self.unproven.0.clone();
        let gate = self.gate.clone();
        crate::rt::spawn(async move {
            let proof = async {
                let mut stream = control
                    .open_stream(peer, private::AUTH_PROTOCOL)
                    .await
                    .map_err(|e| private::AuthError::Io(std::io::Error::other(e.to_string())))?;
                private::prove_dialer(&mut stream, &key, &local, &peer).await
            };
            let result = crate::rt::timeout(private::AUTH_TIMEOUT, proof)
                .await
                .unwrap_or(Err(private::AuthError::Timeout(private::AUTH_TIMEOUT)));
            match result {
                Ok(()) => {
                    // The proof is mutual: the peer proved the key to us as well.
                    tracing::debug!(%peer, "proved the swarm key");
                    if let Some(gate) = gate {
                        gate.update(|g| g.authenticated(&peer));
                    }
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "peer is not part of this private swarm: disconnecting");
                    let _ = report.send(peer).await;
                }
            }
        });
    }

    /// Starts listening on each pending `/p2p-circuit` address whose relay just connected.
    fn listen_through_relays(&mut self, connected: PeerId) {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_circuits)
            .into_iter()
            .partition(|addr| addr.iter().any(|p| p == Protocol::P2p(connected)));
        self.pending_circuits = waiting;
        for addr in ready {
            if let Err(e) = self.swarm.listen_on(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot listen through relay");
            }
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // Peers that speak our DHT protocol go into the routing table.
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                tracing::info!(status = ?new, "reachability");
                if matches!(new, autonat::NatStatus::Private) && !self.relayed {
                    for addr in std::mem::take(&mut self.fallback_circuits) {
                        tracing::info!(%addr, "not reachable directly: listening through the relay");
                        if let Err(e) = self.swarm.listen_on(addr.clone()) {
                            tracing::warn!(%addr, error = %e, "cannot listen through relay");
                        }
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer, result: Ok(rtt), ..
            }) => {
                self.rtt.insert(peer, rtt);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. }) => {
                self.on_query(id, result, step.last);
            }
            BehaviourEvent::Kad(kad::Event::InboundRequest { request }) => {
                dht_store::admit(&mut self.swarm.behaviour_mut().kad, request);
            }
            BehaviourEvent::Info(event) => {
                let inbound = &self.inbound;
                let gate = &self.gate;
                on_request_response(event, &mut self.pending_info, |peer, _, channel| {
                    let event = InboundEvent::Info { peer, channel };
                    match gate.as_ref().map(|g| (g, g.standing(&peer))) {
                        None | Some((_, Standing::Member)) => {
                            let _ = inbound.try_send(event);
                        }
                        Some((gate, Standing::Pending)) => {
                            let (gate, inbound) = (gate.clone(), inbound.clone());
                            crate::rt::spawn(async move {
                                if gate.admits(&peer).await {
                                    let _ = inbound.try_send(event);
                                }
                            });
                        }
                        // An outsider learns nothing of the server.
                        Some((_, Standing::Outsider)) => {}
                    }
                });
            }
            _ => {}
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        let Some(pending) = self.pending_queries.remove(&id) else {
            return;
        };
        let pending = match (pending, result) {
            (QueryReply::Unit(reply), kad::QueryResult::StartProviding(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(e.to_string())));
                return;
            }
            (QueryReply::Unit(reply), kad::QueryResult::PutRecord(r)) => {
                let _ = reply.send(r.map(|_| ()).map_err(|e| NodeError::Dht(e.to_string())));
                return;
            }
            (QueryReply::Providers(reply, mut found), kad::QueryResult::GetProviders(r)) => {
                match r {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => found.extend(providers),
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                    // A timeout after some providers still answers the question.
                    Err(e) if found.is_empty() && last => {
                        tracing::debug!(error = %e, "provider lookup found nothing");
                    }
                    Err(_) => {}
                }
                QueryReply::Providers(reply, found)
            }
            (QueryReply::Records(reply, mut found), kad::QueryResult::GetRecord(r)) => {
                if let Ok(kad::GetRecordOk::FoundRecord(peer_record)) = r {
                    found.push(peer_record.record.value);
                }
                QueryReply::Records(reply, found)
            }
            (other, _) => other,
        };
        if last {
            match pending {
                QueryReply::Providers(reply, found) => {
                    let _ = reply.send(Ok(found));
                }
                QueryReply::Records(reply, found) => {
                    let _ = reply.send(Ok(found));
                }
                QueryReply::Unit(reply) => {
                    let _ = reply.send(Err(NodeError::Dht("unexpected query result".into())));
                }
            }
        } else {
            self.pending_queries.insert(id, pending);
        }
    }
}

impl Client {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// What the connection limits and the DHT store refused, evicted and hold so far.
    pub fn net_stats(&self) -> NetStatsSnapshot {
        self.stats.snapshot()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| NodeError::Shutdown)?;
        rx.await.map_err(|_| NodeError::Shutdown)?
    }

    /// Connects to `addr` (which should end in `/p2p/<peer id>`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.ask(|reply| Command::Dial { addr, reply }).await
    }

    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NodeError> {
        self.commands
            .send(Command::AddAddress { peer, addr })
            .await
            .map_err(|_| NodeError::Shutdown)
    }

    /// The key that stands for `key` in this swarm's DHT (itself in an open swarm).
    fn dht_key(&self, key: kad::RecordKey) -> kad::RecordKey {
        match &self.swarm_key {
            Some(swarm_key) => swarm_key.seal_key(&key),
            None => key,
        }
    }

    pub async fn start_providing(&self, key: kad::RecordKey) -> Result<(), NodeError> {
        let key = self.dht_key(key);
        self.ask(|reply| Command::StartProviding { key, reply }).await
    }

    pub async fn stop_providing(&self, key: kad::RecordKey) -> Result<(), NodeError> {
        let key = self.dht_key(key);
        self.commands
            .send(Command::StopProviding { key })
            .await
            .map_err(|_| NodeError::Shutdown)
    }

    /// Publishes a record (sealed with the swarm key in a private swarm).
    pub async fn put_record(&self, key: kad::RecordKey, value: Vec<u8>) -> Result<(), NodeError> {
        let key = self.dht_key(key);
        let value = match &self.swarm_key {
            Some(swarm_key) => swarm_key
                .seal(&key, &value)
                .map_err(|e| NodeError::Dht(e.to_string()))?,
            None => value,
        };
        self.ask(|reply| Command::PutRecord { key, value, reply }).await
    }

    pub async fn get_providers(&self, key: kad::RecordKey) -> Result<HashSet<PeerId>, NodeError> {
        let key = self.dht_key(key);
        self.ask(|reply| Command::GetProviders { key, reply }).await
    }

    /// Every copy of the record found (possibly stale ones from several peers); in a private
    /// swarm, only those sealed with its key, opened.
    pub async fn get_record(&self, key: kad::RecordKey) -> Result<Vec<Vec<u8>>, NodeError> {
        let key = self.dht_key(key);
        let found = self
            .ask(|reply| Command::GetRecord {
                key: key.clone(),
                reply,
            })
            .await?;
        Ok(match &self.swarm_key {
            None => found,
            Some(swarm_key) => found
                .iter()
                .filter_map(|sealed| {
                    let opened = swarm_key.open(&key, sealed);
                    if opened.is_none() {
                        tracing::debug!("DHT record not sealed with this swarm's key: ignored");
                    }
                    opened
                })
                .collect(),
        })
    }

    /// Stateless forward or backward over a server's span (one stream per request).
    pub async fn span_request(&self, peer: PeerId, request: SpanRequest) -> Result<SpanResponse, NodeError> {
        crate::request::call(self, peer, SPAN_PROTOCOL, &request, &self.limits).await
    }

    /// Asks a server offering head service to embed tokens or compute logits.
    pub async fn head_request(&self, peer: PeerId, request: HeadRequest) -> Result<HeadResponse, NodeError> {
        crate::request::call(self, peer, HEAD_PROTOCOL, &request, &self.limits).await
    }

    pub async fn info(&self, peer: PeerId) -> Result<ServerInfo, NodeError> {
        self.ask(|reply| Command::Info { peer, reply }).await
    }

    pub async fn respond_info(&self, channel: ResponseChannel<ServerInfo>, info: ServerInfo) -> Result<(), NodeError> {
        self.commands
            .send(Command::RespondInfo { channel, info })
            .await
            .map_err(|_| NodeError::Shutdown)
    }

    /// Last measured round-trip time to `peer` (from libp2p ping).
    pub async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Rtt { peer, reply: tx }).await.ok()?;
        rx.await.ok().flatten()
    }

    pub async fn addresses(&self) -> Result<NodeAddresses, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Addresses { reply: tx })
            .await
            .map_err(|_| NodeError::Shutdown)?;
        rx.await.map_err(|_| NodeError::Shutdown)
    }

    /// Opens a new stream for `protocol` (one per inference session).
    pub async fn open_stream(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, NodeError> {
        self.control
            .clone()
            .open_stream(peer, protocol)
            .await
            .map_err(|e| NodeError::Stream {
                peer,
                reason: e.to_string(),
            })
    }

    /// Accepts inbound streams of `protocol`; in a private swarm, only those of peers that hold
    /// its key (a pending peer's streams wait for its proof).
    pub fn accept(&self, protocol: StreamProtocol) -> Result<Incoming, NodeError> {
        let streams = self
            .control
            .clone()
            .accept(protocol)
            .map_err(|e| NodeError::Transport(e.to_string()))?;
        Ok(match &self.gate {
            None => Incoming::Open(streams),
            Some(gate) => Incoming::gated(streams, gate.clone()),
        })
    }
}

/// Selects rustls' process-wide crypto provider, which WebRTC's DTLS handshake uses. QUIC brings
/// rustls' aws-lc-rs backend and DTLS its ring backend, so rustls cannot choose by itself and
/// the handshake would panic.
#[cfg(not(target_arch = "wasm32"))]
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Inbound streams of one protocol, as [`Client::accept`] lets them in.
pub enum Incoming {
    Open(libp2p_stream::IncomingStreams),
    Gated(mpsc::Receiver<(PeerId, Stream)>),
}

/// Streams of pending peers waiting for their proof at once; more are dropped.
const MAX_STREAMS_AWAITING_PROOF: usize = 64;

impl Incoming {
    fn gated(mut streams: libp2p_stream::IncomingStreams, gate: Gate) -> Self {
        let (tx, rx) = mpsc::channel(16);
        crate::rt::spawn(async move {
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_AWAITING_PROOF));
            while let Some((peer, stream)) = streams.next().await {
                match gate.standing(&peer) {
                    Standing::Member => {
                        if tx.send((peer, stream)).await.is_err() {
                            return;
                        }
                    }
                    Standing::Pending => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            tracing::debug!(%peer, "too many streams awaiting a proof of the key: dropped");
                            continue;
                        };
                        let (gate, tx) = (gate.clone(), tx.clone());
                        crate::rt::spawn(async move {
                            let _slot = slot;
                            if gate.admits(&peer).await {
                                let _ = tx.send((peer, stream)).await;
                            } else {
                                tracing::debug!(%peer, "stream of a peer without the swarm key refused");
                            }
                        });
                    }
                    Standing::Outsider => tracing::debug!(%peer, "stream of a peer without the swarm key refused"),
                }
            }
        });
        Self::Gated(rx)
    }
}

impl futures::Stream for Incoming {
    type Item = (PeerId, Stream);

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Open(streams) => streams.poll_next_unpin(cx),
            Self::Gated(rx) => rx.poll_recv(cx),
        }
    }
}

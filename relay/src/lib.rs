//! The Corolla relay: a public node that servers behind NAT reserve circuit-relay v2 slots on,
//! the DHT's bootstrap peer, and an AutoNAT server so peers learn whether they are reachable.
//! Besides TCP and QUIC it listens on WebRTC-direct, the one transport a browser can dial
//! without a CA-signed TLS certificate: browsers find it by its `/certhash/` address. In a
//! private swarm (`--swarm-key`) QUIC is off, TCP runs under `pnet`, and a WebRTC peer that
//! does not prove the key within seconds is disconnected (see `swarm::private`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, identify, kad, ping, relay};
use libp2p_webrtc::tokio::Certificate;
use swarm::dht_store::{self, CappedStore, DhtStoreLimits, KAD_MAX_PACKET_BYTES};
use swarm::http;
use swarm::identity::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use swarm::limits::{ConnectionPolicy, Connections, MemoryCeiling, NetStats, ProtectedPeers, Protection};
use swarm::private::{self, Gate, SwarmKey};
use swarm::rt::Instant;

mod metrics;
mod monitor;
use metrics::RelayMetrics;
use monitor::Monitor;

/// Command line of the `relay` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "relay",
    version,
    about = "Corolla relay: circuit relay v2, DHT bootstrap node and AutoNAT server"
)]
pub struct Cli {
    /// Address to listen on (repeatable): TCP, QUIC (`/udp/PORT/quic-v1`) or WebRTC-direct for
    /// browsers (`/udp/PORT/webrtc-direct`; the advertised address gains `/certhash/...`).
    /// [default: /ip4/0.0.0.0/tcp/4001, /ip4/0.0.0.0/udp/4001/quic-v1 and
    /// /ip4/0.0.0.0/udp/4002/webrtc-direct]
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Publicly reachable address to advertise in addition to the listen addresses (repeatable),
    /// e.g. a cloud VM's public IP, which is not on any local interface.
    #[arg(long = "external-addr", value_name = "MULTIADDR")]
    pub external_addr: Vec<String>,
    /// Keypair file; created if missing. Without it the peer id changes on every start, which
    /// breaks every bootstrap address that names this relay. The WebRTC certificate, whose hash
    /// is part of the browsers' address, is kept next to it in FILE.webrtc.pem.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// File (re)written with this relay's full addresses, one per line, each ending in /p2p/<peer id>.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
    /// Maximum concurrent relayed circuits.
    #[arg(long, default_value_t = 512)]
    pub max_circuits: usize,
    /// Maximum concurrent circuits a single peer may be source or destination of.
    #[arg(long, default_value_t = 16)]
    pub max_circuits_per_peer: usize,
    /// Lifetime of a circuit in seconds. Corolla inference sessions are long-lived, so this is far
    /// above libp2p's 2-minute default.
    #[arg(long, default_value_t = 3600)]
    pub max_circuit_duration_secs: u64,
    /// Bytes a circuit may carry (both directions) before it is closed; hidden states are large.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_circuit_bytes: u64,
    /// Maximum concurrent reservations (roughly: servers behind NAT served by this relay).
    #[arg(long, default_value_t = 1024)]
    pub max_reservations: usize,
    /// How long DHT provider records stored here live without being re-announced.
    #[arg(long, default_value_t = 900)]
    pub record_ttl_secs: u64,
    /// Established connections beyond which a new one evicts the oldest idle connection
    /// (peers holding a reservation or a circuit are never evicted).
    #[arg(long, default_value_t = 2048)]
    pub max_connections: u32,
    /// Established connections one peer id may hold.
    #[arg(long, default_value_t = 8)]
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    #[arg(long, default_value_t = 256)]
    pub max_pending_connections: u32,
    /// New connections are refused while the relay's resident memory is above this
    /// [default: half the machine's memory].
    #[arg(long, value_name = "BYTES")]
    pub max_memory_bytes: Option<usize>,
    /// DHT records and provider records stored for one peer.
    #[arg(long, default_value_t = 64)]
    pub max_records_per_peer: usize,
    /// Bytes of DHT records and provider records stored in all.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_dht_bytes: usize,
    /// Providers stored per DHT key: how many servers of one model a lookup can find.
    #[arg(long, default_value_t = 512)]
    pub max_providers_per_key: usize,
    /// Log the connection and DHT counters this often (when they changed).
    #[arg(long, default_value_t = 60)]
    pub stats_interval_secs: u64,
    /// Serve HTTP on this address (e.g. 0.0.0.0:8080): the browsers' bootstrap addresses at
    /// /corolla/v1/bootstrap.json, and the chat page if --web-root is given.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (connections, reservations, circuits,
    /// DHT records), e.g. 127.0.0.1:9465.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The built chat page (Trunk's `dist/` folder), served at / by --http-listen.
    #[arg(long, value_name = "DIR", requires = "http_listen")]
    pub web_root: Option<PathBuf>,
    /// Run a private swarm with this pre-shared key (the IPFS swarm.key format): only peers
    /// holding it can connect (TCP and circuits through `pnet`; QUIC is off; browsers'
    /// WebRTC connections must prove the key within seconds) or read the DHT's records.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Accept connections only from this peer (repeatable); without it, from anyone.
    #[arg(long = "allow-peer", value_name = "PEER_ID")]
    pub allow_peer: Vec<PeerId>,
}

/// Validated relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    pub identity: Option<PathBuf>,
    pub addr_file: Option<PathBuf>,
    pub limits: RelayLimits,
    pub connections: ConnectionPolicy,
    pub dht_store: DhtStoreLimits,
    pub stats_interval: Duration,
    pub record_ttl: Duration,
    pub http_listen: Option<std::net::SocketAddr>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub web_root: Option<PathBuf>,
    pub swarm_key: Option<SwarmKey>,
    /// Only these peers may connect, if set.
    pub allow_peers: Option<Vec<PeerId>>,
}

#[derive(Debug, Clone)]
pub struct RelayLimits {
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
    pub max_reservations: usize,
}

pub const DEFAULT_LISTEN: [&str; 3] = [
    "/ip4/0.0.0.0/tcp/4001",
    "/ip4/0.0.0.0/udp/4001/quic-v1",
    // QUIC holds udp/4001; WebRTC-direct needs a UDP socket of its own.
    "/ip4/0.0.0.0/udp/4002/webrtc-direct",
];

impl TryFrom<Cli> for RelayConfig {
    type Error = anyhow::Error;

    fn try_from(cli: Cli) -> anyhow::Result<Self> {
        let swarm_key = cli.swarm_key.as_deref().map(SwarmKey::read).transpose()?;
        let listen: Vec<Multiaddr> = if cli.listen.is_empty() {
            DEFAULT_LISTEN
                .iter()
                .map(|s| parse_addr("--listen", s))
                .filter(|a| swarm_key.is_none() || a.as_ref().is_ok_and(private_listen_ok))
                .collect::<anyhow::Result<_>>()?
        } else {
            cli.listen
                .iter()
                .map(|s| parse_addr("--listen", s))
                .collect::<anyhow::Result<_>>()?
        };
        if swarm_key.is_some()
            && let Some(addr) = listen.iter().find(|a| !private_listen_ok(a))
        {
            bail!("--listen {addr}: QUIC cannot carry the swarm key; a private swarm listens on TCP and WebRTC-direct");
        }
        let external_addrs = cli
            .external_addr
            .iter()
            .map(|s| parse_addr("--external-addr", s))
            .collect::<anyhow::Result<_>>()?;
        // libp2p encodes the circuit duration limit as u32 seconds on the wire.
        if cli.max_circuit_duration_secs == 0 || cli.max_circuit_duration_secs > u64::from(u32::MAX) {
            bail!("--max-circuit-duration-secs must be between 1 and {}", u32::MAX);
        }
        if cli.max_circuits == 0 || cli.max_circuits_per_peer == 0 || cli.max_reservations == 0 {
            bail!("--max-circuits, --max-circuits-per-peer and --max-reservations must be at least 1");
        }
        if cli.max_circuit_bytes == 0 {
            bail!("--max-circuit-bytes must be at least 1");
        }
        let connections = ConnectionPolicy {
            max_connections: cli.max_connections,
            max_per_peer: cli.max_connections_per_peer,
            max_pending_incoming: cli.max_pending_connections,
            max_pending_outgoing: cli.max_pending_connections,
            memory_ceiling: Some(match cli.max_memory_bytes {
                Some(bytes) => MemoryCeiling::Bytes(bytes),
                None => MemoryCeiling::FractionOfRam(0.5),
            }),
            ..ConnectionPolicy::default()
        };
        connections.validate().map_err(|e| {
            anyhow::anyhow!(
                "--max-connections, --max-connections-per-peer, --max-pending-connections, --max-memory-bytes: {e}"
            )
        })?;
        if cli.max_records_per_peer == 0 || cli.max_dht_bytes == 0 || cli.max_providers_per_key == 0 {
            bail!("--max-records-per-peer, --max-dht-bytes and --max-providers-per-key must be at least 1");
        }
        if cli.stats_interval_secs == 0 {
            bail!("--stats-interval-secs must be at least 1");
        }
        let dht_store = DhtStoreLimits {
            max_records_per_peer: cli.max_records_per_peer,
            max_total_bytes: cli.max_dht_bytes,
            max_providers_per_key: cli.max_providers_per_key,
            // The relay is every swarm's bootstrap node: room for many servers' records.
            max_records: 65_536,
            max_provider_keys: 65_536,
            ..DhtStoreLimits::default()
        };
        Ok(Self {
            listen,
            external_addrs,
            identity: cli.identity,
            addr_file: cli.addr_file,
            limits: RelayLimits {
                max_circuits: cli.max_circuits,
                max_circuits_per_peer: cli.max_circuits_per_peer,
                max_circuit_duration: Duration::from_secs(cli.max_circuit_duration_secs),
                max_circuit_bytes: cli.max_circuit_bytes,
                max_reservations: cli.max_reservations,
            },
            connections,
            dht_store,
            stats_interval: Duration::from_secs(cli.stats_interval_secs),
            record_ttl: Duration::from_secs(cli.record_ttl_secs.max(1)),
            http_listen: cli.http_listen,
            metrics_listen: cli.metrics_listen,
            web_root: cli.web_root,
            swarm_key,
            allow_peers: (!cli.allow_peer.is_empty()).then_some(cli.allow_peer),
        })
    }
}

/// A private swarm's relay listens where `pnet` protects connections, and on WebRTC-direct for
/// browsers, whose connections its [`Gate`] holds to a proof of the key.
fn private_listen_ok(addr: &Multiaddr) -> bool {
    private::pnet_protects(addr) || addr.iter().any(|p| p == Protocol::WebRTCDirect)
}

fn parse_addr(flag: &str, s: &str) -> anyhow::Result<Multiaddr> {
    let addr: Multiaddr = s.parse().with_context(|| format!("invalid {flag} address {s:?}"))?;
    if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
        bail!("invalid {flag} address {s:?}: must not contain /p2p/ (the peer id is added automatically)");
    }
    Ok(addr)
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    // First: a connection the allow-list or the limits refuse never reaches the others.
    allow: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    connections: Connections,
    relay: relay::Behaviour,
    kad: kad::Behaviour<CappedStore>,
    identify: identify::Behaviour,
    autonat: autonat::Behaviour,
    ping: ping::Behaviour,
    /// Browsers' proofs of the swarm key ([`private::AUTH_PROTOCOL`]).
    streams: libp2p_stream::Behaviour,
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("WebRTC certificate file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("WebRTC certificate file {} is not a PEM certificate with its private key: {detail}", path.display())]
    Decode { path: PathBuf, detail: String },
    #[error("cannot generate a WebRTC certificate: {detail}")]
    Generate { detail: String },
}

/// Where the WebRTC certificate of the relay with identity file `identity` is kept.
pub fn certificate_path(identity: &Path) -> PathBuf {
    let mut name = identity.as_os_str().to_os_string();
    name.push(".webrtc.pem");
    PathBuf::from(name)
}

/// libp2p-webrtc's error only says "Failed to generate certificate"; the cause is its source.
fn certificate_error_detail(error: &libp2p_webrtc::tokio::certificate::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => cause.to_string(),
        None => error.to_string(),
    }
}

fn generate_certificate() -> Result<Certificate, CertificateError> {
    // libp2p-webrtc ignores the RNG (rcgen draws from the OS), but its signature wants rand 0.10's.
    Certificate::generate(&mut rand_0_10::rng()).map_err(|e| CertificateError::Generate {
        detail: certificate_error_detail(&e),
    })
}

/// Loads the WebRTC certificate at `path`, or generates one and stores it there (mode 0600: the
/// file holds the private key). Its hash is part of the relay's WebRTC-direct address, so a new
/// certificate would break every such address handed out.
pub fn load_or_create_certificate(path: &Path) -> Result<Certificate, CertificateError> {
    let io_err = |source| CertificateError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(pem) => Certificate::from_pem(&pem).map_err(|e| CertificateError::Decode {
            path: path.to_path_buf(),
            detail: certificate_error_detail(&e),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let certificate = generate_certificate()?;
            write_atomically(path, certificate.serialize_pem().as_bytes(), true).map_err(io_err)?;
            tracing::info!(path = %path.display(), "created new WebRTC certificate");
            Ok(certificate)
        }
        Err(e) => Err(io_err(e)),
    }
}

fn build_swarm(
    keypair: Keypair,
    certificate: Certificate,
    config: &RelayConfig,
    stats: &NetStats,
    protected: &ProtectedPeers,
) -> anyhow::Result<Swarm<Behaviour>> {
    let limits = config.limits.clone();
    let record_ttl = config.record_ttl;
    let policy = ConnectionPolicy {
        protect: protected.predicate(),
        ..config.connections.clone()
    };
    let connections = Connections::new(&policy, [], stats.connections.clone())?;
    tracing::info!(
        max_connections = policy.max_connections,
        max_per_peer = policy.max_per_peer,
        hard_cap = policy.hard_cap(),
        memory_ceiling_bytes = ?connections.memory_ceiling_bytes(),
        max_records_per_peer = config.dht_store.max_records_per_peer,
        max_dht_bytes = config.dht_store.max_total_bytes,
        "connection and DHT limits"
    );
    let store = CappedStore::new(
        keypair.public().to_peer_id(),
        config.dht_store.clone(),
        stats.dht.clone(),
    );
    let idle_timeout = policy.idle_timeout;
    let dht_providers_per_key = config.dht_store.max_providers_per_key;
    let transport = swarm::transport::build(
        &keypair,
        swarm::transport::Transports {
            psk: config.swarm_key.as_ref().map(SwarmKey::psk),
            relay_client: None,
            tcp: true,
            quic: config.swarm_key.is_none(),
            webrtc: Some(certificate),
        },
    )
    .context("cannot set up the transports")?;
    let allow = config.allow_peers.as_ref().map(|peers| {
        let mut list = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in peers {
            list.allow_peer(*peer);
        }
        list
    });
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| transport)
        .context("cannot set up the transports")?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let relay_config = relay::Config {
                max_reservations: limits.max_reservations,
                max_circuits: limits.max_circuits,
                max_circuits_per_peer: limits.max_circuits_per_peer,
                max_circuit_duration: limits.max_circuit_duration,
                max_circuit_bytes: limits.max_circuit_bytes,
                ..Default::default()
            };

            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            // Provider TTLs are not sent on the wire: the storing node picks them. Servers
            // re-announce, and a dead server should not linger in lookups for libp2p's 48 h.
            kad_config
                .set_provider_record_ttl(Some(record_ttl))
                .set_record_ttl(Some(record_ttl));
            // The relay stores other nodes' records; it publishes none of its own.
            kad_config
                .set_publication_interval(None)
                .set_provider_publication_interval(None);
            // The relay is the bootstrap peer: its routing table fills from the peers that connect
            // to it (each new one still triggers kad's automatic bootstrap). Periodic self-lookups
            // would only warn "no known peers" every 5 minutes while it is alone.
            kad_config.set_periodic_bootstrap_interval(None);
            // Other peers' records reach the store only through its ledger (dht_store).
            kad_config
                .set_record_filtering(kad::StoreInserts::FilterBoth)
                .set_max_packet_size(KAD_MAX_PACKET_BYTES);
            // Kad answers a provider lookup with at most `replication_factor` providers (20 by
            // default), always the same, oldest ones: a client would never see the other
            // servers of a popular model. The relay answers with every provider it keeps. This
            // factor also sizes the relay's own queries, and it starts almost none.
            if let Some(k) = NonZeroUsize::new(dht_providers_per_key.max(kad::K_VALUE.get())) {
                kad_config.set_replication_factor(k);
            }
            let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
            // Without a confirmed external address kad would stay in client mode, and the
            // bootstrap node of the DHT must always answer.
            kad.set_mode(Some(kad::Mode::Server));

            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                    .with_agent_version(format!("corolla-relay/{}", env!("CARGO_PKG_VERSION"))),
            );

            let autonat = autonat::Behaviour::new(
                peer_id,
                autonat::Config {
                    // Tests and LAN swarms run on private addresses; dial-backs to them are
                    // what tell a peer it is reachable there.
                    only_global_ips: false,
                    // The relay knows its addresses; it only serves probes, never asks for them.
                    use_connected: false,
                    ..Default::default()
                },
            );

            Behaviour {
                allow: allow.into(),
                connections,
                relay: relay::Behaviour::new(peer_id, relay_config),
                kad,
                identify,
                autonat,
                ping: ping::Behaviour::default(),
                streams: libp2p_stream::Behaviour::new(),
            }
        })
        .context("cannot build the relay behaviour")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}

pub use swarm::node::install_crypto_provider;

/// Runs the relay until `shutdown` resolves. Start-up failures (identity, listening) are
/// returned as errors; later per-connection problems are only logged.
pub async fn run(config: RelayConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    install_crypto_provider();
    let (keypair, certificate) = match &config.identity {
        Some(path) => (
            swarm::identity::load_or_create(path)?,
            load_or_create_certificate(&certificate_path(path))?,
        ),
        None => {
            tracing::warn!(
                "no --identity given: using a throwaway peer id and WebRTC certificate; \
                 bootstrap and browser addresses will not survive a restart"
            );
            (Keypair::generate_ed25519(), generate_certificate()?)
        }
    };
    let stats = NetStats::default();
    let mut protection = RelayProtection::default();
    let mut swarm = build_swarm(keypair, certificate, &config, &stats, &protection.peers)?;
    let local_peer_id = *swarm.local_peer_id();
    tracing::info!(peer_id = %local_peer_id, "relay starting");

    let mut listeners = HashSet::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.insert(id);
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }

    let browser_addrs: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut monitor = Monitor::new();
    let http = match config.http_listen {
        Some(addr) => Some(start_http(addr, config.web_root.as_deref(), browser_addrs.clone(), monitor.text()).await?),
        None => None,
    };
    let (relay_metrics, registry) = RelayMetrics::new(&stats);
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let router = swarm::metrics::router(Arc::new(registry), || {});
            let (task, bound) = swarm::metrics::listen(addr, router)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(address = %bound, "serving metrics at /metrics");
            Some(task)
        }
        None => None,
    };

    let mut listen_addrs: BTreeSet<Multiaddr> = BTreeSet::new();
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    let mut monitor_tick = tokio::time::interval(MONITOR_REFRESH);
    monitor_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stats_tick = tokio::time::interval(config.stats_interval);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stats = stats.snapshot();
    let gate = Gate::default();
    if let Some(key) = &config.swarm_key {
        tracing::info!(swarm_key = %key.fingerprint(), "private swarm");
        let incoming = swarm
            .behaviour()
            .streams
            .new_control()
            .accept(private::AUTH_PROTOCOL)
            .context("cannot accept proofs of the swarm key")?;
        tokio::spawn(private::accept_proofs(
            incoming,
            key.clone(),
            local_peer_id,
            gate.clone(),
        ));
    }
    let mut guard_tick = tokio::time::interval(Duration::from_millis(500));
    guard_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            () = &mut shutdown => break,
            _ = guard_tick.tick(), if config.swarm_key.is_some() => {
                for (id, peer) in gate.update(|g| g.expired(Instant::now())) {
                    tracing::info!(%peer, "no proof of the swarm key in time: disconnecting");
                    swarm.close_connection(id);
                }
                continue;
            }
            _ = monitor_tick.tick(), if config.http_listen.is_some() => {
                let connected: HashSet<PeerId> = swarm.connected_peers().copied().collect();
                monitor.refresh(swarm.behaviour_mut().kad.store_mut(), |p| connected.contains(p));
                continue;
            }
            _ = stats_tick.tick() => {
                let now = stats.snapshot();
                if now != last_stats {
                    log_stats(&now);
                    last_stats = now;
                }
                continue;
            }
            event = swarm.select_next_some() => event,
        };
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(address = %address.clone().with(Protocol::P2p(local_peer_id)), "listening");
                // The relay server only grants reservations while it has an external address,
                // and it hands these addresses to reserving peers to build circuit addresses from.
                swarm.add_external_address(address.clone());
                listen_addrs.insert(address);
                write_addr_file(&config, &listen_addrs, local_peer_id);
                set_browser_addrs(&browser_addrs, &listen_addrs, &config.external_addrs, local_peer_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "listen address expired");
                if !config.external_addrs.contains(&address) {
                    swarm.remove_external_address(&address);
                }
                listen_addrs.remove(&address);
                write_addr_file(&config, &listen_addrs, local_peer_id);
                set_browser_addrs(&browser_addrs, &listen_addrs, &config.external_addrs, local_peer_id);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(?listener_id, %error, "listener error");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
            } => {
                tracing::warn!(?listener_id, ?reason, ?addresses, "listener closed");
                for address in &addresses {
                    listen_addrs.remove(address);
                }
                write_addr_file(&config, &listen_addrs, local_peer_id);
                listeners.remove(&listener_id);
                if listeners.is_empty() {
                    bail!("all listeners closed");
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                monitor.on_connected(peer_id);
                if config.swarm_key.is_some() {
                    gate.update(|g| g.on_established(connection_id, peer_id, &endpoint, Instant::now()));
                }
                tracing::debug!(%peer_id, address = %endpoint.get_remote_address(), num_established, "connection established");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                num_established,
                ..
            } => {
                gate.update(|g| g.on_closed(connection_id));
                monitor.on_closed(peer_id, num_established);
                tracing::debug!(%peer_id, ?cause, num_established, "connection closed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr, error, ..
            } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer, result: Ok(rtt), ..
            })) => monitor.on_ping(peer, rtt),
            SwarmEvent::Behaviour(event) => on_behaviour_event(&mut swarm, &mut protection, &relay_metrics, event),
            _ => {}
        }
    }
    log_stats(&stats.snapshot());
    tracing::info!("relay shutting down");
    if let Some(task) = http {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    Ok(())
}

/// The addresses a browser can dial: WebRTC-direct ones, with their certificate hash.
fn set_browser_addrs(out: &Mutex<Vec<String>>, listen: &BTreeSet<Multiaddr>, external: &[Multiaddr], peer: PeerId) {
    let addrs = external
        .iter()
        .chain(listen.iter())
        .filter(|a| a.iter().any(|p| p == Protocol::WebRTCDirect))
        .filter(|a| !a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())))
        .map(|a| a.clone().with(Protocol::P2p(peer)).to_string())
        .collect();
    if let Ok(mut guard) = out.lock() {
        *guard = addrs;
    }
}

/// How often the monitor's state is rebuilt from the DHT store.
const MONITOR_REFRESH: Duration = Duration::from_secs(2);

/// Serves `/corolla/v1/bootstrap.json` (the browsers' way into the swarm), the monitor's
/// `/corolla/v1/state`, and the page.
async fn start_http(
    addr: std::net::SocketAddr,
    web_root: Option<&Path>,
    browser_addrs: Arc<Mutex<Vec<String>>>,
    state: monitor::StateText,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let state = move || {
        let text = state.lock().map(|g| g.clone()).unwrap_or_default();
        async move {
            (
                [
                    (axum::http::header::CACHE_CONTROL, "no-cache"),
                    (axum::http::header::CONTENT_TYPE, "application/json"),
                ],
                text.as_ref().clone(),
            )
        }
    };
    let bootstrap = move || {
        let relays = browser_addrs.lock().map(|g| g.clone()).unwrap_or_default();
        async move {
            (
                [(axum::http::header::CACHE_CONTROL, "no-cache")],
                axum::Json(serde_json::json!({ "relays": relays })),
            )
        }
    };
    let mut router = axum::Router::new()
        .route("/corolla/v1/bootstrap.json", axum::routing::get(bootstrap))
        .route(swarm::monitor::STATE_PATH, axum::routing::get(state));
    router = match web_root {
        Some(root) => {
            if !root.join("index.html").is_file() {
                bail!(
                    "the web root {} has no index.html (build the page: scripts/build-web.sh)",
                    root.display()
                );
            }
            router.merge(http::static_files(root))
        }
        None => router.fallback(|| async { http::error(axum::http::StatusCode::NOT_FOUND, "not found") }),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving HTTP");
    let limits = http::HttpLimits::default();
    Ok(tokio::spawn(http::serve(
        listener,
        http::public(router, &limits),
        limits,
    )))
}

fn log_stats(s: &swarm::limits::NetStatsSnapshot) {
    tracing::info!(
        established = s.connections.established,
        peak_established = s.connections.peak_established,
        refused = s.connections.refused,
        evicted = s.connections.evicted,
        dht_records = s.dht.records,
        dht_providers = s.dht.providers,
        dht_bytes = s.dht.bytes,
        dht_refused = s.dht.refused,
        "limits"
    );
}

/// Peers the relay never evicts: those holding a reservation (servers behind NAT, reachable
/// only through it) and both ends of every open circuit.
#[derive(Default)]
struct RelayProtection {
    peers: ProtectedPeers,
    reservations: HashMap<PeerId, Protection>,
    circuits: HashMap<(PeerId, PeerId), Vec<[Protection; 2]>>,
}

impl RelayProtection {
    /// `connected`: whether the event's peer still has a connection to the relay.
    fn on_relay_event(&mut self, event: &relay::Event, connected: impl Fn(&PeerId) -> bool) {
        use relay::Event as E;
        match event {
            E::ReservationReqAccepted { src_peer_id, .. } => {
                self.reservations
                    .entry(*src_peer_id)
                    .or_insert_with(|| self.peers.protect(*src_peer_id));
            }
            E::ReservationTimedOut { src_peer_id } => {
                self.reservations.remove(src_peer_id);
            }
            // libp2p-relay reports this for every closed connection of a peer, reservation or
            // not: only the peer's last connection ends its reservation.
            E::ReservationClosed { src_peer_id } if !connected(src_peer_id) => {
                self.reservations.remove(src_peer_id);
            }
            E::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                let pair = [self.peers.protect(*src_peer_id), self.peers.protect(*dst_peer_id)];
                self.circuits
                    .entry((*src_peer_id, *dst_peer_id))
                    .or_default()
                    .push(pair);
            }
            E::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                let key = (*src_peer_id, *dst_peer_id);
                if let Some(open) = self.circuits.get_mut(&key) {
                    open.pop();
                    if open.is_empty() {
                        self.circuits.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
}

fn on_behaviour_event(
    swarm: &mut Swarm<Behaviour>,
    protection: &mut RelayProtection,
    metrics: &RelayMetrics,
    event: BehaviourEvent,
) {
    match event {
        BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
            tracing::debug!(%peer_id, agent = %info.agent_version, addrs = ?info.listen_addrs, "identified peer");
            // Only Corolla DHT servers go into the routing table: clients (kad client mode)
            // don't list the kad protocol, and foreign libp2p nodes use another version string.
            if info.protocol_version == IDENTIFY_PROTOCOL && info.protocols.contains(&KAD_PROTOCOL) {
                for addr in info.listen_addrs {
                    swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
        }
        BehaviourEvent::Relay(event) => {
            protection.on_relay_event(&event, |peer| swarm.is_connected(peer));
            count_relay_event(metrics, protection, &event);
            on_relay_event(event);
        }
        BehaviourEvent::Kad(kad::Event::InboundRequest { request }) => {
            dht_store::admit(&mut swarm.behaviour_mut().kad, request);
        }
        BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, is_new_peer, .. }) => {
            tracing::debug!(%peer, is_new_peer, "kad routing table updated");
        }
        BehaviourEvent::Autonat(autonat::Event::InboundProbe(probe)) => {
            tracing::debug!(?probe, "autonat probe");
        }
        _ => {}
    }
}

fn count_relay_event(metrics: &RelayMetrics, protection: &RelayProtection, event: &relay::Event) {
    use relay::Event as E;
    match event {
        E::ReservationReqAccepted { renewed: true, .. } => metrics.reservation("renewed"),
        E::ReservationReqAccepted { .. } => metrics.reservation("accepted"),
        E::ReservationReqDenied { .. } => metrics.reservation("denied"),
        E::CircuitReqAccepted { .. } => metrics.circuit("accepted"),
        E::CircuitReqDenied { .. } => metrics.circuit("denied"),
        E::CircuitClosed { error: None, .. } => metrics.circuit("closed"),
        E::CircuitClosed { .. } => metrics.circuit("failed"),
        _ => {}
    }
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    metrics.reservations.set(count(protection.reservations.len()));
    metrics
        .circuits
        .set(count(protection.circuits.values().map(Vec::len).sum()));
}

fn on_relay_event(event: relay::Event) {
    use relay::Event as E;
    match event {
        E::ReservationReqAccepted { src_peer_id, renewed } => {
            tracing::info!(peer = %src_peer_id, renewed, "reservation accepted");
        }
        E::ReservationReqDenied { src_peer_id, status } => {
            tracing::warn!(peer = %src_peer_id, ?status, "reservation denied");
        }
        E::ReservationTimedOut { src_peer_id } => {
            tracing::info!(peer = %src_peer_id, "reservation timed out");
        }
        E::ReservationClosed { src_peer_id } => {
            // Also reported for connections that never held a reservation (every closed
            // connection), so not at info: a connection flood would flood the log.
            tracing::debug!(peer = %src_peer_id, "reservation closed");
        }
        E::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => {
            tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
        }
        E::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            status,
        } => {
            tracing::warn!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit denied");
        }
        E::CircuitClosed {
            src_peer_id,
            dst_peer_id,
            error,
        } => match error {
            Some(error) => tracing::info!(src = %src_peer_id, dst = %dst_peer_id, %error, "circuit closed"),
            None => tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit closed"),
        },
        other => tracing::debug!(event = ?other, "relay event"),
    }
}

fn write_addr_file(config: &RelayConfig, listen_addrs: &BTreeSet<Multiaddr>, peer: PeerId) {
    let Some(path) = &config.addr_file else { return };
    let mut contents = String::new();
    for addr in listen_addrs.iter().chain(config.external_addrs.iter()) {
        contents.push_str(&addr.clone().with(Protocol::P2p(peer)).to_string());
        contents.push('\n');
    }
    if let Err(error) = write_atomically(path, contents.as_bytes(), false) {
        tracing::error!(path = %path.display(), %error, "cannot write the address file");
    }
}

/// Writes via a temporary file and a rename: readers polling the address file never see a
/// half-written one, and a crash never leaves a truncated certificate behind. `private` files
/// (keys) are created with mode 0600, so they are never readable by others, not even briefly.
fn write_atomically(path: &Path, bytes: &[u8], private: bool) -> io::Result<()> {
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?
        .to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> anyhow::Result<RelayConfig> {
        RelayConfig::try_from(Cli::try_parse_from(
            std::iter::once("relay").chain(args.iter().copied()),
        )?)
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen.len(), 3);
        assert!(c.listen[2].iter().any(|p| matches!(p, Protocol::WebRTCDirect)));
        assert_eq!(c.limits.max_circuits, 512);
        assert_eq!(c.limits.max_circuits_per_peer, 16);
        assert_eq!(c.limits.max_circuit_duration, Duration::from_secs(3600));
        assert_eq!(c.limits.max_circuit_bytes, 1 << 30);
        assert!(c.identity.is_none() && c.addr_file.is_none());
        assert_eq!(c.connections.max_connections, 2048);
        assert_eq!(c.connections.max_per_peer, 8);
        assert_eq!(c.connections.memory_ceiling, Some(MemoryCeiling::FractionOfRam(0.5)));
        assert_eq!(c.dht_store.max_records_per_peer, 64);
        assert_eq!(c.dht_store.max_total_bytes, 64 << 20);
        assert_eq!(c.dht_store.max_providers_per_key, 512);
    }

    #[test]
    fn connection_and_dht_flags() {
        let c = config(&[
            "--max-connections",
            "100",
            "--max-connections-per-peer",
            "2",
            "--max-memory-bytes",
            "1000000",
            "--max-records-per-peer",
            "5",
            "--max-dht-bytes",
            "4096",
        ])
        .unwrap();
        assert_eq!(c.connections.max_connections, 100);
        assert_eq!(c.connections.max_per_peer, 2);
        assert_eq!(c.connections.memory_ceiling, Some(MemoryCeiling::Bytes(1_000_000)));
        assert_eq!(c.dht_store.max_records_per_peer, 5);
        assert_eq!(c.dht_store.max_total_bytes, 4096);
    }

    #[test]
    fn rejects_bad_addresses() {
        let e = config(&["--listen", "not-an-addr"]).unwrap_err();
        assert!(format!("{e:#}").contains("--listen"), "{e:#}");
        assert!(
            config(&[
                "--listen",
                "/ip4/127.0.0.1/tcp/0/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            ])
            .is_err()
        );
        assert!(config(&["--external-addr", "/nope"]).is_err());
    }

    #[test]
    fn rejects_bad_limits() {
        assert!(config(&["--max-circuit-duration-secs", "0"]).is_err());
        assert!(config(&["--max-circuit-duration-secs", "99999999999"]).is_err());
        assert!(config(&["--max-circuits", "0"]).is_err());
        assert!(config(&["--max-connections", "0"]).is_err());
        let e = config(&["--max-connections", "4", "--max-connections-per-peer", "8"]).unwrap_err();
        assert!(format!("{e:#}").contains("--max-connections"), "{e:#}");
        assert!(config(&["--max-memory-bytes", "0"]).is_err());
        assert!(config(&["--max-records-per-peer", "0"]).is_err());
        assert!(config(&["--max-dht-bytes", "0"]).is_err());
    }

    #[test]
    fn addr_file_lines_end_in_peer_id() {
        let dir = std::env::temp_dir().join(format!("corolla-relay-unit-{}", std::process::id()));
        let path = dir.join("addrs");
        let mut c = config(&["--external-addr", "/ip4/203.0.113.7/tcp/4001"]).unwrap();
        c.addr_file = Some(path.clone());
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let listen: BTreeSet<Multiaddr> = ["/ip4/127.0.0.1/tcp/5000".parse().unwrap()].into();
        write_addr_file(&c, &listen, peer);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines,
            [
                format!("/ip4/127.0.0.1/tcp/5000/p2p/{peer}"),
                format!("/ip4/203.0.113.7/tcp/4001/p2p/{peer}")
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn certificate_is_created_private_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("corolla-relay-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = certificate_path(&dir.join("relay.key"));
        assert_eq!(path, dir.join("relay.key.webrtc.pem"));
        let first = load_or_create_certificate(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = load_or_create_certificate(&path).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());

        std::fs::write(&path, "not a certificate").unwrap();
        let e = load_or_create_certificate(&path).unwrap_err().to_string();
        assert!(e.contains("relay.key.webrtc.pem"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! Hostile peers against the real `relay` binary on 127.0.0.1: a connection flood from
//! hundreds of identities, a DHT record flood from one publisher, and the memory ceiling.
//! The relay must stay up, keep its connections under the cap, stay small, and keep serving
//! legitimate peers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corolla_tests::{Proc, bin, temp_dir, wait_for_file_lines};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::identity::Keypair;
use libp2p::kad::RecordKey;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{SwarmEvent, dummy};
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use swarm::node::{self, Client, NodeConfig};
use tokio::sync::watch;

const STARTUP: Duration = Duration::from_secs(30);
/// The relay's connection cap in these tests, and what the flood brings against it.
const MAX_CONNECTIONS: u32 = 256;
const PER_PEER: u32 = 8;
const ATTACKERS: usize = 300;
const CONNECTIONS_PER_ATTACKER: usize = 7;

fn start_relay(name: &str, dir: &Path, extra: &[&str]) -> (Proc, Multiaddr, PeerId) {
    let addr_file = dir.join("relay.addrs");
    let relay = Proc::spawn(
        name,
        Command::new(bin("relay"))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--stats-interval-secs", "1"])
            .arg("--addr-file")
            .arg(&addr_file)
            .args(extra)
            // Per-connection lines at debug would be thousands; the counters come at info.
            .env("COROLLA_LOG", "info"),
    );
    let line = wait_for_file_lines(&addr_file, 1, STARTUP).remove(0);
    let addr: Multiaddr = line.parse().unwrap_or_else(|e| panic!("bad relay address {line}: {e}"));
    let Some(Protocol::P2p(id)) = addr.iter().last() else {
        panic!("relay address without /p2p/: {addr}")
    };
    (relay, addr, id)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The largest value of `key=N` over the relay's "limits" lines.
fn max_logged(log: &str, key: &str) -> Option<u64> {
    let needle = format!(" {key}=");
    log.lines()
        .filter(|l| l.contains(" limits "))
        .filter_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .max()
}

/// Waits until the relay has logged its counters with `key` at least `min`.
async fn wait_logged(relay: &Proc, key: &str, min: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = max_logged(&relay.log(), key).filter(|n| *n >= min) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not log {key} >= {min} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_node(relay: &Multiaddr, dht_server: bool) -> Client {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.bootstrap = vec![relay.clone()];
    config.dht_server = dht_server;
    if dht_server {
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("listen address")];
    }
    let (client, _inbound, event_loop) = node::start(config).expect("start a node");
    tokio::spawn(event_loop.run());
    client
}

#[derive(Default)]
struct FloodCounts {
    established: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
}

/// One hostile identity: opens `n` connections to the relay and holds them (it speaks none of
/// the relay's protocols) until told to stop.
async fn attacker(
    relay: Multiaddr,
    relay_id: PeerId,
    n: usize,
    counts: Arc<FloodCounts>,
    mut stop: watch::Receiver<bool>,
) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("attacker transport")
        .with_behaviour(|_| dummy::Behaviour)
        .expect("attacker behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for _ in 0..n {
        let opts = DialOpts::peer_id(relay_id)
            .addresses(vec![relay.clone()])
            .condition(PeerCondition::Always)
            .build();
        if swarm.dial(opts).is_err() {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { .. } => {
                    counts.established.fetch_add(1, Ordering::Relaxed);
                }
                SwarmEvent::OutgoingConnectionError { .. } => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
                SwarmEvent::ConnectionClosed { .. } => {
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_from_many_identities_does_not_lock_out_a_new_peer() {
    let dir = temp_dir("limits-flood");
    let (mut relay, relay_addr, relay_id) = start_relay(
        "relay-flood",
        &dir,
        &[
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--max-connections-per-peer",
            &PER_PEER.to_string(),
        ],
    );
    let (rss_idle, _) = memory_kib(relay.pid());

    // A legitimate server-like peer provides a key before the flood.
    let key = RecordKey::new(&"corolla/servers");
    let provider = start_node(&relay_addr, true);
    tokio::time::timeout(Duration::from_secs(20), provider.start_providing(key.clone()))
        .await
        .expect("providing timed out")
        .expect("providing failed");

    // 300 identities x 7 connections = 2,100, ramped up over ~3 s.
    let counts = Arc::new(FloodCounts::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..ATTACKERS {
        tasks.push(tokio::spawn(attacker(
            relay_addr.clone(),
            relay_id,
            CONNECTIONS_PER_ATTACKER,
            counts.clone(),
            stop_rx.clone(),
        )));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = (ATTACKERS * CONNECTIONS_PER_ATTACKER) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rss_peak = 0;
    loop {
        let (rss, _) = memory_kib(relay.pid());
        rss_peak = rss_peak.max(rss);
        let settled = counts.established.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed);
        if settled >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flood_time = started.elapsed();
    assert!(
        relay.wait_timeout(Duration::ZERO).is_none(),
        "the relay died under the flood"
    );

    // While the attackers still hold every slot they got, a new peer connects (evicting an old
    // attacker connection) and finds the provider through the relay's DHT. Right after the
    // flood every slot is younger than the eviction floor (1 s) and the relay refuses it
    // (which the dialer sees as a connection closed right after its handshake), so, as a real
    // client would, it tries again for a while.
    let newcomer = start_node(&relay_addr, false);
    let started = Instant::now();
    let mut tries = 0;
    let found = loop {
        tries += 1;
        let _ = tokio::time::timeout(Duration::from_secs(5), newcomer.dial(relay_addr.clone())).await;
        let found = tokio::time::timeout(Duration::from_secs(20), newcomer.get_providers(key.clone()))
            .await
            .expect("provider lookup timed out under the flood");
        match found {
            Ok(found) if found.contains(&provider.peer_id()) => break found,
            _ if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("the newcomer found no provider within 10 s ({tries} tries): {other:?}"),
        }
    };
    let served = started.elapsed();
    assert!(found.contains(&provider.peer_id()));
    let (rss_now, hwm) = memory_kib(relay.pid());
    rss_peak = rss_peak.max(rss_now);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let peak = wait_logged(&relay, "peak_established", 1, Duration::from_secs(5)).await;
    let evicted = max_logged(&relay.log(), "evicted").unwrap_or(0);
    let refused = max_logged(&relay.log(), "refused").unwrap_or(0);
    let established = counts.established.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    eprintln!(
        "connection flood: {total} dials from {ATTACKERS} identities in {flood_time:.1?}: \
         {established} handshakes completed, {failed} failed, {} closed by the relay; relay: peak \
         {peak} established (cap {MAX_CONNECTIONS}), {evicted} evicted, {refused} refused; \
         the newcomer found the provider after {served:.1?} ({tries} tries); relay VmRSS {rss_idle} KiB idle, {rss_peak} KiB peak, \
         VmHWM {hwm} KiB",
        counts.closed.load(Ordering::Relaxed)
    );
    let hard_cap = u64::from(MAX_CONNECTIONS + (MAX_CONNECTIONS / 8).max(8));
    assert!(
        peak <= hard_cap,
        "{peak} connections established at once, cap {hard_cap}"
    );
    assert!(
        peak >= u64::from(MAX_CONNECTIONS) / 2,
        "the flood never came near the cap ({peak}): the test tests nothing"
    );
    // (The attackers' own counts cannot tell admitted from refused: a dialer sees a refused
    // connection as established, then closed.)
    assert!(evicted > 0, "no connection was evicted at the cap");
    assert!(
        refused > 0,
        "nothing was refused: the flood never exceeded what eviction allows"
    );
    // An idle relay is ~20 MiB; 2,000 connections must not make it balloon.
    assert!(hwm < 512 * 1024, "relay VmHWM {hwm} KiB under the flood");
    assert!(
        relay.wait_timeout(Duration::ZERO).is_none(),
        "the relay died after the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_flood_is_capped_per_publisher() {
    const PER_PUBLISHER: usize = 20;
    const FLOOD: usize = 2000;
    let dir = temp_dir("limits-records");
    let (relay, relay_addr, _) = start_relay(
        "relay-records",
        &dir,
        &["--max-records-per-peer", &PER_PUBLISHER.to_string()],
    );
    // DHT clients: they store nothing for others, so every record found is the relay's.
    let flooder = start_node(&relay_addr, false);
    let started = Instant::now();
    let mut puts: FuturesUnordered<_> = FuturesUnordered::new();
    let mut acknowledged = 0;
    for i in 0..FLOOD {
        let flooder = flooder.clone();
        puts.push(async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                flooder.put_record(RecordKey::new(&format!("flood/{i}")), vec![7; 200]),
            )
            .await
        });
        // A few puts in flight at a time, so their order at the relay is about their index.
        if puts.len() >= 8
            && let Some(Ok(Ok(()))) = puts.next().await
        {
            acknowledged += 1;
        }
    }
    while let Some(r) = puts.next().await {
        if matches!(r, Ok(Ok(()))) {
            acknowledged += 1;
        }
    }
    let flood_time = started.elapsed();
    let other = start_node(&relay_addr, false);
    for i in 0..5 {
        tokio::time::timeout(
            Duration::from_secs(20),
            other.put_record(RecordKey::new(&format!("other/{i}")), vec![1; 100]),
        )
        .await
        .expect("put timed out")
        .expect("the other peer's put failed");
    }

    let reader = start_node(&relay_addr, false);
    let get = |key: String| {
        let reader = reader.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), reader.get_record(RecordKey::new(&key)))
                .await
                .expect("lookup timed out")
                .map(|found| !found.is_empty())
                .unwrap_or(false)
        }
    };
    for i in 0..5 {
        assert!(
            get(format!("other/{i}")).await,
            "the other peer's record other/{i} is missing"
        );
    }
    let mut flood_found = 0;
    for i in (0..FLOOD).step_by(25) {
        if get(format!("flood/{i}")).await {
            flood_found += 1;
        }
    }
    let stored = wait_logged(
        &relay,
        "dht_records",
        (PER_PUBLISHER + 5) as u64,
        Duration::from_secs(5),
    )
    .await;
    let refused = wait_logged(
        &relay,
        "dht_refused",
        (FLOOD - PER_PUBLISHER) as u64,
        Duration::from_secs(5),
    )
    .await;
    eprintln!(
        "record flood: {FLOOD} puts ({acknowledged} acknowledged) in {flood_time:.1?}; relay holds \
         {stored} records, refused {refused}; {flood_found} of {} sampled flood keys found",
        FLOOD / 25
    );
    assert_eq!(stored, (PER_PUBLISHER + 5) as u64, "the relay holds {stored} records");
    assert!(flood_found <= PER_PUBLISHER, "{flood_found} flood records found");
    assert!(
        flood_found < FLOOD / 25,
        "every sampled flood record was found: the cap did nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ceiling_refuses_new_connections() {
    let dir = temp_dir("limits-memory");
    // One byte: the relay is always above it, so every new connection is refused.
    let (relay, relay_addr, _) = start_relay("relay-memory", &dir, &["--max-memory-bytes", "1"]);
    let client = start_node(&relay_addr, false);
    let r = tokio::time::timeout(Duration::from_secs(10), client.dial(relay_addr.clone()))
        .await
        .expect("dial timed out");
    assert!(r.is_err(), "a connection was accepted above the memory ceiling");
    wait_logged(&relay, "refused", 1, Duration::from_secs(5)).await;
}

/// A light provider: a bare Kademlia node that provides `key` through the relay, announcing
/// `addresses` loopback addresses (as a server with several transports and circuits would).
async fn provide(
    relay: Multiaddr,
    relay_id: PeerId,
    key: RecordKey,
    addresses: u16,
    mut stop: watch::Receiver<bool>,
) -> bool {
    use libp2p::kad;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("provider transport")
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            kad::Behaviour::with_config(
                id,
                kad::store::MemoryStore::new(id),
                kad::Config::new(swarm::identity::KAD_PROTOCOL),
            )
        })
        .expect("provider behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().set_mode(Some(kad::Mode::Client));
    for port in 0..addresses {
        swarm.add_external_address(
            format!("/ip4/127.0.0.1/tcp/{}", 20_000 + port)
                .parse()
                .expect("address"),
        );
    }
    let mut direct = relay.clone();
    direct.pop();
    swarm.behaviour_mut().add_address(&relay_id, direct);
    if swarm.behaviour_mut().start_providing(key).is_err() {
        return false;
    }
    let mut ok = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return ok.unwrap_or(false),
            event = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                    result: kad::QueryResult::StartProviding(r), ..
                }) = event {
                    ok = Some(r.is_ok());
                }
            }
        }
    }
}

/// Every server of a model provides the same key. A lookup must find as many of them as the
/// relay keeps (`--max-providers-per-key`), although their answer is larger than libp2p's
/// default Kademlia message limit (16 KiB), and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_of_one_key_are_found_up_to_the_cap() {
    const PROVIDERS: usize = 200;
    const CAP: usize = 150;
    let dir = temp_dir("limits-providers");
    let (relay, relay_addr, relay_id) =
        start_relay("relay-providers", &dir, &["--max-providers-per-key", &CAP.to_string()]);
    let key = RecordKey::new(&"corolla/model/many");
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..PROVIDERS)
        .map(|_| tokio::spawn(provide(relay_addr.clone(), relay_id, key.clone(), 8, stop_rx.clone())))
        .collect();
    let held = wait_logged(&relay, "dht_providers", CAP as u64, Duration::from_secs(30)).await;
    let reader = start_node(&relay_addr, false);
    let found = tokio::time::timeout(Duration::from_secs(20), reader.get_providers(key))
        .await
        .expect("provider lookup timed out")
        .expect("provider lookup failed");
    let refused = wait_logged(&relay, "dht_refused", (PROVIDERS - CAP) as u64, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    eprintln!(
        "{PROVIDERS} providers of one key (8 addresses each): the relay keeps {held}, refused {refused}; \
         a lookup finds {}",
        found.len()
    );
    assert_eq!(held, CAP as u64);
    assert_eq!(found.len(), CAP, "a lookup found {} of {CAP} providers", found.len());
}

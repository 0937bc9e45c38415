//! Private swarms across real processes on 127.0.0.1: a relay and two servers sharing a
//! `--swarm-key` serve a client holding it; outsiders (no key, another key, over TCP or over the
//! relay's WebRTC-direct listener) can neither connect to the servers, nor list the swarm's
//! models, nor open a session. And `--allow-peer` lets only the named peers in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corolla_tests::{STARTUP, Swarm, bin, csv, fixture, golden_greedy, temp_dir, wait_for_file_lines};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use swarm::dht;
use swarm::node::{self, Client, NodeConfig};
use swarm::private::{AUTH_TIMEOUT, SwarmKey};

fn key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, SwarmKey::generate_file().expect("random key")).expect("key file");
    path
}

/// `corolla generate` of the llama fixture's golden prompt through `relay`.
fn generate(relay: &str, extra: &[&str]) -> (bool, Vec<u32>, String) {
    let (prompt, golden) = golden_greedy("llama");
    let out = Command::new(bin("corolla"))
        .arg("generate")
        .arg("--model")
        .arg(fixture("llama"))
        .args(["--token-ids", &csv(&prompt)])
        .args(["--max-new-tokens", &golden.len().to_string(), "--ignore-eos", "--json"])
        .args(["--initial-peers", relay])
        .args(extra)
        .output()
        .expect("corolla runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let tokens = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|j| {
            j["token_ids"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect())
        })
        .unwrap_or_default();
    (out.status.success(), tokens, stderr)
}

/// An in-process client node (with `key`, if any) that has dialed `bootstrap`.
async fn client_node(bootstrap: &str, key: Option<SwarmKey>, identity: Option<Keypair>) -> Client {
    let mut config = NodeConfig::new(identity.unwrap_or_else(Keypair::generate_ed25519));
    // Native WebRTC dials from a socket it listens on.
    if bootstrap.contains("/webrtc-direct/") {
        config.listen = vec!["/ip4/127.0.0.1/udp/0/webrtc-direct".parse().expect("addr")];
    }
    config.bootstrap = vec![bootstrap.parse::<Multiaddr>().expect("addr")];
    config.swarm_key = key;
    config.request_timeout = Duration::from_secs(10);
    let (client, _inbound, event_loop) = node::start(config).expect("node");
    tokio::spawn(event_loop.run());
    client
}

/// A node connected to `addr` over WebRTC-direct, which on loopback now and then fails its
/// ICE/DTLS set-up: a few tries, each from a new node on a new UDP socket (the listener's ICE
/// agent for a failed attempt's address discards a second dial from that address; CI saw
/// ErrMismatchUsername and timeouts). `key` reads the swarm key anew for each node.
async fn webrtc_node(addr: &str, key: impl Fn() -> Option<SwarmKey>) -> Result<Client, String> {
    let mut failed = String::new();
    for _ in 0..3 {
        let client = client_node(addr, key(), None).await;
        // The dial goes out from the node's own UDP listener: wait until it listens.
        let listening = tokio::time::timeout(Duration::from_secs(5), async {
            while client.addresses().await.is_ok_and(|a| a.listen.is_empty()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if listening.is_err() {
            failed = "the node never listened".into();
            continue;
        }
        failed = match tokio::time::timeout(Duration::from_secs(15), client.dial(addr.parse().expect("addr"))).await {
            Ok(Ok(())) => return Ok(client),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".into(),
        };
        eprintln!("WebRTC dial of {addr} failed ({failed}); trying from a new node");
    }
    Err(failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_swarm_serves_only_the_peers_holding_its_key() {
    let dir = temp_dir("private-keys");
    let key = key_file(&dir, "swarm.key");
    let other = key_file(&dir, "other.key");
    let key_arg = key.to_str().expect("utf-8 path");
    let mut swarm = Swarm::start_with(
        "private",
        &["--swarm-key", key_arg, "--listen", "/ip4/127.0.0.1/udp/0/webrtc-direct"],
    );
    let relay = swarm.relay_addr.clone();
    // WebRTC-direct too, for browsers, behind the proof of the key.
    swarm.server(
        &fixture("llama"),
        "0:2",
        &[
            "--swarm-key",
            key_arg,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/webrtc-direct",
        ],
    );
    // Reachable only through the relay: circuits carry `pnet` end to end.
    let circuit = format!("{relay}/p2p-circuit");
    swarm.server(
        &fixture("llama"),
        "2:4",
        &["--swarm-key", key_arg, "--listen", &circuit],
    );
    let server_lines = wait_for_file_lines(&swarm.dir.join("server0.addrs"), 1, STARTUP);
    let server_addr = server_lines
        .iter()
        .find(|a| a.contains("/tcp/"))
        .unwrap_or_else(|| panic!("the server's TCP address: {server_lines:?}"))
        .clone();

    // A member gets the golden tokens.
    let (ok, tokens, stderr) = {
        let relay = relay.clone();
        let key_arg = key_arg.to_string();
        tokio::task::spawn_blocking(move || generate(&relay, &["--swarm-key", &key_arg]))
            .await
            .expect("client thread")
    };
    assert!(ok, "the member failed: {stderr}");
    assert_eq!(tokens, golden_greedy("llama").1);

    // Outsiders over TCP, without the key or with another one, cannot even reach the relay.
    for extra in [vec![], vec!["--swarm-key", other.to_str().expect("utf-8 path")]] {
        let (ok, _, stderr) = {
            let relay = relay.clone();
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            tokio::task::spawn_blocking(move || generate(&relay, &extra.iter().map(String::as_str).collect::<Vec<_>>()))
                .await
                .expect("client thread")
        };
        assert!(!ok, "an outsider ({extra:?}) generated");
        assert!(stderr.contains("no initial peer is reachable"), "{extra:?}: {stderr}");
    }
    // Nor a server directly.
    let outsider = client_node(&relay, None, None).await;
    let dialed = tokio::time::timeout(
        Duration::from_secs(15),
        outsider.dial(server_addr.parse().expect("addr")),
    )
    .await;
    assert!(!matches!(dialed, Ok(Ok(()))), "an outsider reached a server over TCP");

    // Over the relay's WebRTC-direct listener an outsider connects, finds no model (the records
    // are sealed, under keys it cannot name), and is dropped for want of a proof.
    let relay_lines = wait_for_file_lines(&swarm.dir.join("relay.addrs"), 2, STARTUP);
    let webrtc = relay_lines
        .iter()
        .find(|a| a.contains("/webrtc-direct/"))
        .expect("the relay's WebRTC address")
        .clone();
    let outsider = webrtc_node(&webrtc, || None).await.expect("WebRTC reaches the relay");
    let models = dht::list_models(&outsider, Duration::from_secs(3))
        .await
        .unwrap_or_default();
    assert!(models.is_empty(), "an outsider listed {models:?}");
    // A circuit through the relay to the relay-only server meets that server's `pnet`.
    let server_peer: PeerId = swarm.servers[1].1.parse().expect("peer id");
    let circuit: Multiaddr = format!("{webrtc}/p2p-circuit/p2p/{server_peer}").parse().expect("addr");
    let through = tokio::time::timeout(Duration::from_secs(15), outsider.dial(circuit)).await;
    assert!(
        !matches!(through, Ok(Ok(()))),
        "an outsider reached a server through the relay"
    );
    tokio::time::sleep(AUTH_TIMEOUT + Duration::from_secs(2)).await;
    let relay_log = swarm.relay.log();
    assert!(
        relay_log.contains(&format!("peer={}", outsider.peer_id()))
            && relay_log.contains("no proof of the swarm key in time"),
        "the relay kept the outsider's WebRTC connection:\n{relay_log}"
    );

    // A server's own WebRTC-direct listener (for browsers) serves an outsider nothing: no info,
    // no session, and it is dropped for want of a proof. A member there proves the key.
    let server_webrtc = server_lines
        .iter()
        .find(|a| a.contains("/webrtc-direct/") && a.contains("/127.0.0.1/"))
        .unwrap_or_else(|| panic!("the server's WebRTC address: {server_lines:?}"))
        .clone();
    let server0: PeerId = swarm.servers[0].1.parse().expect("peer id");
    let outsider = webrtc_node(&server_webrtc, || None)
        .await
        .expect("WebRTC reaches the server");
    let info = outsider.info(server0).await;
    assert!(info.is_err(), "an outsider read the server's info: {info:?}");
    let session = outsider.open_stream(server0, swarm::protocol::INFERENCE_PROTOCOL).await;
    if let Ok(mut stream) = session {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.write_all(&[0u8; 64]).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(AUTH_TIMEOUT * 2, stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "an outsider's session stream was served: {read:?}"
        );
    }
    let server_log = swarm.servers[0].0.log();
    assert!(
        server_log.contains(&format!("peer={}", outsider.peer_id()))
            && server_log.contains("no proof of the swarm key in time"),
        "the server kept the outsider's WebRTC connection:\n{server_log}"
    );
    let member = webrtc_node(&server_webrtc, || Some(SwarmKey::read(&key).expect("key")))
        .await
        .expect("WebRTC reaches the server");
    let info = member
        .info(server0)
        .await
        .expect("a member reads the server's info over WebRTC");
    assert_eq!((info.start, info.end), (0, 2));

    // A member in process lists the model with the key.
    let member = client_node(&relay, Some(SwarmKey::read(&key).expect("key")), None).await;
    tokio::time::timeout(Duration::from_secs(15), member.dial(relay.parse().expect("addr")))
        .await
        .expect("dial in time")
        .expect("a member reaches the relay");
    let models = dht::list_models(&member, Duration::from_secs(10)).await.expect("list");
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(models[0].servers, 2, "{models:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_lists_let_only_the_named_peers_in() {
    let dir = temp_dir("allow-ids");
    let server_id = swarm::identity::load_or_create(&dir.join("server.id")).expect("identity");
    let friend = Keypair::generate_ed25519();
    let (server_peer, friend_peer) = (server_id.public().to_peer_id(), friend.public().to_peer_id());
    let mut swarm = Swarm::start_with(
        "allow",
        &[
            "--allow-peer",
            &server_peer.to_string(),
            "--allow-peer",
            &friend_peer.to_string(),
        ],
    );
    let relay = swarm.relay_addr.clone();
    let id_path = dir.join("server.id");
    swarm.server(
        &fixture("llama"),
        "0:4",
        &[
            "--identity",
            id_path.to_str().expect("utf-8"),
            "--allow-peer",
            &friend_peer.to_string(),
        ],
    );
    let server_addr: Multiaddr = std::fs::read_to_string(swarm.dir.join("server0.addrs"))
        .expect("address")
        .lines()
        .next()
        .expect("a line")
        .parse()
        .expect("addr");

    let friend = client_node(&relay, None, Some(friend)).await;
    tokio::time::timeout(Duration::from_secs(15), friend.dial(server_addr.clone()))
        .await
        .expect("in time")
        .expect("the allowed peer reaches the server");
    let info = tokio::time::timeout(Duration::from_secs(15), friend.info(server_peer))
        .await
        .expect("in time")
        .expect("server info");
    assert_eq!((info.start, info.end), (0, 4));

    let models = dht::list_models(&friend, Duration::from_secs(10)).await.expect("list");
    assert_eq!(models.len(), 1, "the allowed peer lists {models:?}");

    // Denied by both: the relay and the server close its connections as they open.
    let stranger = client_node(&relay, None, None).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), stranger.dial(server_addr)).await;
    let asked = tokio::time::timeout(Duration::from_secs(15), stranger.info(server_peer)).await;
    assert!(!matches!(asked, Ok(Ok(_))), "a stranger got the server's info");
    let models = dht::list_models(&stranger, Duration::from_secs(3))
        .await
        .unwrap_or_default();
    assert!(models.is_empty(), "a stranger listed {models:?}");
}

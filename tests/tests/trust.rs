//! Trust across real processes on 127.0.0.1: what a client believes of the DHT.
//!
//! Hostile DHT nodes serve forged server records (another peer's id, far-future expiry,
//! `end < start`, a span outside the model, a claimed throughput of 10^9, a record signed by
//! the wrong key, the old unsigned format). Readers must ignore every one: `server
//! --num-blocks` places itself as if they did not exist, and the client's tokens are golden
//! without touching any forger.

use std::process::Command;
use std::time::Duration;

use corolla_tests::{Proc, STARTUP, Swarm, bin, csv, fixture, golden_greedy, token_ids, wait_for_file_lines};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use shared_model::fingerprint::fingerprint;
use shared_model::loader::ModelFiles;
use swarm::dht;
use swarm::node::{self, Client, NodeConfig};
use swarm::protocol::{PROTOCOL_VERSION, ServerInfo};
use swarm::{record, wire};

fn golden() -> (Vec<u32>, Vec<u32>) {
    golden_greedy("llama")
}

/// A DHT server of its own, joined to the swarm through the relay.
async fn dht_node(relay: &str) -> (Client, Keypair) {
    let key = Keypair::generate_ed25519();
    let mut config = NodeConfig::new(key.clone());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    config.bootstrap = vec![relay.parse::<Multiaddr>().expect("relay addr")];
    config.dht_server = true;
    let (client, _inbound, event_loop) = node::start(config).expect("node");
    tokio::spawn(event_loop.run());
    (client, key)
}

/// What an honest server of `model` on `[start, end)` would announce as `peer`.
fn info(peer: &str, model: &str, start: u32, end: u32) -> ServerInfo {
    ServerInfo {
        peer_id: peer.to_string(),
        model: model.to_string(),
        model_name: "forged".into(),
        start,
        end,
        throughput: 1e4,
        free_cache_tokens: 1 << 20,
        version: "0.1.0".into(),
        protocol: PROTOCOL_VERSION,
        public_name: None,
        relayed: false,
        // Nothing listens there: a client that believed the record would fail to reach it.
        addrs: vec![format!("/ip4/127.0.0.1/tcp/9/p2p/{peer}")],
        expires_at_ms: dht::now_ms() + 600_000,
        bundle: None,
        serves_head: false,
        adapters: Vec::new(),
        load: None,
        numerics: "f32".into(),
        model_blocks: 0,
    }
}

/// One forger: provides the model, and stores `records` (key, value) in its own DHT store,
/// where lookups find them.
async fn forge(
    relay: &str,
    model: &str,
    records: impl FnOnce(&Keypair) -> Vec<(libp2p::kad::RecordKey, Vec<u8>)>,
) -> Client {
    let (client, key) = dht_node(relay).await;
    // Honest nodes refuse to store another peer's key for it; its own store keeps them.
    for (k, v) in records(&key) {
        let _ = tokio::time::timeout(Duration::from_secs(10), client.put_record(k, v)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), client.start_providing(dht::model_key(model))).await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_records_are_ignored_by_clients_and_servers() {
    let model_dir = fixture("llama");
    let files = ModelFiles::open(&model_dir).expect("model");
    let fp = fingerprint(&files.config, files.weights.as_ref()).expect("fingerprint");
    let mut swarm = Swarm::start("forged");
    let honest = swarm.server(&model_dir, "0:2", &[]);
    let victim: libp2p::PeerId = honest.parse().expect("peer id");
    let relay = swarm.relay_addr.clone();

    let sign = |key: &Keypair, info: &ServerInfo| record::sign(key, info).expect("sign");
    let own = |key: &Keypair| key.public().to_peer_id();
    let m = fp.clone();
    let mut forgers = Vec::new();
    // A record of its own that claims 10^9 tokens/s for the blocks nobody serves yet; and, under
    // the honest server's key, a record it signed itself.
    forgers.push(
        forge(&relay, &fp, |key| {
            let me = own(key);
            let fast = ServerInfo {
                throughput: 1e9,
                ..info(&me.to_string(), &m, 2, 4)
            };
            let mine = info(&me.to_string(), &m, 0, 4);
            vec![
                (dht::server_key(&m, &me), sign(key, &fast)),
                (dht::server_key(&m, &victim), sign(key, &mine)),
            ]
        })
        .await,
    );
    // end < start; and the old unsigned format under the honest server's key, never expiring.
    forgers.push(
        forge(&relay, &fp, |key| {
            let me = own(key);
            let unsigned = ServerInfo {
                expires_at_ms: u64::MAX,
                ..info(&honest, &m, 0, 4)
            };
            vec![
                (dht::server_key(&m, &me), sign(key, &info(&me.to_string(), &m, 4, 2))),
                (dht::server_key(&m, &victim), wire::to_cbor(&unsigned).expect("cbor")),
            ]
        })
        .await,
    );
    // Blocks outside the model (it has 4).
    forgers.push(
        forge(&relay, &fp, |key| {
            let me = own(key);
            vec![(dht::server_key(&m, &me), sign(key, &info(&me.to_string(), &m, 2, 9)))]
        })
        .await,
    );
    // An expiry in the far future (it would outlive every honest record).
    forgers.push(
        forge(&relay, &fp, |key| {
            let me = own(key);
            let forever = ServerInfo {
                expires_at_ms: u64::MAX,
                ..info(&me.to_string(), &m, 2, 4)
            };
            vec![(dht::server_key(&m, &me), sign(key, &forever))]
        })
        .await,
    );

    // A new server places itself: the forged records would put it on 0..2 (blocks 2..4 look
    // served at 10^9 tokens/s), and then nobody would serve 2..4.
    let addr_file = swarm.dir.join("auto.addrs");
    let auto = Proc::spawn(
        "server-auto",
        Command::new(bin("server"))
            .env("COROLLA_LOG", "info,swarm::dht=debug")
            .arg("--model")
            .arg(&model_dir)
            .args(["--num-blocks", "2", "--initial-peers", &relay])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
            .arg(&addr_file),
    );
    wait_for_file_lines(&addr_file, 1, STARTUP);
    let log = auto.log();
    let chose = log
        .lines()
        .find(|l| l.contains("chose blocks"))
        .expect("placement logged");
    assert!(chose.contains("start=2") && chose.contains("end=4"), "{chose}");
    assert!(
        log.contains("DHT record refused"),
        "the new server never saw a forged record:\n{log}"
    );
    swarm.servers.push((auto, String::new()));

    let (_, golden) = golden();
    let n = golden.len();
    let json = tokio::task::spawn_blocking(move || generate(Some(&relay), n, "info,swarm::dht=debug", &[]))
        .await
        .expect("client thread");
    let stderr = json["stderr"].as_str().unwrap_or_default();
    assert_eq!(token_ids(&json), golden);
    // Every kind of forgery reached the client and was refused for what it is.
    for reason in [
        "not plausible",
        "is not inside a model",
        "later than any announcement may live",
        "signed by",
        "malformed record",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("DHT record refused") && l.contains(reason)),
            "no record refused as \"{reason}\":\n{stderr}"
        );
    }
    // No forger was ever tried.
    assert!(!stderr.contains("banned server"), "{stderr}");
    assert!(!stderr.contains("re-routing"), "{stderr}");
    drop(forgers);
}

/// A server that claims the most throughput a record may carry but answers every step 300 ms
/// late wins the first route (its claim is only capped), and is dropped from it within a few
/// tokens, once the client has measured it; the tokens stay golden.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_slower_than_it_claims_is_dropped_from_the_route() {
    let mut swarm = Swarm::start("slow-liar");
    // An honest server whose modest claim (100 tokens/s, which it beats) makes claims, not
    // loopback round-trip noise, decide the first route.
    faulty(&mut swarm, "server-honest", &["--claim-throughput", "100"]);
    let claim = record::MAX_THROUGHPUT.to_string();
    let liar_peer = faulty(
        &mut swarm,
        "server-liar",
        &["--claim-throughput", &claim, "--delay-steps-ms", "300"],
    );
    let relay = swarm.relay_addr.clone();
    let (_, golden) = golden();
    let n = golden.len();
    let json = tokio::task::spawn_blocking(move || generate(Some(&relay), n, "info,swarm::remote=debug", &[]))
        .await
        .expect("client thread");
    let stderr = json["stderr"].as_str().unwrap_or_default();
    assert_eq!(token_ids(&json), golden, "{stderr}");
    let route = stderr
        .lines()
        .find(|l| l.contains("session route"))
        .expect("route logged");
    assert!(
        route.contains(&liar_peer),
        "the liar's claim should win the first route: {route}\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("much slower than it claims") && l.contains(&liar_peer)),
        "the liar was never demoted:\n{stderr}"
    );
    let slow = json["timing"]["token_ms"]
        .as_array()
        .expect("token times")
        .iter()
        .filter(|t| t.as_f64().expect("ms") > 250.0)
        .count();
    assert!(slow <= 4, "{slow} tokens took over 250 ms: {}", json["timing"]);
    assert!(!stderr.contains("banned server"), "demoted, not banned: {stderr}");
}

/// `server-faulty` on blocks 0..4 with `extra` flags, its peer id.
fn faulty(swarm: &mut Swarm, name: &str, extra: &[&str]) -> String {
    let addr_file = swarm.dir.join(format!("{name}.addrs"));
    let proc = Proc::spawn(
        name,
        Command::new(bin("server-faulty"))
            .arg("--model")
            .arg(fixture("llama"))
            .args(["--blocks", "0:4", "--initial-peers", &swarm.relay_addr])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
            .arg(&addr_file)
            .args(extra),
    );
    let peer = wait_for_file_lines(&addr_file, 1, STARTUP)[0]
        .rsplit("/p2p/")
        .next()
        .expect("address ends in /p2p/<id>")
        .to_string();
    swarm.servers.push((proc, peer.clone()));
    peer
}

/// `corolla generate` of `n` tokens after the golden prompt, logging as `log` says, with
/// `extra` flags: its JSON output, with its log added as `"stderr"`.
fn generate(relay: Option<&str>, n: usize, log: &str, extra: &[String]) -> serde_json::Value {
    let (prompt, _) = golden();
    let mut cmd = Command::new(bin("corolla"));
    cmd.env("COROLLA_LOG", log)
        .arg("generate")
        .arg("--model")
        .arg(fixture("llama"))
        .args(["--token-ids", &csv(&prompt)])
        .args(["--max-new-tokens", &n.to_string(), "--ignore-eos", "--json"])
        .args(extra);
    if let Some(relay) = relay {
        cmd.args(["--initial-peers", relay]);
    }
    let out = cmd.output().expect("corolla runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "corolla failed: {stderr}");
    let mut json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    json["stderr"] = stderr.into();
    json
}

/// Trials per kind of lie (the issue asks for 200; `TRUST_TRIALS` sets it).
fn trials() -> u64 {
    std::env::var("TRUST_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(200)
}

/// Two honest servers and a liar, all on blocks 0..4; the liar's claim wins every first route,
/// and it corrupts outputs (`corrupt` flags). Over seeded trials of `corolla generate --verify
/// 1`, the liar must be banned in >= 99% of them, never an honest server, and the tokens must
/// be those of the undisturbed (local) run.
fn liar_is_caught(name: &str, corrupt: &[&str], tokens: usize) {
    let mut swarm = Swarm::start(name);
    // Modest claims (10 tokens/s: 25 ms a block, the liar's capped claim 4x less), so that
    // claims, not loopback round-trip noise, choose the first route.
    let honest = [
        faulty(&mut swarm, "honest-a", &["--claim-throughput", "10"]),
        faulty(&mut swarm, "honest-b", &["--claim-throughput", "10"]),
    ];
    let mut flags = vec!["--claim-throughput", "1000"];
    flags.extend_from_slice(corrupt);
    let liar = faulty(&mut swarm, "liar", &flags);
    let undisturbed = generate(None, tokens, "warn", &[])["token_ids"].clone();
    let n = trials();
    let relay = swarm.relay_addr.clone();
    let results: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let relay = &relay;
                scope.spawn(move || {
                    (0..n)
                        .filter(|t| t % 4 == w)
                        .map(|t| {
                            let seed = t.to_string();
                            generate(
                                Some(relay),
                                tokens,
                                "warn,swarm::remote=info",
                                &["--verify".into(), "1".into(), "--verify-seed".into(), seed],
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("trial thread"))
            .collect()
    });
    let mut caught = 0;
    let mut missed = Vec::new();
    for json in &results {
        assert_eq!(json["token_ids"], undisturbed, "a trial's tokens changed: {json}");
        let banned: Vec<&str> = json["verify"]["banned"]
            .as_array()
            .expect("verify report")
            .iter()
            .map(|p| p.as_str().expect("peer id"))
            .collect();
        for h in &honest {
            assert!(!banned.contains(&h.as_str()), "an honest server was banned: {json}");
        }
        if banned.contains(&liar.as_str()) {
            caught += 1;
        } else {
            missed.push(json);
        }
    }
    eprintln!("{name}: liar banned in {caught} of {n} trials");
    assert!(
        caught as f64 >= 0.99 * n as f64,
        "{name}: the liar ({liar}) was banned in only {caught} of {n} trials; first miss: {}",
        missed.first().map(|j| j.to_string()).unwrap_or_default()
    );
}

#[test]
fn a_server_corrupting_every_output_is_caught() {
    liar_is_caught("liar-gross", &["--corrupt-outputs", "1", "--corrupt-kind", "gross"], 4);
}

#[test]
fn a_server_corrupting_one_output_in_ten_is_caught() {
    liar_is_caught(
        "liar-tenth",
        &["--corrupt-outputs", "0.1", "--corrupt-kind", "gross"],
        // 81 steps: P(no lie at all in a trial) = 0.9^81 = 0.02%.
        80,
    );
}

#[test]
fn a_server_nudging_a_few_elements_is_caught() {
    liar_is_caught(
        "liar-subtle",
        &["--corrupt-outputs", "1", "--corrupt-kind", "subtle"],
        4,
    );
}

/// A server that takes pushed steps and never runs them (or a pusher that claims it pushed)
/// costs the client a short wait per token, never a step timeout: it stops waiting for the
/// pushed output after a few times the hop's expected time, runs the step there itself, and
/// after a few such misses carries every output of the session. Tokens stay golden.
#[test]
fn a_server_that_drops_pushes_costs_no_step_timeout() {
    let mut swarm = Swarm::start("drop-pushes");
    let model = fixture("llama");
    swarm.server(&model, "0:2", &[]);
    swarm.start_server("server-faulty", &model, &["--blocks", "2:3", "--drop-pushes"], &[]);
    swarm.server(&model, "3:4", &[]);
    let (_, golden) = golden();
    let started = std::time::Instant::now();
    let json = generate(Some(&swarm.relay_addr), golden.len(), "info,swarm=debug", &[]);
    let elapsed = started.elapsed();
    let stderr = json["stderr"].as_str().unwrap_or_default().to_string();
    assert_eq!(token_ids(&json), golden, "{stderr}");
    assert!(stderr.contains("route linked for pushes"), "the route pushes: {stderr}");
    assert!(
        stderr.contains("a pushed output is late"),
        "the dropped pushes were noticed: {stderr}"
    );
    assert!(
        stderr.contains("pushed outputs keep not arriving"),
        "the session stopped pushing: {stderr}"
    );
    assert!(!stderr.contains("banned server"), "nobody is banned for it: {stderr}");
    // Liveness, not speed: one step timeout (60 s) alone would exceed this.
    assert!(elapsed < Duration::from_secs(45), "took {elapsed:?}: {stderr}");
}

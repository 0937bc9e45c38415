//! A changing swarm: servers that rebalance (`--balance-period`, `--balance-quality`) spread
//! out from one window and re-cover the blocks of a server that died; under churn (servers
//! joining, leaving cleanly, dying by kill -9) every generation still gives the undisturbed
//! tokens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corolla_tests::{
    Swarm, bin, csv, deep_fixture, free_port, golden_rows, sample, scrape, try_sample, wait_for_state,
};

/// Blocks of the model the tests run: room for spans of 3 to move in.
const BLOCKS: usize = 8;

fn generate(model: &Path, relay: Option<&str>, prompt: &[u32], new: usize) -> Result<Vec<u64>, String> {
    let mut cmd = Command::new(bin("corolla"));
    cmd.env("COROLLA_LOG", "info")
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--token-ids", &csv(prompt), "--max-new-tokens", &new.to_string()])
        .args(["--ignore-eos", "--json"]);
    if let Some(relay) = relay {
        cmd.args(["--initial-peers", relay]);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(json["token_ids"]
        .as_array()
        .ok_or("no token_ids")?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect())
}

/// Each prompt with the tokens a local run (no swarm) gives for it.
fn references(model: &Path, new: usize) -> Vec<(Vec<u32>, Vec<u64>)> {
    let (prompts, _) = golden_rows("llama");
    prompts
        .into_iter()
        .map(|p| {
            let tokens = generate(model, None, &p, new).expect("local run");
            (p, tokens)
        })
        .collect()
}

/// Generations through the swarm, over and over, until stopped: each result beside what it
/// should have been.
struct Generations {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<(usize, Result<Vec<u64>, String>)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Generations {
    fn start(model: &Path, relay: &str, refs: &Arc<Vec<(Vec<u32>, Vec<u64>)>>, clients: usize, new: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (model, relay, refs) = (model.to_path_buf(), relay.to_string(), refs.clone());
                let (stop, results) = (stop.clone(), results.clone());
                std::thread::spawn(move || {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let which = i % refs.len();
                        let got = generate(&model, Some(&relay), &refs[which].0, new);
                        results.lock().expect("results").push((which, got));
                        i += clients;
                    }
                })
            })
            .collect();
        Self { stop, results, threads }
    }

    fn count(&self) -> usize {
        self.results.lock().expect("results").len()
    }

    /// Stops after the generations in progress; checks every one against its reference.
    fn finish(self, refs: &[(Vec<u32>, Vec<u64>)]) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let results = self.results.lock().expect("results");
        for (n, (which, got)) in results.iter().enumerate() {
            match got {
                Ok(tokens) => assert_eq!(tokens, &refs[*which].1, "generation {n} (prompt {which}) changed"),
                Err(e) => panic!("generation {n} (prompt {which}) failed: {e}"),
            }
        }
        results.len()
    }
}

/// The model's per-block server counts and the spans of the online servers, from the monitor.
fn picture(state: &serde_json::Value) -> (Vec<u64>, Vec<(String, usize, usize)>) {
    let m = &state["models"][0];
    let coverage = m["blocks"]
        .as_array()
        .map(|b| b.iter().map(|x| x["servers"].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let spans = m["servers"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|x| x["state"] == "online")
                .map(|x| {
                    (
                        x["peer_id"].as_str().unwrap_or_default().to_string(),
                        x["start"].as_u64().unwrap_or(0) as usize,
                        x["end"].as_u64().unwrap_or(0) as usize,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (coverage, spans)
}

fn covered_by(state: &serde_json::Value, servers: usize) -> bool {
    let (coverage, spans) = picture(state);
    state["models"][0]["healthy"] == true
        && coverage.len() == BLOCKS
        && coverage.iter().all(|&c| c > 0)
        && spans.len() == servers
}

/// Blocks only `peer` covers among `spans`.
fn sole_blocks(spans: &[(String, usize, usize)], peer: &str) -> usize {
    (0..BLOCKS)
        .filter(|&b| {
            let on: Vec<&String> = spans.iter().filter(|s| s.1 <= b && b < s.2).map(|s| &s.0).collect();
            on.len() == 1 && on[0] == peer
        })
        .count()
}

fn relay_monitor(name: &str) -> (Swarm, u16) {
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    (Swarm::start_with(name, &["--http-listen", &http]), port)
}

/// Rebalancing often. Records live 30 s: the others must see a dead server gone (it does not
/// answer their dials) long before its record expires.
const BALANCING: [&str; 6] = [
    "--balance-period",
    "1",
    "--balance-quality",
    "0.75",
    "--announce-ttl",
    "30",
];

fn model() -> PathBuf {
    deep_fixture("llama", BLOCKS)
}

#[test]
fn servers_on_one_window_spread_and_recover_the_blocks_of_one_that_died() {
    let model = model();
    let refs = Arc::new(references(&model, 24));
    let (mut swarm, port) = relay_monitor("rebalance");
    // Two of the four have memory for one span only: they unload before they load.
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let listeners: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for (i, listen) in listeners.iter().enumerate() {
        let mut args = vec!["--blocks", "0:3", "--metrics-listen", listen];
        args.extend(BALANCING);
        let binary = if i % 2 == 0 {
            "server"
        } else {
            args.push("--no-room-for-two-spans");
            "server-faulty"
        };
        swarm.start_server(binary, &model, &args, &[]);
    }
    let started = Instant::now();
    wait_for_state(port, Duration::from_secs(60), "4 servers covering all 8 blocks", |s| {
        covered_by(s, 4)
    });
    // From now on a client generates throughout: through later moves, the kill, and the
    // others moving to re-cover the dead server's blocks.
    let clients = Generations::start(&model, &swarm.relay_addr, &refs, 1, 24);
    std::thread::sleep(Duration::from_secs(1));
    let spread = wait_for_state(port, Duration::from_secs(30), "4 servers covering all 8 blocks", |s| {
        covered_by(s, 4)
    });
    let (_, spans) = picture(&spread);
    // The one that is alone on the most blocks dies.
    let victim = spans
        .iter()
        .max_by_key(|s| sole_blocks(&spans, &s.0))
        .map(|s| s.0.clone())
        .expect("servers");
    assert!(
        sole_blocks(&spans, &victim) > 0,
        "some server is the only one on a block: {spans:?}"
    );
    let index = swarm
        .servers
        .iter()
        .position(|(_, p)| *p == victim)
        .expect("victim started here");
    let spread_in = started.elapsed();
    swarm.servers[index].0.kill9();
    let killed = Instant::now();
    let healed = wait_for_state(
        port,
        Duration::from_secs(20),
        "the 3 others covering all 8 blocks again",
        |s| covered_by(s, 3),
    );
    let healed_in = killed.elapsed();
    eprintln!(
        "spread over every block {spread_in:.1?} after the last server started; re-covered {healed_in:.1?} after the kill"
    );
    // Each survivor's metrics say where it is, as the monitor does, and count its moves.
    // A survivor may move again while this runs: its counter is read between two counts of
    // the moves its log shows (the counter moves just before the log line is written).
    let mut counted = Vec::new();
    let (_, spans) = picture(&healed);
    for (i, (_, peer)) in swarm.servers.iter().enumerate().filter(|(i, _)| *i != index) {
        let logged_before = count_one(&swarm.servers[i].0.log());
        let text = scrape(ports[i]);
        let mut moves = 0.0;
        let (_, start, end) = spans.iter().find(|s| s.0 == *peer).expect("a survivor in the monitor");
        assert_eq!(
            sample(&text, "corolla_server_span_start") as usize,
            *start,
            "server {i}"
        );
        assert_eq!(sample(&text, "corolla_server_span_end") as usize, *end, "server {i}");
        for outcome in ["both", "drained"] {
            moves += try_sample(
                &text,
                &format!("corolla_server_span_moves_total{{outcome=\"{outcome}\"}}"),
            )
            .unwrap_or(0.0);
        }
        let failed = try_sample(&text, "corolla_server_span_moves_total{outcome=\"failed\"}");
        assert!(failed.is_none(), "server {i}: {failed:?} failed moves");
        counted.push((i, logged_before, moves as usize));
    }
    // At least one generation ran across the moves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while clients.count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = clients.finish(&refs);
    assert!(n >= 2, "only {n} generations finished");
    // Which way each server moved: beside its old span, or after unloading it.
    let count = |what: &str| -> usize { swarm.servers.iter().map(|(p, _)| p.log().matches(what).count()).sum() };
    let (beside, after) = (
        count("the old ones serve their sessions"),
        count("after unloading the old ones"),
    );
    eprintln!("{n} generations; moves: {beside} beside the old span, {after} after unloading it");
    assert!(beside + after >= 3, "servers moved {} times", beside + after);
    for (i, logged_before, moves) in counted {
        let logged_after = count_one(&swarm.servers[i].0.log());
        assert!(
            logged_before <= moves && moves <= logged_after,
            "server {i}: {moves} moves counted in its metrics, its log shows {logged_before} before the scrape and {logged_after} after"
        );
    }
}

/// Moves a server's log shows done.
fn count_one(log: &str) -> usize {
    log.matches("the old ones serve their sessions").count() + log.matches("after unloading the old ones").count()
}

/// A tiny deterministic generator (xorshift) for the churn schedule.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn generations_under_churn_give_the_undisturbed_tokens() {
    let model = model();
    let refs = Arc::new(references(&model, 32));
    let (mut swarm, port) = relay_monitor("churn");
    // Fixed spans (no rebalancing), so the test knows what each departure leaves.
    const SPANS: [&str; 6] = ["0:4", "4:8", "0:3", "3:6", "5:8", "2:6"];
    let mut alive: Vec<(usize, &str)> = Vec::new();
    let join = |swarm: &mut Swarm, alive: &mut Vec<(usize, &str)>, span: &'static str| {
        swarm.start_server("server", &model, &["--blocks", span, "--announce-ttl", "3"], &[]);
        alive.push((swarm.servers.len() - 1, span));
    };
    for span in ["0:4", "4:8", "0:3", "3:6", "5:8"] {
        join(&mut swarm, &mut alive, span);
    }
    wait_for_state(port, Duration::from_secs(30), "5 servers", |s| covered_by(s, 5));
    let clients = Generations::start(&model, &swarm.relay_addr, &refs, 2, 32);
    let covers = |spans: &[&str]| {
        (0..BLOCKS).all(|b| {
            spans.iter().any(|s| {
                let (a, e) = s.split_once(':').expect("START:END");
                a.parse::<usize>().expect("start") <= b && b < e.parse::<usize>().expect("end")
            })
        })
    };
    let mut rng = Seeded(0x5eed_c0de);
    let (mut joins, mut leaves, mut kills) = (0, 0, 0);
    let started = Instant::now();
    // About a minute and a half of churn, or until 20 generations are done (at most 3 min).
    while (started.elapsed() < Duration::from_secs(90) || clients.count() < 20)
        && started.elapsed() < Duration::from_secs(180)
    {
        std::thread::sleep(Duration::from_millis(1500 + 500 * rng.below(4) as u64));
        let event = rng.below(3);
        if event == 0 || alive.len() < 4 {
            join(&mut swarm, &mut alive, SPANS[rng.below(SPANS.len())]);
            joins += 1;
            continue;
        }
        // Someone leaves whose blocks the others still cover.
        let candidates: Vec<usize> = (0..alive.len())
            .filter(|&i| {
                let rest: Vec<&str> = alive
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, a)| a.1)
                    .collect();
                covers(&rest)
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let (server, _) = alive.remove(candidates[rng.below(candidates.len())]);
        if event == 1 {
            swarm.servers[server].0.terminate();
            leaves += 1;
        } else {
            swarm.servers[server].0.kill9();
            kills += 1;
        }
    }
    let n = clients.finish(&refs);
    assert!(n >= 20, "{n} generations in {:?}", started.elapsed());
    assert!(
        joins > 0 && leaves > 0 && kills > 0,
        "{joins} joins, {leaves} leaves, {kills} kills"
    );
    eprintln!(
        "{n} generations, {joins} joins, {leaves} clean leaves, {kills} kill -9 in {:?}",
        started.elapsed()
    );
}

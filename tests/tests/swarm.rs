//! The swarm across real processes on 127.0.0.1: a relay, servers hosting overlapping spans,
//! and `corolla generate --initial-peers`, checked against local runs and the fixtures.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use corolla_tests::{Proc, STARTUP, Swarm, bin, csv, fixture, golden_rows, wait_for_file_lines};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn local(model: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("corolla"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(args)
        .arg("--json")
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn three_overlapping_servers_match_local_and_golden() {
    for family in ["llama", "bloom", "mixtral"] {
        let model = fixture(family);
        let mut swarm = Swarm::start(family);
        for blocks in ["0:2", "1:4", "2:4"] {
            swarm.server(&model, blocks, &[]);
        }
        let (inputs, generated) = golden_rows(family);
        for (row, prompt) in inputs.iter().enumerate() {
            let new = (generated[row].len() - prompt.len()).to_string();
            let args = ["--token-ids", &csv(prompt), "--max-new-tokens", &new, "--ignore-eos"];
            let (remote, _) = swarm.generate(&model, &args);
            assert_eq!(
                ids(&remote["token_ids"]),
                generated[row][prompt.len()..],
                "{family} row {row}"
            );
            let here = local(&model, &args);
            for field in ["prompt_ids", "token_ids", "text"] {
                assert_eq!(remote[field], here[field], "{family} row {row}: swarm vs local {field}");
            }
            let mut spread = args.to_vec();
            spread.extend(["--routing", "throughput"]);
            let (batchy, _) = swarm.generate(&model, &spread);
            assert_eq!(
                batchy["token_ids"], remote["token_ids"],
                "{family} row {row}: throughput routing"
            );
        }
    }
}

/// Speculative decoding through the swarm (the servers roll their caches back to what was
/// accepted) gives transformers' greedy tokens on every family, with prompt lookup (always, and
/// with `--adaptive-drafts`) and with a draft model; `--json` reports the steps and the
/// acceptance.
#[test]
fn speculative_decoding_through_the_swarm_matches_golden() {
    let (mut proposed, mut accepted) = (0.0, 0.0);
    for family in ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"] {
        let model = fixture(family);
        let mut swarm = Swarm::start(&format!("spec-{family}"));
        swarm.server(&model, "0:2", &[]);
        swarm.server(&model, "2:4", &[]);
        let (inputs, generated) = golden_rows(family);
        for (row, prompt) in inputs.iter().enumerate() {
            let new = (generated[row].len() - prompt.len()).to_string();
            let model_arg = model.to_string_lossy().into_owned();
            let mut runs = vec![vec!["--speculative", "4"]];
            if row == 0 {
                runs.push(vec!["--speculative", "3", "--draft", &model_arg]);
            } else {
                // Drafting only while it pays changes which steps draft, never the tokens.
                runs.push(vec!["--speculative", "4", "--adaptive-drafts"]);
            }
            for extra in runs {
                let ids_arg = csv(prompt);
                let mut args = vec!["--token-ids", &ids_arg, "--max-new-tokens", &new, "--ignore-eos"];
                args.extend(&extra);
                let (out, log) = swarm.generate(&model, &args);
                assert_eq!(
                    ids(&out["token_ids"]),
                    generated[row][prompt.len()..],
                    "{family} row {row} {extra:?}: {log}"
                );
                let timing = &out["timing"];
                let steps = timing["decode_steps"].as_f64().expect("decode_steps");
                let per_step = timing["accepted_per_step"].as_f64().expect("accepted_per_step");
                let tokens = out["token_ids"].as_array().expect("ids").len() as f64;
                assert_eq!(steps * (1.0 + per_step), tokens - 1.0, "{family} {extra:?}: {timing}");
                if extra.contains(&"--draft") {
                    // The model drafting for itself: every draft is kept.
                    assert_eq!(timing["acceptance_rate"].as_f64(), Some(1.0), "{family}: {timing}");
                } else if let Some(rate) = timing["acceptance_rate"].as_f64() {
                    accepted += rate * steps;
                    proposed += steps;
                }
            }
        }
    }
    // Prompt lookup on the fixtures' repetitive outputs: some drafts kept, some rolled back.
    assert!(
        accepted > 0.0 && accepted < proposed,
        "prompt lookup: {accepted} of {proposed}"
    );
}

/// A server dies (kill -9) in the middle of a generation; another covers its blocks.
#[test]
fn failover_after_kill9_gives_the_same_tokens() {
    failover_after_kill9("failover", &[]);
}

/// The same with speculative decoding: the replacement gets the accepted history only.
#[test]
fn speculative_failover_after_kill9_gives_the_same_tokens() {
    failover_after_kill9("spec-failover", &["--speculative", "4"]);
}

fn failover_after_kill9(name: &str, extra: &[&str]) {
    let model = fixture("llama");
    let mut swarm = Swarm::start(name);
    let a = swarm.server(&model, "0:4", &[]);
    let b = swarm.server(&model, "0:4", &[]);
    swarm.server(&model, "0:2", &[]);
    let mut args = vec!["--token-ids", "1,2,3,4,5", "--max-new-tokens", "240", "--ignore-eos"];
    let undisturbed = local(&model, &args);
    args.extend(extra);
    let (tokens, _) = swarm.generate_through_a_kill(&model, &args, 3, |servers, route| {
        [&a, &b]
            .into_iter()
            .position(|peer| route.contains(peer.as_str()))
            .or_else(|| servers.iter().position(|(_, p)| route.contains(p.as_str())))
            .expect("the route uses one of the servers")
    });
    assert_eq!(tokens, ids(&undisturbed["token_ids"]));
}

/// A server reachable only through the relay (`/p2p-circuit`) serves a session.
#[test]
fn relay_only_server_serves_a_session() {
    let model = fixture("qwen2");
    let mut swarm = Swarm::start("circuit");
    let circuit = format!("{}/p2p-circuit", swarm.relay_addr);
    swarm.server(&model, "0:4", &["--listen", &circuit]);
    let addrs = std::fs::read_to_string(swarm.dir.join("server0.addrs")).expect("addrs");
    assert!(
        addrs.lines().all(|a| a.contains("/p2p-circuit/")),
        "relay-only addresses: {addrs}"
    );
    let (inputs, generated) = golden_rows("qwen2");
    let args = [
        "--token-ids",
        &csv(&inputs[0]),
        "--max-new-tokens",
        "10",
        "--ignore-eos",
    ];
    let (remote, _) = swarm.generate(&model, &args);
    assert_eq!(ids(&remote["token_ids"]), generated[0][inputs[0].len()..]);
}

/// A server that stops announcing (killed) is gone from routing once its records expire.
/// `server --quant int8` serves the blocks of `corolla generate --quant int8` (the same Q8_0
/// matrices, multiplied by the same kernels), under the unquantized model's fingerprint.
#[test]
fn quantized_server_matches_the_locally_quantized_model() {
    let model = fixture("llama");
    let mut swarm = Swarm::start("quant-server");
    swarm.server(&model, "0:4", &["--quant", "int8"]);
    for extra in [&[][..], &["--temperature", "1.0", "--seed", "7"][..]] {
        let mut args = vec!["--token-ids", "1,2,3,4,5", "--max-new-tokens", "12", "--quant", "int8"];
        args.extend_from_slice(extra);
        let (remote, _) = swarm.generate(&model, &args);
        assert_eq!(ids(&remote["token_ids"]), ids(&local(&model, &args)["token_ids"]));
    }
    let log = swarm.servers[0].0.log();
    assert!(log.contains("quant=Some(Q8_0)"), "{log}");
}

#[test]
fn servers_that_stop_announcing_expire() {
    let model = fixture("llama");
    let mut swarm = Swarm::start("expiry");
    let a = swarm.server(&model, "0:4", &["--announce-ttl", "3"]);
    let b = swarm.server(&model, "0:4", &["--announce-ttl", "3"]);
    swarm.servers[0].0.kill9();
    std::thread::sleep(Duration::from_secs(4));
    for _ in 0..3 {
        let (out, log) = swarm.generate(&model, &["--token-ids", "1,2,3", "--max-new-tokens", "4"]);
        assert_eq!(ids(&out["token_ids"]).len(), 4);
        let route = log.lines().find(|l| l.contains("session route")).expect("route logged");
        assert!(route.contains(&b) && !route.contains(&a), "{route}");
        assert!(
            !log.contains("re-routing"),
            "the dead server must not even be tried: {log}"
        );
    }
}

/// SmolLM2 split over two servers gives transformers' greedy tokens.
#[test]
fn smollm2_over_two_servers_matches_the_golden_tokens() {
    let model = PathBuf::from(
        std::env::var("COROLLA_SMOLLM2_GGUF")
            .expect("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches SmolLM2 and sets it)"),
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-golden.json")).expect("golden")).expect("json");
    let mut swarm = Swarm::start("smollm2");
    swarm.server(&model, "0:15", &[]);
    swarm.server(&model, "15:30", &[]);
    let case = &golden["cases"]["story"];
    let (out, log) = swarm.generate(
        &model,
        &[
            "--prompt",
            case["prompt"].as_str().expect("prompt"),
            "--max-new-tokens",
            "32",
        ],
    );
    assert_eq!(ids(&out["token_ids"]), ids(&case["greedy_ids"]), "{log}");
    assert_eq!(out["text"], case["greedy_text"]);
    // Speculative decoding, through the swarm and locally, on both golden prompts.
    for (name, case) in golden["cases"].as_object().expect("cases") {
        let new = ids(&case["greedy_ids"]).len().to_string();
        let prompt = csv(&ids(&case["prompt_ids"]));
        let args = ["--token-ids", &prompt, "--max-new-tokens", &new, "--speculative", "4"];
        let (out, log) = swarm.generate(&model, &args);
        assert_eq!(
            ids(&out["token_ids"]),
            ids(&case["greedy_ids"]),
            "{name} through the swarm: {log}"
        );
        assert!(
            out["timing"]["accepted_per_step"].as_f64().is_some(),
            "{}",
            out["timing"]
        );
        let here = local(&model, &args);
        assert_eq!(ids(&here["token_ids"]), ids(&case["greedy_ids"]), "{name} locally");
    }
}

/// Without `--blocks`, a server takes the blocks the swarm serves least (Petals' rule).
#[test]
fn num_blocks_fills_the_least_served_blocks() {
    let model = fixture("falcon");
    let mut swarm = Swarm::start("placement");
    swarm.server(&model, "0:2", &[]);
    let n = swarm.servers.len();
    let addr_file = swarm.dir.join("auto.addrs");
    let proc = Proc::spawn(
        "server-auto",
        Command::new(bin("server"))
            .arg("--model")
            .arg(&model)
            .args([
                "--num-blocks",
                "2",
                "--initial-peers",
                &swarm.relay_addr,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .arg("--addr-file")
            .arg(&addr_file),
    );
    wait_for_file_lines(&addr_file, 1, STARTUP);
    let log = proc.log();
    let chose = log
        .lines()
        .find(|l| l.contains("chose blocks"))
        .expect("placement logged");
    assert!(chose.contains("start=2") && chose.contains("end=4"), "{chose}");
    swarm.servers.push((proc, String::new()));
    assert_eq!(swarm.servers.len(), n + 1);
    let (inputs, generated) = golden_rows("falcon");
    let args = [
        "--token-ids",
        &csv(&inputs[1]),
        "--max-new-tokens",
        "10",
        "--ignore-eos",
    ];
    let (remote, _) = swarm.generate(&model, &args);
    assert_eq!(ids(&remote["token_ids"]), generated[1][inputs[1].len()..]);
}

/// Errors a user can act on: a relay that does not answer, blocks nobody serves.
#[test]
fn actionable_errors() {
    let model = fixture("llama");
    let run = |peers: &str| {
        Command::new(bin("corolla"))
            .arg("generate")
            .arg("--model")
            .arg(&model)
            .args([
                "--token-ids",
                "1,2,3",
                "--max-new-tokens",
                "2",
                "--json",
                "--initial-peers",
                peers,
            ])
            .output()
            .expect("corolla runs")
    };
    // Nothing listens on this port (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = run(&format!(
        "/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWS9AxktYkuzzg5GCqqisJJWjtDy39Kaa9ncjP8tXnvZbN"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("relay unreachable"), "{stderr}");

    let mut swarm = Swarm::start("gap");
    swarm.server(&model, "0:2", &[]);
    let out = run(&swarm.relay_addr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no server for blocks 2..4"), "{stderr}");
}

/// A 20,000-token prompt goes to the servers in chunks; the server in use is killed after the
/// first new token, and its replacement gets the 20,000-token history replayed in chunks: the
/// tokens are those of an undisturbed local run.
#[test]
fn a_20k_token_session_fails_over_in_chunks() {
    let model = corolla_tests::long_context_fixture("llama", 32768);
    // A seeded pseudo-random prompt over the fixture's 384-token vocabulary.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let prompt: Vec<u32> = (0..20_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 384) as u32
        })
        .collect();
    let prompt = csv(&prompt);
    let args = [
        "--token-ids",
        prompt.as_str(),
        "--max-new-tokens",
        "200",
        "--ignore-eos",
    ];
    let undisturbed = local(&model, &args);

    let mut swarm = Swarm::start("long-failover");
    let a = swarm.server(&model, "0:4", &[]);
    let b = swarm.server(&model, "0:4", &[]);
    let log = swarm.dir.join("client.log");
    let mut client = Command::new(bin("corolla"))
        .env("COROLLA_LOG", "info")
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(args)
        .args(["--initial-peers", &swarm.relay_addr])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("corolla runs");
    let mut stdout = client.stdout.take().expect("piped");
    // The first token comes after the whole prompt went through the servers.
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.contains(&b' ') {
        assert_eq!(stdout.read(&mut byte).expect("read"), 1, "client ended early");
        seen.push(byte[0]);
    }
    let route = std::fs::read_to_string(&log).expect("client log");
    let route_line = route
        .lines()
        .find(|l| l.contains("session route"))
        .expect("route logged");
    let victim = [&a, &b]
        .into_iter()
        .position(|peer| route_line.contains(peer.as_str()))
        .expect("the route uses one of the servers");
    swarm.servers[victim].0.kill9();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read");
    let status = client.wait().expect("exits");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{log}");
    seen.extend(rest);
    let tokens: Vec<u32> = String::from_utf8(seen)
        .expect("utf-8")
        .split_whitespace()
        .map(|t| t.parse().expect("token id"))
        .collect();
    assert_eq!(tokens, ids(&undisturbed["token_ids"]));
    let replayed = log
        .lines()
        .find(|l| l.contains("session re-routed"))
        .unwrap_or_else(|| panic!("the client must have failed over: {log}"));
    // 20,000 prompt tokens in pieces of at most 1,024, plus the decoded tokens.
    let pieces: usize = replayed
        .split("replayed_pieces=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("replayed_pieces logged");
    assert!(
        pieces >= 20,
        "the 20,000-token history was replayed in {pieces} pieces: {replayed}"
    );
}

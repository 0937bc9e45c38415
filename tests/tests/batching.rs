//! Continuous batching on a real server: 8 concurrent `corolla generate` runs (different
//! prompts, lengths and start times) through one server each give the tokens they give alone
//! (the fixture's golden tokens where it has them), while the server's Prometheus metrics
//! (`--metrics-listen`) show forwards of more than one session, and every session's cache is
//! given back afterwards. The relay's metrics count the server's connection and record.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use corolla_tests::{Swarm, bin, csv, fixture, free_port, golden_rows, sample, scrape, token_ids, try_sample};

fn generate(model: &Path, args: &[String], peers: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(bin("corolla"));
    cmd.arg("generate").arg("--model").arg(model).args(args).arg("--json");
    if let Some(peers) = peers {
        cmd.args(["--initial-peers", peers]);
    }
    let out = cmd.output().expect("corolla runs");
    assert!(
        out.status.success(),
        "corolla failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn check(family: &str) {
    let model = fixture(family);
    let (inputs, generated) = golden_rows(family);
    let relay_port = free_port();
    let relay_metrics = format!("127.0.0.1:{relay_port}");
    let mut swarm = Swarm::start_with(&format!("batching-{family}"), &["--metrics-listen", &relay_metrics]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    swarm.server(
        &model,
        "0:4",
        &[
            "--metrics-listen",
            &metrics,
            "--batch-wait-ms",
            "20",
            "--cache-tokens",
            "4096",
        ],
    );
    let before = scrape(port);
    let cache_tokens = sample(&before, "corolla_server_cache_tokens");

    // Four runs of the golden rows, four of shorter prompts and other lengths (checked
    // against the same run alone, in-process, no server).
    let mut runs: Vec<(Vec<String>, Option<Vec<u32>>)> = Vec::new();
    for i in 0..8 {
        let row = i % 2;
        let (prompt, max_new, golden) = if i < 4 {
            let new = generated[row].len() - inputs[row].len();
            (
                inputs[row].clone(),
                new,
                Some(generated[row][inputs[row].len()..].to_vec()),
            )
        } else {
            (inputs[row][..3 + i].to_vec(), 14 + 2 * i, None)
        };
        let args = vec![
            "--token-ids".to_string(),
            csv(&prompt),
            "--max-new-tokens".into(),
            max_new.to_string(),
            "--ignore-eos".into(),
        ];
        runs.push((args, golden));
    }
    let alone: Vec<Vec<u32>> = runs
        .iter()
        .map(|(args, _)| token_ids(&generate(&model, args, None)))
        .collect();

    let started = Instant::now();
    let threads: Vec<_> = runs
        .iter()
        .enumerate()
        .map(|(i, (args, _))| {
            let (model, args, relay) = (model.clone(), args.clone(), swarm.relay_addr.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * i as u64));
                token_ids(&generate(&model, &args, Some(&relay)))
            })
        })
        .collect();
    for (i, (thread, (_, golden))) in threads.into_iter().zip(&runs).enumerate() {
        let tokens = thread.join().expect("generation thread");
        assert_eq!(tokens, alone[i], "{family} run {i}: batched vs alone");
        if let Some(golden) = golden {
            assert_eq!(&tokens, golden, "{family} run {i}: golden tokens");
        }
    }
    eprintln!("{family}: 8 concurrent runs in {:?}", started.elapsed());

    // Sessions end as their clients close; the cache comes back to full.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let text = scrape(port);
        if sample(&text, "corolla_server_free_cache_tokens") == cache_tokens || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(&after, "corolla_server_free_cache_tokens"),
        cache_tokens,
        "{after}"
    );
    assert_eq!(sample(&after, "corolla_server_sessions"), 0.0, "{after}");
    let forwards = sample(&after, "corolla_server_batch_size_count");
    let single = sample(&after, "corolla_server_batch_size_bucket{le=\"1.0\"}");
    let steps = sample(&after, "corolla_server_steps_total");
    let sessions = sample(&after, "corolla_server_requests_total{protocol=\"session\"}");
    eprintln!("{family}: {steps} steps of {sessions} sessions in {forwards} forwards, {single} of one step");
    assert!(sessions >= 8.0, "{after}");
    assert!(
        forwards > single,
        "{family}: no forward ran more than one session's step\n{after}"
    );
    assert!(
        forwards < steps,
        "{family}: batching saved no forward ({forwards} forwards for {steps} steps)"
    );
    assert!(sample(&after, "corolla_server_tokens_total") > 0.0);
    assert!(sample(&after, "corolla_server_connections") >= 1.0, "{after}");
    let relay = scrape(relay_port);
    assert!(sample(&relay, "corolla_relay_connections") >= 1.0, "{relay}");
    assert!(sample(&relay, "corolla_relay_dht_stored_total") >= 1.0, "{relay}");
    assert_eq!(sample(&relay, "corolla_relay_circuits"), 0.0, "{relay}");
}

#[test]
fn concurrent_sessions_are_batched_and_give_their_tokens() {
    for family in ["llama", "bloom", "mixtral"] {
        check(family);
    }
}

/// One server pushing for many clients' sessions (their steps batched, so their outputs go
/// out together) is not one greedy peer to the next server: the next server takes every
/// pushed step, though it allows each peer one request at a time, and runs it on its client's
/// budget. Tokens stay golden and no client waits for a push that was refused.
#[test]
fn one_server_pushing_for_many_clients_is_not_one_greedy_peer() {
    let model = fixture("llama");
    let (inputs, generated) = golden_rows("llama");
    let mut swarm = Swarm::start("push-many-clients");
    swarm.server(&model, "0:2", &["--batch-wait-ms", "20"]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    swarm.server(
        &model,
        "2:4",
        &["--max-requests-per-peer", "1", "--metrics-listen", &metrics],
    );
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let row = i % 2;
            let prompt = inputs[row].clone();
            let golden = generated[row][prompt.len()..].to_vec();
            let (model, relay) = (model.clone(), swarm.relay_addr.clone());
            std::thread::spawn(move || {
                let out = Command::new(bin("corolla"))
                    .env("COROLLA_LOG", "info,swarm=debug")
                    .arg("generate")
                    .arg("--model")
                    .arg(&model)
                    .args(["--token-ids", &csv(&prompt), "--ignore-eos", "--json"])
                    .args(["--max-new-tokens", &golden.len().to_string()])
                    .args(["--initial-peers", &relay])
                    .output()
                    .expect("corolla runs");
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success(), "corolla failed: {stderr}");
                let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
                (token_ids(&json), golden, stderr)
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let (tokens, golden, stderr) = thread.join().expect("generation thread");
        assert_eq!(tokens, golden, "run {i}: {stderr}");
        assert!(stderr.contains("route linked for pushes"), "run {i} pushes: {stderr}");
        assert!(
            !stderr.contains("a pushed output is late"),
            "run {i} waited for a refused push: {stderr}"
        );
    }
    let text = scrape(port);
    assert_eq!(
        try_sample(&text, "corolla_server_errors_total{kind=\"busy\"}"),
        None,
        "{text}"
    );
    // Every decode step after the first reached the second server by push.
    let pushed = sample(&text, "corolla_server_pushed_steps_total");
    eprintln!("the second server took {pushed} pushed steps of 4 sessions");
    assert!(pushed >= 4.0 * 4.0, "{pushed} pushed steps\n{text}");
}

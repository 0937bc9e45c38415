//! `corolla api` through the official OpenAI Python client (tests/api/openai_client.py, in the
//! venv scripts/test.sh makes: COROLLA_OPENAI_PYTHON) over a real swarm on 127.0.0.1: a relay
//! and two SmolLM2 servers. Greedy replies, streamed and whole, equal `corolla generate --chat
//! --temperature 0` (also with presence and frequency penalties); errors raise the client's
//! matching exceptions; a client that disconnects mid-stream frees the servers' sessions and
//! caches; with a block range uncovered, 503.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corolla_tests::{Proc, STARTUP, Swarm, bin, smollm2, wait_for_file_lines};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::Value;
use swarm::node::{self, Client, NodeConfig};

const PROMPT: &str = "What is the capital of France?";
const MAX_TOKENS: usize = 24;
const KEY: &str = "test-key";

fn python() -> PathBuf {
    std::env::var_os("COROLLA_OPENAI_PYTHON")
        .map(PathBuf::from)
        .expect("set COROLLA_OPENAI_PYTHON to a python with the openai package (scripts/test.sh makes the venv)")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("api/openai_client.py")
}

/// A prompt whose greedy reply repeats tokens (", "), so the penalties change it.
const PENALTY_PROMPT: &str = "Count from 1 to 10, separated by commas.";
/// The presence and frequency penalties of the penalised chat.
const PRESENCE: &str = "0.5";
const FREQUENCY: &str = "1.5";

/// What `corolla generate --chat --temperature 0` prints for the prompt (with `extra`).
fn native_text(prompt: &str, extra: &[&str]) -> String {
    let out = Command::new(bin("corolla"))
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--chat", "--prompt", prompt, "--temperature", "0"])
        .args(["--max-new-tokens", &MAX_TOKENS.to_string()])
        .args(extra)
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

fn client_command(mode: &str, base: &str, model: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .arg(mode)
        .env("API_BASE", base)
        .env("API_KEY", KEY)
        .env("MODEL", model)
        .env("PROMPT", PROMPT)
        .env("MAX_TOKENS", MAX_TOKENS.to_string())
        .env("PENALTY_PROMPT", PENALTY_PROMPT)
        .env("PRESENCE", PRESENCE)
        .env("FREQUENCY", FREQUENCY);
    cmd
}

/// Runs the client in `mode` to the end; its last stdout line is JSON.
fn run_client(mode: &str, base: &str, model: &str) -> Value {
    let out = client_command(mode, base, model).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client ({mode}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON")
}

async fn observer(swarm: &Swarm) -> Client {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.bootstrap = vec![swarm.relay_addr.parse().expect("addr")];
    let (client, _inbound, event_loop) = node::start(config).expect("node");
    tokio::spawn(event_loop.run());
    for n in 0..swarm.servers.len() {
        for addr in wait_for_file_lines(&swarm.dir.join(format!("server{n}.addrs")), 1, STARTUP) {
            let _ = client.dial(addr.parse::<Multiaddr>().expect("addr")).await;
        }
    }
    client
}

/// Every server's (sessions, free cache tokens, cache tokens).
async fn loads(client: &Client, swarm: &Swarm) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    for (_, peer) in &swarm.servers {
        let info = client.info(peer.parse::<PeerId>().expect("peer")).await.expect("info");
        let load = info.load.expect("load");
        out.push((
            load.sessions as usize,
            load.free_cache_tokens as u64,
            load.cache_tokens as u64,
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_clients_chat_through_the_swarm() {
    let expected = tokio::task::spawn_blocking(|| native_text(PROMPT, &[]))
        .await
        .expect("native");
    let (unpenalized, penalized) = tokio::task::spawn_blocking(|| {
        let penalties = ["--presence-penalty", PRESENCE, "--frequency-penalty", FREQUENCY];
        (
            native_text(PENALTY_PROMPT, &[]),
            native_text(PENALTY_PROMPT, &penalties),
        )
    })
    .await
    .expect("native");
    // Otherwise the check below could not tell a penalty applied from one ignored.
    assert_ne!(penalized, unpenalized, "the penalties change this reply");
    let mut swarm = Swarm::start("api");
    let model = smollm2();
    swarm.server(&model, "0:15", &["--http-listen", "127.0.0.1:0"]);
    swarm.server(&model, "15:30", &[]);
    let addr_file = swarm.dir.join("api.addr");
    let api = Proc::spawn(
        "api",
        Command::new(bin("corolla"))
            .env("COROLLA_LOG", "info")
            .args(["api", "--listen", "127.0.0.1:0", "--api-key", KEY])
            // Speculative decoding on: every reply below must still equal `corolla generate`'s.
            .args(["--speculative", "4"])
            .args(["--initial-peers", &swarm.relay_addr])
            .arg("--cache-dir")
            .arg(swarm.dir.join("cache"))
            .arg("--addr-file")
            .arg(&addr_file),
    );
    let addr = wait_for_file_lines(&addr_file, 1, STARTUP).remove(0);
    let base = format!("http://{addr}/v1");
    let name = model.file_stem().expect("stem").to_string_lossy().into_owned();

    let checks = {
        let (base, name) = (base.clone(), name.clone());
        tokio::task::spawn_blocking(move || run_client("checks", &base, &name))
            .await
            .expect("client")
    };
    eprintln!("checks: {checks:#}");
    assert!(
        checks["models"].as_array().expect("models").iter().any(|m| m == &name),
        "{checks}"
    );
    assert_eq!(checks["chat"]["text"], expected.as_str(), "whole chat");
    assert_eq!(checks["chat"]["object"], "chat.completion");
    assert_eq!(checks["stream"]["text"], expected.as_str(), "streamed chat");
    assert_eq!(
        checks["penalized"],
        penalized.as_str(),
        "presence and frequency penalties"
    );
    assert_eq!(checks["stream"]["first_role"], "assistant");
    assert_eq!(
        checks["stream"]["objects"],
        serde_json::json!(["chat.completion.chunk"])
    );
    assert_eq!(checks["stream"]["finish"].as_array().map(Vec::len), Some(1), "{checks}");
    let usage = &checks["stream"]["usage"];
    assert_eq!(
        usage, &checks["chat"]["usage"],
        "the usage chunk counts what the whole reply does"
    );
    assert!(usage["completion_tokens"].as_u64().unwrap_or(0) >= 1, "{usage}");
    for text in checks["concurrent"].as_array().expect("concurrent") {
        assert_eq!(text, expected.as_str(), "a concurrent chat");
    }
    assert_eq!(checks["completion"]["object"], "text_completion");
    assert_eq!(checks["completion"]["usage"]["completion_tokens"], 8, "{checks}");
    let errors = &checks["errors"];
    for (case, class, status) in [
        ("unknown_model", "NotFoundError", 404),
        ("n2", "BadRequestError", 400),
        ("temperature", "BadRequestError", 400),
        ("wrong_key", "AuthenticationError", 401),
    ] {
        assert_eq!(errors[case]["class"], class, "{case}: {}", errors[case]);
        assert_eq!(errors[case]["status"], status, "{case}: {}", errors[case]);
    }

    // A client that goes away mid-stream: the generation stops and the servers free its cache.
    let observer = observer(&swarm).await;
    let idle = loads(&observer, &swarm).await;
    assert!(idle.iter().all(|(s, free, all)| *s == 0 && free == all), "{idle:?}");
    let mut child = client_command("disconnect", &base, &name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::task::block_in_place(|| lines.next())
        .expect("a line")
        .expect("read");
    assert_eq!(line, "OPEN");
    let busy = loads(&observer, &swarm).await;
    assert!(busy.iter().all(|(s, free, all)| *s == 1 && free < all), "{busy:?}");
    writeln!(stdin, "close").expect("write");
    let line = tokio::task::block_in_place(|| lines.next())
        .expect("a line")
        .expect("read");
    assert_eq!(line, "CLOSED");
    let closed = Instant::now();
    let freed = loop {
        let now = loads(&observer, &swarm).await;
        if now.iter().all(|(s, free, all)| *s == 0 && free == all) {
            break closed.elapsed();
        }
        assert!(closed.elapsed() < Duration::from_secs(10), "caches not freed: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("caches freed {freed:?} after the disconnect");
    writeln!(stdin, "done").expect("write");
    let _ = child.wait();
    assert!(api.log().contains("client went away"), "{}", api.log());

    // Blocks 15..30 without a server: 503, which the client raises as InternalServerError.
    swarm.servers[1].0.kill9();
    let gone = {
        let (base, name) = (base.clone(), name.clone());
        tokio::task::spawn_blocking(move || run_client("unavailable", &base, &name))
            .await
            .expect("client")
    };
    eprintln!("without blocks 15..30: {gone}");
    assert_eq!(gone["error"]["class"], "InternalServerError", "{gone}");
    assert_eq!(gone["error"]["status"], 503, "{gone}");
}

//! The chat page end to end in headless Chromium: a relay serving the built page, servers
//! hosting SmolLM2, and the page (tokenizer, embeddings and LM head on WebGPU through
//! SwiftShader; blocks over libp2p WebRTC) checked token for token against
//! `corolla generate --chat --temperature 0`, also with a server killed mid-reply; the Tune
//! view training prompts through the swarm, checked against `corolla train`; and the page
//! refusing a client bundle tampered with on its way; and the Monitor view showing the swarm
//! healthy, then broken when the only server of some blocks dies.
//!
//! Needs what `scripts/test.sh` prepares: the page built into `dist/` (or `COROLLA_WEB_DIST`),
//! `tests/browser/node_modules` (playwright-core), Chromium at /usr/bin/chromium (or
//! `CHROMIUM`), and the SmolLM2 GGUF in `COROLLA_SMOLLM2_GGUF`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use corolla_tests::{Proc, TamperingProxy, bin, free_port, has_tensors, smollm2, temp_dir, wait_for_file_lines};

const STARTUP: Duration = Duration::from_secs(120);
const PROMPT: &str = "What is the capital of France?";
const MAX_TOKENS: usize = 24;
/// Server flags: serve the client bundle over HTTP.
const BUNDLE: &[&str] = &["--http-listen", "127.0.0.1:0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn web_dist() -> PathBuf {
    let dist = std::env::var_os("COROLLA_WEB_DIST").map_or_else(|| repo().join("dist"), PathBuf::from);
    assert!(
        dist.join("index.html").is_file(),
        "the chat page is not built at {}: run `scripts/build-web.sh` (scripts/test.sh does)",
        dist.display()
    );
    dist
}

/// Where screenshots are kept after the run.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("COROLLA_ARTIFACTS").map_or_else(|| repo().join("target/test-artifacts"), PathBuf::from);
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

struct PageSwarm {
    dir: PathBuf,
    http_port: u16,
    relay_tcp: String,
    _relay: Proc,
    servers: Vec<(Proc, String)>,
}

impl PageSwarm {
    fn start(name: &str) -> PageSwarm {
        Self::start_with(name, &[])
    }

    /// A swarm whose relay gets `extra` arguments (and whose servers get them through
    /// [`Self::server`]'s own).
    fn start_with(name: &str, extra: &[&std::ffi::OsStr]) -> PageSwarm {
        let dir = temp_dir(name);
        let addr_file = dir.join("relay.addrs");
        let http_port = free_port();
        let relay = Proc::spawn(
            "relay",
            Command::new(bin("relay"))
                .args([
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--listen",
                    "/ip4/127.0.0.1/udp/0/webrtc-direct",
                ])
                .arg("--addr-file")
                .arg(&addr_file)
                .args(["--http-listen", &format!("127.0.0.1:{http_port}"), "--web-root"])
                .arg(web_dist())
                .args(extra),
        );
        let addrs = wait_for_file_lines(&addr_file, 2, STARTUP);
        let relay_tcp = addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .expect("a TCP address")
            .clone();
        PageSwarm {
            dir,
            http_port,
            relay_tcp,
            _relay: relay,
            servers: Vec::new(),
        }
    }

    /// Starts a server reachable by browsers (WebRTC-direct) and waits until it is announced.
    fn server(&mut self, blocks: &str, extra: &[&str]) -> String {
        self.server_listening(
            blocks,
            &["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/webrtc-direct"],
            extra,
        )
    }

    fn server_listening(&mut self, blocks: &str, listen: &[&str], extra: &[&str]) -> String {
        let n = self.servers.len();
        let addr_file = self.dir.join(format!("server{n}.addrs"));
        let mut cmd = Command::new(bin("server"));
        cmd.arg("--model")
            .arg(smollm2())
            .args(["--blocks", blocks, "--initial-peers", &self.relay_tcp]);
        for addr in listen {
            cmd.args(["--listen", addr]);
        }
        cmd.arg("--addr-file").arg(&addr_file);
        cmd.args(extra);
        let proc = Proc::spawn(&format!("server{n}-{blocks}"), &mut cmd);
        let addrs = wait_for_file_lines(&addr_file, 1, STARTUP);
        let peer = addrs[0].rsplit("/p2p/").next().expect("/p2p/<id>").to_string();
        self.servers.push((proc, peer.clone()));
        peer
    }

    fn page_url(&self) -> String {
        let prompt: String = PROMPT
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "http://127.0.0.1:{}/?prompt={prompt}&send=1&temperature=0&max_tokens={MAX_TOKENS}",
            self.http_port
        )
    }
}

/// The reply `corolla generate --chat --temperature 0` gives (the reference).
fn native_reply() -> Vec<u64> {
    native_chat(PROMPT, MAX_TOKENS, &[])
}

/// Runs the page in Chromium; `on_pause(route peers)` runs once the reply has `pause_at`
/// tokens, while the page waits.
fn run_page(
    url: &str,
    screenshot: &Path,
    pause_at: Option<usize>,
    mut on_pause: impl FnMut(&[String]),
) -> serde_json::Value {
    let pause = pause_at.map(|n| n.to_string());
    let mut env: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("PAGE_URL", url.as_ref()),
        ("SCREENSHOT", screenshot.as_os_str()),
        ("TIMEOUT_MS", "600000".as_ref()),
    ];
    if let Some(n) = &pause {
        env.push(("PAUSE_AT_TOKENS", n.as_ref()));
    }
    drive("chat.mjs", &env, |line| {
        let peers: Vec<String> = line
            .strip_prefix("PAUSE ")?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        on_pause(&peers);
        Some("go")
    })
}

fn tokens_of(result: &serde_json::Value) -> Vec<u64> {
    numbers(&result["tokens"]).into_iter().map(|x| x as u64).collect()
}

#[test]
fn the_page_chats_on_webgpu_with_the_native_tokens() {
    let expected = native_reply();
    let mut swarm = PageSwarm::start("browser-chat");
    swarm.server("0:15", BUNDLE);
    swarm.server("15:30", &[]);
    let shot = artifacts().join("chat.png");
    let result = run_page(&swarm.page_url(), &shot, None, |_| {});
    eprintln!("page result: {result}");
    assert_eq!(result["error"], false, "the reply failed: {}", result["status"]);
    assert_eq!(
        tokens_of(&result),
        expected,
        "page reply {:?} differs from native",
        result["text"]
    );
    let device = result["device"].as_str().expect("device");
    assert!(device.starts_with("WebGPU"), "the page did not use WebGPU: {device}");
    assert!(shot.is_file(), "no screenshot at {}", shot.display());
    // The page speculates by default (prompt lookup, 4 drafts): fewer steps than tokens.
    let spec = &result["speculation"];
    let steps = spec["steps"].as_u64().expect("steps");
    assert!(steps > 0 && spec["drafted"].as_u64() > Some(0), "{spec}");
    let after_first = expected.len() as u64 - 1;
    // Each token after the first comes from a step or a kept draft (a stop token inside kept
    // drafts ends the reply before the rest of them).
    assert!(
        steps <= after_first && steps + spec["accepted"].as_u64().expect("accepted") >= after_first,
        "{spec} for {after_first} tokens after the first"
    );
}

/// The same reply with speculation off (`speculative=0`): every token a step of its own.
#[test]
fn the_page_without_speculation_gives_the_same_tokens() {
    let expected = native_reply();
    let mut swarm = PageSwarm::start("browser-nospec");
    swarm.server("0:15", BUNDLE);
    swarm.server("15:30", &[]);
    let shot = artifacts().join("chat-nospec.png");
    let result = run_page(&format!("{}&speculative=0", swarm.page_url()), &shot, None, |_| {});
    assert_eq!(result["error"], false, "the reply failed: {}", result["status"]);
    assert_eq!(tokens_of(&result), expected);
    let spec = &result["speculation"];
    assert_eq!(spec["drafted"].as_u64(), Some(0), "{spec}");
    assert_eq!(spec["steps"].as_u64(), Some(expected.len() as u64 - 1), "{spec}");
}

/// The Monitor view draws the relay's `/corolla/v1/state`: healthy with both servers online,
/// then broken (blocks 15..30 uncovered, their server unreachable) once that server is killed.
#[test]
fn the_monitor_view_shows_the_swarm_healthy_then_broken() {
    let mut swarm = PageSwarm::start("browser-monitor");
    let first = swarm.server("0:15", &["--public-name", "first"]);
    let second = swarm.server("15:30", &["--public-name", "second"]);
    let url = format!("http://127.0.0.1:{}/?view=monitor", swarm.http_port);
    let (healthy_shot, broken_shot) = (
        artifacts().join("monitor-healthy.png"),
        artifacts().join("monitor-broken.png"),
    );
    let env: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("PAGE_URL", url.as_ref()),
        ("SERVERS", "2".as_ref()),
        ("SCREENSHOT_HEALTHY", healthy_shot.as_os_str()),
        ("SCREENSHOT_BROKEN", broken_shot.as_os_str()),
        ("TIMEOUT_MS", "60000".as_ref()),
    ];
    let result = drive("monitor.mjs", &env, |line| {
        (line == "PAUSE healthy").then(|| {
            swarm.servers[1].0.kill9();
            "go"
        })
    });
    eprintln!("monitor: {result}");
    let healthy = &result["healthy"];
    assert_eq!(healthy["health"], "healthy");
    assert_eq!(numbers(&healthy["blocks"]), vec![1.0; 30], "every block has one server");
    let rows = healthy["servers"].as_array().expect("server rows");
    let peers: Vec<&str> = rows.iter().filter_map(|r| r["peer"].as_str()).collect();
    assert_eq!(peers, [first.as_str(), second.as_str()]);
    assert!(rows.iter().all(|r| r["state"] == "online"), "{rows:?}");
    assert!(
        rows[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("first") && t.contains("0–15")),
        "{rows:?}"
    );
    let broken = &result["broken"];
    assert_eq!(broken["health"], "broken");
    let blocks = numbers(&broken["blocks"]);
    assert_eq!(blocks[..15], [1.0; 15], "{blocks:?}");
    assert_eq!(blocks[15..], [0.0; 15], "{blocks:?}");
    let dead = broken["servers"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["peer"] == second.as_str()))
        .expect("the dead server is listed while its record lives");
    assert_eq!(dead["state"], "unreachable");
    assert!(
        healthy_shot.is_file() && broken_shot.is_file(),
        "screenshots in {}",
        artifacts().display()
    );
}

/// A private swarm: the page without the key finds no model (its relay connection is dropped
/// for want of a proof, and the records it could read are sealed); with the key in the URL
/// fragment it lists the model, loads its checked bundle, proves the key to the server over
/// WebRTC-direct and chats with the native tokens.
#[test]
fn the_page_chats_in_a_private_swarm_only_with_its_key() {
    let expected = native_reply();
    let key = swarm::private::SwarmKey::generate_file().expect("random key");
    let dir = temp_dir("browser-private-key");
    let key_path = dir.join("swarm.key");
    std::fs::write(&key_path, &key).expect("key file");
    let key_hex = key.lines().nth(2).expect("third line").trim().to_string();
    let mut swarm = PageSwarm::start_with("browser-private", &["--swarm-key".as_ref(), key_path.as_os_str()]);
    let key_arg = key_path.to_str().expect("utf-8 path");
    let mut with_key = BUNDLE.to_vec();
    with_key.extend(["--swarm-key", key_arg]);
    // WebRTC-direct, where the server serves nothing until the page proves the key.
    swarm.server_listening(
        "0:30",
        &["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/webrtc-direct"],
        &with_key,
    );

    let outsider = drive(
        "status.mjs",
        &[
            ("PAGE_URL", swarm.page_url().as_ref()),
            ("WAIT_STATUS", "Error:".as_ref()),
            ("SCREENSHOT", artifacts().join("private-no-key.png").as_os_str()),
            ("TIMEOUT_MS", "120000".as_ref()),
        ],
        |_| None,
    );
    eprintln!("page without the key: {}", outsider["status"]);
    let status = outsider["status"].as_str().unwrap_or_default();
    assert!(status.contains("needs its key: #swarm_key="), "{status}");
    assert_eq!(outsider["assistant_messages"], 0, "{outsider}");
    assert_eq!(outsider["send_disabled"], true, "{outsider}");

    let member = run_page(
        &format!("{}#swarm_key={key_hex}", swarm.page_url()),
        &artifacts().join("chat-private.png"),
        None,
        |_| {},
    );
    eprintln!("page with the key: {member}");
    assert_eq!(
        member["error"], false,
        "the member's reply failed: {}",
        member["status"]
    );
    assert_eq!(
        tokens_of(&member),
        expected,
        "private reply {:?} differs",
        member["text"]
    );
}

#[test]
fn the_reply_survives_a_server_killed_mid_reply() {
    let expected = native_reply();
    let mut swarm = PageSwarm::start("browser-failover");
    swarm.server("0:15", BUNDLE);
    swarm.server("15:30", &[]);
    swarm.server("0:30", &[]);
    let shot = artifacts().join("chat-failover.png");
    let mut killed = None;
    let result = run_page(&swarm.page_url(), &shot, Some(4), |route| {
        // The page shows each hop's peer id by its last 8 characters.
        let first = route.first().expect("the page shows its route");
        let suffix = first.trim_start_matches('…');
        let i = swarm
            .servers
            .iter()
            .position(|(_, peer)| peer.ends_with(suffix))
            .unwrap_or_else(|| panic!("route hop {first} is none of the servers"));
        swarm.servers[i].0.kill9();
        killed = Some(i);
    });
    eprintln!("page result: {result}");
    assert!(killed.is_some(), "no server was killed");
    assert_eq!(result["error"], false, "the reply failed: {}", result["status"]);
    assert_eq!(
        tokens_of(&result),
        expected,
        "reply after failover {:?} differs",
        result["text"]
    );
}

/// A page that must not hold the embeddings and head (forced with `head=remote`, as for a
/// model whose head is too large for a tab) has a server run them, with the same tokens.
#[test]
fn the_page_chats_through_a_servers_head_service() {
    let expected = native_reply();
    let mut swarm = PageSwarm::start("browser-head");
    swarm.server("0:15", &["--http-listen", "127.0.0.1:0", "--serve-head"]);
    swarm.server("15:30", &[]);
    let url = format!("{}&head=remote", swarm.page_url());
    let result = run_page(&url, &artifacts().join("chat-head-service.png"), None, |_| {});
    eprintln!("page result: {result}");
    assert_eq!(result["error"], false, "the reply failed: {}", result["status"]);
    assert_eq!(
        tokens_of(&result),
        expected,
        "head-service reply {:?} differs",
        result["text"]
    );
    let device = result["device"].as_str().expect("device");
    assert!(
        device.contains("head service"),
        "the page did not use head service: {device}"
    );
}

/// Tune view run: deep prompts (the servers add them and return their gradients).
const TUNE_STEPS: usize = 5;
const TUNE_SETTINGS: &str = r#"{"method": "deep-prompt", "prefix": 4, "steps": 5, "lr": 0.02, "batch": 1, "seed": 7}"#;
/// Reply length in the tuned chat (SwiftShader makes every token slow).
const TUNE_REPLY_TOKENS: usize = 12;
const TUNE_CHAT: &str = "What is your name?";
/// Teaches SmolLM2 a new name, in the chat template's own layout.
const TUNE_DATA: &str = concat!(
    r#"{"prompt": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"#,
    r#"<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n", "completion": "My name is Corolla.<|im_end|>"}"#,
    "\n"
);

/// Runs a driver script from tests/browser with `env`; returns its RESULT object. Every other
/// line goes to `on_line`, whose answer (if any) is written back to the driver's stdin.
fn drive(
    script: &str,
    env: &[(&str, &std::ffi::OsStr)],
    mut on_line: impl FnMut(&str) -> Option<&'static str>,
) -> serde_json::Value {
    let driver = repo().join("tests/browser");
    assert!(
        driver.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(driver.join(script))
        .env("TIMEOUT_MS", "900000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("node runs (install Node.js)");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut result = None;
    for line in stdout.lines() {
        let line = line.expect("driver output");
        if let Some(json) = line.strip_prefix("RESULT ") {
            result = Some(serde_json::from_str(json).expect("driver JSON"));
        } else if let Some(answer) = on_line(&line) {
            writeln!(stdin, "{answer}").expect("answer the driver");
        } else {
            eprintln!("driver: {line}");
        }
    }
    let status = child.wait().expect("driver exits");
    assert!(status.success(), "the browser driver failed: {status}");
    let result: serde_json::Value = result.expect("the driver printed a RESULT line");
    assert!(
        result.get("failure").is_none(),
        "the page failed: {}\nstatus: {} / {}\nconsole:\n{}",
        result["failure"],
        result["status"],
        result["tune_status"],
        result["console"]
    );
    result
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// `corolla generate --chat --temperature 0` for `prompt`, with `extra` flags.
fn native_chat(prompt: &str, max_tokens: usize, extra: &[&std::ffi::OsStr]) -> Vec<u64> {
    let out = Command::new(bin("corolla"))
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--chat", "--prompt", prompt, "--temperature", "0", "--json"])
        .args(["--max-new-tokens", &max_tokens.to_string()])
        .args(extra)
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    numbers(&json["token_ids"]).into_iter().map(|x| x as u64).collect()
}

/// The Tune view trains deep prompts in headless Chromium (prompts, gradients and AdamW on
/// WebGPU, blocks on two servers): the loss falls, the curve follows `corolla train` with the
/// same settings, the downloaded file is a `corolla train` state, and chatting with the prompts
/// gives the tokens `corolla generate --prompts` gives with that file.
#[test]
fn the_tune_page_trains_prompts_through_the_swarm() {
    let mut swarm = PageSwarm::start("browser-tune");
    swarm.server("0:15", BUNDLE);
    swarm.server("15:30", &[]);
    let data = swarm.dir.join("name.jsonl");
    std::fs::write(&data, TUNE_DATA).expect("write the dataset");
    let download = swarm.dir.join("page-prompts.safetensors");
    let url = format!(
        "http://127.0.0.1:{}/?view=tune&temperature=0&max_tokens={TUNE_REPLY_TOKENS}",
        swarm.http_port
    );
    let shots = artifacts();
    let result = drive(
        "tune.mjs",
        &[
            ("PAGE_URL", url.as_ref()),
            ("DATA_FILE", data.as_os_str()),
            ("SETTINGS", TUNE_SETTINGS.as_ref()),
            ("CHAT_PROMPT", TUNE_CHAT.as_ref()),
            ("DOWNLOAD", download.as_os_str()),
            ("SCREENSHOT_DIR", shots.as_os_str()),
        ],
        |_| None,
    );
    let mut summary = result.clone();
    summary["console"] = serde_json::Value::Null;
    eprintln!("page result: {summary}");

    let losses = numbers(&result["losses"]);
    assert_eq!(losses.len(), TUNE_STEPS, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    // `corolla train` with these settings goes 2.985 -> 1.904 (-36%).
    assert!(
        losses[TUNE_STEPS - 1] < 0.8 * losses[0],
        "the loss did not fall by a fifth: {losses:?}"
    );
    let points = result["plot_points"].as_str().unwrap_or_default();
    assert_eq!(points.split_whitespace().count(), TUNE_STEPS, "plot: {points:?}");

    // The same run natively (blocks local, CPU). The first step's loss (the same initial
    // prompts) must agree to f32 rounding on another device; later steps only roughly: Adam
    // moves every element by about `lr` whatever its gradient's size, so the sign of
    // near-zero gradients, which rounding decides, already matters after one update.
    let out = swarm.dir.join("native.safetensors");
    let native = Command::new(bin("corolla"))
        .arg("train")
        .arg("--model")
        .arg(smollm2())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "deep-prompt",
            "--prefix-len",
            "4",
            "--lr",
            "0.02",
            "--batch-size",
            "1",
        ])
        .args(["--seed", "7", "--steps", &TUNE_STEPS.to_string(), "--json"])
        .output()
        .expect("corolla runs");
    assert!(native.status.success(), "{}", String::from_utf8_lossy(&native.stderr));
    let native: serde_json::Value = serde_json::from_slice(&native.stdout).expect("JSON");
    let native = numbers(&native["losses"]);
    assert_eq!(native.len(), TUNE_STEPS);
    assert!(
        (losses[0] - native[0]).abs() <= 1e-4 * native[0].abs(),
        "first loss: page {losses:?} vs native {native:?}"
    );
    for (page, native) in losses.iter().zip(&native) {
        assert!(
            (page - native).abs() <= 0.1 * native.abs(),
            "page {losses:?} strays from native {native:?}"
        );
    }

    // The download is a full `corolla train` state of this run.
    let state = shared_model::tuning::TrainState::load(&download).expect("the downloaded prompts load");
    assert_eq!(state.prompts.method, shared_model::tuning::TuningMethod::DeepPrompt);
    assert_eq!(state.prompts.prefix_len(), 4);
    assert_eq!(state.adam.t as usize, TUNE_STEPS);
    let saved: Vec<f64> = state.history.iter().map(|r| f64::from(r.loss)).collect();
    assert_eq!(saved.len(), TUNE_STEPS);
    for (a, b) in saved.iter().zip(&losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "saved {saved:?} vs shown {losses:?}");
    }

    // Chatting with the tuned prompts: the page's reply is `generate --prompts`' with the file.
    assert_eq!(
        result["use_tuned"], true,
        "the chat did not switch to the tuned prompts"
    );
    assert_eq!(result["error"], false, "the tuned reply failed: {}", result["status"]);
    let tuned = native_chat(
        TUNE_CHAT,
        TUNE_REPLY_TOKENS,
        &["--prompts".as_ref(), download.as_os_str()],
    );
    assert_eq!(tokens_of(&result), tuned, "page reply {:?}", result["text"]);
    assert_ne!(
        tuned,
        native_chat(TUNE_CHAT, TUNE_REPLY_TOKENS, &[]),
        "the prompts changed nothing"
    );
    let device = result["device"].as_str().expect("device");
    assert!(device.starts_with("WebGPU"), "the page did not use WebGPU: {device}");
}

/// Changes one letter of the chat template in the full bundle (the one with tensors), leaving
/// its tensor-free twin alone: the page reads the meta bundle, then must refuse the full one.
fn tamper_the_chat_template(_path: &str, body: &mut [u8]) {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    if !has_tensors(body) {
        return;
    }
    if let Some(key) = find(body, b"\"chat_template\":\"")
        && let Some(at) = find(&body[key..], b"assistant")
    {
        body[key + at] = b'A';
    }
}

/// The only server offering SmolLM2's bundle sits behind a proxy that changes the chat
/// template of the full bundle: the page shows the mismatch naming the URL and both digests,
/// no chat becomes ready, and the bundle cache holds the (honest) meta bundle only.
#[test]
fn the_page_refuses_a_tampered_bundle() {
    let mut swarm = PageSwarm::start("browser-tampered");
    let upstream = free_port();
    let proxy = TamperingProxy::start(upstream, tamper_the_chat_template);
    let listen = format!("127.0.0.1:{upstream}");
    swarm.server("0:30", &["--http-listen", &listen, "--http-url", &proxy.url()]);
    let url = format!("http://127.0.0.1:{}/", swarm.http_port);
    let shot = artifacts().join("bundle-refused.png");
    let result = drive(
        "status.mjs",
        &[
            ("PAGE_URL", url.as_ref()),
            ("SCREENSHOT", shot.as_os_str()),
            ("TIMEOUT_MS", "300000".as_ref()),
        ],
        |_| None,
    );
    eprintln!("page result: {}", result["status"]);
    let originals = proxy.originals();
    let (path, original) = originals
        .iter()
        .find(|(_, body)| has_tensors(body))
        .expect("the page downloaded the full bundle through the proxy");
    let (_, meta) = originals
        .iter()
        .find(|(_, body)| !has_tensors(body))
        .expect("the page downloaded the meta bundle through the proxy");
    let mut tampered = original.clone();
    tamper_the_chat_template(path, &mut tampered);
    assert_ne!(&tampered, original, "the proxy found no chat template to change");
    let digest = |b: &[u8]| shared_model::bundle::digest(b).expect("digest");
    let (want, got) = (digest(original), digest(&tampered));
    let expected = format!(
        "the client bundle from {}{path} does not match the model's signed record (sha256 {got}, expected {want})",
        proxy.url()
    );
    let status = result["status"].as_str().unwrap_or_default();
    assert!(
        status.contains(&expected),
        "expected `{expected}`, the page says `{status}`\nconsole: {}",
        result["console"]
    );
    assert_eq!(result["send_disabled"], true, "a chat became ready");
    assert_eq!(result["assistant_messages"], 0);
    let cached: Vec<&str> = result["cached"]
        .as_array()
        .expect("cache entries")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        cached.iter().any(|e| e.contains(&digest(meta))),
        "the checked meta bundle is not cached: {cached:?}"
    );
    assert!(
        !cached.iter().any(|e| e.contains(&want) || e.contains(&got)),
        "the refused bundle was cached: {cached:?}"
    );
}

//! The chat page end to end in headless Chromium: a relay serving the built page, servers
//! hosting SmolLM2, and the page (tokenizer, embeddings and LM head on WebGPU through
//! SwiftShader; blocks over libp2p WebRTC) checked token for token against
//! `corolla generate --chat --temperature 0`, also with a server killed mid-reply.
//!
//! Needs what `scripts/test.sh` prepares: the page built into `dist/` (or `COROLLA_WEB_DIST`),
//! `tests/browser/node_modules` (playwright-core), Chromium at /usr/bin/chromium (or
//! `CHROMIUM`), and the SmolLM2 GGUF in `COROLLA_SMOLLM2_GGUF`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use corolla_tests::{Proc, bin, temp_dir, wait_for_file_lines};

const STARTUP: Duration = Duration::from_secs(120);
const PROMPT: &str = "What is the capital of France?";
const MAX_TOKENS: usize = 24;
/// Server flags: serve the client bundle over HTTP.
const BUNDLE: &[&str] = &["--http-listen", "127.0.0.1:0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn smollm2() -> PathBuf {
    let path = std::env::var_os("COROLLA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .expect("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches the model and sets it)");
    assert!(path.is_file(), "{} does not exist", path.display());
    path
}

fn web_dist() -> PathBuf {
    let dist = std::env::var_os("COROLLA_WEB_DIST").map_or_else(|| repo().join("dist"), PathBuf::from);
    assert!(
        dist.join("index.html").is_file(),
        "the chat page is not built at {}: run `trunk build --release` (scripts/test.sh does)",
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
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
                .arg(web_dist()),
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
        let n = self.servers.len();
        let addr_file = self.dir.join(format!("server{n}.addrs"));
        let mut cmd = Command::new(bin("server"));
        cmd.arg("--model")
            .arg(smollm2())
            .args(["--blocks", blocks, "--initial-peers", &self.relay_tcp])
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--listen",
                "/ip4/127.0.0.1/udp/0/webrtc-direct",
            ])
            .arg("--addr-file")
            .arg(&addr_file);
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
    let out = Command::new(bin("corolla"))
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--chat", "--prompt", PROMPT, "--temperature", "0", "--json"])
        .args(["--max-new-tokens", &MAX_TOKENS.to_string()])
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    json["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
}

/// Runs the page in Chromium; `on_pause(route peers)` runs once the reply has `pause_at`
/// tokens, while the page waits.
fn run_page(
    url: &str,
    screenshot: &Path,
    pause_at: Option<usize>,
    mut on_pause: impl FnMut(&[String]),
) -> serde_json::Value {
    let driver = repo().join("tests/browser");
    assert!(
        driver.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(driver.join("chat.mjs"))
        .env("PAGE_URL", url)
        .env("SCREENSHOT", screenshot)
        .env("TIMEOUT_MS", "600000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(n) = pause_at {
        cmd.env("PAUSE_AT_TOKENS", n.to_string());
    }
    let mut child = cmd.spawn().expect("node runs (install Node.js)");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut result = None;
    for line in stdout.lines() {
        let line = line.expect("driver output");
        if let Some(peers) = line.strip_prefix("PAUSE ") {
            let peers: Vec<String> = peers.split_whitespace().map(str::to_string).collect();
            on_pause(&peers);
            writeln!(stdin, "go").expect("resume the driver");
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            result = Some(serde_json::from_str(json).expect("driver JSON"));
        }
    }
    let status = child.wait().expect("driver exits");
    assert!(status.success(), "the browser driver failed: {status}");
    let result: serde_json::Value = result.expect("the driver printed a RESULT line");
    assert!(
        result.get("failure").is_none(),
        "the page failed: {}\nconsole:\n{}",
        result["failure"],
        result["console"]
    );
    result
}

fn tokens_of(result: &serde_json::Value) -> Vec<u64> {
    result["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
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

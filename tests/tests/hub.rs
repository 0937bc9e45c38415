//! `--model org/name` against a Hub on 127.0.0.1: a test HTTP server that serves the sharded
//! llama fixture in the Hub's URL layout (`/{org}/{name}/resolve/{revision}/{file}`, with the
//! Hub's `X-Repo-Commit`, `ETag`/`X-Linked-Etag` and byte ranges) and counts what it serves.
//!
//! - `server --blocks 0:2 --model corolla-test/llama` downloads the config, the index and
//!   exactly the shards holding blocks 0 and 1; every other shard is only read by ranges
//!   (headers and fingerprint samples), and its fingerprint is the local checkpoint's (a
//!   client of the local fixture routes through it and gets the golden tokens);
//! - a second start fetches nothing; `HF_HUB_OFFLINE=1` starts from the cache with the Hub
//!   gone, and fails clearly for blocks it never downloaded;
//! - a shard whose bytes do not match the Hub's hash is refused and not kept;
//! - `corolla generate --model corolla-test/llama` downloads the rest and gives the golden
//!   tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use corolla_tests::{Proc, STARTUP, Swarm, bin, csv, fixture, golden_greedy, temp_dir};
use sha1::Sha1;
use sha2::{Digest, Sha256};

const REPO: &str = "corolla-test/llama";
/// The same files, one shard served with a wrong hash.
const BROKEN: &str = "corolla-test/llama-broken";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the test Hub served: (file, kind) per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Served {
    /// `Range: bytes=0-0`, the metadata probe.
    Meta,
    /// A whole file, or its rest (`bytes=N-`): a download.
    Download,
    /// A closed range: a header or fingerprint samples.
    Range,
    NotFound,
}

#[derive(Clone)]
struct Hub {
    dir: PathBuf,
    /// The shard served under a wrong hash in `BROKEN`.
    broken_shard: String,
    log: Arc<Mutex<Vec<(String, String, Served)>>>,
}

impl Hub {
    fn take(&self) -> Vec<(String, String, Served)> {
        std::mem::take(&mut *self.log.lock().expect("log"))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn resolve(
    State(hub): State<Hub>,
    UrlPath((org, name, revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{org}/{name}");
    let record = |kind| hub.log.lock().expect("log").push((repo.clone(), file.clone(), kind));
    let path = hub.dir.join(&file);
    let known = (repo == REPO || repo == BROKEN) && (revision == "main" || revision == COMMIT);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) if known && !file.contains('/') => bytes,
        _ => {
            record(Served::NotFound);
            return StatusCode::NOT_FOUND.into_response();
        }
    };
    let total = bytes.len();
    let range = headers.get("range").and_then(|v| v.to_str().ok()).map(str::to_string);
    let (start, end, kind) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        None => (0, total, Served::Download),
        Some("0-0") => (0, 1, Served::Meta),
        Some(r) => {
            let (a, b) = r.split_once('-').expect("a byte range");
            let a: usize = a.parse().expect("range start");
            match b {
                "" => (a, total, Served::Download),
                b => (a, b.parse::<usize>().expect("range end") + 1, Served::Range),
            }
        }
    };
    record(kind);
    let lfs = file.ends_with(".safetensors");
    let etag = if lfs {
        let mut sha = hex(&Sha256::digest(&bytes));
        if repo == BROKEN && file == hub.broken_shard {
            sha = hex(&Sha256::digest(b"not this shard"));
        }
        sha
    } else {
        let mut h = Sha1::new();
        h.update(format!("blob {total}\0").as_bytes());
        h.update(&bytes);
        hex(&h.finalize())
    };
    let mut response = bytes[start.min(total)..end.min(total)].to_vec().into_response();
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).expect("header value");
    h.insert("x-repo-commit", value(COMMIT.into()));
    h.insert(if lfs { "x-linked-etag" } else { "etag" }, value(format!("\"{etag}\"")));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response
            .headers_mut()
            .insert("content-range", value(format!("bytes {start}-{}/{total}", end - 1)));
    }
    response
}

/// Serves `dir` as both repositories until the test process ends; returns its URL.
fn start_hub(hub: Hub) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the hub");
    let url = format!("http://{}", listener.local_addr().expect("hub address"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("hub runtime");
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route("/{org}/{name}/resolve/{revision}/{*file}", axum::routing::get(resolve))
                .with_state(hub);
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("the hub serves");
        });
    });
    url
}

/// The llama fixture's index: tensor name -> shard.
fn weight_map() -> BTreeMap<String, String> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index JSON");
    index["weight_map"]
        .as_object()
        .expect("weight_map")
        .iter()
        .map(|(name, shard)| (name.clone(), shard.as_str().expect("shard").to_string()))
        .collect()
}

/// The shards holding any tensor of blocks `blocks` of the llama fixture.
fn shards_of(blocks: std::ops::Range<usize>) -> BTreeSet<String> {
    weight_map()
        .into_iter()
        .filter(|(name, _)| blocks.clone().any(|i| name.starts_with(&format!("model.layers.{i}."))))
        .map(|(_, shard)| shard)
        .collect()
}

fn downloads(served: &[(String, String, Served)]) -> BTreeSet<String> {
    served
        .iter()
        .filter(|(_, _, kind)| *kind == Served::Download)
        .map(|(_, file, _)| file.clone())
        .collect()
}

#[derive(Clone)]
struct Env {
    hf_home: PathBuf,
    corolla: PathBuf,
    endpoint: PathBuf,
}

impl Env {
    fn vars(&self) -> Vec<(&'static str, &Path)> {
        vec![
            ("HF_HOME", &self.hf_home),
            ("COROLLA_CACHE", &self.corolla),
            ("HF_ENDPOINT", &self.endpoint),
            ("HF_TOKEN", Path::new("")),
        ]
    }
}

/// Runs `server` to its exit (it must fail), returning its log.
fn failing_server(swarm: &Swarm, name: &str, model: &str, blocks: &str, env: &[(&str, &Path)]) -> String {
    let mut proc = Proc::spawn(
        name,
        Command::new(bin("server"))
            .args([
                "--model",
                model,
                "--blocks",
                blocks,
                "--initial-peers",
                &swarm.relay_addr,
            ])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .envs(env.iter().map(|(k, v)| (*k, *v))),
    );
    let status = proc.wait_timeout(STARTUP).expect("the server exits");
    assert!(!status.success(), "{name} should fail");
    proc.log()
}

#[test]
fn a_server_of_a_hub_model_fetches_only_its_span_and_then_nothing() {
    let dir = temp_dir("hub");
    let hub = Hub {
        dir: fixture("llama"),
        broken_shard: shards_of(0..1).into_iter().next().expect("a shard of block 0"),
        log: Arc::default(),
    };
    let url = start_hub(hub.clone());
    let env = Env {
        hf_home: dir.join("hf"),
        corolla: dir.join("corolla"),
        endpoint: PathBuf::from(&url),
    };
    let mut swarm = Swarm::start("hub");

    // 1. Only the span's shards are downloaded.
    swarm.server_with_env(Path::new(REPO), "0:2", &[], &env.vars());
    let served = hub.take();
    let mut expected: BTreeSet<String> = shards_of(0..2);
    expected.extend(["config.json", "generation_config.json", "model.safetensors.index.json"].map(String::from));
    assert_eq!(downloads(&served), expected, "downloads: {served:?}");
    let all_shards = shards_of(0..4);
    let ranged: BTreeSet<&String> = served
        .iter()
        .filter(|(_, _, k)| *k == Served::Range)
        .map(|(_, f, _)| f)
        .collect();
    assert!(
        all_shards.difference(&expected).all(|s| ranged.contains(s)),
        "every other shard is fingerprinted by ranges: {ranged:?}"
    );
    let files = dir.join("hf/hub/models--corolla-test--llama/snapshots").join(COMMIT);
    assert!(files.join("config.json").exists(), "the standard Hub cache layout");

    // The Hub-loaded server has the local checkpoint's fingerprint: a client of the local
    // fixture routes blocks 0..2 through it and gets the golden tokens.
    swarm.server(&fixture("llama"), "2:4", &[]);
    let (prompt, golden) = golden_greedy("llama");
    let out = Command::new(bin("corolla"))
        .arg("generate")
        .arg("--model")
        .arg(fixture("llama"))
        .args([
            "--token-ids",
            &csv(&prompt),
            "--max-new-tokens",
            &golden.len().to_string(),
        ])
        .args(["--json", "--initial-peers", &swarm.relay_addr])
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(corolla_tests::token_ids(&json), golden, "through the Hub server");

    // 2. A second start fetches nothing.
    let (mut first, _) = swarm.servers.remove(0);
    first.kill9();
    hub.take();
    swarm.server_with_env(Path::new(REPO), "0:2", &[], &env.vars());
    assert_eq!(hub.take(), vec![], "a second start fetches nothing");

    // 3. Offline, with the Hub unreachable: from the cache, and a clear error for the rest.
    let dead = PathBuf::from(format!("http://127.0.0.1:{}", corolla_tests::free_port()));
    let offline = Env {
        endpoint: dead,
        ..env.clone()
    };
    let mut vars = offline.vars();
    vars.push(("HF_HUB_OFFLINE", Path::new("1")));
    swarm.server_with_env(Path::new(REPO), "0:2", &[], &vars);
    let log = failing_server(&swarm, "offline-2-4", REPO, "2:4", &vars);
    assert!(log.contains("HF_HUB_OFFLINE"), "offline, uncached blocks: {log}");

    // 4. A shard that does not match the Hub's hash is refused and not kept.
    let broken_env = Env {
        hf_home: dir.join("hf-broken"),
        corolla: dir.join("corolla-broken"),
        endpoint: PathBuf::from(&url),
    };
    let log = failing_server(&swarm, "broken", BROKEN, "0:2", &broken_env.vars());
    assert!(log.contains("does not match the Hub's hash"), "{log}");
    let snapshot = dir
        .join("hf-broken/hub/models--corolla-test--llama-broken/snapshots")
        .join(COMMIT);
    assert!(!snapshot.join(&hub.broken_shard).exists(), "the bad shard is not kept");
    let blobs: Vec<_> = std::fs::read_dir(dir.join("hf-broken/hub/models--corolla-test--llama-broken/blobs"))
        .expect("blobs")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let wrong = hex(&Sha256::digest(b"not this shard"));
    assert!(
        !blobs.iter().any(|b| b.to_string_lossy().starts_with(&wrong)),
        "{blobs:?}"
    );

    // 5. A local run downloads the rest and gives the golden tokens.
    hub.take();
    let out = Command::new(bin("corolla"))
        .args(["generate", "--model", REPO])
        .args([
            "--token-ids",
            &csv(&prompt),
            "--max-new-tokens",
            &golden.len().to_string(),
            "--json",
        ])
        .envs(env.vars())
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(corolla_tests::token_ids(&json), golden, "local from the Hub");
    let rest: BTreeSet<String> = all_shards.difference(&shards_of(0..2)).cloned().collect();
    let fetched = downloads(&hub.take());
    let mut top = shards_of_top();
    top.extend(rest);
    assert_eq!(fetched, top, "the rest of the checkpoint, once");
}

/// The shards of the embeddings, final norm and head (not blocks), not yet downloaded.
fn shards_of_top() -> BTreeSet<String> {
    let blocks = shards_of(0..2);
    weight_map()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("model.layers."))
        .map(|(_, shard)| shard)
        .filter(|s| !blocks.contains(s))
        .collect()
}

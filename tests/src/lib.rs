//! Helpers for process-level tests: find the workspace binaries, run them with their output
//! captured to a log file, and wait for the files they write.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Path of a workspace binary built in the same profile as the running test.
///
/// Panics if it is missing: cargo builds only the binaries of the crate under test, so the
/// others must have been built first.
pub fn bin(name: &str) -> PathBuf {
    // The test executable is `<target>/<profile>/deps/<test>-<hash>`.
    let exe = std::env::current_exe().expect("cannot locate the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable location {}", exe.display()));
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}; build the workspace binaries first: \
         `cargo build --release --workspace --bins` (same profile and CARGO_TARGET_DIR as the tests)",
        path.display()
    );
    path
}

/// Path of a file or directory under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A copy of fixture `name` whose config allows `context` positions (the fixtures' own is 256),
/// for tests of long prompts. Its fingerprint differs from the fixture's.
pub fn long_context_fixture(name: &str, context: usize) -> PathBuf {
    let dir = temp_dir(&format!("{name}-context-{context}"));
    let source = fixture(name);
    let entries = fs::read_dir(&source).unwrap_or_else(|e| panic!("cannot read {}: {e}", source.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", source.display()));
        fs::copy(entry.path(), dir.join(entry.file_name()))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", entry.path().display()));
    }
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("the fixture's config is JSON");
    config["max_position_embeddings"] = serde_json::json!(context);
    fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    dir
}

/// A fresh, empty directory, unique to this process and call.
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("corolla-tests-{}-{n}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A child process whose stdout and stderr go to a log file; killed when dropped, so a
/// failing test never leaves daemons behind.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd`, capturing its output to `<temp dir>/<name>.log`.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let log = temp_dir(&format!("{name}-log")).join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup log file handle: {e}"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills with SIGKILL (a crash, no chance to clean up) and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop with SIGTERM, as a service manager would.
    #[cfg(unix)]
    pub fn terminate(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cannot send SIGTERM to {}: {status:?}",
            self.name
        );
    }

    /// The exit status if the process exits within `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => return None,
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        // On failure the log is the only way to see what the process was doing.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("----- last lines of {} ({}) -----", self.name, self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("----- end of {} -----", self.name);
        }
    }
}

/// Waits until the file at `path` exists and has at least `min_lines` non-empty lines, and
/// returns them. Panics after `timeout`.
pub fn wait_for_file_lines(path: &Path, min_lines: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines: Vec<String> = fs::read_to_string(path)
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        if lines.len() >= min_lines {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {min_lines} expected lines after {timeout:?}: {lines:?}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a relay or server may take to start in these tests.
pub const STARTUP: Duration = Duration::from_secs(60);

/// The WAN emulator (`wan up`, bench/wan): `peers` network namespaces joined by links with
/// the delay and bandwidth its arguments ask for, checked by the emulator itself before it
/// says it is ready. Stopped (and its namespaces removed) when dropped. Needs root.
pub struct Wan {
    proc: Proc,
    /// What `wan up` wrote once routing: the peers and its self-check.
    pub ready: serde_json::Value,
    peers: Vec<(String, String)>,
}

impl Wan {
    /// Starts `wan up --peers <peers> <args>` and waits until it has checked itself.
    pub fn start(name: &str, peers: usize, args: &[&str]) -> Wan {
        let dir = temp_dir(&format!("{name}-wan"));
        let ready_file = dir.join("ready.json");
        let mut proc = Proc::spawn(
            &format!("{name}-wan"),
            Command::new(bin("wan"))
                .args(["up", "--peers", &peers.to_string(), "--ready-file"])
                .arg(&ready_file)
                .args(args),
        );
        let deadline = Instant::now() + STARTUP;
        let ready: serde_json::Value = loop {
            if let Some(v) = fs::read(&ready_file).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                break v;
            }
            if let Some(status) = proc.wait_timeout(Duration::from_millis(100)) {
                panic!("wan up exited ({status}) before it was ready:\n{}", proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "wan up not ready after {STARTUP:?}:\n{}",
                proc.log()
            );
        };
        let peers = ready["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| {
                (
                    p["ns"].as_str().expect("ns").to_string(),
                    p["addr"].as_str().expect("addr").to_string(),
                )
            })
            .collect();
        Wan { proc, ready, peers }
    }

    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Peer `i`'s IPv4 address.
    pub fn addr(&self, i: usize) -> &str {
        &self.peers[i].1
    }

    /// `program` to run inside peer `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.peers[i].0]).arg(program);
        cmd
    }

    /// Everything `wan up` printed (its self-check, and its link counters once stopped).
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        // SIGTERM lets it remove its namespaces; Proc's drop kills it if it hangs.
        self.proc.terminate();
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
    }
}

/// A relay on 127.0.0.1 and the servers started against it, all killed when dropped.
/// [`Swarm::start_on`] puts them on an emulated WAN instead: the relay on peer 0, server `k`
/// on peer `k + 1`, clients ([`Swarm::client`]) on the last peer.
pub struct Swarm {
    pub dir: PathBuf,
    /// The relay's TCP address, ending in `/p2p/<id>`.
    pub relay_addr: String,
    pub relay: Proc,
    /// Each server and its peer id.
    pub servers: Vec<(Proc, String)>,
    /// Declared last so the processes in its namespaces stop before it does.
    pub wan: Option<Wan>,
}

impl Swarm {
    pub fn start(name: &str) -> Swarm {
        Self::start_with(name, &[])
    }

    /// A swarm whose relay gets `extra` arguments besides its TCP listener.
    pub fn start_with(name: &str, extra: &[&str]) -> Swarm {
        Self::start_placed(name, extra, None)
    }

    /// A swarm on the emulated WAN `wan`.
    pub fn start_on(name: &str, wan: Wan) -> Swarm {
        Self::start_placed(name, &[], Some(wan))
    }

    fn start_placed(name: &str, extra: &[&str], wan: Option<Wan>) -> Swarm {
        let dir = temp_dir(name);
        let addr_file = dir.join("relay.addrs");
        let host = wan.as_ref().map_or("127.0.0.1", |w| w.addr(0));
        let mut cmd = match &wan {
            Some(w) => w.command(0, bin("relay")),
            None => Command::new(bin("relay")),
        };
        let relay = Proc::spawn(
            "relay",
            cmd.args(["--listen", &format!("/ip4/{host}/tcp/0"), "--addr-file"])
                .arg(&addr_file)
                .args(extra),
        );
        let listeners = 1 + extra.iter().filter(|a| **a == "--listen").count();
        let relay_addr = wait_for_file_lines(&addr_file, listeners, STARTUP)
            .into_iter()
            .find(|a| a.contains("/tcp/"))
            .expect("the relay's TCP address");
        Swarm {
            dir,
            relay_addr,
            relay,
            servers: Vec::new(),
            wan,
        }
    }

    /// `program` where clients run: here, or the last peer of the WAN.
    pub fn client(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.wan {
            Some(w) => w.command(w.peers() - 1, program),
            None => Command::new(program),
        }
    }

    /// `corolla generate --json` through this swarm: its output and its log.
    pub fn generate(&self, model: &Path, args: &[&str]) -> (serde_json::Value, String) {
        let out = self
            .client(bin("corolla"))
            .env("COROLLA_LOG", "info")
            .arg("generate")
            .arg("--model")
            .arg(model)
            .args(args)
            .args(["--json", "--initial-peers", &self.relay_addr])
            .output()
            .expect("corolla runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "corolla failed: {stderr}");
        (serde_json::from_slice(&out.stdout).expect("one JSON object"), stderr)
    }

    /// `corolla generate` through this swarm (token ids streamed, no tokenizer), killing with
    /// SIGKILL, once `after` tokens came, the server `victim` picks from the client's
    /// `session route` log line. Returns every token and the client's log, after checking that
    /// the client exited well and failed over.
    pub fn generate_through_a_kill(
        &mut self,
        model: &Path,
        args: &[&str],
        after: usize,
        victim: impl FnOnce(&[(Proc, String)], &str) -> usize,
    ) -> (Vec<u32>, String) {
        use std::io::Read;
        let log = self.dir.join("client.log");
        let mut client = self
            .client(bin("corolla"))
            .env("COROLLA_LOG", "info,swarm=debug")
            .arg("generate")
            .arg("--model")
            .arg(model)
            .args(args)
            .args(["--initial-peers", &self.relay_addr])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("corolla runs");
        let mut stdout = client.stdout.take().expect("piped");
        // Without a tokenizer, tokens stream as "id id id ...".
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while seen.iter().filter(|&&c| c == b' ').count() < after {
            assert_eq!(stdout.read(&mut byte).expect("read"), 1, "client ended early");
            seen.push(byte[0]);
        }
        let route = fs::read_to_string(&log).expect("client log");
        let route_line = route
            .lines()
            .find(|l| l.contains("session route"))
            .expect("route logged");
        let i = victim(&self.servers, route_line);
        self.servers[i].0.kill9();
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).expect("read");
        let status = client.wait().expect("exits");
        let log = fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{log}");
        assert!(log.contains("re-routing"), "the client must have failed over: {log}");
        seen.extend(rest);
        let tokens = String::from_utf8(seen)
            .expect("utf-8")
            .split_whitespace()
            .map(|t| t.parse().expect("token id"))
            .collect();
        (tokens, log)
    }

    /// Starts a server (on 127.0.0.1 TCP unless `extra` has `--listen`), waits until it is
    /// announced, and returns its peer id.
    pub fn server(&mut self, model: &Path, blocks: &str, extra: &[&str]) -> String {
        self.server_with_env(model, blocks, extra, &[])
    }

    /// [`Swarm::server`] with these environment variables set for the server.
    pub fn server_with_env(&mut self, model: &Path, blocks: &str, extra: &[&str], env: &[(&str, &Path)]) -> String {
        let mut args = vec!["--blocks", blocks];
        args.extend_from_slice(extra);
        self.start_server("server", model, &args, env)
    }

    /// Starts workspace binary `binary` as a server of `model` with `args` (which say where
    /// its blocks are), waits until it is announced, and returns its peer id.
    pub fn start_server(&mut self, binary: &str, model: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
        let n = self.servers.len();
        let addr_file = self.dir.join(format!("server{n}.addrs"));
        let (mut cmd, host) = match &self.wan {
            Some(w) => {
                assert!(
                    n + 2 < w.peers(),
                    "the WAN has no peer left for server {n} (the last is the client's)"
                );
                (w.command(n + 1, bin(binary)), w.addr(n + 1).to_string())
            }
            None => (Command::new(bin(binary)), "127.0.0.1".to_string()),
        };
        cmd.arg("--model")
            .arg(model)
            .args(["--initial-peers", &self.relay_addr])
            .args(["--addr-file"])
            .arg(&addr_file)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)));
        if !args.contains(&"--listen") {
            cmd.args(["--listen", &format!("/ip4/{host}/tcp/0")]);
        }
        let blocks = args
            .iter()
            .position(|a| *a == "--blocks")
            .and_then(|i| args.get(i + 1))
            .map_or_else(|| "auto".to_string(), |b| b.replace(':', "-"));
        let proc = Proc::spawn(&format!("server{n}-{blocks}"), &mut cmd);
        let addrs = wait_for_file_lines(&addr_file, 1, STARTUP);
        let peer = addrs[0]
            .rsplit("/p2p/")
            .next()
            .expect("address ends in /p2p/<id>")
            .to_string();
        self.servers.push((proc, peer.clone()));
        peer
    }
}

/// `GET path` over plain HTTP/1.1 from 127.0.0.1:`port`: the whole response, which must be a 200.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("HTTP on port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200"), "GET {path}: {out}");
    out
}

/// The relay's swarm monitor, `GET /corolla/v1/state` on 127.0.0.1:`port`.
pub fn monitor_state(port: u16) -> serde_json::Value {
    let out = http_get(port, "/corolla/v1/state");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `GET /metrics` (Prometheus text) from a `--metrics-listen` on 127.0.0.1:`port`.
pub fn scrape(port: u16) -> String {
    let out = http_get(port, "/metrics");
    assert!(out.contains("application/openmetrics-text"), "{out}");
    out
}

/// The value of the metrics sample named exactly `name` (labels included), if there is one.
pub fn try_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// [`try_sample`], which must be there.
pub fn sample(text: &str, name: &str) -> f64 {
    try_sample(text, name).unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// Polls [`monitor_state`] until `ok` holds for it, or fails after `within`.
pub fn wait_for_state(
    port: u16,
    within: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = monitor_state(port);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: never happened; last state {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A copy of fixture `family` (a Llama-layout checkpoint) with `layers` blocks: its blocks
/// repeated in order, so spans and moves have room. Its golden tokens are not the fixture's:
/// compare with a local run.
pub fn deep_fixture(family: &str, layers: usize) -> PathBuf {
    let source = fixture(family);
    let dir = temp_dir(&format!("{family}-{layers}-layers"));
    let config_path = source.join("config.json");
    let text =
        fs::read_to_string(&config_path).unwrap_or_else(|e| panic!("cannot read {}: {e}", config_path.display()));
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("the fixture's config is JSON");
    let have = config["num_hidden_layers"].as_u64().expect("num_hidden_layers") as usize;
    config["num_hidden_layers"] = serde_json::json!(layers);
    fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    for entry in fs::read_dir(&source).expect("fixture dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(".safetensors") && !name.ends_with(".json")
            || name.starts_with("model")
            || name.starts_with("golden")
            || name == "config.json"
        {
            continue;
        }
        fs::copy(&path, dir.join(&name)).expect("copy");
    }
    let shards: Vec<Vec<u8>> = fs::read_dir(&source)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        })
        .map(|p| fs::read(&p).expect("shard"))
        .collect();
    let parsed: Vec<safetensors::SafeTensors<'_>> = shards
        .iter()
        .map(|b| safetensors::SafeTensors::deserialize(b).expect("valid shard"))
        .collect();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for st in &parsed {
        for (name, view) in st.tensors() {
            match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
                Some((i, rest)) => {
                    let i: usize = i.parse().expect("a layer index");
                    for copy in (i..layers).step_by(have) {
                        tensors.push((format!("model.layers.{copy}.{rest}"), view.clone()));
                    }
                }
                None => tensors.push((name, view)),
            }
        }
    }
    let bytes = safetensors::serialize(tensors, None).expect("serialize");
    fs::write(dir.join("model.safetensors"), bytes).expect("write weights");
    dir
}

/// The real model, SmolLM2-135M-Instruct Q4_1 (`scripts/test.sh` fetches it).
pub fn smollm2() -> PathBuf {
    let path = std::env::var_os("COROLLA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .expect("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches the model and sets it)");
    assert!(path.is_file(), "{} does not exist", path.display());
    path
}

/// Token ids as `corolla --token-ids` takes them.
pub fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The first greedy row of fixture `family`'s `golden.json`: (prompt, generated tokens).
pub fn golden_greedy(family: &str) -> (Vec<u32>, Vec<u32>) {
    let path = fixture(family).join("golden.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden.json is JSON");
    let prompt_len = json["prompt_len"].as_u64().expect("prompt_len") as usize;
    let row: Vec<u32> = json["greedy"][0]
        .as_array()
        .expect("greedy rows")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    (row[..prompt_len].to_vec(), row[prompt_len..].to_vec())
}

/// Fixture `family`'s golden rows (`golden.safetensors`): the prompts (`input_ids`) and the
/// greedy rows, prompt included (`generated`).
pub fn golden_rows(family: &str) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let bytes = fs::read(fixture(family).join("golden.safetensors")).expect("golden");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid golden");
    let rows = |name: &str| -> Vec<Vec<u32>> {
        let t = st.tensor(name).expect("tensor");
        let cols = t.shape()[1];
        let flat: Vec<u32> = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
            .collect();
        flat.chunks(cols).map(<[u32]>::to_vec).collect()
    };
    (rows("input_ids"), rows("generated"))
}

/// A free TCP port on 127.0.0.1 (free when asked; a process started right after binds it).
/// A TCP port on 127.0.0.1 that nothing holds now, for a process to listen on later.
///
/// It comes from below the kernel's ephemeral range (Linux: 32768-60999), from which every
/// `tcp/0` listener and outgoing connection takes its port: a port freed by this function and
/// handed to a server would otherwise race the server's own `tcp/0` listeners (seen in CI:
/// the metrics port taken by the same server's libp2p listener). Each call of a process
/// tries a different port, starting from one that depends on the process id.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOW: usize = 20_000;
    const SPAN: usize = 12_000;
    let base = std::process::id() as usize * 97;
    for _ in 0..SPAN {
        let port = (LOW + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// How a [`TamperingProxy`] changes a response body in place (given the request path).
pub type Tamper = fn(path: &str, body: &mut [u8]);

/// An HTTP/1.1 proxy on 127.0.0.1 in front of a server's bundle port: what a bad CDN or a
/// man in the middle would be. It forwards each request to `upstream`, passes each successful
/// response body through its [`Tamper`] and keeps the untouched body of every path, for tests
/// to compare. One request per connection, as `swarm::http` serves them.
pub struct TamperingProxy {
    pub addr: std::net::SocketAddr,
    originals: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

impl TamperingProxy {
    /// Listens on a free port; the proxy runs until the test process ends.
    pub fn start(upstream: u16, tamper: Tamper) -> TamperingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let originals = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let kept = originals.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    if let Err(e) = proxy_one(stream, upstream, tamper, &kept) {
                        eprintln!("tampering proxy: {e}");
                    }
                });
            }
        });
        TamperingProxy { addr, originals }
    }

    /// The base URL to give a server as `--http-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every untouched body the proxy forwarded, by path.
    pub fn originals(&self) -> std::collections::HashMap<String, Vec<u8>> {
        self.originals.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn proxy_one(
    mut client: std::net::TcpStream,
    upstream: u16,
    tamper: Tamper,
    kept: &std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf)?;
        if n == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let path = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut server = std::net::TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(&head)?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    let (head, body) = response.split_at(split);
    if !head.starts_with(b"HTTP/1.1 200") || body.is_empty() {
        return client.write_all(&response);
    }
    kept.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.clone(), body.to_vec());
    // The same length, so the upstream's Content-Length still holds.
    let mut body = body.to_vec();
    tamper(&path, &mut body);
    client.write_all(head)?;
    client.write_all(&body)
}

/// Whether `bytes` is a safetensors file with tensors (a full client bundle, not its meta twin).
pub fn has_tensors(bytes: &[u8]) -> bool {
    safetensors::SafeTensors::read_metadata(bytes).is_ok_and(|(_, m)| !m.tensors().is_empty())
}

/// The `token_ids` of `corolla generate --json` output.
pub fn token_ids(json: &serde_json::Value) -> Vec<u32> {
    json["token_ids"]
        .as_array()
        .expect("token ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

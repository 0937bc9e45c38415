use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use libp2p::{Multiaddr, PeerId};
use shared_model::precision::Precision;
use shared_model::quant::QuantKind;
use swarm::private::SwarmKey;

/// Compute backend of the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Cpu,
    Cuda,
    Wgpu,
}

/// Weight, activation and KV-cache precision (f16/bf16 halve the memory of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

/// Quantize projections on load (`server --quant`, and `corolla generate/forward/bench --quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    /// Keep the checkpoint's own types.
    None,
    /// GGUF Q8_0 blocks (8-bit, one f16 scale per 32 weights).
    Int8,
    /// GGUF Q4_0 blocks (4-bit, one f16 scale per 32 weights).
    Q4,
}

impl QuantArg {
    /// Wraps the model's weights so that its projections are quantized as they load (a
    /// checkpoint's own quantized tensors stay as stored). Dense reads, and so the model's
    /// fingerprint, are unchanged: quantized and full-precision servers join one swarm.
    pub fn apply(self, files: &mut shared_model::loader::ModelFiles) {
        apply_quant(self.kind(), files);
    }

    pub fn kind(self) -> Option<QuantKind> {
        match self {
            Self::None => None,
            Self::Int8 => Some(QuantKind::Q8_0),
            Self::Q4 => Some(QuantKind::Q4_0),
        }
    }
}

/// See [`QuantArg::apply`].
pub fn apply_quant(kind: Option<QuantKind>, files: &mut shared_model::loader::ModelFiles) {
    if let Some(kind) = kind {
        files.weights = std::sync::Arc::new(shared_model::synthetic::QuantizeOnLoad::new(
            files.weights.clone(),
            kind,
        ));
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "server",
    version,
    about = "Host a span of transformer blocks for the Corolla swarm"
)]
pub struct ServerArgs {
    /// An HF-layout model folder, a `.gguf` file, or a Hugging Face Hub id `org/name[@revision]`
    /// (only the config, tokenizer, index and the shards of the served blocks are downloaded,
    /// into $HF_HOME/hub; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply).
    #[arg(long)]
    pub model: PathBuf,
    /// Blocks to serve, as START:END (END exclusive).
    #[arg(long, conflicts_with = "num_blocks")]
    pub blocks: Option<String>,
    /// Serve this many blocks, placed where the swarm has the least throughput. On a GPU,
    /// without this or --blocks: as many blocks as its memory holds (weights + KV cache).
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Relays / DHT bootstrap peers (each ending in /p2p/<peer id>).
    #[arg(long, num_args = 1.., required = true)]
    pub initial_peers: Vec<Multiaddr>,
    /// Addresses to listen on; `<relay address>/p2p-circuit` listens through that relay.
    #[arg(long)]
    pub listen: Vec<Multiaddr>,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Quantize the blocks' projections on load and keep them quantized in memory (CPU and
    /// CUDA multiply the blocks directly); GGUF tensors that are already quantized stay as
    /// stored. The model's fingerprint does not change.
    #[arg(long, value_enum, default_value_t = QuantArg::None)]
    pub quant: QuantArg,
    /// Keypair file: a stable peer id across restarts (created if missing).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// A name shown to users in the swarm view.
    #[arg(long)]
    pub public_name: Option<String>,
    /// Most concurrent inference sessions.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Most sessions one peer may hold [default: a quarter of --max-sessions].
    #[arg(long)]
    pub max_sessions_per_peer: Option<usize>,
    /// KV cache budget in tokens (batch x max_length summed over open sessions, plus their
    /// deep prompts); what the caches may ever allocate.
    #[arg(long, default_value_t = 65536)]
    pub cache_tokens: usize,
    /// Most cache tokens one peer may hold [default: a quarter of --cache-tokens, raised to the
    /// model's context length but never past half of --cache-tokens].
    #[arg(long)]
    pub max_cache_tokens_per_peer: Option<usize>,
    /// Bytes that all requests in flight may use besides weights and KV caches (messages,
    /// activations, attention scores, logits, replies), e.g. 4GiB. A request that needs more
    /// is refused with the largest that would pass [default: a quarter of the machine's
    /// memory].
    #[arg(long, value_parser = parse_bytes)]
    pub max_request_memory: Option<u64>,
    /// Requests whose blocks run at once (a long one runs a chunk at a time between others).
    #[arg(long, default_value_t = 2)]
    pub compute_slots: usize,
    /// Most requests one peer may have waiting for or holding request memory.
    #[arg(long, default_value_t = 8)]
    pub max_requests_per_peer: usize,
    /// Long prompts, replays and stateless requests run this many tokens (per row) at a time.
    #[arg(long, default_value_t = 1024)]
    pub chunk_tokens: usize,
    /// Most tokens of one batched forward: the steps of many sessions (decodes, prefill
    /// chunks) run as one pass through the blocks, up to this many tokens [default: twice
    /// --chunk-tokens, so a prefill chunk and the decodes beside it go together].
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Milliseconds a batch may wait for the steps of sessions that stepped in the last second
    /// before it runs (more sessions a forward, each step later); 0 runs whatever is ready the
    /// moment the device frees.
    #[arg(long, default_value_t = 0)]
    pub batch_wait_ms: u64,
    /// Rebalancing: about every SECS seconds (a random period of this mean), move to other
    /// blocks if that raises the swarm's weakest block enough (see --balance-quality). On by
    /// default (60) for a server that chose its own blocks; with --blocks, only when given.
    #[arg(long, value_name = "SECS")]
    pub balance_period: Option<f64>,
    /// Move only if the weakest block's throughput now, over what it would be after the move
    /// (with every other server moving to its best place too), is below Q: 0.75 moves when the
    /// weakest block would gain a third; 0 never moves.
    #[arg(long, value_name = "Q", default_value_t = 0.75)]
    pub balance_quality: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (sessions, cache, steps and tokens,
    /// batch sizes, latencies, errors by kind, connections), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Most connections; at the limit a new one replaces the oldest of a peer that holds
    /// nothing here.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: u32,
    /// Most connections one peer may have open.
    #[arg(long, default_value_t = 8)]
    pub max_connections_per_peer: u32,
    /// Most inbound streams waiting for their first message (in total).
    #[arg(long, default_value_t = 256)]
    pub max_pending_streams: usize,
    /// Most inbound streams of one peer waiting for their first message.
    #[arg(long, default_value_t = 16)]
    pub max_pending_streams_per_peer: usize,
    /// Seconds a new stream has to send its first message (a session's `Open`).
    #[arg(long, default_value_t = 10)]
    pub open_timeout: u64,
    /// Seconds a peer has to take each reply; one that stops reading loses its session.
    #[arg(long, default_value_t = 30)]
    pub write_timeout: u64,
    /// Seconds a request may wait for memory, compute or cache before it is told "busy".
    #[arg(long, default_value_t = 10)]
    pub queue_timeout: u64,
    /// Seconds a DHT announcement lives; it is renewed at a third of that.
    #[arg(long, default_value_t = 120)]
    pub announce_ttl: u64,
    /// Seconds an idle session keeps its cache.
    #[arg(long, default_value_t = 300)]
    pub session_timeout: u64,
    /// Write the announced addresses here (one per line) once announced.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Serve the model's client bundle (tokenizer, config, embeddings, LM head) over HTTP on
    /// this address, for browsers and `corolla generate --model FINGERPRINT` (e.g.
    /// 0.0.0.0:8081); its URLs and content digests go into the signed DHT record.
    #[arg(long)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// The public base URL of --http-listen, as clients reach it (default: http://ADDR): a
    /// reverse proxy or CDN in front of it, say. Clients check what they get from it against
    /// the digests in this server's record.
    #[arg(long, requires = "http_listen")]
    pub http_url: Option<String>,
    /// Also run the embeddings and LM head for clients that cannot hold them (a browser
    /// facing a very large vocabulary): head service, on /corolla/head/2.
    #[arg(long)]
    pub serve_head: bool,
    /// PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors) to offer;
    /// each is named after its folder, and clients pick one per session.
    #[arg(long, num_args = 1..)]
    pub adapters: Vec<PathBuf>,
    /// Join a private swarm with this pre-shared key (the IPFS swarm.key format): connections
    /// run over TCP and relay circuits under `pnet`, QUIC is off, WebRTC-direct (for browsers)
    /// serves nothing until the peer proves the key, and the DHT records are sealed. Peers
    /// without the key cannot connect, list models or open sessions.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Accept connections only from this peer (repeatable; the --initial-peers always are);
    /// without it, from anyone.
    #[arg(long = "allow-peer", value_name = "PEER_ID")]
    pub allow_peer: Vec<PeerId>,
    #[cfg(feature = "fault-injection")]
    #[command(flatten)]
    pub faults: crate::faults::FaultArgs,
}

/// When and how readily the server moves to other blocks.
#[derive(Debug, Clone, Copy)]
pub struct Balance {
    /// The mean of the random wait between checks.
    pub period: Duration,
    /// `--balance-quality`, above 0.
    pub quality: f64,
}

/// Petals' mean period between rebalancing checks.
const DEFAULT_BALANCE_PERIOD: f64 = 60.0;

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model: PathBuf,
    pub blocks: Option<(usize, usize)>,
    pub num_blocks: Option<usize>,
    pub initial_peers: Vec<Multiaddr>,
    pub listen: Vec<Multiaddr>,
    pub backend: BackendKind,
    pub dtype: Precision,
    /// Quantize projections on load (`--quant`).
    pub quant: Option<QuantKind>,
    pub identity: Option<PathBuf>,
    pub public_name: Option<String>,
    pub max_sessions: usize,
    pub max_sessions_per_peer: usize,
    pub cache_tokens: usize,
    /// `None`: derived from the model's context once it is known.
    pub max_cache_tokens_per_peer: Option<usize>,
    pub max_request_memory: u64,
    pub compute_slots: usize,
    pub max_requests_per_peer: usize,
    pub chunk_tokens: usize,
    pub max_batch_tokens: usize,
    pub batch_wait: Duration,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Rebalancing, when on.
    pub balance: Option<Balance>,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_pending_streams: usize,
    pub max_pending_streams_per_peer: usize,
    pub open_timeout: Duration,
    pub write_timeout: Duration,
    pub queue_timeout: Duration,
    pub announce_ttl: Duration,
    pub session_timeout: Duration,
    pub addr_file: Option<PathBuf>,
    pub http_listen: Option<std::net::SocketAddr>,
    pub http_url: Option<String>,
    pub serve_head: bool,
    pub adapters: Vec<PathBuf>,
    pub swarm_key: Option<SwarmKey>,
    /// Only these peers (and the initial peers) may connect, if set.
    pub allow_peers: Option<Vec<PeerId>>,
    /// Test-only lies (feature `fault-injection`); none otherwise.
    pub faults: crate::faults::Faults,
}

impl ServerArgs {
    pub fn validate(self) -> Result<ServerConfig> {
        #[cfg(feature = "fault-injection")]
        let faults = self.faults.validate()?;
        #[cfg(not(feature = "fault-injection"))]
        let faults = crate::faults::Faults::default();
        let blocks = match &self.blocks {
            Some(text) => {
                let (a, b) = text.split_once(':').context("--blocks must look like START:END")?;
                let a: usize = a.trim().parse().context("--blocks START is not a number")?;
                let b: usize = b.trim().parse().context("--blocks END is not a number")?;
                if a >= b {
                    bail!("--blocks {a}:{b} is empty (END is exclusive)");
                }
                Some((a, b))
            }
            None => None,
        };
        if blocks.is_none() && self.num_blocks.is_none() && self.backend == BackendKind::Cpu {
            bail!("give --blocks START:END or --num-blocks N (GPU servers can fill their memory instead)");
        }
        if self.quant != QuantArg::None && self.backend == BackendKind::Wgpu {
            bail!("--quant needs --backend cpu or cuda (wgpu has no kernel for quantized weights)");
        }
        if self.num_blocks == Some(0) {
            bail!("--num-blocks must be at least 1");
        }
        if self.max_sessions == 0 || self.cache_tokens == 0 {
            bail!("--max-sessions and --cache-tokens must be positive");
        }
        let max_ttl = swarm::record::MAX_ANNOUNCE_TTL.as_secs();
        if !(3..=max_ttl).contains(&self.announce_ttl) {
            bail!("--announce-ttl must be 3 to {max_ttl} seconds (clients refuse records that live longer)");
        }
        let positive = [
            (
                "--max-sessions-per-peer",
                self.max_sessions_per_peer.unwrap_or(1) as u64,
            ),
            (
                "--max-cache-tokens-per-peer",
                self.max_cache_tokens_per_peer.unwrap_or(1) as u64,
            ),
            ("--max-request-memory", self.max_request_memory.unwrap_or(1)),
            ("--compute-slots", self.compute_slots as u64),
            ("--max-requests-per-peer", self.max_requests_per_peer as u64),
            ("--chunk-tokens", self.chunk_tokens as u64),
            ("--max-batch-tokens", self.max_batch_tokens.unwrap_or(1) as u64),
            ("--max-connections", u64::from(self.max_connections)),
            ("--max-connections-per-peer", u64::from(self.max_connections_per_peer)),
            ("--max-pending-streams", self.max_pending_streams as u64),
            (
                "--max-pending-streams-per-peer",
                self.max_pending_streams_per_peer as u64,
            ),
            ("--open-timeout", self.open_timeout),
            ("--write-timeout", self.write_timeout),
            ("--queue-timeout", self.queue_timeout),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{flag} must be at least 1");
        }
        if self.batch_wait_ms > 1000 {
            bail!("--batch-wait-ms must be at most 1000 (a batch waits for sessions that stepped in the last second)");
        }
        if let Some(p) = self.balance_period
            && !(p.is_finite() && (0.1..=86_400.0).contains(&p))
        {
            bail!("--balance-period must be 0.1 to 86400 seconds");
        }
        if !(self.balance_quality.is_finite() && self.balance_quality >= 0.0) {
            bail!("--balance-quality must be a number, at least 0 (0 never moves)");
        }
        let balance =
            (self.balance_quality > 0.0 && (blocks.is_none() || self.balance_period.is_some())).then(|| Balance {
                period: Duration::from_secs_f64(self.balance_period.unwrap_or(DEFAULT_BALANCE_PERIOD)),
                quality: self.balance_quality,
            });
        let swarm_key = self.swarm_key.as_deref().map(SwarmKey::read).transpose()?;
        let listen = if self.listen.is_empty() && swarm_key.is_some() {
            // QUIC cannot carry the key; WebRTC-direct waits for a proof of it.
            vec![
                "/ip4/0.0.0.0/tcp/0".parse()?,
                "/ip4/0.0.0.0/udp/0/webrtc-direct".parse()?,
            ]
        } else if self.listen.is_empty() {
            // WebRTC-direct lets browsers dial the server without a relay in between.
            vec![
                "/ip4/0.0.0.0/tcp/0".parse()?,
                "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
                "/ip4/0.0.0.0/udp/0/webrtc-direct".parse()?,
            ]
        } else {
            self.listen
        };
        Ok(ServerConfig {
            model: self.model,
            blocks,
            num_blocks: self.num_blocks,
            initial_peers: self.initial_peers,
            listen,
            backend: self.backend,
            dtype: match self.dtype {
                DtypeArg::F32 => Precision::F32,
                DtypeArg::F16 => Precision::F16,
                DtypeArg::Bf16 => Precision::Bf16,
            },
            quant: self.quant.kind(),
            identity: self.identity,
            public_name: self.public_name,
            max_sessions: self.max_sessions,
            max_sessions_per_peer: self
                .max_sessions_per_peer
                .unwrap_or((self.max_sessions / 4).max(1))
                .min(self.max_sessions),
            cache_tokens: self.cache_tokens,
            max_cache_tokens_per_peer: self.max_cache_tokens_per_peer.map(|n| n.min(self.cache_tokens)),
            max_request_memory: self
                .max_request_memory
                .unwrap_or_else(crate::memory::default_request_memory),
            compute_slots: self.compute_slots,
            max_requests_per_peer: self.max_requests_per_peer,
            chunk_tokens: self.chunk_tokens,
            max_batch_tokens: self.max_batch_tokens.unwrap_or(2 * self.chunk_tokens),
            batch_wait: Duration::from_millis(self.batch_wait_ms),
            metrics_listen: self.metrics_listen,
            balance,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_pending_streams: self.max_pending_streams,
            max_pending_streams_per_peer: self.max_pending_streams_per_peer.min(self.max_pending_streams),
            open_timeout: Duration::from_secs(self.open_timeout),
            write_timeout: Duration::from_secs(self.write_timeout),
            queue_timeout: Duration::from_secs(self.queue_timeout),
            announce_ttl: Duration::from_secs(self.announce_ttl),
            session_timeout: Duration::from_secs(self.session_timeout),
            addr_file: self.addr_file,
            http_listen: self.http_listen,
            http_url: self.http_url.map(|u| u.trim_end_matches('/').to_string()),
            serve_head: self.serve_head,
            adapters: self.adapters,
            swarm_key,
            allow_peers: (!self.allow_peer.is_empty()).then_some(self.allow_peer),
            faults,
        })
    }
}

/// Parses a byte count: a number with an optional binary suffix (`512MiB`, `4GiB`, `64k`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a byte count"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown byte suffix {other:?} (use KiB, MiB, GiB or TiB)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &[&str]) -> Result<ServerConfig> {
        let mut argv = vec!["server", "--model", "m", "--initial-peers", "/ip4/127.0.0.1/tcp/1"];
        argv.extend_from_slice(extra);
        ServerArgs::try_parse_from(argv)?.validate()
    }

    #[test]
    fn rebalancing_is_on_for_servers_that_chose_their_blocks() {
        let auto = config(&["--num-blocks", "2"]).expect("valid");
        let balance = auto.balance.expect("on by default");
        assert_eq!(balance.period, Duration::from_secs(60));
        assert_eq!(balance.quality, 0.75);
        // --blocks fixes the span unless a period is asked for.
        assert!(config(&["--blocks", "0:2"]).expect("valid").balance.is_none());
        let asked = config(&["--blocks", "0:2", "--balance-period", "1.5"]).expect("valid");
        assert_eq!(asked.balance.map(|b| b.period), Some(Duration::from_millis(1500)));
        assert!(
            config(&["--num-blocks", "2", "--balance-quality", "0"])
                .expect("valid")
                .balance
                .is_none()
        );
        for bad in [
            &["--num-blocks", "2", "--balance-period", "0"][..],
            &["--num-blocks", "2", "--balance-period", "NaN"],
            &["--num-blocks", "2", "--balance-quality", "-1"],
            &["--num-blocks", "2", "--balance-quality", "inf"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}

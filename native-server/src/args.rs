use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use libp2p::Multiaddr;
use shared_model::precision::Precision;
use shared_model::quant::QuantKind;

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
    /// An HF-layout model folder or a `.gguf` file.
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
    /// KV cache budget in tokens (batch x max_length summed over open sessions).
    #[arg(long, default_value_t = 65536)]
    pub cache_tokens: usize,
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
    /// this address, for browsers (e.g. 0.0.0.0:8081).
    #[arg(long)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// The public base URL of --http-listen, as browsers reach it (default: http://ADDR).
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
}

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
    pub cache_tokens: usize,
    pub announce_ttl: Duration,
    pub session_timeout: Duration,
    pub addr_file: Option<PathBuf>,
    pub http_listen: Option<std::net::SocketAddr>,
    pub http_url: Option<String>,
    pub serve_head: bool,
    pub adapters: Vec<PathBuf>,
}

impl ServerArgs {
    pub fn validate(self) -> Result<ServerConfig> {
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
        if self.max_sessions == 0 || self.cache_tokens == 0 || self.announce_ttl < 3 {
            bail!("--max-sessions and --cache-tokens must be positive, --announce-ttl at least 3 seconds");
        }
        let listen = if self.listen.is_empty() {
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
            cache_tokens: self.cache_tokens,
            announce_ttl: Duration::from_secs(self.announce_ttl),
            session_timeout: Duration::from_secs(self.session_timeout),
            addr_file: self.addr_file,
            http_listen: self.http_listen,
            http_url: self.http_url.map(|u| u.trim_end_matches('/').to_string()),
            serve_head: self.serve_head,
            adapters: self.adapters,
        })
    }
}

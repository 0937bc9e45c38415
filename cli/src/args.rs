use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "corolla",
    version,
    about = "Run large language models across other people's GPUs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text (or token ids) from a prompt.
    Generate(GenerateArgs),
    /// Run one forward pass and write logits and every block's output to a safetensors file.
    Forward(ForwardArgs),
    /// Chat with SmolLM2-135M-Instruct (fetched on first use) on this machine.
    Demo(DemoArgs),
    /// Fetch the demo model into the cache (if needed) and print its path.
    Fetch(FetchArgs),
    /// Prompt-tune the model (its weights stay frozen), locally or through the swarm.
    Train(crate::train::TrainArgs),
    /// Time blocks (decode, prefill) and whole-model decode of a model shape with random weights.
    Bench(BenchArgs),
    /// Serve an OpenAI-compatible API (chat and text completions, models) over the swarm or a
    /// model run here.
    Api(crate::api::ApiArgs),
}

/// Compute backend for the blocks, embeddings and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// NVIDIA GPUs through burn-cuda (build with `--features cuda`).
    Cuda,
    /// WebGPU/Vulkan/Metal through burn-wgpu (build with `--features wgpu`).
    Wgpu,
}

/// Element type the model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn precision(self) -> shared_model::precision::Precision {
        use shared_model::precision::Precision;
        match self {
            Self::F32 => Precision::F32,
            Self::F16 => Precision::F16,
            Self::Bf16 => Precision::Bf16,
        }
    }
}

/// Quantize projections on load (the server's `--quant`, shared).
pub use corolla_server::QuantArg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShapeArg {
    Tiny,
    #[value(name = "llama-8b")]
    Llama8b,
    #[value(name = "llama-70b")]
    Llama70b,
    #[value(name = "bloom-176b")]
    Bloom176b,
}

impl ShapeArg {
    pub fn shape(self) -> shared_model::synthetic::Shape {
        use shared_model::synthetic::Shape;
        match self {
            Self::Tiny => Shape::Tiny,
            Self::Llama8b => Shape::Llama8b,
            Self::Llama70b => Shape::Llama70b,
            Self::Bloom176b => Shape::Bloom176b,
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long, value_enum)]
    pub shape: ShapeArg,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = QuantArg::None)]
    pub quant: QuantArg,
    /// Print one JSON object a line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Blocks in the span timed for the per-block figures.
    #[arg(long, default_value_t = 1)]
    pub blocks: usize,
    /// Cached tokens before the timed decode steps (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub cached: Vec<usize>,
    /// Tokens of the timed prefill (0 skips it).
    #[arg(long, default_value_t = 2048)]
    pub prefill: usize,
    /// Concurrent sessions of the batched-decode measurement, each with the first --cached
    /// tokens cached (comma-separated; e.g. 1,8,32,64): one step of every session as one
    /// batched forward (the server's continuous batching) beside the same steps one session
    /// at a time. Empty skips it.
    #[arg(long, value_delimiter = ',')]
    pub sessions: Vec<usize>,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed runs of each whole measurement before it is timed (JIT compilation, caches).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Tokens of the whole-model greedy decode (0 skips it; shapes too big for one GPU skip it).
    #[arg(long, default_value_t = 64)]
    pub model_tokens: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
#[group(id = "input", required = true, multiple = false)]
pub struct PromptInput {
    /// Prompt text (needs a model with a tokenizer).
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', group = "input")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// An HF-layout model folder, a `.gguf` file or a Hub id `org/name[@revision]` (into
    /// $HF_HOME/hub; with --initial-peers only the embeddings' and head's shards are
    /// downloaded); with --initial-peers also a model
    /// fingerprint (32 hex digits), whose client bundle (tokenizer, embeddings, LM head) is
    /// then downloaded from one of its servers, checked against the server's signed record and
    /// cached.
    #[arg(long)]
    pub model: PathBuf,
    /// Where downloaded client bundles are kept (default: $COROLLA_CACHE, else
    /// ~/.cache/corolla).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub input: PromptInput,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate (fewer only if an end-of-sequence token comes first).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalise tokens already present (HF's repetition_penalty; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty (-2..2; 0 = off): lowers every token already generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty (-2..2; 0 = off): lowers a token by each time it was generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Never stop before --max-new-tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Speculative decoding: draft up to K tokens by prompt lookup (n-grams of the context)
    /// and check them in one step of K + 1 positions; 0 turns it off. Greedy output stays
    /// the same, and so does sampling's distribution.
    #[arg(long, default_value_t = 0, value_name = "K", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub speculative: u16,
    /// Draft with this small model (same tokenizer; a folder, `.gguf` or Hub id, run on
    /// this machine) instead of prompt lookup.
    #[arg(long, value_name = "MODEL", requires = "speculative")]
    pub draft: Option<PathBuf>,
    /// Draft only while it pays: follow whichever of drafting and not drafting has given
    /// more tokens a second lately, trying the other now and then (over a WAN drafts cost
    /// nearly nothing; on a local CPU a wide step can cost more than its kept drafts give).
    /// Seeded sampling then depends on timing; greedy output does not.
    #[arg(long, requires = "speculative")]
    pub adaptive_drafts: bool,
    /// Print one JSON object {"prompt_ids", "token_ids", "text"} instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Element type of the local computation.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Quantize the projections on load (a checkpoint's own quantized tensors stay as stored).
    #[arg(long, value_enum, default_value_t = QuantArg::None)]
    pub quant: QuantArg,
    /// Run the blocks in the swarm reached through these relays / peers (each ending in
    /// /p2p/<peer id>); without them everything runs locally.
    #[arg(long, num_args = 1..)]
    pub initial_peers: Vec<libp2p::Multiaddr>,
    /// The private swarm's pre-shared key (IPFS swarm.key format), if it is one.
    #[arg(long, value_name = "FILE", requires = "initial_peers")]
    pub swarm_key: Option<PathBuf>,
    /// Element type of hidden states on the wire (f16/bf16 halve the traffic, lose precision).
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub wire_dtype: WireDtypeArg,
    /// Route for the lowest latency (chat) or spread by servers' throughput (batch work).
    #[arg(long, value_enum, default_value_t = RoutingArg::Latency)]
    pub routing: RoutingArg,
    /// Share (0 to 1) of servers' answers re-run on another server of the same blocks and
    /// compared; a server two others contradict is banned and its work redone (0: off).
    #[arg(long, default_value_t = swarm::remote::DEFAULT_VERIFY_RATE, value_parser = parse_rate)]
    pub verify: f64,
    /// Seed of the spot checks' sample (default: the clock).
    #[arg(long)]
    pub verify_seed: Option<u64>,
    /// Send every step's output back through this client to the next server (the
    /// client-driven chain: 2 one-way delays a server per token) instead of server to
    /// server (n + 1 one-way delays a token); for comparison.
    #[arg(long, requires = "initial_peers")]
    pub no_push: bool,
    /// Prompts trained by `corolla train` (deep prompts are added by the servers).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A LoRA adapter: with --initial-peers, the name servers announce (`server --adapters`;
    /// only they are used); locally, the adapter's folder.
    #[arg(long)]
    pub adapter: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoutingArg {
    Latency,
    Throughput,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// An HF-layout model folder, a `.gguf` file or a Hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: PathBuf,
    /// The sequence, as comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub token_ids: Vec<u32>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Element type of the computation (outputs are written as f32 either way).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Quantize the projections on load (a checkpoint's own quantized tensors stay as stored).
    #[arg(long, value_enum, default_value_t = QuantArg::None)]
    pub quant: QuantArg,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this model instead of fetching SmolLM2.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Port of the chat page (and of the relay's bootstrap JSON).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Address the local swarm and the page listen on; 0.0.0.0 shares them with the LAN.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// The built chat page (`scripts/build-web.sh` writes it to dist/).
    #[arg(long, default_value = "dist")]
    pub web_root: PathBuf,
    /// How many servers share the model's blocks.
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Chat in this terminal with the whole model in this process (no swarm, no page).
    #[arg(long)]
    pub terminal: bool,
    /// Answer this one message in the terminal and exit (implies --terminal).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub fetch: FetchArgs,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Where fetched models are kept (default: $COROLLA_CACHE, else ~/.cache/corolla).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// A share from 0 to 1.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{text:?} is not a share from 0 to 1")),
    }
}

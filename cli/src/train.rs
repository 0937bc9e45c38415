//! `corolla train`: prompt tuning and deep prompt tuning, locally or through the swarm.
//!
//! The client holds the embeddings, the LM head, the prompts and AdamW; the blocks run behind
//! [`TrainBlocks`] (this process, or servers through stateless span requests), so both give
//! the same numbers. After every step the prompts, optimizer state and loss history are
//! written to `--out` (atomically): running the same command again continues from there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use shared_model::CpuAutodiff;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::{Embeddings, LmHead};
use shared_model::tuning::dataset::{DatasetLimits, parse_jsonl};
use shared_model::tuning::{
    AdamW, Example, Prompts, StepRecord, TrainBatch, TrainBlocks, TrainState, TuningMethod, batch_indices, train_step,
};
use swarm::remote::RemoteBlocks;

use crate::args::{RoutingArg, WireDtypeArg};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// A trainable prompt prepended to the input embeddings.
    Prompt,
    /// The input prompt plus a trainable prefix added before every block.
    DeepPrompt,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// An HF-layout model folder, a `.gguf` file or a Hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: PathBuf,
    /// Run the blocks in the swarm reached through these relays / peers; without them
    /// everything runs locally (same numbers).
    #[arg(long, num_args = 1..)]
    pub initial_peers: Vec<libp2p::Multiaddr>,
    /// The private swarm's pre-shared key (IPFS swarm.key format), if it is one.
    #[arg(long, value_name = "FILE", requires = "initial_peers")]
    pub swarm_key: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value_t = MethodArg::Prompt)]
    pub method: MethodArg,
    /// Trainable prefix positions.
    #[arg(long, default_value_t = 8)]
    pub prefix_len: usize,
    /// JSONL: {"text": ...}, {"prompt": ..., "completion": ...} (loss on the completion) or
    /// {"token_ids": [...]}.
    #[arg(long)]
    pub data: PathBuf,
    /// Total optimizer steps (a resumed run continues up to this many).
    #[arg(long)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f32,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Seed of the prompt initialisation and of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts + optimizer state (safetensors); resumed from if it exists. The loss log is
    /// written next to it as `<name>.csv`.
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object {"losses": [...], "out": PATH} at the end.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub wire_dtype: WireDtypeArg,
    #[arg(long, value_enum, default_value_t = RoutingArg::Latency)]
    pub routing: RoutingArg,
}

/// `--json` output (a contract others check).
#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    losses: Vec<f32>,
    out: &'a Path,
}

pub fn run(args: TrainArgs) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.prefix_len == 0 {
        bail!("--steps, --batch-size and --prefix-len must be positive");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number");
    }
    let files = crate::fetch::open_model(&args.model, None)?;
    let examples = read_data(&files, &args)?;
    let method = match args.method {
        MethodArg::Prompt => TuningMethod::Prompt,
        MethodArg::DeepPrompt => TuningMethod::DeepPrompt,
    };
    let device = Default::default();
    let source = files.weights.as_ref();
    let cfg = &files.config;
    if args.initial_peers.is_empty() {
        let model = LocalModel::<CpuAutodiff>::load(&files, &device).context("cannot load the model")?;
        let mut blocks = shared_model::tuning::LocalTrainBlocks::new(&model.spans, device);
        train(
            &files,
            &args,
            method,
            &examples,
            &model.embeddings,
            &model.head,
            &mut blocks,
        )
    } else {
        let (runtime, client) = crate::remote::connect(&args.initial_peers, args.swarm_key.as_deref())?;
        let embeddings = Embeddings::<CpuAutodiff>::load(cfg, source, &device)?;
        let head = LmHead::<CpuAutodiff>::load(cfg, source, &device)?;
        let config = crate::remote::remote_config(&files, args.wire_dtype, args.routing)?;
        let mut blocks = RemoteBlocks::<CpuAutodiff>::new(runtime.handle().clone(), client, config, device);
        let result = train(&files, &args, method, &examples, &embeddings, &head, &mut blocks);
        drop(blocks);
        result
    }
}

fn read_data(files: &ModelFiles, args: &TrainArgs) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(&args.data).with_context(|| format!("cannot read {}", args.data.display()))?;
    let limits = DatasetLimits {
        vocab_size: files.config.vocab_size,
        context: files.config.max_position_embeddings,
        prefix_len: args.prefix_len,
    };
    parse_jsonl(&text, files.tokenizer.as_ref(), limits).with_context(|| format!("{}", args.data.display()))
}

fn csv_path(out: &Path) -> PathBuf {
    out.with_extension("csv")
}

fn write_csv(path: &Path, history: &[StepRecord]) -> Result<()> {
    let mut text = String::from("step,loss,tokens,seconds\n");
    for (i, r) in history.iter().enumerate() {
        text.push_str(&format!("{i},{},{},{:.3}\n", r.loss, r.tokens, r.seconds));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A fresh state, or the one `--out` holds (which must come from the same settings).
fn initial_state(
    files: &ModelFiles,
    args: &TrainArgs,
    method: TuningMethod,
    embeddings: &Embeddings<CpuAutodiff>,
) -> Result<TrainState> {
    let cfg = &files.config;
    if args.out.exists() {
        let state = TrainState::load(&args.out)?;
        state.prompts.check(cfg.hidden_size, cfg.num_layers)?;
        if state.prompts.method != method
            || state.prompts.prefix_len() != args.prefix_len
            || state.seed != args.seed
            || state.batch_size != args.batch_size
        {
            bail!(
                "{} holds a run with other settings (method {}, prefix {}, seed {}, batch {}): pass another --out to start afresh",
                args.out.display(),
                state.prompts.method.name(),
                state.prompts.prefix_len(),
                state.seed,
                state.batch_size
            );
        }
        eprintln!("resuming {} at step {}", args.out.display(), state.step());
        let mut state = state;
        state.adam.lr = args.lr;
        state.adam.weight_decay = args.weight_decay;
        return Ok(state);
    }
    let prompts = Prompts::init(
        method,
        args.prefix_len,
        cfg.num_layers,
        cfg.vocab_size,
        embeddings,
        args.seed,
    )?;
    Ok(TrainState {
        prompts,
        adam: AdamW::new(args.lr, args.weight_decay),
        seed: args.seed,
        batch_size: args.batch_size,
        history: Vec::new(),
    })
}

fn train<R: TrainBlocks>(
    files: &ModelFiles,
    args: &TrainArgs,
    method: TuningMethod,
    examples: &[Example],
    embeddings: &Embeddings<CpuAutodiff>,
    head: &LmHead<CpuAutodiff>,
    blocks: &mut R,
) -> Result<()>
where
    R::Error: std::error::Error + Send + Sync + 'static,
{
    let mut state = initial_state(files, args, method, embeddings)?;
    let csv = csv_path(&args.out);
    write_csv(&csv, &state.history)?;
    let offset = state.history.last().map_or(0.0, |r| r.seconds);
    let started = Instant::now();
    let pad_id = 0;
    for step in state.step()..args.steps {
        let picked = batch_indices(examples.len(), args.batch_size, args.seed, step);
        let chosen: Vec<&Example> = picked.iter().map(|&i| &examples[i]).collect();
        let batch = TrainBatch::new(&chosen, pad_id)?;
        let tokens = batch.tokens;
        let t0 = Instant::now();
        let (loss, grads) = train_step(embeddings, head, blocks, &state.prompts, &batch)?;
        if !loss.is_finite() {
            bail!("the loss became {loss} at step {step}: lower --lr");
        }
        state.apply(&grads)?;
        let record = StepRecord {
            loss,
            tokens,
            seconds: offset + started.elapsed().as_secs_f64(),
        };
        state.history.push(record);
        state.save(&args.out)?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&csv)
            .with_context(|| format!("cannot write {}", csv.display()))?;
        writeln!(log, "{step},{},{},{:.3}", record.loss, record.tokens, record.seconds)?;
        let rate = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        eprintln!("step {}/{} loss {loss:.4} tokens/s {rate:.0}", step + 1, args.steps);
    }
    if args.json {
        let out = JsonOutput {
            losses: state.history.iter().map(|r| r.loss).collect(),
            out: &args.out,
        };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        eprintln!(
            "prompts written to {} (loss log: {})",
            args.out.display(),
            csv.display()
        );
    }
    Ok(())
}

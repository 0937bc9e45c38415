//! `corolla bench`: block and whole-model timings of a model shape with random weights.
//!
//! Everything runs through the real loading path ([`BlockSpan::load`] over a
//! [`WeightSource`]) and the real block code, so the figures are those of a server.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::prelude::*;
use burn::tensor::Distribution;
use serde_json::{Value, json};
use shared_model::ModelConfig;
use shared_model::generate::{GenerateParams, LocalBlocks, generate};
use shared_model::model::{BlockSpan, Embeddings, LmHead};
use shared_model::sampling::SamplingParams;
use shared_model::synthetic::{QuantizeOnLoad, RandomWeights, Shape, tensor_shapes};
use shared_model::weights::WeightSource;

use crate::args::BenchArgs;
use crate::backend::{OnBackend, dispatch};

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.blocks > 0, "--blocks must be at least 1");
    ensure!(args.iters > 0, "--iters must be at least 1");
    dispatch(args.backend, Job { args: &args })
}

struct Job<'a> {
    args: &'a BenchArgs,
}

impl OnBackend for Job<'_> {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let precision = args.dtype.precision();
        precision.apply::<B>(&device)?;
        let shape = args.shape.shape();
        let config = shape.config()?;
        ensure!(
            args.blocks <= config.num_layers,
            "--blocks {} exceeds the {} blocks of {}",
            args.blocks,
            config.num_layers,
            shape.name()
        );
        let random: Arc<dyn WeightSource> = Arc::new(RandomWeights::new(&config, args.seed)?);
        let source: Arc<dyn WeightSource> = match args.quant.kind() {
            Some(kind) => Arc::new(QuantizeOnLoad::new(random, kind)),
            None => random,
        };
        let out = Reporter {
            json: args.json,
            common: json!({
                "shape": shape.name(),
                "backend": B::name(&device),
                "dtype": precision.name(),
                "quant": format!("{:?}", args.quant).to_lowercase(),
            }),
        };

        let start = Instant::now();
        let span = BlockSpan::<B>::load(&config, source.as_ref(), 0..args.blocks, &device)?;
        B::sync(&device).ok();
        out.emit(json!({
            "what": "load",
            "blocks": args.blocks,
            "ms": ms(start),
            "weight_bytes_per_block": block_weight_bytes(&config, precision.bytes(), args.quant.kind())?,
        }));

        for &cached in &args.cached {
            let (per_step, warmup_ms, queued) = time_decode(&span, &config, cached, args, &device)?;
            out.emit(json!({
                "what": "decode",
                "cached": cached,
                "blocks": args.blocks,
                "iters": args.iters,
                "ms_per_block": per_step / args.blocks as f64,
                "queued_ms_per_block": queued / args.blocks as f64,
                "warmup_ms": warmup_ms,
            }));
        }
        let cached = args.cached.first().copied().unwrap_or(0);
        for &sessions in &args.sessions {
            ensure!(sessions > 0, "--sessions must be positive");
            let (batched, one_by_one) = time_batched_decode(&span, &config, cached, sessions, args, &device)?;
            out.emit(json!({
                "what": "batched_decode",
                "sessions": sessions,
                "cached": cached,
                "blocks": args.blocks,
                "iters": args.iters,
                "batched_ms_per_step": batched,
                "one_by_one_ms_per_step": one_by_one,
                "batched_tokens_per_s": sessions as f64 * 1e3 / batched,
                "one_by_one_tokens_per_s": sessions as f64 * 1e3 / one_by_one,
            }));
        }
        if args.prefill > 0 {
            let (per_step, warmup_ms) = time_prefill(&span, &config, args, &device)?;
            out.emit(json!({
                "what": "prefill",
                "tokens": args.prefill,
                "blocks": args.blocks,
                "iters": args.iters,
                "ms_per_block": per_step / args.blocks as f64,
                "warmup_ms": warmup_ms,
            }));
        }
        drop(span);

        let fits = matches!(shape, Shape::Tiny | Shape::Llama8b);
        if args.model_tokens > 0 && fits {
            out.emit(time_model::<B>(&config, source.as_ref(), args, &device)?);
        } else if args.model_tokens > 0 {
            out.emit(json!({
                "what": "model_decode",
                "skipped": "the whole model does not fit one GPU",
            }));
        }
        Ok(())
    }
}

struct Reporter {
    json: bool,
    common: Value,
}

impl Reporter {
    fn emit(&self, record: Value) {
        let mut all = self.common.clone();
        if let (Some(all), Value::Object(fields)) = (all.as_object_mut(), record) {
            all.extend(fields);
        }
        if self.json {
            println!("{all}");
        } else {
            let line: Vec<String> = all
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| match v {
                    Value::Number(n) if n.is_f64() => format!("{k}={:.3}", n.as_f64().unwrap_or(0.0)),
                    Value::String(s) => format!("{k}={s}"),
                    v => format!("{k}={v}"),
                })
                .collect();
            println!("{}", line.join(" "));
        }
    }
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Bytes of one block's weights as held on the device (projections quantized or not).
fn block_weight_bytes(
    config: &ModelConfig,
    elem: usize,
    quant: Option<shared_model::quant::QuantKind>,
) -> Result<usize> {
    let prefix = shared_model::checkpoint::block_prefix(config.family, 0);
    let shapes = tensor_shapes(config)?;
    Ok(shapes
        .iter()
        .filter(|(name, _)| name.starts_with(&prefix))
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            match quant {
                Some(kind) if shape.len() == 2 => n / 32 * kind.block_bytes(),
                _ => n * elem,
            }
        })
        .sum())
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

/// A cache for one sequence holding `cached` random keys and values in every block.
fn filled_cache<B: Backend>(
    span: &BlockSpan<B>,
    config: &ModelConfig,
    cached: usize,
    device: &B::Device,
) -> Result<shared_model::cache::SpanCache<B>> {
    let mut cache = span.new_cache(vec![0]);
    if cached > 0 {
        let a = config.attention;
        for layer in &mut cache.layers {
            let shape = [1, a.num_kv_heads, cached, a.head_dim];
            layer.append(random(shape, device), random(shape, device))?;
        }
        cache.len = cached;
    }
    Ok(cache)
}

/// Mean time of one decode step of the span after `cached` tokens, the warm-up's total, and
/// the mean time of steps queued without waiting for each.
///
/// Each step waits for the device, as a server must before it replies. The cache grows by one
/// token per step, as in a real session. The warm-up runs the same steps from the same cache
/// length first: burn compiles kernels for each new cache length, once per process (and keeps
/// them on disk), and a server meets each length once per process too.
fn time_decode<B: Backend>(
    span: &BlockSpan<B>,
    config: &ModelConfig,
    cached: usize,
    args: &BenchArgs,
    device: &B::Device,
) -> Result<(f64, f64, f64)> {
    let x = random::<B, 3>([1, 1, config.hidden_size], device);
    let steps = |n: usize| -> Result<f64> {
        let mut cache = filled_cache(span, config, cached, device)?;
        B::sync(device).ok();
        let start = Instant::now();
        for _ in 0..n {
            span.forward(x.clone(), &mut cache)?;
            B::sync(device).ok();
        }
        Ok(ms(start))
    };
    let mut warmup = 0.0;
    for _ in 0..args.warmup {
        warmup += steps(args.iters)?;
    }
    let per_step = steps(args.iters)? / args.iters as f64;
    // The same steps queued back to back with one wait at the end: the gap to `per_step` is
    // what waiting for each step costs (the host's launches no longer overlap the GPU's work).
    let mut cache = filled_cache(span, config, cached, device)?;
    B::sync(device).ok();
    let start = Instant::now();
    for _ in 0..args.iters {
        span.forward(x.clone(), &mut cache)?;
    }
    B::sync(device).ok();
    Ok((per_step, warmup, ms(start) / args.iters as f64))
}

/// Mean time of one decode step of `sessions` sessions (each with `cached` tokens cached) run
/// as one batched forward, and of the same steps run one session at a time, each waiting for
/// the device as a server's reply does.
fn time_batched_decode<B: Backend>(
    span: &BlockSpan<B>,
    config: &ModelConfig,
    cached: usize,
    sessions: usize,
    args: &BenchArgs,
    device: &B::Device,
) -> Result<(f64, f64)> {
    let x = random::<B, 3>([1, 1, config.hidden_size], device);
    let caches = || -> Result<Vec<_>> {
        (0..sessions)
            .map(|_| filled_cache(span, config, cached, device))
            .collect()
    };
    let batched = |n: usize| -> Result<f64> {
        let mut caches = caches()?;
        B::sync(device).ok();
        let start = Instant::now();
        for _ in 0..n {
            let steps = caches.iter_mut().map(|c| (x.clone(), c)).collect();
            span.forward_batch(steps, span.range())?;
            B::sync(device).ok();
        }
        Ok(ms(start) / n as f64)
    };
    let one_by_one = |n: usize| -> Result<f64> {
        let mut caches = caches()?;
        B::sync(device).ok();
        let start = Instant::now();
        for _ in 0..n {
            for cache in &mut caches {
                span.forward(x.clone(), cache)?;
                B::sync(device).ok();
            }
        }
        Ok(ms(start) / n as f64)
    };
    for _ in 0..args.warmup {
        batched(args.iters)?;
        one_by_one(args.iters)?;
    }
    Ok((batched(args.iters)?, one_by_one(args.iters)?))
}

/// Mean time of a prefill of `--prefill` tokens into an empty cache, and the warm-up's total.
fn time_prefill<B: Backend>(
    span: &BlockSpan<B>,
    config: &ModelConfig,
    args: &BenchArgs,
    device: &B::Device,
) -> Result<(f64, f64)> {
    let x = random::<B, 3>([1, args.prefill, config.hidden_size], device);
    let run = || -> Result<()> {
        let mut cache = span.new_cache(vec![0]);
        span.forward(x.clone(), &mut cache)?;
        B::sync(device).ok();
        Ok(())
    };
    let start = Instant::now();
    for _ in 0..args.warmup {
        run()?;
    }
    let warmup = ms(start);
    let start = Instant::now();
    for _ in 0..args.iters {
        run()?;
    }
    Ok((ms(start) / args.iters as f64, warmup))
}

/// Greedy decode of the whole model (embeddings, every block, LM head and sampling on the
/// host, as `corolla generate` runs it): tokens per second after the first token.
fn time_model<B: Backend>(
    config: &ModelConfig,
    source: &dyn WeightSource,
    args: &BenchArgs,
    device: &B::Device,
) -> Result<Value> {
    let start = Instant::now();
    let embeddings = Embeddings::<B>::load(config, source, device)?;
    let spans = vec![BlockSpan::<B>::load(config, source, 0..config.num_layers, device)?];
    let head = LmHead::<B>::load(config, source, device)?;
    B::sync(device).ok();
    let load_ms = ms(start);
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 7919 + 3) % config.vocab_size as u32).collect();
    let run = |tokens: usize| -> Result<Vec<Instant>> {
        let params = GenerateParams {
            max_new_tokens: tokens,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            ignore_eos: true,
            speculative: 0,
        };
        let mut blocks = LocalBlocks::new(&spans)?;
        let mut times = Vec::with_capacity(tokens);
        generate(&embeddings, &head, &mut blocks, &[prompt.clone()], &params, |_| {
            times.push(Instant::now());
            ControlFlow::Continue(())
        })
        .context("generation failed")?;
        Ok(times)
    };
    // The same generation twice: the first compiles the kernels for every sequence length.
    let start = Instant::now();
    run(args.model_tokens.max(2))?;
    let warmup_ms = ms(start);
    let times = run(args.model_tokens.max(2))?;
    let (first, last) = (times[0], times[times.len() - 1]);
    let decode_s = last.duration_since(first).as_secs_f64();
    Ok(json!({
        "what": "model_decode",
        "layers": config.num_layers,
        "prompt": prompt.len(),
        "tokens": times.len(),
        "tokens_per_s": (times.len() - 1) as f64 / decode_s,
        "load_ms": load_ms,
        "warmup_ms": warmup_ms,
    }))
}

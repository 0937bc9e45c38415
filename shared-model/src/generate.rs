//! The generation loop, shared by local runs and the swarm client: embeddings and LM head
//! here, the blocks behind a [`BlockRunner`] (local spans, or remote servers).

use std::ops::ControlFlow;

use burn::prelude::*;

use crate::cache::SpanCache;
use crate::error::ModelError;
use crate::layers::lora::{LoraAdapter, LoraSpan};
use crate::model::{BlockSpan, DEFAULT_CHUNK_TOKENS, Embeddings, LmHead, to_host};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::speculative::{self, Draft, Drafter, PromptLookup};

/// Runs hidden states through every block of the model, keeping per-session state.
pub trait BlockRunner<B: Backend> {
    type Error: From<ModelError> + From<SamplingError>;

    /// Starts a session for a batch whose rows are left-padded by `pad[row]` tokens and will
    /// hold at most `max_length` tokens.
    fn start(&mut self, pad: Vec<usize>, max_length: usize) -> Result<(), Self::Error>;

    /// Feeds the next positions of every row.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, new, hidden]`
    /// - returns `[batch, new, hidden]`, the last block's raw output
    fn step(&mut self, hidden: Tensor<B, 3>) -> Result<Tensor<B, 3>, Self::Error>;

    /// Forgets every position from `len` on (padding included), as if only the first `len`
    /// had been fed: speculative decoding's rejected drafts. The next step continues there.
    fn rollback(&mut self, len: usize) -> Result<(), Self::Error>;
}

/// Errors of a local generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
}

/// Blocks run in this process: spans covering `[0, num_layers)` in order.
pub struct LocalBlocks<'a, B: Backend> {
    spans: &'a [BlockSpan<B>],
    caches: Vec<SpanCache<B>>,
    /// Deep prompts of each span's blocks (see [`crate::tuning`]).
    deep: Option<Vec<Tensor<B, 3>>>,
    /// A LoRA adapter's updates for each span.
    lora: Option<Vec<LoraSpan<B>>>,
    /// Positions per chunk of a long step (a prompt).
    chunk_tokens: usize,
}

impl<'a, B: Backend> LocalBlocks<'a, B> {
    pub fn new(spans: &'a [BlockSpan<B>]) -> Result<Self, ModelError> {
        let mut next = 0;
        for span in spans {
            if span.range().start != next {
                return Err(ModelError::Invalid(format!(
                    "spans are not contiguous: expected block {next}, got {:?}",
                    span.range()
                )));
            }
            next = span.range().end;
        }
        match spans.first() {
            Some(first) if next == first.config().num_layers => Ok(Self {
                spans,
                caches: Vec::new(),
                deep: None,
                lora: None,
                chunk_tokens: DEFAULT_CHUNK_TOKENS,
            }),
            _ => Err(ModelError::Invalid(format!(
                "spans cover blocks 0..{next}, not the whole model"
            ))),
        }
    }
}

impl<B: Backend> LocalBlocks<'_, B> {
    /// Runs steps longer than `chunk_tokens` positions in chunks (default
    /// [`DEFAULT_CHUNK_TOKENS`]; see [`BlockSpan::forward_chunked`]).
    pub fn with_chunk_tokens(mut self, chunk_tokens: usize) -> Self {
        self.chunk_tokens = chunk_tokens.max(1);
        self
    }

    /// Adds deep prompts before every block.
    ///
    /// # Shapes
    /// - `deep`: `[num_layers, prefix_len, hidden]`
    pub fn with_deep_prompts(mut self, deep: Tensor<B, 3>) -> Self {
        self.deep = Some(
            self.spans
                .iter()
                .map(|s| deep.clone().narrow(0, s.range().start, s.range().len()))
                .collect(),
        );
        self
    }

    /// Applies a LoRA adapter loaded for the whole model.
    pub fn with_lora(mut self, adapter: &LoraAdapter) -> Result<Self, ModelError> {
        if adapter.range.start > 0 || self.spans.last().is_some_and(|s| s.range().end > adapter.range.end) {
            return Err(ModelError::Invalid(format!(
                "adapter {} covers blocks {:?} only",
                adapter.name, adapter.range
            )));
        }
        let Some(device) = self.spans.first().map(BlockSpan::device) else {
            return Ok(self);
        };
        let span = adapter.to_device::<B>(&device);
        self.lora = Some(self.spans.iter().map(|_| span.clone()).collect());
        Ok(self)
    }
}

impl<B: Backend> BlockRunner<B> for LocalBlocks<'_, B> {
    type Error = GenerateError;

    fn start(&mut self, pad: Vec<usize>, max_length: usize) -> Result<(), GenerateError> {
        self.caches = self
            .spans
            .iter()
            .map(|s| s.new_session_cache(pad.clone(), max_length))
            .collect();
        Ok(())
    }

    fn step(&mut self, hidden: Tensor<B, 3>) -> Result<Tensor<B, 3>, GenerateError> {
        let mut h = hidden;
        for (i, (span, cache)) in self.spans.iter().zip(self.caches.iter_mut()).enumerate() {
            let deep = self.deep.as_ref().map(|d| &d[i]);
            h = span.forward_chunked(
                h,
                cache,
                span.range(),
                deep,
                self.lora.as_ref().and_then(|l| l.get(i)),
                self.chunk_tokens,
            )?;
        }
        Ok(h)
    }

    fn rollback(&mut self, len: usize) -> Result<(), GenerateError> {
        for cache in &mut self.caches {
            cache.truncate(len).map_err(ModelError::from)?;
        }
        Ok(())
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end a row (EOS, end-of-turn); the stop token is kept in the output.
    pub stop_ids: Vec<u32>,
    /// Never stop before `max_new_tokens`.
    pub ignore_eos: bool,
    /// Draft tokens checked per step (speculative decoding, see [`crate::speculative`]);
    /// 0 turns it off. The tokens' distribution does not change, nor greedy output.
    pub speculative: usize,
}

/// One generated token, as it is produced.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    pub row: usize,
    pub token: u32,
    /// Whether this token ends the row (a stop token).
    pub last: bool,
    /// Whether it is a draft the model accepted (it came in the same step as the one before).
    pub drafted: bool,
    /// The step through the blocks that gave it (0: the prompt's).
    pub step: usize,
    /// How many draft tokens this row had checked in that step.
    pub proposed: usize,
}

/// Generates up to `max_new_tokens` for each prompt (rows may differ in length: they are
/// left-padded). `on_token` sees every token as it comes and may stop a row early (stop
/// strings, a user's Stop button) by returning `Break`.
///
/// Returns the new tokens of each row.
pub fn generate<B: Backend, R: BlockRunner<B>>(
    embeddings: &Embeddings<B>,
    head: &LmHead<B>,
    blocks: &mut R,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Vec<Vec<u32>>, R::Error> {
    generate_with_prefix(embeddings, head, blocks, prompts, None, params, on_token)
}

/// [`generate`] with a trained input prompt (see [`crate::tuning`]) placed before every row's
/// tokens, right after its left padding. Deep prompts, if any, are the block runner's business.
/// With `params.speculative > 0`, drafts come from prompt lookup ([`PromptLookup`]).
///
/// # Shapes
/// - `prefix`: `[prefix_len, hidden]`
pub fn generate_with_prefix<B: Backend, R: BlockRunner<B>>(
    embeddings: &Embeddings<B>,
    head: &LmHead<B>,
    blocks: &mut R,
    prompts: &[Vec<u32>],
    prefix: Option<&Tensor<B, 2>>,
    params: &GenerateParams,
    on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Vec<Vec<u32>>, R::Error> {
    generate_drafted(
        embeddings,
        head,
        blocks,
        prompts,
        prefix,
        params,
        &mut PromptLookup::default(),
        on_token,
    )
}

/// [`generate_with_prefix`] with drafts from `drafter` (used when `params.speculative > 0`).
///
/// # Shapes
/// - `prefix`: `[prefix_len, hidden]`
#[allow(clippy::too_many_arguments)]
pub fn generate_drafted<B: Backend, R: BlockRunner<B>>(
    embeddings: &Embeddings<B>,
    head: &LmHead<B>,
    blocks: &mut R,
    prompts: &[Vec<u32>],
    prefix: Option<&Tensor<B, 2>>,
    params: &GenerateParams,
    drafter: &mut dyn Drafter,
    mut on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Vec<Vec<u32>>, R::Error> {
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if batch == 0 || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Invalid("every prompt needs at least one token".into()).into());
    }
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    // Padding positions are masked out; any valid id will do for them.
    let pad_id = prompts[0][0];
    let padded: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&pad)
        .map(|(p, &n)| std::iter::repeat_n(pad_id, n).chain(p.iter().copied()).collect())
        .collect();
    let mut samplers = (0..batch)
        .map(|_| Sampler::new(params.sampling.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    if params.max_new_tokens == 0 {
        return Ok(out);
    }

    let prefix_len = prefix.map_or(0, |p| p.dims()[0]);
    blocks.start(pad.clone(), prefix_len + longest + params.max_new_tokens)?;
    let mut input = padded;
    let mut drafts: Vec<Draft> = vec![Draft::default(); batch];
    // Positions fed to the blocks so far (padding and prefix included).
    let mut fed = 0;
    let mut step = 0;
    let mut first = true;
    let device = embeddings.device();
    loop {
        let started = web_time::Instant::now();
        let mut phases = StepPhases::start::<B>(&device);
        let x = match prefix {
            Some(p) if first => crate::tuning::with_prompt(embeddings, embeddings.embed_raw(&input)?, p, &pad),
            _ => embeddings.forward(&input)?,
        };
        first = false;
        phases.mark::<B>(&device, Phase::Embed);
        let hidden = blocks.step(x)?;
        phases.mark::<B>(&device, Phase::Blocks);
        let t = hidden.dims()[1];
        fed += t;
        // Logits of the last real token and of every draft position after it.
        let k = drafts.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
        let logits = to_host(head.forward(hidden.narrow(1, t - 1 - k, k + 1)));
        phases.mark::<B>(&device, Phase::Head);
        let vocab = logits.shape[2];
        let row_logits = |row: usize| {
            let data = &logits.data;
            move |j: usize| data[(row * (k + 1) + j) * vocab..(row * (k + 1) + j + 1) * vocab].to_vec()
        };
        let active: Vec<usize> = (0..batch).filter(|&r| !done[r]).collect();
        // Every row keeps as many drafts as the one that kept fewest: the caches of a batch
        // roll back together.
        let limit = if active.len() > 1 && k > 0 {
            active
                .iter()
                .map(|&r| {
                    let mut trial = samplers[r].clone();
                    speculative::check(&mut trial, row_logits(r), &history[r], &drafts[r], k).accepted
                })
                .min()
                .unwrap_or(0)
        } else {
            k
        };
        let mut kept = limit;
        let mut emitted = 0;
        for &row in &active {
            let checked = speculative::check(&mut samplers[row], row_logits(row), &history[row], &drafts[row], limit);
            kept = kept.min(checked.tokens.len() - 1);
            for (i, &token) in checked.tokens.iter().enumerate() {
                history[row].push(token);
                out[row].push(token);
                emitted += 1;
                let stop = !params.ignore_eos && params.stop_ids.contains(&token);
                let full = out[row].len() >= params.max_new_tokens;
                let flow = on_token(TokenEvent {
                    row,
                    token,
                    last: stop || full,
                    drafted: i < checked.accepted,
                    step,
                    proposed: drafts[row].tokens.len(),
                });
                if stop || full || flow.is_break() {
                    done[row] = true;
                    break;
                }
            }
        }
        phases.mark::<B>(&device, Phase::Sample);
        phases.report(step, t);
        // The prompt's step says nothing about drafting.
        if step > 0 {
            drafter.observe(k > 0, emitted, started.elapsed());
        }
        if done.iter().all(|&d| d) {
            return Ok(out);
        }
        step += 1;
        // The last real token and `kept` drafts stay in the caches.
        if kept < k {
            fed -= k - kept;
            blocks.rollback(fed)?;
        }
        let made = (0..batch)
            .filter(|&r| !done[r])
            .map(|r| out[r].len())
            .max()
            .unwrap_or(0);
        // Room for the drafts and the token after them, within what the caches reserved.
        let room = params.max_new_tokens.saturating_sub(made + 1);
        let want = params.speculative.min(room);
        for row in 0..batch {
            drafts[row] = if done[row] || want == 0 {
                Draft::default()
            } else {
                let mut d = drafter.draft(row, &history[row], want)?;
                d.tokens.truncate(want);
                d
            };
        }
        let width = drafts.iter().map(|d| d.tokens.len()).max().unwrap_or(0) + 1;
        input = (0..batch)
            .map(|row| {
                // Finished rows keep stepping with their last token; nothing is recorded.
                let last = *history[row].last().unwrap_or(&pad_id);
                let mut ids = Vec::with_capacity(width);
                ids.push(last);
                ids.extend_from_slice(&drafts[row].tokens);
                ids.resize(width, last);
                ids
            })
            .collect();
    }
}

/// The parts of one generation step, for `RUST_LOG=shared_model::generate=debug`.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Embed,
    Blocks,
    Head,
    Sample,
}

/// Where a step's time goes: host time between marks at debug level; at trace level each
/// mark first waits for the device, so a phase's figure includes its own device work (and
/// the step gets slower: the host no longer runs ahead of the device).
struct StepPhases {
    on: bool,
    sync: bool,
    last: std::time::Instant,
    us: [u128; 4],
}

impl StepPhases {
    fn start<B: Backend>(device: &B::Device) -> Self {
        let on = tracing::enabled!(tracing::Level::DEBUG);
        let sync = on && tracing::enabled!(tracing::Level::TRACE);
        if sync {
            B::sync(device).ok();
        }
        Self {
            on,
            sync,
            last: std::time::Instant::now(),
            us: [0; 4],
        }
    }

    fn mark<B: Backend>(&mut self, device: &B::Device, phase: Phase) {
        if !self.on {
            return;
        }
        if self.sync {
            B::sync(device).ok();
        }
        let now = std::time::Instant::now();
        self.us[phase as usize] = now.duration_since(self.last).as_micros();
        self.last = now;
    }

    fn report(&self, step: usize, positions: usize) {
        if self.on {
            let [embed, blocks, head, sample] = self.us;
            tracing::debug!(
                step,
                positions,
                synced = self.sync,
                embed_us = embed as u64,
                blocks_us = blocks as u64,
                head_us = head as u64,
                sample_us = sample as u64,
                "generation step"
            );
        }
    }
}

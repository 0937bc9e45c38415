//! The model split the way a swarm needs it: [`Embeddings`] and [`LmHead`] on the client,
//! [`BlockSpan`]s on servers. Each part loads on its own, reading only its own tensors.

use std::ops::Range;

use burn::backend::Autodiff;
use burn::prelude::*;

use crate::cache::SpanCache;
use crate::checkpoint::{self, LM_HEAD};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::layers::attention::AttentionPart;
use crate::layers::block::Block;
use crate::layers::linear::{Linear, to_device};
use crate::layers::lora::LoraSpan;
use crate::layers::norm::Norm;
use crate::layers::positions::{AttentionTiling, SeqLayout, StepContext};
use crate::weights::{HostTensor, TensorReader, WeightError, WeightSource};

/// Token embeddings, plus BLOOM's embedding LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings<B: Backend> {
    weight: Tensor<B, 2>,
    norm: Option<Norm<B>>,
    vocab: usize,
    hidden: usize,
}

impl<B: Backend> Embeddings<B> {
    pub fn load(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device) -> Result<Self, ModelError> {
        let mut reader = TensorReader::new(source);
        let name = checkpoint::embedding_name(config.family);
        let weight = reader.take(&name, &[config.vocab_size, config.hidden_size])?;
        let norm_prefix = checkpoint::embedding_norm_prefix(config.family);
        let norm = if config.embedding_norm {
            Some(checkpoint::read_norm(&mut reader, config, &norm_prefix)?.to_norm(config.norm, device))
        } else {
            None
        };
        reader.finish(&[name, norm_prefix])?;
        Ok(Self {
            weight: to_device(&weight, device),
            norm,
            vocab: config.vocab_size,
            hidden: config.hidden_size,
        })
    }

    /// Looks the tokens up, before any embedding norm: the "inputs_embeds" of HF, and what
    /// prompt tuning trains against.
    ///
    /// # Shapes
    /// - `ids`: `batch` rows of equal length `seq`
    /// - returns `[batch, seq, hidden]`
    pub fn embed_raw(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, ModelError> {
        let batch = ids.len();
        let seq = ids.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 || ids.iter().any(|r| r.len() != seq) {
            return Err(ModelError::Shape {
                actual: ids.iter().map(Vec::len).collect(),
                expected: "a non-empty batch of equal-length rows".into(),
            });
        }
        let mut flat = Vec::with_capacity(batch * seq);
        for &id in ids.iter().flatten() {
            if id as usize >= self.vocab {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.vocab });
            }
            flat.push(id as i64);
        }
        let device = self.weight.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [batch * seq]), &device);
        Ok(self.weight.clone().select(0, index).reshape([batch, seq, self.hidden]))
    }

    pub fn device(&self) -> B::Device {
        self.weight.device()
    }

    /// Applies what comes between the lookup and block 0 (BLOOM's LayerNorm).
    pub fn finish(&self, raw: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.norm {
            Some(norm) => norm.forward(raw),
            None => raw,
        }
    }

    /// # Shapes
    /// - returns `[batch, seq, hidden]`, the input of block 0
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, ModelError> {
        Ok(self.finish(self.embed_raw(ids)?))
    }
}

/// Positions per chunk of [`BlockSpan::forward_chunked`] where no other is asked for: large
/// enough that the products stay efficient (a GPU's prefill is tuned on 2048), small enough
/// that a chunk's activations are a fraction of a long prompt's.
pub const DEFAULT_CHUNK_TOKENS: usize = 1024;

/// Blocks `[start, end)` of a model.
#[derive(Debug, Clone)]
pub struct BlockSpan<B: Backend> {
    config: ModelConfig,
    range: Range<usize>,
    blocks: Vec<Block<B>>,
    device: B::Device,
    tiling: AttentionTiling,
}

impl<B: Backend> BlockSpan<B> {
    /// Loads the span's blocks, and fails on any missing, misshapen or unused tensor of them.
    pub fn load(
        config: &ModelConfig,
        source: &dyn WeightSource,
        range: Range<usize>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if range.start >= range.end || range.end > config.num_layers {
            return Err(ModelError::BadSpan {
                start: range.start,
                end: range.end,
                layers: config.num_layers,
            });
        }
        let mut reader = TensorReader::new(source);
        let mut blocks = Vec::with_capacity(range.len());
        for index in range.clone() {
            let weights = checkpoint::read_block(&mut reader, config, index)?;
            blocks.push(Block::new(config, &weights, device)?);
        }
        let prefixes: Vec<String> = range
            .clone()
            .map(|i| checkpoint::block_prefix(config.family, i))
            .collect();
        reader.finish(&prefixes)?;
        tracing::debug!(start = range.start, end = range.end, "loaded block span");
        Ok(Self {
            config: config.clone(),
            range,
            blocks,
            device: device.clone(),
            tiling: AttentionTiling::default(),
        })
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> B::Device {
        self.device.clone()
    }

    /// The same span on burn's autodiff backend, for backward passes (input and deep-prompt
    /// gradients). Dense weights are shared with `self`, so this costs no device memory and
    /// an inference server keeps one copy of its weights; quantized projections are expanded
    /// into dense matrices for as long as the returned span lives.
    pub fn autodiff(&self) -> Result<BlockSpan<Autodiff<B>>, ModelError> {
        Ok(BlockSpan {
            config: self.config.clone(),
            range: self.range.clone(),
            blocks: self
                .blocks
                .iter()
                .map(|b| b.autodiff(&self.device))
                .collect::<Result<_, _>>()?,
            device: self.device.clone(),
            tiling: self.tiling,
        })
    }

    /// A fresh, unbounded KV cache for a session over this span.
    pub fn new_cache(&self, pad: Vec<usize>) -> SpanCache<B> {
        SpanCache::new(self.blocks.len(), pad)
    }

    /// A fresh KV cache for a session of at most `max_len` positions a row, padding included
    /// (see [`SpanCache::with_max_len`]).
    pub fn new_session_cache(&self, pad: Vec<usize>, max_len: usize) -> SpanCache<B> {
        SpanCache::with_max_len(self.blocks.len(), pad, max_len)
    }

    /// The same span with another attention tiling (see [`AttentionTiling`]); tests lower it
    /// to run the tiled path on short sequences.
    pub fn with_attention_tiling(mut self, tiling: AttentionTiling) -> Self {
        self.tiling = tiling;
        self
    }

    pub fn attention_tiling(&self) -> AttentionTiling {
        self.tiling
    }

    /// Runs the new tokens through every block, extending the session's cache.
    ///
    /// # Shapes
    /// - `x`: `[batch, new, hidden]`, `batch` equal to the cache's
    /// - returns `[batch, new, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, cache: &mut SpanCache<B>) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_inspect(x, cache, |_, _| {})
    }

    /// Like [`Self::forward`], handing each block's output to `inspect` (block index, output).
    pub fn forward_inspect(
        &self,
        x: Tensor<B, 3>,
        cache: &mut SpanCache<B>,
        inspect: impl FnMut(usize, &Tensor<B, 3>),
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_blocks(x, cache, self.range.clone(), inspect)
    }

    /// Runs only `blocks` (absolute indices, within this span) with a cache of that many
    /// layers: a server can serve part of what it hosts.
    pub fn forward_blocks(
        &self,
        x: Tensor<B, 3>,
        cache: &mut SpanCache<B>,
        blocks: Range<usize>,
        inspect: impl FnMut(usize, &Tensor<B, 3>),
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_blocks_prompted(x, cache, blocks, None, None, inspect)
    }

    /// Everything a step is checked for before any work: the blocks, the adapter's range, the
    /// input's and the prompts' shapes, the model's context and the cache's room.
    fn check_step(
        &self,
        dims: [usize; 3],
        cache: &SpanCache<B>,
        blocks: &Range<usize>,
        prompts: Option<&Tensor<B, 3>>,
        lora: Option<&LoraSpan<B>>,
    ) -> Result<(), ModelError> {
        if let Some(l) = lora
            && (l.range().start > blocks.start || l.range().end < blocks.end)
        {
            return Err(ModelError::Invalid(format!(
                "the adapter covers blocks {:?}, not {blocks:?}",
                l.range()
            )));
        }
        if blocks.start < self.range.start || blocks.end > self.range.end || blocks.is_empty() {
            return Err(ModelError::BadSpan {
                start: blocks.start,
                end: blocks.end,
                layers: self.config.num_layers,
            });
        }
        let [batch, new, hidden] = dims;
        if batch != cache.batch() || hidden != self.config.hidden_size || new == 0 || cache.layers.len() != blocks.len()
        {
            return Err(ModelError::Shape {
                actual: dims.to_vec(),
                expected: format!("[{}, >0, {}]", cache.batch(), self.config.hidden_size),
            });
        }
        if let Some(context) = self.config.max_position_embeddings
            && cache.len + new > context + cache.pad.iter().copied().min().unwrap_or(0)
        {
            return Err(ModelError::ContextTooLong {
                tokens: cache.len + new,
                context,
            });
        }
        cache.check_room(new)?;
        if let Some(p) = prompts {
            let [n, _, ph] = p.dims();
            if n != blocks.len() || ph != hidden {
                return Err(ModelError::Shape {
                    actual: p.dims().to_vec(),
                    expected: format!("deep prompts [{}, prefix_len, {hidden}]", blocks.len()),
                });
            }
        }
        Ok(())
    }

    /// [`Self::forward_blocks`] with deep prompts (Petals' `deep_ptune`): before block
    /// `blocks.start + i`, `prompts[i]` is added to the hidden states of the row's first
    /// `prefix_len` positions after its left padding (absolute positions
    /// `pad[row] .. pad[row] + prefix_len`), whichever of them this step carries.
    ///
    /// The step runs in one piece (its activations are `new` tokens long; see
    /// [`Self::forward_chunked`] for long prompts); attention is tiled past
    /// [`AttentionTiling::min_keys`] keys.
    ///
    /// # Shapes
    /// - `x`: `[batch, new, hidden]`
    /// - `prompts`: `[blocks.len(), prefix_len, hidden]`
    /// - returns `[batch, new, hidden]`
    pub fn forward_blocks_prompted(
        &self,
        x: Tensor<B, 3>,
        cache: &mut SpanCache<B>,
        blocks: Range<usize>,
        prompts: Option<&Tensor<B, 3>>,
        lora: Option<&LoraSpan<B>>,
        mut inspect: impl FnMut(usize, &Tensor<B, 3>),
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.check_step(x.dims(), cache, &blocks, prompts, lora)?;
        let [_, new, hidden] = x.dims();
        let layout = SeqLayout {
            pad: cache.pad.clone(),
            past: cache.len,
            new,
        };
        let ctx = StepContext::with_tiling(&self.config, &layout, self.tiling, &x.device());
        let mut h = x;
        let local = blocks.start - self.range.start..blocks.end - self.range.start;
        for (i, (block, layer_cache)) in self.blocks[local].iter().zip(cache.layers.iter_mut()).enumerate() {
            if let Some(p) = prompts {
                let [_, prefix, _] = p.dims();
                let prompt = p.clone().narrow(0, i, 1).reshape([prefix, hidden]);
                if let Some(delta) = crate::tuning::prefix_delta(prompt, &layout) {
                    h = h + delta;
                }
            }
            let block_lora = lora.and_then(|l| l.block(blocks.start + i));
            h = block.forward_lora(h, &ctx, layer_cache, block_lora)?;
            inspect(blocks.start + i, &h);
        }
        cache.len += new;
        Ok(h)
    }

    /// Checks one session's step for [`Self::forward_batch`] (blocks, shape, context, the
    /// cache's room) without running it: a server answers a bad step alone, not its batch.
    pub fn check_batch_step(
        &self,
        dims: [usize; 3],
        cache: &SpanCache<B>,
        blocks: &Range<usize>,
    ) -> Result<(), ModelError> {
        self.check_step(dims, cache, blocks, None, None)
    }

    /// The steps of several sessions over the same `blocks`, as one forward per block:
    /// norms, projections and MLPs run once over every session's tokens (a decode step is
    /// bound by reading the weights, so `n` sessions cost about what one does), attention
    /// runs per session over its own cache, padding and positions. Each output equals what
    /// [`Self::forward_blocks`] gives that session alone. Sessions may differ in rows, new
    /// tokens (a prefill chunk beside decodes), cached length and padding; deep prompts and
    /// LoRA are not batched (run those alone).
    ///
    /// Every step is checked before any work, so an error leaves every cache untouched.
    ///
    /// # Shapes
    /// - `steps[i].0`: `[rows_i, new_i, hidden]`, `rows_i` equal to its cache's batch
    /// - returns `[rows_i, new_i, hidden]` for each step, in order
    pub fn forward_batch(
        &self,
        steps: Vec<(Tensor<B, 3>, &mut SpanCache<B>)>,
        blocks: Range<usize>,
    ) -> Result<Vec<Tensor<B, 3>>, ModelError> {
        for (x, cache) in &steps {
            self.check_step(x.dims(), cache, &blocks, None, None)?;
        }
        if steps.len() == 1 {
            let mut steps = steps;
            let Some((x, cache)) = steps.pop() else {
                return Ok(Vec::new());
            };
            return Ok(vec![self.forward_blocks(x, cache, blocks, |_, _| {})?]);
        }
        let Some(first) = steps.first() else {
            return Ok(Vec::new());
        };
        let device = first.0.device();
        let hidden = self.config.hidden_size;
        let mut shapes = Vec::with_capacity(steps.len());
        let mut contexts = Vec::with_capacity(steps.len());
        let mut flat = Vec::with_capacity(steps.len());
        let mut caches = Vec::with_capacity(steps.len());
        for (x, cache) in steps {
            let [rows, new, _] = x.dims();
            let layout = SeqLayout {
                pad: cache.pad.clone(),
                past: cache.len,
                new,
            };
            contexts.push(StepContext::with_tiling(&self.config, &layout, self.tiling, &device));
            shapes.push([rows, new]);
            flat.push(x.reshape([1, rows * new, hidden]));
            caches.push(cache);
        }
        let mut h = Tensor::cat(flat, 1);
        let local = blocks.start - self.range.start..blocks.end - self.range.start;
        for (layer, block) in self.blocks[local].iter().enumerate() {
            let mut parts: Vec<AttentionPart<'_, B>> = caches
                .iter_mut()
                .zip(&contexts)
                .zip(&shapes)
                .map(|((cache, ctx), &shape)| AttentionPart {
                    shape,
                    ctx,
                    cache: &mut cache.layers[layer],
                })
                .collect();
            h = block.forward_parts(h, &mut parts)?;
        }
        let mut outputs = Vec::with_capacity(shapes.len());
        let mut at = 0;
        for (cache, [rows, new]) in caches.into_iter().zip(shapes) {
            cache.len += new;
            outputs.push(h.clone().narrow(1, at, rows * new).reshape([rows, new, hidden]));
            at += rows * new;
        }
        Ok(outputs)
    }

    /// [`Self::forward_blocks_prompted`] in chunks of at most `chunk_tokens` positions along the
    /// sequence, each extending the same cache: a long prompt's scratch (activations,
    /// attention tiles, masks) is bounded by the chunk, not the prompt. The result equals a
    /// one-shot step's at every position after a row's left padding (a padding position's
    /// output depends on what it was computed with and is never read). Deep prompts and LoRA
    /// apply per position, so chunk boundaries do not matter to them.
    ///
    /// Everything is checked before the first chunk, so an error leaves the cache untouched;
    /// an error inside a chunk (none is expected after the checks) leaves it advanced by the
    /// chunks done.
    ///
    /// # Shapes
    /// - `x`: `[batch, new, hidden]`; `prompts`: `[blocks.len(), prefix_len, hidden]`
    /// - returns `[batch, new, hidden]`
    pub fn forward_chunked(
        &self,
        x: Tensor<B, 3>,
        cache: &mut SpanCache<B>,
        blocks: Range<usize>,
        prompts: Option<&Tensor<B, 3>>,
        lora: Option<&LoraSpan<B>>,
        chunk_tokens: usize,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let chunk = chunk_tokens.max(1);
        let [batch, new, hidden] = x.dims();
        if new <= chunk {
            return self.forward_blocks_prompted(x, cache, blocks, prompts, lora, |_, _| {});
        }
        self.check_step(x.dims(), cache, &blocks, prompts, lora)?;
        // Written in place chunk by chunk: a list of chunks concatenated at the end would hold
        // the output twice.
        let mut out = Tensor::<B, 3>::zeros([batch, new, hidden], (&x.device(), x.dtype()));
        for start in (0..new).step_by(chunk) {
            let len = chunk.min(new - start);
            let part = x.clone().narrow(1, start, len);
            let y = self.forward_blocks_prompted(part, cache, blocks.clone(), prompts, lora, |_, _| {})?;
            out = out.slice_assign([0..batch, start..start + len, 0..hidden], y);
        }
        Ok(out)
    }

    /// A stateless forward over whole sequences (training, verification): nothing is cached.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `pad` has one entry per row
    /// - returns `[batch, seq, hidden]`
    pub fn forward_full(&self, x: Tensor<B, 3>, pad: Vec<usize>) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_full_blocks(x, pad, self.range.clone())
    }

    /// [`Self::forward_full`] over `blocks` only (absolute indices within this span).
    pub fn forward_full_blocks(
        &self,
        x: Tensor<B, 3>,
        pad: Vec<usize>,
        blocks: Range<usize>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_full_prompted(x, pad, blocks, None, None)
    }

    /// [`Self::forward_full_blocks`] with deep prompts (see [`Self::forward_blocks_prompted`]).
    ///
    /// Runs in chunks of [`DEFAULT_CHUNK_TOKENS`] through a KV cache of exactly `seq`
    /// positions that lives for the call only (so scratch is bounded by the chunk, see
    /// [`crate::cost::stateless_forward_bytes`]). On an autodiff backend it runs in one piece
    /// instead: the graph keeps every block's activations for the backward pass whatever the
    /// chunking, and a cache written in place would add a copy of its keys to the graph.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `prompts`: `[blocks.len(), prefix_len, hidden]`
    /// - returns `[batch, seq, hidden]`
    pub fn forward_full_prompted(
        &self,
        x: Tensor<B, 3>,
        pad: Vec<usize>,
        blocks: Range<usize>,
        prompts: Option<&Tensor<B, 3>>,
        lora: Option<&LoraSpan<B>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        if B::ad_enabled(&self.device) {
            let mut cache = SpanCache::scratch(blocks.len(), pad);
            return self.forward_blocks_prompted(x, &mut cache, blocks, prompts, lora, |_, _| {});
        }
        let seq = x.dims()[1];
        let mut cache = SpanCache::preallocated(blocks.len(), pad, seq);
        self.forward_chunked(x, &mut cache, blocks, prompts, lora, DEFAULT_CHUNK_TOKENS)
    }
}

/// Final norm and the projection to vocabulary logits (tied to the embeddings or not).
#[derive(Debug, Clone)]
pub struct LmHead<B: Backend> {
    norm: Norm<B>,
    /// `[hidden] -> [vocab]`, quantized when the checkpoint stores it so.
    projection: Linear<B>,
}

impl<B: Backend> LmHead<B> {
    pub fn load(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device) -> Result<Self, ModelError> {
        let mut reader = TensorReader::new(source);
        let norm_prefix = checkpoint::final_norm_prefix(config.family);
        let norm = checkpoint::read_norm(&mut reader, config, &norm_prefix)?.to_norm(config.norm, device);
        let shape = [config.vocab_size, config.hidden_size];
        let weight = if reader.contains(LM_HEAD) {
            reader.take_matrix(LM_HEAD, shape)?
        } else if config.tie_word_embeddings {
            reader.take_matrix(&checkpoint::embedding_name(config.family), shape)?
        } else {
            return Err(WeightError::Missing { name: LM_HEAD.into() }.into());
        };
        reader.finish(&[norm_prefix, LM_HEAD.into()])?;
        Ok(Self {
            norm,
            projection: Linear::new(&weight, None, device)?,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` (the last block's raw output)
    /// - returns `[batch, seq, vocab]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.projection.forward(self.norm.forward(x))
    }
}

/// The tensors of blocks `blocks` in `source` (what a server of that span reads).
pub fn span_tensor_names(
    config: &ModelConfig,
    source: &dyn WeightSource,
    blocks: std::ops::Range<usize>,
) -> Vec<String> {
    let prefixes: Vec<String> = blocks.map(|i| checkpoint::block_prefix(config.family, i)).collect();
    source
        .names()
        .into_iter()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect()
}

/// The tensors that are not blocks: embeddings, their norm, the final norm and the LM head
/// (what a swarm client, or a server serving the head, reads).
pub fn client_tensor_names(config: &ModelConfig, source: &dyn WeightSource) -> Vec<String> {
    let all = 0..config.num_layers;
    let blocks: std::collections::BTreeSet<String> = span_tensor_names(config, source, all).into_iter().collect();
    source.names().into_iter().filter(|n| !blocks.contains(n)).collect()
}

/// Fails if the checkpoint holds tensors that no part of the model reads.
pub fn check_coverage(config: &ModelConfig, source: &dyn WeightSource) -> Result<(), WeightError> {
    let known_top = [
        checkpoint::embedding_name(config.family),
        checkpoint::embedding_norm_prefix(config.family),
        checkpoint::final_norm_prefix(config.family),
        LM_HEAD.to_string(),
    ];
    let blocks: Vec<String> = (0..config.num_layers)
        .map(|i| checkpoint::block_prefix(config.family, i))
        .collect();
    let unused: Vec<String> = source
        .names()
        .into_iter()
        .filter(|n| !known_top.iter().chain(blocks.iter()).any(|p| n.starts_with(p.as_str())))
        .collect();
    if unused.is_empty() {
        Ok(())
    } else {
        Err(WeightError::Unused { names: unused })
    }
}

/// Mean next-token cross-entropy: logits at position `t` predict token `t + 1` (HF's causal-LM
/// loss without ignored labels).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `ids`: `batch` rows of `seq` tokens
/// - returns a one-element tensor
pub fn next_token_loss<B: Backend>(logits: Tensor<B, 3>, ids: &[Vec<u32>]) -> Result<Tensor<B, 1>, ModelError> {
    let [b, t, v] = logits.dims();
    if ids.len() != b || t < 2 || ids.iter().any(|r| r.len() != t) {
        return Err(ModelError::Shape {
            actual: vec![ids.len(), ids.first().map_or(0, Vec::len)],
            expected: format!("{b} rows of {t} >= 2 tokens"),
        });
    }
    let targets: Vec<i64> = ids.iter().flat_map(|r| r[1..].iter().map(|&id| id as i64)).collect();
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(ModelError::TokenOutOfRange {
            id: bad as u32,
            vocab: v,
        });
    }
    let n = b * (t - 1);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &logits.device());
    let logp = burn::tensor::activation::log_softmax(logits.narrow(1, 0, t - 1).reshape([n, v]), 1);
    Ok(logp.gather(1, targets).mean().neg())
}

/// Copies a tensor to the host as f32.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    HostTensor::new(shape, data)
}

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::softmax;

use super::linear::{Linear, LinearWeights};
use super::lora::{BlockLora, add_delta};
use super::positions::{StepContext, apply_rope};
use crate::cache::{CacheError, LayerCache};
use crate::config::AttentionConfig;
use crate::weights::WeightError;

/// Host weights of an attention layer, q/k/v already fused as `[q heads | k heads | v heads]`.
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub qkv: LinearWeights,
    pub out: LinearWeights,
}

/// Multi-head attention with grouped KV heads (MHA, GQA and MQA are the same code with
/// different `num_kv_heads`), rotary or ALiBi positions, and an external KV cache.
///
/// A step with many keys (see [`super::positions::AttentionTiling`]) visits them in tiles with
/// an online softmax (flash attention's recurrence: a running maximum and sum per query, the
/// accumulated output rescaled as the maximum grows), so its scratch is `batch x heads x
/// queries x tile`, never `queries x keys`; the mask and ALiBi are built per tile too.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    config: AttentionConfig,
    qkv: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> Attention<B> {
    pub fn new(config: AttentionConfig, weights: &AttentionWeights, device: &B::Device) -> Result<Self, WeightError> {
        Ok(Self {
            config,
            qkv: weights.qkv.to_linear(device)?,
            out: weights.out.to_linear(device)?,
        })
    }

    /// The same layer on burn's autodiff backend (see [`Linear::autodiff`]).
    pub fn autodiff(&self, device: &B::Device) -> Result<Attention<Autodiff<B>>, WeightError> {
        Ok(Attention {
            config: self.config,
            qkv: self.qkv.autodiff(device)?,
            out: self.out.autodiff(device)?,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, new, hidden]`
    /// - cache holds `[batch, kv_heads, past, head_dim]` keys and values and grows by `new`
    /// - returns `[batch, new, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
    ) -> Result<Tensor<B, 3>, CacheError> {
        self.forward_lora(x, ctx, cache, None)
    }

    /// [`Self::forward`] with LoRA updates of the q/k/v and output projections.
    pub fn forward_lora(
        &self,
        x: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
        lora: Option<&BlockLora<B>>,
    ) -> Result<Tensor<B, 3>, CacheError> {
        let qkv = add_delta(self.qkv.forward(x.clone()), x, lora.and_then(|l| l.qkv.as_ref()));
        let y = self.attend(qkv, ctx, cache)?;
        Ok(add_delta(
            self.out.forward(y.clone()),
            y,
            lora.and_then(|l| l.out.as_ref()),
        ))
    }

    /// The steps of several sessions at once: one projection of q/k/v and one of the output
    /// for every token of every part (the weights are read once for all of them), attention
    /// per part over its own cache and positions.
    ///
    /// # Shapes
    /// - `x`: `[1, tokens, hidden]`, the parts' tokens one after another (part `i` holds
    ///   `rows x new` of them, row-major)
    /// - returns `[1, tokens, hidden]`
    pub fn forward_parts(
        &self,
        x: Tensor<B, 3>,
        parts: &mut [AttentionPart<'_, B>],
    ) -> Result<Tensor<B, 3>, CacheError> {
        let qkv = self.qkv.forward(x);
        let width = qkv.dims()[2];
        let mut at = 0;
        let mut ys = Vec::with_capacity(parts.len());
        for part in parts.iter_mut() {
            let [rows, new] = part.shape;
            let n = rows * new;
            let own = qkv.clone().narrow(1, at, n).reshape([rows, new, width]);
            let y = self.attend(own, part.ctx, part.cache)?;
            let y_width = y.dims()[2];
            ys.push(y.reshape([1, n, y_width]));
            at += n;
        }
        let y = Tensor::cat(ys, 1);
        Ok(self.out.forward(y))
    }

    /// Rotary positions, the cache append and attention itself, between the projections.
    ///
    /// # Shapes
    /// - `qkv`: `[batch, new, (heads + 2 kv_heads) head_dim]`
    /// - returns `[batch, new, heads * head_dim]`
    fn attend(
        &self,
        qkv: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
    ) -> Result<Tensor<B, 3>, CacheError> {
        let AttentionConfig {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.config;
        let group = nh / nkv;
        let [b, t, _] = qkv.dims();
        let fused = match &ctx.rope {
            Some((cos, sin)) => crate::kernels::rope_split(&qkv, cos, sin, nh, nkv, hd),
            None => None,
        };
        let (q, k, v) = match fused {
            Some(qkv) => qkv,
            None => {
                let q = qkv.clone().narrow(2, 0, nh * hd).reshape([b, t, nh, hd]);
                let k = qkv.clone().narrow(2, nh * hd, nkv * hd).reshape([b, t, nkv, hd]);
                let v = qkv.narrow(2, (nh + nkv) * hd, nkv * hd).reshape([b, t, nkv, hd]);
                match &ctx.rope {
                    Some((cos, sin)) => (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v),
                    None => (q, k, v),
                }
            }
        };
        let (k, v) = cache.append(k.swap_dims(1, 2), v.swap_dims(1, 2))?;
        if let Some(tile) = ctx.tile() {
            return Ok(tiled_attention(q, k, v, ctx, tile));
        }
        if ctx.mask.is_none()
            && ctx.alibi.is_none()
            && let Some(y) = crate::kernels::decode_attention(&q, &k, &v)
        {
            return Ok(y);
        }
        let s = k.dims()[2];

        // Query heads sharing a KV head are stacked along the sequence axis, so GQA needs no
        // copy of the keys: head h uses KV head h / group, as HF's `repeat_kv`.
        let q = q
            .reshape([b, t, nkv, group, hd])
            .permute([0, 2, 3, 1, 4])
            .reshape([b, nkv, group * t, hd]);
        let kt = k.swap_dims(2, 3);
        let scores = crate::kernels::matmul(&q, &kt).unwrap_or_else(|| q.matmul(kt));
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = scores.reshape([b, nkv, group, t, s]);
        let fused = match (&ctx.alibi, &ctx.mask) {
            (None, Some(mask)) => crate::kernels::masked_softmax(&scores, mask, scale, ctx.causal_past),
            _ => None,
        };
        let probs = match fused {
            Some(probs) => probs,
            None => {
                let mut scores = scores.mul_scalar(scale);
                if let Some(alibi) = &ctx.alibi {
                    scores = scores + alibi.clone();
                }
                if let Some(mask) = &ctx.mask {
                    scores = scores + mask.clone();
                }
                softmax(scores, 4)
            }
        };
        let probs = probs.reshape([b, nkv, group * t, s]);
        Ok(crate::kernels::matmul(&probs, &v)
            .unwrap_or_else(|| probs.matmul(v))
            .reshape([b, nkv, group, t, hd])
            .permute([0, 3, 1, 2, 4])
            .reshape([b, t, nh * hd]))
    }
}

/// One session's part of a batched step: its tokens' shape, positions and cache.
pub struct AttentionPart<'a, B: Backend> {
    /// `[rows, new]`.
    pub shape: [usize; 2],
    pub ctx: &'a StepContext<B>,
    pub cache: &'a mut LayerCache<B>,
}

/// Attention over the key tiles of [`StepContext::key_tiles`] with an online softmax. The
/// running statistics and the accumulator are f32 whatever the model's float type: they sum
/// over every tile.
///
/// # Shapes
/// - `q`: `[batch, new, heads, head_dim]`; `k`, `v`: `[batch, kv_heads, keys, head_dim]`
/// - returns `[batch, new, heads * head_dim]`
fn tiled_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    ctx: &StepContext<B>,
    tile: usize,
) -> Tensor<B, 3> {
    let [b, t, nh, hd] = q.dims();
    let nkv = k.dims()[1];
    let group = nh / nkv;
    let rows = group * t;
    let native: FloatDType = q.dtype().into();
    let device = q.device();
    // Scaled once here rather than on every tile's scores.
    let q = q
        .reshape([b, t, nkv, group, hd])
        .permute([0, 2, 3, 1, 4])
        .reshape([b, nkv, rows, hd])
        .mul_scalar(1.0 / (hd as f64).sqrt());
    let mut state: Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> = None;
    for keys in ctx.key_tiles() {
        debug_assert!(keys.len() <= tile, "key tiles of {tile}");
        let len = keys.len();
        let kt = k.clone().narrow(2, keys.start, len).swap_dims(2, 3);
        let vt = v.clone().narrow(2, keys.start, len);
        let mut scores = crate::kernels::matmul(&q, &kt)
            .unwrap_or_else(|| q.clone().matmul(kt))
            .cast(FloatDType::F32);
        let alibi = ctx.alibi_tile(keys.clone());
        let mask = ctx.mask_tile(keys, &device);
        if alibi.is_some() || mask.is_some() {
            let mut s5 = scores.reshape([b, nkv, group, t, len]);
            if let Some(alibi) = alibi {
                s5 = s5 + alibi.cast(FloatDType::F32);
            }
            if let Some(mask) = mask {
                s5 = s5 + mask.cast(FloatDType::F32);
            }
            scores = s5.reshape([b, nkv, rows, len]);
        }
        let tile_max = scores.clone().max_dim(3);
        let (max, sum, acc) = match state.take() {
            None => {
                let p = (scores - tile_max.clone()).exp();
                let sum = p.clone().sum_dim(3);
                (tile_max, sum, probs_times_values(p, vt, native))
            }
            Some((max, sum, acc)) => {
                let new_max = max.clone().max_pair(tile_max);
                let rescale = (max - new_max.clone()).exp();
                let p = (scores - new_max.clone()).exp();
                let sum = sum * rescale.clone() + p.clone().sum_dim(3);
                (new_max, sum, acc * rescale + probs_times_values(p, vt, native))
            }
        };
        state = Some((max, sum, acc));
    }
    let y = match state {
        Some((_, sum, acc)) => (acc / sum).cast(native),
        // No key at all: only a step of zero keys, which the cache cannot produce.
        None => Tensor::zeros([b, nkv, rows, hd], &device),
    };
    y.reshape([b, nkv, group, t, hd])
        .permute([0, 3, 1, 2, 4])
        .reshape([b, t, nh * hd])
}

/// One tile's `p v`, in the model's float type for the product, accumulated in f32.
///
/// # Shapes
/// - `p`: `[batch, kv_heads, rows, tile]` (f32); `v`: `[batch, kv_heads, tile, head_dim]`
/// - returns `[batch, kv_heads, rows, head_dim]` (f32)
fn probs_times_values<B: Backend>(p: Tensor<B, 4>, v: Tensor<B, 4>, native: FloatDType) -> Tensor<B, 4> {
    let p = p.cast(native);
    crate::kernels::matmul(&p, &v)
        .unwrap_or_else(|| p.matmul(v))
        .cast(FloatDType::F32)
}

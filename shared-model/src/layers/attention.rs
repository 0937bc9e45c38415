use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::linear::{Linear, LinearWeights};
use super::lora::{BlockLora, add_delta};
use super::positions::{StepContext, apply_rope};
use crate::cache::LayerCache;
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
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &StepContext<B>, cache: &mut LayerCache<B>) -> Tensor<B, 3> {
        self.forward_lora(x, ctx, cache, None)
    }

    /// [`Self::forward`] with LoRA updates of the q/k/v and output projections.
    pub fn forward_lora(
        &self,
        x: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
        lora: Option<&BlockLora<B>>,
    ) -> Tensor<B, 3> {
        let AttentionConfig {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.config;
        let group = nh / nkv;
        let [b, t, _] = x.dims();
        let qkv = add_delta(self.qkv.forward(x.clone()), x, lora.and_then(|l| l.qkv.as_ref()));
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
        let (k, v) = cache.append(k.swap_dims(1, 2), v.swap_dims(1, 2));
        if ctx.mask.is_none()
            && ctx.alibi.is_none()
            && let Some(y) = crate::kernels::decode_attention(&q, &k, &v)
        {
            return self.out.forward(y);
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
        let y = crate::kernels::matmul(&probs, &v)
            .unwrap_or_else(|| probs.matmul(v))
            .reshape([b, nkv, group, t, hd])
            .permute([0, 3, 1, 2, 4])
            .reshape([b, t, nh * hd]);
        add_delta(self.out.forward(y.clone()), y, lora.and_then(|l| l.out.as_ref()))
    }
}

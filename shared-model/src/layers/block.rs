use burn::backend::Autodiff;
use burn::prelude::*;

use super::attention::{Attention, AttentionPart, AttentionWeights};
use super::lora::BlockLora;
use super::mlp::{Mlp, MlpWeights};
use super::norm::{Norm, NormWeights};
use super::positions::StepContext;
use crate::cache::{CacheError, LayerCache};
use crate::config::{BlockLayout, MlpKind, ModelConfig};
use crate::weights::WeightError;

/// Host weights of one block, in our canonical (family-independent) form.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: NormWeights,
    /// `None` when a parallel block shares one norm.
    pub mlp_norm: Option<NormWeights>,
    pub attention: AttentionWeights,
    pub mlp: MlpWeights,
}

/// How the residual stream is wired through attention and MLP.
#[derive(Debug, Clone)]
enum Wiring<B: Backend> {
    Sequential {
        mlp_norm: Norm<B>,
    },
    /// `mlp_norm` is `None` when both branches share the attention norm.
    Parallel {
        mlp_norm: Option<Norm<B>>,
    },
}

/// The one transformer block: every family is this code with a different [`ModelConfig`].
#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    wiring: Wiring<B>,
    attn_norm: Norm<B>,
    attention: Attention<B>,
    mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// Builds the block; fails only if a sequential block comes without its second norm.
    pub fn new(config: &ModelConfig, weights: &BlockWeights, device: &B::Device) -> Result<Self, WeightError> {
        let (act, top_k) = match config.mlp {
            MlpKind::Gated { act, .. } | MlpKind::Plain { act, .. } => (act, 0),
            MlpKind::Moe { act, top_k, .. } => (act, top_k),
        };
        let mlp_norm = weights.mlp_norm.as_ref().map(|w| w.to_norm(config.norm, device));
        let wiring = match config.layout {
            BlockLayout::Sequential => Wiring::Sequential {
                mlp_norm: mlp_norm.ok_or_else(|| WeightError::Missing {
                    name: "post-attention norm of a sequential block".into(),
                })?,
            },
            BlockLayout::Parallel { .. } => Wiring::Parallel { mlp_norm },
        };
        Ok(Self {
            wiring,
            attn_norm: weights.attn_norm.to_norm(config.norm, device),
            attention: Attention::new(config.attention, &weights.attention, device)?,
            mlp: Mlp::new(&weights.mlp, act, top_k, device)?,
        })
    }

    /// The same block on burn's autodiff backend, for backward passes: dense weights are shared
    /// with `self`, quantized ones expanded (see [`super::linear::Linear::autodiff`]).
    pub fn autodiff(&self, device: &B::Device) -> Result<Block<Autodiff<B>>, WeightError> {
        Ok(Block {
            wiring: match &self.wiring {
                Wiring::Sequential { mlp_norm } => Wiring::Sequential {
                    mlp_norm: mlp_norm.autodiff(),
                },
                Wiring::Parallel { mlp_norm } => Wiring::Parallel {
                    mlp_norm: mlp_norm.as_ref().map(Norm::autodiff),
                },
            },
            attn_norm: self.attn_norm.autodiff(),
            attention: self.attention.autodiff(device)?,
            mlp: self.mlp.autodiff(device)?,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, new, hidden]`
    /// - returns `[batch, new, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
    ) -> Result<Tensor<B, 3>, CacheError> {
        self.forward_lora(x, ctx, cache, None)
    }

    /// [`Self::forward`] with a LoRA adapter's updates (see [`super::lora`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, new, hidden]`
    /// - returns `[batch, new, hidden]`
    pub fn forward_lora(
        &self,
        x: Tensor<B, 3>,
        ctx: &StepContext<B>,
        cache: &mut LayerCache<B>,
        lora: Option<&BlockLora<B>>,
    ) -> Result<Tensor<B, 3>, CacheError> {
        let attn_in = self.attn_norm.forward(x.clone());
        match &self.wiring {
            Wiring::Sequential { mlp_norm } => {
                let attn = self.attention.forward_lora(attn_in, ctx, cache, lora)?;
                let (h, mlp_in) = mlp_norm.forward_residual(x, attn);
                Ok(h + self.mlp.forward_lora(mlp_in, lora))
            }
            Wiring::Parallel { mlp_norm } => {
                let mlp_in = match mlp_norm {
                    Some(norm) => norm.forward(x.clone()),
                    None => attn_in.clone(),
                };
                let attn = self.attention.forward_lora(attn_in, ctx, cache, lora)?;
                Ok(self.mlp.forward_lora(mlp_in, lora) + attn + x)
            }
        }
    }

    /// The steps of several sessions in one pass (see [`Attention::forward_parts`]): norms,
    /// projections and the MLP run once over every part's tokens.
    ///
    /// # Shapes
    /// - `x`: `[1, tokens, hidden]`, the parts' tokens one after another
    /// - returns `[1, tokens, hidden]`
    pub fn forward_parts(
        &self,
        x: Tensor<B, 3>,
        parts: &mut [AttentionPart<'_, B>],
    ) -> Result<Tensor<B, 3>, CacheError> {
        let attn_in = self.attn_norm.forward(x.clone());
        match &self.wiring {
            Wiring::Sequential { mlp_norm } => {
                let attn = self.attention.forward_parts(attn_in, parts)?;
                let (h, mlp_in) = mlp_norm.forward_residual(x, attn);
                Ok(h + self.mlp.forward(mlp_in))
            }
            Wiring::Parallel { mlp_norm } => {
                let mlp_in = match mlp_norm {
                    Some(norm) => norm.forward(x.clone()),
                    None => attn_in.clone(),
                };
                let attn = self.attention.forward_parts(attn_in, parts)?;
                Ok(self.mlp.forward(mlp_in) + attn + x)
            }
        }
    }
}

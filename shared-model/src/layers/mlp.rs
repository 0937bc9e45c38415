use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{gelu, silu, softmax};

use super::linear::{Linear, LinearWeights};
use super::lora::{BlockLora, LoraPair, add_delta_2d};
use crate::config::Activation;
use crate::weights::WeightError;

/// Host weights of a feed-forward layer. Gated MLPs keep gate and up fused as one
/// `[gate | up]` projection: one matmul instead of two.
#[derive(Debug, Clone)]
pub enum MlpWeights {
    Gated {
        gate_up: LinearWeights,
        down: LinearWeights,
    },
    Plain {
        up: LinearWeights,
        down: LinearWeights,
    },
    Moe {
        router: LinearWeights,
        experts: Vec<(LinearWeights, LinearWeights)>,
    },
}

/// A gated MLP (also one Mixtral expert): `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp<B: Backend> {
    gate_up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> GatedMlp<B> {
    fn autodiff(&self, device: &B::Device) -> Result<GatedMlp<Autodiff<B>>, WeightError> {
        Ok(GatedMlp {
            gate_up: self.gate_up.autodiff(device)?,
            down: self.down.autodiff(device)?,
        })
    }

    fn forward_2d(&self, x: Tensor<B, 2>, act: Activation) -> Tensor<B, 2> {
        self.forward_2d_lora(x, act, None)
    }

    fn forward_2d_lora(&self, x: Tensor<B, 2>, act: Activation, lora: Option<&BlockLora<B>>) -> Tensor<B, 2> {
        let pair = |f: fn(&BlockLora<B>) -> Option<&LoraPair<B>>| lora.and_then(f);
        let gu = add_delta_2d(self.gate_up.forward_2d(x.clone()), x, pair(|l| l.gate_up.as_ref()));
        let fused = match act {
            Activation::Silu => crate::kernels::gated_silu(&gu),
            _ => None,
        };
        let h = match fused {
            Some(h) => h,
            None => {
                let inter = gu.dims()[1] / 2;
                let gate = gu.clone().narrow(1, 0, inter);
                let up = gu.narrow(1, inter, inter);
                activate(gate, act) * up
            }
        };
        add_delta_2d(self.down.forward_2d(h.clone()), h, pair(|l| l.down.as_ref()))
    }
}

/// The feed-forward half of a block, chosen by [`crate::config::MlpKind`].
#[derive(Debug, Clone)]
pub enum Mlp<B: Backend> {
    Gated {
        inner: GatedMlp<B>,
        act: Activation,
    },
    Plain {
        up: Linear<B>,
        down: Linear<B>,
        act: Activation,
    },
    Moe {
        router: Linear<B>,
        experts: Vec<GatedMlp<B>>,
        top_k: usize,
        act: Activation,
    },
}

impl<B: Backend> Mlp<B> {
    pub fn new(weights: &MlpWeights, act: Activation, top_k: usize, device: &B::Device) -> Result<Self, WeightError> {
        let gated = |gu: &LinearWeights, d: &LinearWeights| -> Result<GatedMlp<B>, WeightError> {
            Ok(GatedMlp {
                gate_up: gu.to_linear(device)?,
                down: d.to_linear(device)?,
            })
        };
        Ok(match weights {
            MlpWeights::Gated { gate_up, down } => Mlp::Gated {
                inner: gated(gate_up, down)?,
                act,
            },
            MlpWeights::Plain { up, down } => Mlp::Plain {
                up: up.to_linear(device)?,
                down: down.to_linear(device)?,
                act,
            },
            MlpWeights::Moe { router, experts } => Mlp::Moe {
                router: router.to_linear(device)?,
                experts: experts.iter().map(|(gu, d)| gated(gu, d)).collect::<Result<_, _>>()?,
                top_k,
                act,
            },
        })
    }

    /// The same layer on burn's autodiff backend (see [`Linear::autodiff`]).
    pub fn autodiff(&self, device: &B::Device) -> Result<Mlp<Autodiff<B>>, WeightError> {
        Ok(match self {
            Mlp::Gated { inner, act } => Mlp::Gated {
                inner: inner.autodiff(device)?,
                act: *act,
            },
            Mlp::Plain { up, down, act } => Mlp::Plain {
                up: up.autodiff(device)?,
                down: down.autodiff(device)?,
                act: *act,
            },
            Mlp::Moe {
                router,
                experts,
                top_k,
                act,
            } => Mlp::Moe {
                router: router.autodiff(device)?,
                experts: experts.iter().map(|e| e.autodiff(device)).collect::<Result<_, _>>()?,
                top_k: *top_k,
                act: *act,
            },
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - returns `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_lora(x, None)
    }

    /// [`Self::forward`] with LoRA updates of a gated MLP's projections (the loader refuses
    /// adapters for other MLP kinds).
    pub fn forward_lora(&self, x: Tensor<B, 3>, lora: Option<&BlockLora<B>>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let x = x.reshape([b * t, d]);
        let y = match self {
            Mlp::Gated { inner, act } => inner.forward_2d_lora(x, *act, lora),
            Mlp::Plain { up, down, act } => down.forward_2d(activate(up.forward_2d(x), *act)),
            Mlp::Moe {
                router,
                experts,
                top_k,
                act,
            } => moe(x, router, experts, *top_k, *act),
        };
        y.reshape([b, t, d])
    }
}

/// Mixtral's sparse MoE: softmax over the router logits, keep the top k, renormalise, and run
/// each expert only on the tokens routed to it.
fn moe<B: Backend>(
    x: Tensor<B, 2>,
    router: &Linear<B>,
    experts: &[GatedMlp<B>],
    top_k: usize,
    act: Activation,
) -> Tensor<B, 2> {
    let [n, d] = x.dims();
    let device = x.device();
    let probs = softmax(router.forward_2d(x.clone()), 1);
    let (weights, chosen) = probs.topk_with_indices(top_k, 1);
    let weights = weights.clone() / weights.sum_dim(1);
    let weights = weights.reshape([n * top_k]);
    let chosen: Vec<i64> = chosen.into_data().convert::<i64>().to_vec().unwrap_or_default();

    let mut out = Tensor::<B, 2>::zeros([n, d], &device);
    for (e, expert) in experts.iter().enumerate() {
        let slots: Vec<i64> = (0..chosen.len())
            .filter(|&i| chosen[i] == e as i64)
            .map(|i| i as i64)
            .collect();
        if slots.is_empty() {
            continue;
        }
        let tokens: Vec<i64> = slots.iter().map(|s| s / top_k as i64).collect();
        let m = slots.len();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [m]), &device);
        let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [m]), &device);
        let y = expert.forward_2d(x.clone().select(0, tokens.clone()), act);
        let w = weights.clone().select(0, slots).reshape([m, 1]);
        out = out.select_assign(0, tokens, y * w, IndexingUpdateOp::Add);
    }
    out
}

pub(crate) fn activate<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    match act {
        Activation::Silu => silu(x),
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => {
            // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as BLOOM and `gelu_new`.
            let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
                .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
            x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
        }
    }
}

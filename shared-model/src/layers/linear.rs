use std::sync::Arc;

use burn::prelude::*;

use crate::quant::QuantMatrix;
use crate::weights::{HostTensor, WeightData, WeightError};

/// Host weights of a projection in PyTorch layout: `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    pub weight: WeightData,
    pub bias: Option<HostTensor>,
}

impl LinearWeights {
    pub fn to_linear<B: Backend>(&self, device: &B::Device) -> Result<Linear<B>, WeightError> {
        Linear::new(&self.weight, self.bias.as_ref(), device)
    }
}

#[derive(Debug, Clone)]
enum Weight<B: Backend> {
    /// `[in, out]`, multiplied by burn.
    Dense(Tensor<B, 2>),
    /// Blocks multiplied on the host (see [`crate::quant`]).
    Quant(Arc<QuantMatrix>),
}

/// A projection `y = x W + b`: dense (burn matmul) or with quantized weights.
///
/// One type for both, so that quantized checkpoints run through the same block code.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    weight: Weight<B>,
    out: usize,
    bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    /// Keeps quantized weights quantized, except on autodiff backends: gradients must flow
    /// through burn's own matmul.
    pub fn new(weight: &WeightData, bias: Option<&HostTensor>, device: &B::Device) -> Result<Self, WeightError> {
        let bias = bias.map(|b| Tensor::from_data(TensorData::new(b.data.clone(), [b.numel()]), device));
        let out = weight.shape()[0];
        let weight = match weight {
            WeightData::Quant(q) if !B::ad_enabled(device) => Weight::Quant(Arc::new(q.clone())),
            other => Weight::Dense(transposed(&other.to_dense()?, device)),
        };
        Ok(Self { weight, out, bias })
    }

    /// From a PyTorch-layout dense weight `[out, in]` and optional bias `[out]`.
    pub fn from_torch(weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: Weight::Dense(transposed(weight, device)),
            out: weight.shape[0],
            bias: bias.map(|b| Tensor::from_data(TensorData::new(b.data.clone(), [b.numel()]), device)),
        }
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// # Shapes
    /// - `x`: `[batch, seq, in]`
    /// - returns `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        self.forward_2d(x.reshape([b * t, d])).reshape([b, t, self.out])
    }

    /// # Shapes
    /// - `x`: `[tokens, in]`
    /// - returns `[tokens, out]`
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = match &self.weight {
            Weight::Dense(w) => x.matmul(w.clone()),
            Weight::Quant(q) => {
                let [n, _] = x.dims();
                let device = x.device();
                let host = x.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
                Tensor::from_data(TensorData::new(q.matmul(&host, n), [n, self.out]), &device)
            }
        };
        match &self.bias {
            Some(bias) => y + bias.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

/// Uploads a PyTorch `[out, in]` weight as burn's `[in, out]`.
fn transposed<B: Backend>(weight: &HostTensor, device: &B::Device) -> Tensor<B, 2> {
    let (out, inp) = (weight.shape[0], weight.shape[1]);
    let mut data = vec![0.0f32; weight.data.len()];
    for o in 0..out {
        for i in 0..inp {
            data[i * out + o] = weight.data[o * inp + i];
        }
    }
    Tensor::from_data(TensorData::new(data, [inp, out]), device)
}

/// Uploads a host tensor of rank `D`.
pub(crate) fn to_device<B: Backend, const D: usize>(t: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

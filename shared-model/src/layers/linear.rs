use std::sync::Arc;

use burn::backend::Autodiff;
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
    /// PyTorch's `[out, in]`: one row per output, the layout a matrix-vector kernel streams;
    /// burn multiplies by its transpose (a view) without a copy.
    Dense(Tensor<B, 2>),
    /// Blocks multiplied on the host (see [`crate::quant`]).
    Quant(Arc<QuantMatrix>),
    /// Blocks kept on the GPU and expanded inside its kernels (CUDA).
    GpuQuant(crate::kernels::GpuQuant<B>),
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
            WeightData::Quant(q) if !B::ad_enabled(device) => match crate::kernels::GpuQuant::new(q, device) {
                Some(g) => Weight::GpuQuant(g),
                None => Weight::Quant(Arc::new(q.clone())),
            },
            other => Weight::Dense(to_device(&other.to_dense()?, device)),
        };
        Ok(Self { weight, out, bias })
    }

    /// From a PyTorch-layout dense weight `[out, in]` and optional bias `[out]`.
    pub fn from_torch(weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: Weight::Dense(to_device(weight, device)),
            out: weight.shape[0],
            bias: bias.map(|b| Tensor::from_data(TensorData::new(b.data.clone(), [b.numel()]), device)),
        }
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// The same projection on burn's autodiff backend, for backward passes. Dense weights are
    /// shared with `self` (the same device buffers, no copy); quantized ones are expanded into
    /// a new dense matrix, since gradients flow only through burn's own matmul.
    pub fn autodiff(&self, device: &B::Device) -> Result<Linear<Autodiff<B>>, WeightError> {
        let weight = match &self.weight {
            Weight::Dense(w) => w.clone(),
            Weight::Quant(q) => to_device(&q.dequantize()?, device),
            Weight::GpuQuant(g) => g.dense().ok_or(WeightError::KernelRefused)?,
        };
        Ok(Linear {
            weight: Weight::Dense(Tensor::from_inner(weight)),
            out: self.out,
            bias: self.bias.clone().map(Tensor::from_inner),
        })
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
            Weight::Dense(w) => match crate::kernels::matvec(&x, w) {
                Some(y) => y,
                None => {
                    let w = w.clone().transpose();
                    let rows = x.dims()[0];
                    if (2..=CPU_ROWS_APART).contains(&rows) && on_cpu::<B>() {
                        // burn-flex's GEMM packs the whole weight for a few rows (a 2-row
                        // product cost 5x a 1-row one on an 8B-shaped block); its
                        // matrix-vector path reads it in place.
                        Tensor::cat(
                            (0..rows).map(|r| x.clone().narrow(0, r, 1).matmul(w.clone())).collect(),
                            0,
                        )
                    } else {
                        crate::kernels::matmul(&x, &w).unwrap_or_else(|| x.matmul(w))
                    }
                }
            },
            Weight::GpuQuant(g) => g.forward(x),
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

/// Up to this many rows, a dense product on the CPU backend runs a row at a time (measured on
/// `corolla bench --shape llama-8b --sessions`: 2 rows 163 vs 409 ms, 4 rows 336 vs 373 ms, 8
/// rows 717 vs 461 ms).
pub(crate) const CPU_ROWS_APART: usize = 4;

fn on_cpu<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<crate::Cpu>()
}

/// Uploads a host tensor of rank `D`, in the device's float type.
///
/// Half-precision values are converted here on every core: burn converts on one, which made
/// loading a 70B-shaped block take seconds.
pub(crate) fn to_device<B: Backend, const D: usize>(t: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    use burn::tensor::{FloatDType, bf16, f16};
    use rayon::prelude::*;
    let shape = t.shape.clone();
    let data = match burn::tensor::get_device_settings::<B>(device).float_dtype {
        FloatDType::BF16 => TensorData::new(t.data.par_iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(), shape),
        FloatDType::F16 => TensorData::new(t.data.par_iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(), shape),
        _ => TensorData::new(t.data.clone(), shape),
    };
    Tensor::from_data(data, device)
}

use burn::prelude::*;

use crate::weights::HostTensor;

/// Host weights of a projection in PyTorch layout: `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    pub weight: HostTensor,
    pub bias: Option<HostTensor>,
}

impl LinearWeights {
    pub fn to_linear<B: Backend>(&self, device: &B::Device) -> Linear<B> {
        Linear::from_torch(&self.weight, self.bias.as_ref(), device)
    }
}

/// A dense projection `y = x W + b`, with `W` stored `[in, out]`.
///
/// Kept as our own type (rather than `burn::nn::Linear`) so that quantized weights can later
/// live behind the same interface without another block implementation.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    /// From a PyTorch-layout weight `[out, in]` and optional bias `[out]`.
    pub fn from_torch(weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        let (out, inp) = (weight.shape[0], weight.shape[1]);
        let mut transposed = vec![0.0f32; weight.data.len()];
        for o in 0..out {
            for i in 0..inp {
                transposed[i * out + o] = weight.data[o * inp + i];
            }
        }
        Self::from_in_out(&HostTensor::new(vec![inp, out], transposed), bias, device)
    }

    /// From a weight already laid out `[in, out]`.
    pub fn from_in_out(weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: to_device(weight, device),
            bias: bias.map(|b| Tensor::from_data(TensorData::new(b.data.clone(), [b.numel()]), device)),
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// # Shapes
    /// - `x`: `[batch, seq, in]`
    /// - returns `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        // One GEMM over all tokens instead of a batched matmul with a broadcast weight.
        let y = x.reshape([b * t, d]).matmul(self.weight.clone());
        let y = match &self.bias {
            Some(bias) => y + bias.clone().unsqueeze::<2>(),
            None => y,
        };
        y.reshape([b, t, self.out_features()])
    }

    /// # Shapes
    /// - `x`: `[tokens, in]`
    /// - returns `[tokens, out]`
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.weight.clone());
        match &self.bias {
            Some(bias) => y + bias.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

/// Uploads a host tensor of rank `D`.
pub(crate) fn to_device<B: Backend, const D: usize>(t: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

use burn::backend::Autodiff;
use burn::prelude::*;

use crate::config::NormKind;
use crate::weights::HostTensor;

/// RMSNorm or LayerNorm over the last dimension, chosen by [`NormKind`].
#[derive(Debug, Clone)]
pub struct Norm<B: Backend> {
    kind: NormKind,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Norm<B> {
    pub fn new(kind: NormKind, weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        let vec = |t: &HostTensor| Tensor::from_data(TensorData::new(t.data.clone(), [t.numel()]), device);
        Self {
            kind,
            weight: vec(weight),
            bias: bias.map(vec),
        }
    }

    /// The same norm on burn's autodiff backend, sharing the weights.
    pub fn autodiff(&self) -> Norm<Autodiff<B>> {
        Norm {
            kind: self.kind,
            weight: Tensor::from_inner(self.weight.clone()),
            bias: self.bias.clone().map(Tensor::from_inner),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - returns `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if let (NormKind::Rms { eps }, None) = (self.kind, &self.bias)
            && let Some(y) = crate::kernels::rms_norm(&x, &self.weight, eps)
        {
            return y;
        }
        let w = self.weight.clone().unsqueeze::<3>();
        let y = match self.kind {
            NormKind::Rms { eps } => {
                let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
                x / rms * w
            }
            NormKind::Layer { eps } => {
                let (var, mean) = x.clone().var_mean_bias(2);
                (x - mean) / var.add_scalar(eps).sqrt() * w
            }
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<3>(),
            None => y,
        }
    }
}

impl<B: Backend> Norm<B> {
    /// The residual sum `x + delta` and its norm (one kernel on CUDA for RMSNorm).
    ///
    /// # Shapes
    /// - `x`, `delta`: `[batch, seq, hidden]`
    /// - returns `x + delta` and its norm, both `[batch, seq, hidden]`
    pub fn forward_residual(&self, x: Tensor<B, 3>, delta: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if let (NormKind::Rms { eps }, None) = (self.kind, &self.bias)
            && let Some(pair) = crate::kernels::add_rms_norm(&x, &delta, &self.weight, eps)
        {
            return pair;
        }
        let h = x + delta;
        let y = self.forward(h.clone());
        (h, y)
    }
}

/// Host weights of a norm.
#[derive(Debug, Clone)]
pub struct NormWeights {
    pub weight: HostTensor,
    pub bias: Option<HostTensor>,
}

impl NormWeights {
    pub fn to_norm<B: Backend>(&self, kind: NormKind, device: &B::Device) -> Norm<B> {
        Norm::new(kind, &self.weight, self.bias.as_ref(), device)
    }
}

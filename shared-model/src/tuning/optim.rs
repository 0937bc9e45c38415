//! AdamW for the client's trainable parameters: on the host (the CLI, and the saved state's
//! format) and on the compute device (the web page keeps its prompts and moments on WebGPU).
//! Both follow PyTorch's `torch.optim.AdamW` step for step.

use burn::prelude::*;

/// PyTorch's AdamW (decoupled weight decay), over flat f32 parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken.
    pub t: u64,
    /// First and second moments, one pair per parameter tensor.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(lr: f32, weight_decay: f32) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            moments: Vec::new(),
        }
    }

    /// One update of every parameter tensor from its gradient.
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]]) {
        if self.moments.len() != params.len() {
            self.moments = params
                .iter()
                .map(|p| (vec![0.0; p.len()], vec![0.0; p.len()]))
                .collect();
        }
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(self.moments.iter_mut()) {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                p[i] *= 1.0 - self.lr * self.weight_decay;
                p[i] -= self.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + self.eps);
            }
        }
    }
}

/// [`AdamW`] with its moments on a device: one update is a handful of element-wise kernels, so
/// parameters never leave the GPU between steps.
///
/// # Shapes
/// Parameters are flat: `[numel]` each, in a fixed order across steps.
pub struct DeviceAdamW<B: Backend> {
    /// Hyper-parameters and step count; its host moments stay empty.
    pub hyper: AdamW,
    moments: Vec<(Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> DeviceAdamW<B> {
    /// Moves a host optimizer (fresh or resumed) to `device`.
    pub fn new(adam: &AdamW, device: &B::Device) -> Self {
        let up = |v: &Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
        Self {
            hyper: AdamW {
                moments: Vec::new(),
                ..adam.clone()
            },
            moments: adam.moments.iter().map(|(m, v)| (up(m), up(v))).collect(),
        }
    }

    /// The first and second moments, one pair per parameter (empty before the first step).
    pub fn moments(&self) -> &[(Tensor<B, 1>, Tensor<B, 1>)] {
        &self.moments
    }

    /// One update; returns the new parameters.
    pub fn step(&mut self, params: Vec<Tensor<B, 1>>, grads: Vec<Tensor<B, 1>>) -> Vec<Tensor<B, 1>> {
        if self.moments.len() != params.len() {
            self.moments = params.iter().map(|p| (p.zeros_like(), p.zeros_like())).collect();
        }
        let h = &mut self.hyper;
        h.t += 1;
        let (b1, b2) = (h.beta1, h.beta2);
        let c1 = 1.0 - b1.powi(h.t as i32);
        let c2 = 1.0 - b2.powi(h.t as i32);
        let (lr, decay, eps) = (h.lr, 1.0 - h.lr * h.weight_decay, h.eps);
        params
            .into_iter()
            .zip(grads)
            .zip(self.moments.iter_mut())
            .map(|((p, g), (m, v))| {
                *m = m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
                *v = v.clone().mul_scalar(b2) + (g.clone() * g).mul_scalar(1.0 - b2);
                let denom = v.clone().div_scalar(c2).sqrt().add_scalar(eps);
                p.mul_scalar(decay) - m.clone().div_scalar(c1).div(denom).mul_scalar(lr)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let mut adam = AdamW::new(0.1, 0.0);
        let mut p = vec![1.0f32, -1.0];
        adam.step(&mut [&mut p], &[&[0.5, -2.0]]);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6, "{p:?}");
    }

    /// The device optimizer must track the host one (whose state the prompt files hold),
    /// including when it resumes from host moments.
    #[test]
    fn device_adamw_matches_host() {
        type B = crate::Cpu;
        let device = Default::default();
        let mut host = AdamW::new(0.05, 0.01);
        let mut a: Vec<f32> = (0..7).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut b: Vec<f32> = (0..5).map(|i| (i as f32 * 0.91).cos()).collect();
        let grad = |k: usize, n: usize, s: f32| (0..n).map(|i| ((i + 3 * k) as f32 * s).sin()).collect::<Vec<f32>>();
        let up = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let down = |t: &Tensor<B, 1>| t.to_data().to_vec::<f32>().unwrap();
        let mut dev = DeviceAdamW::<B>::new(&host, &device);
        let mut params = vec![up(&a), up(&b)];
        for k in 0..6 {
            if k == 3 {
                // Resume: a host optimizer rebuilt from the device's state.
                let mut state = dev.hyper.clone();
                state.moments = dev.moments().iter().map(|(m, v)| (down(m), down(v))).collect();
                dev = DeviceAdamW::new(&state, &device);
            }
            let (ga, gb) = (grad(k, 7, 0.7), grad(k, 5, 1.3));
            host.step(&mut [&mut a, &mut b], &[&ga, &gb]);
            params = dev.step(params, vec![up(&ga), up(&gb)]);
        }
        for (host, dev) in [(&a, down(&params[0])), (&b, down(&params[1]))] {
            for (x, y) in host.iter().zip(&dev) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{host:?} vs {dev:?}");
            }
        }
        assert_eq!(dev.hyper.t, host.t);
    }
}

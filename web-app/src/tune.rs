//! The Tune view's engine: prompt tuning and deep prompt tuning in the page. The prompts, their
//! gradients and AdamW's moments live on the page's device (WebGPU, through burn's autodiff
//! over wgpu), the blocks run in the swarm through stateless forward/backward requests, the
//! same client steps `corolla train` takes (`shared_model::tuning`), so a run here gives the
//! numbers of a native run with the same settings.

use std::cell::Cell;
use std::rc::Rc;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use shared_model::tuning::{
    AdamW, DeviceAdamW, Example, Prompts, StepInput, StepRecord, TrainBatch, TrainState, TuningMethod, batch_indices,
    head_loss,
};
use shared_model::weights::HostTensor;
use swarm::node::Client;
use swarm::remote::RemoteChain;
use swarm::rt::Instant;

use crate::client::{ClientError, Loaded, remote_config};
use crate::compute::{ClientModel, ComputeError, Parts, read};

/// What the user picked in the Tune view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TuneSettings {
    pub method: TuningMethod,
    pub prefix_len: usize,
    pub steps: usize,
    pub lr: f32,
    pub batch_size: usize,
    pub seed: u64,
}

impl TuneSettings {
    pub fn check(&self) -> Result<(), ClientError> {
        if self.steps == 0 || self.batch_size == 0 || self.prefix_len == 0 {
            return Err(ClientError::Setup(
                "steps, batch size and prefix length must be positive".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ClientError::Setup("the learning rate must be a positive number".into()));
        }
        Ok(())
    }
}

/// One finished step, for the live plot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub record: StepRecord,
    pub tokens_per_s: f64,
}

/// Trains prompts for `settings.steps` steps (fewer if `stop` is set), calling `on_step` after
/// each; returns the run's state (prompts, optimizer, loss history), as `corolla train` saves it.
pub async fn train(
    client: Client,
    loaded: &Loaded,
    examples: &[Example],
    settings: TuneSettings,
    stop: Rc<Cell<bool>>,
    on_step: impl FnMut(StepReport),
) -> Result<TrainState, ClientError> {
    settings.check()?;
    let mut chain = RemoteChain::new(client, remote_config(loaded, None));
    match &loaded.model {
        ClientModel::Gpu(parts, device) => {
            run(parts, device, &mut chain, loaded, examples, settings, stop, on_step).await
        }
        ClientModel::Cpu(parts) => {
            run(
                parts,
                &Default::default(),
                &mut chain,
                loaded,
                examples,
                settings,
                stop,
                on_step,
            )
            .await
        }
        ClientModel::Remote(_) => Err(ClientError::Setup(
            "tuning needs the embeddings and LM head on this page, and this model's run on a server (head service)"
                .into(),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run<B: AutodiffBackend>(
    parts: &Parts<B>,
    device: &B::Device,
    chain: &mut RemoteChain,
    loaded: &Loaded,
    examples: &[Example],
    settings: TuneSettings,
    stop: Rc<Cell<bool>>,
    mut on_step: impl FnMut(StepReport),
) -> Result<TrainState, ClientError> {
    let cfg = &loaded.bundle.config;
    let ids = Prompts::init_ids(settings.prefix_len, cfg.vocab_size, settings.seed)?;
    let raw = read(parts.embeddings.embed_raw(&[ids])?).await?;
    let init = Prompts::from_init_embeddings(settings.method, raw, cfg.num_layers)?;
    let up =
        |t: &HostTensor| Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(t.data.clone(), [t.numel()]), device);
    let prompt_shape = init.prompt.shape.clone();
    let deep_shape = init.deep.as_ref().map(|d| d.shape.clone());
    // The trainable parameters, flat, on the device: the input prompt, then the deep prompts.
    let mut params: Vec<Tensor<B::InnerBackend, 1>> = std::iter::once(&init.prompt)
        .chain(init.deep.as_ref())
        .map(up)
        .collect();
    let mut adam = DeviceAdamW::<B::InnerBackend>::new(&AdamW::new(settings.lr, 0.0), device);
    let mut history: Vec<StepRecord> = Vec::new();
    let started = Instant::now();
    let prefix = settings.prefix_len;
    let pad_id = 0;
    for step in 0..settings.steps {
        if stop.get() {
            break;
        }
        let t0 = Instant::now();
        let picked = batch_indices(examples.len(), settings.batch_size, settings.seed, step);
        let chosen: Vec<&Example> = picked.iter().map(|&i| &examples[i]).collect();
        let batch = TrainBatch::new(&chosen, pad_id)?;
        let prompt = params[0].clone().reshape([prompt_shape[0], prompt_shape[1]]);
        let input = StepInput::<B>::new(&parts.embeddings, prompt, &batch)?;
        let x0 = read(input.hidden()).await?;
        let deep = match (&deep_shape, params.get(1)) {
            (Some(shape), Some(d)) => {
                let mut d = read(d.clone()).await?;
                d.shape = shape.clone();
                Some(d)
            }
            _ => None,
        };
        let out = chain.train_forward(&x0, deep.as_ref()).await?;
        let out = Tensor::<B::InnerBackend, 3>::from_data(TensorData::new(out.data, out.shape), device);
        let (loss, g_last) = head_loss(&parts.head, out, &batch, prefix)?;
        let loss = read(loss).await?.data.first().copied().unwrap_or(f32::NAN);
        if !loss.is_finite() {
            return Err(ClientError::Setup(format!(
                "the loss became {loss} at step {step}: lower the learning rate"
            )));
        }
        let g_last = read(g_last).await?;
        let (g0, g_deep) = chain.train_backward(&g_last).await?;
        let g0 = Tensor::<B::InnerBackend, 3>::from_data(TensorData::new(g0.data, g0.shape), device);
        let mut grads = vec![input.prompt_grad(g0)?.reshape([params[0].dims()[0]])];
        if params.len() == 2 {
            let g = g_deep.ok_or_else(|| ClientError::Setup("the servers returned no deep-prompt gradients".into()))?;
            if g.numel() != params[1].dims()[0] {
                return Err(ComputeError::Shape(g.shape).into());
            }
            grads.push(up(&g));
        }
        params = adam.step(params, grads);
        let record = StepRecord {
            loss,
            tokens: batch.tokens,
            seconds: started.elapsed().as_secs_f64(),
        };
        history.push(record);
        on_step(StepReport {
            step,
            record,
            tokens_per_s: batch.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        });
    }
    // Back to the host in the file format of `corolla train`, so the download resumes there.
    let mut host = Vec::with_capacity(params.len());
    for p in &params {
        host.push(read(p.clone()).await?.data);
    }
    let mut moments = Vec::with_capacity(adam.moments().len());
    for (m, v) in adam.moments() {
        moments.push((read(m.clone()).await?.data, read(v.clone()).await?.data));
    }
    let mut host = host.into_iter();
    let prompt = HostTensor::new(prompt_shape, host.next().unwrap_or_default());
    let deep = deep_shape.map(|shape| HostTensor::new(shape, host.next().unwrap_or_default()));
    let mut optimizer = adam.hyper.clone();
    optimizer.moments = moments;
    Ok(TrainState {
        prompts: Prompts {
            method: settings.method,
            prompt,
            deep,
        },
        adam: optimizer,
        seed: settings.seed,
        batch_size: settings.batch_size,
        history,
    })
}

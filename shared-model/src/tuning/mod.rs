//! Prompt tuning and deep prompt tuning (Petals' `ptune` and `deep_ptune`): the model's weights
//! stay frozen, the client trains a few prefix vectors.
//!
//! - **prompt** (`ptune`): `prompt` `[prefix_len, hidden]` is prepended to the looked-up token
//!   embeddings (before BLOOM's embedding LayerNorm, as Petals does), so every block sees
//!   `prefix_len` extra leading positions.
//! - **deep-prompt** (`deep_ptune`): the same input prompt, plus `deep` `[num_layers,
//!   prefix_len, hidden]`: before block `i` (block 0 included, as in Petals, where the
//!   intermediate prompts start at zero), `deep[i]` is added to the hidden states of the
//!   `prefix_len` prefix positions. Servers receive the rows of their own blocks and return
//!   their gradients.
//!
//! The loss is the mean next-token cross-entropy over the target tokens only: logits at the
//! position of token `j` predict token `j + 1`, weighted by that token's 0/1 weight (padding
//! and, for prompt/completion data, the prompt get 0); prefix positions predict nothing.
//!
//! The blocks sit behind [`TrainBlocks`] (stateless forward, then backward of the last
//! forward), so a local run and a swarm run go through the same client code and give the same
//! numbers.

pub mod dataset;
mod optim;

pub use optim::{AdamW, DeviceAdamW};

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::layers::positions::SeqLayout;
use crate::model::{BlockSpan, Embeddings, LmHead, to_host};
use crate::weights::HostTensor;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TuningMethod {
    /// Trainable input prompt only.
    #[serde(rename = "prompt")]
    Prompt,
    /// Input prompt plus a per-block prefix added before every block.
    #[serde(rename = "deep-prompt")]
    DeepPrompt,
}

impl TuningMethod {
    pub fn name(self) -> &'static str {
        match self {
            TuningMethod::Prompt => "prompt",
            TuningMethod::DeepPrompt => "deep-prompt",
        }
    }
}

/// Errors of prompt tuning and of prompt files.
#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid prompts file: {reason}")]
    BadFile { path: std::path::PathBuf, reason: String },
    #[error("not a valid prompts file: {0}")]
    BadBytes(String),
    #[error("{0}")]
    Invalid(String),
}

/// The deep-prompt addition for one block and one step: `prompt` placed at absolute positions
/// `pad[row] .. pad[row] + prefix_len` of each row, restricted to the step's positions
/// `past .. past + new`; `None` if the step holds none of them.
///
/// # Shapes
/// - `prompt`: `[prefix_len, hidden]`
/// - returns `[batch, new, hidden]`
pub fn prefix_delta<B: Backend>(prompt: Tensor<B, 2>, layout: &SeqLayout) -> Option<Tensor<B, 3>> {
    let [prefix, hidden] = prompt.dims();
    let (past, new) = (layout.past, layout.new);
    let overlaps = |pad: usize| pad + prefix > past && pad < past + new;
    if !layout.pad.iter().any(|&p| overlaps(p)) {
        return None;
    }
    let device = prompt.device();
    let rows = layout
        .pad
        .iter()
        .map(|&pad| {
            let from = pad.max(past);
            let to = (pad + prefix).min(past + new);
            if from >= to {
                return Tensor::<B, 2>::zeros([new, hidden], &device);
            }
            let mut parts = Vec::with_capacity(3);
            if from > past {
                parts.push(Tensor::zeros([from - past, hidden], &device));
            }
            parts.push(prompt.clone().narrow(0, from - pad, to - from));
            if past + new > to {
                parts.push(Tensor::zeros([past + new - to, hidden], &device));
            }
            Tensor::cat(parts, 0)
        })
        .collect::<Vec<_>>();
    Some(Tensor::stack(rows, 0))
}

/// Prepends the input prompt to every row's raw token embeddings, right after its left
/// padding, and applies what comes before block 0 (BLOOM's embedding LayerNorm).
///
/// # Shapes
/// - `raw`: `[batch, seq, hidden]` (from [`Embeddings::embed_raw`]); `prompt`: `[prefix_len, hidden]`
/// - returns `[batch, prefix_len + seq, hidden]`
pub fn with_prompt<B: Backend>(
    embeddings: &Embeddings<B>,
    raw: Tensor<B, 3>,
    prompt: &Tensor<B, 2>,
    pad: &[usize],
) -> Tensor<B, 3> {
    let [batch, seq, hidden] = raw.dims();
    let prefix = prompt.dims()[0];
    let rows = (0..batch)
        .map(|row| {
            let r = raw.clone().narrow(0, row, 1).reshape([seq, hidden]);
            let p = pad.get(row).copied().unwrap_or(0).min(seq);
            let mut parts = Vec::with_capacity(3);
            if p > 0 {
                parts.push(r.clone().narrow(0, 0, p));
            }
            parts.push(prompt.clone());
            parts.push(r.narrow(0, p, seq - p));
            Tensor::cat(parts, 0)
        })
        .collect::<Vec<_>>();
    let x = Tensor::stack::<3>(rows, 0);
    debug_assert_eq!(x.dims(), [batch, prefix + seq, hidden]);
    embeddings.finish(x)
}

/// Trained prompts, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    pub method: TuningMethod,
    /// `[prefix_len, hidden]`
    pub prompt: HostTensor,
    /// `[num_layers, prefix_len, hidden]` for deep prompts.
    pub deep: Option<HostTensor>,
}

impl Prompts {
    /// A fresh start: the input prompt is the embeddings of `prefix_len` tokens drawn with
    /// `seed` (a common initialisation that keeps the prompt at the embeddings' scale); deep
    /// prompts start at zero, as Petals' do, so step 0 equals plain prompt tuning.
    pub fn init<B: Backend>(
        method: TuningMethod,
        prefix_len: usize,
        num_layers: usize,
        vocab: usize,
        embeddings: &Embeddings<B>,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let ids = Self::init_ids(prefix_len, vocab, seed)?;
        Self::from_init_embeddings(method, to_host(embeddings.embed_raw(&[ids])?), num_layers)
    }

    /// The tokens whose embeddings start the input prompt (see [`Self::init`]).
    pub fn init_ids(prefix_len: usize, vocab: usize, seed: u64) -> Result<Vec<u32>, ModelError> {
        if prefix_len == 0 {
            return Err(ModelError::Invalid("the prefix needs at least one position".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5052_4f4d_5054);
        Ok((0..prefix_len).map(|_| rng.random_range(0..vocab as u32)).collect())
    }

    /// [`Self::init`] from the raw embeddings of [`Self::init_ids`], read by the caller (a
    /// page reads GPU tensors asynchronously).
    ///
    /// # Shapes
    /// - `raw`: `[1, prefix_len, hidden]`
    pub fn from_init_embeddings(method: TuningMethod, raw: HostTensor, num_layers: usize) -> Result<Self, ModelError> {
        let [_, prefix_len, hidden] = <[usize; 3]>::try_from(raw.shape.as_slice()).map_err(|_| ModelError::Shape {
            actual: raw.shape.clone(),
            expected: "[1, prefix_len, hidden]".into(),
        })?;
        let prompt = HostTensor::new(vec![prefix_len, hidden], raw.data);
        let deep = (method == TuningMethod::DeepPrompt).then(|| {
            HostTensor::new(
                vec![num_layers, prefix_len, hidden],
                vec![0.0; num_layers * prefix_len * hidden],
            )
        });
        Ok(Self { method, prompt, deep })
    }

    pub fn prefix_len(&self) -> usize {
        self.prompt.shape[0]
    }

    /// Checks the shapes against a model.
    pub fn check(&self, hidden: usize, num_layers: usize) -> Result<(), TuningError> {
        let p = self.prompt.shape.first().copied().unwrap_or(0);
        let ok_prompt = self.prompt.shape == [p, hidden] && p > 0;
        let ok_deep = match (&self.deep, self.method) {
            (Some(d), TuningMethod::DeepPrompt) => d.shape == [num_layers, p, hidden],
            (None, TuningMethod::Prompt) => true,
            _ => false,
        };
        if ok_prompt && ok_deep {
            Ok(())
        } else {
            Err(TuningError::Invalid(format!(
                "prompts of shape {:?} / {:?} do not fit a model of {num_layers} blocks of width {hidden}",
                self.prompt.shape,
                self.deep.as_ref().map(|d| d.shape.clone())
            )))
        }
    }

    /// Loads the prompts of a file written by [`TrainState::save`].
    pub fn load(path: &Path) -> Result<Self, TuningError> {
        Ok(TrainState::load(path)?.prompts)
    }
}

/// Gradients of the trainable parameters, shaped like [`Prompts`].
#[derive(Debug, Clone, PartialEq)]
pub struct PromptGrads {
    pub prompt: HostTensor,
    pub deep: Option<HostTensor>,
}

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub loss: f32,
    /// Tokens the step ran through the model (prefix and padding excluded).
    pub tokens: usize,
    /// Wall-clock seconds since the run's first step (across resumes).
    pub seconds: f64,
}

/// Everything a run needs to continue exactly where it stopped: prompts, optimizer state,
/// the data order's seed and the loss history.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    pub prompts: Prompts,
    pub adam: AdamW,
    pub seed: u64,
    pub batch_size: usize,
    pub history: Vec<StepRecord>,
}

/// Metadata stored in the safetensors header.
#[derive(Debug, Serialize, Deserialize)]
struct StateMeta {
    format: String,
    method: TuningMethod,
    seed: u64,
    batch_size: usize,
    lr: f32,
    weight_decay: f32,
    adam_t: u64,
    history: Vec<StepRecord>,
}

const FORMAT: &str = "corolla-prompts-1";

impl TrainState {
    pub fn step(&self) -> usize {
        self.history.len()
    }

    /// Writes prompts (`prompt`, `deep_prompts`), AdamW moments (`adam.m.*`, `adam.v.*`) and
    /// the run's metadata (header key `corolla`) to one safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<(), TuningError> {
        let out = self.to_bytes()?;
        let tmp = path.with_extension("safetensors.tmp");
        let io = |source| TuningError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, out).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// The bytes [`Self::save`] writes (the web page offers them as a download).
    pub fn to_bytes(&self) -> Result<Vec<u8>, TuningError> {
        let bad = |e: safetensors::SafeTensorError| TuningError::BadBytes(e.to_string());
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let bytes = |d: &[f32]| d.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let p = &self.prompts;
        tensors.push(("prompt".into(), p.prompt.shape.clone(), bytes(&p.prompt.data)));
        let mut shapes = vec![("prompt", p.prompt.shape.clone())];
        if let Some(d) = &p.deep {
            tensors.push(("deep_prompts".into(), d.shape.clone(), bytes(&d.data)));
            shapes.push(("deep_prompts", d.shape.clone()));
        }
        for ((name, shape), (m, v)) in shapes.iter().zip(&self.adam.moments) {
            tensors.push((format!("adam.m.{name}"), shape.clone(), bytes(m)));
            tensors.push((format!("adam.v.{name}"), shape.clone(), bytes(v)));
        }
        let meta = StateMeta {
            format: FORMAT.into(),
            method: p.method,
            seed: self.seed,
            batch_size: self.batch_size,
            lr: self.adam.lr,
            weight_decay: self.adam.weight_decay,
            adam_t: self.adam.t,
            history: self.history.clone(),
        };
        let meta = serde_json::to_string(&meta).map_err(|e| TuningError::BadBytes(e.to_string()))?;
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(bad)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let info = HashMap::from([("corolla".to_string(), meta)]);
        safetensors::serialize(views, Some(info)).map_err(bad)
    }

    /// Reads a file written by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self, TuningError> {
        let bytes = std::fs::read(path).map_err(|source| TuningError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            TuningError::BadBytes(reason) => TuningError::BadFile {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the bytes of [`Self::to_bytes`]; the error says what is wrong with them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TuningError> {
        let bad = TuningError::BadBytes;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("corolla"))
            .ok_or_else(|| bad("no `corolla` metadata".into()))?;
        let meta: StateMeta = serde_json::from_str(meta).map_err(|e| bad(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(bad(format!("format {} (expected {FORMAT})", meta.format)));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str| -> Result<Option<HostTensor>, TuningError> {
            let Ok(t) = st.tensor(name) else {
                return Ok(None);
            };
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, not F32", t.dtype())));
            }
            let data: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Some(HostTensor::new(t.shape().to_vec(), data)))
        };
        let prompt = read("prompt")?.ok_or_else(|| bad("no `prompt` tensor".into()))?;
        let deep = read("deep_prompts")?;
        if prompt.shape.len() != 2 || deep.as_ref().is_some_and(|d| d.shape.len() != 3) {
            return Err(bad(
                "prompt must be [prefix_len, hidden], deep_prompts [layers, prefix_len, hidden]".into(),
            ));
        }
        let mut moments = Vec::new();
        for (name, param) in [("prompt", Some(&prompt)), ("deep_prompts", deep.as_ref())] {
            let Some(param) = param else { continue };
            match (read(&format!("adam.m.{name}"))?, read(&format!("adam.v.{name}"))?) {
                (Some(m), Some(v)) if m.shape == param.shape && v.shape == param.shape => {
                    moments.push((m.data, v.data))
                }
                (None, None) if meta.adam_t == 0 => {}
                _ => return Err(bad(format!("optimizer state of {name} missing or misshapen"))),
            }
        }
        let mut adam = AdamW::new(meta.lr, meta.weight_decay);
        adam.t = meta.adam_t;
        adam.moments = moments;
        Ok(Self {
            prompts: Prompts {
                method: meta.method,
                prompt,
                deep,
            },
            adam,
            seed: meta.seed,
            batch_size: meta.batch_size,
            history: meta.history,
        })
    }

    /// Applies one step's gradients.
    pub fn apply(&mut self, grads: &PromptGrads) -> Result<(), TuningError> {
        let p = &mut self.prompts;
        match (&mut p.deep, &grads.deep) {
            (Some(d), Some(g)) if g.shape == d.shape && grads.prompt.shape == p.prompt.shape => {
                self.adam
                    .step(&mut [&mut p.prompt.data, &mut d.data], &[&grads.prompt.data, &g.data]);
            }
            (None, None) if grads.prompt.shape == p.prompt.shape => {
                self.adam.step(&mut [&mut p.prompt.data], &[&grads.prompt.data]);
            }
            _ => return Err(TuningError::Invalid("gradients do not match the prompts".into())),
        }
        Ok(())
    }
}

/// One training sequence: token ids and, per token, whether it is a loss target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `weights[j]` is 1 if token `j` is predicted (it needs `j >= 1`), else 0.
    pub weights: Vec<f32>,
}

/// A right-padded batch: padding follows the tokens, so causal attention keeps it from
/// touching them and no mask is needed; padded positions carry weight 0.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    pub ids: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
    /// Tokens that are not padding.
    pub tokens: usize,
}

impl TrainBatch {
    pub fn new(examples: &[&Example], pad_id: u32) -> Result<Self, ModelError> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        if examples.is_empty() || len < 2 {
            return Err(ModelError::Invalid(
                "a batch needs sequences of at least 2 tokens".into(),
            ));
        }
        let mut ids = Vec::with_capacity(examples.len());
        let mut weights = Vec::with_capacity(examples.len());
        for e in examples {
            if e.ids.len() != e.weights.len() {
                return Err(ModelError::Invalid("an example needs one weight per token".into()));
            }
            let mut row = e.ids.clone();
            row.resize(len, pad_id);
            let mut w = e.weights.clone();
            w.resize(len, 0.0);
            w[0] = 0.0;
            ids.push(row);
            weights.push(w);
        }
        Ok(Self {
            ids,
            weights,
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
        })
    }
}

/// The examples of step `step`: epochs are shuffles of all examples, drawn from `seed` and the
/// epoch number, laid end to end; step `s` takes the next `batch_size`. A pure function of its
/// arguments, so a resumed run sees the same batches.
pub fn batch_indices(num_examples: usize, batch_size: usize, seed: u64, step: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch_size);
    let mut pos = step * batch_size;
    let mut epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();
    while out.len() < batch_size && num_examples > 0 {
        let e = pos / num_examples;
        if e != epoch {
            epoch = e;
            order = (0..num_examples).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ e as u64,
            ));
        }
        out.push(order[pos % num_examples]);
        pos += 1;
    }
    out
}

/// Mean cross-entropy of the weighted next-token targets after a prefix of `prefix` positions.
///
/// # Shapes
/// - `logits`: `[batch, prefix + seq, vocab]`; the batch's rows hold `seq` tokens
/// - returns a one-element tensor
pub fn masked_next_token_loss<B: Backend>(
    logits: Tensor<B, 3>,
    batch: &TrainBatch,
    prefix: usize,
) -> Result<Tensor<B, 1>, ModelError> {
    let [b, total, v] = logits.dims();
    let t = batch.ids.first().map_or(0, Vec::len);
    if batch.ids.len() != b || total != prefix + t || t < 2 {
        return Err(ModelError::Shape {
            actual: vec![b, total, v],
            expected: format!("[{}, {prefix} + {t}, vocab]", batch.ids.len()),
        });
    }
    let n = b * (t - 1);
    let mut targets = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for (ids, w) in batch.ids.iter().zip(&batch.weights) {
        for j in 1..t {
            if ids[j] as usize >= v {
                return Err(ModelError::TokenOutOfRange { id: ids[j], vocab: v });
            }
            targets.push(ids[j] as i64);
            weights.push(w[j]);
        }
    }
    let count: f32 = weights.iter().sum();
    if count <= 0.0 {
        return Err(ModelError::Invalid("the batch has no target tokens".into()));
    }
    let device = logits.device();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [n, 1]), &device);
    let logp = burn::tensor::activation::log_softmax(logits.narrow(1, prefix, t - 1).reshape([n, v]), 1);
    Ok((logp.gather(1, targets) * weights).sum().div_scalar(count).neg())
}

/// The blocks of a training step, local or remote: a stateless forward over the whole model,
/// then the backward of that forward.
pub trait TrainBlocks {
    type Error: From<ModelError>;

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` (rows unpadded on the left); `deep`: `[num_layers, prefix, hidden]`
    /// - returns `[batch, seq, hidden]`, the last block's raw output
    fn forward(&mut self, x: &HostTensor, deep: Option<&HostTensor>) -> Result<HostTensor, Self::Error>;

    /// Gradients w.r.t. the last forward's input and deep prompts, given that w.r.t. its output.
    fn backward(&mut self, grad_output: &HostTensor) -> Result<(HostTensor, Option<HostTensor>), Self::Error>;
}

/// Rows `range` of a `[layers, prefix, hidden]` tensor.
pub fn deep_rows(deep: &HostTensor, range: std::ops::Range<usize>) -> HostTensor {
    let per = deep.shape[1] * deep.shape[2];
    HostTensor::new(
        vec![range.len(), deep.shape[1], deep.shape[2]],
        deep.data[range.start * per..range.end * per].to_vec(),
    )
}

/// Gradients w.r.t. a span's input and, if given, its deep prompts.
pub type SpanGrads<B> = (
    Tensor<<B as AutodiffBackend>::InnerBackend, 3>,
    Option<Tensor<<B as AutodiffBackend>::InnerBackend, 3>>,
);

/// A span's stateless forward, and its backward recomputed with autodiff (what a server does
/// for a span request).
///
/// # Shapes
/// - `x`, `grad_output`: `[batch, seq, hidden]`; `deep`: `[blocks.len(), prefix, hidden]`
/// - returns the input gradient and, with `deep`, its gradient
pub fn span_backward<B: AutodiffBackend>(
    span: &BlockSpan<B>,
    blocks: std::ops::Range<usize>,
    pad: Vec<usize>,
    x: Tensor<B, 3>,
    deep: Option<Tensor<B, 3>>,
    grad_output: Tensor<B, 3>,
) -> Result<SpanGrads<B>, ModelError> {
    let x = x.require_grad();
    let deep = deep.map(Tensor::require_grad);
    let y = span.forward_full_prompted(x.clone(), pad, blocks, deep.as_ref(), None)?;
    // d<y, g>/dx = J^T g: the input gradient for the given output gradient.
    let grads = (y * grad_output).sum().backward();
    let missing = || ModelError::Invalid("no gradient reached the input".into());
    let gx = x.grad(&grads).ok_or_else(missing)?;
    let gd = match deep {
        Some(d) => Some(d.grad(&grads).ok_or_else(missing)?),
        None => None,
    };
    Ok((gx, gd))
}

/// Blocks in this process, run the way servers run them (stateless forward, backward by
/// recomputation), so a local run's numbers are those of a swarm run.
pub struct LocalTrainBlocks<'a, B: AutodiffBackend> {
    spans: &'a [BlockSpan<B>],
    device: B::Device,
    /// Each span's input of the last forward, and the deep prompts.
    saved: Vec<HostTensor>,
    deep: Option<HostTensor>,
}

impl<'a, B: AutodiffBackend> LocalTrainBlocks<'a, B> {
    pub fn new(spans: &'a [BlockSpan<B>], device: B::Device) -> Self {
        Self {
            spans,
            device,
            saved: Vec::new(),
            deep: None,
        }
    }

    fn upload(&self, t: &HostTensor) -> Tensor<B, 3> {
        Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &self.device)
    }
}

impl<B: AutodiffBackend> TrainBlocks for LocalTrainBlocks<'_, B> {
    type Error = ModelError;

    fn forward(&mut self, x: &HostTensor, deep: Option<&HostTensor>) -> Result<HostTensor, ModelError> {
        self.saved.clear();
        self.deep = deep.cloned();
        let mut h = x.clone();
        for span in self.spans {
            let d = deep.map(|d| self.upload(&deep_rows(d, span.range())));
            let y = span.forward_full_prompted(self.upload(&h), vec![0; h.shape[0]], span.range(), d.as_ref(), None)?;
            self.saved.push(std::mem::replace(&mut h, to_host(y)));
        }
        Ok(h)
    }

    fn backward(&mut self, grad_output: &HostTensor) -> Result<(HostTensor, Option<HostTensor>), ModelError> {
        if self.saved.is_empty() {
            return Err(ModelError::Invalid("backward needs a forward first".into()));
        }
        let saved = std::mem::take(&mut self.saved);
        let mut g = grad_output.clone();
        let mut deep_grads: Vec<HostTensor> = Vec::new();
        for (span, x) in self.spans.iter().zip(&saved).rev() {
            let d = self.deep.as_ref().map(|d| self.upload(&deep_rows(d, span.range())));
            let pad = vec![0; x.shape[0]];
            let (gx, gd) = span_backward(span, span.range(), pad, self.upload(x), d, self.upload(&g))?;
            g = to_host(gx);
            deep_grads.extend(gd.map(to_host));
        }
        let deep = self.deep.as_ref().map(|d| {
            let mut data = Vec::with_capacity(d.numel());
            for part in deep_grads.iter().rev() {
                data.extend_from_slice(&part.data);
            }
            HostTensor::new(d.shape.clone(), data)
        });
        Ok((g, deep))
    }
}

/// The client's side of a step before the blocks: the input prompt as a trainable leaf, and
/// block 0's input built from it (kept with its graph for the prompt's gradient).
pub struct StepInput<B: AutodiffBackend> {
    prompt: Tensor<B, 2>,
    x0: Tensor<B, 3>,
}

impl<B: AutodiffBackend> StepInput<B> {
    /// # Shapes
    /// - `prompt`: `[prefix_len, hidden]`; the batch's rows hold `seq` tokens
    pub fn new(
        embeddings: &Embeddings<B>,
        prompt: Tensor<B::InnerBackend, 2>,
        batch: &TrainBatch,
    ) -> Result<Self, ModelError> {
        let prompt = Tensor::<B, 2>::from_inner(prompt).require_grad();
        let raw = embeddings.embed_raw(&batch.ids)?;
        let x0 = with_prompt(embeddings, raw, &prompt, &vec![0; batch.ids.len()]);
        Ok(Self { prompt, x0 })
    }

    /// Block 0's input, for the blocks.
    ///
    /// # Shapes
    /// - returns `[batch, prefix_len + seq, hidden]`
    pub fn hidden(&self) -> Tensor<B::InnerBackend, 3> {
        self.x0.clone().inner()
    }

    /// The input prompt's gradient, given the gradient w.r.t. block 0's input.
    ///
    /// # Shapes
    /// - `g0`: like [`Self::hidden`]; returns `[prefix_len, hidden]`
    pub fn prompt_grad(self, g0: Tensor<B::InnerBackend, 3>) -> Result<Tensor<B::InnerBackend, 2>, ModelError> {
        if g0.dims() != self.x0.dims() {
            return Err(ModelError::Shape {
                actual: g0.dims().to_vec(),
                expected: format!("{:?}", self.x0.dims()),
            });
        }
        let grads = (self.x0 * Tensor::from_inner(g0)).sum().backward();
        self.prompt
            .grad(&grads)
            .ok_or_else(|| ModelError::Invalid("no gradient reached the prompt".into()))
    }
}

/// The loss of the last block's output, and its gradient w.r.t. that output (what the blocks'
/// backward starts from).
///
/// # Shapes
/// - `last`: `[batch, prefix + seq, hidden]`; returns a one-element loss and a gradient shaped like `last`
pub fn head_loss<B: AutodiffBackend>(
    head: &LmHead<B>,
    last: Tensor<B::InnerBackend, 3>,
    batch: &TrainBatch,
    prefix: usize,
) -> Result<(Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 3>), ModelError> {
    let last = Tensor::<B, 3>::from_inner(last).require_grad();
    let loss = masked_next_token_loss(head.forward(last.clone()), batch, prefix)?;
    let grads = loss.backward();
    let g_last = last
        .grad(&grads)
        .ok_or_else(|| ModelError::Invalid("no gradient reached the last hidden states".into()))?;
    Ok((loss.inner(), g_last))
}

/// One training step's forward and backward: returns the loss and the prompts' gradients.
pub fn train_step<B: AutodiffBackend, R: TrainBlocks>(
    embeddings: &Embeddings<B>,
    head: &LmHead<B>,
    blocks: &mut R,
    prompts: &Prompts,
    batch: &TrainBatch,
) -> Result<(f32, PromptGrads), R::Error> {
    let device = embeddings.device();
    let up = |t: HostTensor| Tensor::<B::InnerBackend, 3>::from_data(TensorData::new(t.data, t.shape), &device);
    let [prefix, hidden] = [prompts.prompt.shape[0], prompts.prompt.shape[1]];
    let prompt = Tensor::from_data(TensorData::new(prompts.prompt.data.clone(), [prefix, hidden]), &device);
    let input = StepInput::<B>::new(embeddings, prompt, batch)?;
    let out = blocks.forward(&to_host(input.hidden()), prompts.deep.as_ref())?;
    let (loss, g_last) = head_loss(head, up(out), batch, prefix)?;
    let loss_value = loss.into_scalar().elem::<f32>();
    let (g0, g_deep) = blocks.backward(&to_host(g_last))?;
    let g_prompt = to_host(input.prompt_grad(up(g0))?);
    Ok((
        loss_value,
        PromptGrads {
            prompt: g_prompt,
            deep: g_deep,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once_and_repeat_per_seed() {
        let steps: Vec<usize> = (0..5).flat_map(|s| batch_indices(7, 3, 42, s)).collect();
        let mut first: Vec<usize> = steps[..7].to_vec();
        first.sort_unstable();
        assert_eq!(first, (0..7).collect::<Vec<_>>());
        assert_eq!(batch_indices(7, 3, 42, 3), steps[9..12]);
        assert_ne!(
            (0..3).flat_map(|s| batch_indices(7, 3, 1, s)).collect::<Vec<_>>(),
            steps[..9]
        );
    }

    #[test]
    fn prefix_delta_lands_after_left_padding() {
        type B = crate::Cpu;
        let prompt = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [2, 1]), &Default::default());
        let layout = SeqLayout {
            pad: vec![0, 1],
            past: 0,
            new: 3,
        };
        let d = to_host(prefix_delta(prompt.clone(), &layout).expect("overlaps"));
        assert_eq!(d.data, vec![1.0, 2.0, 0.0, 0.0, 1.0, 2.0]);
        let later = SeqLayout {
            pad: vec![0, 1],
            past: 2,
            new: 1,
        };
        let d = to_host(prefix_delta(prompt.clone(), &later).expect("row 1 overlaps"));
        assert_eq!(d.data, vec![0.0, 2.0]);
        let none = SeqLayout {
            pad: vec![0, 0],
            past: 2,
            new: 1,
        };
        assert!(prefix_delta(prompt, &none).is_none());
    }
}

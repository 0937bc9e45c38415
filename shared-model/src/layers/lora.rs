//! LoRA adapters in PEFT's format, applied on top of frozen weights.
//!
//! An adapter folder holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`) and
//! `adapter_model.safetensors` with `base_model.model.<block prefix><module>.lora_A.weight`
//! `[r, in]` and `...lora_B.weight` `[out, r]`. A targeted projection computes
//! `y = x W + (alpha / r) (x A^T) B^T`; the weights are never merged.
//!
//! The block fuses q/k/v into one `[q | k | v]` projection and gate/up into `[gate | up]`
//! (see [`crate::checkpoint`]), so per-projection adapters are fused the same way: their `A`s
//! are stacked (`[r_q + r_k + r_v, in]`) and their `B`s placed block-diagonally, each in the
//! output rows of its projection. That is exactly the sum of the separate updates.
//!
//! Supported: families with separate `q_proj`/`k_proj`/`v_proj` (Llama, Mistral, Qwen2,
//! Mixtral's attention) and gated MLPs (`gate_proj`, `up_proj`, `down_proj`); other targets
//! are refused with an error naming them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::checkpoint::block_prefix;
use crate::config::{MlpKind, ModelConfig, QkvLayout};
use crate::weights::{HostTensor, SafetensorsSource, WeightError, WeightSource};

/// Errors loading an adapter.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// `adapter_config.json`, the fields that matter here.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

impl LoraConfig {
    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }
}

/// One fused low-rank update on the host: `delta = x a^T b^T`, the scale folded into `b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPairWeights {
    /// `[rank, in]`
    pub a: HostTensor,
    /// `[out, rank]`
    pub b: HostTensor,
}

/// Updates of one block's projections, in the block's fused layout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockLoraWeights {
    pub qkv: Option<LoraPairWeights>,
    pub out: Option<LoraPairWeights>,
    pub gate_up: Option<LoraPairWeights>,
    pub down: Option<LoraPairWeights>,
}

/// An adapter loaded for blocks `range` of a model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub name: String,
    pub range: Range<usize>,
    pub blocks: Vec<BlockLoraWeights>,
}

/// One projection's `(output rows in the fused projection, A, B)`.
type FusedPart = (Range<usize>, HostTensor, HostTensor);

/// Stacks `(a, b)` parts whose outputs lie at `rows` of a fused projection of `out` rows.
fn fuse(parts: &[(Range<usize>, &HostTensor, &HostTensor)], out: usize, scale: f32) -> Option<LoraPairWeights> {
    let first = parts.first()?;
    let inp = first.1.shape[1];
    let rank: usize = parts.iter().map(|(_, a, _)| a.shape[0]).sum();
    let mut a = Vec::with_capacity(rank * inp);
    let mut b = vec![0.0f32; out * rank];
    let mut col = 0;
    for (rows, pa, pb) in parts {
        a.extend_from_slice(&pa.data);
        let r = pa.shape[0];
        for (i, row) in rows.clone().enumerate() {
            for k in 0..r {
                b[row * rank + col + k] = scale * pb.data[i * r + k];
            }
        }
        col += r;
    }
    Some(LoraPairWeights {
        a: HostTensor::new(vec![rank, inp], a),
        b: HostTensor::new(vec![out, rank], b),
    })
}

impl LoraAdapter {
    /// Loads the adapter in `dir` for blocks `range`; its name is the folder's name.
    pub fn load(dir: &Path, config: &ModelConfig, range: Range<usize>) -> Result<Self, LoraError> {
        let invalid = |reason: String| LoraError::Invalid {
            path: dir.to_path_buf(),
            reason,
        };
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| LoraError::Io {
            path: config_path.clone(),
            source,
        })?;
        let lora: LoraConfig = serde_json::from_str(&text).map_err(|e| invalid(format!("adapter_config.json: {e}")))?;
        if lora.r == 0 || lora.fan_in_fan_out {
            return Err(invalid("r must be positive and fan_in_fan_out false".into()));
        }
        let a = config.attention;
        let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let d = config.hidden_size;
        let inter = match (config.attention.layout, config.mlp) {
            (QkvLayout::Separate, MlpKind::Gated { intermediate, .. }) => Some(intermediate),
            (QkvLayout::Separate, MlpKind::Moe { .. }) => None,
            _ => {
                return Err(invalid(format!(
                    "LoRA is not supported for {:?} models yet",
                    config.family
                )));
            }
        };
        // Module -> (fused projection, output rows within it, in, out).
        let mut shapes: BTreeMap<&str, (&str, Range<usize>, usize, usize)> = BTreeMap::from([
            ("q_proj", ("qkv", 0..q, d, q)),
            ("k_proj", ("qkv", q..q + kv, d, kv)),
            ("v_proj", ("qkv", q + kv..q + 2 * kv, d, kv)),
            ("o_proj", ("out", 0..d, q, d)),
        ]);
        if let Some(i) = inter {
            shapes.insert("gate_proj", ("gate_up", 0..i, d, i));
            shapes.insert("up_proj", ("gate_up", i..2 * i, d, i));
            shapes.insert("down_proj", ("down", 0..d, i, d));
        }
        for t in &lora.target_modules {
            let short = t.rsplit('.').next().unwrap_or(t);
            if !shapes.contains_key(short) {
                return Err(invalid(format!("target module {t:?} is not supported for this model")));
            }
        }
        let source = SafetensorsSource::open_file(&dir.join("adapter_model.safetensors"))?;
        let names = source.names();
        let find = |prefix: &str, module: &str, ab: &str| -> Option<String> {
            let sub = if matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                "self_attn"
            } else {
                "mlp"
            };
            [
                format!("base_model.model.{prefix}{sub}.{module}.lora_{ab}.weight"),
                format!("base_model.model.{prefix}{sub}.{module}.lora_{ab}.default.weight"),
            ]
            .into_iter()
            .find(|n| names.contains(n))
        };
        // A tensor this loader would skip (another module, `modules_to_save`, a LoRA bias)
        // would silently change what the adapter computes: refuse it instead.
        let known: std::collections::BTreeSet<String> = (0..config.num_layers)
            .flat_map(|i| {
                let prefix = block_prefix(config.family, i);
                shapes
                    .keys()
                    .flat_map(|m| ["A", "B"].map(|ab| (m.to_string(), ab)))
                    .flat_map(move |(m, ab)| {
                        let sub = if matches!(m.as_str(), "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                            "self_attn"
                        } else {
                            "mlp"
                        };
                        [
                            format!("base_model.model.{prefix}{sub}.{m}.lora_{ab}.weight"),
                            format!("base_model.model.{prefix}{sub}.{m}.lora_{ab}.default.weight"),
                        ]
                    })
            })
            .collect();
        if let Some(unknown) = names.iter().find(|n| !known.contains(*n)) {
            return Err(invalid(format!(
                "tensor {unknown} is not a LoRA weight this model can apply"
            )));
        }
        if names.is_empty() {
            return Err(invalid("adapter_model.safetensors holds no tensors".into()));
        }
        let scale = lora.scale();
        let mut blocks = Vec::with_capacity(range.len());
        for index in range.clone() {
            let prefix = block_prefix(config.family, index);
            let mut found: BTreeMap<&str, Vec<FusedPart>> = BTreeMap::new();
            for (module, (fused, rows, inp, out)) in &shapes {
                let (Some(an), Some(bn)) = (find(&prefix, module, "A"), find(&prefix, module, "B")) else {
                    continue;
                };
                let (ta, tb) = (source.read(&an)?, source.read(&bn)?);
                let r = ta.shape.first().copied().unwrap_or(0);
                if ta.shape != [r, *inp] || tb.shape != [*out, r] || r == 0 {
                    return Err(invalid(format!(
                        "{an} {:?} / {bn} {:?} do not fit a [{out}, {inp}] projection",
                        ta.shape, tb.shape
                    )));
                }
                found.entry(fused).or_default().push((rows.clone(), ta, tb));
            }
            let pair = |name: &str, out: usize| {
                found.get(name).and_then(|parts| {
                    let parts: Vec<_> = parts.iter().map(|(r, a, b)| (r.clone(), a, b)).collect();
                    fuse(&parts, out, scale)
                })
            };
            blocks.push(BlockLoraWeights {
                qkv: pair("qkv", q + 2 * kv),
                out: pair("out", d),
                gate_up: inter.and_then(|i| pair("gate_up", 2 * i)),
                down: pair("down", d),
            });
        }
        // An adapter without weights for these blocks (PEFT's `layers_to_transform`) leaves
        // them unchanged: the server still offers it, so routes can pass through.
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| invalid("the adapter folder has no name".into()))?;
        Ok(Self { name, range, blocks })
    }

    pub fn to_device<B: Backend>(&self, device: &B::Device) -> LoraSpan<B> {
        LoraSpan {
            range: self.range.clone(),
            blocks: self.blocks.iter().map(|b| BlockLora::new(b, device)).collect(),
        }
    }
}

/// One fused low-rank update on a device.
#[derive(Debug, Clone)]
pub struct LoraPair<B: Backend> {
    /// `[in, rank]`
    a_t: Tensor<B, 2>,
    /// `[rank, out]`, scaled
    b_t: Tensor<B, 2>,
}

impl<B: Backend> LoraPair<B> {
    fn new(w: &LoraPairWeights, device: &B::Device) -> Self {
        let t = |h: &HostTensor| {
            Tensor::<B, 2>::from_data(TensorData::new(h.data.clone(), [h.shape[0], h.shape[1]]), device).transpose()
        };
        Self {
            a_t: t(&w.a),
            b_t: t(&w.b),
        }
    }

    /// # Shapes
    /// - `x`: `[tokens, in]`
    /// - returns `[tokens, out]`
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.a_t.clone()).matmul(self.b_t.clone())
    }

    /// # Shapes
    /// - `x`: `[batch, seq, in]`
    /// - returns `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let out = self.b_t.dims()[1];
        self.forward_2d(x.reshape([b * t, d])).reshape([b, t, out])
    }
}

/// The updates of one block.
#[derive(Debug, Clone)]
pub struct BlockLora<B: Backend> {
    pub qkv: Option<LoraPair<B>>,
    pub out: Option<LoraPair<B>>,
    pub gate_up: Option<LoraPair<B>>,
    pub down: Option<LoraPair<B>>,
}

impl<B: Backend> BlockLora<B> {
    fn new(w: &BlockLoraWeights, device: &B::Device) -> Self {
        let up = |p: &Option<LoraPairWeights>| p.as_ref().map(|p| LoraPair::new(p, device));
        Self {
            qkv: up(&w.qkv),
            out: up(&w.out),
            gate_up: up(&w.gate_up),
            down: up(&w.down),
        }
    }
}

/// An adapter's updates for a span of blocks, on a device.
#[derive(Debug, Clone)]
pub struct LoraSpan<B: Backend> {
    range: Range<usize>,
    blocks: Vec<BlockLora<B>>,
}

impl<B: Backend> LoraSpan<B> {
    /// The updates of absolute block `index`, if this span covers it.
    pub fn block(&self, index: usize) -> Option<&BlockLora<B>> {
        index.checked_sub(self.range.start).and_then(|i| self.blocks.get(i))
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }
}

/// Adds `pair`'s update of `x` to `y` when there is one.
pub fn add_delta<B: Backend>(y: Tensor<B, 3>, x: Tensor<B, 3>, pair: Option<&LoraPair<B>>) -> Tensor<B, 3> {
    match pair {
        Some(p) => y + p.forward(x),
        None => y,
    }
}

/// 2-D form of [`add_delta`].
pub fn add_delta_2d<B: Backend>(y: Tensor<B, 2>, x: Tensor<B, 2>, pair: Option<&LoraPair<B>>) -> Tensor<B, 2> {
    match pair {
        Some(p) => y + p.forward_2d(x),
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_update_equals_separate_updates() {
        // q: 2 rows, v: 1 row of a 4-row fused projection (k untouched), in = 3.
        let aq = HostTensor::new(vec![1, 3], vec![1.0, 2.0, 3.0]);
        let bq = HostTensor::new(vec![2, 1], vec![1.0, -1.0]);
        let av = HostTensor::new(vec![2, 3], vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        let bv = HostTensor::new(vec![1, 2], vec![2.0, 3.0]);
        let f = fuse(&[(0..2, &aq, &bq), (3..4, &av, &bv)], 4, 0.5).expect("parts");
        assert_eq!(f.a.shape, vec![3, 3]);
        assert_eq!(f.b.shape, vec![4, 3]);
        // x = [1, 1, 1]: q update = 0.5 * 6 * [1, -1]; v update = 0.5 * (2 * 1 + 3 * 1).
        let x = [1.0f32, 1.0, 1.0];
        let ax: Vec<f32> = (0..3)
            .map(|r| (0..3).map(|i| f.a.data[r * 3 + i] * x[i]).sum())
            .collect();
        let y: Vec<f32> = (0..4)
            .map(|o| (0..3).map(|r| f.b.data[o * 3 + r] * ax[r]).sum())
            .collect();
        assert_eq!(y, vec![3.0, -3.0, 0.0, 2.5]);
    }
}

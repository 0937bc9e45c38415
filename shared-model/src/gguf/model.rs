//! A Hugging Face view of llama-architecture GGUF files (Llama, Mistral, SmolLM, Mixtral, ...).

use crate::quant::{QuantKind, QuantMatrix};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Value, json};

use super::{GgufError, GgufFile, dequantize_named};
use crate::weights::{HostTensor, StoredTensor, WeightError, WeightSource, tensor_range};

/// How a Hugging Face tensor is derived from a GGUF tensor.
#[derive(Debug, Clone, PartialEq)]
enum Transform {
    Plain,
    /// Undo llama.cpp's rotary permutation of q/k rows, with this many heads.
    Unpermute {
        n_head: usize,
    },
    /// One expert's slice of a 3-D `*_exps` tensor.
    Expert {
        index: usize,
        count: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Source {
    gguf_name: String,
    transform: Transform,
}

/// llama.cpp tensor names that are derived data rather than weights: llama.cpp precomputes
/// Llama-3 rope frequency factors into `rope_freqs.weight`; Hugging Face recomputes them from
/// `rope_scaling` in the config, which [`GgufModel::hf_config`] rebuilds from this tensor.
const DERIVED: &[&str] = &["rope_freqs.weight"];

/// A llama-architecture GGUF file that hands out tensors under Hugging Face names.
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    arch: String,
    n_head: usize,
    n_head_kv: usize,
    sources: BTreeMap<String, Source>,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<GgufModel, GgufError> {
        Self::new(GgufFile::open(path)?)
    }

    /// Maps every tensor of `file`; any tensor without a Hugging Face counterpart is an error,
    /// since silently dropping it would hide a misread architecture.
    pub fn new(file: GgufFile) -> Result<GgufModel, GgufError> {
        let arch = file.get_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(GgufError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let block_count = file.get_u32(&key("block_count"))? as usize;
        let n_head = file.get_u32(&key("attention.head_count"))? as usize;
        let n_head_kv = file
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        let expert_count = file.opt_u32(&key("expert_count"))?.unwrap_or(0) as usize;
        if n_head == 0 || n_head_kv == 0 {
            return Err(GgufError::BadValue {
                key: key("attention.head_count"),
                reason: "head counts must be positive".into(),
            });
        }

        let mut sources = BTreeMap::new();
        for info in file.tensors() {
            let name = info.name.as_str();
            if DERIVED.contains(&name) {
                continue;
            }
            let mapped = map_name(name, block_count, expert_count)
                .ok_or_else(|| GgufError::UnknownTensorName(name.to_string()))?;
            // No weight is empty, and an empty tensor's other dims are unbounded by the file's
            // size: a q/k or quantized read loops over (and allocates for) every declared row
            // (found by fuzzing: dims [0, 2^32] ran for minutes and past 2 GiB).
            if info.n_elements() == 0 {
                return Err(GgufError::TensorShape {
                    tensor: name.to_string(),
                    dims: info.dims.clone(),
                    expected: "at least one element".into(),
                });
            }
            if mapped.kind == Kind::Experts && info.dims.len() != 3 {
                return Err(GgufError::TensorShape {
                    tensor: name.to_string(),
                    dims: info.dims.clone(),
                    expected: "3 dimensions (ne0, ne1, experts)".into(),
                });
            }
            match mapped.kind {
                Kind::Plain => {
                    sources.insert(
                        mapped.hf_names[0].clone(),
                        Source {
                            gguf_name: name.to_string(),
                            transform: Transform::Plain,
                        },
                    );
                }
                Kind::Q | Kind::K => {
                    let heads = if mapped.kind == Kind::Q { n_head } else { n_head_kv };
                    // Rows are PyTorch dim 0, ggml's last dim.
                    let rows = info.dims.last().copied().unwrap_or(0);
                    if info.dims.len() > 2 || !rows.is_multiple_of(2 * heads as u64) {
                        return Err(GgufError::TensorShape {
                            tensor: name.to_string(),
                            dims: info.dims.clone(),
                            expected: format!("at most 2 dims, rows divisible by 2 x {heads} heads"),
                        });
                    }
                    sources.insert(
                        mapped.hf_names[0].clone(),
                        Source {
                            gguf_name: name.to_string(),
                            transform: Transform::Unpermute { n_head: heads },
                        },
                    );
                }
                Kind::Experts => {
                    let count = info.dims[2] as usize;
                    if count != expert_count {
                        return Err(GgufError::TensorShape {
                            tensor: name.to_string(),
                            dims: info.dims.clone(),
                            expected: format!("{expert_count} experts ({})", key("expert_count")),
                        });
                    }
                    for (index, hf) in expert_names(&mapped.hf_names[0], count).into_iter().enumerate() {
                        sources.insert(
                            hf,
                            Source {
                                gguf_name: name.to_string(),
                                transform: Transform::Expert { index, count },
                            },
                        );
                    }
                }
            }
        }
        Ok(GgufModel {
            file,
            arch,
            n_head,
            n_head_kv,
            sources,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The llama.cpp tensor a Hugging Face name is read from.
    pub fn gguf_name(&self, hf_name: &str) -> Option<&str> {
        self.sources.get(hf_name).map(|s| s.gguf_name.as_str())
    }

    /// How a Hugging Face tensor is stored, and where its bytes start in the file. An expert
    /// of a `*_exps` tensor is its slice: an exact `1/count` of the bytes (whole rows of whole
    /// blocks, checked at open).
    fn stored_extent(&self, hf_name: &str) -> Result<(StoredTensor, u64), GgufError> {
        let src = self
            .sources
            .get(hf_name)
            .ok_or_else(|| GgufError::MissingTensor(hf_name.to_string()))?;
        let info = self
            .file
            .tensor_info(&src.gguf_name)
            .ok_or_else(|| GgufError::MissingTensor(src.gguf_name.clone()))?;
        let unsupported = || GgufError::UnsupportedType {
            tensor: src.gguf_name.clone(),
            ggml_type: info.ggml_type.to_string(),
        };
        let byte_len = info.byte_len().ok_or_else(unsupported)?;
        // In the file: bounds were checked at open for every type with a known layout.
        let start = self.file.tensor_file_offset(info).ok_or_else(unsupported)?;
        let (shape, byte_len, start) = match src.transform {
            Transform::Plain | Transform::Unpermute { .. } => (info.shape(), byte_len, start),
            Transform::Expert { index, count } => {
                let per_expert = byte_len / count.max(1) as u64;
                let skip = per_expert.checked_mul(index as u64);
                let start = skip.and_then(|s| start.checked_add(s)).ok_or_else(unsupported)?;
                (vec![info.dims[1] as usize, info.dims[0] as usize], per_expert, start)
            }
        };
        Ok((
            StoredTensor {
                dtype: info.ggml_type.to_string(),
                shape,
                byte_len,
            },
            start,
        ))
    }

    /// Reads a tensor by its Hugging Face name, as f32 in PyTorch dimension order.
    pub fn read_tensor(&self, hf_name: &str) -> Result<HostTensor, GgufError> {
        let src = self
            .sources
            .get(hf_name)
            .ok_or_else(|| GgufError::MissingTensor(hf_name.to_string()))?;
        match src.transform {
            Transform::Plain => self.file.read_tensor(&src.gguf_name),
            Transform::Unpermute { n_head } => {
                let t = self.file.read_tensor(&src.gguf_name)?;
                let rows = t.shape.first().copied().unwrap_or(1);
                let data = unpermute_rows(&t.data, rows, n_head);
                Ok(HostTensor::new(t.shape, data))
            }
            Transform::Expert { index, count } => {
                let info = self
                    .file
                    .tensor_info(&src.gguf_name)
                    .ok_or_else(|| GgufError::MissingTensor(src.gguf_name.clone()))?;
                let bytes = self.file.tensor_bytes(&src.gguf_name)?;
                // Each expert is a contiguous run of whole rows, and rows are whole blocks
                // (checked at open), so an expert's bytes are an exact 1/count of the tensor.
                let per_expert = bytes.len() / count;
                let slice = &bytes[index * per_expert..(index + 1) * per_expert];
                let n = (info.dims[0] * info.dims[1]) as usize;
                let data = dequantize_named(&src.gguf_name, info.ggml_type, slice, n)?;
                Ok(HostTensor::new(
                    vec![info.dims[1] as usize, info.dims[0] as usize],
                    data,
                ))
            }
        }
    }

    /// A transformers-4.x `config.json` rebuilt from the metadata.
    pub fn hf_config(&self) -> Result<Value, GgufError> {
        let f = &self.file;
        let key = |k: &str| format!("{}.{k}", self.arch);
        let hidden = f.get_u32(&key("embedding_length"))?;
        let expert_count = f.opt_u32(&key("expert_count"))?.unwrap_or(0);
        let head_dim = match f.opt_u32(&key("rope.dimension_count"))? {
            Some(d) => d,
            None => hidden / self.n_head as u32,
        };
        let vocab_size = match f.opt_u32(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => match f.opt_str_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => match f.tensor_info("token_embd.weight") {
                    Some(t) => t.dims.get(1).copied().unwrap_or(0) as usize,
                    None => {
                        return Err(GgufError::MissingKey { key: key("vocab_size") });
                    }
                },
            },
        };
        let rope_theta = f.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let has = |suffix: &str| self.file.tensors().iter().any(|t| t.name.ends_with(suffix));

        let mut cfg = json!({
            "architectures": [if expert_count > 0 { "MixtralForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if expert_count > 0 { "mixtral" } else { "llama" },
            "hidden_size": hidden,
            "intermediate_size": f.get_u32(&key("feed_forward_length"))?,
            "num_hidden_layers": f.get_u32(&key("block_count"))?,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": head_dim,
            "rms_norm_eps": f32_json(f.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
            "rope_theta": f32_json(rope_theta),
            "max_position_embeddings": f.get_u32(&key("context_length"))?,
            "vocab_size": vocab_size,
            "tie_word_embeddings": f.tensor_info("output.weight").is_none(),
            "hidden_act": "silu",
            "attention_bias": has(".attn_q.bias"),
            "mlp_bias": has(".ffn_up.bias"),
            "rope_scaling": self.rope_scaling(head_dim as usize, rope_theta)?,
        });
        if let Some(obj) = cfg.as_object_mut() {
            if expert_count > 0 {
                obj.insert("num_local_experts".into(), json!(expert_count));
                obj.insert(
                    "num_experts_per_tok".into(),
                    json!(f.get_u32(&key("expert_used_count"))?),
                );
            }
            for (hf, gguf) in [
                ("bos_token_id", "tokenizer.ggml.bos_token_id"),
                ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ] {
                if let Some(id) = f.opt_u32(gguf)? {
                    obj.insert(hf.into(), json!(id));
                }
            }
        }
        Ok(cfg)
    }

    fn rope_scaling(&self, head_dim: usize, theta: f32) -> Result<Value, GgufError> {
        let f = &self.file;
        let key = |k: &str| format!("{}.rope.scaling.{k}", self.arch);
        let factor = || -> Result<f32, GgufError> {
            // Older files store the linear factor under `rope.scale_linear`.
            match f.opt_f32(&key("factor"))? {
                Some(x) => Ok(x),
                None => f.get_f32(&format!("{}.rope.scale_linear", self.arch)),
            }
        };
        let orig_ctx = || f.opt_u32(&key("original_context_length"));
        let kind = match f.opt_str(&key("type"))? {
            Some(t) => Some(t.to_string()),
            None if f.metadata(&format!("{}.rope.scale_linear", self.arch)).is_some() => Some("linear".into()),
            None => None,
        };
        match kind.as_deref() {
            None | Some("none") => {}
            Some("linear") => {
                return Ok(json!({"type": "linear", "rope_type": "linear", "factor": f32_json(factor()?)}));
            }
            Some("llama3") => {
                // Not written by llama.cpp's converter; accepted for hand-made files.
                let low = f.opt_f32(&key("low_freq_factor"))?.unwrap_or(1.0);
                let high = f.opt_f32(&key("high_freq_factor"))?.unwrap_or(4.0);
                return Ok(llama3_json(factor()?, low, high, orig_ctx()?.unwrap_or(8192)));
            }
            Some("yarn") => {
                let mut v = json!({"type": "yarn", "rope_type": "yarn", "factor": f32_json(factor()?)});
                if let (Some(ctx), Some(obj)) = (orig_ctx()?, v.as_object_mut()) {
                    obj.insert("original_max_position_embeddings".into(), json!(ctx));
                }
                return Ok(v);
            }
            Some(other) => {
                return Err(GgufError::BadValue {
                    key: key("type"),
                    reason: format!("unsupported rope scaling `{other}`"),
                });
            }
        }
        // Llama 3.1+ files carry their scaling only as precomputed frequency factors.
        if self.file.tensor_info("rope_freqs.weight").is_some() {
            let factors = self.file.read_tensor("rope_freqs.weight")?.data;
            return llama3_from_factors(&factors, head_dim, theta)
                .map(|(factor, low, high, ctx)| llama3_json(factor, low, high, ctx));
        }
        Ok(Value::Null)
    }
}

impl WeightSource for GgufModel {
    fn names(&self) -> BTreeSet<String> {
        self.sources.keys().cloned().collect()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        match self.read_tensor(name) {
            Err(GgufError::MissingTensor(_)) => Err(WeightError::Missing { name: name.to_string() }),
            other => Ok(other?),
        }
    }

    /// As stored: q/k rows in llama.cpp's permuted order, experts as their slice of the
    /// stacked tensor.
    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        match self.stored_extent(name) {
            Ok((stored, _)) => Ok(stored),
            Err(GgufError::MissingTensor(_)) => Err(WeightError::Missing { name: name.to_string() }),
            Err(e) => Err(e.into()),
        }
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let (stored, start) = match self.stored_extent(name) {
            Ok(extent) => extent,
            Err(GgufError::MissingTensor(_)) => return Err(WeightError::Missing { name: name.to_string() }),
            Err(e) => return Err(e.into()),
        };
        let range = tensor_range(name, offset, buf.len(), stored.byte_len)?;
        let at = start
            .checked_add(range.start as u64)
            .ok_or_else(|| WeightError::OutOfRange {
                name: name.to_string(),
                offset,
                len: buf.len() as u64,
                byte_len: stored.byte_len,
            })?;
        self.file.read_at(at, buf)
    }

    fn read_quant(&self, name: &str) -> Result<Option<QuantMatrix>, WeightError> {
        let Some(src) = self.sources.get(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&src.gguf_name) else {
            return Ok(None);
        };
        let Some(kind) = QuantKind::from_ggml(info.ggml_type) else {
            return Ok(None);
        };
        if info.dims.len() != 2 {
            return Ok(None);
        }
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        let order: Vec<usize> = match src.transform {
            Transform::Plain => (0..rows).collect(),
            // Stored row `h*hd + 2*i + t` is original row `h*hd + t*hd/2 + i`.
            Transform::Unpermute { n_head } => {
                let hd = rows / n_head.max(1);
                let half = hd / 2;
                (0..rows)
                    .map(|orig| {
                        let (h, rest) = (orig / hd, orig % hd);
                        let (t, i) = (rest / half, rest % half);
                        h * hd + 2 * i + t
                    })
                    .collect()
            }
            Transform::Expert { .. } => return Ok(None),
        };
        let bytes = self.file.tensor_bytes(&src.gguf_name)?;
        let matrix = QuantMatrix::new(name, kind, rows, cols, bytes.to_vec())?;
        Ok(Some(match src.transform {
            Transform::Plain => matrix,
            _ => matrix.permute_rows(&order),
        }))
    }
}

/// f32 metadata as the decimal a human wrote (1e-5, not 9.999999747378752e-6).
fn f32_json(x: f32) -> Value {
    x.to_string().parse::<f64>().map_or(Value::Null, |v| json!(v))
}

fn llama3_json(factor: f32, low: f32, high: f32, original_ctx: u32) -> Value {
    json!({
        "rope_type": "llama3",
        "factor": f32_json(factor),
        "low_freq_factor": f32_json(low),
        "high_freq_factor": f32_json(high),
        "original_max_position_embeddings": original_ctx,
    })
}

/// llama.cpp's converter's Llama-3 frequency factors (`generate_extra_tensors`).
fn llama3_factors(head_dim: usize, theta: f32, factor: f32, low: f32, high: f32, original_ctx: u32) -> Vec<f32> {
    let ctx = original_ctx as f32;
    let (low_wavelen, high_wavelen) = (ctx / low, ctx / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Recovers Llama-3 scaling parameters from stored factors. Only the scaling factor is visible
/// directly (the largest factor); the other three are taken as Meta's published values for
/// every Llama 3.1/3.2/3.3 release, and the whole guess is verified by regenerating the factors.
fn llama3_from_factors(factors: &[f32], head_dim: usize, theta: f32) -> Result<(f32, f32, f32, u32), GgufError> {
    if factors.len() != head_dim / 2 {
        return Err(GgufError::UnsupportedRopeFreqs(format!(
            "{} factors for head_dim {head_dim}",
            factors.len()
        )));
    }
    let factor = factors.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (low, high, ctx) = (1.0, 4.0, 8192);
    let expected = llama3_factors(head_dim, theta, factor, low, high, ctx);
    let matches = expected
        .iter()
        .zip(factors)
        .all(|(e, a)| (e - a).abs() <= 1e-3 * e.abs().max(1.0));
    if matches {
        Ok((factor, low, high, ctx))
    } else {
        Err(GgufError::UnsupportedRopeFreqs(format!(
            "factors are not Llama-3 scaling with factor {factor}, low 1, high 4, original context 8192"
        )))
    }
}

/// Inverse of llama.cpp's `permute`, which stored each head's rows as interleaved pairs
/// (`reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`): stored row `h*hd + 2*i + t` is original
/// row `h*hd + t*hd/2 + i`.
pub(crate) fn unpermute_rows(data: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let cols = data.len() / rows.max(1);
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    // No rows per head, nothing to move (`GgufModel::new` refuses empty tensors, whose heads
    // and rows were unbounded; this stays cheap whatever the caller passes).
    if half == 0 || cols == 0 {
        return data.to_vec();
    }
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for i in 0..half {
                let src = (h * head_dim + 2 * i + t) * cols;
                let dst = (h * head_dim + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Q,
    K,
    Experts,
}

struct Mapped {
    hf_names: Vec<String>,
    kind: Kind,
}

/// For `Kind::Experts`, `hf_names[0]` is a pattern with `{E}` for the expert index.
fn expert_names(pattern: &str, count: usize) -> Vec<String> {
    (0..count).map(|e| pattern.replace("{E}", &e.to_string())).collect()
}

fn map_name(name: &str, block_count: usize, expert_count: usize) -> Option<Mapped> {
    let plain = |hf: &str| {
        Some(Mapped {
            hf_names: vec![hf.to_string()],
            kind: Kind::Plain,
        })
    };
    match name {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= block_count || !is_canonical(layer, name) {
        return None;
    }
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let p = format!("model.layers.{layer}");
    // Older Mixtral files store experts as separate `ffn_gate.E.weight` tensors.
    if let Some((ffn, e_str)) = base.split_once('.') {
        let e: usize = e_str.parse().ok()?;
        if e >= expert_count || e.to_string() != e_str {
            return None;
        }
        let w = match ffn {
            "ffn_gate" => "w1",
            "ffn_down" => "w2",
            "ffn_up" => "w3",
            _ => return None,
        };
        return plain(&format!("{p}.block_sparse_moe.experts.{e}.{w}.{suffix}"));
    }
    let (hf, kind) = match base {
        "attn_norm" => ("input_layernorm", Kind::Plain),
        "ffn_norm" => ("post_attention_layernorm", Kind::Plain),
        "attn_q" => ("self_attn.q_proj", Kind::Q),
        "attn_k" => ("self_attn.k_proj", Kind::K),
        "attn_v" => ("self_attn.v_proj", Kind::Plain),
        "attn_output" => ("self_attn.o_proj", Kind::Plain),
        "ffn_gate" if expert_count == 0 => ("mlp.gate_proj", Kind::Plain),
        "ffn_up" if expert_count == 0 => ("mlp.up_proj", Kind::Plain),
        "ffn_down" if expert_count == 0 => ("mlp.down_proj", Kind::Plain),
        "ffn_gate_inp" if expert_count > 0 => ("block_sparse_moe.gate", Kind::Plain),
        "ffn_gate_exps" if expert_count > 0 => ("block_sparse_moe.experts.{E}.w1", Kind::Experts),
        "ffn_down_exps" if expert_count > 0 => ("block_sparse_moe.experts.{E}.w2", Kind::Experts),
        "ffn_up_exps" if expert_count > 0 => ("block_sparse_moe.experts.{E}.w3", Kind::Experts),
        _ => return None,
    };
    Some(Mapped {
        hf_names: vec![format!("{p}.{hf}.{suffix}")],
        kind,
    })
}

/// Rejects non-canonical layer numbers such as `blk.01`, which would alias `blk.1`.
fn is_canonical(layer: usize, name: &str) -> bool {
    name.starts_with(&format!("blk.{layer}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // Two heads of head_dim 4, one column: original rows are 0..8.
        // llama.cpp's permute stores, per head, rows [0, 2, 1, 3] (pairs (i, i + hd/2)).
        let stored = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(
            unpermute_rows(&stored, 8, 2),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        );
    }

    #[test]
    fn unpermute_moves_whole_rows() {
        // One head, head_dim 4, two columns: row r = [10r, 10r + 1].
        let permute = |rows: &[usize]| {
            rows.iter()
                .flat_map(|&r| [10.0 * r as f32, 10.0 * r as f32 + 1.0])
                .collect::<Vec<_>>()
        };
        let stored = permute(&[0, 2, 1, 3]);
        assert_eq!(unpermute_rows(&stored, 4, 1), permute(&[0, 1, 2, 3]));
        // head_dim 6: stored order is 0,3,1,4,2,5.
        let stored = permute(&[0, 3, 1, 4, 2, 5]);
        assert_eq!(unpermute_rows(&stored, 6, 1), permute(&[0, 1, 2, 3, 4, 5]));
    }

    #[test]
    fn maps_llama_cpp_names() {
        let name = |n: &str, e: usize| map_name(n, 2, e).map(|m| (m.hf_names[0].clone(), m.kind));
        assert_eq!(
            name("blk.1.attn_q.weight", 0),
            Some(("model.layers.1.self_attn.q_proj.weight".into(), Kind::Q))
        );
        assert_eq!(
            name("blk.0.attn_k.bias", 0),
            Some(("model.layers.0.self_attn.k_proj.bias".into(), Kind::K))
        );
        assert_eq!(
            name("blk.0.ffn_down.weight", 0),
            Some(("model.layers.0.mlp.down_proj.weight".into(), Kind::Plain))
        );
        assert_eq!(
            name("blk.0.ffn_gate_inp.weight", 8),
            Some(("model.layers.0.block_sparse_moe.gate.weight".into(), Kind::Plain))
        );
        assert_eq!(
            name("blk.1.ffn_up.3.weight", 8),
            Some((
                "model.layers.1.block_sparse_moe.experts.3.w3.weight".into(),
                Kind::Plain
            ))
        );
        assert_eq!(
            map_name("blk.0.ffn_down_exps.weight", 2, 4).map(|m| expert_names(&m.hf_names[0], 2)),
            Some(vec![
                "model.layers.0.block_sparse_moe.experts.0.w2.weight".to_string(),
                "model.layers.0.block_sparse_moe.experts.1.w2.weight".to_string(),
            ])
        );
        // Out-of-range layer, non-canonical layer, unknown tensor, dense name in an MoE file.
        assert!(name("blk.2.attn_q.weight", 0).is_none());
        assert!(name("blk.01.attn_q.weight", 0).is_none());
        assert!(name("blk.0.attn_rot_embd", 0).is_none());
        assert!(name("blk.0.ffn_gate.weight", 8).is_none());
        assert!(name("blk.0.ffn_up.9.weight", 8).is_none());
    }

    #[test]
    fn recovers_llama31_rope_scaling() {
        let factors = llama3_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192);
        let got = llama3_from_factors(&factors, 128, 500000.0).ok();
        assert_eq!(got, Some((8.0, 1.0, 4.0, 8192)));
        let mut odd = factors;
        odd[40] *= 1.5;
        assert!(llama3_from_factors(&odd, 128, 500000.0).is_err());
    }
}

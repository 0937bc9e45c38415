//! Random checkpoints of well-known model shapes, for benchmarks that need no download.
//!
//! [`RandomWeights`] is a [`WeightSource`] like a safetensors folder, so a benchmark loads its
//! spans through the same checkpoint code and runs the same block as a real model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use serde_json::json;

use crate::checkpoint::{self, LM_HEAD};
use crate::config::{ConfigError, Family, MlpKind, ModelConfig, NormKind, QkvLayout};
use crate::quant::{QuantKind, QuantMatrix};
use crate::weights::{HostTensor, StoredTensor, WeightError, WeightSource, tensor_range};

/// Model shapes the benchmark knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A 4-block Llama-style model small enough for CI on two cores.
    Tiny,
    /// Llama-3-8B.
    Llama8b,
    /// Llama-3-70B (its blocks are shaped as Llama-2-70B's; the context is 8192).
    Llama70b,
    /// BLOOM-176B.
    Bloom176b,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Llama8b => "llama-8b",
            Self::Llama70b => "llama-70b",
            Self::Bloom176b => "bloom-176b",
        }
    }

    /// The HF `config.json` of the shape.
    pub fn hf_config(self) -> serde_json::Value {
        let llama = |hidden: usize, heads: usize, kv: usize, inter: usize, layers: usize, vocab: usize| {
            json!({
                "model_type": "llama",
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "vocab_size": vocab,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "hidden_act": "silu",
                "tie_word_embeddings": false,
                "bos_token_id": 1,
                "eos_token_id": 2,
            })
        };
        match self {
            Self::Tiny => llama(256, 8, 2, 688, 4, 1024),
            Self::Llama8b => llama(4096, 32, 8, 14336, 32, 128256),
            Self::Llama70b => llama(8192, 64, 8, 28672, 80, 128256),
            Self::Bloom176b => json!({
                "model_type": "bloom",
                "hidden_size": 14336,
                "n_head": 112,
                "n_layer": 70,
                "vocab_size": 250880,
                "layer_norm_epsilon": 1e-5,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }),
        }
    }

    pub fn config(self) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_value(self.hf_config())
    }
}

/// Shapes of every tensor a checkpoint of `config` holds, by HF name.
///
/// Covers the dense layouts (Llama-style separate q/k/v, BLOOM/Falcon fused q/k/v, gated and
/// plain MLPs); MoE shapes are not benchmarked.
pub fn tensor_shapes(config: &ModelConfig) -> Result<BTreeMap<String, Vec<usize>>, WeightError> {
    let d = config.hidden_size;
    let a = config.attention;
    let (q_out, kv_out) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let mut shapes = BTreeMap::new();
    let layer_norm = matches!(config.norm, NormKind::Layer { .. });
    let norm = |shapes: &mut BTreeMap<String, Vec<usize>>, prefix: &str| {
        shapes.insert(format!("{prefix}weight"), vec![d]);
        if layer_norm {
            shapes.insert(format!("{prefix}bias"), vec![d]);
        }
    };
    let linear = |shapes: &mut BTreeMap<String, Vec<usize>>, name: &str, out: usize, inp: usize, bias: bool| {
        shapes.insert(format!("{name}.weight"), vec![out, inp]);
        if bias {
            shapes.insert(format!("{name}.bias"), vec![out]);
        }
    };
    shapes.insert(checkpoint::embedding_name(config.family), vec![config.vocab_size, d]);
    if config.embedding_norm {
        norm(&mut shapes, &checkpoint::embedding_norm_prefix(config.family));
    }
    norm(&mut shapes, &checkpoint::final_norm_prefix(config.family));
    if !config.tie_word_embeddings {
        shapes.insert(LM_HEAD.into(), vec![config.vocab_size, d]);
    }
    if config.family == Family::Falcon {
        return Err(WeightError::Missing {
            name: "random Falcon checkpoints (not a benchmark shape)".into(),
        });
    }
    for i in 0..config.num_layers {
        let p = checkpoint::block_prefix(config.family, i);
        norm(&mut shapes, &format!("{p}input_layernorm."));
        norm(&mut shapes, &format!("{p}post_attention_layernorm."));
        match a.layout {
            QkvLayout::Separate => {
                let attn = format!("{p}self_attn.");
                linear(&mut shapes, &format!("{attn}q_proj"), q_out, d, a.qkv_bias);
                linear(&mut shapes, &format!("{attn}k_proj"), kv_out, d, a.qkv_bias);
                linear(&mut shapes, &format!("{attn}v_proj"), kv_out, d, a.qkv_bias);
                linear(&mut shapes, &format!("{attn}o_proj"), d, q_out, a.out_bias);
            }
            _ => {
                let attn = format!("{p}self_attention.");
                linear(
                    &mut shapes,
                    &format!("{attn}query_key_value"),
                    config.qkv_width(),
                    d,
                    a.qkv_bias,
                );
                linear(&mut shapes, &format!("{attn}dense"), d, q_out, a.out_bias);
            }
        }
        let m = format!("{p}mlp.");
        match config.mlp {
            MlpKind::Gated { intermediate, bias, .. } => {
                linear(&mut shapes, &format!("{m}gate_proj"), intermediate, d, bias);
                linear(&mut shapes, &format!("{m}up_proj"), intermediate, d, bias);
                linear(&mut shapes, &format!("{m}down_proj"), d, intermediate, bias);
            }
            MlpKind::Plain { intermediate, bias, .. } => {
                linear(&mut shapes, &format!("{m}dense_h_to_4h"), intermediate, d, bias);
                linear(&mut shapes, &format!("{m}dense_4h_to_h"), d, intermediate, bias);
            }
            MlpKind::Moe { .. } => {
                return Err(WeightError::Missing {
                    name: "random MoE checkpoints (not a benchmark shape)".into(),
                });
            }
        }
    }
    Ok(shapes)
}

/// A checkpoint of seeded uniform random values: projections at the scale of a trained
/// model's (std 0.02), norm weights near 1, biases near 0.
///
/// Every block gets the same values: generating a 70B-shaped block's ~0.9 G values once is
/// already the bulk of a benchmark's start-up.
pub struct RandomWeights {
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
    generated: Mutex<HashMap<String, Arc<HostTensor>>>,
}

impl std::fmt::Debug for RandomWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RandomWeights")
            .field("tensors", &self.shapes.len())
            .field("seed", &self.seed)
            .finish()
    }
}

impl RandomWeights {
    pub fn new(config: &ModelConfig, seed: u64) -> Result<Self, WeightError> {
        Ok(Self {
            shapes: tensor_shapes(config)?,
            seed,
            generated: Mutex::new(HashMap::new()),
        })
    }

    /// `name` with its block index dropped: blocks share values.
    fn key(name: &str) -> String {
        name.split('.')
            .filter(|part| part.parse::<usize>().is_err())
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl WeightSource for RandomWeights {
    fn names(&self) -> BTreeSet<String> {
        self.shapes.keys().cloned().collect()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string() })?;
        let key = Self::key(name);
        if let Some(t) = self.generated.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(HostTensor::clone(t));
        }
        let numel: usize = shape.iter().product();
        let (center, half_width) = if shape.len() == 2 {
            // Uniform with std 0.02.
            (0.0, 0.02 * 3f32.sqrt())
        } else if name.ends_with(".bias") {
            (0.0, 0.02)
        } else {
            (1.0, 0.1)
        };
        let seed = self.seed ^ fnv1a(&key);
        let data = uniform(numel, seed, center, half_width);
        let tensor = Arc::new(HostTensor::new(shape.clone(), data));
        self.generated
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, tensor.clone());
        Ok(HostTensor::clone(&tensor))
    }

    /// Stored as f32, as a file holding these values would be.
    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string() })?;
        let numel: usize = shape.iter().product();
        Ok(StoredTensor {
            dtype: "F32".into(),
            shape: shape.clone(),
            byte_len: numel as u64 * 4,
        })
    }

    /// There is no file: the values are generated (once per block-less name, as `read`).
    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let byte_len = self.stored(name)?.byte_len;
        let range = tensor_range(name, offset, buf.len(), byte_len)?;
        let tensor = self.read(name)?;
        // Whole values from the one holding the first byte up to the one holding the last.
        let bytes: Vec<u8> = tensor.data[range.start / 4..range.end.div_ceil(4)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let skip = range.start % 4;
        buf.copy_from_slice(&bytes[skip..skip + buf.len()]);
        Ok(())
    }
}

fn poisoned() -> WeightError {
    WeightError::Missing {
        name: "random weights (a generating thread panicked)".into(),
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `n` values uniform in `center ± half_width`, in parallel chunks seeded by their index so the
/// result does not depend on the thread count.
fn uniform(n: usize, seed: u64, center: f32, half_width: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut state = splitmix(seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for v in out {
            state = splitmix(state);
            // 24 random bits to [-1, 1).
            let unit = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            *v = center + half_width * unit;
        }
    });
    data
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Quantizes another source's projections on load (`--quant int8|q4`): every 2-D weight read
/// as a projection comes back as [`QuantMatrix`] blocks; embeddings and norms stay as they are.
pub struct QuantizeOnLoad {
    inner: Arc<dyn WeightSource>,
    kind: QuantKind,
}

impl std::fmt::Debug for QuantizeOnLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizeOnLoad").field("kind", &self.kind).finish()
    }
}

impl QuantizeOnLoad {
    pub fn new(inner: Arc<dyn WeightSource>, kind: QuantKind) -> Self {
        Self { inner, kind }
    }
}

impl WeightSource for QuantizeOnLoad {
    fn names(&self) -> BTreeSet<String> {
        self.inner.names()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        self.inner.read(name)
    }

    /// The inner source's: quantizing on load changes what is served, not the checkpoint (so
    /// not its fingerprint either).
    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        self.inner.stored(name)
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        self.inner.read_stored(name, offset, buf)
    }

    fn prefetch_stored(&self, ranges: &[crate::weights::StoredRange]) -> Result<(), WeightError> {
        self.inner.prefetch_stored(ranges)
    }

    fn fetch_tensors(&self, names: &[String]) -> Result<(), WeightError> {
        self.inner.fetch_tensors(names)
    }

    fn read_quant(&self, name: &str) -> Result<Option<QuantMatrix>, WeightError> {
        if let Some(q) = self.inner.read_quant(name)? {
            return Ok(Some(q));
        }
        let dense = self.inner.read(name)?;
        if dense.shape.len() != 2 || dense.shape[1] % 32 != 0 {
            return Ok(None);
        }
        QuantMatrix::quantize(name, self.kind, &dense).map(Some)
    }
}

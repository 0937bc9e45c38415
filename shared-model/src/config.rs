//! Model configuration: Hugging Face `config.json` in, a validated [`ModelConfig`] out.
//!
//! The HF file is deserialized into [`HfConfig`], a bag of optional keys covering every family
//! we serve (and both the transformers 4.x `rope_theta`/`rope_scaling` keys and the 5.x
//! `rope_parameters` form), then validated into our own types. Anything we would have to guess
//! at is an error that names the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Errors in a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported architecture `{0}` (supported: llama, mistral, mixtral, qwen2, bloom, falcon)")]
    UnknownArchitecture(String),
    #[error("config names no architecture (neither `model_type` nor `architectures`)")]
    NoArchitecture,
    #[error("config key `{0}` is missing")]
    Missing(&'static str),
    #[error("config key `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("unsupported option `{key}` = {value}")]
    Unsupported { key: &'static str, value: String },
}

/// The model families Corolla serves. They differ only in configuration, never in code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Mixtral,
    Qwen2,
    Bloom,
    Falcon,
}

impl Family {
    fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "mixtral" => Self::Mixtral,
            "qwen2" => Self::Qwen2,
            "bloom" => Self::Bloom,
            "falcon" | "RefinedWeb" | "RefinedWebModel" => Self::Falcon,
            _ => return None,
        })
    }

    fn from_architecture(arch: &str) -> Option<Self> {
        Some(match arch {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "MixtralForCausalLM" => Self::Mixtral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "BloomForCausalLM" => Self::Bloom,
            "FalconForCausalLM" | "RWForCausalLM" => Self::Falcon,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Mixtral => "mixtral",
            Self::Qwen2 => "qwen2",
            Self::Bloom => "bloom",
            Self::Falcon => "falcon",
        }
    }
}

/// Normalisation layer kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Rms { eps: f64 },
    Layer { eps: f64 },
}

/// Activation function of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation (BLOOM, `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, ConfigError> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            other => {
                return Err(ConfigError::Unsupported {
                    key: "hidden_act",
                    value: other.to_string(),
                });
            }
        })
    }
}

/// Rotary embedding frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding (rotate-half layout, as in HF's `rotate_half`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions per head (= head_dim for every family we serve).
    pub dim: usize,
    pub scaling: RopeScaling,
}

/// How positions enter attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PositionKind {
    Rope(RopeConfig),
    /// BLOOM's linear biases on attention scores.
    Alibi,
}

/// How the checkpoint stores the query/key/value projections. Loading converts every layout
/// to one fused `[q heads | k heads | v heads]` projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj` (Llama family).
    Separate,
    /// One `query_key_value` tensor, interleaved per head as `[heads, 3, head_dim]` (BLOOM,
    /// Falcon without multi-query).
    FusedPerHead,
    /// One tensor as `[q heads, k, v]` (Falcon-7B multi-query).
    FusedMultiQuery,
    /// One tensor grouped per KV head as `[kv_heads, q_per_kv + 2, head_dim]` (Falcon
    /// `new_decoder_architecture`).
    FusedGrouped,
}

/// Where the residual stream meets attention and MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// `h = x + attn(norm1(x)); out = h + mlp(norm2(h))`.
    Sequential,
    /// `out = x + attn(norm_a(x)) + mlp(norm_m(x))`; `shared_norm` uses one norm for both
    /// (Falcon-7B/40B's single `input_layernorm`).
    Parallel { shared_norm: bool },
}

/// The feed-forward part of a block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MlpKind {
    /// `down(act(gate(x)) * up(x))`.
    Gated {
        intermediate: usize,
        act: Activation,
        bias: bool,
    },
    /// `down(act(up(x)))`.
    Plain {
        intermediate: usize,
        act: Activation,
        bias: bool,
    },
    /// Top-k routed gated experts (Mixtral).
    Moe {
        experts: usize,
        top_k: usize,
        intermediate: usize,
        act: Activation,
    },
}

/// Attention settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub layout: QkvLayout,
    /// Keys further back than this are not attended to (Mistral).
    pub sliding_window: Option<usize>,
}

/// A validated model configuration: everything the block, embeddings and head need.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub max_position_embeddings: Option<usize>,
    pub norm: NormKind,
    pub position: PositionKind,
    pub attention: AttentionConfig,
    pub layout: BlockLayout,
    pub mlp: MlpKind,
    /// BLOOM normalises the embeddings before block 0.
    pub embedding_norm: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The raw Hugging Face config: the union of the keys of every family we read.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub n_embed: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub n_layer: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub n_head: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub n_head_kv: Option<usize>,
    pub multi_query: Option<bool>,
    pub new_decoder_architecture: Option<bool>,
    pub num_ln_in_parallel_attn: Option<usize>,
    pub parallel_attn: Option<bool>,
    pub alibi: Option<bool>,
    pub bias: Option<bool>,
    pub head_dim: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub ffn_hidden_size: Option<usize>,
    pub hidden_act: Option<String>,
    pub activation: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub layer_norm_epsilon: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub apply_residual_connection_post_layernorm: Option<bool>,
    pub pretraining_tp: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let hf: HfConfig = serde_json::from_str(text)?;
        Self::from_hf(&hf)
    }

    pub fn from_json_value(value: Value) -> Result<Self, ConfigError> {
        let hf: HfConfig = serde_json::from_value(value)?;
        Self::from_hf(&hf)
    }

    /// Validates an HF config into ours.
    pub fn from_hf(hf: &HfConfig) -> Result<Self, ConfigError> {
        let family = family_of(hf)?;
        let vocab_size = positive("vocab_size", hf.vocab_size)?;
        let eos_token_ids = token_ids("eos_token_id", hf.eos_token_id.as_ref())?;
        let bos_token_id = token_ids("bos_token_id", hf.bos_token_id.as_ref())?.first().copied();
        let config = match family {
            Family::Llama | Family::Mistral | Family::Mixtral | Family::Qwen2 => llama_like(hf, family, vocab_size)?,
            Family::Bloom => bloom(hf, vocab_size)?,
            Family::Falcon => falcon(hf, vocab_size)?,
        };
        let config = ModelConfig {
            bos_token_id,
            eos_token_ids,
            ..config
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.attention;
        if !a.num_heads.is_multiple_of(a.num_kv_heads) {
            return Err(ConfigError::Invalid {
                key: "num_key_value_heads",
                reason: format!(
                    "{} query heads are not a multiple of {} KV heads",
                    a.num_heads, a.num_kv_heads
                ),
            });
        }
        if let PositionKind::Rope(rope) = self.position {
            if rope.dim % 2 != 0 || rope.dim > a.head_dim {
                return Err(ConfigError::Invalid {
                    key: "head_dim",
                    reason: format!("rotary dimension {} does not fit head_dim {}", rope.dim, a.head_dim),
                });
            }
            if !(rope.theta.is_finite() && rope.theta > 0.0) {
                return Err(ConfigError::Invalid {
                    key: "rope_theta",
                    reason: format!("{} is not a positive number", rope.theta),
                });
            }
        }
        if let MlpKind::Moe { experts, top_k, .. } = self.mlp
            && (top_k == 0 || top_k > experts)
        {
            return Err(ConfigError::Invalid {
                key: "num_experts_per_tok",
                reason: format!("{top_k} of {experts} experts"),
            });
        }
        if let Some(id) = self
            .eos_token_ids
            .iter()
            .chain(self.bos_token_id.iter())
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(ConfigError::Invalid {
                key: "eos_token_id",
                reason: format!("token {id} is outside the vocabulary of {}", self.vocab_size),
            });
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.attention.head_dim
    }

    /// Width of the fused q/k/v projection output.
    pub fn qkv_width(&self) -> usize {
        (self.attention.num_heads + 2 * self.attention.num_kv_heads) * self.attention.head_dim
    }
}

fn family_of(hf: &HfConfig) -> Result<Family, ConfigError> {
    if let Some(model_type) = &hf.model_type {
        return Family::from_model_type(model_type).ok_or_else(|| ConfigError::UnknownArchitecture(model_type.clone()));
    }
    match hf.architectures.as_deref() {
        Some([arch, ..]) => {
            Family::from_architecture(arch).ok_or_else(|| ConfigError::UnknownArchitecture(arch.clone()))
        }
        _ => Err(ConfigError::NoArchitecture),
    }
}

/// Largest value of any size in a config (vocabulary, hidden size, heads, layers, experts):
/// far above every real model (vocabularies reach ~256k, hidden sizes ~16k), and small enough
/// that products of sizes (`vocab x hidden x 4` bytes, the fused q/k/v width, `4 x hidden`)
/// cannot overflow. Configs come from servers too (a client bundle's `config`).
pub const MAX_SIZE: usize = 1 << 20;

/// A size: present, positive and at most [`MAX_SIZE`].
fn positive(key: &'static str, value: Option<usize>) -> Result<usize, ConfigError> {
    match value {
        None => Err(ConfigError::Missing(key)),
        Some(0) => Err(ConfigError::Invalid {
            key,
            reason: "must be positive".into(),
        }),
        Some(v) if v > MAX_SIZE => Err(ConfigError::Invalid {
            key,
            reason: format!("{v} exceeds the largest supported size, {MAX_SIZE}"),
        }),
        Some(v) => Ok(v),
    }
}

fn eps(key: &'static str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    let v = value.unwrap_or(default);
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{v} is not a positive number"),
        })
    }
}

/// `eos_token_id` may be absent, null, one integer or a list of them.
fn token_ids(key: &'static str, value: Option<&Value>) -> Result<Vec<u32>, ConfigError> {
    let invalid = |v: &Value| ConfigError::Invalid {
        key,
        reason: format!("{v} is not a token id"),
    };
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| invalid(v));
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

fn heads(hf: &HfConfig, hidden: usize) -> Result<(usize, usize, usize), ConfigError> {
    let num_heads = positive("num_attention_heads", hf.num_attention_heads.or(hf.n_head))?;
    let num_kv_heads = positive("num_key_value_heads", Some(hf.num_key_value_heads.unwrap_or(num_heads)))?;
    let head_dim = match hf.head_dim {
        Some(0) | None => {
            if !hidden.is_multiple_of(num_heads) {
                return Err(ConfigError::Invalid {
                    key: "num_attention_heads",
                    reason: format!("hidden size {hidden} is not divisible by {num_heads} heads"),
                });
            }
            hidden / num_heads
        }
        Some(d) => positive("head_dim", Some(d))?,
    };
    Ok((num_heads, num_kv_heads, head_dim))
}

fn llama_like(hf: &HfConfig, family: Family, vocab_size: usize) -> Result<ModelConfig, ConfigError> {
    let hidden = positive("hidden_size", hf.hidden_size)?;
    let (num_heads, num_kv_heads, head_dim) = heads(hf, hidden)?;
    if let Some(tp) = hf.pretraining_tp
        && tp > 1
    {
        // Only changes numerics in HF's slow path; the weights are the same.
        tracing::debug!(pretraining_tp = tp, "ignoring pretraining_tp");
    }
    let act = Activation::parse(hf.hidden_act.as_deref().unwrap_or("silu"))?;
    let intermediate = positive("intermediate_size", hf.intermediate_size)?;
    let mlp = if family == Family::Mixtral {
        MlpKind::Moe {
            experts: positive("num_local_experts", hf.num_local_experts)?,
            top_k: positive("num_experts_per_tok", hf.num_experts_per_tok)?,
            intermediate,
            act,
        }
    } else {
        MlpKind::Gated {
            intermediate,
            act,
            bias: hf.mlp_bias.unwrap_or(false),
        }
    };
    let qkv_bias = match family {
        Family::Qwen2 => true,
        _ => hf.attention_bias.unwrap_or(false),
    };
    let out_bias = match family {
        Family::Qwen2 => false,
        _ => hf.attention_bias.unwrap_or(false),
    };
    let sliding_window = match family {
        Family::Qwen2 if !hf.use_sliding_window.unwrap_or(false) => None,
        Family::Mistral | Family::Mixtral | Family::Qwen2 => hf.sliding_window,
        _ => None,
    };
    let rope_dim = match hf.partial_rotary_factor {
        None => head_dim,
        Some(f) if (f - 1.0).abs() < f64::EPSILON => head_dim,
        Some(f) => {
            return Err(ConfigError::Unsupported {
                key: "partial_rotary_factor",
                value: f.to_string(),
            });
        }
    };
    Ok(ModelConfig {
        family,
        vocab_size,
        hidden_size: hidden,
        num_layers: positive("num_hidden_layers", hf.num_hidden_layers)?,
        max_position_embeddings: hf.max_position_embeddings,
        norm: NormKind::Rms {
            eps: eps("rms_norm_eps", hf.rms_norm_eps, 1e-6)?,
        },
        position: PositionKind::Rope(rope(hf, rope_dim, 10_000.0)?),
        attention: AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            out_bias,
            layout: QkvLayout::Separate,
            sliding_window,
        },
        layout: BlockLayout::Sequential,
        mlp,
        embedding_norm: false,
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    })
}

fn bloom(hf: &HfConfig, vocab_size: usize) -> Result<ModelConfig, ConfigError> {
    let hidden = positive("hidden_size", hf.hidden_size.or(hf.n_embed))?;
    let num_heads = positive("n_head", hf.n_head.or(hf.num_attention_heads))?;
    if hidden % num_heads != 0 {
        return Err(ConfigError::Invalid {
            key: "n_head",
            reason: format!("hidden size {hidden} is not divisible by {num_heads} heads"),
        });
    }
    if hf.apply_residual_connection_post_layernorm == Some(true) {
        return Err(ConfigError::Unsupported {
            key: "apply_residual_connection_post_layernorm",
            value: "true".into(),
        });
    }
    Ok(ModelConfig {
        family: Family::Bloom,
        vocab_size,
        hidden_size: hidden,
        num_layers: positive("n_layer", hf.n_layer.or(hf.num_hidden_layers))?,
        max_position_embeddings: None,
        norm: NormKind::Layer {
            eps: eps("layer_norm_epsilon", hf.layer_norm_epsilon, 1e-5)?,
        },
        position: PositionKind::Alibi,
        attention: AttentionConfig {
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden / num_heads,
            qkv_bias: true,
            out_bias: true,
            layout: QkvLayout::FusedPerHead,
            sliding_window: None,
        },
        layout: BlockLayout::Sequential,
        mlp: MlpKind::Plain {
            intermediate: 4 * hidden,
            act: Activation::GeluTanh,
            bias: true,
        },
        embedding_norm: true,
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(true),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    })
}

fn falcon(hf: &HfConfig, vocab_size: usize) -> Result<ModelConfig, ConfigError> {
    let hidden = positive("hidden_size", hf.hidden_size.or(hf.n_embed))?;
    let num_heads = positive("num_attention_heads", hf.num_attention_heads.or(hf.n_head))?;
    if hidden % num_heads != 0 {
        return Err(ConfigError::Invalid {
            key: "num_attention_heads",
            reason: format!("hidden size {hidden} is not divisible by {num_heads} heads"),
        });
    }
    let head_dim = hidden / num_heads;
    let new_arch = hf.new_decoder_architecture.unwrap_or(false);
    let multi_query = hf.multi_query.unwrap_or(true);
    let (num_kv_heads, layout) = if new_arch {
        let kv = positive("num_kv_heads", hf.num_kv_heads.or(hf.n_head_kv))?;
        (kv, QkvLayout::FusedGrouped)
    } else if multi_query {
        (1, QkvLayout::FusedMultiQuery)
    } else {
        (num_heads, QkvLayout::FusedPerHead)
    };
    if hf.alibi == Some(true) {
        return Err(ConfigError::Unsupported {
            key: "alibi",
            value: "true (Falcon with ALiBi)".into(),
        });
    }
    let parallel = hf.parallel_attn.unwrap_or(true);
    let layout_kind = if new_arch {
        let norms = hf.num_ln_in_parallel_attn.unwrap_or(2);
        match norms {
            1 => BlockLayout::Parallel { shared_norm: true },
            2 => BlockLayout::Parallel { shared_norm: false },
            n => {
                return Err(ConfigError::Unsupported {
                    key: "num_ln_in_parallel_attn",
                    value: n.to_string(),
                });
            }
        }
    } else if parallel {
        BlockLayout::Parallel { shared_norm: true }
    } else {
        BlockLayout::Sequential
    };
    let bias = hf.bias.unwrap_or(false);
    let act = Activation::parse(hf.activation.as_deref().or(hf.hidden_act.as_deref()).unwrap_or("gelu"))?;
    Ok(ModelConfig {
        family: Family::Falcon,
        vocab_size,
        hidden_size: hidden,
        num_layers: positive("num_hidden_layers", hf.num_hidden_layers.or(hf.n_layer))?,
        max_position_embeddings: hf.max_position_embeddings,
        norm: NormKind::Layer {
            eps: eps("layer_norm_epsilon", hf.layer_norm_epsilon, 1e-5)?,
        },
        position: PositionKind::Rope(rope(hf, head_dim, 10_000.0)?),
        attention: AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias: bias,
            out_bias: bias,
            layout,
            sliding_window: None,
        },
        layout: layout_kind,
        mlp: MlpKind::Plain {
            intermediate: match hf.ffn_hidden_size {
                Some(size) => positive("ffn_hidden_size", Some(size))?,
                None => 4 * hidden,
            },
            act,
            bias,
        },
        embedding_norm: false,
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(true),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    })
}

/// Reads rope settings from either form: 5.x `rope_parameters` (which carries `rope_theta`
/// inside) or 4.x top-level `rope_theta` + `rope_scaling`.
fn rope(hf: &HfConfig, dim: usize, default_theta: f64) -> Result<RopeConfig, ConfigError> {
    let params = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p), _) if !p.is_null() => Some(p),
        (_, Some(s)) if !s.is_null() => Some(s),
        _ => None,
    };
    let field = |name: &str| params.and_then(|p| p.get(name)).and_then(Value::as_f64);
    let theta = field("rope_theta").or(hf.rope_theta).unwrap_or(default_theta);
    let rope_type = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |name: &'static str| {
        field(name).ok_or(ConfigError::Invalid {
            key: "rope_scaling",
            reason: format!("rope type `{rope_type}` needs `{name}`"),
        })
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(ConfigError::Unsupported {
                key: "rope_type",
                value: other.to_string(),
            });
        }
    };
    Ok(RopeConfig { theta, dim, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_V5: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
        "intermediate_size":160,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":4,
        "vocab_size":384,"rms_norm_eps":1e-5,"head_dim":16,"eos_token_id":2,"bos_token_id":1,
        "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;

    const LLAMA_V4: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
        "intermediate_size":160,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":4,
        "vocab_size":384,"rms_norm_eps":1e-5,"eos_token_id":[2, 3],"bos_token_id":1,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;

    #[test]
    fn both_rope_forms_give_the_same_rope() {
        let v5 = ModelConfig::from_json_str(LLAMA_V5).unwrap();
        let v4 = ModelConfig::from_json_str(LLAMA_V4).unwrap();
        assert_eq!(v5.position, v4.position);
        let PositionKind::Rope(rope) = v5.position else {
            panic!("llama uses rope")
        };
        assert_eq!(rope.theta, 500000.0);
        assert_eq!(rope.dim, 16);
        assert!(matches!(rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(v4.eos_token_ids, vec![2, 3]);
        assert_eq!(v5.eos_token_ids, vec![2]);
    }

    #[test]
    fn rope_theta_defaults_and_legacy_type_key() {
        let text = LLAMA_V4.replace(
            r#""rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
            r#""rope_scaling":{"type":"linear","factor":2.0}"#,
        );
        let c = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(
            c.position,
            PositionKind::Rope(RopeConfig {
                theta: 10_000.0,
                dim: 16,
                scaling: RopeScaling::Linear { factor: 2.0 }
            })
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_json_str(r#"{"model_type":"gpt_neox","vocab_size":10}"#).unwrap_err();
        assert!(err.to_string().contains("gpt_neox"), "{err}");
        let err = ModelConfig::from_json_str(r#"{"architectures":["T5ForConditionalGeneration"],"vocab_size":10}"#)
            .unwrap_err();
        assert!(err.to_string().contains("T5ForConditionalGeneration"), "{err}");
        assert!(matches!(
            ModelConfig::from_json_str(r#"{"vocab_size":10}"#),
            Err(ConfigError::NoArchitecture)
        ));
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let text = LLAMA_V5.replace("\"llama3\"", "\"yarn\"");
        let err = ModelConfig::from_json_str(&text).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn bad_values_are_errors() {
        let text = LLAMA_V5.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(
            ModelConfig::from_json_str(&text),
            Err(ConfigError::Invalid {
                key: "num_key_value_heads",
                ..
            })
        ));
        let text = LLAMA_V5.replace("\"hidden_size\":64,", "");
        assert!(matches!(
            ModelConfig::from_json_str(&text),
            Err(ConfigError::Missing("hidden_size"))
        ));
        let text = LLAMA_V5.replace("\"eos_token_id\":2", "\"eos_token_id\":9999");
        assert!(matches!(
            ModelConfig::from_json_str(&text),
            Err(ConfigError::Invalid {
                key: "eos_token_id",
                ..
            })
        ));
        let text = LLAMA_V5.replace("\"eos_token_id\":2", "\"eos_token_id\":\"x\"");
        assert!(ModelConfig::from_json_str(&text).is_err());
        assert!(matches!(ModelConfig::from_json_str("{"), Err(ConfigError::Json(_))));
        let text = LLAMA_V5.replace("\"rms_norm_eps\":1e-5", "\"rms_norm_eps\":-1.0");
        assert!(matches!(
            ModelConfig::from_json_str(&text),
            Err(ConfigError::Invalid {
                key: "rms_norm_eps",
                ..
            })
        ));
    }

    #[test]
    fn falcon_layouts() {
        let falcon7b = r#"{"model_type":"RefinedWebModel","hidden_size":4544,"n_head":71,"n_layer":32,
            "multi_query":true,"parallel_attn":true,"vocab_size":65024,"bias":false,"alibi":false}"#;
        let c = ModelConfig::from_json_str(falcon7b).unwrap();
        assert_eq!(c.attention.num_kv_heads, 1);
        assert_eq!(c.attention.layout, QkvLayout::FusedMultiQuery);
        assert_eq!(c.layout, BlockLayout::Parallel { shared_norm: true });
        assert_eq!(
            c.mlp,
            MlpKind::Plain {
                intermediate: 4 * 4544,
                act: Activation::Gelu,
                bias: false
            }
        );
        let falcon40b = r#"{"model_type":"falcon","hidden_size":8192,"num_attention_heads":128,"num_hidden_layers":60,
            "new_decoder_architecture":true,"num_kv_heads":8,"vocab_size":65024}"#;
        let c = ModelConfig::from_json_str(falcon40b).unwrap();
        assert_eq!(c.attention.num_kv_heads, 8);
        assert_eq!(c.attention.layout, QkvLayout::FusedGrouped);
        assert_eq!(c.layout, BlockLayout::Parallel { shared_norm: false });
        let alibi = falcon7b.replace("\"alibi\":false", "\"alibi\":true");
        assert!(matches!(
            ModelConfig::from_json_str(&alibi),
            Err(ConfigError::Unsupported { key: "alibi", .. })
        ));
    }

    #[test]
    fn every_fixture_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for family in ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"] {
            let c = ModelConfig::from_file(&dir.join(family).join("config.json")).unwrap();
            assert_eq!(c.family.name(), family);
            assert_eq!(c.num_layers, 4);
        }
    }

    /// Found by the `config` fuzz target: `hidden_size` near `usize::MAX` overflowed `4 *
    /// hidden` (BLOOM, Falcon) before any check; every size is now bounded where it is read.
    #[test]
    fn hostile_sizes_are_refused_before_any_arithmetic() {
        let huge = u64::MAX.to_string();
        for (text, key) in [
            (
                format!(r#"{{"model_type":"bloom","hidden_size":{huge},"n_head":1,"n_layer":1,"vocab_size":1}}"#),
                "hidden_size",
            ),
            (
                format!(r#"{{"model_type":"falcon","hidden_size":{huge},"n_head":1,"n_layer":1,"vocab_size":1}}"#),
                "hidden_size",
            ),
            (
                format!(
                    r#"{{"model_type":"falcon","hidden_size":8,"n_head":1,"n_layer":1,"vocab_size":1,"ffn_hidden_size":{huge}}}"#
                ),
                "ffn_hidden_size",
            ),
            (
                LLAMA_V5.replace(r#""head_dim":16"#, &format!(r#""head_dim":{huge}"#)),
                "head_dim",
            ),
            (
                LLAMA_V5.replace(
                    r#""num_key_value_heads":2"#,
                    &format!(r#""num_key_value_heads":{huge}"#),
                ),
                "num_key_value_heads",
            ),
            (
                LLAMA_V5.replace(r#""vocab_size":384"#, &format!(r#""vocab_size":{}"#, MAX_SIZE + 1)),
                "vocab_size",
            ),
        ] {
            match ModelConfig::from_json_str(&text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        // The largest sizes accepted keep every derived size in range.
        let max = MAX_SIZE.to_string();
        let text = LLAMA_V5
            .replace(r#""hidden_size":64"#, &format!(r#""hidden_size":{max}"#))
            .replace(r#""vocab_size":384"#, &format!(r#""vocab_size":{max}"#))
            .replace(r#""head_dim":16"#, &format!(r#""head_dim":{max}"#))
            .replace(r#""num_attention_heads":4"#, &format!(r#""num_attention_heads":{max}"#))
            .replace(r#""num_key_value_heads":2"#, &format!(r#""num_key_value_heads":{max}"#));
        let c = ModelConfig::from_json_str(&text).expect("largest sizes");
        let a = c.attention;
        assert!((a.num_heads + 2 * a.num_kv_heads).checked_mul(a.head_dim).is_some());
        assert!((c.vocab_size as u64).checked_mul(c.hidden_size as u64 * 8).is_some());
    }
}

//! Hugging Face tensor names per family, and their conversion to our canonical weights.
//!
//! This is the only place that knows how a family names and lays out its tensors; the block
//! itself never does.

use crate::config::{BlockLayout, Family, MlpKind, ModelConfig, QkvLayout};
use crate::layers::attention::AttentionWeights;
use crate::layers::block::BlockWeights;
use crate::layers::linear::LinearWeights;
use crate::layers::mlp::MlpWeights;
use crate::layers::norm::NormWeights;
use crate::quant::QuantMatrix;
use crate::weights::{HostTensor, TensorReader, WeightData, WeightError};

/// Prefix of block `index`'s tensors.
pub fn block_prefix(family: Family, index: usize) -> String {
    match family {
        Family::Bloom | Family::Falcon => format!("transformer.h.{index}."),
        _ => format!("model.layers.{index}."),
    }
}

fn root(family: Family) -> &'static str {
    match family {
        Family::Bloom | Family::Falcon => "transformer.",
        _ => "model.",
    }
}

/// Name of the token embedding matrix.
pub fn embedding_name(family: Family) -> String {
    match family {
        Family::Bloom | Family::Falcon => "transformer.word_embeddings.weight".into(),
        _ => "model.embed_tokens.weight".into(),
    }
}

/// Prefix of BLOOM's embedding LayerNorm.
pub fn embedding_norm_prefix(family: Family) -> String {
    format!("{}word_embeddings_layernorm.", root(family))
}

/// Prefix of the final norm.
pub fn final_norm_prefix(family: Family) -> String {
    match family {
        Family::Bloom | Family::Falcon => "transformer.ln_f.".into(),
        _ => "model.norm.".into(),
    }
}

pub const LM_HEAD: &str = "lm_head.weight";

/// Reads a norm; LayerNorms have a bias, RMSNorms do not.
pub fn read_norm(
    reader: &mut TensorReader<'_>,
    config: &ModelConfig,
    prefix: &str,
) -> Result<NormWeights, WeightError> {
    let d = config.hidden_size;
    let weight = reader.take(&format!("{prefix}weight"), &[d])?;
    let bias = match config.norm {
        crate::config::NormKind::Layer { .. } => Some(reader.take(&format!("{prefix}bias"), &[d])?),
        crate::config::NormKind::Rms { .. } => None,
    };
    Ok(NormWeights { weight, bias })
}

fn read_linear(
    reader: &mut TensorReader<'_>,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<LinearWeights, WeightError> {
    let weight = reader.take_matrix(&format!("{name}.weight"), [out, inp])?;
    let bias = if bias {
        Some(reader.take(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(LinearWeights { weight, bias })
}

/// Stacks PyTorch `[out, in]` weights (and their biases) along `out`; quantized parts stay
/// quantized when they share a format.
fn concat_rows(parts: Vec<LinearWeights>) -> Result<LinearWeights, WeightError> {
    let has_bias = parts.iter().all(|p| p.bias.is_some());
    let bias: Vec<f32> = parts
        .iter()
        .filter_map(|p| p.bias.as_ref())
        .flat_map(|b| b.data.iter().copied())
        .collect();
    let out: usize = parts.iter().map(|p| p.weight.shape()[0]).sum();
    let quant: Vec<_> = parts
        .iter()
        .filter_map(|p| match &p.weight {
            WeightData::Quant(q) => Some(q),
            WeightData::Dense(_) => None,
        })
        .collect();
    let weight = match (quant.len() == parts.len())
        .then(|| QuantMatrix::concat_rows(&quant))
        .flatten()
    {
        Some(q) => WeightData::Quant(q),
        None => {
            let inp = parts[0].weight.shape()[1];
            let mut data = Vec::with_capacity(out * inp);
            for p in &parts {
                data.extend_from_slice(&p.weight.to_dense()?.data);
            }
            WeightData::Dense(HostTensor::new(vec![out, inp], data))
        }
    };
    Ok(LinearWeights {
        weight,
        bias: has_bias.then(|| HostTensor::new(vec![out], bias)),
    })
}

/// Reorders `head_dim`-row groups of a fused q/k/v projection: output group `i` is source
/// group `order[i]`.
fn reorder_heads(w: &LinearWeights, order: &[usize], head_dim: usize) -> Result<LinearWeights, WeightError> {
    let dense = w.weight.to_dense()?;
    let inp = dense.shape[1];
    let rows = head_dim * inp;
    let mut weight = Vec::with_capacity(dense.data.len());
    let mut bias = Vec::with_capacity(order.len() * head_dim);
    for &src in order {
        weight.extend_from_slice(&dense.data[src * rows..(src + 1) * rows]);
        if let Some(b) = &w.bias {
            bias.extend_from_slice(&b.data[src * head_dim..(src + 1) * head_dim]);
        }
    }
    Ok(LinearWeights {
        weight: WeightData::Dense(HostTensor::new(dense.shape.clone(), weight)),
        bias: w
            .bias
            .as_ref()
            .map(|_| HostTensor::new(vec![order.len() * head_dim], bias)),
    })
}

/// Source head-group order that turns a fused layout into `[q heads | k heads | v heads]`.
fn fused_order(layout: QkvLayout, heads: usize, kv_heads: usize) -> Vec<usize> {
    match layout {
        QkvLayout::Separate | QkvLayout::FusedMultiQuery => (0..heads + 2 * kv_heads).collect(),
        // [heads, 3, head_dim]
        QkvLayout::FusedPerHead => {
            let q = (0..heads).map(|h| 3 * h);
            let k = (0..heads).map(|h| 3 * h + 1);
            let v = (0..heads).map(|h| 3 * h + 2);
            q.chain(k).chain(v).collect()
        }
        // [kv_heads, group + 2, head_dim]
        QkvLayout::FusedGrouped => {
            let group = heads / kv_heads;
            let stride = group + 2;
            let q = (0..kv_heads).flat_map(|g| (0..group).map(move |j| g * stride + j));
            let k = (0..kv_heads).map(|g| g * stride + group);
            let v = (0..kv_heads).map(|g| g * stride + group + 1);
            q.chain(k).chain(v).collect()
        }
    }
}

/// Reads block `index` and converts it to canonical form.
pub fn read_block(
    reader: &mut TensorReader<'_>,
    config: &ModelConfig,
    index: usize,
) -> Result<BlockWeights, WeightError> {
    let p = block_prefix(config.family, index);
    let d = config.hidden_size;
    let a = config.attention;
    let (q_out, kv_out) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let fused = config.qkv_width();

    let (attn_norm, mlp_norm) = match (config.family, config.layout) {
        (Family::Falcon, BlockLayout::Parallel { shared_norm: false }) => (
            read_norm(reader, config, &format!("{p}ln_attn."))?,
            Some(read_norm(reader, config, &format!("{p}ln_mlp."))?),
        ),
        (_, BlockLayout::Parallel { shared_norm: true }) => {
            (read_norm(reader, config, &format!("{p}input_layernorm."))?, None)
        }
        _ => (
            read_norm(reader, config, &format!("{p}input_layernorm."))?,
            Some(read_norm(reader, config, &format!("{p}post_attention_layernorm."))?),
        ),
    };

    let attention = match a.layout {
        QkvLayout::Separate => {
            let attn = format!("{p}self_attn.");
            AttentionWeights {
                qkv: concat_rows(vec![
                    read_linear(reader, &format!("{attn}q_proj"), q_out, d, a.qkv_bias)?,
                    read_linear(reader, &format!("{attn}k_proj"), kv_out, d, a.qkv_bias)?,
                    read_linear(reader, &format!("{attn}v_proj"), kv_out, d, a.qkv_bias)?,
                ])?,
                out: read_linear(reader, &format!("{attn}o_proj"), d, q_out, a.out_bias)?,
            }
        }
        layout => {
            let attn = format!("{p}self_attention.");
            let qkv = read_linear(reader, &format!("{attn}query_key_value"), fused, d, a.qkv_bias)?;
            AttentionWeights {
                qkv: reorder_heads(&qkv, &fused_order(layout, a.num_heads, a.num_kv_heads), a.head_dim)?,
                out: read_linear(reader, &format!("{attn}dense"), d, q_out, a.out_bias)?,
            }
        }
    };

    let mlp = match config.mlp {
        MlpKind::Gated {
            intermediate: i, bias, ..
        } => {
            let m = format!("{p}mlp.");
            MlpWeights::Gated {
                gate_up: concat_rows(vec![
                    read_linear(reader, &format!("{m}gate_proj"), i, d, bias)?,
                    read_linear(reader, &format!("{m}up_proj"), i, d, bias)?,
                ])?,
                down: read_linear(reader, &format!("{m}down_proj"), d, i, bias)?,
            }
        }
        MlpKind::Plain {
            intermediate: i, bias, ..
        } => {
            let m = format!("{p}mlp.");
            MlpWeights::Plain {
                up: read_linear(reader, &format!("{m}dense_h_to_4h"), i, d, bias)?,
                down: read_linear(reader, &format!("{m}dense_4h_to_h"), d, i, bias)?,
            }
        }
        MlpKind::Moe {
            experts,
            intermediate: i,
            ..
        } => {
            let m = format!("{p}block_sparse_moe.");
            let router = read_linear(reader, &format!("{m}gate"), experts, d, false)?;
            let experts = (0..experts)
                .map(|e| {
                    let x = format!("{m}experts.{e}.");
                    Ok((
                        concat_rows(vec![
                            read_linear(reader, &format!("{x}w1"), i, d, false)?,
                            read_linear(reader, &format!("{x}w3"), i, d, false)?,
                        ])?,
                        read_linear(reader, &format!("{x}w2"), d, i, false)?,
                    ))
                })
                .collect::<Result<Vec<_>, WeightError>>()?;
            MlpWeights::Moe { router, experts }
        }
    };

    Ok(BlockWeights {
        attn_norm,
        mlp_norm,
        attention,
        mlp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_order_puts_q_then_k_then_v() {
        // 4 query heads over 2 KV heads: [kv0: q0 q1 k0 v0 | kv1: q2 q3 k1 v1]
        assert_eq!(fused_order(QkvLayout::FusedGrouped, 4, 2), vec![0, 1, 4, 5, 2, 6, 3, 7]);
        // BLOOM: [h0: q k v | h1: q k v]
        assert_eq!(fused_order(QkvLayout::FusedPerHead, 2, 2), vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn reorder_moves_rows_and_bias_together() {
        let w = LinearWeights {
            weight: WeightData::Dense(HostTensor::new(vec![4, 1], vec![0.0, 1.0, 2.0, 3.0])),
            bias: Some(HostTensor::new(vec![4], vec![10.0, 11.0, 12.0, 13.0])),
        };
        let r = reorder_heads(&w, &[1, 0], 2).unwrap();
        assert_eq!(r.weight.to_dense().unwrap().data, vec![2.0, 3.0, 0.0, 1.0]);
        assert_eq!(r.bias.map(|b| b.data), Some(vec![12.0, 13.0, 10.0, 11.0]));
    }
}

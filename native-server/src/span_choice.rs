//! Where a server without `--blocks` should sit: Petals' rule, cover the weakest blocks first.

use shared_model::ModelConfig;
use shared_model::config::{MlpKind, NormKind};
use shared_model::quant::QuantKind;
use swarm::protocol::ServerInfo;

/// Weights of one block, in elements (projections, biases and norms).
pub fn block_params(config: &ModelConfig) -> usize {
    let d = config.hidden_size;
    let a = config.attention;
    let q_out = a.num_heads * a.head_dim;
    let qkv = config.qkv_width();
    let attention = qkv * d + q_out * d + if a.qkv_bias { qkv } else { 0 } + if a.out_bias { d } else { 0 };
    let mlp = match config.mlp {
        MlpKind::Gated {
            intermediate: i, bias, ..
        } => 3 * d * i + if bias { 2 * i + d } else { 0 },
        MlpKind::Plain {
            intermediate: i, bias, ..
        } => 2 * d * i + if bias { i + d } else { 0 },
        MlpKind::Moe {
            experts,
            intermediate: i,
            ..
        } => experts * 3 * d * i + experts * d,
    };
    let norm = match config.norm {
        NormKind::Rms { .. } => d,
        NormKind::Layer { .. } => 2 * d,
    };
    attention + mlp + 2 * norm
}

/// Elements of one block's projection matrices (what `--quant` quantizes).
pub fn projection_params(config: &ModelConfig) -> usize {
    let d = config.hidden_size;
    let a = config.attention;
    let attention = config.qkv_width() * d + a.num_heads * a.head_dim * d;
    let mlp = match config.mlp {
        MlpKind::Gated { intermediate: i, .. } => 3 * d * i,
        MlpKind::Plain { intermediate: i, .. } => 2 * d * i,
        MlpKind::Moe {
            experts,
            intermediate: i,
            ..
        } => experts * 3 * d * i + experts * d,
    };
    attention + mlp
}

/// Bytes of one block's weights on the GPU: projections quantized as `quant` says (the packed
/// words plus the f32 scales, and minimums for Q4_1, as the GPU keeps them), everything else
/// (norms, biases, a MoE router) in `elem_bytes`.
pub fn block_weight_bytes(config: &ModelConfig, elem_bytes: usize, quant: Option<QuantKind>) -> usize {
    let projections = projection_params(config);
    let rest = block_params(config) - projections;
    // Bytes per 32 weights.
    let per_32 = match quant {
        None => 32 * elem_bytes,
        Some(QuantKind::Q8_0) => 32 + 4,
        Some(QuantKind::Q4_0) => 16 + 4,
        Some(QuantKind::Q4_1) => 16 + 8,
    };
    let router = match config.mlp {
        MlpKind::Moe { experts, .. } if quant.is_some() => experts * config.hidden_size,
        _ => 0,
    };
    (projections - router) * per_32 / 32 + (rest + router) * elem_bytes
}

/// How many blocks fit a GPU of `total` bytes: each block needs its weights (quantized as
/// `quant` says) plus the KV cache of `cache_tokens` tokens; `reserve` stays free for
/// activations and kernel workspaces.
///
/// Returns (blocks, reserve in bytes).
pub fn blocks_for_memory(
    config: &ModelConfig,
    elem_bytes: usize,
    quant: Option<QuantKind>,
    cache_tokens: usize,
    total: u64,
) -> (usize, u64) {
    let reserve = (total / 10).max(2 << 30);
    let a = config.attention;
    let per_block =
        block_weight_bytes(config, elem_bytes, quant) + 2 * a.num_kv_heads * a.head_dim * cache_tokens * elem_bytes;
    let fit = total.saturating_sub(reserve) / per_block.max(1) as u64;
    ((fit as usize).clamp(1, config.num_layers), reserve)
}

/// Per-block served throughput (tokens/s summed over the servers hosting each block), each
/// server's claim believed only up to the cap clients use
/// ([`swarm::remote::speed::capped_throughputs`]): one liar cannot make blocks look served.
pub fn block_throughputs(num_layers: usize, servers: &[ServerInfo]) -> Vec<f64> {
    let mut t = vec![0.0; num_layers];
    for (s, throughput) in servers.iter().zip(swarm::remote::speed::capped_throughputs(servers)) {
        for b in (s.start as usize)..(s.end as usize).min(num_layers) {
            t[b] += throughput;
        }
    }
    t
}

/// The start of the `len`-block window whose sorted throughputs are lexicographically
/// smallest: the window that holds the least-served block (ties: the next least, ...).
pub fn choose_start(throughputs: &[f64], len: usize) -> usize {
    let len = len.min(throughputs.len()).max(1);
    (0..=throughputs.len() - len)
        .min_by(|&a, &b| {
            let mut wa = throughputs[a..a + len].to_vec();
            let mut wb = throughputs[b..b + len].to_vec();
            wa.sort_by(f64::total_cmp);
            wb.sort_by(f64::total_cmp);
            wa.iter()
                .zip(&wb)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_memory_with_weights_and_cache() {
        let config = shared_model::synthetic::Shape::Llama70b.config().expect("config");
        // Llama-70B blocks hold 855.6 M parameters (1.71 GB in bf16).
        assert_eq!(block_params(&config), 855_654_400);
        // 80 GB, bf16, 64 Ki cache tokens (256 MiB a block): (80 - 8) GB / 1.98 GB = 36 blocks.
        let (n, reserve) = blocks_for_memory(&config, 2, None, 65536, 80_000_000_000);
        assert_eq!(reserve, 8_000_000_000);
        assert_eq!(n, 36);
        // Never fewer than one block, never more than the model has.
        assert_eq!(blocks_for_memory(&config, 2, None, 65536, 1 << 30).0, 1);
        assert_eq!(blocks_for_memory(&config, 2, None, 1, u64::MAX / 2).0, 80);
    }

    #[test]
    fn quantized_blocks_fill_memory_by_their_packed_size() {
        let config = shared_model::synthetic::Shape::Llama70b.config().expect("config");
        // Llama-70B: 855.6 M parameters, of which 16 Ki are the two RMSNorms.
        assert_eq!(block_params(&config) - projection_params(&config), 2 * 8192);
        let dense = block_weight_bytes(&config, 2, None);
        assert_eq!(dense, 2 * 855_654_400);
        // Q4_0 on the GPU: 16 bytes of nibbles and an f32 scale per 32 weights (0.625 bytes).
        assert_eq!(
            block_weight_bytes(&config, 2, Some(QuantKind::Q4_0)),
            855_638_016 * 20 / 32 + 2 * 8192 * 2
        );
        // A Llama-2-70B (80 blocks) on 2 x 24 GB cards in q4 with 1 Ki cache tokens a block:
        // (24 - 2.4) GB / 539 MB = 40 blocks a card; in bf16, 12.
        assert_eq!(
            blocks_for_memory(&config, 2, Some(QuantKind::Q4_0), 1024, 24_000_000_000).0,
            40
        );
        assert_eq!(blocks_for_memory(&config, 2, None, 1024, 24_000_000_000).0, 12);
    }

    #[test]
    fn picks_the_uncovered_blocks() {
        assert_eq!(choose_start(&[5.0, 5.0, 0.0, 0.0], 2), 2);
        assert_eq!(choose_start(&[0.0, 0.0, 0.0, 0.0], 2), 0);
        assert_eq!(choose_start(&[3.0, 1.0, 2.0, 9.0], 2), 1);
    }
}

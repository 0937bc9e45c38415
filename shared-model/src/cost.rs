//! What a request will cost in memory, from its shape alone, before any of it runs: a server
//! admits a request only if these fit its budgets.
//!
//! Every figure is the peak of scratch (activations, attention scores or their tiles, masks,
//! position tables, LoRA deltas, the transient of a KV buffer being regrown), in bytes,
//! excluding the weights and a session's own KV buffers (those are [`kv_cache_bytes`], which a
//! server budgets apart). The figures are upper bounds with a modest margin: each phase of a
//! block counts every tensor it creates as live at once, whether or not the backend reuses a
//! buffer in place. `tests/memory.rs` checks them against the heap peaks measured on the CPU
//! backend (measured <= estimate <= 3 x measured + a small constant).

use crate::cache::capacity_for;
use crate::config::{BlockLayout, MlpKind, ModelConfig, PositionKind};
use crate::layers::positions::AttentionTiling;
use crate::model::DEFAULT_CHUNK_TOKENS;

/// The shape of one step through a span: what [`step_bytes`] and the functions built on it
/// price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub batch: usize,
    /// Positions this step carries.
    pub new: usize,
    /// Positions already in the session's cache (padding included).
    pub past: usize,
    /// Blocks the step runs through.
    pub blocks: usize,
    /// Bytes of the activations' float type (4 for f32, 2 for f16/bf16).
    pub elem_bytes: usize,
    /// The rank of a LoRA adapter applied to every projection, if any.
    pub lora_rank: Option<usize>,
    /// Positions of deep prompts (0 without).
    pub prefix_len: usize,
    /// Some row is left-padded: the mask is built on the host, per row.
    pub padded: bool,
    /// When attention is tiled (the span's [`crate::model::BlockSpan::attention_tiling`]).
    pub tiling: AttentionTiling,
    /// Positions the session's KV buffers hold room for before the step
    /// ([`crate::cache::LayerCache::capacity`]); `None`: as a cache grown step by step holds
    /// ([`capacity_for`]`(past, None)`). A step that fits pays no regrowth.
    pub cache_capacity: Option<usize>,
}

impl StepShape {
    /// A step without adapter, deep prompts or padding, with the default tiling.
    pub fn new(batch: usize, new: usize, past: usize, blocks: usize, elem_bytes: usize) -> Self {
        Self {
            batch,
            new,
            past,
            blocks,
            elem_bytes,
            lora_rank: None,
            prefix_len: 0,
            padded: false,
            tiling: AttentionTiling::default(),
            cache_capacity: None,
        }
    }
}

fn mul(parts: &[usize]) -> u64 {
    parts.iter().fold(1u64, |acc, &p| acc.saturating_mul(p as u64))
}

/// Bytes of a KV cache holding `positions` positions a row for `blocks` blocks: K and V of
/// every layer, as [`crate::cache::SpanCache::with_max_len`] allocates them at most (and as
/// [`crate::cache::SpanCache::allocated_bytes`] reports them once that many are held).
pub fn kv_cache_bytes(config: &ModelConfig, blocks: usize, batch: usize, positions: usize, elem_bytes: usize) -> u64 {
    let a = config.attention;
    2 * mul(&[blocks, batch, a.num_kv_heads, positions, a.head_dim, elem_bytes])
}

/// Bytes of deep prompts `[blocks, prefix_len, hidden]` held on the device for a session.
pub fn deep_prompt_bytes(config: &ModelConfig, blocks: usize, prefix_len: usize, elem_bytes: usize) -> u64 {
    mul(&[blocks, prefix_len, config.hidden_size, elem_bytes])
}

/// The widths a block's tensors take, from the config.
struct Widths {
    hidden: usize,
    /// `heads x head_dim`
    q: usize,
    /// `kv_heads x head_dim`
    kv: usize,
    heads: usize,
    /// The MLP's hidden width.
    inter: usize,
    gated: bool,
    experts: usize,
    top_k: usize,
    parallel: bool,
    rope_half: usize,
    alibi: bool,
}

impl Widths {
    fn of(config: &ModelConfig) -> Self {
        let a = config.attention;
        let (inter, gated, experts, top_k) = match config.mlp {
            MlpKind::Gated { intermediate, .. } => (intermediate, true, 0, 0),
            MlpKind::Plain { intermediate, .. } => (intermediate, false, 0, 0),
            MlpKind::Moe {
                intermediate,
                experts,
                top_k,
                ..
            } => (intermediate, true, experts, top_k),
        };
        let (rope_half, alibi) = match config.position {
            PositionKind::Rope(r) => (r.dim / 2, false),
            PositionKind::Alibi => (0, true),
        };
        Self {
            hidden: config.hidden_size,
            q: a.num_heads * a.head_dim,
            kv: a.num_kv_heads * a.head_dim,
            heads: a.num_heads,
            inter,
            gated,
            experts,
            top_k,
            parallel: matches!(config.layout, BlockLayout::Parallel { .. }),
            rope_half,
            alibi,
        }
    }
}

/// Peak scratch of one [`crate::model::BlockSpan::forward_blocks_prompted`] call (one chunk),
/// the step's input and output included.
pub fn step_bytes(config: &ModelConfig, shape: &StepShape) -> u64 {
    let w = Widths::of(config);
    let StepShape {
        batch: b,
        new,
        past,
        elem_bytes: e,
        ..
    } = *shape;
    if b == 0 || new == 0 {
        return 0;
    }
    let tokens = b * new;
    let total = past + new;
    let act = |width: usize| mul(&[tokens, width, e]);
    let tile = shape.tiling.tile_for(b, new, total);
    let keys = tile.map_or(total, |t| t.min(total));

    // Held for the whole step: the position tables, the mask or ALiBi (whole when untiled),
    // and the input.
    let rope = 4 * mul(&[tokens, w.rope_half, 4]);
    let alibi = if w.alibi { mul(&[b, w.heads, total, 4 + e]) } else { 0 };
    let mask = |keys: usize| {
        if shape.padded || config.attention.sliding_window.is_some() {
            mul(&[b, new, keys, 4 + e])
        } else {
            mul(&[new, keys, 1 + 2 * e]) + 8 * (new + keys) as u64
        }
    };
    let whole_mask = if tile.is_none() && (new > 1 || shape.padded || config.attention.sliding_window.is_some()) {
        mask(total)
    } else {
        0
    };
    let context = rope + alibi + whole_mask;
    let input = act(w.hidden);
    let deep = if shape.prefix_len > 0 { 2 * act(w.hidden) } else { 0 };
    let lora = |width: usize| shape.lora_rank.map_or(0, |r| act(r) + act(width));

    // The block's input and what is held beside it through the attention half.
    let beside = act(w.hidden) * if w.parallel { 2 } else { 1 };
    let qkv_width = w.q + 2 * w.kv;
    // q, k, v split from the fused projection, then rotated (halves, products, the result).
    let projections = beside + act(w.hidden) + 2 * act(qkv_width) + lora(qkv_width) + 3 * act(w.q);
    // Appending: the new keys made contiguous, and a regrown buffer beside the old one (with
    // a contiguous copy of what it held).
    let old = shape.cache_capacity.unwrap_or_else(|| capacity_for(past, None));
    let regrow = if past > 0 && total > old {
        3 * mul(&[b, w.kv, old, e])
    } else {
        0
    };
    let append = beside + act(w.q) + 2 * act(w.kv) + act(w.kv) + regrow;
    // Scores, scaled, masked and normalised (each a new tensor at worst), or a tile's worth in
    // f32 with the running statistics and accumulator; the keys and values made contiguous
    // for the products (backends that need it).
    let scores = match tile {
        None => 4 * mul(&[b, w.heads, new, keys, e]),
        Some(_) => {
            4 * mul(&[b, w.heads, new, keys, 4])
                + mask(keys)
                + 4 * mul(&[b, w.heads, new, 4 * 3])
                + 2 * mul(&[tokens, w.q, 4])
        }
    };
    let kv_copy = 2 * mul(&[b, w.kv, keys, e]);
    let attention = beside + 2 * act(w.q) + scores + kv_copy;
    let out = beside + 2 * act(w.q) + 2 * act(w.hidden) + lora(w.hidden);
    // The MLP: the residual and its norm, the up projection(s), the activation's temporaries,
    // the product and the down projection.
    let mlp_rows = |rows: usize| {
        let rows_act = |width: usize| mul(&[rows, width, e]);
        if w.gated {
            2 * rows_act(2 * w.inter) + 3 * rows_act(w.inter) + 2 * rows_act(w.hidden)
        } else {
            rows_act(w.inter) + 4 * rows_act(w.inter) + 2 * rows_act(w.hidden)
        }
    };
    let mlp = if w.experts > 0 {
        // Router logits and their softmax, the top k, the output being summed, one expert on
        // (at most) every token, its weighted output.
        3 * act(w.hidden)
            + 3 * mul(&[tokens, w.experts, e])
            + mul(&[tokens, w.top_k, 8 + e + 16])
            + mlp_rows(tokens)
            + 2 * act(w.hidden)
    } else {
        3 * act(w.hidden) + mlp_rows(tokens) + lora(2 * w.inter) + lora(w.hidden)
    };
    // A CPU matmul of more than one row packs a slice of its right-hand side (the weight) per
    // call, at most a few cache-sized panels (one row is a matrix-vector product, which packs
    // nothing, and a projection of a few rows runs a row at a time); the batched attention
    // products may run two at once.
    let pack_above = |rows: usize, k: usize, n: usize| {
        if tokens > rows {
            mul(&[k.min(PACK_DEPTH), n, e]).min(PACK_CAP)
        } else {
            0
        }
    };
    let apart = crate::layers::linear::CPU_ROWS_APART;
    let pack = |k: usize, n: usize| pack_above(1, k, n);
    let widest = [
        pack_above(apart, w.hidden, qkv_width),
        pack_above(apart, w.q, w.hidden),
        pack_above(apart, w.hidden, if w.gated { 2 * w.inter } else { w.inter }),
        pack_above(apart, w.inter, w.hidden),
        2 * pack(config.attention.head_dim, keys),
        2 * pack(keys, config.attention.head_dim),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let block = projections.max(append).max(attention).max(out).max(mlp);
    input + context + deep + block + widest
}

/// The depth of the panels a CPU matmul packs (gemm's `kc` for small products).
const PACK_DEPTH: usize = 512;
/// The most one CPU matmul packs (panels sized to the cache: twice a 4 MiB L2).
const PACK_CAP: u64 = 8 << 20;

/// Peak scratch of [`crate::model::BlockSpan::forward_chunked`] over `shape.new` positions in
/// chunks of `chunk`: the worst chunk (the last, whose keys are all the others'), the whole
/// input and the output being filled.
pub fn chunked_bytes(config: &ModelConfig, shape: &StepShape, chunk: usize) -> u64 {
    let chunk = chunk.max(1);
    if shape.new <= chunk {
        return step_bytes(config, shape);
    }
    let whole = mul(&[shape.batch, shape.new, config.hidden_size, shape.elem_bytes]);
    // Every chunk but the last has `chunk` positions; the cost grows with the keys, so the
    // worst is one of the last two.
    let last_len = shape.new - (shape.new - 1) / chunk * chunk;
    // A cache with room for the whole call never regrows; otherwise each chunk may.
    let cache_capacity = shape.cache_capacity.filter(|&c| c >= shape.past + shape.new);
    let last = StepShape {
        new: last_len,
        past: shape.past + shape.new - last_len,
        cache_capacity,
        ..*shape
    };
    let before_last = StepShape {
        new: chunk,
        past: shape.past + shape.new - last_len - chunk,
        cache_capacity,
        ..*shape
    };
    let worst = step_bytes(config, &last).max(step_bytes(config, &before_last));
    2 * whole + worst
}

/// Peak scratch of a stateless forward ([`crate::model::BlockSpan::forward_full_prompted`] on
/// an inference backend) over `seq` positions: chunks of [`DEFAULT_CHUNK_TOKENS`] through a KV
/// cache of `seq` positions that lives for the call, that cache included.
pub fn stateless_forward_bytes(config: &ModelConfig, shape: &StepShape) -> u64 {
    let seq = shape.past + shape.new;
    let cache = kv_cache_bytes(config, shape.blocks, shape.batch, seq, shape.elem_bytes);
    let fresh = StepShape {
        new: seq,
        past: 0,
        // Allocated whole at the first chunk: nothing regrows.
        cache_capacity: Some(seq),
        ..*shape
    };
    cache + chunked_bytes(config, &fresh, DEFAULT_CHUNK_TOKENS)
}

/// Peak scratch of [`crate::tuning::span_backward`] over `shape.new` positions (`past` is
/// ignored): the autodiff graph keeps every block's activations, attention probabilities
/// (`seq x seq` a head) included, then the backward pass holds gradients of the same sizes.
pub fn backward_bytes(config: &ModelConfig, shape: &StepShape) -> u64 {
    let w = Widths::of(config);
    let StepShape {
        batch: b,
        new: seq,
        elem_bytes: e,
        blocks,
        ..
    } = *shape;
    let tokens = b * seq;
    let act = |width: usize| mul(&[tokens, width, e]);
    // The MLP's saved inputs of each op: the up projection(s), the activation's
    // intermediates, the product; every routed expert's (top k of them a token) for MoE.
    let mlp_saved = if w.experts > 0 {
        mul(&[w.top_k]) * 7 * act(w.inter) + 3 * mul(&[tokens, w.experts, e])
    } else if w.gated {
        7 * act(w.inter)
    } else {
        5 * act(w.inter)
    };
    let per_block_saved = 4 * act(w.hidden)
        + 3 * act(w.q + 2 * w.kv)
        + 4 * act(w.q)
        + 2 * mul(&[b, w.heads, seq, seq, e])
        + 2 * mul(&[b, w.kv, seq, e])
        + mlp_saved
        + shape.lora_rank.map_or(0, |r| 4 * act(r));
    let forward = StepShape {
        new: seq,
        past: 0,
        tiling: AttentionTiling::OFF,
        ..*shape
    };
    // The saved graph, a block's transient on top, and the gradients flowing back (one block's
    // worth of the saved tensors at a time, plus the input's and the deep prompts').
    mul(&[blocks]) * per_block_saved + step_bytes(config, &forward) + per_block_saved + 2 * act(w.hidden)
}

/// Peak scratch of [`crate::model::LmHead::forward`] on `positions` positions of `batch` rows,
/// the logits copied to the host as f32 included.
pub fn head_bytes(config: &ModelConfig, batch: usize, positions: usize, elem_bytes: usize) -> u64 {
    let tokens = batch * positions;
    3 * mul(&[tokens, config.hidden_size, elem_bytes]) + mul(&[tokens, config.vocab_size, elem_bytes + 8])
}

/// The largest `n` in `0..=upper` whose `cost(n)` fits `budget`, found by bisection: for the
/// error that names the largest request that would pass. Exact when `cost` grows with `n`;
/// otherwise (attention switching to tiles past [`AttentionTiling::min_keys`] keys makes a
/// step cheaper) still an `n` that passes. `0` when none does.
pub fn largest_within(budget: u64, upper: usize, cost: impl Fn(usize) -> u64) -> usize {
    if cost(upper) <= budget {
        return upper;
    }
    // `lo` passes (or is 0), `hi` does not.
    let (mut lo, mut hi) = (0, upper);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if cost(mid) <= budget { lo = mid } else { hi = mid }
    }
    if lo > 0 || cost(0) <= budget { lo } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Shape;

    #[test]
    fn costs_grow_with_the_request() {
        let config = Shape::Llama70b.config().expect("config");
        let step = |batch, new, past| step_bytes(&config, &StepShape::new(batch, new, past, 80, 2));
        assert!(step(1, 1, 0) < step(1, 2, 0));
        assert!(step(1, 1024, 0) < step(1, 1024, 8192));
        assert!(step(1, 1024, 0) < step(4, 1024, 0));
        // A 16384-token stateless forward in chunks costs a fraction of the one-shot step.
        let one_shot = step_bytes(
            &config,
            &StepShape {
                tiling: AttentionTiling::OFF,
                ..StepShape::new(1, 16384, 0, 80, 2)
            },
        );
        let chunked = chunked_bytes(&config, &StepShape::new(1, 16384, 0, 80, 2), DEFAULT_CHUNK_TOKENS);
        assert!(one_shot > 30_000_000_000, "{one_shot}");
        assert!(chunked < one_shot / 20, "{chunked} vs {one_shot}");
        // KV: K and V, 80 layers, 8 KV heads of 128, bf16.
        assert_eq!(kv_cache_bytes(&config, 80, 1, 1000, 2), 2 * 80 * 8 * 1000 * 128 * 2);
    }

    #[test]
    fn largest_within_finds_the_edge() {
        assert_eq!(largest_within(100, 1000, |n| n as u64 * 3), 33);
        assert_eq!(largest_within(10_000, 1000, |n| n as u64 * 3), 1000);
        assert_eq!(largest_within(2, 1000, |n| 5 + n as u64), 0);
        let config = Shape::Tiny.config().expect("config");
        let budget = 50 << 20;
        let n = largest_within(budget, 1 << 20, |n| {
            chunked_bytes(&config, &StepShape::new(1, n, 0, 4, 4), DEFAULT_CHUNK_TOKENS)
        });
        let cost = |n| chunked_bytes(&config, &StepShape::new(1, n, 0, 4, 4), DEFAULT_CHUNK_TOKENS);
        assert!(cost(n) <= budget && cost(n + 1) > budget, "{n}");
    }
}

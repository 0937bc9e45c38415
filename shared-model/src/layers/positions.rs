//! Per-step position data shared by every block of a span: rotary angles, ALiBi biases and
//! the attention mask, all derived once from where the new tokens sit in their sequences.

use std::ops::Range;

use burn::prelude::*;

use crate::config::{ModelConfig, PositionKind, RopeConfig, RopeScaling};

/// Where a step's tokens sit: `batch` rows, each left-padded by `pad[row]` tokens, with `past`
/// tokens already in the KV cache and `new` tokens in this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLayout {
    pub pad: Vec<usize>,
    pub past: usize,
    pub new: usize,
}

impl SeqLayout {
    /// A batch without padding.
    pub fn unpadded(batch: usize, past: usize, new: usize) -> Self {
        Self {
            pad: vec![0; batch],
            past,
            new,
        }
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// Keys visible to this step (cached + new).
    pub fn total(&self) -> usize {
        self.past + self.new
    }

    /// The position id of the token at cache index `index` in `row`: padding does not count.
    fn position(&self, row: usize, index: usize) -> usize {
        index.saturating_sub(self.pad[row])
    }
}

/// When attention runs over tiles of keys with an online softmax instead of materialising
/// the scores of every query against every key (see [`super::attention::Attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionTiling {
    /// Steps with more keys than this (cached + new) are tiled, unless they carry a single
    /// query (one row, one new token: its scores are one row a head, and the decode kernels
    /// want them whole).
    pub min_keys: usize,
    /// Keys per tile.
    pub tile: usize,
}

impl AttentionTiling {
    /// Never tiles (tests compare against it).
    pub const OFF: Self = Self {
        min_keys: usize::MAX,
        tile: usize::MAX,
    };

    /// The keys per tile for a step of `batch` rows, `new` queries and `total` keys, or `None`
    /// when the step runs untiled.
    pub fn tile_for(&self, batch: usize, new: usize, total: usize) -> Option<usize> {
        (total > self.min_keys && batch * new > 1).then_some(self.tile.max(1))
    }
}

impl Default for AttentionTiling {
    /// Up to 2048 keys the scores stay whole (a 2048-token prefill is what the GPU fast paths
    /// are tuned for); past that, tiles of 1024 keys.
    fn default() -> Self {
        Self {
            min_keys: 2048,
            tile: 1024,
        }
    }
}

/// Tensors every block of a span needs for one step.
#[derive(Debug, Clone)]
pub struct StepContext<B: Backend> {
    /// `cos`, `sin`: `[batch, new, 1, rope_dim / 2]`.
    pub rope: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Additive ALiBi bias `[batch, kv_heads, heads_per_kv, 1, total]` (one row of keys a
    /// head: small, kept whole and sliced per tile).
    pub alibi: Option<Tensor<B, 5>>,
    /// Additive mask `[batch, 1, 1, new, total]` (0 or a large negative); `None` when every
    /// key is visible to every query, and when the step is tiled ([`Self::mask_tile`] builds
    /// each tile's part instead).
    pub mask: Option<Tensor<B, 5>>,
    /// `Some(past)` when the mask is plain causal (no padding, no window), `past` keys cached:
    /// query `i` sees keys `0..=past + i` and no other, so a kernel may skip the rest.
    pub causal_past: Option<usize>,
    layout: SeqLayout,
    window: Option<usize>,
    /// Keys per tile when attention is tiled.
    tile: Option<usize>,
    /// No padding, and no key out of the window.
    plain: bool,
}

/// Large enough to zero a softmax weight, small enough that a row with every key masked
/// (a padding query) stays finite instead of turning into NaN, in f16 too (whose largest
/// value is 65504).
pub const MASKED: f32 = -3.0e4;

impl<B: Backend> StepContext<B> {
    /// The context with the default [`AttentionTiling`].
    pub fn new(config: &ModelConfig, layout: &SeqLayout, device: &B::Device) -> Self {
        Self::with_tiling(config, layout, AttentionTiling::default(), device)
    }

    pub fn with_tiling(config: &ModelConfig, layout: &SeqLayout, tiling: AttentionTiling, device: &B::Device) -> Self {
        let (batch, new, total) = (layout.batch(), layout.new, layout.total());
        let tile = tiling.tile_for(batch, new, total);
        let rope = match config.position {
            PositionKind::Rope(rope) => Some(rope_tables(&rope, layout, device)),
            PositionKind::Alibi => None,
        };
        let alibi = match config.position {
            PositionKind::Alibi => {
                let heads = config.attention.num_heads;
                let slopes = alibi_slopes(heads);
                let mut data = Vec::with_capacity(batch * heads * total);
                for row in 0..batch {
                    for slope in &slopes {
                        for k in 0..total {
                            data.push(slope * layout.position(row, k) as f32);
                        }
                    }
                }
                let kv = config.attention.num_kv_heads;
                Some(Tensor::from_data(
                    TensorData::new(data, [batch, kv, heads / kv, 1, total]),
                    device,
                ))
            }
            PositionKind::Rope(_) => None,
        };
        let window = config.attention.sliding_window;
        let plain = layout.pad.iter().all(|&p| p == 0) && window.is_none_or(|w| total <= w);
        let needs_mask = new > 1 || !plain;
        let mask = match tile {
            Some(_) => None,
            None if plain => needs_mask.then(|| causal_mask(layout.past, new, 0..total, batch, device)),
            None => Some(host_mask(layout, window, 0..total, device)),
        };
        let causal_past = (plain && needs_mask).then_some(layout.past);
        Self {
            rope,
            alibi,
            mask,
            causal_past,
            layout: layout.clone(),
            window,
            tile,
            plain,
        }
    }

    /// Where the step's tokens sit.
    pub fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    /// Keys per tile, when attention is tiled.
    pub fn tile(&self) -> Option<usize> {
        self.tile
    }

    /// The tiles of keys attention must visit: every key some query may see, in tiles of
    /// [`Self::tile`] (all keys in one range when untiled). Keys that a sliding window hides
    /// from every query of the step are skipped.
    pub fn key_tiles(&self) -> Vec<Range<usize>> {
        let total = self.layout.total();
        let first = match self.window {
            // The step's first query sits at `past`; it sees keys after `past - window`.
            Some(w) => (self.layout.past + 1).saturating_sub(w),
            None => 0,
        };
        let tile = self.tile.unwrap_or(total).max(1);
        (first..total)
            .step_by(tile)
            .map(|start| start..(start + tile).min(total))
            .collect()
    }

    /// The additive mask of keys `keys` for every query of the step, built for one tile;
    /// `None` when the tile hides nothing.
    ///
    /// # Shapes
    /// - returns `[batch, 1, 1, new, keys.len()]`
    pub fn mask_tile(&self, keys: Range<usize>, device: &B::Device) -> Option<Tensor<B, 5>> {
        let layout = &self.layout;
        let causal_free = keys.end <= layout.past + 1;
        if self.plain {
            return (!causal_free).then(|| causal_mask(layout.past, layout.new, keys, layout.batch(), device));
        }
        let pad_free = layout.pad.iter().all(|&p| p <= keys.start);
        let window_free = self.window.is_none_or(|w| layout.total() - keys.start <= w);
        if causal_free && pad_free && window_free {
            return None;
        }
        Some(host_mask(layout, self.window, keys, device))
    }

    /// The ALiBi bias of keys `keys`.
    ///
    /// # Shapes
    /// - returns `[batch, kv_heads, heads_per_kv, 1, keys.len()]`
    pub fn alibi_tile(&self, keys: Range<usize>) -> Option<Tensor<B, 5>> {
        self.alibi.as_ref().map(|a| a.clone().narrow(4, keys.start, keys.len()))
    }
}

/// The plain causal mask of keys `keys` for queries `past..past + new`, built on the device:
/// the host loop and upload cost milliseconds on long prompts.
///
/// # Shapes
/// - returns `[batch, 1, 1, new, keys.len()]`
fn causal_mask<B: Backend>(
    past: usize,
    new: usize,
    keys: Range<usize>,
    batch: usize,
    device: &B::Device,
) -> Tensor<B, 5> {
    let len = keys.len();
    let queries = Tensor::<B, 1, Int>::arange(past as i64..(past + new) as i64, device).reshape([new, 1]);
    let keys = Tensor::<B, 1, Int>::arange(keys.start as i64..keys.end as i64, device).reshape([1, len]);
    let hidden = keys.expand([new, len]).greater(queries.expand([new, len]));
    Tensor::<B, 2>::zeros([new, len], device)
        .mask_fill(hidden, MASKED)
        .reshape([1, 1, 1, new, len])
        .expand([batch, 1, 1, new, len])
}

/// The mask of keys `keys` with left padding and a sliding window, built on the host.
///
/// # Shapes
/// - returns `[batch, 1, 1, new, keys.len()]`
fn host_mask<B: Backend>(
    layout: &SeqLayout,
    window: Option<usize>,
    keys: Range<usize>,
    device: &B::Device,
) -> Tensor<B, 5> {
    let (batch, new, total) = (layout.batch(), layout.new, layout.total());
    let mut data = Vec::with_capacity(batch * new * keys.len());
    for row in 0..batch {
        for q in layout.past..total {
            for k in keys.clone() {
                let visible = k <= q && k >= layout.pad[row] && window.is_none_or(|w| q - k < w);
                data.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [batch, 1, 1, new, keys.len()]), device)
}

/// Inverse frequencies, scaled as the config says (HF's `_compute_*_parameters`).
pub fn inv_freq(rope: &RopeConfig) -> Vec<f32> {
    let half = rope.dim / 2;
    (0..half)
        .map(|i| {
            let base = 1.0 / rope.theta.powf((2 * i) as f64 / rope.dim as f64);
            let scaled = match rope.scaling {
                RopeScaling::None => base,
                RopeScaling::Linear { factor } => base / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                } => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let low_wavelen = old / low_freq_factor;
                    let high_wavelen = old / high_freq_factor;
                    if wavelen > low_wavelen {
                        base / factor
                    } else if wavelen < high_wavelen {
                        base
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            };
            scaled as f32
        })
        .collect()
}

fn rope_tables<B: Backend>(rope: &RopeConfig, layout: &SeqLayout, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let freqs = inv_freq(rope);
    let half = freqs.len();
    let (batch, new) = (layout.batch(), layout.new);
    let positions: Vec<usize> = (0..batch * new)
        .map(|i| layout.position(i / new, layout.past + i % new))
        .collect();
    let (cos, sin) = rope_rows(&freqs, &positions);
    let shape = [batch, new, 1, half];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Positions below this are served from a table kept per set of frequencies (16 MiB for a
/// 128-wide head); others are computed each time.
const TABLE_POSITIONS: usize = 32768;

/// `cos` and `sin` of `position * freq`, a row of `freqs.len()` per position. A prompt's rows
/// are `tokens x head_dim / 2` sines and cosines in f64 (~7 ms for 2048 tokens on one core, as
/// much as a 70B block's products on a GPU), so rows are computed once per process, in
/// parallel, and copied afterwards.
fn rope_rows(freqs: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Table = Arc<(Vec<f32>, Vec<f32>)>;
    static TABLES: OnceLock<Mutex<HashMap<Vec<u32>, Table>>> = OnceLock::new();

    let half = freqs.len();
    let max = positions.iter().copied().max().unwrap_or(0);
    if half == 0 || max >= TABLE_POSITIONS {
        return compute_rows(freqs, positions);
    }
    let key: Vec<u32> = freqs.iter().map(|f| f.to_bits()).collect();
    let table = {
        let mut tables = TABLES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let known = tables.get(&key).filter(|t| t.0.len() / half > max).cloned();
        match known {
            Some(table) => table,
            None => {
                let len = (max + 1).next_power_of_two().clamp(256, TABLE_POSITIONS);
                let table: Table = Arc::new(compute_rows(freqs, &(0..len).collect::<Vec<_>>()));
                tables.insert(key, table.clone());
                table
            }
        }
    };
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        cos.extend_from_slice(&table.0[p * half..(p + 1) * half]);
        sin.extend_from_slice(&table.1[p * half..(p + 1) * half]);
    }
    (cos, sin)
}

fn compute_rows(freqs: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let half = freqs.len().max(1);
    let mut cos = vec![0f32; positions.len() * freqs.len()];
    let mut sin = vec![0f32; positions.len() * freqs.len()];
    cos.par_chunks_mut(half)
        .zip(sin.par_chunks_mut(half))
        .zip(positions.par_iter())
        .for_each(|((cos, sin), &pos)| {
            let pos = pos as f32;
            for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(freqs) {
                // The angle is rounded to f32 first, as HF computes it.
                let angle = (pos * f) as f64;
                *c = angle.cos() as f32;
                *s = angle.sin() as f32;
            }
        });
    (cos, sin)
}

/// Rotates the first `rope_dim` features of each head (rotate-half layout).
///
/// # Shapes
/// - `x`: `[batch, seq, heads, head_dim]`
/// - `cos`, `sin`: `[batch, seq, 1, rope_dim / 2]`
/// - returns `[batch, seq, heads, head_dim]`
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let half = cos.dims()[3];
    let head_dim = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let r2 = x2 * cos.clone() + x1 * sin.clone();
    if 2 * half == head_dim {
        Tensor::cat(vec![r1, r2], 3)
    } else {
        let rest = x.narrow(3, 2 * half, head_dim - 2 * half);
        Tensor::cat(vec![r1, r2, rest], 3)
    }
}

/// BLOOM's ALiBi slopes: a geometric sequence per head, interleaved when the head count is
/// not a power of two.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|p| base.powi(p as i32) as f32).collect();
    if closest != heads {
        let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
        let remaining = (heads - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32) as f32));
    }
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile's mask is the whole mask's columns for its keys, and the keys no tile visits
    /// are hidden from every query.
    #[test]
    fn mask_tiles_are_slices_of_the_whole_mask() {
        type B = crate::Cpu;
        let device = Default::default();
        for window in [None, Some(4), Some(9)] {
            let mut config = crate::synthetic::Shape::Tiny.config().expect("config");
            config.attention.sliding_window = window;
            for (pad, past, new) in [
                (vec![0], 0, 12),
                (vec![0], 7, 6),
                (vec![0, 3, 8], 0, 12),
                (vec![0, 3, 8], 10, 5),
                (vec![2, 0], 13, 1),
            ] {
                let layout = SeqLayout { pad, past, new };
                let whole = StepContext::<B>::with_tiling(&config, &layout, AttentionTiling::OFF, &device);
                let tiled =
                    StepContext::<B>::with_tiling(&config, &layout, AttentionTiling { min_keys: 0, tile: 5 }, &device);
                let (batch, total) = (layout.batch(), layout.total());
                let full = match whole.mask.clone() {
                    Some(m) => m
                        .expand([batch, 1, 1, new, total])
                        .into_data()
                        .to_vec::<f32>()
                        .expect("f32"),
                    None => vec![0.0; batch * new * total],
                };
                let at = |row: usize, q: usize, k: usize| full[(row * new + q) * total + k];
                let tiles = tiled.key_tiles();
                if batch * new > 1 {
                    assert!(tiled.mask.is_none() && tiled.tile() == Some(5));
                }
                let mut visited = vec![false; total];
                for keys in tiles {
                    assert!(keys.len() <= 5);
                    let part = tiled.mask_tile(keys.clone(), &device).map(|m| {
                        m.expand([batch, 1, 1, new, keys.len()])
                            .into_data()
                            .to_vec::<f32>()
                            .expect("f32")
                    });
                    for row in 0..batch {
                        for q in 0..new {
                            for (i, k) in keys.clone().enumerate() {
                                visited[k] = true;
                                let got = part.as_ref().map_or(0.0, |p| p[(row * new + q) * keys.len() + i]);
                                assert_eq!(got, at(row, q, k), "{layout:?} {window:?} row {row} q {q} k {k}");
                            }
                        }
                    }
                }
                for k in (0..total).filter(|&k| !visited[k]) {
                    for row in 0..batch {
                        for q in 0..new {
                            assert_eq!(
                                at(row, q, k),
                                MASKED,
                                "{layout:?} {window:?}: skipped key {k} is visible"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn alibi_slopes_match_bloom() {
        // From BLOOM's build_alibi_tensor for 4 and 6 heads.
        let s4 = alibi_slopes(4);
        assert_eq!(s4, vec![0.25, 0.0625, 0.015625, 0.00390625]);
        let s6 = alibi_slopes(6);
        assert_eq!(s6.len(), 6);
        assert_eq!(&s6[..4], &s4[..]);
        assert!((s6[4] - 0.5).abs() < 1e-7 && (s6[5] - 0.125).abs() < 1e-7, "{s6:?}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = RopeConfig {
            theta: 500_000.0,
            dim: 128,
            scaling: RopeScaling::None,
        };
        let scaled = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
            ..plain
        };
        let (a, b) = (inv_freq(&plain), inv_freq(&scaled));
        assert_eq!(a[0], b[0]);
        assert!((a[63] / 8.0 - b[63]).abs() < 1e-12);
    }
}

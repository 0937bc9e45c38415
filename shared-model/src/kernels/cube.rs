//! CubeCL kernels (compiled for the GPU at run time) behind the CUDA fast paths.

#![allow(unsafe_code)]

use burn_cubecl::cubecl;
use cubecl::num_traits::Zero;
use cubecl::prelude::*;

/// The sum of `value` over every unit of the cube (warp sums, then across warps), for every
/// unit. Each call has its own shared memory, so calls in a row need no wait between them.
#[cube]
fn cube_sum(value: f32) -> f32 {
    let mut partial = SharedMemory::<f32>::new(32usize);
    let warp_sum = plane_sum(value);
    if UNIT_POS_PLANE == 0 {
        partial[(UNIT_POS_X / PLANE_DIM) as usize] = warp_sum;
    }
    sync_cube();
    let mut total = f32::new(0.0);
    for w in 0..CUBE_DIM_X / PLANE_DIM {
        total += partial[w as usize];
    }
    total
}

/// The largest `value` over every unit of the cube, for every unit (as [`cube_sum`]).
#[cube]
fn cube_max(value: f32) -> f32 {
    let mut partial = SharedMemory::<f32>::new(32usize);
    let warp_max = plane_max(value);
    if UNIT_POS_PLANE == 0 {
        partial[(UNIT_POS_X / PLANE_DIM) as usize] = warp_max;
    }
    sync_cube();
    let mut max = f32::new(-3.0e38);
    for w in 0..CUBE_DIM_X / PLANE_DIM {
        max = f32::max(max, partial[w as usize]);
    }
    max
}

/// One cube per row, in vectors of `N` elements: the mean of squares in f32 (warp sums, then
/// across warps), then `(x * rsqrt(mean + eps)) as F * weight`, as HF's `LlamaRMSNorm` rounds
/// it.
#[cube(launch)]
pub(super) fn rms_norm_kernel<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    weight: &Tensor<Vector<F, N>>,
    output: &mut Tensor<Vector<F, N>>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let vectors = weight.len();
    let d = vectors * input.vector_size();
    let base = CUBE_POS_X as usize * vectors;
    let threads = CUBE_DIM_X as usize;
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS_X as usize;
    while i < vectors {
        let v = Vector::<f32, N>::cast_from(input[base + i]);
        acc += f32::cast_from(Vector::vector_sum(v * v));
        i += threads;
    }
    let total = cube_sum(acc);
    let scale = Vector::<f32, N>::new(f32::new(1.0) / (total / f32::cast_from(d as u32) + eps).sqrt());
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        output[base + j] = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(input[base + j]) * scale) * weight[j];
        j += threads;
    }
}

/// The residual sum `x + delta` (rounded to `F`, as burn's add) and its RMSNorm, in one pass:
/// what [`rms_norm_kernel`] does, after writing the sum it normalizes.
#[cube(launch)]
pub(super) fn add_rms_norm_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    delta: &Tensor<Vector<F, N>>,
    weight: &Tensor<Vector<F, N>>,
    sum: &mut Tensor<Vector<F, N>>,
    output: &mut Tensor<Vector<F, N>>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let vectors = weight.len();
    let d = vectors * x.vector_size();
    let base = CUBE_POS_X as usize * vectors;
    let threads = CUBE_DIM_X as usize;
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS_X as usize;
    while i < vectors {
        let s = x[base + i] + delta[base + i];
        sum[base + i] = s;
        let v = Vector::<f32, N>::cast_from(s);
        acc += f32::cast_from(Vector::vector_sum(v * v));
        i += threads;
    }
    let total = cube_sum(acc);
    let scale = Vector::<f32, N>::new(f32::new(1.0) / (total / f32::cast_from(d as u32) + eps).sqrt());
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let s = x[base + j] + delta[base + j];
        output[base + j] = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(s) * scale) * weight[j];
        j += threads;
    }
}

/// The dense `[rows, cols]` matrix of quantized blocks, one thread per element (for products
/// of several rows, which burn's matmul then does).
#[cube(launch)]
#[allow(unused_assignments)]
pub(super) fn dequantize_kernel<F: Float>(
    words: &Tensor<i32>,
    scales: &Tensor<f32>,
    mins: &Tensor<f32>,
    output: &mut Tensor<F>,
    #[comptime] kind: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= output.len() {
        terminate!();
    }
    let per_word = comptime!(if kind == 0 { 4u32 } else { 8u32 });
    let word = words[i / per_word as usize];
    let e = (i % per_word as usize) as u32;
    let block = i / 32;
    let mut value = f32::new(0.0);
    if comptime!(kind == 0) {
        value = f32::cast_from((word << (24 - 8 * e) as i32) >> 24) * scales[block];
    } else if comptime!(kind == 1) {
        value = (f32::cast_from((word >> (4 * e) as i32) & 15) - f32::new(8.0)) * scales[block];
    } else {
        value = f32::cast_from((word >> (4 * e) as i32) & 15) * scales[block] + mins[block];
    }
    output[i] = F::cast_from(value);
}

/// `x W^T` for one input row, `per_warp` output rows per warp: each lane reads 8 weights at a
/// time (16-byte loads in half precision, 32 lanes covering 512 contiguous bytes of a row),
/// multiplies them by the matching 8 inputs and accumulates in f32; the warp sums its lanes.
/// Several rows per warp keep more loads in flight and read `x` once for all of them.
/// `rows` is a multiple of `per_warp`; `vecs` is `in / 8`.
#[cube(launch)]
pub(super) fn matvec_kernel<F: Float>(
    w: &Tensor<Vector<F, Const<8>>>,
    x: &Tensor<Vector<F, Const<8>>>,
    output: &mut Tensor<F>,
    rows: u32,
    vecs: u32,
    #[comptime] per_warp: u32,
    #[define(F)] _dtype: StorageType,
) {
    let first = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) * per_warp;
    if first >= rows {
        terminate!();
    }
    let mut acc = Array::<Vector<f32, Const<8>>>::new(per_warp as usize);
    #[unroll]
    for r in 0..per_warp {
        acc[r as usize] = Vector::<f32, Const<8>>::zero();
    }
    let row_base = first as usize * vecs as usize;
    let mut i = UNIT_POS_X as usize;
    while i < vecs as usize {
        let xv = Vector::<f32, Const<8>>::cast_from(x[i]);
        #[unroll]
        for r in 0..per_warp {
            let wv = Vector::<f32, Const<8>>::cast_from(w[row_base + r as usize * vecs as usize + i]);
            acc[r as usize] += wv * xv;
        }
        i += 32;
    }
    #[unroll]
    for r in 0..per_warp {
        let total = plane_sum(f32::cast_from(Vector::vector_sum(acc[r as usize])));
        if UNIT_POS_X == 0 {
            output[(first + r) as usize] = F::cast_from(total);
        }
    }
}

/// One warp per output row of a quantized matrix times one input row, one 32-value block per
/// lane and step: the lane loads the block's words with one 16-byte load (two for Q8_0, whose
/// blocks take 32 bytes) so the warp reads 512 contiguous bytes, expands them in registers
/// against the block's 32 inputs, and accumulates `d * sum(q * x)` (Q4_0 with `q - 8`, Q4_1
/// plus `m * sum(x)`) in f32. `kind`: 0 Q8_0, 1 Q4_0, 2 Q4_1 (`QuantMatrix::gpu_parts`).
#[cube(launch)]
pub(super) fn quant_matvec_kernel<F: Float>(
    x: &Tensor<Vector<F, Const<8>>>,
    words: &Tensor<Vector<i32, Const<4>>>,
    scales: &Tensor<f32>,
    mins: &Tensor<f32>,
    output: &mut Tensor<F>,
    rows: u32,
    blocks: u32,
    #[comptime] kind: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let loads = comptime!(if kind == 0 { 2u32 } else { 1u32 });
    let mut acc = f32::new(0.0);
    let mut b = UNIT_POS_X as usize;
    while b < blocks as usize {
        let block = row as usize * blocks as usize + b;
        let mut xs = Array::<Vector<f32, Const<8>>>::new(4usize);
        #[unroll]
        for j in 0..4u32 {
            xs[j as usize] = Vector::<f32, Const<8>>::cast_from(x[b * 4 + j as usize]);
        }
        let mut dot = f32::new(0.0);
        #[unroll]
        for h in 0..loads {
            let wv = words[block * loads as usize + h as usize];
            #[unroll]
            for w in 0..4u32 {
                let word = wv[w as usize];
                if comptime!(kind == 0) {
                    // Word `h * 4 + w` holds elements 4 (h * 4 + w) .. +4, signed bytes.
                    let xv = comptime!((h * 4 + w) / 2);
                    let half = comptime!(((h * 4 + w) % 2) * 4);
                    #[unroll]
                    for e in 0..4u32 {
                        let q = (word << (24 - 8 * e) as i32) >> 24;
                        dot += f32::cast_from(q) * xs[xv as usize][(half + e) as usize];
                    }
                } else {
                    // Word `w` holds elements 8 w .. +8, one nibble each.
                    #[unroll]
                    for e in 0..8u32 {
                        let q = (word >> (4 * e) as i32) & 15;
                        dot += f32::cast_from(q) * xs[w as usize][e as usize];
                    }
                }
            }
        }
        let d = scales[block];
        if comptime!(kind == 0) {
            acc += d * dot;
        } else {
            let xsum = f32::cast_from(Vector::vector_sum(xs[0usize] + xs[1usize] + xs[2usize] + xs[3usize]));
            if comptime!(kind == 1) {
                acc += d * (dot - f32::new(8.0) * xsum);
            } else {
                acc += d * dot + mins[block] * xsum;
            }
        }
        b += 32;
    }
    let total = plane_sum(acc);
    if UNIT_POS_X == 0 {
        output[row as usize] = F::cast_from(total);
    }
}

/// Keys per cube of the split decode attention (one thread per key).
pub(super) const ATTENTION_CHUNK: u32 = 256;

/// Split ("flash-decoding") attention of one new query per head, first pass: cube `(h, c)`
/// takes query head `h` over keys `c * 256 .. +256`, one thread per key (its whole key row
/// in 16-byte loads), softmax within the chunk, then `p · v` with each group of threads
/// reading whole value rows. Writes, per head and chunk, the unnormalized output, the chunk's
/// max score and its sum of `exp(score - max)`: `partial` is `[heads, chunks, head_dim + 2]`.
/// Many cubes (heads x chunks) keep every SM busy on long caches, where one cube per head
/// left most of the GPU idle.
#[cube(launch)]
pub(super) fn attention_partial_kernel<F: Float>(
    q: &Tensor<Vector<F, Const<8>>>,
    k: &Tensor<Vector<F, Const<8>>>,
    v: &Tensor<Vector<F, Const<8>>>,
    partial: &mut Tensor<f32>,
    keys: u32,
    head_rows: u32,
    group: u32,
    scale: f32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let head = CUBE_POS_X;
    let chunk = CUBE_POS_Y;
    let chunks = CUBE_COUNT_Y;
    let kv_head = head / group;
    let hv = comptime!(head_dim / 8);
    let t = UNIT_POS_X;
    let start = chunk * ATTENTION_CHUNK;
    let key = start + t;
    // The cache's buffers hold `head_rows >= keys` positions per KV head.
    let kv_rows = kv_head as usize * head_rows as usize;

    let mut score = f32::new(-3.0e38);
    if key < keys {
        let row = (kv_rows + key as usize) * hv as usize;
        let q_row = head as usize * hv as usize;
        let mut dot = Vector::<f32, Const<8>>::zero();
        #[unroll]
        for j in 0..hv {
            dot += Vector::<f32, Const<8>>::cast_from(k[row + j as usize])
                * Vector::<f32, Const<8>>::cast_from(q[q_row + j as usize]);
        }
        score = f32::cast_from(Vector::vector_sum(dot)) * scale;
    }
    let max = cube_max(score);
    let mut p = f32::new(0.0);
    if key < keys {
        p = (score - max).exp();
    }
    let mut probs = SharedMemory::<f32>::new(ATTENTION_CHUNK as usize);
    probs[t as usize] = p;
    // Its wait for the cube also makes `probs` visible to every unit.
    let sum = cube_sum(p);

    // Thread t: vector column t % hv of value rows t / hv, + groups, ...
    let groups = CUBE_DIM_X / hv;
    let column = t % hv;
    let g = t / hv;
    let mut in_chunk = keys - start;
    if in_chunk > ATTENTION_CHUNK {
        in_chunk = ATTENTION_CHUNK;
    }
    let mut acc = Vector::<f32, Const<8>>::zero();
    let mut s = g;
    while s < in_chunk {
        let value =
            Vector::<f32, Const<8>>::cast_from(v[(kv_rows + (start + s) as usize) * hv as usize + column as usize]);
        acc += value * Vector::new(probs[s as usize]);
        s += groups;
    }
    let mut sums = SharedMemory::<f32>::new((ATTENTION_CHUNK * 8) as usize);
    #[unroll]
    for e in 0..8u32 {
        sums[(t * 8 + e) as usize] = acc[e as usize];
    }
    sync_cube();
    let stride = head_dim + 2;
    let out = (head * chunks + chunk) as usize * stride as usize;
    if t < head_dim {
        let mut total = f32::new(0.0);
        for gi in 0..groups {
            total += sums[(gi * head_dim + t) as usize];
        }
        partial[out + t as usize] = total;
    }
    if t == 0 {
        partial[out + head_dim as usize] = max;
        partial[out + head_dim as usize + 1] = sum;
    }
}

/// Second pass of the split decode attention: one cube per head, one thread per output
/// dimension, rescales each chunk's partial output by `exp(max_c - max)` and divides by the
/// rescaled sum.
#[cube(launch)]
pub(super) fn attention_combine_kernel<F: Float>(
    partial: &Tensor<f32>,
    output: &mut Tensor<F>,
    chunks: u32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let head = CUBE_POS_X;
    let t = UNIT_POS_X;
    let stride = head_dim + 2;
    let base = head as usize * chunks as usize * stride as usize;
    let mut max = f32::new(-3.0e38);
    for c in 0..chunks {
        max = f32::max(max, partial[base + c as usize * stride as usize + head_dim as usize]);
    }
    let mut sum = f32::new(0.0);
    let mut acc = f32::new(0.0);
    for c in 0..chunks {
        let row = base + c as usize * stride as usize;
        let w = (partial[row + head_dim as usize] - max).exp();
        sum += w * partial[row + head_dim as usize + 1];
        acc += w * partial[row + t as usize];
    }
    output[head as usize * head_dim as usize + t as usize] = F::cast_from(acc / sum);
}

/// Splits a fused q|k|v projection into heads and rotates q and k (rotate-half RoPE over the
/// whole head) in one pass: cube `token * slots + slot` takes one head of one token, thread
/// `i` the pair `(i, i + head_dim / 2)`, rotated in f32. Replaces the narrows, copies and the
/// dozen element-wise launches of the generic path.
#[cube(launch)]
pub(super) fn rope_split_kernel<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    q: &mut Tensor<F>,
    k: &mut Tensor<F>,
    v: &mut Tensor<F>,
    heads: u32,
    kv_heads: u32,
    #[comptime] head_dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let slots = heads + 2 * kv_heads;
    let token = CUBE_POS_X / slots;
    let slot = CUBE_POS_X % slots;
    let half = comptime!(head_dim / 2);
    let i = UNIT_POS_X;
    let src = (token * slots + slot) as usize * head_dim as usize + i as usize;
    let x1 = qkv[src];
    let x2 = qkv[src + half as usize];
    if slot < heads + kv_heads {
        let c = f32::cast_from(cos[(token * half + i) as usize]);
        let s = f32::cast_from(sin[(token * half + i) as usize]);
        let (a, b) = (f32::cast_from(x1), f32::cast_from(x2));
        let r1 = F::cast_from(a * c - b * s);
        let r2 = F::cast_from(b * c + a * s);
        if slot < heads {
            let dst = (token * heads + slot) as usize * head_dim as usize + i as usize;
            q[dst] = r1;
            q[dst + half as usize] = r2;
        } else {
            let dst = (token * kv_heads + slot - heads) as usize * head_dim as usize + i as usize;
            k[dst] = r1;
            k[dst + half as usize] = r2;
        }
    } else {
        let dst = (token * kv_heads + slot - heads - kv_heads) as usize * head_dim as usize + i as usize;
        v[dst] = x1;
        v[dst + half as usize] = x2;
    }
}

/// `softmax(scores * scale + mask)` over each row of `total` scores: one cube per row, three
/// passes over the row (max, sum of exponentials, write) in vectors of `N` elements, all in
/// f32. Row `r` is query `r % new` of batch `r / (new * heads)`, whose mask row is shared by
/// every head. With `visible_from > 0` (a plain causal mask), query `q` sees only its first
/// `q + visible_from` keys: vectors past them are not read, and written as 0 (what the mask's
/// -3e4 makes of them: `exp` underflows to exactly 0 in f32).
#[cube(launch)]
pub(super) fn masked_softmax_kernel<F: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    mask: &Tensor<Vector<F, N>>,
    output: &mut Tensor<Vector<F, N>>,
    total: u32,
    new: u32,
    heads: u32,
    visible_from: u32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let width = scores.vector_size();
    let vectors = total as usize / width;
    let row = CUBE_POS_X as usize;
    let query = row % new as usize;
    let mut limit = vectors;
    if visible_from > 0 {
        let visible = query + visible_from as usize;
        if visible < total as usize {
            limit = (visible + width - 1) / width;
        }
    }
    let batch = row / (new as usize * heads as usize);
    let base = row * vectors;
    let mask_base = (batch * new as usize + query) * vectors;
    let threads = CUBE_DIM_X as usize;
    let scale_v = Vector::<f32, N>::new(scale);

    let mut local_max = f32::new(-3.0e38);
    let mut j = UNIT_POS_X as usize;
    while j < limit {
        let v =
            Vector::<f32, N>::cast_from(scores[base + j]) * scale_v + Vector::<f32, N>::cast_from(mask[mask_base + j]);
        #[unroll]
        for e in 0..width {
            local_max = f32::max(local_max, v[e]);
        }
        j += threads;
    }
    let row_max = cube_max(local_max);
    let max_v = Vector::<f32, N>::new(row_max);

    let mut local_sum = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < limit {
        let v =
            Vector::<f32, N>::cast_from(scores[base + j]) * scale_v + Vector::<f32, N>::cast_from(mask[mask_base + j]);
        local_sum += f32::cast_from(Vector::vector_sum((v - max_v).exp()));
        j += threads;
    }
    let row_sum = cube_sum(local_sum);
    let inv = Vector::<f32, N>::new(f32::new(1.0) / row_sum);

    let mut j = UNIT_POS_X as usize;
    while j < limit {
        let v =
            Vector::<f32, N>::cast_from(scores[base + j]) * scale_v + Vector::<f32, N>::cast_from(mask[mask_base + j]);
        output[base + j] = Vector::<F, N>::cast_from((v - max_v).exp() * inv);
        j += threads;
    }
    while j < vectors {
        output[base + j] = Vector::<F, N>::zero();
        j += threads;
    }
}

/// `silu(gate) * up` for each element of `[tokens, inter]`, reading both halves of the fused
/// `[tokens, 2 inter]` projection; computed in f32, rounded once.
#[cube(launch)]
pub(super) fn gated_silu_kernel<F: Float>(
    gate_up: &Tensor<F>,
    output: &mut Tensor<F>,
    inter: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= output.len() {
        terminate!();
    }
    let width = inter as usize;
    let token = i / width;
    let column = i % width;
    let g = f32::cast_from(gate_up[token * 2 * width + column]);
    let u = f32::cast_from(gate_up[token * 2 * width + width + column]);
    output[i] = F::cast_from(g / (f32::new(1.0) + (-g).exp()) * u);
}

//! CubeCL kernels (compiled for the GPU at run time) behind the CUDA fast paths.

#![allow(unsafe_code)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// One cube per row: the mean of squares in f32 (warp sums, then across warps), then
/// `(x * rsqrt(mean + eps)) as F * weight`, as HF's `LlamaRMSNorm` rounds it.
#[cube(launch)]
pub(super) fn rms_norm_kernel<F: Float>(
    input: &Tensor<F>,
    weight: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let d = weight.len();
    let base = CUBE_POS_X as usize * d;
    let threads = CUBE_DIM_X as usize;
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS_X as usize;
    while i < d {
        let v = f32::cast_from(input[base + i]);
        acc += v * v;
        i += threads;
    }
    let warp_sum = plane_sum(acc);
    let mut partial = SharedMemory::<f32>::new(32usize);
    if UNIT_POS_PLANE == 0 {
        partial[(UNIT_POS_X / PLANE_DIM) as usize] = warp_sum;
    }
    sync_cube();
    let mut total = f32::new(0.0);
    for w in 0..CUBE_DIM_X / PLANE_DIM {
        total += partial[w as usize];
    }
    let scale = f32::new(1.0) / (total / f32::cast_from(d as u32) + eps).sqrt();
    let mut j = UNIT_POS_X as usize;
    while j < d {
        output[base + j] = F::cast_from(f32::cast_from(input[base + j]) * scale) * weight[j];
        j += threads;
    }
}

/// Attention of one new query per head over the whole KV cache, one cube per query head:
/// scores `q·k / sqrt(hd)` for every cached key into shared memory, their softmax (max and sum
/// reduced across warps), then each thread group sums `p · v` over a share of the keys for its
/// output dimension and the groups add up. Replaces a dozen burn ops (reshapes, two matmuls, a
/// softmax) and their launches.
#[cube(launch)]
pub(super) fn decode_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    output: &mut Tensor<F>,
    keys: u32,
    group: u32,
    scale: f32,
    #[comptime] head_dim: u32,
    #[comptime] max_keys: u32,
    #[define(F)] _dtype: StorageType,
) {
    let head = CUBE_POS_X;
    let kv_head = head / group;
    let hd = head_dim as usize;
    let threads = CUBE_DIM_X;
    let q_base = head as usize * hd;
    let kv_base = kv_head as usize * keys as usize * hd;

    let mut q_shared = SharedMemory::<f32>::new(head_dim as usize);
    let mut i = UNIT_POS_X;
    while i < head_dim {
        q_shared[i as usize] = f32::cast_from(q[q_base + i as usize]);
        i += threads;
    }
    sync_cube();

    let mut scores = SharedMemory::<f32>::new(max_keys as usize);
    let mut local_max = f32::new(-3.0e38);
    let mut s = UNIT_POS_X;
    while s < keys {
        let row = kv_base + s as usize * hd;
        let mut dot = f32::new(0.0);
        for e in 0..head_dim {
            dot += q_shared[e as usize] * f32::cast_from(k[row + e as usize]);
        }
        let score = dot * scale;
        scores[s as usize] = score;
        local_max = f32::max(local_max, score);
        s += threads;
    }
    let mut partial = SharedMemory::<f32>::new(32usize);
    let warp = (UNIT_POS_X / PLANE_DIM) as usize;
    let warps = CUBE_DIM_X / PLANE_DIM;
    let warp_max = plane_max(local_max);
    if UNIT_POS_PLANE == 0 {
        partial[warp] = warp_max;
    }
    sync_cube();
    let mut max = f32::new(-3.0e38);
    for w in 0..warps {
        max = f32::max(max, partial[w as usize]);
    }
    sync_cube();

    let mut local_sum = f32::new(0.0);
    let mut s2 = UNIT_POS_X;
    while s2 < keys {
        let p = (scores[s2 as usize] - max).exp();
        scores[s2 as usize] = p;
        local_sum += p;
        s2 += threads;
    }
    let warp_sum = plane_sum(local_sum);
    if UNIT_POS_PLANE == 0 {
        partial[warp] = warp_sum;
    }
    sync_cube();
    let mut sum = f32::new(0.0);
    for w in 0..warps {
        sum += partial[w as usize];
    }

    // Thread `t` sums dimension `t % head_dim` over keys `t / head_dim`, +groups, ...
    let groups = threads / head_dim;
    let dim = UNIT_POS_X % head_dim;
    let part = UNIT_POS_X / head_dim;
    let mut acc = f32::new(0.0);
    if part < groups {
        let mut s3 = part;
        while s3 < keys {
            acc += scores[s3 as usize] * f32::cast_from(v[kv_base + s3 as usize * hd + dim as usize]);
            s3 += groups;
        }
    }
    let mut sums = SharedMemory::<f32>::new(1024usize);
    if part < groups {
        sums[UNIT_POS_X as usize] = acc;
    }
    sync_cube();
    if UNIT_POS_X < head_dim {
        let mut total = f32::new(0.0);
        for g in 0..groups {
            total += sums[(g * head_dim + UNIT_POS_X) as usize];
        }
        output[q_base + UNIT_POS_X as usize] = F::cast_from(total / sum);
    }
}

/// One warp per output row of a quantized matrix times one input row: each lane takes every
/// 32nd block, expands its words in registers and accumulates `d * sum(q * x)` (Q4_0 with
/// `q - 8`, Q4_1 plus `m * sum(x)`) in f32; the warp then sums its lanes. `kind`: 0 Q8_0,
/// 1 Q4_0, 2 Q4_1 (see `QuantMatrix::gpu_parts` for the packing).
#[cube(launch)]
pub(super) fn quant_matvec_kernel<F: Float>(
    x: &Tensor<F>,
    words: &Tensor<i32>,
    scales: &Tensor<f32>,
    mins: &Tensor<f32>,
    output: &mut Tensor<F>,
    rows: u32,
    #[comptime] kind: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let blocks = x.len() / 32;
    let per_word = comptime!(if kind == 0 { 4u32 } else { 8u32 });
    let words_per_block = comptime!(32 / per_word);
    let mut acc = f32::new(0.0);
    let mut b = UNIT_POS_X as usize;
    while b < blocks {
        let block = row as usize * blocks + b;
        let mut dot = f32::new(0.0);
        let mut xsum = f32::new(0.0);
        #[unroll]
        for w in 0..words_per_block {
            let word = words[block * words_per_block as usize + w as usize];
            #[unroll]
            for e in 0..per_word {
                let xv = f32::cast_from(x[b * 32 + (w * per_word + e) as usize]);
                if comptime!(kind == 0) {
                    // Sign-extends byte e.
                    let q = (word << (24 - 8 * e) as i32) >> 24;
                    dot += f32::cast_from(q) * xv;
                } else {
                    let q = (word >> (4 * e) as i32) & 15;
                    dot += f32::cast_from(q) * xv;
                    xsum += xv;
                }
            }
        }
        let d = scales[block];
        if comptime!(kind == 0) {
            acc += d * dot;
        } else if comptime!(kind == 1) {
            acc += d * (dot - f32::new(8.0) * xsum);
        } else {
            acc += d * dot + mins[block] * xsum;
        }
        b += 32;
    }
    let total = plane_sum(acc);
    if UNIT_POS_X == 0 {
        output[row as usize] = F::cast_from(total);
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

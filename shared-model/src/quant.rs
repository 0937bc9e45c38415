//! Weights kept quantized in memory (GGUF Q8_0, Q4_0, Q4_1) with dequantization inside the
//! matrix-vector product, for CPU inference.
//!
//! Decoding at batch 1 is bound by memory traffic: a Q4_1 weight is 0.625 bytes against an
//! f32's 4, so reading the blocks and expanding them in registers beats streaming dequantized
//! f32 weights through a generic GEMM. Each output is the dot product of one row of blocks
//! with the input, computed blockwise as `d * sum(q * x) (+ m * sum(x))`.

use rayon::prelude::*;

use crate::gguf::{GgmlType, dequantize_named};
use crate::weights::{HostTensor, WeightError};

const BLOCK: usize = 32;

/// The block formats kept quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QuantKind {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::Q8_0 => Some(Self::Q8_0),
            GgmlType::Q4_0 => Some(Self::Q4_0),
            GgmlType::Q4_1 => Some(Self::Q4_1),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// Bytes of one 32-element block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }
}

/// A `[rows, cols]` matrix (PyTorch's `[out, in]`) stored as rows of quantized blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    pub fn new(name: &str, kind: QuantKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, WeightError> {
        let expected = (cols / BLOCK)
            .checked_mul(kind.block_bytes())
            .and_then(|r| r.checked_mul(rows));
        if !cols.is_multiple_of(BLOCK) || expected != Some(data.len()) {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: vec![rows, cols],
                actual: vec![data.len()],
            });
        }
        Ok(Self { kind, rows, cols, data })
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// The blocks as stored (GGUF layout), row after row.
    pub fn raw(&self) -> &[u8] {
        &self.data
    }

    /// `[rows, cols]`
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.kind.block_bytes()
    }

    /// Reorders rows: output row `i` is input row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        Self {
            rows: order.len(),
            data,
            ..*self
        }
    }

    /// Stacks matrices of one kind and width along the rows; `None` if they differ.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.kind != first.kind || p.cols != first.cols) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            data,
            ..**first
        })
    }

    /// Quantizes a dense `[rows, cols]` matrix the way llama.cpp's reference quantizers do
    /// (round to nearest; Q4_0 scales by the value of largest magnitude, Q4_1 by the range).
    pub fn quantize(name: &str, kind: QuantKind, dense: &HostTensor) -> Result<Self, WeightError> {
        let [rows, cols] = match dense.shape[..] {
            [r, c] if c % BLOCK == 0 => [r, c],
            _ => {
                return Err(WeightError::Shape {
                    name: name.to_string(),
                    expected: vec![0, BLOCK],
                    actual: dense.shape.clone(),
                });
            }
        };
        let bb = kind.block_bytes();
        let mut data = vec![0u8; rows * cols / BLOCK * bb];
        data.par_chunks_mut(bb * 1024)
            .zip(dense.data.par_chunks(BLOCK * 1024))
            .for_each(|(out, x)| {
                for (blk, xb) in out.chunks_exact_mut(bb).zip(x.chunks_exact(BLOCK)) {
                    quantize_block(kind, xb, blk);
                }
            });
        Self::new(name, kind, rows, cols, data)
    }

    /// The matrix repacked for GPU kernels, which read whole 32-bit words: `(words, scales,
    /// mins)`. Q8_0 packs 4 signed bytes a word (element `e` of a word in bits `8e..8e+8`),
    /// Q4_0/Q4_1 8 nibbles (element `e` in bits `4e..4e+4`), blocks in order; scales and
    /// Q4_1's minimums are one f32 per block.
    pub fn gpu_parts(&self) -> (Vec<i32>, Vec<f32>, Option<Vec<f32>>) {
        let blocks = self.rows * self.cols / BLOCK;
        let per_word = if self.kind == QuantKind::Q8_0 { 4 } else { 8 };
        let mut words = vec![0i32; blocks * BLOCK / per_word];
        let mut scales = vec![0f32; blocks];
        let mut mins = (self.kind == QuantKind::Q4_1).then(|| vec![0f32; blocks]);
        for (b, blk) in self.data.chunks_exact(self.kind.block_bytes()).enumerate() {
            scales[b] = f16(blk);
            let values: [u8; BLOCK] = match self.kind {
                QuantKind::Q8_0 => std::array::from_fn(|e| blk[2 + e]),
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let qs = if self.kind == QuantKind::Q4_0 {
                        &blk[2..18]
                    } else {
                        &blk[4..20]
                    };
                    std::array::from_fn(|e| if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 })
                }
            };
            if let Some(m) = mins.as_mut() {
                m[b] = f16(&blk[2..]);
            }
            let bits = 32 / per_word;
            for (e, &v) in values.iter().enumerate() {
                words[(b * BLOCK + e) / per_word] |= ((v as u32) << (bits * (e % per_word))) as i32;
            }
        }
        (words, scales, mins)
    }

    pub fn dequantize(&self) -> Result<HostTensor, WeightError> {
        let data = dequantize_named("quantized weight", self.kind.ggml(), &self.data, self.rows * self.cols)?;
        Ok(HostTensor::new(vec![self.rows, self.cols], data))
    }

    /// `y = x W^T` for `n` input rows: `x` is `[n, cols]`, the result `[n, rows]`.
    ///
    /// Each weight row is read once for all `n` inputs (a batch of decode steps costs about
    /// one step's memory traffic); every output is the same dot product as for one input.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert_eq!(x.len(), n * cols);
        let block_sums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        let rb = self.row_bytes();
        let kind = self.kind;
        let simd = simd::available();
        let blocks = cols / BLOCK;
        let dot_row = |row: &[u8], t: usize| {
            let xt = &x[t * cols..(t + 1) * cols];
            let st = &block_sums[t * blocks..(t + 1) * blocks];
            if simd {
                simd::dot(kind, row, xt, st)
            } else {
                dot(kind, row, xt, st)
            }
        };
        // Rows in chunks so each task streams a contiguous run of weights.
        let chunk = 64;
        // `[rows, n]`: each task writes its own rows' outputs, for every input.
        let mut by_row = vec![0f32; rows * n];
        by_row.par_chunks_mut(chunk * n).enumerate().for_each(|(c, ys)| {
            for (i, y) in ys.chunks_mut(n).enumerate() {
                let r = c * chunk + i;
                let row = &self.data[r * rb..(r + 1) * rb];
                for (t, yv) in y.iter_mut().enumerate() {
                    *yv = dot_row(row, t);
                }
            }
        });
        if n == 1 {
            return by_row;
        }
        let mut out = vec![0f32; n * rows];
        for (r, y) in by_row.chunks_exact(n).enumerate() {
            for (t, &v) in y.iter().enumerate() {
                out[t * rows + r] = v;
            }
        }
        out
    }
}

fn quantize_block(kind: QuantKind, x: &[f32], out: &mut [u8]) {
    let put_f16 = |out: &mut [u8], v: f32| out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    match kind {
        QuantKind::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            put_f16(&mut out[..2], d);
            for (q, v) in out[2..].iter_mut().zip(x) {
                *q = (v * id).round() as i8 as u8;
            }
        }
        QuantKind::Q4_0 => {
            let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(&mut out[..2], d);
            let q = |v: f32| ((v * id + 8.5) as u8).min(15);
            for j in 0..16 {
                out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
            }
        }
        QuantKind::Q4_1 => {
            let (min, max) = x
                .iter()
                .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(&mut out[..2], d);
            put_f16(&mut out[2..4], min);
            let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
            for j in 0..16 {
                out[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
            }
        }
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Portable dot product of one row of blocks with `x` (`sums` holds each block's sum of x).
fn dot(kind: QuantKind, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(kind.block_bytes()).enumerate() {
        let xb = &x[b * BLOCK..(b + 1) * BLOCK];
        acc += match kind {
            QuantKind::Q8_0 => {
                let s: f32 = blk[2..34].iter().zip(xb).map(|(&q, &v)| q as i8 as f32 * v).sum();
                f16(blk) * s
            }
            QuantKind::Q4_0 | QuantKind::Q4_1 => {
                let qs = if kind == QuantKind::Q4_0 {
                    &blk[2..18]
                } else {
                    &blk[4..20]
                };
                let mut s = 0f32;
                for j in 0..16 {
                    s += (qs[j] & 15) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16];
                }
                if kind == QuantKind::Q4_0 {
                    f16(blk) * (s - 8.0 * sums[b])
                } else {
                    f16(blk) * s + f16(&blk[2..]) * sums[b]
                }
            }
        };
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! AVX2/FMA kernels, chosen at run time.

    use std::arch::x86_64::*;

    use super::{BLOCK, QuantKind};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    pub fn dot(kind: QuantKind, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        debug_assert!(available());
        // SAFETY: callers check `available()` (AVX2, FMA and F16C present) before calling; the
        // kernel only reads within the slices it is given (bounds checked below).
        unsafe { dot_avx2(kind, row, x, sums) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_avx2(kind: QuantKind, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let bb = kind.block_bytes();
        let blocks = row.len() / bb;
        assert!(x.len() >= blocks * BLOCK && sums.len() >= blocks);
        let off = match kind {
            QuantKind::Q8_0 | QuantKind::Q4_0 => 2,
            QuantKind::Q4_1 => 4,
        };
        let mask = _mm_set1_epi8(15);
        // Two accumulators: consecutive blocks do not wait on each other's FMA.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut scalar = 0f32;
        for b in 0..blocks {
            // SAFETY: `b < blocks`, so block `b` (bb bytes) lies in `row`, and its 32 inputs
            // and its sum lie in `x` and `sums` (asserted above); loads are unaligned.
            unsafe {
                let blk = row.as_ptr().add(b * bb);
                let xb = x.as_ptr().add(b * BLOCK);
                let s = match kind {
                    QuantKind::Q8_0 => {
                        let q0 =
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2) as *const __m128i)));
                        let q1 =
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(10) as *const __m128i)));
                        let q2 =
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(18) as *const __m128i)));
                        let q3 =
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(26) as *const __m128i)));
                        let a = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xb), _mm256_mul_ps(q1, _mm256_loadu_ps(xb.add(8))));
                        let c = _mm256_fmadd_ps(
                            q2,
                            _mm256_loadu_ps(xb.add(16)),
                            _mm256_mul_ps(q3, _mm256_loadu_ps(xb.add(24))),
                        );
                        _mm256_add_ps(a, c)
                    }
                    QuantKind::Q4_0 | QuantKind::Q4_1 => {
                        let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                        let l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                        let l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                        let h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                        let h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                        let a = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xb), _mm256_mul_ps(l1, _mm256_loadu_ps(xb.add(8))));
                        let c = _mm256_fmadd_ps(
                            h0,
                            _mm256_loadu_ps(xb.add(16)),
                            _mm256_mul_ps(h1, _mm256_loadu_ps(xb.add(24))),
                        );
                        _mm256_add_ps(a, c)
                    }
                };
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    std::ptr::read_unaligned(blk as *const u16) as i32,
                )));
                acc[b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc[b & 1]);
                match kind {
                    QuantKind::Q8_0 => {}
                    QuantKind::Q4_0 => scalar -= 8.0 * d * *sums.get_unchecked(b),
                    QuantKind::Q4_1 => {
                        let m = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                            blk.add(2) as *const u16
                        ) as i32)));
                        scalar += m * *sums.get_unchecked(b);
                    }
                }
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1])) };
        lanes.iter().sum::<f32>() + scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::QuantKind;

    pub fn available() -> bool {
        false
    }

    pub fn dot(kind: QuantKind, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        super::dot(kind, row, x, sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix of random-looking blocks of `kind`, with sane scales.
    fn matrix(kind: QuantKind, rows: usize, cols: usize) -> QuantMatrix {
        let bb = kind.block_bytes();
        let mut data: Vec<u8> = (0..rows * cols / BLOCK * bb).map(|i| (i * 7919 % 251) as u8).collect();
        for (i, blk) in data.chunks_exact_mut(bb).enumerate() {
            blk[0..2].copy_from_slice(&half::f16::from_f32(0.01 + (i % 7) as f32 * 0.003).to_le_bytes());
            if kind == QuantKind::Q4_1 {
                blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            }
        }
        QuantMatrix::new("m", kind, rows, cols, data).expect("valid")
    }

    #[test]
    fn matmul_equals_dequantized_product() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q4_1] {
            let (rows, cols, n) = (70, 96, 3);
            let m = matrix(kind, rows, cols);
            let w = m.dequantize().expect("dequantizes");
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let y = m.matmul(&x, n);
            for t in 0..n {
                for r in 0..rows {
                    let e: f32 = (0..cols).map(|c| w.data[r * cols + c] * x[t * cols + c]).sum();
                    let a = y[t * rows + r];
                    assert!(
                        (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{kind:?} [{t},{r}]: {a} vs {e}"
                    );
                }
                // A row of a batch is exactly that row alone (batched decode = unbatched).
                let alone = m.matmul(&x[t * cols..(t + 1) * cols], 1);
                assert_eq!(alone, y[t * rows..(t + 1) * rows], "{kind:?} row {t}");
            }
            // The portable kernel agrees with the SIMD one.
            let sums: Vec<f32> = x[..cols].chunks(BLOCK).map(|c| c.iter().sum()).collect();
            let row = &m.data[..m.row_bytes()];
            let (p, s) = (
                dot(kind, row, &x[..cols], &sums),
                simd::dot(kind, row, &x[..cols], &sums),
            );
            assert!((p - s).abs() <= 1e-4 * p.abs().max(1.0));
        }
    }

    #[test]
    fn gpu_parts_unpack_to_the_dequantized_matrix() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q4_1] {
            let q = matrix(kind, 3, 64);
            let dense = q.dequantize().expect("dequantizes");
            let (words, scales, mins) = q.gpu_parts();
            let per_word = if kind == QuantKind::Q8_0 { 4 } else { 8 };
            for (i, &want) in dense.data.iter().enumerate() {
                let (word, e, b) = (words[i / per_word], (i % per_word) as u32, i / BLOCK);
                // The kernels' expansion (cube.rs).
                let got = match kind {
                    QuantKind::Q8_0 => ((word << (24 - 8 * e)) >> 24) as f32 * scales[b],
                    QuantKind::Q4_0 => (((word >> (4 * e)) & 15) as f32 - 8.0) * scales[b],
                    QuantKind::Q4_1 => {
                        ((word >> (4 * e)) & 15) as f32 * scales[b] + mins.as_ref().expect("Q4_1 mins")[b]
                    }
                };
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{kind:?} {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn quantize_round_trips_within_a_step() {
        let (rows, cols) = (3, 64);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let dense = HostTensor::new(vec![rows, cols], data.clone());
        for (kind, levels) in [
            (QuantKind::Q8_0, 254.0),
            (QuantKind::Q4_0, 15.0),
            (QuantKind::Q4_1, 15.0),
        ] {
            let q = QuantMatrix::quantize("w", kind, &dense).expect("quantizes");
            let back = q.dequantize().expect("dequantizes");
            for (blk, bblk) in data.chunks(BLOCK).zip(back.data.chunks(BLOCK)) {
                let range = blk.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                for (a, b) in blk.iter().zip(bblk) {
                    assert!((a - b).abs() <= range / levels, "{kind:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn rows_permute_and_concatenate() {
        let a = matrix(QuantKind::Q4_1, 4, 64);
        let b = matrix(QuantKind::Q4_1, 2, 64);
        let ab = QuantMatrix::concat_rows(&[&a, &b]).expect("same kind");
        assert_eq!(ab.shape(), [6, 64]);
        let p = ab.permute_rows(&[5, 0]);
        let (dp, dab) = (p.dequantize().expect("ok"), ab.dequantize().expect("ok"));
        assert_eq!(&dp.data[..64], &dab.data[5 * 64..6 * 64]);
        assert_eq!(&dp.data[64..], &dab.data[..64]);
        assert!(QuantMatrix::concat_rows(&[&a, &matrix(QuantKind::Q8_0, 1, 64)]).is_none());
        assert!(QuantMatrix::new("bad", QuantKind::Q4_0, 2, 48, vec![0; 36]).is_err());
    }
}

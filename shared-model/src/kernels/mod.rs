//! Fast paths for GPU backends, used by the layers where burn's generic ops leave memory
//! bandwidth unused. Each returns `None` when it does not apply (another backend, a shape it
//! does not handle), and the caller falls back to burn's ops: one model code for every backend.

use burn::prelude::*;
use burn::tensor::DType;

use crate::quant::{QuantKind, QuantMatrix};

#[cfg(feature = "cuda")]
mod cube;
#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cuda")]
mod cuda;
mod strides;

/// `COROLLA_KERNELS=off` turns every fast path off (to measure what they bring, or to rule
/// them out when a result looks wrong); `COROLLA_KERNELS=-rope,-attention` turns off the named
/// ones (`matvec`, `quant`, `norm`, `rope`, `attention`, `gemm`, `softmax`, `silu`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn enabled_for(name: &str) -> bool {
    static SETTING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match SETTING.get_or_init(|| std::env::var("COROLLA_KERNELS").ok()) {
        None => true,
        Some(v) if v == "off" => false,
        Some(v) => !v.split(',').any(|item| item.trim().strip_prefix('-') == Some(name)),
    }
}

/// `x W^T` for one input row and a weight in PyTorch layout `[out, in]`, as a matrix-vector
/// kernel (one GPU warp per output, reading each weight row once with vector loads).
///
/// burn's default matmul (tensor-core tiles, no split of `in`) reads a decode step's weights
/// at a fraction of the memory bandwidth; batch-1 decode is nothing but these products.
///
/// # Shapes
/// - `x`: `[1, in]`; `w`: `[out, in]`
/// - returns `[1, out]`
pub fn matvec<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("matvec") {
            return None;
        }
        cuda::matvec(x, w, MATVEC_ROWS_PER_WARP)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        None
    }
}

/// `a b` through cuBLAS (CUDA), for products of at least [`GEMM_MIN_ROWS`] rows: prefill's
/// projections and the attention of a prompt, where burn's matmul runs at a fraction of the
/// tensor cores' rate. The operands are read in place, whatever their strides (a transposed
/// weight, a view into the KV cache), when cuBLAS can express them.
///
/// # Shapes
/// - `a`: `[..., m, k]`; `b`: `[..., k, n]` (batch dimensions equal, or 1 to broadcast)
/// - returns `[..., m, n]`
pub fn matmul<B: Backend, const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    #[cfg(feature = "cuda")]
    {
        let dims = a.dims();
        let rows: usize = dims[..D - 1].iter().product();
        if !enabled_for("gemm") || rows < GEMM_MIN_ROWS {
            return None;
        }
        cuda::matmul(a, b)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (a, b);
        None
    }
}

/// Below this many rows of `a` a product stays in burn's queue: the two waits around a cuBLAS
/// call (~40 us) cost more than they save on a few rows.
pub const GEMM_MIN_ROWS: usize = 16;

/// `softmax(scores * scale + mask)` over the last axis, in one pass over the scores (burn's ops
/// take six launches and as many trips through a prompt's `heads x tokens^2` scores).
/// `causal_past: Some(past)` says the mask is plain causal after `past` cached keys: the keys
/// it hides are skipped, not read (their weights are written as 0, as the mask makes them).
///
/// # Shapes
/// - `scores`: `[batch, kv_heads, group, new, total]`; `mask`: `[batch, 1, 1, new, total]`
/// - returns `[batch, kv_heads, group, new, total]`
pub fn masked_softmax<B: Backend>(
    scores: &Tensor<B, 5>,
    mask: &Tensor<B, 5>,
    scale: f64,
    causal_past: Option<usize>,
) -> Option<Tensor<B, 5>> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("softmax") {
            return None;
        }
        cuda::masked_softmax(scores, mask, scale, causal_past)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (scores, mask, scale, causal_past);
        None
    }
}

/// `silu(gate) * up` from the fused `[gate | up]` projection, in one kernel (burn's ops take
/// four, each reading the strided halves).
///
/// # Shapes
/// - `gate_up`: `[tokens, 2 inter]`
/// - returns `[tokens, inter]`
pub fn gated_silu<B: Backend>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("silu") {
            return None;
        }
        cuda::gated_silu(gate_up)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gate_up;
        None
    }
}

/// Output rows per warp of the matrix-vector kernel.
#[cfg(feature = "cuda")]
const MATVEC_ROWS_PER_WARP: usize = 2;

/// The matrix-vector kernel with a chosen number of rows a warp, for
/// `examples/kernel_bench.rs`: not an API.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn matvec_rows_per_warp<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, per_warp: usize) -> Option<Tensor<B, 2>> {
    cuda::matvec(x, w, per_warp)
}

/// Total memory of the GPU behind `device`, when the backend can tell (CUDA); `None` elsewhere.
pub fn gpu_memory_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        cuda::memory_bytes::<B>(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Bytes of GPU memory this process has not taken yet (the device's memory less what burn's
/// allocator holds; other processes' use is not seen), for CUDA devices; `None` otherwise.
pub fn gpu_free_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        cuda::free_bytes::<B>(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Keeps compiled GPU kernels (PTX) in `dir`, so a restarted process skips most of the JIT
/// compilation. Call before the first tensor; does nothing without CUDA, or when cubecl was
/// already configured (a `cubecl.toml`, an earlier call).
pub fn cache_compiled_kernels(dir: &std::path::Path) {
    #[cfg(feature = "cuda")]
    cuda::cache_compiled_kernels(dir);
    #[cfg(not(feature = "cuda"))]
    let _ = dir;
}

/// RMSNorm in one kernel (burn's ops take six launches: square, mean, add, sqrt, div, mul).
///
/// # Shapes
/// - `x`: `[batch, seq, hidden]`; `weight`: `[hidden]`
/// - returns `[batch, seq, hidden]`
pub fn rms_norm<B: Backend>(x: &Tensor<B, 3>, weight: &Tensor<B, 1>, eps: f64) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("norm") {
            return None;
        }
        cuda::rms_norm(x, weight, eps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, weight, eps);
        None
    }
}

/// The residual sum `x + delta` and its RMSNorm in one kernel (one launch fewer a block than
/// the add and the norm apart; decode at batch 1 is bound by launches).
///
/// # Shapes
/// - `x`, `delta`: `[batch, seq, hidden]`; `weight`: `[hidden]`
/// - returns `x + delta` and its norm, both `[batch, seq, hidden]`
pub fn add_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    delta: &Tensor<B, 3>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("norm") {
            return None;
        }
        cuda::add_rms_norm(x, delta, weight, eps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, delta, weight, eps);
        None
    }
}

/// Splits a fused q|k|v projection into heads and applies rotate-half RoPE (over the whole
/// head) to q and k, in one kernel.
///
/// # Shapes
/// - `qkv`: `[batch, seq, (heads + 2 kv_heads) * head_dim]`
/// - `cos`, `sin`: `[batch, seq, 1, head_dim / 2]`
/// - returns q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`
#[allow(clippy::type_complexity)]
pub fn rope_split<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("rope") {
            return None;
        }
        cuda::rope_split(qkv, cos, sin, heads, kv_heads, head_dim)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, cos, sin, heads, kv_heads, head_dim);
        None
    }
}

/// Attention of one new token (batch 1, every cached key visible, no ALiBi) in one kernel.
///
/// # Shapes
/// - `q`: `[1, 1, heads, head_dim]`; `k`, `v`: `[1, kv_heads, keys, head_dim]`
/// - returns `[1, 1, heads * head_dim]`
pub fn decode_attention<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cuda")]
    {
        if !enabled_for("attention") {
            return None;
        }
        cuda::decode_attention(q, k, v)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v);
        None
    }
}

/// Quantized projection weights kept quantized in GPU memory (GGUF Q8_0/Q4_0/Q4_1 blocks,
/// repacked as [`QuantMatrix::gpu_parts`] says): a one-row product expands the blocks inside a
/// matrix-vector kernel; products of more rows dequantize on the GPU first.
#[derive(Debug, Clone)]
pub struct GpuQuant<B: Backend> {
    words: Tensor<B, 2, Int>,
    /// f32 `[rows, cols / 32]`, whatever the model's float type.
    scales: Tensor<B, 2>,
    /// Q4_1's minimums, like `scales`.
    mins: Option<Tensor<B, 2>>,
    kind: QuantKind,
    rows: usize,
    cols: usize,
}

impl<B: Backend> GpuQuant<B> {
    /// `None` where no kernel runs the format (every backend but CUDA).
    pub fn new(q: &QuantMatrix, device: &B::Device) -> Option<Self> {
        if !cfg!(feature = "cuda") || !enabled_for("quant") || !gpu_backend::<B>() {
            return None;
        }
        let [rows, cols] = q.shape();
        let (words, scales, mins) = q.gpu_parts();
        let per_row = words.len() / rows;
        let f32_matrix =
            |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [rows, cols / 32]), (device, DType::F32));
        Some(Self {
            words: Tensor::from_data(TensorData::new(words, [rows, per_row]), device),
            scales: f32_matrix(scales),
            mins: mins.map(f32_matrix),
            kind: q.kind(),
            rows,
            cols,
        })
    }

    /// The dense `[rows, cols]` matrix, in the device's float type; `None` only if the GPU
    /// refused the kernel.
    pub fn dense(&self) -> Option<Tensor<B, 2>> {
        let dtype: DType = burn::tensor::get_device_settings::<B>(&self.scales.device())
            .float_dtype
            .into();
        #[cfg(feature = "cuda")]
        {
            let kind = self.kind_code();
            let mins = self.mins.as_ref().unwrap_or(&self.scales);
            cuda::dequantize(&self.words, &self.scales, mins, kind, [self.rows, self.cols], dtype)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dtype;
            unreachable!("GpuQuant is only built on CUDA")
        }
    }

    #[cfg(feature = "cuda")]
    fn kind_code(&self) -> u32 {
        match self.kind {
            QuantKind::Q8_0 => 0,
            QuantKind::Q4_0 => 1,
            QuantKind::Q4_1 => 2,
        }
    }

    /// `x W^T`.
    ///
    /// # Shapes
    /// - `x`: `[tokens, cols]`
    /// - returns `[tokens, rows]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        #[cfg(feature = "cuda")]
        {
            let kind = self.kind_code();
            let mins = self.mins.as_ref().unwrap_or(&self.scales);
            if x.dims()[0] == 1
                && let Some(y) = cuda::quant_matvec(&x, &self.words, &self.scales, mins, kind, self.rows)
            {
                return y;
            }
            match self.dense() {
                Some(w) => {
                    let w = w.transpose();
                    matmul(&x, &w).unwrap_or_else(|| x.matmul(w))
                }
                // Only if a launch was refused: nothing else can multiply these weights.
                None => panic!("the GPU refused the dequantization kernel"),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (&self.words, &self.scales, &self.mins, self.kind, self.rows, self.cols);
            unreachable!("GpuQuant is only built on CUDA: {:?}", x.dims())
        }
    }
}

fn gpu_backend<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::is_cuda::<B>()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

//! burn-cuda fast paths: the tensors are burn's own `CubeTensor`s, reached by a type check on
//! the backend (generic code cannot name the CUDA backend's tensor type otherwise).

use std::any::{Any, TypeId};

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

type Cuda = burn::backend::Cuda;

fn to_cube<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<CubeTensor<CudaRuntime>> {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    boxed.downcast::<CubeTensor<CudaRuntime>>().ok().map(|b| *b)
}

fn from_cube<B: Backend, const D: usize>(t: CubeTensor<CudaRuntime>) -> Option<Tensor<B, D>> {
    let boxed: Box<dyn Any> = Box::new(t);
    let primitive = *boxed.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
}

pub(super) fn is_cuda<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Cuda>()
}

/// `x W^T` by the row kernel, `per_warp` output rows a warp.
pub(super) fn matvec<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, per_warp: usize) -> Option<Tensor<B, 2>> {
    let ([m, k], [n, kw]) = (x.dims(), w.dims());
    if !is_cuda::<B>() || m != 1 || k != kw || k % 8 != 0 || n % per_warp != 0 {
        return None;
    }
    let x = into_contiguous(to_cube(x.clone())?);
    let w = to_cube(w.clone())?;
    if x.dtype != w.dtype
        || x.qparams.is_some()
        || w.qparams.is_some()
        || !w.is_contiguous()
        || !vector_aligned(&x)
        || !vector_aligned(&w)
    {
        return None;
    }
    let (dtype, client) = (x.dtype, x.client.clone());
    let out = empty_device_contiguous_dtype(client.clone(), x.device.clone(), [1, n].into(), dtype);
    let rows_per_cube = per_warp * WARPS;
    super::cube::matvec_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(n.div_ceil(rows_per_cube) as u32, 1, 1),
        CubeDim::new_2d(32, WARPS as u32),
        w.into_tensor_arg(),
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        n as u32,
        (k / 8) as u32,
        per_warp as u32,
        dtype.into(),
    );
    from_cube(out)
}

/// Warps per cube of the row kernels.
const WARPS: usize = 8;

/// Whether the kernels' 8-element vector loads of `t` are aligned (a view into the middle of a
/// buffer need not be).
fn vector_aligned(t: &CubeTensor<CudaRuntime>) -> bool {
    t.meta
        .shape()
        .iter()
        .last()
        .is_some_and(|&d| vector_width(d, &[t]) == 8)
}

/// The widest vector (8, 4, 2 or 1 elements: 16-byte loads in half precision) that rows of
/// `len` elements split into and that every tensor's start is aligned to.
fn vector_width(len: usize, tensors: &[&CubeTensor<CudaRuntime>]) -> usize {
    [8usize, 4, 2]
        .into_iter()
        .find(|&w| {
            len.is_multiple_of(w)
                && tensors
                    .iter()
                    .all(|t| t.handle.offset_start.unwrap_or(0) % (w * t.dtype.size()) as u64 == 0)
        })
        .unwrap_or(1)
}

pub(super) fn memory_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    let device = (device as &dyn Any).downcast_ref::<burn_cubecl::cubecl::cuda::CudaDevice>()?;
    let client = <CudaRuntime as burn_cubecl::cubecl::Runtime>::client(device);
    // cubecl-cuda sets its largest memory page to a quarter of cuDeviceTotalMem.
    Some(client.properties().memory.max_page_size * 4)
}

pub(super) fn free_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    let total = memory_bytes::<B>(device)?;
    let device = (device as &dyn Any).downcast_ref::<burn_cubecl::cubecl::cuda::CudaDevice>()?;
    let client = <CudaRuntime as burn_cubecl::cubecl::Runtime>::client(device);
    let usage = client.memory_usage().ok()?;
    Some(total.saturating_sub(usage.bytes_reserved))
}

pub(super) fn cache_compiled_kernels(dir: &std::path::Path) {
    use burn_cubecl::cubecl::config::cache::CacheConfig;
    use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
        // Autotune results too (cubecl's default is a `target` folder beside the binary).
        config.autotune.cache = CacheConfig::File(dir.join("autotune"));
    }
    CubeClRuntimeConfig::set(config);
}

use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;

/// Threads of the row kernels: 8 warps.
const ROW_THREADS: u32 = 256;

/// # Shapes
/// - `x`: `[batch, seq, hidden]`; `w`: `[hidden]`
pub(super) fn rms_norm<B: Backend>(x: &Tensor<B, 3>, w: &Tensor<B, 1>, eps: f64) -> Option<Tensor<B, 3>> {
    if !is_cuda::<B>() {
        return None;
    }
    let [b, t, d] = x.dims();
    let input = into_contiguous(to_cube(x.clone())?);
    let weight = into_contiguous(to_cube(w.clone())?);
    if input.dtype != weight.dtype || weight.meta.shape()[0] != d {
        return None;
    }
    let (dtype, client) = (input.dtype, input.client.clone());
    let out = empty_device_contiguous_dtype(client.clone(), input.device.clone(), [b, t, d].into(), dtype);
    let width = vector_width(d, &[&input, &weight]);
    super::cube::rms_norm_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static((b * t) as u32, 1, 1),
        CubeDim::new_1d(ROW_THREADS),
        width,
        input.into_tensor_arg(),
        weight.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps as f32,
        dtype.into(),
    );
    from_cube(out)
}

/// # Shapes
/// - `x`, `delta`: `[batch, seq, hidden]`; `w`: `[hidden]`
/// - returns `x + delta` and its norm, both `[batch, seq, hidden]`
pub(super) fn add_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    delta: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
    let [b, t, d] = x.dims();
    if !is_cuda::<B>() || delta.dims() != [b, t, d] || b * t == 0 || b * t > i32::MAX as usize {
        return None;
    }
    let x = into_contiguous(to_cube(x.clone())?);
    let delta = into_contiguous(to_cube(delta.clone())?);
    let weight = into_contiguous(to_cube(w.clone())?);
    if x.dtype != delta.dtype || x.dtype != weight.dtype || weight.meta.shape()[0] != d {
        return None;
    }
    let (dtype, client, device) = (x.dtype, x.client.clone(), x.device.clone());
    let sum = empty_device_contiguous_dtype(client.clone(), device.clone(), [b, t, d].into(), dtype);
    let out = empty_device_contiguous_dtype(client.clone(), device, [b, t, d].into(), dtype);
    let width = vector_width(d, &[&x, &delta, &weight]);
    super::cube::add_rms_norm_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static((b * t) as u32, 1, 1),
        CubeDim::new_1d(ROW_THREADS),
        width,
        x.into_tensor_arg(),
        delta.into_tensor_arg(),
        weight.into_tensor_arg(),
        sum.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps as f32,
        dtype.into(),
    );
    Some((from_cube(sum)?, from_cube(out)?))
}

/// A KV cache view `[1, kv_heads, keys, head_dim]` as the kernel reads it, and the positions
/// each KV head's rows are apart: a view into the cache's longer buffers (rows of `head_dim`
/// contiguous, heads `capacity` rows apart) as it is, anything else copied contiguous.
fn cache_rows(t: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, usize) {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let hd = shape[3];
    if strides[3] == 1 && strides[2] == hd && strides[1] % hd == 0 && strides[1] / hd >= shape[2] {
        let rows = strides[1] / hd;
        return (t, rows);
    }
    let t = into_contiguous(t);
    let rows = t.meta.shape()[2];
    (t, rows)
}

/// Split decode attention (`attention_partial_kernel` + `attention_combine_kernel`).
///
/// # Shapes
/// - `q`: `[1, 1, heads, head_dim]`; `k`, `v`: `[1, kv_heads, keys, head_dim]`
/// - returns `[1, 1, heads * head_dim]`
pub(super) fn decode_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) -> Option<Tensor<B, 3>> {
    use super::cube::ATTENTION_CHUNK;
    let ([b, t, nh, hd], [bk, nkv, keys, hdk]) = (q.dims(), k.dims());
    let threads = ATTENTION_CHUNK as usize;
    if !is_cuda::<B>()
        || b != 1
        || t != 1
        || bk != 1
        || hd != hdk
        || nh % nkv != 0
        || keys == 0
        || hd % 8 != 0
        || hd > threads
        || threads % (hd / 8) != 0
        || v.dims() != k.dims()
    {
        return None;
    }
    let q = into_contiguous(to_cube(q.clone())?);
    let (k, k_rows) = cache_rows(to_cube(k.clone())?);
    let (v, v_rows) = cache_rows(to_cube(v.clone())?);
    if q.dtype != k.dtype
        || k.dtype != v.dtype
        || k_rows != v_rows
        || !vector_aligned(&q)
        || !vector_aligned(&k)
        || !vector_aligned(&v)
    {
        return None;
    }
    let (dtype, client) = (q.dtype, q.client.clone());
    let chunks = keys.div_ceil(threads);
    let partial = empty_device_contiguous_dtype(
        client.clone(),
        q.device.clone(),
        [nh, chunks, hd + 2].into(),
        burn::tensor::DType::F32,
    );
    super::cube::attention_partial_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(nh as u32, chunks as u32, 1),
        CubeDim::new_1d(ATTENTION_CHUNK),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        keys as u32,
        k_rows as u32,
        (nh / nkv) as u32,
        1.0 / (hd as f32).sqrt(),
        hd as u32,
        dtype.into(),
    );
    let out = empty_device_contiguous_dtype(client.clone(), partial.device.clone(), [1, 1, nh * hd].into(), dtype);
    super::cube::attention_combine_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(nh as u32, 1, 1),
        CubeDim::new_1d(hd as u32),
        partial.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        chunks as u32,
        hd as u32,
        dtype.into(),
    );
    from_cube(out)
}

fn int_to_cube<B: Backend>(t: Tensor<B, 2, Int>) -> Option<CubeTensor<CudaRuntime>> {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive());
    boxed.downcast::<CubeTensor<CudaRuntime>>().ok().map(|b| *b)
}

/// # Shapes
/// - returns `shape` (`[rows, cols]`) in `dtype`
pub(super) fn dequantize<B: Backend>(
    words: &Tensor<B, 2, Int>,
    scales: &Tensor<B, 2>,
    mins: &Tensor<B, 2>,
    kind: u32,
    shape: [usize; 2],
    dtype: burn::tensor::DType,
) -> Option<Tensor<B, 2>> {
    let words = int_to_cube(words.clone())?;
    let scales = to_cube(scales.clone())?;
    let mins = to_cube(mins.clone())?;
    let client = words.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), words.device.clone(), shape.into(), dtype);
    let n = shape[0] * shape[1];
    let cube_dim = CubeDim::new_1d(ROW_THREADS);
    super::cube::dequantize_kernel::launch::<CudaRuntime>(
        &client,
        burn_cubecl::cubecl::calculate_cube_count_elemwise(&client, n, cube_dim),
        cube_dim,
        words.into_tensor_arg(),
        scales.into_tensor_arg(),
        mins.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        kind,
        dtype.into(),
    );
    from_cube(out)
}

/// # Shapes
/// - `x`: `[1, cols]`; `words`, `scales`, `mins` as `GpuQuant` holds them
/// - returns `[1, rows]`
pub(super) fn quant_matvec<B: Backend>(
    x: &Tensor<B, 2>,
    words: &Tensor<B, 2, Int>,
    scales: &Tensor<B, 2>,
    mins: &Tensor<B, 2>,
    kind: u32,
    rows: usize,
) -> Option<Tensor<B, 2>> {
    if !is_cuda::<B>() {
        return None;
    }
    let cols = x.dims()[1];
    let x = into_contiguous(to_cube(x.clone())?);
    let words = int_to_cube(words.clone())?;
    let scales = to_cube(scales.clone())?;
    let mins = to_cube(mins.clone())?;
    if cols % 32 != 0
        || !vector_aligned(&x)
        || !words.is_contiguous()
        || words.handle.offset_start.unwrap_or(0) % 16 != 0
    {
        return None;
    }
    let (dtype, client) = (x.dtype, x.client.clone());
    let out = empty_device_contiguous_dtype(client.clone(), x.device.clone(), [1, rows].into(), dtype);
    super::cube::quant_matvec_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(rows.div_ceil(WARPS) as u32, 1, 1),
        CubeDim::new_2d(32, WARPS as u32),
        x.into_tensor_arg(),
        words.into_tensor_arg(),
        scales.into_tensor_arg(),
        mins.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        (cols / 32) as u32,
        kind,
        dtype.into(),
    );
    from_cube(out)
}

/// # Shapes
/// - `qkv`: `[batch, seq, (heads + 2 kv_heads) * head_dim]`; `cos`, `sin`: `[batch, seq, 1, head_dim / 2]`
/// - returns q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`
#[allow(clippy::type_complexity)]
pub(super) fn rope_split<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let [b, t, width] = qkv.dims();
    let half = head_dim / 2;
    if !is_cuda::<B>()
        || head_dim % 2 != 0
        || head_dim > 2 * ROW_THREADS as usize
        || width != (heads + 2 * kv_heads) * head_dim
        || cos.dims() != [b, t, 1, half]
        || sin.dims() != [b, t, 1, half]
        || (b * t)
            .checked_mul(heads + 2 * kv_heads)
            .is_none_or(|c| c > u32::MAX as usize)
    {
        return None;
    }
    let qkv = into_contiguous(to_cube(qkv.clone())?);
    let cos = into_contiguous(to_cube(cos.clone())?);
    let sin = into_contiguous(to_cube(sin.clone())?);
    if qkv.dtype != cos.dtype || cos.dtype != sin.dtype {
        return None;
    }
    let (dtype, client, device) = (qkv.dtype, qkv.client.clone(), qkv.device.clone());
    let q = empty_device_contiguous_dtype(client.clone(), device.clone(), [b, t, heads, head_dim].into(), dtype);
    let k = empty_device_contiguous_dtype(client.clone(), device.clone(), [b, t, kv_heads, head_dim].into(), dtype);
    let v = empty_device_contiguous_dtype(client.clone(), device, [b, t, kv_heads, head_dim].into(), dtype);
    super::cube::rope_split_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static((b * t * (heads + 2 * kv_heads)) as u32, 1, 1),
        CubeDim::new_1d(half as u32),
        qkv.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        dtype.into(),
    );
    Some((from_cube(q)?, from_cube(k)?, from_cube(v)?))
}

/// # Shapes
/// - `a`: `[..., m, k]`; `b`: `[..., k, n]`
/// - returns `[..., m, n]`
pub(super) fn matmul<B: Backend, const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if !is_cuda::<B>() {
        return None;
    }
    from_cube(super::cublas::matmul(to_cube(a.clone())?, to_cube(b.clone())?)?)
}

/// # Shapes
/// - `scores`: `[batch, kv_heads, group, new, total]`; `mask`: `[batch, 1, 1, new, total]`
/// - returns `[batch, kv_heads, group, new, total]`
pub(super) fn masked_softmax<B: Backend>(
    scores: &Tensor<B, 5>,
    mask: &Tensor<B, 5>,
    scale: f64,
    causal_past: Option<usize>,
) -> Option<Tensor<B, 5>> {
    let [b, nkv, group, new, total] = scores.dims();
    let rows = b * nkv * group * new;
    // Keys query 0 sees (0: every key, the mask alone decides).
    let visible_from = match causal_past {
        Some(past) if past + new == total => past + 1,
        Some(_) => return None,
        None => 0,
    };
    if !is_cuda::<B>()
        || mask.dims() != [b, 1, 1, new, total]
        || rows == 0
        || rows > i32::MAX as usize
        || total > u32::MAX as usize
    {
        return None;
    }
    let scores = into_contiguous(to_cube(scores.clone())?);
    let mask = into_contiguous(to_cube(mask.clone())?);
    if scores.dtype != mask.dtype {
        return None;
    }
    let (dtype, client) = (scores.dtype, scores.client.clone());
    let out = empty_device_contiguous_dtype(
        client.clone(),
        scores.device.clone(),
        [b, nkv, group, new, total].into(),
        dtype,
    );
    let width = vector_width(total, &[&scores, &mask]);
    super::cube::masked_softmax_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(ROW_THREADS),
        width,
        scores.into_tensor_arg(),
        mask.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        total as u32,
        new as u32,
        (nkv * group) as u32,
        visible_from as u32,
        scale as f32,
        dtype.into(),
    );
    from_cube(out)
}

/// # Shapes
/// - `gate_up`: `[tokens, 2 inter]`
/// - returns `[tokens, inter]`
pub(super) fn gated_silu<B: Backend>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [tokens, width] = gate_up.dims();
    if !is_cuda::<B>() || width % 2 != 0 || tokens * width == 0 || tokens * width > u32::MAX as usize {
        return None;
    }
    let gate_up = into_contiguous(to_cube(gate_up.clone())?);
    let (dtype, client) = (gate_up.dtype, gate_up.client.clone());
    let out = empty_device_contiguous_dtype(
        client.clone(),
        gate_up.device.clone(),
        [tokens, width / 2].into(),
        dtype,
    );
    let cube_dim = CubeDim::new_1d(ROW_THREADS);
    super::cube::gated_silu_kernel::launch::<CudaRuntime>(
        &client,
        burn_cubecl::cubecl::calculate_cube_count_elemwise(&client, tokens * width / 2, cube_dim),
        cube_dim,
        gate_up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (width / 2) as u32,
        dtype.into(),
    );
    from_cube(out)
}

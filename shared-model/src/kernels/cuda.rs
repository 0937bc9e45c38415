//! burn-cuda fast paths: the tensors are burn's own `CubeTensor`s, reached by a type check on
//! the backend (generic code cannot name the CUDA backend's tensor type otherwise).

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{Strategy, launch_ref};
use cubek::std::InputBinding;

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

/// Set once a kernel refused a launch: warn once, then stop trying.
static MATVEC_FAILED: AtomicBool = AtomicBool::new(false);

pub(super) fn matvec<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let ([m, k], [n, kw]) = (x.dims(), w.dims());
    if !is_cuda::<B>() || m != 1 || k != kw || k % 32 != 0 || MATVEC_FAILED.load(Ordering::Relaxed) {
        return None;
    }
    let x = burn_cubecl::kernel::into_contiguous(to_cube(x.clone())?);
    // `[in, out]` with `in` contiguous: the column-major right-hand side the kernel wants.
    let rhs = to_cube(w.clone().transpose())?;
    if x.dtype != rhs.dtype || x.qparams.is_some() || rhs.qparams.is_some() {
        return None;
    }
    let dtype = x.dtype;
    let client = x.client.clone();
    let out = empty_device_dtype(client.clone(), x.device.clone(), [1, n].into(), dtype);
    let mut elems = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: dtype.into(),
        out: dtype.into(),
    });
    let launched = launch_ref(
        &Strategy::GemvPlaneParallel(Default::default()),
        &client,
        InputBinding::new(x.binding(), dtype.into()),
        InputBinding::new(rhs.binding(), dtype.into()),
        out.clone().binding(),
        &mut elems,
    );
    if let Err(e) = launched {
        MATVEC_FAILED.store(true, Ordering::Relaxed);
        tracing::warn!(error = ?e, n, k, "matrix-vector kernel refused; using burn's matmul");
        return None;
    }
    from_cube(out)
}

pub(super) fn memory_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    let device = (device as &dyn Any).downcast_ref::<burn_cubecl::cubecl::cuda::CudaDevice>()?;
    let client = <CudaRuntime as burn_cubecl::cubecl::Runtime>::client(device);
    // cubecl-cuda sets its largest memory page to a quarter of cuDeviceTotalMem.
    Some(client.properties().memory.max_page_size * 4)
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
    let out = empty_device_dtype(client.clone(), input.device.clone(), [b, t, d].into(), dtype);
    super::cube::rms_norm_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static((b * t) as u32, 1, 1),
        CubeDim::new_1d(ROW_THREADS),
        input.into_tensor_arg(),
        weight.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps as f32,
        dtype.into(),
    );
    from_cube(out)
}

/// Longest cache the decode-attention kernel keeps its scores for (f32 in shared memory).
const MAX_KEYS: usize = 8192;

/// # Shapes
/// - `q`: `[1, 1, heads, head_dim]`; `k`, `v`: `[1, kv_heads, keys, head_dim]`
/// - returns `[1, 1, heads * head_dim]`
pub(super) fn decode_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) -> Option<Tensor<B, 3>> {
    let ([b, t, nh, hd], [bk, nkv, keys, hdk]) = (q.dims(), k.dims());
    if !is_cuda::<B>()
        || b != 1
        || t != 1
        || bk != 1
        || hd != hdk
        || nh % nkv != 0
        || keys == 0
        || keys > MAX_KEYS
        || hd > ROW_THREADS as usize
        || v.dims() != k.dims()
    {
        return None;
    }
    let q = into_contiguous(to_cube(q.clone())?);
    let k = into_contiguous(to_cube(k.clone())?);
    let v = into_contiguous(to_cube(v.clone())?);
    if q.dtype != k.dtype || k.dtype != v.dtype {
        return None;
    }
    let (dtype, client) = (q.dtype, q.client.clone());
    let out = empty_device_dtype(client.clone(), q.device.clone(), [1, 1, nh * hd].into(), dtype);
    super::cube::decode_attention_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(nh as u32, 1, 1),
        CubeDim::new_1d(ROW_THREADS),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        keys as u32,
        (nh / nkv) as u32,
        1.0 / (hd as f32).sqrt(),
        hd as u32,
        MAX_KEYS as u32,
        dtype.into(),
    );
    from_cube(out)
}

fn int_to_cube<B: Backend>(t: Tensor<B, 2, Int>) -> Option<CubeTensor<CudaRuntime>> {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive());
    boxed.downcast::<CubeTensor<CudaRuntime>>().ok().map(|b| *b)
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
    let x = into_contiguous(to_cube(x.clone())?);
    let words = int_to_cube(words.clone())?;
    let scales = to_cube(scales.clone())?;
    let mins = to_cube(mins.clone())?;
    let (dtype, client) = (x.dtype, x.client.clone());
    let out = empty_device_dtype(client.clone(), x.device.clone(), [1, rows].into(), dtype);
    let rows_per_cube = 8;
    super::cube::quant_matvec_kernel::launch::<CudaRuntime>(
        &client,
        CubeCount::Static(rows.div_ceil(rows_per_cube) as u32, 1, 1),
        CubeDim::new_2d(32, rows_per_cube as u32),
        x.into_tensor_arg(),
        words.into_tensor_arg(),
        scales.into_tensor_arg(),
        mins.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        kind,
        dtype.into(),
    );
    from_cube(out)
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
    let out = empty_device_dtype(client.clone(), words.device.clone(), shape.into(), dtype);
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

//! Products of many rows (prefill, the attention of a prompt) through cuBLAS: burn's CubeCL
//! matmul runs a 4096^3 bf16 product at ~180 TFLOP/s after tens of seconds of autotuning, where
//! cuBLAS reaches ~790 at once. cuBLAS is loaded at run time (cudarc's dynamic loading); where
//! it is missing, the caller falls back to burn's matmul.
//!
//! cuBLAS reads burn's buffers in place: the operands' strides (a transposed weight, a view into
//! the KV cache) become cuBLAS's transpose flags and leading dimensions. It runs on its own
//! stream, after a wait for burn's queue, and is waited for before the result is handed back,
//! so burn's later kernels see it written.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::driver::{CudaContext, CudaStream};

use super::strides::{Layout, batch_stride, layout};

/// One cuBLAS handle and stream per GPU, behind a lock: a handle is not to be used from two
/// threads at once.
struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// `None` for a GPU where cuBLAS could not be set up (reported once).
fn gpu(index: usize) -> Option<&'static Mutex<Gpu>> {
    type Registry = Mutex<HashMap<usize, Option<&'static Mutex<Gpu>>>>;
    static GPUS: OnceLock<Registry> = OnceLock::new();
    let mut gpus = GPUS.get_or_init(Default::default).lock().ok()?;
    *gpus.entry(index).or_insert_with(|| match open(index) {
        Ok(gpu) => Some(Box::leak(Box::new(Mutex::new(gpu)))),
        Err(why) => {
            tracing::warn!(gpu = index, %why, "cuBLAS unavailable: products of many rows use burn's matmul");
            None
        }
    })
}

fn open(index: usize) -> Result<Gpu, String> {
    // SAFETY: only looks the library up.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublas not found (set LD_LIBRARY_PATH to the CUDA libraries)".into());
    }
    let ctx = CudaContext::new(index).map_err(|e| format!("CUDA context: {e:?}"))?;
    let stream = ctx.new_stream().map_err(|e| format!("CUDA stream: {e:?}"))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS handle: {e:?}"))?;
    Ok(Gpu { stream, blas })
}

/// `a b` over the last two dimensions, batch dimensions broadcast as burn's matmul does.
///
/// # Shapes
/// - `a`: `[..., m, k]`; `b`: `[..., k, n]` (batch dimensions equal or 1)
/// - returns `[..., m, n]`, contiguous
pub(super) fn matmul(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>) -> Option<CubeTensor<CudaRuntime>> {
    let (sa, sb) = (a.meta.shape().to_vec(), b.meta.shape().to_vec());
    let rank = sa.len();
    if rank < 2 || sb.len() != rank || a.dtype != b.dtype || a.qparams.is_some() || b.qparams.is_some() {
        return None;
    }
    let (ta, tb) = (a.meta.strides().to_vec(), b.meta.strides().to_vec());
    let (m, k, n) = (sa[rank - 2], sa[rank - 1], sb[rank - 1]);
    if sb[rank - 2] != k || m == 0 || n == 0 || k == 0 {
        return None;
    }
    let mut out_shape = Vec::with_capacity(rank);
    for i in 0..rank - 2 {
        match (sa[i], sb[i]) {
            (x, y) if x == y || y == 1 => out_shape.push(x),
            (1, y) => out_shape.push(y),
            _ => return None,
        }
    }
    let batch: usize = out_shape.iter().product();
    let stride_a = batch_stride(&sa[..rank - 2], &ta[..rank - 2], &out_shape)?;
    let stride_b = batch_stride(&sb[..rank - 2], &tb[..rank - 2], &out_shape)?;
    let la = layout(m, k, ta[rank - 2], ta[rank - 1])?;
    let lb = layout(k, n, tb[rank - 2], tb[rank - 1])?;
    let (data_type, elem) = match a.dtype {
        DType::F32 => (sys::cudaDataType::CUDA_R_32F, 4usize),
        DType::BF16 => (sys::cudaDataType::CUDA_R_16BF, 2),
        DType::F16 => (sys::cudaDataType::CUDA_R_16F, 2),
        _ => return None,
    };
    let fits = |v: usize| i32::try_from(v).is_ok();
    if ![m, n, k, la.ld, lb.ld, batch].into_iter().all(fits) {
        return None;
    }
    // Every element either operand's strides reach lies inside its buffer.
    let reach = |shape: &[usize], strides: &[usize]| -> Option<u64> {
        shape.iter().zip(strides).try_fold(0u64, |acc, (&d, &s)| {
            acc.checked_add((d as u64 - 1).checked_mul(s as u64)?)
        })
    };
    for (t, shape, strides) in [(&a, &sa, &ta), (&b, &sb, &tb)] {
        let last = reach(shape, strides)?;
        let bytes = t.handle.size_in_used();
        if (last + 1).checked_mul(elem as u64)? > bytes {
            return None;
        }
    }
    let index = a.device.index;
    let gpu = gpu(index)?;
    out_shape.extend([m, n]);
    let out = empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), out_shape.into(), a.dtype);

    // burn's queue may still be writing the operands.
    burn_cubecl::cubecl::future::block_on(a.client.sync()).ok()?;
    let ptr = |t: &CubeTensor<CudaRuntime>| t.client.get_resource(t.handle.clone()).ok();
    let (ra, rb, rc) = (ptr(&a)?, ptr(&b)?, ptr(&out)?);
    let gpu = gpu.lock().ok()?;

    // cuBLAS is column-major: the row-major C = A B is the column-major C^T = B^T A^T, so B
    // comes first. A row-major operand read column-major is its own transpose (no flag).
    let op = |l: Layout| {
        if l.column_major {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let ctx = gpu.stream.context();
    ctx.bind_to_thread().ok()?;
    // SAFETY: the three pointers are live buffers of burn's (held by `ra`, `rb`, `rc` and the
    // tensors until the stream is waited for below); the shapes, strides and leading
    // dimensions were checked above against each buffer's size.
    let done = unsafe {
        blas::gemm_strided_batched_ex(
            *gpu.blas.handle(),
            op(lb),
            op(la),
            n as i32,
            m as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            rb.resource().ptr as *const std::ffi::c_void,
            data_type,
            lb.ld as i32,
            stride_b as i64,
            ra.resource().ptr as *const std::ffi::c_void,
            data_type,
            la.ld as i32,
            stride_a as i64,
            (&beta as *const f32).cast(),
            rc.resource().ptr as *mut std::ffi::c_void,
            data_type,
            n as i32,
            (m * n) as i64,
            batch as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    };
    let waited = gpu.stream.synchronize();
    drop((ra, rb, rc));
    match (done, waited) {
        (Ok(()), Ok(())) => Some(out),
        (done, waited) => {
            tracing::warn!(?done, ?waited, "cuBLAS product failed: burn's matmul used instead");
            None
        }
    }
}

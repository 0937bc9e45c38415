//! The CUDA fast paths one by one, on a Llama-2-70B block's shapes (bf16): each kernel
//! variant's time and effective bandwidth, and its largest difference from burn's generic
//! ops. One JSON object a line.
//!
//!   CUDARC_CUDA_VERSION=13000 cargo run --release -p shared-model --features cuda --example kernel_bench
//!
//! With the argument `prefill`: the pieces of a 2048-token prefill instead (cuBLAS products,
//! the fused softmax and gated SiLU), each against burn's ops.

use std::time::Instant;

use burn::backend::Cuda;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use shared_model::kernels::{self, GpuQuant};
use shared_model::precision::Precision;
use shared_model::quant::{QuantKind, QuantMatrix};
use shared_model::weights::HostTensor;

type B = Cuda;

fn time(device: &burn::tensor::Device<B>, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    B::sync(device).ok();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    B::sync(device).ok();
    start.elapsed().as_secs_f64() * 1e6 / iters as f64
}

fn max_rel_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let a: Vec<f32> = a.into_data().convert::<f32>().into_vec().expect("f32");
    let b: Vec<f32> = b.into_data().convert::<f32>().into_vec().expect("f32");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn emit(fields: serde_json::Value) {
    println!("{fields}");
}

fn main() {
    let device = Default::default();
    Precision::Bf16.apply::<B>(&device).expect("bf16");
    let iters = 50;
    if std::env::args().nth(1).as_deref() == Some("prefill") {
        prefill(&device);
        return;
    }

    // Launch cost: a tiny op, and a tiny op plus a sync.
    let small = Tensor::<B, 2>::random([1, 8192], Distribution::Default, &device);
    let us = time(&device, 1000, || {
        let _ = small.clone() + small.clone();
    });
    emit(serde_json::json!({"what": "launch", "us_per_op": us}));
    let us = time(&device, 200, || {
        let _ = small.clone() + small.clone();
        B::sync(&device).ok();
    });
    emit(serde_json::json!({"what": "launch+sync", "us_per_op": us}));

    // What each fast path costs the host: tiny shapes, 1000 calls queued, one wait.
    {
        let w = Tensor::<B, 2>::random([64, 64], Distribution::Default, &device);
        let x = Tensor::<B, 2>::random([1, 64], Distribution::Default, &device);
        let norm_w = Tensor::<B, 1>::random([64], Distribution::Default, &device);
        let x3 = x.clone().reshape([1, 1, 64]);
        let qkv = Tensor::<B, 3>::random([1, 1, 4 * 64], Distribution::Default, &device);
        let cos = Tensor::<B, 4>::random([1, 1, 1, 32], Distribution::Default, &device);
        let q = Tensor::<B, 4>::random([1, 1, 2, 64], Distribution::Default, &device);
        let kv = Tensor::<B, 4>::random([1, 1, 16, 64], Distribution::Default, &device);
        let one = Tensor::<B, 4>::random([1, 1, 1, 64], Distribution::Default, &device);
        let cases: Vec<(&str, Box<dyn Fn()>)> = vec![
            ("matvec", Box::new(|| drop(kernels::matvec(&x, &w)))),
            ("rms_norm", Box::new(|| drop(kernels::rms_norm(&x3, &norm_w, 1e-5)))),
            (
                "rope_split",
                Box::new(|| drop(kernels::rope_split(&qkv, &cos, &cos, 2, 1, 64))),
            ),
            (
                "decode_attention",
                Box::new(|| drop(kernels::decode_attention(&q, &kv, &kv))),
            ),
            ("cat", Box::new(|| drop(Tensor::cat(vec![kv.clone(), one.clone()], 2)))),
            ("silu", Box::new(|| drop(burn::tensor::activation::silu(x.clone())))),
            ("mul", Box::new(|| drop(x.clone() * x.clone()))),
        ];
        for (name, f) in cases {
            let us = time(&device, 1000, || f());
            emit(serde_json::json!({"what": "host_cost", "op": name, "us_per_call": us}));
        }
    }

    // Dense products of one row: qkv, o, gate|up, down.
    for (n, k) in [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)] {
        let w = Tensor::<B, 2>::random([n, k], Distribution::Uniform(-1.0, 1.0), &device);
        let x = Tensor::<B, 2>::random([1, k], Distribution::Uniform(-1.0, 1.0), &device);
        let reference = x.clone().matmul(w.clone().transpose());
        let bytes = (n * k * 2) as f64;
        let us = time(&device, iters, || {
            let _ = x.clone().matmul(w.clone().transpose());
        });
        emit(
            serde_json::json!({"what": "matvec", "variant": "burn-matmul", "n": n, "k": k, "us": us, "gb_s": bytes / us / 1e3}),
        );
        for per_warp in [1usize, 2, 4] {
            let Some(y) = kernels::matvec_rows_per_warp(&x, &w, per_warp) else {
                emit(serde_json::json!({"what": "matvec", "per_warp": per_warp, "n": n, "k": k, "refused": true}));
                continue;
            };
            let diff = max_rel_diff(y, reference.clone());
            let us = time(&device, iters, || {
                let _ = kernels::matvec_rows_per_warp(&x, &w, per_warp);
            });
            emit(
                serde_json::json!({"what": "matvec", "per_warp": per_warp, "n": n, "k": k, "us": us, "gb_s": bytes / us / 1e3, "max_rel_diff": diff}),
            );
        }
    }

    // Products of a 2048-token prefill through burn's matmul.
    let t = 2048;
    for (n, k) in [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)] {
        let w = Tensor::<B, 2>::random([n, k], Distribution::Uniform(-1.0, 1.0), &device);
        let x = Tensor::<B, 2>::random([t, k], Distribution::Uniform(-1.0, 1.0), &device);
        let flops = (2 * t * n * k) as f64;
        let us = time(&device, 10, || {
            let _ = x.clone().matmul(w.clone().transpose());
        });
        emit(
            serde_json::json!({"what": "matmul", "variant": "burn", "t": t, "n": n, "k": k, "us": us, "tflop_s": flops / us / 1e6}),
        );
    }

    // A 2048-token prefill's attention through burn's ops, step by step (as `Attention`
    // runs it when no kernel applies).
    {
        let (t, nh, nkv, hd) = (2048, 64, 8, 128);
        let group = nh / nkv;
        let q = Tensor::<B, 4>::random([1, t, nh, hd], Distribution::Default, &device);
        let k = Tensor::<B, 4>::random([1, nkv, t, hd], Distribution::Default, &device);
        let v = Tensor::<B, 4>::random([1, nkv, t, hd], Distribution::Default, &device);
        let mask = Tensor::<B, 5>::zeros([1, 1, 1, t, t], &device);
        let qs = || {
            q.clone()
                .reshape([1, t, nkv, group, hd])
                .permute([0, 2, 3, 1, 4])
                .reshape([1, nkv, group * t, hd])
        };
        let qg = qs();
        let scores = || {
            qg.clone()
                .matmul(k.clone().swap_dims(2, 3))
                .mul_scalar(1.0 / (hd as f64).sqrt())
        };
        let sc = scores().reshape([1, nkv, group, t, t]);
        let probs = || softmax(sc.clone() + mask.clone(), 4).reshape([1, nkv, group * t, t]);
        let pr = probs();
        let steps: Vec<(&str, Box<dyn Fn()>)> = vec![
            ("q-permute", Box::new(|| drop(qs().into_primitive()))),
            ("scores", Box::new(|| drop(scores()))),
            ("mask+softmax", Box::new(|| drop(probs()))),
            ("pv", Box::new(|| drop(pr.clone().matmul(v.clone())))),
        ];
        for (name, f) in steps {
            let us = time(&device, 10, || f());
            emit(serde_json::json!({"what": "prefill_attention", "step": name, "t": t, "us": us}));
        }
    }

    // Q4_0 / Q8_0 products of one row.
    for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
        for (n, k) in [(8192, 8192), (57344, 8192), (8192, 28672)] {
            let dense = Tensor::<B, 2>::random([n, k], Distribution::Uniform(-1.0, 1.0), &device);
            let host: Vec<f32> = dense.into_data().convert::<f32>().into_vec().expect("f32");
            let q = QuantMatrix::quantize("w", kind, &HostTensor::new(vec![n, k], host)).expect("quantizes");
            let stored = (q.raw().len()) as f64;
            let g = GpuQuant::<B>::new(&q, &device).expect("cuda");
            let x = Tensor::<B, 2>::random([1, k], Distribution::Uniform(-1.0, 1.0), &device);
            let reference = x.clone().matmul(g.dense().expect("dequantizes").transpose());
            // One row: `forward` takes the quantized matrix-vector kernel.
            let diff = max_rel_diff(g.forward(x.clone()), reference);
            let us = time(&device, iters, || {
                let _ = g.forward(x.clone());
            });
            emit(
                serde_json::json!({"what": "quant_matvec", "kind": format!("{kind:?}"), "n": n, "k": k, "us": us, "gb_s_of_gguf_bytes": stored / us / 1e3, "max_rel_diff": diff}),
            );
        }
    }

    // Attention of one new token over the cache: 64 query heads, 8 KV heads, head_dim 128.
    let (nh, nkv, hd) = (64, 8, 128);
    for keys in [512, 4096, 16384] {
        let q = Tensor::<B, 4>::random([1, 1, nh, hd], Distribution::Uniform(-1.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([1, nkv, keys, hd], Distribution::Uniform(-1.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([1, nkv, keys, hd], Distribution::Uniform(-1.0, 1.0), &device);
        let group = nh / nkv;
        let reference = || {
            let qg = q.clone().reshape([1, nkv, group, hd]);
            let scores = qg
                .matmul(k.clone().swap_dims(2, 3))
                .mul_scalar(1.0 / (hd as f64).sqrt());
            softmax(scores, 3).matmul(v.clone()).reshape([1, 1, nh * hd])
        };
        let want = reference();
        let us = time(&device, iters, || {
            let _ = reference();
        });
        let bytes = (2 * nkv * keys * hd * 2) as f64;
        emit(
            serde_json::json!({"what": "attention", "variant": "burn-ops", "keys": keys, "us": us, "gb_s": bytes / us / 1e3}),
        );
        let Some(y) = kernels::decode_attention(&q, &k, &v) else {
            emit(serde_json::json!({"what": "attention", "keys": keys, "refused": true}));
            continue;
        };
        let diff = max_rel_diff(y, want);
        let us = time(&device, iters, || {
            let _ = kernels::decode_attention(&q, &k, &v);
        });
        emit(
            serde_json::json!({"what": "attention", "variant": "split", "keys": keys, "us": us, "gb_s": bytes / us / 1e3, "max_rel_diff": diff}),
        );
    }
}

/// A 2048-token prefill of a Llama-2-70B block, piece by piece.
fn prefill(device: &burn::tensor::Device<B>) {
    let t = 2048usize;
    let iters = 10;
    let uniform = Distribution::Uniform(-1.0, 1.0);
    for (n, k) in [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)] {
        let w = Tensor::<B, 2>::random([n, k], uniform, device);
        let x = Tensor::<B, 2>::random([t, k], uniform, device);
        let wt = w.transpose();
        let flops = 2.0 * (t * n * k) as f64;
        let us = time(device, iters, || drop(kernels::matmul(&x, &wt)));
        // burn's matmul is left out here: its first call per shape autotunes for a minute.
        emit(
            serde_json::json!({"what": "prefill_gemm", "m": t, "n": n, "k": k, "us": us,
            "tflop_s": flops / us / 1e6}),
        );
    }
    let (nkv, group, hd) = (8usize, 8usize, 128usize);
    let q = Tensor::<B, 4>::random([1, nkv, group * t, hd], uniform, device);
    let cache = Tensor::<B, 4>::random([1, nkv, t + 256, hd], uniform, device);
    let k = cache.slice([0..1, 0..nkv, 0..t, 0..hd]);
    let kt = k.clone().swap_dims(2, 3);
    let us = time(device, iters, || drop(kernels::matmul(&q, &kt)));
    emit(serde_json::json!({"what": "prefill_scores", "us": us}));
    let scores = kernels::matmul(&q, &kt).expect("scores").reshape([1, nkv, group, t, t]);
    let mask_host: Vec<f32> = (0..t * t).map(|i| if i % t <= i / t { 0.0 } else { -3.0e4 }).collect();
    let mask = Tensor::<B, 1>::from_floats(mask_host.as_slice(), device).reshape([1, 1, 1, t, t]);
    let scale = 1.0 / (hd as f64).sqrt();
    let us = time(device, iters, || {
        drop(kernels::masked_softmax(&scores, &mask, scale, Some(0)))
    });
    let us_burn = time(device, 3, || {
        drop(softmax(scores.clone().mul_scalar(scale) + mask.clone(), 4))
    });
    let diff = max_rel_diff(
        kernels::masked_softmax(&scores, &mask, scale, Some(0)).expect("softmax"),
        softmax(scores.clone().mul_scalar(scale) + mask.clone(), 4),
    );
    emit(serde_json::json!({"what": "prefill_softmax", "us": us, "us_burn": us_burn, "max_rel_diff": diff}));
    let probs = scores.reshape([1, nkv, group * t, t]);
    let us = time(device, iters, || drop(kernels::matmul(&probs, &k)));
    emit(serde_json::json!({"what": "prefill_pv", "us": us}));
    let gu = Tensor::<B, 2>::random([t, 2 * 28672], uniform, device);
    let us = time(device, iters, || drop(kernels::gated_silu(&gu)));
    let burn_silu =
        || burn::tensor::activation::silu(gu.clone().narrow(1, 0, 28672)) * gu.clone().narrow(1, 28672, 28672);
    let us_burn = time(device, 3, || drop(burn_silu()));
    let diff = max_rel_diff(kernels::gated_silu(&gu).expect("silu"), burn_silu());
    emit(serde_json::json!({"what": "prefill_silu", "us": us, "us_burn": us_burn, "max_rel_diff": diff}));
}

//! Each CUDA fast path against burn's generic ops on small shapes (f32 and bf16): one line per
//! kernel with the largest absolute difference. A debugging aid beside `kernel_bench`.

use burn::backend::Cuda;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use shared_model::kernels;
use shared_model::layers::positions::apply_rope;
use shared_model::precision::Precision;

type B = Cuda;
type C = shared_model::Cpu;

/// The same values on the CPU backend, in f32: the reference every result is held against.
fn cpu<const D: usize>(t: &Tensor<B, D>) -> Tensor<C, D> {
    Tensor::from_data(t.clone().into_data().convert::<f32>(), &Default::default())
}

fn host<const D: usize>(t: Tensor<C, D>) -> Tensor<B, D> {
    Tensor::from_data(t.into_data(), &Default::default())
}

fn diff<const D: usize>(name: &str, got: Option<Tensor<B, D>>, want: Tensor<B, D>) {
    let Some(got) = got else {
        println!("{name:24} refused");
        return;
    };
    assert_eq!(got.dims(), want.dims(), "{name}");
    let g: Vec<f32> = got.into_data().convert::<f32>().into_vec().expect("f32");
    let w: Vec<f32> = want.into_data().convert::<f32>().into_vec().expect("f32");
    let d = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("{name:24} max |diff| {d:.3e} (max |want| {scale:.3e})");
}

fn main() {
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "f32".into());
    let device = Default::default();
    if dtype == "bf16" {
        Precision::Bf16.apply::<B>(&device).expect("bf16");
    }
    let r = |shape: Vec<usize>| {
        Tensor::<B, 1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        )
    };
    let (nh, nkv, hd, t) = (4usize, 2usize, 16usize, 12usize);
    let group = nh / nkv;
    let s = 3 + t;
    let scale = 1.0 / (hd as f64).sqrt();

    // Linear products.
    let w: Tensor<B, 2> = r(vec![192, 64]).reshape([192, 64]);
    let x1: Tensor<B, 2> = r(vec![1, 64]).reshape([1, 64]);
    let xt: Tensor<B, 2> = r(vec![t, 64]).reshape([t, 64]);
    diff(
        "matvec",
        kernels::matvec(&x1, &w),
        host(cpu(&x1).matmul(cpu(&w).transpose())),
    );
    diff(
        "burn-cuda matmul w^T",
        Some(xt.clone().matmul(w.clone().transpose())),
        host(cpu(&xt).matmul(cpu(&w).transpose())),
    );

    // RoPE split.
    let qkv: Tensor<B, 3> = r(vec![1, t, (nh + 2 * nkv) * hd]).reshape([1, t, (nh + 2 * nkv) * hd]);
    let cos: Tensor<B, 4> = r(vec![1, t, 1, hd / 2]).reshape([1, t, 1, hd / 2]);
    let sin: Tensor<B, 4> = r(vec![1, t, 1, hd / 2]).reshape([1, t, 1, hd / 2]);
    let q = qkv.clone().narrow(2, 0, nh * hd).reshape([1, t, nh, hd]);
    let k = qkv.clone().narrow(2, nh * hd, nkv * hd).reshape([1, t, nkv, hd]);
    let v = qkv
        .clone()
        .narrow(2, (nh + nkv) * hd, nkv * hd)
        .reshape([1, t, nkv, hd]);
    let fused = kernels::rope_split(&qkv, &cos, &sin, nh, nkv, hd);
    diff(
        "rope_split q",
        fused.clone().map(|f| f.0),
        apply_rope(q.clone(), &cos, &sin),
    );
    diff(
        "rope_split k",
        fused.clone().map(|f| f.1),
        apply_rope(k.clone(), &cos, &sin),
    );
    diff("rope_split v", fused.map(|f| f.2), v.clone());

    // Decode attention over a cache view (buffers longer than the keys).
    let q1: Tensor<B, 4> = r(vec![1, 1, nh, hd]).reshape([1, 1, nh, hd]);
    let buf: Tensor<B, 4> = r(vec![1, nkv, 256, hd]).reshape([1, nkv, 256, hd]);
    let kv = buf.clone().slice([0..1, 0..nkv, 0..s, 0..hd]);
    let want = {
        let qg = q1.clone().reshape([1, nkv, group, hd]);
        let sc = qg.matmul(kv.clone().swap_dims(2, 3)).mul_scalar(scale);
        softmax(sc, 3).matmul(kv.clone()).reshape([1, 1, nh * hd])
    };
    diff(
        "decode_attention (view)",
        kernels::decode_attention(&q1, &kv, &kv),
        want.clone(),
    );
    let kvc = Tensor::<B, 4>::from_data(kv.clone().into_data(), &device);
    diff(
        "decode_attention (contig)",
        kernels::decode_attention(&q1, &kvc, &kvc),
        want,
    );

    // Products through cuBLAS, every layout the layers hand it.
    let x37: Tensor<B, 2> = r(vec![37, 64]).reshape([37, 64]);
    let wt = w.clone().transpose();
    diff(
        "gemm x w^T",
        kernels::matmul(&x37, &wt),
        host(cpu(&x37).matmul(cpu(&w).transpose())),
    );
    let a: Tensor<B, 2> = r(vec![40, 24]).reshape([40, 24]);
    let bm: Tensor<B, 2> = r(vec![24, 33]).reshape([24, 33]);
    diff("gemm a b", kernels::matmul(&a, &bm), host(cpu(&a).matmul(cpu(&bm))));
    let at: Tensor<B, 2> = r(vec![24, 40]).reshape([24, 40]).transpose();
    diff("gemm a^T b", kernels::matmul(&at, &bm), host(cpu(&at).matmul(cpu(&bm))));
    let big_x: Tensor<B, 2> = r(vec![300, 512]).reshape([300, 512]);
    let big_w: Tensor<B, 2> = r(vec![1000, 512]).reshape([1000, 512]);
    diff(
        "gemm 300x512x1000",
        kernels::matmul(&big_x, &big_w.clone().transpose()),
        host(cpu(&big_x).matmul(cpu(&big_w).transpose())),
    );
    let a3: Tensor<B, 3> = r(vec![3, 17, 8]).reshape([3, 17, 8]);
    let b3: Tensor<B, 3> = r(vec![1, 8, 5]).reshape([1, 8, 5]);
    diff(
        "gemm broadcast batch",
        kernels::matmul(&a3, &b3),
        host(cpu(&a3).matmul(cpu(&b3))),
    );
    let tq = 20usize;
    let sq = 30usize;
    let qh: Tensor<B, 4> = r(vec![1, nkv, tq, hd]).reshape([1, nkv, tq, hd]);
    let kview = buf.clone().slice([0..1, 0..nkv, 0..sq, 0..hd]);
    let kt = kview.clone().swap_dims(2, 3);
    diff(
        "gemm q k^T (cache view)",
        kernels::matmul(&qh, &kt),
        host(cpu(&qh).matmul(cpu(&kview).swap_dims(2, 3))),
    );
    let p: Tensor<B, 4> = r(vec![1, nkv, tq, sq]).reshape([1, nkv, tq, sq]);
    diff(
        "gemm p v (cache view)",
        kernels::matmul(&p, &kview),
        host(cpu(&p).matmul(cpu(&kview))),
    );

    // Scaled, masked softmax, causal after some cached keys (a prompt's second chunk); rows of
    // 30 (pairs of elements a load) and 32 (vectors of 8).
    for (tq, sq) in [(20usize, 30usize), (20, 32)] {
        let scores: Tensor<B, 5> = r(vec![1, nkv, group, tq, sq]).reshape([1, nkv, group, tq, sq]);
        let mask_host: Vec<f32> = (0..tq * sq)
            .map(|i| if i % sq <= i / sq + (sq - tq) { 0.0 } else { -3.0e4 })
            .collect();
        let mask: Tensor<B, 5> = Tensor::<B, 1>::from_floats(mask_host.as_slice(), &device).reshape([1, 1, 1, tq, sq]);
        let want = host(softmax(cpu(&scores).mul_scalar(scale) + cpu(&mask), 4));
        diff(
            &format!("masked_softmax {sq}"),
            kernels::masked_softmax(&scores, &mask, scale, None),
            want.clone(),
        );
        diff(
            &format!("masked_softmax causal {sq}"),
            kernels::masked_softmax(&scores, &mask, scale, Some(sq - tq)),
            want,
        );
    }

    // silu(gate) * up.
    let gu: Tensor<B, 2> = r(vec![tq, 96]).reshape([tq, 96]);
    let gate = cpu(&gu).narrow(1, 0, 48);
    let up = cpu(&gu).narrow(1, 48, 48);
    diff(
        "gated_silu",
        kernels::gated_silu(&gu),
        host(burn::tensor::activation::silu(gate) * up),
    );

    // RMSNorm, rows of 96 (vectors of 8) and 100 (of 4).
    for d in [96usize, 100] {
        let x: Tensor<B, 3> = r(vec![1, 5, d]).reshape([1, 5, d]);
        let w: Tensor<B, 1> = r(vec![d]);
        let xc = cpu(&x);
        let rms = xc.clone().powi_scalar(2).mean_dim(2).add_scalar(1e-5).sqrt();
        diff(
            &format!("rms_norm {d}"),
            kernels::rms_norm(&x, &w, 1e-5),
            host(xc / rms * cpu(&w).reshape([1, 1, d])),
        );
    }

    // Residual add + RMSNorm.
    for d in [96usize, 100] {
        let x: Tensor<B, 3> = r(vec![1, 5, d]).reshape([1, 5, d]);
        let delta: Tensor<B, 3> = r(vec![1, 5, d]).reshape([1, 5, d]);
        let w: Tensor<B, 1> = r(vec![d]);
        let h = x.clone() + delta.clone();
        let hc = cpu(&h);
        let rms = hc.clone().powi_scalar(2).mean_dim(2).add_scalar(1e-5).sqrt();
        let fused = kernels::add_rms_norm(&x, &delta, &w, 1e-5);
        diff(&format!("add_rms_norm sum {d}"), fused.clone().map(|f| f.0), h);
        diff(
            &format!("add_rms_norm norm {d}"),
            fused.map(|f| f.1),
            host(hc / rms * cpu(&w).reshape([1, 1, d])),
        );
    }
}

//! Prompt tuning's model-side pieces on the fixtures: an inference session fed step by step
//! (as servers run it) adds deep prompts where a stateless training forward does, left padding
//! included; the loss counts only weighted targets.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use shared_model::Cpu;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::to_host;
use shared_model::tuning::{TrainBatch, masked_next_token_loss, with_prompt};
use shared_model::weights::HostTensor;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family)
}

fn ramp(shape: [usize; 3], k: usize, scale: f32) -> Tensor<Cpu, 3> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (((i * k) % 89) as f32 - 44.0) / 44.0 * scale).collect();
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

#[test]
fn session_steps_add_deep_prompts_like_the_stateless_forward() {
    for family in ["llama", "bloom"] {
        let files = ModelFiles::open(&fixture(family)).expect("model");
        let model = LocalModel::<Cpu>::load(&files, &Default::default()).expect("load");
        let (layers, hidden, prefix) = (files.config.num_layers, files.config.hidden_size, 3);
        let prompt = ramp([1, prefix, hidden], 7, 0.05).reshape([prefix, hidden]);
        let deep = ramp([layers, prefix, hidden], 13, 0.5);
        let pad = vec![0, 2];
        let ids = vec![vec![5u32, 9, 11, 40, 3], vec![1, 1, 17, 8, 30]];
        let raw = model.embeddings.embed_raw(&ids).expect("embed");
        let x = with_prompt(&model.embeddings, raw, &prompt, &pad);
        let span = &model.spans[0];
        let full = to_host(
            span.forward_full_prompted(x.clone(), pad.clone(), span.range(), Some(&deep), None)
                .expect("stateless"),
        );
        // Steps of 2, then 4, then 2 positions: the prefix of row 1 (positions 2..5) straddles
        // the first two steps.
        let mut cache = span.new_cache(pad.clone());
        let mut parts = Vec::new();
        let mut at = 0;
        for n in [2, 4, 2] {
            let step = x.clone().narrow(1, at, n);
            parts.push(
                span.forward_blocks_prompted(step, &mut cache, span.range(), Some(&deep), None, |_, _| {})
                    .expect("step"),
            );
            at += n;
        }
        let stepped = to_host(Tensor::cat(parts, 1));
        let without = to_host(span.forward_full_blocks(x, pad.clone(), span.range()).expect("plain"));
        let total = prefix + ids[0].len();
        let scale = full.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (mut diff, mut effect) = (0.0f32, 0.0f32);
        for (row, &p) in pad.iter().enumerate() {
            for t in p..total {
                for h in 0..hidden {
                    let i = (row * total + t) * hidden + h;
                    diff = diff.max((full.data[i] - stepped.data[i]).abs());
                    effect = effect.max((full.data[i] - without.data[i]).abs());
                }
            }
        }
        assert!(diff <= 1e-4 * scale, "{family}: session vs stateless differ by {diff}");
        assert!(effect > 1e-2 * scale, "{family}: deep prompts must change the outputs");
    }
}

#[test]
fn loss_counts_only_weighted_targets() {
    let (b, prefix, t, v) = (2, 2, 4, 5);
    let logits = ramp([b, prefix + t, v], 11, 3.0);
    let batch = TrainBatch {
        ids: vec![vec![1, 2, 3, 4], vec![0, 4, 4, 1]],
        weights: vec![vec![0.0, 1.0, 0.0, 1.0], vec![0.0, 0.0, 1.0, 0.0]],
        tokens: 8,
    };
    let loss: f32 = masked_next_token_loss(logits.clone(), &batch, prefix)
        .expect("loss")
        .into_scalar();
    let host: HostTensor = to_host(logits);
    let mut sum = 0.0f32;
    let mut count = 0.0f32;
    for row in 0..b {
        for j in 1..t {
            let w = batch.weights[row][j];
            if w == 0.0 {
                continue;
            }
            // Position prefix + j - 1 predicts token j.
            let base = (row * (prefix + t) + prefix + j - 1) * v;
            let l = &host.data[base..base + v];
            let max = l.iter().fold(f32::MIN, |m, x| m.max(*x));
            let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            sum += lse - l[batch.ids[row][j] as usize];
            count += 1.0;
        }
    }
    assert!((loss - sum / count).abs() < 1e-5, "{loss} vs {}", sum / count);
}

/// A span's autodiff view (what servers answer backward requests with) computes what the
/// inference span computes: the same weights, dense ones shared and quantized ones expanded.
#[test]
fn autodiff_view_of_a_span_matches_the_span() {
    use burn::backend::Autodiff;
    use shared_model::quant::QuantKind;
    use shared_model::synthetic::QuantizeOnLoad;
    for (family, quant) in [
        ("llama", None),
        ("bloom", None),
        ("falcon", None),
        ("mixtral", None),
        ("llama", Some(QuantKind::Q8_0)),
        ("qwen2", Some(QuantKind::Q4_0)),
    ] {
        let mut files = ModelFiles::open(&fixture(family)).expect("model");
        if let Some(kind) = quant {
            files.weights = std::sync::Arc::new(QuantizeOnLoad::new(files.weights.clone(), kind));
        }
        let model = LocalModel::<Cpu>::load(&files, &Default::default()).expect("load");
        let span = &model.spans[0];
        let x = ramp([2, 5, files.config.hidden_size], 11, 0.5);
        let pad = vec![0, 1];
        let y = to_host(span.forward_full(x.clone(), pad.clone()).expect("forward"));
        let view = span.autodiff().expect("autodiff view");
        let xa = Tensor::<Autodiff<Cpu>, 3>::from_inner(x).require_grad();
        let ya = view.forward_full(xa.clone(), pad).expect("autodiff forward");
        let grads = ya.clone().sum().backward();
        assert!(xa.grad(&grads).is_some(), "{family}: no input gradient");
        let ya = to_host(ya.inner());
        let scale = y.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = y
            .data
            .iter()
            .zip(&ya.data)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        // Dense: the same ops on the same weights. Quantized: the block kernel against a matmul
        // of the expanded blocks (the same values, summed in another order).
        let tol = if quant.is_some() { 1e-4 } else { 1e-6 };
        assert!(
            diff <= tol * scale,
            "{family} {quant:?}: differs by {diff} (scale {scale})"
        );
    }
}

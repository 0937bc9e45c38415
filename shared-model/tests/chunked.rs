//! Chunked steps and tiled attention against the one-shot, untiled step on every fixture
//! family: left padding, deep prompts, LoRA, Mistral's sliding window and BLOOM's ALiBi, with
//! chunks and key tiles that split the prompt mid-way (1e-4 relative to the reference's
//! largest magnitude, at every position after a row's padding).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use shared_model::Cpu;
use shared_model::cache::SpanCache;
use shared_model::layers::AttentionTiling;
use shared_model::layers::lora::{BlockLoraWeights, LoraAdapter, LoraPairWeights, LoraSpan};
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::{BlockSpan, to_host};
use shared_model::weights::HostTensor;

const REL_TOL: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family)
}

fn ramp(shape: Vec<usize>, k: usize, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let data = (0..n).map(|i| (((i * k) % 89) as f32 - 44.0) / 44.0 * scale).collect();
    HostTensor::new(shape, data)
}

fn upload<const D: usize>(t: &HostTensor) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &Default::default())
}

fn tiles(tile: usize) -> AttentionTiling {
    AttentionTiling { min_keys: tile, tile }
}

/// A LoRA adapter of rank 2 on every projection of a gated-MLP family.
fn lora(files: &ModelFiles) -> LoraAdapter {
    let c = &files.config;
    let a = c.attention;
    let (hidden, attn) = (c.hidden_size, a.num_heads * a.head_dim);
    let qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim;
    let inter = match c.mlp {
        shared_model::config::MlpKind::Gated { intermediate, .. } => intermediate,
        _ => panic!("LoRA needs a gated MLP"),
    };
    let pair = |out: usize, inp: usize, k: usize| LoraPairWeights {
        a: ramp(vec![2, inp], k, 0.3),
        b: ramp(vec![out, 2], k + 2, 0.3),
    };
    LoraAdapter {
        name: "test".into(),
        range: 0..c.num_layers,
        blocks: (0..c.num_layers)
            .map(|i| BlockLoraWeights {
                qkv: Some(pair(qkv, hidden, 3 + i)),
                out: Some(pair(hidden, attn, 5 + i)),
                gate_up: Some(pair(2 * inter, hidden, 7 + i)),
                down: Some(pair(hidden, inter, 11 + i)),
            })
            .collect(),
    }
}

struct Case {
    span: BlockSpan<Cpu>,
    x: Tensor<Cpu, 3>,
    pad: Vec<usize>,
    deep: Option<Tensor<Cpu, 3>>,
    lora: Option<LoraSpan<Cpu>>,
}

impl Case {
    fn new(family: &str, window: Option<usize>, pad: Vec<usize>, seq: usize, extras: bool) -> Self {
        let mut files = ModelFiles::open(&fixture(family)).expect("fixture");
        if window.is_some() {
            files.config.attention.sliding_window = window;
        }
        let device = Default::default();
        let model = LocalModel::<Cpu>::load(&files, &device).expect("load");
        let vocab = files.config.vocab_size as u32;
        let ids: Vec<Vec<u32>> = (0..pad.len())
            .map(|row| (0..seq).map(|t| (t as u32 * 7 + row as u32 * 13 + 1) % vocab).collect())
            .collect();
        let x = model.embeddings.forward(&ids).expect("embed");
        let layers = files.config.num_layers;
        let deep = extras.then(|| upload(&ramp(vec![layers, 3, files.config.hidden_size], 13, 0.5)));
        let gated = matches!(files.config.mlp, shared_model::config::MlpKind::Gated { .. });
        let lora = (extras && gated).then(|| lora(&files).to_device::<Cpu>(&device));
        Self {
            span: model.spans[0].clone(),
            x,
            pad,
            deep,
            lora,
        }
    }

    fn span(&self, tiling: AttentionTiling) -> BlockSpan<Cpu> {
        self.span.clone().with_attention_tiling(tiling)
    }

    /// One step of the whole prompt, untiled: the reference.
    fn one_shot(&self, tiling: AttentionTiling) -> (Tensor<Cpu, 3>, SpanCache<Cpu>) {
        let span = self.span(tiling);
        let mut cache = span.new_cache(self.pad.clone());
        let y = span
            .forward_blocks_prompted(
                self.x.clone(),
                &mut cache,
                span.range(),
                self.deep.as_ref(),
                self.lora.as_ref(),
                |_, _| {},
            )
            .expect("one-shot");
        (y, cache)
    }

    fn chunked(&self, tiling: AttentionTiling, chunk: usize) -> (Tensor<Cpu, 3>, SpanCache<Cpu>) {
        let span = self.span(tiling);
        let seq = self.x.dims()[1];
        let mut cache = span.new_session_cache(self.pad.clone(), seq + 1);
        let y = span
            .forward_chunked(
                self.x.clone(),
                &mut cache,
                span.range(),
                self.deep.as_ref(),
                self.lora.as_ref(),
                chunk,
            )
            .expect("chunked");
        (y, cache)
    }

    fn stateless(&self, tiling: AttentionTiling) -> Tensor<Cpu, 3> {
        let span = self.span(tiling);
        span.forward_full_prompted(
            self.x.clone(),
            self.pad.clone(),
            span.range(),
            self.deep.as_ref(),
            self.lora.as_ref(),
        )
        .expect("stateless")
    }

    /// One more token after the prompt, through `cache`.
    fn decode(&self, tiling: AttentionTiling, cache: &mut SpanCache<Cpu>) -> Tensor<Cpu, 3> {
        let span = self.span(tiling);
        let seq = self.x.dims()[1];
        let next = self.x.clone().narrow(1, seq - 1, 1);
        span.forward_blocks_prompted(
            next,
            cache,
            span.range(),
            self.deep.as_ref(),
            self.lora.as_ref(),
            |_, _| {},
        )
        .expect("decode")
    }
}

/// Compares `actual` with `expected` at every position after each row's padding, and checks
/// that padding positions stay finite.
fn assert_close(what: &str, actual: Tensor<Cpu, 3>, expected: Tensor<Cpu, 3>, pad: &[usize]) {
    let (a, e) = (to_host(actual), to_host(expected));
    assert_eq!(a.shape, e.shape, "{what}: shape");
    let [_, seq, hidden] = [e.shape[0], e.shape[1], e.shape[2]];
    assert!(a.data.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let scale = e.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let mut worst = 0f32;
    for (row, &p) in pad.iter().enumerate() {
        // A decode step's single position is never padding.
        let from = if seq == 1 { 0 } else { p };
        for t in from..seq {
            let i = (row * seq + t) * hidden;
            for h in 0..hidden {
                worst = worst.max((a.data[i + h] - e.data[i + h]).abs());
            }
        }
    }
    assert!(
        worst <= REL_TOL * scale,
        "{what}: max |diff| {worst:e} exceeds {REL_TOL} x {scale:e}"
    );
}

fn check(family: &str, window: Option<usize>) {
    let seq = 90;
    for (pad, extras) in [(vec![0], false), (vec![0, 5, 17], false), (vec![0, 5, 17], true)] {
        let case = Case::new(family, window, pad.clone(), seq, extras);
        let what = |v: &str| format!("{family} window {window:?} pad {pad:?} extras {extras}: {v}");
        let (reference, mut ref_cache) = case.one_shot(AttentionTiling::OFF);
        let ref_next = case.decode(AttentionTiling::OFF, &mut ref_cache);
        let (tiled, _) = case.one_shot(tiles(16));
        assert_close(&what("one-shot, tiles of 16"), tiled, reference.clone(), &pad);
        let (odd, _) = case.one_shot(tiles(13));
        assert_close(&what("one-shot, tiles of 13"), odd, reference.clone(), &pad);
        for (chunk, tiling) in [
            (7, AttentionTiling::OFF),
            (64, AttentionTiling::OFF),
            (7, tiles(16)),
            (64, tiles(16)),
        ] {
            let (y, mut cache) = case.chunked(tiling, chunk);
            assert_close(
                &what(&format!("chunks of {chunk}, {tiling:?}")),
                y,
                reference.clone(),
                &pad,
            );
            let next = case.decode(tiling, &mut cache);
            assert_close(
                &what(&format!("decode after chunks of {chunk}, {tiling:?}")),
                next,
                ref_next.clone(),
                &pad,
            );
        }
        assert_close(
            &what("stateless"),
            case.stateless(AttentionTiling::default()),
            reference.clone(),
            &pad,
        );
        assert_close(
            &what("stateless, tiles of 16"),
            case.stateless(tiles(16)),
            reference,
            &pad,
        );
    }
}

#[test]
fn llama_chunked_and_tiled_match_one_shot() {
    check("llama", None);
}

#[test]
fn mistral_sliding_window_chunked_and_tiled_match_one_shot() {
    check("mistral", Some(20));
    check("mistral", None);
}

#[test]
fn mixtral_chunked_and_tiled_match_one_shot() {
    check("mixtral", None);
}

#[test]
fn qwen2_chunked_and_tiled_match_one_shot() {
    check("qwen2", None);
}

#[test]
fn bloom_alibi_chunked_and_tiled_match_one_shot() {
    check("bloom", None);
}

#[test]
fn falcon_chunked_and_tiled_match_one_shot() {
    check("falcon", None);
}

#[test]
fn a_capped_session_cache_refuses_to_grow_past_its_length() {
    let case = Case::new("llama", None, vec![0, 3], 40, false);
    let span = case.span(AttentionTiling::default());
    let mut cache = span.new_session_cache(case.pad.clone(), 30);
    let err = span
        .forward_chunked(case.x.clone(), &mut cache, span.range(), None, None, 8)
        .expect_err("40 positions do not fit 30");
    assert!(
        matches!(
            err,
            shared_model::ModelError::Cache(shared_model::cache::CacheError::Full { needed: 40, max: 30 })
        ),
        "{err}"
    );
    assert_eq!(cache.len, 0, "a refused step changes nothing");
    assert_eq!(cache.allocated_positions(), 0);
    let y = span
        .forward_chunked(case.x.clone().narrow(1, 0, 30), &mut cache, span.range(), None, None, 8)
        .expect("30 fit");
    assert_eq!(y.dims(), [2, 30, 64]);
    let layers = span.range().len();
    assert!(
        cache.allocated_positions() <= layers * 2 * 30,
        "{}",
        cache.allocated_positions()
    );
    assert!(
        span.forward_blocks(case.x.clone().narrow(1, 0, 1), &mut cache, span.range(), |_, _| {})
            .is_err(),
        "the 31st position is refused"
    );
}

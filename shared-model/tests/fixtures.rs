//! Every public fixture against Hugging Face transformers: embeddings, each block's output,
//! logits, greedy generation through the KV cache, the loss and its gradient w.r.t. the input
//! embeddings (CPU, f32, 1e-4 relative to each tensor's largest magnitude).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use shared_model::generate::{GenerateParams, LocalBlocks, generate};
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::{BlockSpan, next_token_loss, to_host};
use shared_model::sampling::SamplingParams;
use shared_model::weights::{SafetensorsSource, WeightSource};
use shared_model::{Cpu, CpuAutodiff};

const REL_TOL: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family)
}

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(family: &str) -> Self {
        let bytes = std::fs::read(fixture(family).join("golden.safetensors")).expect("golden.safetensors");
        Self { bytes }
    }

    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid golden file");
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden has no {name}"));
        assert_eq!(t.dtype(), Dtype::F32);
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }

    fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid golden file");
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden has no {name}"));
        assert_eq!(t.dtype(), Dtype::I64);
        let cols = t.shape()[1];
        let flat: Vec<u32> = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
            .collect();
        flat.chunks(cols).map(<[u32]>::to_vec).collect()
    }
}

fn assert_close(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= REL_TOL * scale,
        "{what}: max |diff| {worst:e} exceeds {REL_TOL} x max |expected| {scale:e}"
    );
}

fn check_family(family: &str) {
    let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
    let golden = Golden::open(family);
    let ids = golden.ids("input_ids");
    let (batch, seq) = (ids.len(), ids[0].len());
    let device = Default::default();
    let model = LocalModel::<Cpu>::load(&files, &device).expect("fixture loads");
    let config = &files.config;

    // Embeddings, every block, logits: one pass through a session cache.
    let x = model.embeddings.forward(&ids).expect("embeds");
    assert_close(
        &format!("{family} block_in.0"),
        &to_host(x.clone()).data,
        &golden.f32("block_in.0").1,
    );
    let span = &model.spans[0];
    let mut cache = span.new_cache(vec![0; batch]);
    let mut outputs = Vec::new();
    let h = span
        .forward_inspect(x, &mut cache, |i, out| outputs.push((i, to_host(out.clone()))))
        .expect("forward");
    assert_eq!(outputs.len(), config.num_layers);
    for (i, out) in &outputs {
        let (shape, expected) = golden.f32(&format!("block_out.{i}"));
        assert_eq!(out.shape, shape);
        assert_close(&format!("{family} block_out.{i}"), &out.data, &expected);
    }
    let logits = to_host(model.head.forward(h));
    let (shape, expected) = golden.f32("logits");
    assert_eq!(logits.shape, shape);
    assert_close(&format!("{family} logits"), &logits.data, &expected);

    // Greedy generation: prefill, then one token at a time through the KV cache.
    let generated = golden.ids("generated");
    let new_tokens = generated[0].len() - seq;
    let params = GenerateParams {
        max_new_tokens: new_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: files.stop_ids.clone(),
        ignore_eos: true,
    };
    let mut blocks = LocalBlocks::new(&model.spans).expect("spans cover the model");
    let out = generate(&model.embeddings, &model.head, &mut blocks, &ids, &params, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("generate");
    for row in 0..batch {
        assert_eq!(out[row], generated[row][seq..], "{family} row {row}: greedy tokens");
    }

    // Loss and its gradient w.r.t. the input embeddings (before BLOOM's embedding norm).
    let model = LocalModel::<CpuAutodiff>::load(&files, &device).expect("fixture loads");
    let raw = model.embeddings.embed_raw(&ids).expect("embeds");
    let raw = Tensor::<CpuAutodiff, 3>::from_data(raw.into_data(), &device).require_grad();
    let h = model.spans[0]
        .forward_full(model.embeddings.finish(raw.clone()), vec![0; batch])
        .expect("forward");
    let loss = next_token_loss(model.head.forward(h), &ids).expect("loss");
    let grads = loss.backward();
    let loss = loss.into_data().to_vec::<f32>().expect("f32")[0];
    let expected_loss = golden.f32("loss").1[0];
    assert!(
        (loss - expected_loss).abs() <= REL_TOL * expected_loss.abs(),
        "{family} loss {loss} vs {expected_loss}"
    );
    let grad = raw.grad(&grads).expect("input has a gradient");
    let (shape, expected) = golden.f32("grad_inputs_embeds");
    assert_eq!(grad.dims().to_vec(), shape);
    assert_close(&format!("{family} grad_inputs_embeds"), &to_host(grad).data, &expected);
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn mistral_matches_transformers() {
    check_family("mistral");
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn bloom_matches_transformers() {
    check_family("bloom");
}

#[test]
fn falcon_matches_transformers() {
    check_family("falcon");
}

/// A span of a sharded checkpoint opens exactly the shards that hold its tensors.
#[test]
fn sharded_span_opens_only_its_shards() {
    for family in ["llama", "mixtral"] {
        let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
        let config = &files.config;
        let index = fixture(family).join("model.safetensors.index.json");
        let all_shards: BTreeSet<PathBuf> = SafetensorsSource::open_index(&index).expect("index").files_for(
            SafetensorsSource::open_index(&index)
                .expect("index")
                .names()
                .iter()
                .map(String::as_str),
        );
        for (start, end) in [(0, 1), (1, 3), (3, 4)] {
            let source = SafetensorsSource::open_index(&index).expect("index");
            let names = source.names();
            let wanted: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| (start..end).any(|i| n.starts_with(&format!("model.layers.{i}."))))
                .collect();
            let expected = source.files_for(wanted);
            BlockSpan::<Cpu>::load(config, &source, start..end, &Default::default()).expect("span loads");
            let opened = source.opened_files();
            assert_eq!(opened, expected, "{family} blocks {start}..{end}");
            assert!(
                opened.len() < all_shards.len(),
                "{family}: a span must not open every shard"
            );
        }
    }
}

/// Left-padded batch rows give the same logits as each sequence run alone.
#[test]
fn left_padding_matches_unpadded_runs() {
    for family in ["llama", "bloom", "falcon"] {
        let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
        let model = LocalModel::<Cpu>::load(&files, &Default::default()).expect("loads");
        let short = vec![5u32, 17, 42];
        let long = vec![9u32, 8, 7, 6, 5, 4];
        let params = GenerateParams {
            max_new_tokens: 6,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            ignore_eos: true,
        };
        let run = |prompts: &[Vec<u32>]| {
            let mut blocks = LocalBlocks::new(&model.spans).expect("spans");
            generate(&model.embeddings, &model.head, &mut blocks, prompts, &params, |_| {
                std::ops::ControlFlow::Continue(())
            })
            .expect("generate")
        };
        let both = run(&[short.clone(), long.clone()]);
        assert_eq!(both[0], run(&[short])[0], "{family}: padded row");
        assert_eq!(both[1], run(&[long])[0], "{family}: unpadded row");
    }
}

/// A checkpoint with a tensor no part reads, or without one a part needs, is refused.
#[test]
fn missing_and_unused_tensors_are_errors() {
    let dir = tempdir("corolla-bad-ckpt");
    let src = fixture("qwen2");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("copy");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("valid");
    let write = |skip: Option<&str>, extra: bool| {
        let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| Some(n.as_str()) != skip)
            .collect();
        if extra {
            let (_, v) = st.tensors().into_iter().next().expect("a tensor");
            tensors.push(("model.layers.0.self_attn.mystery.weight".into(), v));
        }
        safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).expect("write");
    };
    write(Some("model.layers.2.mlp.up_proj.weight"), false);
    let err = LocalModel::<Cpu>::load(&ModelFiles::open(&dir).expect("opens"), &Default::default())
        .err()
        .expect("missing tensor must fail");
    assert!(err.to_string().contains("model.layers.2.mlp.up_proj.weight"), "{err}");
    write(None, true);
    let err = LocalModel::<Cpu>::load(&ModelFiles::open(&dir).expect("opens"), &Default::default())
        .err()
        .expect("unused tensor must fail");
    assert!(err.to_string().contains("mystery"), "{err}");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

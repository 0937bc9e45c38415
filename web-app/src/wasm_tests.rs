//! Browser-side checks, run in headless Chromium by wasm-bindgen-test: the tokenizer compiled
//! to WASM gives transformers' ids, and the embeddings and LM head on burn's CPU backend in
//! WASM reproduce the fixtures' golden tensors.

use burn::prelude::*;
use safetensors::SafeTensors;
use shared_model::bundle::BundleWeights;
use shared_model::model::{Embeddings, LmHead, to_host};
use shared_model::tokenizer::Tokenizer;
use shared_model::{Cpu, ModelConfig};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

const TOKENIZER: &str = include_str!("../../tests/fixtures/smollm2-tokenizer.json");
const GOLDEN: &str = include_str!("../../tests/fixtures/smollm2-golden.json");

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[wasm_bindgen_test]
fn tokenizer_in_wasm_gives_transformers_ids() {
    let tokenizer = Tokenizer::from_json(TOKENIZER).expect("tokenizer");
    let golden: serde_json::Value = serde_json::from_str(GOLDEN).expect("golden");
    let cases = golden["cases"].as_object().expect("cases");
    assert!(cases.len() >= 2);
    for (name, case) in cases {
        // The chat case's prompt is already rendered through SmolLM2's ChatML template.
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            tokenizer.encode(prompt).expect("encode"),
            ids(&case["prompt_ids"]),
            "case {name}"
        );
        let decoded = tokenizer.decode(&ids(&case["greedy_ids"]), false).expect("decode");
        assert_eq!(decoded, case["greedy_text"].as_str().expect("text"), "case {name}");
    }
}

fn golden_tensor(golden: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = golden.tensor(name).expect("golden tensor");
    let data = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        // Token ids are stored as i64.
        safetensors::Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), data)
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{name}: max error {worst} vs scale {scale}");
}

/// Embeddings (`block_in.0`) and logits (from the last `block_out`) against transformers.
fn check_family(config: &str, files: Vec<Vec<u8>>, golden: &[u8]) {
    let config = ModelConfig::from_json_str(config).expect("config");
    let weights = BundleWeights::from_safetensors(files).expect("weights");
    let golden = SafeTensors::deserialize(golden).expect("golden");
    let device = Default::default();
    let embeddings = Embeddings::<Cpu>::load(&config, &weights, &device).expect("embeddings");
    let head = LmHead::<Cpu>::load(&config, &weights, &device).expect("head");

    let (shape, input) = golden_tensor(&golden, "input_ids");
    let rows: Vec<Vec<u32>> = input
        .chunks(shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    let (_, block_in) = golden_tensor(&golden, "block_in.0");
    assert_close(
        "block_in.0",
        &to_host(embeddings.forward(&rows).expect("embed")).data,
        &block_in,
    );

    let last = format!("block_out.{}", config.num_layers - 1);
    let (shape, hidden) = golden_tensor(&golden, &last);
    let x = Tensor::<Cpu, 3>::from_data(TensorData::new(hidden, [shape[0], shape[1], shape[2]]), &device);
    let (_, logits) = golden_tensor(&golden, "logits");
    assert_close("logits", &to_host(head.forward(x)).data, &logits);
}

#[wasm_bindgen_test]
fn llama_embeddings_and_head_match_on_the_wasm_cpu() {
    check_family(
        include_str!("../../tests/fixtures/llama/config.json"),
        vec![
            include_bytes!("../../tests/fixtures/llama/model-00001-of-00020.safetensors").to_vec(),
            include_bytes!("../../tests/fixtures/llama/model-00019-of-00020.safetensors").to_vec(),
            include_bytes!("../../tests/fixtures/llama/model-00020-of-00020.safetensors").to_vec(),
        ],
        include_bytes!("../../tests/fixtures/llama/golden.safetensors"),
    );
}

#[wasm_bindgen_test]
fn bloom_embeddings_and_head_match_on_the_wasm_cpu() {
    // BLOOM adds a LayerNorm after the lookup and ties the head to the embeddings.
    check_family(
        include_str!("../../tests/fixtures/bloom/config.json"),
        vec![include_bytes!("../../tests/fixtures/bloom/model.safetensors").to_vec()],
        include_bytes!("../../tests/fixtures/bloom/golden.safetensors"),
    );
}

/// A client bundle's digest in WASM: the same value as natively (the file and value pinned in
/// `shared_model::bundle::digest`'s tests), and fast enough to check a large bundle before
/// using it (SmolLM2's is 31 MB); the time for 128 MB goes to the test log.
#[wasm_bindgen_test]
fn bundle_digests_in_wasm_agree_with_native_and_are_fast() {
    use safetensors::tensor::TensorView;
    use shared_model::bundle::digest;

    let file = |len: usize, shape: Vec<usize>| {
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        let view = TensorView::new(safetensors::Dtype::U8, shape, &data).expect("view");
        let metadata = std::collections::HashMap::from([("k".to_string(), "v".to_string())]);
        safetensors::serialize([("t".to_string(), view)], Some(metadata)).expect("serialize")
    };
    assert_eq!(
        digest(&file(4096, vec![64, 64])).expect("digest"),
        "dc33e1783d7eebd1ca352459099cb1768bd9d8224bf03988759aca4a3877522e"
    );

    let len = 128 << 20;
    let big = file(len, vec![len]);
    let performance = web_sys::window().and_then(|w| w.performance()).expect("performance");
    let start = performance.now();
    let d = digest(&big).expect("digest");
    let ms = performance.now() - start;
    wasm_bindgen_test::console_log!(
        "digest of a {} MB bundle in WASM: {ms:.0} ms ({:.0} MB/s) {d}",
        len >> 20,
        (len as f64 / 1e6) / (ms / 1e3)
    );
    // Generous: a check that takes minutes would make the page unusable.
    assert!(ms < 30_000.0, "{ms} ms");
}

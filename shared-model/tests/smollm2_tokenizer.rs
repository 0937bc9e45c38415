//! The SmolLM2-135M-Instruct Q4_1 GGUF against golden data from transformers.
//!
//! Needs `COROLLA_SMOLLM2_GGUF` pointing at `SmolLM2-135M-Instruct.Q4_1.gguf` (sha256
//! b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).

use std::path::PathBuf;

use serde_json::Value;
use shared_model::gguf::{GgufFile, GgufModel};
use shared_model::tokenizer::{ChatMessage, Tokenizer};
use shared_model::weights::WeightSource;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-golden.json");

fn gguf_path() -> PathBuf {
    match std::env::var_os("COROLLA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "set COROLLA_SMOLLM2_GGUF to the path of SmolLM2-135M-Instruct.Q4_1.gguf: \
             `cargo run --release --bin corolla -- fetch` downloads it and prints the path \
             (scripts/test.sh does both)"
        ),
    }
}

fn open() -> GgufFile {
    let path = gguf_path();
    GgufFile::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

fn golden() -> Value {
    let text = std::fs::read_to_string(GOLDEN).unwrap_or_else(|e| panic!("cannot read {GOLDEN}: {e}"));
    serde_json::from_str(&text).expect("golden file is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let tok = Tokenizer::from_gguf(&open()).expect("tokenizer from GGUF");
    assert_eq!(tok.vocab_size(), 49152);
    let golden = golden();
    for case in ["story", "chat_france"] {
        let c = &golden["cases"][case];
        let prompt = c["prompt"].as_str().expect("prompt");
        assert_eq!(
            tok.encode(prompt).expect("encode"),
            ids(&c["prompt_ids"]),
            "encode {case}"
        );
        let greedy = ids(&c["greedy_ids"]);
        let text = c["greedy_text"].as_str().expect("greedy_text");
        assert_eq!(tok.decode(&greedy, false).expect("decode"), text, "decode {case}");

        // Streaming the same ids gives the same text.
        let mut stream = tok.stream(false);
        let mut streamed = String::new();
        for &id in &greedy {
            streamed.push_str(&stream.push(id).expect("push"));
        }
        streamed.push_str(&stream.finish().expect("finish"));
        assert_eq!(streamed, text, "stream {case}");
    }
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert!(tok.end_of_turn_ids().contains(&2));
    // Specials are skippable when decoding.
    assert_eq!(tok.decode(&[1, 4093, 198, 2], true).expect("decode"), "user\n");
}

#[test]
fn renders_the_embedded_chat_template() {
    let tok = Tokenizer::from_gguf(&open()).expect("tokenizer from GGUF");
    let template = tok
        .chat_template()
        .expect("template compiles")
        .expect("GGUF has a template");
    let text = template
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .expect("render");
    assert!(
        text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{text:?}"
    );
    assert!(
        text.ends_with("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        "{text:?}"
    );
}

#[test]
fn maps_tensors_to_hugging_face_names() {
    let file = open();
    assert_eq!(file.tensors().len(), 272);
    let model = GgufModel::new(file).expect("llama GGUF");
    let names = model.names();
    let per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    let mut expected: std::collections::BTreeSet<String> = ["model.embed_tokens.weight", "model.norm.weight"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for l in 0..30 {
        for p in per_layer {
            expected.insert(format!("model.layers.{l}.{p}"));
        }
    }
    assert_eq!(names, expected);

    let cfg = model.hf_config().expect("config");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 576);
    assert_eq!(cfg["intermediate_size"], 1536);
    assert_eq!(cfg["num_hidden_layers"], 30);
    assert_eq!(cfg["num_attention_heads"], 9);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["head_dim"], 64);
    assert_eq!(cfg["vocab_size"], 49152);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["max_position_embeddings"], 8192);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert!(cfg["rope_scaling"].is_null());

    let q = model.read("model.layers.0.self_attn.q_proj.weight").expect("q_proj");
    assert_eq!(q.shape, vec![576, 576]);
    assert!(q.data.iter().all(|x| x.is_finite()));
    let k = model.read("model.layers.0.self_attn.k_proj.weight").expect("k_proj");
    assert_eq!(k.shape, vec![192, 576]);
    let emb = model.read("model.embed_tokens.weight").expect("embeddings");
    assert_eq!(emb.shape, vec![49152, 576]);
    assert!(emb.data.iter().all(|x| x.is_finite()));
    assert!(emb.data.iter().any(|&x| x != 0.0));
    let norm = model.read("model.norm.weight").expect("norm");
    assert_eq!(norm.shape, vec![576]);
}

/// Weights kept quantized (rows un-permuted in block form) equal the dequantized reads.
#[test]
fn quantized_reads_match_dequantized_reads() {
    let model = GgufModel::new(open()).expect("llama GGUF");
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let quant = model.read_quant(name).expect("readable").expect("stored quantized");
        let dense = model.read(name).expect("readable");
        assert_eq!(quant.dequantize().expect("dequantizes"), dense, "{name}");
    }
    // Norms are f32 in the file: no quantized form.
    assert!(model.read_quant("model.norm.weight").expect("readable").is_none());
}

/// The copy the browser-side tests use (`tests/fixtures/smollm2-tokenizer.json`, made by
/// `examples/export_tokenizer.rs`) is the tokenizer the GGUF gives.
#[test]
fn exported_tokenizer_json_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-tokenizer.json");
    let committed = std::fs::read_to_string(path).expect("tests/fixtures/smollm2-tokenizer.json");
    let from_gguf = Tokenizer::from_gguf(&open())
        .expect("tokenizer")
        .to_json()
        .expect("json");
    assert!(
        committed == from_gguf,
        "{path} is stale: regenerate it with examples/export_tokenizer.rs"
    );
}

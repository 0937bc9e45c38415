//! Hugging Face `config.json` deserialized and validated into a `ModelConfig` (what a server
//! reads from a model folder and a client from a server's bundle), and the sizes derived from a
//! config that passed.
//!
//! Input: JSON text when it starts with `{` or whitespace; anything else is read as choices
//! building a config object field by field (`corolla_fuzz::json::Shape`), which reaches edge
//! values of every field far sooner than mutating text does.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Unstructured;
use corolla_fuzz::json::Shape;
use libfuzzer_sys::fuzz_target;
use shared_model::ModelConfig;
use shared_model::bundle::client_f32_bytes;
use shared_model::config::HfConfig;

fn shape() -> &'static Shape {
    static SHAPE: OnceLock<Shape> = OnceLock::new();
    SHAPE.get_or_init(|| Shape::of::<HfConfig>(include_str!("../dicts/config.dict")))
}

fn check(config: &ModelConfig) {
    let a = &config.attention;
    assert!(config.vocab_size > 0 && config.hidden_size > 0 && config.num_layers > 0);
    assert!(a.num_heads > 0 && a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0);
    assert!(config.eos_token_ids.iter().all(|&id| (id as usize) < config.vocab_size));
    let _ = (config.head_dim(), config.qkv_width(), client_f32_bytes(config));
}

fuzz_target!(|data: &[u8]| {
    let config = match data.first() {
        None => return,
        Some(b'{' | b' ' | b'\t' | b'\n' | b'\r') => match std::str::from_utf8(data) {
            Ok(text) => ModelConfig::from_json_str(text),
            Err(_) => return,
        },
        Some(_) => match shape().object(&mut Unstructured::new(data)) {
            Ok(value) => ModelConfig::from_json_value(value),
            Err(_) => return,
        },
    };
    if let Ok(config) = config {
        check(&config);
    }
});

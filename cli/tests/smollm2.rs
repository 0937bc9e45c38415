//! SmolLM2-135M-Instruct from its Q4_1 GGUF: the greedy tokens of Hugging Face transformers.

mod common;

use std::path::Path;

use common::*;

fn golden() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2-golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden file")).expect("json")
}

#[test]
fn greedy_generation_matches_transformers() {
    let model = smollm2();
    let golden = golden();
    for (name, case) in golden["cases"].as_object().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let out = corolla(&[
            "generate",
            "--model",
            model.to_str().expect("utf-8"),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "32",
            "--temperature",
            "0",
            "--json",
        ]);
        let json = stdout_json(&out);
        assert_eq!(
            ids_of(&json["prompt_ids"]),
            ids_of(&case["prompt_ids"]),
            "{name}: prompt ids"
        );
        assert_eq!(
            ids_of(&json["token_ids"]),
            ids_of(&case["greedy_ids"]),
            "{name}: greedy ids"
        );
        assert_eq!(json["text"], case["greedy_text"], "{name}: text");
    }
}

#[test]
fn chat_flag_applies_the_template_and_stops_at_end_of_turn() {
    let model = smollm2();
    let out = corolla(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "64",
        "--json",
    ]);
    let json = stdout_json(&out);
    let prompt = ids_of(&json["prompt_ids"]);
    // <|im_start|>system ... <|im_start|>assistant\n
    assert_eq!(prompt[0], 1);
    assert_eq!(&prompt[prompt.len() - 3..], &[1, 520, 9531, 198][1..]);
    let tokens = ids_of(&json["token_ids"]);
    assert_eq!(tokens.last(), Some(&2), "ends with <|im_end|>");
    assert!(tokens.len() < 64);
    assert!(json["text"].as_str().expect("text").contains("Paris"), "{json}");
}

#[test]
fn demo_answers_a_prompt() {
    let model = smollm2();
    let out = corolla(&[
        "demo",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("Paris"), "{text}");
    assert!(!text.contains("<|im_end|>"), "special tokens are not printed: {text}");
}

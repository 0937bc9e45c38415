//! The `corolla` command-line contract, run as a real process.

mod common;

use common::*;

const FAMILIES: [&str; 6] = ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"];

#[test]
fn generate_json_matches_the_fixtures_greedy_tokens() {
    for family in FAMILIES {
        let golden = std::fs::read(fixture(family).join("golden.safetensors")).expect("golden");
        let inputs = id_rows(&golden, "input_ids");
        let generated = id_rows(&golden, "generated");
        for (row, prompt) in inputs.iter().enumerate() {
            let new = generated[row].len() - prompt.len();
            let out = corolla(&[
                "generate",
                "--model",
                fixture(family).to_str().expect("utf-8"),
                "--token-ids",
                &ids_arg(prompt),
                "--max-new-tokens",
                &new.to_string(),
                "--temperature",
                "0",
                "--ignore-eos",
                "--json",
            ]);
            let json = stdout_json(&out);
            assert_eq!(ids_of(&json["prompt_ids"]), *prompt);
            assert_eq!(
                ids_of(&json["token_ids"]),
                generated[row][prompt.len()..],
                "{family} row {row}"
            );
        }
    }
}

#[test]
fn forward_writes_logits_and_block_outputs() {
    let dir = std::env::temp_dir().join(format!("corolla-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for family in FAMILIES {
        let golden = std::fs::read(fixture(family).join("golden.safetensors")).expect("golden");
        let ids = &id_rows(&golden, "input_ids")[1];
        let out_path = dir.join(format!("{family}.safetensors"));
        let out = corolla(&[
            "forward",
            "--model",
            fixture(family).to_str().expect("utf-8"),
            "--token-ids",
            &ids_arg(ids),
            "--out",
            out_path.to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let written = std::fs::read(&out_path).expect("output written");
        let mut names = vec!["logits".to_string()];
        names.extend((0..4).map(|i| format!("block_out.{i}")));
        for name in names {
            let (shape, data) = f32_tensor(&written, &name);
            let (gshape, gdata) = f32_tensor(&golden, &name);
            // Row 1 of the golden batch.
            assert_eq!(shape, gshape[1..], "{family} {name}");
            let row = &gdata[gdata.len() / 2..];
            let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = data.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4 * scale, "{family} {name}: {worst:e} vs scale {scale:e}");
        }
    }
}

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn errors_are_one_clear_line() {
    let llama = fixture("llama");
    let llama = llama.to_str().expect("utf-8");
    let missing = corolla(&["generate", "--model", "/no/such/model", "--token-ids", "1,2", "--json"]);
    assert_one_line_error(&missing, "/no/such/model");
    // A fingerprint names a model of the swarm, which needs a way in.
    let fingerprint = corolla(&[
        "generate",
        "--model",
        "00112233445566778899aabbccddeeff",
        "--token-ids",
        "1",
    ]);
    assert_one_line_error(&fingerprint, "give --initial-peers");

    let dir = std::env::temp_dir().join(format!("corolla-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.json"), r#"{"model_type":"gpt_neox","vocab_size":10}"#).expect("write");
    let bad = corolla(&[
        "generate",
        "--model",
        dir.to_str().expect("utf-8"),
        "--token-ids",
        "1",
        "--json",
    ]);
    assert_one_line_error(&bad, "gpt_neox");

    let out_of_range = corolla(&["generate", "--model", llama, "--token-ids", "1,384", "--json"]);
    assert_one_line_error(&out_of_range, "token id 384 is out of range");

    let long: Vec<u32> = (0..300).map(|i| i % 384).collect();
    let too_long = corolla(&["generate", "--model", llama, "--token-ids", &ids_arg(&long)]);
    assert_one_line_error(&too_long, "longer than the model's context of 256");

    let no_tokenizer = corolla(&["generate", "--model", llama, "--prompt", "hello"]);
    assert_one_line_error(&no_tokenizer, "no tokenizer");

    let forward_missing = corolla(&[
        "forward",
        "--model",
        "/no/such/model",
        "--token-ids",
        "1",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert_one_line_error(&forward_missing, "/no/such/model");
}

#[test]
fn max_new_tokens_is_exact_and_sampling_is_seeded() {
    let llama = fixture("llama");
    let llama = llama.to_str().expect("utf-8");
    let run = |seed: &str| {
        let out = corolla(&[
            "generate",
            "--model",
            llama,
            "--token-ids",
            "1,2,3",
            "--max-new-tokens",
            "20",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        ids_of(&stdout_json(&out)["token_ids"])
    };
    let a = run("1");
    assert_eq!(a.len(), 20);
    assert_eq!(a, run("1"));
    assert_ne!(a, run("2"));
}

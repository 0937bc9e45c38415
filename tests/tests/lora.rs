//! LoRA adapters in PEFT's layout: applied on top of frozen weights they change the outputs
//! exactly as merging them into the weights does, locally and through a server that hosts
//! them; a client that asks for an adapter is routed only to servers that have it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use burn::prelude::*;
use corolla_tests::{Proc, bin, fixture, temp_dir, wait_for_file_lines};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shared_model::Cpu;
use shared_model::layers::lora::LoraAdapter;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::to_host;
use shared_model::weights::{HostTensor, SafetensorsSource, WeightSource};

const STARTUP: Duration = Duration::from_secs(60);
const R: usize = 2;
const ALPHA: f32 = 4.0;
const TARGETS: [(&str, &str); 5] = [
    ("self_attn", "q_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "down_proj"),
];

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn values(n: usize, k: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * k + 7) % 53) as f32 - 26.0) / 26.0 * scale)
        .collect()
}

/// Writes a PEFT adapter for `model` into `dir/name` and a copy of the model with it merged
/// into `dir/merged`; returns both paths.
fn adapter_and_merged(model: &Path, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let source = SafetensorsSource::open_dir(model).expect("model");
    let mut weights: BTreeMap<String, HostTensor> = source
        .names()
        .into_iter()
        .map(|n| (n.clone(), source.read(&n).expect("tensor")))
        .collect();
    let files = ModelFiles::open(model).expect("model");
    let layers = files.config.num_layers;
    let mut lora = BTreeMap::new();
    for layer in 0..layers {
        for (t, (sub, module)) in TARGETS.iter().enumerate() {
            let base = format!("model.layers.{layer}.{sub}.{module}");
            let w = weights.get_mut(&format!("{base}.weight")).expect("target weight");
            let (out, inp) = (w.shape[0], w.shape[1]);
            let a = HostTensor::new(vec![R, inp], values(R * inp, 5 + t + layer, 0.4));
            let b = HostTensor::new(vec![out, R], values(out * R, 11 + 3 * t + layer, 0.4));
            // The merge PEFT does: W += (alpha / r) B A.
            for o in 0..out {
                for i in 0..inp {
                    let ba: f32 = (0..R).map(|k| b.data[o * R + k] * a.data[k * inp + i]).sum();
                    w.data[o * inp + i] += ALPHA / R as f32 * ba;
                }
            }
            lora.insert(format!("base_model.model.{base}.lora_A.weight"), a);
            lora.insert(format!("base_model.model.{base}.lora_B.weight"), b);
        }
    }
    let adapter = dir.join(name);
    std::fs::create_dir_all(&adapter).expect("adapter dir");
    write_safetensors(&adapter.join("adapter_model.safetensors"), &lora);
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": TARGETS.iter().map(|(_, m)| *m).collect::<Vec<_>>(),
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).expect("adapter config");

    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).expect("merged dir");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(model.join(f), merged.join(f)).expect("copy config");
    }
    write_safetensors(&merged.join("model.safetensors"), &weights);
    (adapter, merged)
}

fn generate(model: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(bin("corolla"))
        .env("COROLLA_LOG", "info")
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args([
            "--token-ids",
            "359,310,172,47,105",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("corolla runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["token_ids"].clone(),
        stderr,
    )
}

#[test]
fn lora_equals_merged_weights_locally_and_through_a_server() {
    let model = fixture("llama");
    let dir = temp_dir("lora");
    let (adapter, merged) = adapter_and_merged(&model, &dir, "answer-lora");

    // Block outputs and logits: the unmerged adapter against the merged weights.
    let device = Default::default();
    let files = ModelFiles::open(&model).expect("model");
    let base = LocalModel::<Cpu>::load(&files, &device).expect("load");
    let merged_model = LocalModel::<Cpu>::load(&ModelFiles::open(&merged).expect("merged"), &device).expect("load");
    let lora = LoraAdapter::load(&adapter, &files.config, 0..files.config.num_layers)
        .expect("adapter")
        .to_device::<Cpu>(&device);
    let ids = [vec![359u32, 310, 172, 47, 105, 300], vec![3, 8, 7, 42, 9, 1]];
    let x = base.embeddings.forward(&ids).expect("embed");
    let span = &base.spans[0];
    let with = span
        .forward_full_prompted(x.clone(), vec![0, 2], span.range(), None, Some(&lora))
        .expect("forward");
    let without = to_host(
        span.forward_full_blocks(x.clone(), vec![0, 2], span.range())
            .expect("forward"),
    );
    let reference = to_host(
        merged_model.spans[0]
            .forward_full_blocks(x, vec![0, 2], span.range())
            .expect("forward"),
    );
    let logits = to_host(base.head.forward(with.clone()));
    let ref_logits = to_host(merged_model.head.forward(Tensor::from_data(
        TensorData::new(reference.data.clone(), reference.shape.clone()),
        &device,
    )));
    let with = to_host(with);
    let diff = |a: &HostTensor, b: &HostTensor| {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let scale = reference.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        diff(&with, &reference) <= 1e-4 * scale,
        "hidden states: {}",
        diff(&with, &reference)
    );
    assert!(
        diff(&logits, &ref_logits) <= 1e-4,
        "logits: {}",
        diff(&logits, &ref_logits)
    );
    assert!(
        diff(&without, &reference) > 1e-2 * scale,
        "the adapter must change the outputs"
    );

    // A tensor the loader cannot apply is refused, not skipped.
    let bad = dir.join("bad-adapter");
    std::fs::create_dir_all(&bad).expect("dir");
    std::fs::copy(adapter.join("adapter_config.json"), bad.join("adapter_config.json")).expect("copy");
    let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
    let good = SafetensorsSource::open_file(&adapter.join("adapter_model.safetensors")).expect("adapter");
    for n in good.names() {
        tensors.insert(n.clone(), good.read(&n).expect("tensor"));
    }
    tensors.insert(
        "base_model.model.lm_head.lora_A.weight".into(),
        HostTensor::new(vec![R, 64], vec![0.1; R * 64]),
    );
    write_safetensors(&bad.join("adapter_model.safetensors"), &tensors);
    let err = LoraAdapter::load(&bad, &files.config, 0..4).expect_err("must refuse");
    assert!(err.to_string().contains("lm_head"), "{err}");

    // Tokens: local adapter, merged model, and a swarm where only one server has the adapter.
    let (merged_tokens, _) = generate(&merged, &[]);
    let (plain_tokens, _) = generate(&model, &[]);
    assert_ne!(merged_tokens, plain_tokens, "the adapter must change the tokens");
    let adapter_arg = adapter.to_str().expect("utf-8 path");
    assert_eq!(generate(&model, &["--adapter", adapter_arg]).0, merged_tokens);

    let relay_file = dir.join("relay.addrs");
    let _relay = Proc::spawn(
        "relay",
        Command::new(bin("relay"))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
            .arg(&relay_file),
    );
    let relay = wait_for_file_lines(&relay_file, 1, STARTUP).remove(0);
    let server = |n: usize, extra: &[&str]| {
        let addr_file = dir.join(format!("server{n}.addrs"));
        let proc = Proc::spawn(
            &format!("server{n}"),
            Command::new(bin("server"))
                .arg("--model")
                .arg(&model)
                .args(["--blocks", "0:4", "--initial-peers", &relay])
                .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
                .arg(&addr_file)
                .args(extra),
        );
        let addr = wait_for_file_lines(&addr_file, 1, STARTUP).remove(0);
        (proc, addr.rsplit("/p2p/").next().expect("/p2p/<id>").to_string())
    };
    let (_with_adapter, with_id) = server(0, &["--adapters", adapter_arg]);
    let (_plain, plain_id) = server(1, &[]);
    for _ in 0..3 {
        let (tokens, log) = generate(&model, &["--adapter", "answer-lora", "--initial-peers", &relay]);
        assert_eq!(tokens, merged_tokens, "{log}");
        let route = log.lines().find(|l| l.contains("session route")).expect("route logged");
        assert!(route.contains(&with_id) && !route.contains(&plain_id), "{route}");
    }
    // Without an adapter both servers qualify and the base model answers.
    assert_eq!(generate(&model, &["--initial-peers", &relay]).0, plain_tokens);
    // An adapter nobody has: an error naming the missing blocks.
    let out = Command::new(bin("corolla"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args([
            "--token-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
            "--adapter",
            "nobody-has-it",
        ])
        .args(["--initial-peers", &relay])
        .output()
        .expect("corolla runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server for blocks 0..4"));
}

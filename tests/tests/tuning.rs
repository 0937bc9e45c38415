//! Prompt tuning and deep prompt tuning through a swarm of real processes on 127.0.0.1:
//! gradients equal local autodiff's, `corolla train` gives the same loss curve locally and
//! through the swarm, resumes exactly, survives a server killed mid-run, and
//! `corolla generate --prompts` gives the same tokens both ways.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use burn::prelude::*;
use corolla_tests::{STARTUP, Swarm, bin, fixture, temp_dir, wait_for_file_lines};
use shared_model::CpuAutodiff;
use shared_model::fingerprint::fingerprint;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::to_host;
use shared_model::tuning::{
    Example, LocalTrainBlocks, Prompts, TrainBatch, TrainBlocks, TuningMethod, masked_next_token_loss, train_step,
    with_prompt,
};
use shared_model::weights::HostTensor;
use swarm::node::{self, NodeConfig};
use swarm::protocol::Limits;
use swarm::remote::{RemoteBlocks, RemoteConfig};
use swarm::routing::RouteMode;
use swarm::wire::WireDtype;

fn ramp(shape: Vec<usize>, k: usize, scale: f32) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::new(
        shape,
        (0..n).map(|i| (((i * k) % 97) as f32 - 48.0) / 48.0 * scale).collect(),
    )
}

fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(a: &HostTensor) -> f32 {
    a.data.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// A swarm client for training, on its own runtime.
fn remote_blocks(swarm: &Swarm, files: &ModelFiles) -> (tokio::runtime::Runtime, RemoteBlocks<CpuAutodiff>) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut config = NodeConfig::new(libp2p::identity::Keypair::generate_ed25519());
    config.bootstrap = vec![swarm.relay_addr.parse().expect("addr")];
    let (client, _inbound, event_loop) = {
        let _guard = runtime.enter();
        node::start(config).expect("node")
    };
    runtime.spawn(event_loop.run());
    runtime
        .block_on(client.dial(swarm.relay_addr.parse().expect("addr")))
        .expect("dial relay");
    let cfg = &files.config;
    let remote_config = RemoteConfig {
        model: fingerprint(cfg, files.weights.as_ref()).expect("fingerprint"),
        model_name: files.path.display().to_string(),
        num_layers: cfg.num_layers,
        dtype: WireDtype::F32,
        step_timeout: Duration::from_secs(30),
        discovery_timeout: Duration::from_secs(10),
        max_failovers: 4,
        limits: Limits::default(),
        route_mode: RouteMode::MinLatency,
        deep_prompts: None,
        adapter: None,
        hidden_size: cfg.hidden_size,
        chunk_tokens: swarm::remote::DEFAULT_CHUNK_TOKENS,
        verify_rate: 0.0,
        verify_seed: 0,
        push: true,
    };
    let remote = RemoteBlocks::<CpuAutodiff>::new(runtime.handle().clone(), client, remote_config, Default::default());
    (runtime, remote)
}

/// The whole step as one autodiff graph in this process: the reference.
fn reference_grads(
    model: &LocalModel<CpuAutodiff>,
    prompts: &Prompts,
    batch: &TrainBatch,
) -> (f32, HostTensor, HostTensor) {
    let device = Default::default();
    let up2 = |t: &HostTensor| {
        Tensor::<CpuAutodiff, 2>::from_data(TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]), &device)
    };
    let deep = prompts.deep.as_ref().expect("deep prompts");
    let prompt = up2(&prompts.prompt).require_grad();
    let d = Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(deep.data.clone(), deep.shape.clone()), &device)
        .require_grad();
    let raw = model.embeddings.embed_raw(&batch.ids).expect("embed");
    let x = with_prompt(&model.embeddings, raw, &prompt, &vec![0; batch.ids.len()]);
    let span = &model.spans[0];
    let y = span
        .forward_full_prompted(x, vec![0; batch.ids.len()], span.range(), Some(&d), None)
        .expect("forward");
    let loss = masked_next_token_loss(model.head.forward(y), batch, prompts.prefix_len()).expect("loss");
    let value = loss.clone().into_scalar();
    let grads = loss.backward();
    (
        value,
        to_host(prompt.grad(&grads).expect("prompt grad")),
        to_host(d.grad(&grads).expect("deep grad")),
    )
}

/// Gradients of both prompt kinds through 3 servers (overlapping spans) equal one local
/// autodiff graph's, within 1e-4 of each gradient's largest magnitude.
#[test]
fn swarm_gradients_match_local_autodiff() {
    for family in ["llama", "bloom"] {
        let model_dir = fixture(family);
        let mut swarm = Swarm::start(&format!("grads-{family}"));
        for blocks in ["0:2", "2:4", "1:3"] {
            swarm.server(&model_dir, blocks, &[]);
        }
        let files = ModelFiles::open(&model_dir).expect("model");
        let device = Default::default();
        let model = LocalModel::<CpuAutodiff>::load(&files, &device).expect("load");
        let cfg = &files.config;
        let mut prompts = Prompts::init(
            TuningMethod::DeepPrompt,
            3,
            cfg.num_layers,
            cfg.vocab_size,
            &model.embeddings,
            5,
        )
        .expect("init");
        // Non-zero deep prompts, so that their effect on the forward is exercised too.
        prompts.deep = Some(ramp(vec![cfg.num_layers, 3, cfg.hidden_size], 31, 0.5));
        let examples = [
            Example {
                ids: vec![5, 17, 9, 7, 42, 11],
                weights: vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            },
            Example {
                ids: vec![3, 8, 7, 42],
                weights: vec![0.0, 0.0, 1.0, 1.0],
            },
        ];
        let batch = TrainBatch::new(&examples.iter().collect::<Vec<_>>(), 0).expect("batch");
        let (ref_loss, ref_prompt, ref_deep) = reference_grads(&model, &prompts, &batch);

        let (_runtime, mut remote) = remote_blocks(&swarm, &files);
        let mut local = LocalTrainBlocks::new(&model.spans, Default::default());

        for method in [TuningMethod::DeepPrompt, TuningMethod::Prompt] {
            let mut p = prompts.clone();
            p.method = method;
            if method == TuningMethod::Prompt {
                p.deep = None;
            }
            let (loss_r, grads_r) =
                train_step(&model.embeddings, &model.head, &mut remote, &p, &batch).expect("swarm step");
            let (loss_l, grads_l) =
                train_step(&model.embeddings, &model.head, &mut local, &p, &batch).expect("local step");
            assert!(
                (loss_r - loss_l).abs() < 1e-4,
                "{family} {method:?}: {loss_r} vs {loss_l}"
            );
            let tol = |t: &HostTensor| 1e-4 * max_abs(t).max(1e-6);
            assert!(
                max_diff(&grads_r.prompt, &grads_l.prompt) <= tol(&grads_l.prompt),
                "{family} {method:?}: prompt gradients differ"
            );
            if method == TuningMethod::DeepPrompt {
                assert!(
                    (loss_r - ref_loss).abs() < 1e-4,
                    "{family}: {loss_r} vs reference {ref_loss}"
                );
                assert!(max_abs(&ref_prompt) > 0.0 && max_abs(&ref_deep) > 0.0);
                assert!(
                    max_diff(&grads_r.prompt, &ref_prompt) <= tol(&ref_prompt),
                    "{family}: prompt gradient differs from one autodiff graph's"
                );
                let deep_r = grads_r.deep.as_ref().expect("deep grads");
                assert!(
                    max_diff(deep_r, &ref_deep) <= tol(&ref_deep),
                    "{family}: deep prompt gradients differ from one autodiff graph's"
                );
            } else {
                assert!(grads_r.deep.is_none());
            }
        }
        drop(remote);
    }
}

/// The tiny task: after marker 7 the model must answer 42 (and 7 again after 42).
fn write_task(dir: &Path) -> PathBuf {
    let path = dir.join("task.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            let mut ids = vec![7, 42, 7, 42, 7, 42];
            ids.truncate(4 + i % 3);
            serde_json::json!({ "token_ids": ids }).to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write task");
    path
}

fn train(model: &Path, data: &Path, out: &Path, method: &str, steps: usize, peers: Option<&str>) -> Vec<f64> {
    let mut cmd = Command::new(bin("corolla"));
    cmd.env("COROLLA_LOG", "warn,swarm=debug")
        .arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--method",
            method,
            "--prefix-len",
            "4",
            "--lr",
            "0.1",
            "--batch-size",
            "4",
        ])
        .args(["--seed", "3", "--steps", &steps.to_string(), "--json"]);
    if let Some(peers) = peers {
        cmd.args(["--initial-peers", peers]);
    }
    let out = cmd.output().expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json.as_object().map(|o| o.len()), Some(2), "{json}");
    json["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn assert_same_curve(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 1e-4, "{what}: step {i}: {x} vs {y}");
    }
}

/// `corolla train` drives the loss down by at least 10% on the tiny task (the fixtures are
/// random models whose small logits bound what any prompt can do), with the same curve
/// locally and through a 2-server swarm; and a run resumed from its output continues the curve
/// exactly.
#[test]
fn training_curves_match_locally_and_through_the_swarm() {
    let model = fixture("llama");
    let mut swarm = Swarm::start("train-curves");
    swarm.server(&model, "0:2", &[]);
    swarm.server(&model, "2:4", &[]);
    let dir = swarm.dir.clone();
    let data = write_task(&dir);
    for method in ["prompt", "deep-prompt"] {
        let local = train(
            &model,
            &data,
            &dir.join(format!("{method}-local.safetensors")),
            method,
            15,
            None,
        );
        assert!(
            local[14] < 0.9 * local[0],
            "{method}: the loss must fall by 10%: {local:?}"
        );
        let remote = train(
            &model,
            &data,
            &dir.join(format!("{method}-swarm.safetensors")),
            method,
            15,
            Some(&swarm.relay_addr),
        );
        assert_same_curve(&local, &remote, &format!("{method}: local vs swarm"));

        let resumed = dir.join(format!("{method}-resumed.safetensors"));
        let first = train(&model, &data, &resumed, method, 6, None);
        assert_same_curve(&first, &local[..6], &format!("{method}: first half"));
        let all = train(&model, &data, &resumed, method, 15, None);
        assert_same_curve(&all, &local, &format!("{method}: resumed run"));
        let csv = std::fs::read_to_string(resumed.with_extension("csv")).expect("loss log");
        assert_eq!(csv.lines().count(), 16, "{csv}");
        assert!(csv.starts_with("step,loss,tokens,seconds\n0,"), "{csv}");
    }

    // The deep prompts trained through the swarm serve inference sessions: same tokens as a
    // local run with them, other tokens than without them.
    let prompts = dir.join("deep-prompt-swarm.safetensors");
    let generate = |extra: &[&str]| {
        let out = Command::new(bin("corolla"))
            .arg("generate")
            .arg("--model")
            .arg(&model)
            .args([
                "--token-ids",
                "7,42,7",
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "--json",
            ])
            .args(extra)
            .output()
            .expect("corolla runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["token_ids"].clone()
    };
    let p = prompts.to_str().expect("utf-8 path");
    let tuned_local = generate(&["--prompts", p]);
    let tuned_swarm = generate(&["--prompts", p, "--initial-peers", &swarm.relay_addr]);
    assert_eq!(tuned_local, tuned_swarm);
    assert_ne!(tuned_local, generate(&[]), "the prompts must change the output");
}

/// A server killed (kill -9) in the middle of a training run: another covers its blocks and
/// the losses are those of an undisturbed run.
#[test]
fn training_survives_a_killed_server() {
    let model = fixture("llama");
    let mut swarm = Swarm::start("train-failover");
    let a = swarm.server(&model, "0:4", &[]);
    let b = swarm.server(&model, "0:4", &[]);
    let dir = swarm.dir.clone();
    let data = write_task(&dir);
    let steps = 150;
    let undisturbed = train(
        &model,
        &data,
        &dir.join("undisturbed.safetensors"),
        "deep-prompt",
        steps,
        None,
    );

    let out = dir.join("disturbed.safetensors");
    let log = dir.join("client.log");
    let client = Command::new(bin("corolla"))
        .env("COROLLA_LOG", "warn,swarm=debug")
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "deep-prompt",
            "--prefix-len",
            "4",
            "--lr",
            "0.1",
            "--batch-size",
            "4",
        ])
        .args(["--seed", "3", "--steps", &steps.to_string(), "--json"])
        .args(["--initial-peers", &swarm.relay_addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("corolla runs");
    // Wait for a few steps, then kill the server the run is using.
    wait_for_file_lines(&out.with_extension("csv"), 6, STARTUP);
    let text = std::fs::read_to_string(&log).expect("client log");
    let route = text
        .lines()
        .rev()
        .find(|l| l.contains("training route"))
        .expect("route logged");
    let victim = [&a, &b]
        .iter()
        .position(|p| route.contains(p.as_str()))
        .expect("route uses a or b");
    swarm.servers[victim].0.kill9();
    let output = client.wait_with_output().expect("exits");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(output.status.success(), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let losses: Vec<f64> = json["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    assert_same_curve(&losses, &undisturbed, "disturbed vs undisturbed");
    assert!(text.contains("re-routing"), "the client must have failed over: {text}");
}

/// The server that ran a forward dies before the backward: the backward is redone on a
/// replacement (which first reruns the lost hop's forward) and the gradients are unchanged.
#[test]
fn backward_after_a_server_dies_is_redone_elsewhere() {
    let model_dir = fixture("llama");
    let mut swarm = Swarm::start("backward-failover");
    swarm.server(&model_dir, "0:4", &[]);
    swarm.server(&model_dir, "0:4", &[]);
    let files = ModelFiles::open(&model_dir).expect("model");
    let model = LocalModel::<CpuAutodiff>::load(&files, &Default::default()).expect("load");
    let cfg = &files.config;
    let mut prompts = Prompts::init(
        TuningMethod::DeepPrompt,
        2,
        cfg.num_layers,
        cfg.vocab_size,
        &model.embeddings,
        1,
    )
    .expect("init");
    prompts.deep = Some(ramp(vec![cfg.num_layers, 2, cfg.hidden_size], 17, 0.3));
    let x = ramp(vec![1, 7, cfg.hidden_size], 3, 0.5);
    let g = ramp(vec![1, 7, cfg.hidden_size], 5, 1.0);

    let mut local = LocalTrainBlocks::new(&model.spans, Default::default());
    let out_l = TrainBlocks::forward(&mut local, &x, prompts.deep.as_ref()).expect("local forward");
    let (gx_l, gd_l) = local.backward(&g).expect("local backward");

    let (_runtime, mut remote) = remote_blocks(&swarm, &files);
    let out_r = TrainBlocks::forward(&mut remote, &x, prompts.deep.as_ref()).expect("swarm forward");
    assert!(max_diff(&out_r, &out_l) <= 1e-4 * max_abs(&out_l));
    let route = remote.train_route();
    assert_eq!(route.len(), 1, "{route:?}");
    let victim = swarm
        .servers
        .iter()
        .position(|(_, peer)| *peer == route[0].0)
        .expect("a known server");
    swarm.servers[victim].0.kill9();
    let (gx_r, gd_r) = remote.backward(&g).expect("swarm backward after failover");
    assert!(
        max_diff(&gx_r, &gx_l) <= 1e-4 * max_abs(&gx_l),
        "input gradients differ"
    );
    let (gd_r, gd_l) = (gd_r.expect("deep grads"), gd_l.expect("deep grads"));
    assert!(
        max_diff(&gd_r, &gd_l) <= 1e-4 * max_abs(&gd_l),
        "deep prompt gradients differ"
    );
    // The next step routes around the dead server from the start.
    TrainBlocks::forward(&mut remote, &x, prompts.deep.as_ref()).expect("swarm forward");
    assert_ne!(remote.train_route()[0].0, route[0].0);
}

/// A real model (SmolLM2) learns a completion from `{"prompt", "completion"}` text lines, and
/// `corolla generate --prompts` then answers with it.
#[test]
fn smollm2_learns_a_completion_and_generates_it() {
    let model = PathBuf::from(
        std::env::var("COROLLA_SMOLLM2_GGUF")
            .expect("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches SmolLM2 and sets it)"),
    );
    let dir = temp_dir("smollm2-tune");
    let data = dir.join("colour.jsonl");
    std::fs::write(
        &data,
        r#"{"prompt": "My favourite colour is", "completion": " turquoise"}"#,
    )
    .expect("write data");
    let out = dir.join("colour.safetensors");
    let run = Command::new(bin("corolla"))
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--prefix-len",
            "4",
            "--lr",
            "0.05",
            "--batch-size",
            "1",
            "--steps",
            "8",
            "--json",
        ])
        .output()
        .expect("corolla runs");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json");
    let losses: Vec<f64> = json["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    assert!(losses[7] < 0.25 * losses[0], "{losses:?}");
    let generate = |extra: &[&str]| {
        let out = Command::new(bin("corolla"))
            .arg("generate")
            .arg("--model")
            .arg(&model)
            .args(["--prompt", "My favourite colour is", "--max-new-tokens", "3", "--json"])
            .args(extra)
            .output()
            .expect("corolla runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["text"]
            .as_str()
            .expect("text")
            .to_string()
    };
    assert!(!generate(&[]).contains("turquoise"));
    let tuned = generate(&["--prompts", out.to_str().expect("utf-8 path")]);
    assert!(tuned.starts_with(" turquoise"), "{tuned:?}");
}

//! Every public fixture against Hugging Face transformers: embeddings, each block's output,
//! logits, greedy generation through the KV cache, the loss and its gradient w.r.t. the input
//! embeddings (CPU, f32, 1e-4 relative to each tensor's largest magnitude).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use shared_model::ModelError;
use shared_model::generate::{GenerateParams, LocalBlocks, TokenEvent, generate, generate_drafted};
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::{BlockSpan, next_token_loss, to_host};
use shared_model::sampling::SamplingParams;
use shared_model::speculative::{Draft, Drafter, ModelDrafter, PromptLookup};
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
        speculative: 0,
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

/// Proposes each row's known continuation with every third token wrong: drafts are kept,
/// cut short and rejected in every pattern, and the rows of a batch disagree on how many.
struct Oracle {
    /// Each row's whole expected sequence (prompt and generated tokens).
    rows: Vec<Vec<u32>>,
    vocab: u32,
}

impl Drafter for Oracle {
    fn draft(&mut self, row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError> {
        let full = &self.rows[row];
        let from = history.len().min(full.len());
        let tokens = full[from..(from + k).min(full.len())]
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if (from + i + row) % 3 == 0 {
                    (t + 1) % self.vocab
                } else {
                    t
                }
            })
            .collect();
        Ok(Draft { tokens, dists: None })
    }
}

/// Speculative greedy decoding gives transformers' greedy tokens on every family, whatever
/// the drafts: prompt lookup, a half-right oracle (rollbacks of every length, rows of a batch
/// holding each other back), and a draft model (the model itself: everything is accepted).
#[test]
fn speculative_greedy_matches_transformers() {
    for family in ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"] {
        let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
        let golden = Golden::open(family);
        let ids = golden.ids("input_ids");
        let generated = golden.ids("generated");
        let seq = ids[0].len();
        let device = Default::default();
        let model = LocalModel::<Cpu>::load(&files, &device).expect("fixture loads");
        for k in [1, 4] {
            let params = GenerateParams {
                max_new_tokens: generated[0].len() - seq,
                sampling: SamplingParams::greedy(),
                stop_ids: files.stop_ids.clone(),
                ignore_eos: true,
                speculative: k,
            };
            let vocab = files.config.vocab_size as u32;
            let mut oracle = Oracle {
                rows: generated.clone(),
                vocab,
            };
            let draft_model = LocalModel::<Cpu>::load(&files, &device).expect("fixture loads");
            let max_len = generated[0].len() + k;
            let mut itself = ModelDrafter::new(draft_model, &params.sampling, max_len).expect("drafter");
            let drafters: [(&str, &mut dyn Drafter); 3] = [
                ("prompt lookup", &mut PromptLookup::default()),
                ("oracle", &mut oracle),
                ("draft model", &mut itself),
            ];
            for (name, drafter) in drafters {
                let mut blocks = LocalBlocks::new(&model.spans).expect("spans cover the model");
                let mut events: Vec<TokenEvent> = Vec::new();
                let out = generate_drafted(
                    &model.embeddings,
                    &model.head,
                    &mut blocks,
                    &ids,
                    None,
                    &params,
                    drafter,
                    |e| {
                        events.push(e);
                        std::ops::ControlFlow::Continue(())
                    },
                )
                .expect("generate");
                for row in 0..ids.len() {
                    assert_eq!(out[row], generated[row][seq..], "{family} k={k} {name} row {row}");
                }
                let accepted = events.iter().filter(|e| e.drafted).count();
                let proposed: usize = events
                    .iter()
                    .filter(|e| e.row == 0 && !e.drafted)
                    .map(|e| e.proposed)
                    .sum();
                let steps = events.iter().filter(|e| e.row == 0).map(|e| e.step).max().unwrap_or(0);
                let new = params.max_new_tokens;
                match name {
                    "oracle" => assert!(
                        accepted > 0 && accepted < proposed * ids.len(),
                        "{family} k={k}: the oracle's drafts are partly kept ({accepted} of {proposed} a row)"
                    ),
                    "draft model" => {
                        assert!(
                            steps < new - 1 || k == 1 && steps == (new - 1).div_ceil(2),
                            "{family} k={k}: {steps} steps for {new} tokens"
                        );
                        assert_eq!(
                            accepted,
                            ids.len() * (new - 1 - steps),
                            "{family} k={k}: the model's own drafts are all kept"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Speculative sampling draws from the same distribution as plain sampling: 2,000 seeded runs
/// each of the first four tokens (temperature 0.02, top-k 3: the fixture's logits are close
/// together) on the llama fixture, drafting with
/// a colder copy of the model (it is surer than the model of its top token, so drafts are
/// rejected often and the residual is drawn from too, and it proposes a fourth token the
/// model cannot take); a
/// two-sample chi-square test of the sequences' counts at the 0.1% level.
#[test]
fn speculative_sampling_keeps_the_distribution() {
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let device = Default::default();
    let model = LocalModel::<Cpu>::load(&files, &device).expect("fixture loads");
    let prompt = vec![vec![3u32, 14, 15, 9, 2]];
    let runs = 2000;
    let sample = |seed: u64, speculative: usize, drafter: &mut dyn Drafter| {
        let params = GenerateParams {
            max_new_tokens: 4,
            sampling: SamplingParams {
                temperature: 0.02,
                top_k: Some(3),
                seed,
                ..SamplingParams::greedy()
            },
            stop_ids: vec![],
            ignore_eos: true,
            speculative,
        };
        let mut blocks = LocalBlocks::new(&model.spans).expect("spans cover the model");
        let mut accepted = 0;
        let out = generate_drafted(
            &model.embeddings,
            &model.head,
            &mut blocks,
            &prompt,
            None,
            &params,
            drafter,
            |e| {
                accepted += usize::from(e.drafted);
                std::ops::ControlFlow::Continue(())
            },
        )
        .expect("generate");
        (out.into_iter().next().unwrap_or_default(), accepted)
    };
    let cold = SamplingParams {
        temperature: 0.01,
        top_k: Some(4),
        ..SamplingParams::greedy()
    };
    let mut plain = std::collections::BTreeMap::<Vec<u32>, [u64; 2]>::new();
    let mut accepted = 0;
    for i in 0..runs {
        let (a, _) = sample(i, 0, &mut PromptLookup::default());
        plain.entry(a).or_default()[0] += 1;
        let draft_model = LocalModel::<Cpu>::load(&files, &device).expect("fixture loads");
        let mut drafter = ModelDrafter::new(
            draft_model,
            &SamplingParams {
                seed: i,
                ..cold.clone()
            },
            16,
        )
        .expect("drafter");
        let (b, n) = sample(1_000_000 + i, 3, &mut drafter);
        accepted += n;
        plain.entry(b).or_default()[1] += 1;
    }
    assert!(
        accepted > runs as usize / 2 && accepted < 3 * runs as usize,
        "drafts are both kept and rejected: {accepted} kept in {runs} runs"
    );
    // Pool the rare sequences so every cell expects at least 5 of each sample.
    let mut cells: Vec<[u64; 2]> = Vec::new();
    let mut rare = [0u64; 2];
    for counts in plain.values() {
        if counts[0] + counts[1] >= 10 {
            cells.push(*counts);
        } else {
            rare[0] += counts[0];
            rare[1] += counts[1];
        }
    }
    if rare[0] + rare[1] > 0 {
        cells.push(rare);
    }
    let n = runs as f64;
    let chi2: f64 = cells
        .iter()
        .map(|c| {
            let expected = (c[0] + c[1]) as f64 / 2.0;
            (c[0] as f64 - expected).powi(2) / expected + (c[1] as f64 - expected).powi(2) / expected
        })
        .sum();
    let df = (cells.len() - 1) as f64;
    // The 99.9% quantile of chi-square(df) (Wilson-Hilferty).
    let h = 2.0 / (9.0 * df);
    let bound = df * (1.0 - h + 3.09 * h.sqrt()).powi(3);
    eprintln!(
        "speculative sampling: chi-square {chi2:.1}, {df} degrees of freedom, bound {bound:.1}; {accepted} drafts kept in {runs} runs"
    );
    assert!(df >= 5.0, "too few distinct sequences to test: {cells:?}");
    assert!(
        chi2 < bound,
        "chi-square {chi2:.1} over {df} degrees of freedom exceeds {bound:.1} ({n} runs each): {cells:?}"
    );
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
            speculative: 0,
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

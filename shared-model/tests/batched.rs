//! Batched steps (`BlockSpan::forward_batch`, the server's continuous batching) against each
//! session's step alone, on every fixture family: sessions of different rows, cached lengths
//! and left padding, a prefill beside decodes, Mistral's sliding window, BLOOM's ALiBi, tiled
//! attention; 1e-4 relative to the reference's largest magnitude.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use shared_model::Cpu;
use shared_model::cache::SpanCache;
use shared_model::layers::AttentionTiling;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::{BlockSpan, Embeddings, to_host};

const REL_TOL: f32 = 1e-4;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family)
}

fn load(family: &str, window: Option<usize>) -> (BlockSpan<Cpu>, Embeddings<Cpu>, u32) {
    let mut files = ModelFiles::open(&fixture(family)).expect("fixture");
    if window.is_some() {
        files.config.attention.sliding_window = window;
    }
    let model = LocalModel::<Cpu>::load(&files, &Default::default()).expect("load");
    (model.spans[0].clone(), model.embeddings, files.config.vocab_size as u32)
}

/// One session: its rows' padding and its token ids, consumed step by step.
struct Session {
    pad: Vec<usize>,
    ids: Vec<Vec<u32>>,
    at: usize,
    alone: SpanCache<Cpu>,
    batched: SpanCache<Cpu>,
}

impl Session {
    fn new(span: &BlockSpan<Cpu>, pad: Vec<usize>, len: usize, salt: u32, vocab: u32) -> Self {
        let ids = (0..pad.len() as u32)
            .map(|row| {
                (0..len as u32)
                    .map(|t| (t * 7 + row * 13 + salt * 5 + 1) % vocab)
                    .collect()
            })
            .collect();
        Self {
            alone: span.new_session_cache(pad.clone(), len),
            batched: span.new_session_cache(pad.clone(), len),
            pad,
            ids,
            at: 0,
        }
    }

    /// The hidden states of the next `n` tokens of every row.
    fn next(&mut self, embeddings: &Embeddings<Cpu>, n: usize) -> Tensor<Cpu, 3> {
        let ids: Vec<Vec<u32>> = self.ids.iter().map(|r| r[self.at..self.at + n].to_vec()).collect();
        self.at += n;
        embeddings.forward(&ids).expect("embed")
    }
}

fn assert_close(what: &str, actual: Tensor<Cpu, 3>, expected: Tensor<Cpu, 3>, pad: &[usize], from: usize) {
    let (a, e) = (to_host(actual), to_host(expected));
    assert_eq!(a.shape, e.shape, "{what}: shape");
    let [_, seq, hidden] = [e.shape[0], e.shape[1], e.shape[2]];
    let scale = e.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let mut worst = 0f32;
    for (row, &p) in pad.iter().enumerate() {
        // Positions that are padding are never read.
        for t in p.saturating_sub(from).min(seq)..seq {
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

/// Runs `plan` (per round, the tokens each session steps; 0 sits the round out) both ways.
fn check(family: &str, window: Option<usize>, tiling: AttentionTiling) {
    let (span, embeddings, vocab) = load(family, window);
    let span = span.with_attention_tiling(tiling);
    let blocks = span.range();
    let specs: [(Vec<usize>, usize); 5] = [
        (vec![0], 40),
        (vec![0, 3], 40),
        (vec![2], 40),
        (vec![0], 40),
        (vec![4, 0, 1], 40),
    ];
    let mut sessions: Vec<Session> = specs
        .iter()
        .enumerate()
        .map(|(i, (pad, len))| Session::new(&span, pad.clone(), *len, i as u32, vocab))
        .collect();
    // Prefills of different lengths, a late joiner's prefill beside others' decodes, and
    // rounds of decodes with some sessions idle.
    let plan: [[usize; 5]; 7] = [
        [9, 0, 0, 0, 0],
        [1, 12, 5, 0, 0],
        [1, 1, 1, 20, 0],
        [1, 1, 0, 1, 7],
        [1, 1, 1, 1, 1],
        [3, 1, 1, 1, 1],
        [1, 0, 1, 1, 1],
    ];
    for (round, steps) in plan.iter().enumerate() {
        let mut inputs = Vec::new();
        for (s, &n) in sessions.iter_mut().zip(steps) {
            inputs.push((n > 0).then(|| s.next(&embeddings, n)));
        }
        let mut expected = Vec::new();
        for (s, x) in sessions.iter_mut().zip(&inputs) {
            expected.push(x.as_ref().map(|x| {
                span.forward_blocks(x.clone(), &mut s.alone, blocks.clone(), |_, _| {})
                    .expect("alone")
            }));
        }
        let batch: Vec<(Tensor<Cpu, 3>, &mut SpanCache<Cpu>)> = sessions
            .iter_mut()
            .zip(&inputs)
            .filter_map(|(s, x)| x.clone().map(|x| (x, &mut s.batched)))
            .collect();
        let mut outputs = span.forward_batch(batch, blocks.clone()).expect("batched").into_iter();
        for (i, (s, e)) in sessions.iter().zip(expected).enumerate() {
            let Some(e) = e else { continue };
            let y = outputs.next().expect("one output per step");
            let what = format!("{family} window {window:?} {tiling:?} round {round} session {i}");
            assert_close(&what, y, e, &s.pad, s.at - steps[i]);
            assert_eq!(s.batched.len, s.alone.len, "{what}: cache length");
        }
        assert!(outputs.next().is_none(), "no extra outputs");
    }
}

#[test]
fn batched_steps_equal_each_session_alone() {
    for family in ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"] {
        check(family, None, AttentionTiling::OFF);
    }
    check("mistral", Some(8), AttentionTiling::OFF);
    check("llama", None, AttentionTiling { min_keys: 8, tile: 8 });
    check("bloom", None, AttentionTiling { min_keys: 8, tile: 8 });
}

#[test]
fn a_bad_step_leaves_every_cache_untouched() {
    let (span, embeddings, vocab) = load("llama", None);
    let blocks = span.range();
    let mut ok = Session::new(&span, vec![0], 8, 0, vocab);
    let mut full = Session::new(&span, vec![0], 8, 1, vocab);
    let x = full.next(&embeddings, 8);
    span.forward_blocks(x, &mut full.batched, blocks.clone(), |_, _| {})
        .expect("fill");
    let (a, b) = (ok.next(&embeddings, 1), embeddings.forward(&[vec![1]]).expect("embed"));
    let err = span.forward_batch(vec![(a, &mut ok.batched), (b, &mut full.batched)], blocks.clone());
    assert!(err.is_err(), "a step past the cache's room is refused");
    assert_eq!((ok.batched.len, full.batched.len), (0, 8));
    assert_eq!(ok.batched.allocated_bytes(), 0, "nothing ran for the good step");
    let wrong = embeddings.forward(&[vec![1], vec![2]]).expect("embed");
    assert!(
        span.forward_batch(vec![(wrong, &mut ok.batched)], blocks).is_err(),
        "rows must match the cache"
    );
}

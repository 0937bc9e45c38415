//! Speculative decoding: a cheap drafter proposes the next `k` tokens, the model checks all of
//! them in one step of `k + 1` positions, and the caches roll back to what was accepted.
//!
//! Acceptance is speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft
//! token `d` drawn from the drafter's `q` is kept with probability `min(1, p(d) / q(d))`,
//! where `p` is the model's distribution after every logits processor; on a rejection the
//! token is drawn from `max(0, p - q)` normalised, and when every draft is kept one more
//! token comes from the last position's `p`. Each emitted token is then distributed exactly
//! as non-speculative sampling's, and greedy decoding (all of `p` on its argmax) emits the
//! same tokens as without speculation.

use std::time::Duration;

use burn::prelude::Backend;

use crate::ModelError;
use crate::cache::SpanCache;
use crate::loader::LocalModel;
use crate::model::{DEFAULT_CHUNK_TOKENS, to_host};
use crate::sampling::{Distribution, Sampler, SamplingError, SamplingParams};

/// The tokens a drafter proposes after a row's history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// The distribution each token was drawn from; `None`: chosen deterministically (all the
    /// mass on the token, as prompt lookup does).
    pub dists: Option<Vec<Distribution>>,
}

impl Draft {
    fn dist(&self, j: usize) -> Distribution {
        match self.dists.as_ref().and_then(|d| d.get(j)) {
            Some(d) => d.clone(),
            None => Distribution::point(self.tokens[j]),
        }
    }
}

/// Proposes tokens to check.
pub trait Drafter {
    /// Up to `k` tokens likely to follow `history` (prompt and generated tokens) of batch row
    /// `row`; fewer, or none, when it has no guess.
    fn draft(&mut self, row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError>;

    /// What the step after the last drafts gave: whether it checked any drafts, the tokens
    /// it emitted (over all rows) and its time from embedding to sampling.
    fn observe(&mut self, _drafted: bool, _tokens: usize, _took: Duration) {}
}

impl<D: Drafter + ?Sized> Drafter for Box<D> {
    fn draft(&mut self, row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError> {
        (**self).draft(row, history, k)
    }

    fn observe(&mut self, drafted: bool, tokens: usize, took: Duration) {
        (**self).observe(drafted, tokens, took);
    }
}

/// A drafter that drafts only while drafting pays: it compares the tokens per second of the
/// steps that checked drafts with those of the steps that did not (decayed sums, so the
/// recent steps count most) and follows the faster, trying the slower now and then (after 8
/// steps, then 16, up to 64 while it keeps losing). Over a WAN a step is mostly waiting and
/// checking drafts costs nothing; on a local CPU a step of five positions can cost 2.5x a step
/// of one, and few kept drafts do not pay for it. Which steps draft never changes greedy
/// output, nor the distribution of sampled tokens (it changes which seeded sample one gets).
pub struct Gated<D> {
    inner: D,
    drafted: Rate,
    plain: Rate,
    /// Steps since the slower side was last tried, and how many between its trials.
    since_trial: u32,
    trial_every: u32,
    /// Which side led at the last decision.
    leader: Option<bool>,
    /// Whether the step now running was meant to draft.
    drafting: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    tokens: f64,
    secs: f64,
    steps: u32,
}

impl Rate {
    /// Weight of the past at each new step of the same kind.
    const DECAY: f64 = 0.8;

    fn add(&mut self, tokens: usize, secs: f64) {
        self.tokens = self.tokens * Self::DECAY + tokens as f64;
        self.secs = self.secs * Self::DECAY + secs;
        self.steps += 1;
    }

    fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.tokens / self.secs
        } else {
            f64::INFINITY
        }
    }
}

impl<D: Drafter> Gated<D> {
    /// Steps of each kind measured before the two are compared.
    const WARM_UP: u32 = 3;
    const FIRST_TRIAL: u32 = 8;
    const LAST_TRIAL: u32 = 64;

    pub fn new(inner: D) -> Self {
        Self {
            inner,
            drafted: Rate::default(),
            plain: Rate::default(),
            since_trial: 0,
            trial_every: Self::FIRST_TRIAL,
            leader: None,
            drafting: true,
        }
    }

    /// Whether the next step drafts.
    fn decide(&mut self) -> bool {
        if self.drafted.steps < Self::WARM_UP {
            return true;
        }
        if self.plain.steps < Self::WARM_UP {
            return false;
        }
        let leader = self.drafted.per_sec() >= self.plain.per_sec();
        if self.leader != Some(leader) {
            self.leader = Some(leader);
            self.trial_every = Self::FIRST_TRIAL;
            self.since_trial = 0;
        }
        self.since_trial += 1;
        if self.since_trial < self.trial_every {
            return leader;
        }
        self.since_trial = 0;
        self.trial_every = (self.trial_every * 2).min(Self::LAST_TRIAL);
        !leader
    }
}

impl<D: Drafter> Drafter for Gated<D> {
    fn draft(&mut self, row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError> {
        // One decision a step: row 0 is asked first.
        if row == 0 {
            self.drafting = self.decide();
        }
        if self.drafting {
            self.inner.draft(row, history, k)
        } else {
            Ok(Draft::default())
        }
    }

    fn observe(&mut self, drafted: bool, tokens: usize, took: Duration) {
        let rate = if drafted { &mut self.drafted } else { &mut self.plain };
        rate.add(tokens, took.as_secs_f64());
        self.inner.observe(drafted, tokens, took);
    }
}

/// Prompt lookup (Saxena 2023; HF's `prompt_lookup_num_tokens`): finds the latest earlier
/// occurrence of the history's last `n` tokens (`n` from `max_ngram` down to `min_ngram`)
/// and proposes what followed it. No model, no memory: it shines where the answer repeats
/// its context (code edits, summaries, quotes) and costs one wasted position elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLookup {
    pub max_ngram: usize,
    pub min_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self {
            max_ngram: 3,
            min_ngram: 1,
        }
    }
}

impl PromptLookup {
    /// The tokens after the latest earlier match of the history's tail.
    pub fn lookup(&self, history: &[u32], k: usize) -> Vec<u32> {
        let len = history.len();
        if k == 0 || len < 2 {
            return Vec::new();
        }
        for n in (self.min_ngram.max(1)..=self.max_ngram.min(len - 1)).rev() {
            let pattern = &history[len - n..];
            // `i + n < len`: at least one token follows the match.
            for i in (0..len - n).rev() {
                if &history[i..i + n] == pattern {
                    let from = i + n;
                    return history[from..(from + k).min(len)].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, _row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError> {
        Ok(Draft {
            tokens: self.lookup(history, k),
            dists: None,
        })
    }
}

/// Drafts with a small local model that shares the checked model's tokenizer (`--draft`):
/// each row keeps its own caches and the tokens they hold, and cuts them back to what it
/// shares with the history it is given (rejected drafts, another row's batch limit).
pub struct ModelDrafter<B: Backend> {
    model: LocalModel<B>,
    params: SamplingParams,
    max_len: usize,
    rows: Vec<DraftRow<B>>,
}

struct DraftRow<B: Backend> {
    caches: Vec<SpanCache<B>>,
    /// The tokens the caches hold, in order.
    tokens: Vec<u32>,
    sampler: Sampler,
}

impl<B: Backend> ModelDrafter<B> {
    /// Drafts from `model`, drawing its tokens with `sampling`'s temperature, top-k, top-p
    /// and repetition penalty (greedy when it is greedy) and its own random numbers; histories
    /// plus drafts up to `max_len` tokens.
    pub fn new(model: LocalModel<B>, sampling: &SamplingParams, max_len: usize) -> Result<Self, SamplingError> {
        let params = SamplingParams {
            // Any q works if drafts are drawn from it; these penalties' counts would follow
            // rejected drafts, so the drafter leaves them out.
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: sampling.seed ^ 0x5eed_d4af_7000_0000,
            ..sampling.clone()
        };
        params.validate()?;
        Ok(Self {
            model,
            params,
            max_len,
            rows: Vec::new(),
        })
    }

    /// The draft model's vocabulary size (it must equal the checked model's).
    pub fn vocab_size(&self) -> usize {
        self.model.spans.first().map_or(0, |s| s.config().vocab_size)
    }

    /// Creates the state of rows up to `row`.
    fn add_rows(&mut self, row: usize) -> Result<(), ModelError> {
        while self.rows.len() <= row {
            let seed = self.params.seed.wrapping_add(self.rows.len() as u64);
            let sampler = Sampler::new(SamplingParams {
                seed,
                ..self.params.clone()
            })
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
            let caches = self
                .model
                .spans
                .iter()
                .map(|s| s.new_session_cache(vec![0], self.max_len))
                .collect();
            self.rows.push(DraftRow {
                caches,
                tokens: Vec::new(),
                sampler,
            });
        }
        Ok(())
    }
}

impl<B: Backend> Drafter for ModelDrafter<B> {
    fn draft(&mut self, row: usize, history: &[u32], k: usize) -> Result<Draft, ModelError> {
        let k = k.min(self.max_len.saturating_sub(history.len()));
        if k == 0 || history.is_empty() {
            return Ok(Draft::default());
        }
        let greedy = self.params.is_greedy();
        let vocab = self.vocab_size();
        if let Some(&t) = history.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Invalid(format!(
                "token {t} is outside the draft model's vocabulary of {vocab}"
            )));
        }
        self.add_rows(row)?;
        let model = &self.model;
        let state = &mut self.rows[row];
        // Keep what the caches share with this history, and at least one token to feed.
        let common = state
            .tokens
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
            .min(history.len() - 1);
        for cache in &mut state.caches {
            cache.truncate(common)?;
        }
        state.tokens.truncate(common);
        let mut seen = history.to_vec();
        let mut feed = history[common..].to_vec();
        let mut tokens = Vec::with_capacity(k);
        let mut dists = Vec::with_capacity(k);
        loop {
            let mut h = model.embeddings.forward(std::slice::from_ref(&feed))?;
            for (span, cache) in model.spans.iter().zip(state.caches.iter_mut()) {
                h = span.forward_chunked(h, cache, span.range(), None, None, DEFAULT_CHUNK_TOKENS)?;
            }
            state.tokens.extend_from_slice(&feed);
            let t = h.dims()[1];
            let mut logits = to_host(model.head.forward(h.narrow(1, t - 1, 1))).data;
            let dist = state.sampler.distribution(&mut logits, &seen);
            let token = state.sampler.draw(&dist);
            tokens.push(token);
            seen.push(token);
            dists.push(dist);
            if tokens.len() == k {
                break;
            }
            feed = vec![token];
        }
        Ok(Draft {
            tokens,
            dists: (!greedy).then_some(dists),
        })
    }
}

/// What checking one row's draft gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The tokens to emit, in order: accepted drafts, then (unless stopped at the limit on
    /// an accepted draft) one token drawn by the model.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are accepted drafts (a prefix of them).
    pub accepted: usize,
}

/// Checks `draft` against the model's logits, emitting at most `limit + 1` tokens.
///
/// `logits(j)` gives the model's logits at draft position `j` (after `history` and
/// `draft.tokens[..j]`), for `j` in `0..=draft.tokens.len()`. The sampler's random numbers,
/// penalties and counts advance as for the emitted tokens. Stopping at `limit` (another
/// row of the batch accepted fewer) keeps the distribution: where a run stops does not
/// depend on this row's draws past it.
pub fn check(
    sampler: &mut Sampler,
    mut logits: impl FnMut(usize) -> Vec<f32>,
    history: &[u32],
    draft: &Draft,
    limit: usize,
) -> Checked {
    // The history grows by each kept draft; copied only then (no drafts: every token).
    let mut seen = std::borrow::Cow::Borrowed(history);
    let mut tokens = Vec::with_capacity(limit.min(draft.tokens.len()) + 1);
    let mut accepted = 0;
    for j in 0..=draft.tokens.len() {
        let p = sampler.distribution(&mut logits(j), &seen);
        let Some(&d) = draft.tokens.get(j) else {
            // Every draft was kept: one more token from the last position.
            let t = sampler.draw(&p);
            sampler.record(t);
            tokens.push(t);
            break;
        };
        let q = draft.dist(j);
        let keep = if sampler.is_greedy() {
            p.prob(d) >= 1.0
        } else {
            let (pd, qd) = (p.prob(d), q.prob(d));
            qd > 0.0 && sampler.uniform() < (pd / qd).min(1.0)
        };
        if keep {
            sampler.record(d);
            tokens.push(d);
            seen.to_mut().push(d);
            accepted += 1;
            if j == limit {
                break;
            }
            continue;
        }
        let t = match p.residual(&q) {
            Some(r) => sampler.draw(&r),
            None => sampler.draw(&p),
        };
        sampler.record(t);
        tokens.push(t);
        break;
    }
    Checked { tokens, accepted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    /// Steps a gate over prompt lookup that always finds a draft, where a drafted step gives
    /// `drafted` (tokens, ms) and a plain one `plain`; returns how many of `steps` drafted.
    fn gated_steps(drafted: (usize, u64), plain: (usize, u64), steps: usize) -> usize {
        let mut gate = Gated::new(PromptLookup::default());
        let history = [7, 8, 9, 7, 8, 9, 7, 8];
        let mut drafting = 0;
        for _ in 0..steps {
            let draft = gate.draft(0, &history, 4).expect("prompt lookup");
            let (tokens, ms) = if draft.tokens.is_empty() { plain } else { drafted };
            drafting += usize::from(!draft.tokens.is_empty());
            gate.observe(!draft.tokens.is_empty(), tokens, Duration::from_millis(ms));
        }
        drafting
    }

    #[test]
    fn the_gate_drafts_only_while_drafting_gives_more_tokens_a_second() {
        // A local CPU: a wide step costs 2.5x and keeps one draft in five steps.
        let local = gated_steps((6, 350), (5, 140), 200);
        // A WAN: every step is ~300 ms of waiting, the width costs nothing.
        let wan = gated_steps((6, 1510), (5, 1500), 200);
        // Past the warm-up, only the trials of the slower side (8, 16, 32, 64, 64 steps apart).
        assert!(local <= 3 + 6, "drafted {local} of 200 steps on the CPU");
        assert!(wan >= 200 - 3 - 6, "drafted {wan} of 200 steps over the WAN");
    }

    fn sampler(temperature: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            seed,
            ..SamplingParams::greedy()
        })
        .expect("valid")
    }

    #[test]
    fn prompt_lookup_proposes_what_followed_the_latest_match() {
        let lookup = PromptLookup::default();
        // "1 2 3 4 ... 1 2 3" -> "4 5"
        assert_eq!(lookup.lookup(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 2), vec![4, 5]);
        // The latest match wins, and the proposal stops at the history's end.
        assert_eq!(lookup.lookup(&[7, 1, 8, 7, 1, 9, 7, 1], 3), vec![9, 7, 1]);
        // A longer match beats a later shorter one.
        assert_eq!(lookup.lookup(&[5, 6, 1, 9, 6, 2, 5, 6], 1), vec![1]);
        assert_eq!(lookup.lookup(&[1, 2, 3], 4), Vec::<u32>::new());
        assert_eq!(lookup.lookup(&[1], 4), Vec::<u32>::new());
        assert_eq!(lookup.lookup(&[1, 1], 0), Vec::<u32>::new());
        assert_eq!(lookup.lookup(&[1, 1], 4), vec![1]);
    }

    #[test]
    fn greedy_keeps_drafts_while_they_are_the_argmax() {
        // Position j's argmax is token 10 + j.
        let logits = |j: usize| {
            let mut l = vec![0.0; 16];
            l[10 + j] = 1.0;
            l
        };
        let draft = |tokens: Vec<u32>| Draft { tokens, dists: None };
        let mut s = sampler(0.0, 0);
        let all = check(&mut s, logits, &[], &draft(vec![10, 11, 12]), 3);
        assert_eq!(
            all,
            Checked {
                tokens: vec![10, 11, 12, 13],
                accepted: 3
            }
        );
        let some = check(&mut s, logits, &[], &draft(vec![10, 5, 12]), 3);
        assert_eq!(
            some,
            Checked {
                tokens: vec![10, 11],
                accepted: 1
            }
        );
        let none = check(&mut s, logits, &[], &draft(vec![]), 0);
        assert_eq!(
            none,
            Checked {
                tokens: vec![10],
                accepted: 0
            }
        );
        // Held back by another row at 1: the accepted second draft is the last token.
        let limited = check(&mut s, logits, &[], &draft(vec![10, 11, 12]), 1);
        assert_eq!(
            limited,
            Checked {
                tokens: vec![10, 11],
                accepted: 2
            }
        );
    }

    /// Pearson's chi-square of `counts` against `expected` probabilities.
    fn chi_square(counts: &[u64], expected: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(expected)
            .filter(|&(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// Speculative sampling's first two tokens are distributed as plain sampling's, for a
    /// deterministic draft and for a drafter with its own (wrong) distribution, also when
    /// stopped at a limit.
    #[test]
    fn speculative_sampling_keeps_the_distribution() {
        // Two positions over 4 tokens; the second's logits depend on the first token.
        let first = vec![1.0f32, 0.2, -0.5, 0.7];
        let second = |t: u32| -> Vec<f32> { (0..4).map(|i| ((i as u32 * 3 + t) % 4) as f32 * 0.6).collect() };
        let probs = |l: &[f32]| -> Vec<f64> {
            let e: Vec<f64> = l.iter().map(|&x| (x as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect()
        };
        let p1 = probs(&first);
        let mut expected = vec![0.0; 16];
        for a in 0..4u32 {
            let p2 = probs(&second(a));
            for b in 0..4 {
                expected[a as usize * 4 + b] = p1[a as usize] * p2[b];
            }
        }
        let draft_q = Distribution {
            tokens: vec![2, 0, 1, 3],
            probs: vec![0.55, 0.15, 0.2, 0.1],
        };
        let n = 20_000u64;
        for (name, model_draft, limit) in [("point", false, 2), ("model", true, 2), ("point, limit 0", false, 0)] {
            let mut counts = vec![0u64; 16];
            let mut pick = sampler(1.0, 99);
            for seed in 0..n {
                let mut s = sampler(1.0, seed);
                let draft = if model_draft {
                    let d0 = draft_q.at(pick.uniform());
                    let d1 = draft_q.at(pick.uniform());
                    Draft {
                        tokens: vec![d0, d1],
                        dists: Some(vec![draft_q.clone(), draft_q.clone()]),
                    }
                } else {
                    Draft {
                        tokens: vec![3, 1],
                        dists: None,
                    }
                };
                let tokens = draft.tokens.clone();
                let mut out = check(
                    &mut s,
                    |j| match j {
                        0 => first.clone(),
                        _ => second(tokens[j - 1]),
                    },
                    &[],
                    &draft,
                    limit,
                )
                .tokens;
                if out.len() < 2 {
                    // Plain sampling of the second token after the first.
                    let l = second(out[0]);
                    out.push(s.sample(&mut l.clone(), &[]));
                }
                counts[out[0] as usize * 4 + out[1] as usize] += 1;
            }
            // 15 degrees of freedom: p = 0.001 at 37.7.
            let chi = chi_square(&counts, &expected);
            assert!(chi < 37.7, "{name}: chi-square {chi:.1} over 15 dof; counts {counts:?}");
        }
    }
}

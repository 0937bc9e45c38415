//! Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k,
//! top-p and a repetition penalty, in the order HF's logits processors apply them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// HF's `repetition_penalty`: 1.0 leaves logits alone.
    pub repetition_penalty: f32,
    /// OpenAI's `presence_penalty` (-2..2): subtracted from the logit of every token this
    /// sampler has already picked. 0 leaves logits alone.
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty` (-2..2): subtracted once for every time this sampler has
    /// picked the token. 0 leaves logits alone.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Errors in sampling settings.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("top-k must be at least 1")]
    TopK,
    #[error("repetition penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence penalty must be within -2..2, got {0}")]
    PresencePenalty(f32),
    #[error("frequency penalty must be within -2..2, got {0}")]
    FrequencyPenalty(f32),
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(SamplingError::TopP(p));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// A seeded sampler: the same seed and logits give the same tokens on every machine.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token was picked (for the presence and frequency penalties, which, as
    /// OpenAI's and vLLM's, count the generated tokens only, not the prompt).
    picked: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            picked: Default::default(),
        })
    }

    /// Picks the next token. `history` (prompt and generated tokens) feeds the repetition
    /// penalty; the tokens this sampler picked before feed the presence and frequency
    /// penalties. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let dist = self.distribution(logits, history);
        let token = self.draw(&dist);
        self.record(token);
        token
    }

    /// Whether this sampler always takes the most likely token (and draws no random numbers).
    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    /// What [`Self::sample`] draws from: the next token's distribution after every logits
    /// processor (penalties, temperature, top-k, top-p); greedy: all the mass on the argmax.
    /// Changes nothing but `logits`.
    pub fn distribution(&self, logits: &mut [f32], history: &[u32]) -> Distribution {
        let p = &self.params;
        for (&t, &count) in &self.picked {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let l = &mut logits[t as usize];
                    *l = if *l < 0.0 {
                        *l * p.repetition_penalty
                    } else {
                        *l / p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return Distribution::point(argmax(logits));
        }
        let inv_t = 1.0 / p.temperature;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
        // Highest first; ties keep the lower id first, so the order is deterministic.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if let Some(top_p) = p.top_p {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                mass += q;
                if mass >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            candidates.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        Distribution {
            tokens: candidates.into_iter().map(|(t, _)| t).collect(),
            probs,
        }
    }

    /// Draws a token from `dist` with this sampler's random numbers (none when greedy).
    pub fn draw(&mut self, dist: &Distribution) -> u32 {
        if self.params.is_greedy() {
            return dist.tokens.first().copied().unwrap_or(0);
        }
        let r = self.uniform();
        dist.at(r)
    }

    /// A uniform number in `[0, 1)` from this sampler's stream (speculative sampling's
    /// acceptance test).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Counts `token` as picked (the presence and frequency penalties): what
    /// [`Self::sample`] does after its draw, for a token chosen otherwise (an accepted draft).
    pub fn record(&mut self, token: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.picked.entry(token).or_default() += 1;
        }
    }
}

/// A next-token distribution: candidate tokens, most likely first, with their
/// probabilities (summing to 1); tokens not listed have probability 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub tokens: Vec<u32>,
    pub probs: Vec<f64>,
}

impl Distribution {
    /// All the mass on `token`.
    pub fn point(token: u32) -> Self {
        Self {
            tokens: vec![token],
            probs: vec![1.0],
        }
    }

    /// The probability of `token`.
    pub fn prob(&self, token: u32) -> f64 {
        self.tokens
            .iter()
            .position(|&t| t == token)
            .map_or(0.0, |i| self.probs[i])
    }

    /// The token at cumulative mass `r` (0 <= r < 1): a draw when `r` is uniform.
    pub fn at(&self, mut r: f64) -> u32 {
        for (i, q) in self.probs.iter().enumerate() {
            if r < *q {
                return self.tokens[i];
            }
            r -= q;
        }
        self.tokens.last().copied().unwrap_or(0)
    }

    /// `max(0, self - other)`, normalised: what speculative sampling draws from when it
    /// rejects a draft drawn from `other`. `None` when nothing is left (`other` covers `self`).
    pub fn residual(&self, other: &Distribution) -> Option<Distribution> {
        let mut tokens = Vec::with_capacity(self.tokens.len());
        let mut probs = Vec::with_capacity(self.tokens.len());
        for (&t, &p) in self.tokens.iter().zip(&self.probs) {
            let left = p - other.prob(t);
            if left > 0.0 {
                tokens.push(t);
                probs.push(left);
            }
        }
        let total: f64 = probs.iter().sum();
        if !(total > 1e-12) {
            return None;
        }
        probs.iter_mut().for_each(|q| *q /= total);
        Some(Distribution { tokens, probs })
    }
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 7,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_what_was_picked() {
        let greedy = |presence, frequency| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingParams::greedy()
            })
            .unwrap();
            // The prompt's tokens (the history) are not penalised: token 0 stays first.
            (0..4)
                .map(|_| s.sample(&mut vec![1.0, 0.5, 0.0], &[0, 0, 0]))
                .collect::<Vec<_>>()
        };
        assert_eq!(greedy(0.0, 0.0), [0, 0, 0, 0]);
        // Presence: once picked, 0 drops to 0.0 and 1 (0.5) wins, then 2 (0.0 ties 0, first wins).
        assert_eq!(greedy(1.0, 0.0), [0, 1, 0, 0]);
        // Frequency: each pick of 0 costs 0.3 more: 1.0, 0.7 then 0.4 < 0.5.
        assert_eq!(greedy(0.0, 0.3), [0, 0, 1, 0]);
        // Negative values favour repeating.
        assert_eq!(greedy(-2.0, -2.0), [0, 0, 0, 0]);
        for bad in [2.5, -3.0, f32::NAN] {
            let p = SamplingParams {
                presence_penalty: bad,
                ..SamplingParams::greedy()
            };
            assert!(matches!(p.validate(), Err(SamplingError::PresencePenalty(_))), "{bad}");
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params(1.0) }).unwrap();
            (0..64).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Sampling, not argmax: more than one distinct token over 64 draws.
        let draws = run(7);
        assert!(draws.iter().any(|&t| t != draws[0]));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = vec![5.0, 4.0, 3.0, -10.0, -10.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(2),
            ..params(10.0)
        })
        .unwrap();
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
        // exp(5)/(sum) ~ 0.665: top_p 0.5 leaves only token 0.
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.5),
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        let mut logits = vec![4.0, 3.0, -1.0];
        // Token 0 is penalised to 2.0, below token 1.
        assert_eq!(s.sample(&mut logits, &[0, 0, 2]), 1);
        assert_eq!(logits, vec![2.0, 3.0, -2.0]);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert_eq!(
            Sampler::new(params(-1.0)).unwrap_err(),
            SamplingError::Temperature(-1.0)
        );
        assert!(
            Sampler::new(SamplingParams {
                top_p: Some(0.0),
                ..params(1.0)
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                top_k: Some(0),
                ..params(1.0)
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                repetition_penalty: 0.0,
                ..params(1.0)
            })
            .is_err()
        );
    }
}

//! Spot checks of servers' outputs.
//!
//! With a rate `r` (`corolla generate --verify r`), after a hop of a session answers a step,
//! the client re-runs that hop on another server covering the same blocks and computing alike
//! (same `numerics`): a stateless span forward over the hop's whole input history, whose last
//! positions must equal the hop's answer within a tolerance of the wire dtype. When they
//! differ, a third server decides: the server the other two contradict is banned; if it was
//! the hop, its answer is thrown away and the step goes to a replacement (which is replayed
//! the hop's history first), so the tokens are those of an undisturbed run.
//!
//! What it cannot see: a server that lies only when not observed, at a rate `q`, is caught
//! after about `1 / (r x q)` steps; lies within the tolerance pass; with no second server
//! of a span nothing is checked; sessions with a LoRA adapter, and hop histories longer than
//! one message, are not checked (stateless requests carry neither).

use std::sync::{Arc, Mutex};

use serde::Serialize;
use shared_model::weights::HostTensor;

use super::RemoteChain;
use crate::protocol::{ServerInfo, SpanRequest, SpanResponse};
use crate::session::SessionError;
use crate::wire::{WireDtype, WireTensor};

/// What the spot checks did, for `--json` and the page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Hop answers compared with another server's.
    pub checks: u64,
    /// Comparisons that disagreed.
    pub mismatches: u64,
    /// Servers banned for outputs two others contradicted.
    pub banned: Vec<String>,
}

/// The sampling state and the running report, shared with whoever displays it.
#[derive(Debug, Clone)]
pub struct Verifier {
    rate: f64,
    state: u64,
    report: Arc<Mutex<VerifyReport>>,
}

/// The checked hop's verdict.
pub(super) enum Verdict {
    /// Not sampled, agreed, or nobody to compare with: use the answer.
    Keep,
    /// The hop's server lied: drop its answer and re-run the step elsewhere.
    HopLied(SessionError),
}

impl Verifier {
    /// Checks a share `rate` (0 to 1) of hop answers; `seed` makes the sample reproducible.
    pub fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate: rate.clamp(0.0, 1.0),
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            report: Arc::default(),
        }
    }

    /// The report as it stands, shared (it keeps counting).
    pub fn report(&self) -> Arc<Mutex<VerifyReport>> {
        self.report.clone()
    }

    fn update(&self, f: impl FnOnce(&mut VerifyReport)) {
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn uniform(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 53) as f64
    }

    fn sampled(&mut self) -> bool {
        self.rate > 0.0 && self.uniform() < self.rate
    }

    /// One of `n`, uniformly.
    fn pick(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

/// Whether two answers for the same inputs agree, within what the wire dtype and different
/// hardware may change: `|a - b| <= tol x (max |b| + |b|)` element by element.
pub fn agree(a: &HostTensor, b: &HostTensor, dtype: WireDtype) -> bool {
    if a.shape != b.shape {
        return false;
    }
    let tol = match dtype {
        WireDtype::F32 => 1e-3,
        WireDtype::F16 => 4e-3,
        WireDtype::Bf16 => 2e-2,
    };
    let scale = b.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.data
        .iter()
        .zip(&b.data)
        .all(|(x, y)| (x - y).abs() <= tol * (scale + y.abs()) && x.is_finite())
}

/// Zeroes the positions of `t` (`[batch, n, hidden]`, starting at absolute position `offset`)
/// that are left padding of their row: what they hold is whatever a masked row computes, which
/// no two implementations need agree on.
fn mask_padding(t: &mut HostTensor, pad: &[usize], offset: usize) {
    let (batch, n, h) = (t.shape[0], t.shape[1], t.shape[2]);
    for row in 0..batch {
        let padded = pad.get(row).copied().unwrap_or(0).saturating_sub(offset).min(n);
        t.data[row * n * h..(row * n + padded) * h].fill(0.0);
    }
}

/// The last `n` positions of each row of `[batch, seq, hidden]`.
fn tail(t: &HostTensor, n: usize) -> HostTensor {
    let (batch, seq, h) = (t.shape[0], t.shape[1], t.shape[2]);
    let n = n.min(seq);
    let mut data = Vec::with_capacity(batch * n * h);
    for row in 0..batch {
        data.extend_from_slice(&t.data[(row * seq + seq - n) * h..(row * seq + seq) * h]);
    }
    HostTensor::new(vec![batch, n, h], data)
}

impl RemoteChain {
    /// Servers other than `exclude` that could re-run blocks `[start, end)` as `like` does.
    fn references(&self, start: usize, end: usize, like: &str, exclude: &[String]) -> Vec<ServerInfo> {
        let now = crate::rt::Instant::now();
        let numerics = self
            .servers
            .iter()
            .find(|s| s.peer_id == like)
            .map(|s| s.numerics.clone());
        self.servers
            .iter()
            .filter(|s| {
                s.start as usize <= start
                    && end <= s.end as usize
                    && !exclude.contains(&s.peer_id)
                    && !self.liars.contains(&s.peer_id)
                    && Some(&s.numerics) == numerics.as_ref()
                    && self.bans.get(&s.peer_id).is_none_or(|(until, _)| *until <= now)
            })
            .cloned()
            .collect()
    }

    /// `peer`'s stateless forward of blocks `[start, end)` over `input`, as the session ran it
    /// (its padding and deep prompts).
    async fn rerun(&self, peer: &str, start: usize, end: usize, input: &HostTensor) -> Option<HostTensor> {
        let spec = self.spec.as_ref()?;
        let request = SpanRequest::Forward {
            model: self.config.model.clone(),
            start: start as u32,
            end: end as u32,
            pad: spec.pad.iter().map(|&p| p as u32).collect(),
            hidden: WireTensor::encode(input, self.config.dtype),
            reply_dtype: self.config.dtype,
            prompts: self
                .config
                .deep_prompts
                .as_ref()
                .map(|d| WireTensor::encode(&shared_model::tuning::deep_rows(d, start..end), WireDtype::F32)),
        };
        match self.span_call(peer, request).await {
            Ok(SpanResponse::Tensor(t))
                if t.expect_shape(&input.shape.iter().map(|&d| Some(d as u64)).collect::<Vec<_>>())
                    .is_ok() =>
            {
                t.decode(&self.config.limits).ok()
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "spot check: reference server failed");
                None
            }
        }
    }

    /// Perhaps spot-checks hop `i`'s answer `outs` (one per piece of its history's tail).
    pub(super) async fn spot_check(&mut self, i: usize, outs: &[HostTensor]) -> Verdict {
        if self.config.adapter.is_some() || outs.is_empty() || !self.verifier.sampled() {
            return Verdict::Keep;
        }
        let (peer, start, end) = {
            let s = &self.hops[i].session;
            (s.peer.to_string(), s.start, s.end)
        };
        let Some(input) = super::concat_all(&self.hops[i].history) else {
            return Verdict::Keep;
        };
        if input.shape[1] > self.chunk_limit() {
            return Verdict::Keep;
        }
        let Some(mut answer) = super::concat_all(outs) else {
            return Verdict::Keep;
        };
        let new = answer.shape[1];
        let offset = input.shape[1] - new;
        let pad = self.spec.as_ref().map(|s| s.pad.clone()).unwrap_or_default();
        mask_padding(&mut answer, &pad, offset);
        let masked = |mut t: HostTensor| {
            mask_padding(&mut t, &pad, offset);
            t
        };
        let candidates = self.references(start, end, &peer, std::slice::from_ref(&peer));
        if candidates.is_empty() {
            return Verdict::Keep;
        }
        let b = candidates[self.verifier.pick(candidates.len())].peer_id.clone();
        let Some(reference) = self.rerun(&b, start, end, &input).await.map(|t| masked(tail(&t, new))) else {
            return Verdict::Keep;
        };
        self.verifier.update(|r| r.checks += 1);
        let dtype = self.config.dtype;
        if agree(&answer, &reference, dtype) {
            return Verdict::Keep;
        }
        self.verifier.update(|r| r.mismatches += 1);
        tracing::warn!(hop = %peer, reference = %b, start, end, "spot check: outputs disagree; asking a third server");
        let thirds = self.references(start, end, &peer, &[peer.clone(), b.clone()]);
        if thirds.is_empty() {
            tracing::warn!(hop = %peer, reference = %b, "spot check: no third server to decide; keeping the answer");
            return Verdict::Keep;
        }
        let c = thirds[self.verifier.pick(thirds.len())].peer_id.clone();
        let Some(third) = self.rerun(&c, start, end, &input).await.map(|t| masked(tail(&t, new))) else {
            return Verdict::Keep;
        };
        let (with_hop, with_reference) = (agree(&answer, &third, dtype), agree(&reference, &third, dtype));
        if with_reference && !with_hop {
            tracing::warn!(%peer, start, end, "spot check: the hop's server lied; banned");
            self.liars.insert(peer.clone());
            self.verifier.update(|r| r.banned.push(peer.clone()));
            let Ok(id) = peer.parse() else {
                return Verdict::Keep;
            };
            return Verdict::HopLied(SessionError::Mismatch { peer: id });
        }
        if with_hop && !with_reference {
            tracing::warn!(peer = %b, start, end, "spot check: the reference server lied; banned");
            if let Ok(id) = b.parse() {
                self.ban(&id);
            }
            self.liars.insert(b.clone());
            self.verifier.update(|r| r.banned.push(b));
        } else {
            tracing::warn!(hop = %peer, reference = %b, third = %c, "spot check: three servers disagree; keeping the answer");
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_allows_rounding_and_catches_small_lies() {
        let b = HostTensor::new(vec![1, 2, 3], vec![1.0, -2.0, 0.5, 4.0, 0.0, -1.0]);
        let mut a = b.clone();
        a.data[1] += 1e-4;
        assert!(agree(&a, &b, WireDtype::F32));
        // One element off by 1% of the scale: a subtle lie.
        a.data[4] += 0.04;
        assert!(!agree(&a, &b, WireDtype::F32));
        assert!(agree(&a, &b, WireDtype::Bf16), "within bf16's rounding");
        let mut nan = b.clone();
        nan.data[0] = f32::NAN;
        assert!(!agree(&nan, &b, WireDtype::F32));
        assert!(!agree(
            &HostTensor::new(vec![1, 1, 3], vec![0.0; 3]),
            &b,
            WireDtype::F32
        ));
        let t = tail(&b, 1);
        assert_eq!(t.shape, vec![1, 1, 3]);
        assert_eq!(t.data, vec![4.0, 0.0, -1.0]);
        // Row 0 padded by 3: of a tail starting at position 2, its first position is padding.
        let mut two = HostTensor::new(vec![2, 2, 1], vec![1.0, 2.0, 3.0, 4.0]);
        mask_padding(&mut two, &[3, 0], 2);
        assert_eq!(two.data, vec![0.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn the_sample_follows_the_rate_and_the_seed() {
        let count = |rate, seed| {
            let mut v = Verifier::new(rate, seed);
            (0..10_000).filter(|_| v.sampled()).count()
        };
        assert_eq!(count(0.0, 1), 0);
        assert_eq!(count(1.0, 1), 10_000);
        let tenth = count(0.1, 7);
        assert!((800..1200).contains(&tenth), "{tenth}");
        assert_eq!(count(0.1, 7), tenth, "reproducible");
    }
}

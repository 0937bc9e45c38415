//! What this server hosts (its span of blocks, adapters, the model's fingerprint) and the
//! checks that turn a peer's message into tensors for it: right model, blocks inside the
//! span, shapes and sizes within limits, values finite.

use std::ops::Range;
use std::sync::Arc;

use burn::prelude::*;
use shared_model::layers::lora::LoraSpan;
use shared_model::model::{BlockSpan, to_host};
use swarm::protocol::{ErrorKind, LimitExceeded, Limits, ProtocolError};
use swarm::wire::{WireDtype, WireError, WireTensor};

/// The span and everything a request on it needs.
///
/// Everything lives on the plain backend `B`, so inference (sessions, stateless forward, head
/// service) runs burn's inference ops and the GPU fast paths of `shared_model::kernels`, and
/// quantized weights stay quantized. A backward request runs on `Autodiff<B>` over
/// [`BlockSpan::autodiff`], which shares the span's dense weights (no second copy).
pub struct Hosted<B: Backend> {
    pub span: BlockSpan<B>,
    pub fingerprint: String,
    pub device: B::Device,
    pub limits: Limits,
    /// LoRA adapters for this span, by name.
    pub adapters: Vec<(String, Arc<LoraSpan<B>>)>,
}

pub fn refuse(kind: ErrorKind, message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(kind, message)
}

pub fn bad_request(e: impl std::fmt::Display) -> ProtocolError {
    refuse(ErrorKind::BadRequest, e.to_string())
}

impl<B: Backend> Hosted<B> {
    pub fn hidden_size(&self) -> usize {
        self.span.config().hidden_size
    }

    /// The adapter a session asked for, if this server has it.
    pub fn adapter(&self, name: Option<&str>) -> Result<Option<Arc<LoraSpan<B>>>, ProtocolError> {
        let Some(name) = name else { return Ok(None) };
        match self.adapters.iter().find(|(n, _)| n == name) {
            Some((_, span)) => Ok(Some(span.clone())),
            None => Err(refuse(
                ErrorKind::BadRequest,
                format!("this server has no adapter {name:?}"),
            )),
        }
    }

    /// Checks a request's model and blocks against what this server hosts.
    pub fn check_span(&self, model: &str, start: u32, end: u32) -> Result<Range<usize>, ProtocolError> {
        if model != self.fingerprint {
            return Err(refuse(
                ErrorKind::WrongModel,
                format!("this server serves model {}", self.fingerprint),
            ));
        }
        let hosted = self.span.range();
        let (start, end) = (start as usize, end as usize);
        if start >= end || start < hosted.start || end > hosted.end {
            return Err(refuse(
                ErrorKind::WrongSpan,
                format!(
                    "blocks {start}..{end} are not within the hosted {}..{}",
                    hosted.start, hosted.end
                ),
            ));
        }
        Ok(start..end)
    }

    /// Checks a `[batch, tokens, hidden]` tensor's shape and sizes without decoding it;
    /// returns (batch, tokens).
    pub fn hidden_shape(&self, t: &WireTensor, batch: Option<usize>) -> Result<(usize, usize), ProtocolError> {
        let h = self.hidden_size() as u64;
        t.expect_shape(&[batch.map(|b| b as u64), None, Some(h)])
            .map_err(bad_request)?;
        t.check(&self.limits).map_err(bad_request)?;
        let (b, n) = (t.shape[0] as usize, t.shape[1] as usize);
        if b == 0 || n == 0 || b > self.limits.max_batch || b.saturating_mul(n) > self.limits.max_step_tokens {
            return Err(refuse(
                ErrorKind::BadRequest,
                format!(
                    "batch {b} x {n} tokens is outside the limits (batch 1..={}, tokens <= {})",
                    self.limits.max_batch, self.limits.max_step_tokens
                ),
            ));
        }
        Ok((b, n))
    }

    /// Decodes a tensor already checked by [`Self::hidden_shape`] onto the device.
    pub fn upload(&self, t: &WireTensor) -> Result<Tensor<B, 3>, ProtocolError> {
        let host = t.decode(&self.limits).map_err(|e: WireError| bad_request(e))?;
        Ok(Tensor::from_data(TensorData::new(host.data, host.shape), &self.device))
    }

    /// Refuses sequences longer than the model's context, naming the longest that passes.
    pub fn check_context(&self, positions: usize) -> Result<(), ProtocolError> {
        match self.span.config().max_position_embeddings {
            Some(context) if positions > context => Err(ProtocolError::too_large(
                format!("{positions} positions exceed the model's context of {context}"),
                LimitExceeded {
                    limit: "the model's context (max_position_embeddings)".into(),
                    needed: positions as u64,
                    allowed: context as u64,
                    unit: "positions".into(),
                    largest_tokens: Some(context as u64),
                },
            )),
            _ => Ok(()),
        }
    }

    /// Checks deep prompts for `blocks`: `[blocks, prefix, hidden]`; returns `prefix`.
    pub fn prompts_shape(&self, t: Option<&WireTensor>, blocks: &Range<usize>) -> Result<usize, ProtocolError> {
        let Some(t) = t else { return Ok(0) };
        let h = self.hidden_size() as u64;
        t.expect_shape(&[Some(blocks.len() as u64), None, Some(h)])
            .map_err(bad_request)?;
        t.check(&self.limits).map_err(bad_request)?;
        let prefix = t.shape[1] as usize;
        if prefix == 0 || prefix > self.limits.max_step_tokens {
            return Err(refuse(
                ErrorKind::BadRequest,
                format!("deep prompts of {prefix} positions"),
            ));
        }
        Ok(prefix)
    }

    /// Decodes deep prompts checked by [`Self::prompts_shape`].
    pub fn upload_prompts(&self, t: Option<&WireTensor>) -> Result<Option<Tensor<B, 3>>, ProtocolError> {
        t.map(|t| self.upload(t)).transpose()
    }
}

/// One left-padding entry per row.
pub fn pads(pad: &[u32], batch: usize) -> Result<Vec<usize>, ProtocolError> {
    if pad.len() != batch {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("{} pad entries for a batch of {batch}", pad.len()),
        ));
    }
    Ok(pad.iter().map(|&p| p as usize).collect())
}

pub fn to_wire<B: Backend>(t: Tensor<B, 3>, dtype: WireDtype) -> WireTensor {
    WireTensor::encode(&to_host(t), dtype)
}

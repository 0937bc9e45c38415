//! Running the blocks for a peer: on the blocking pool, under a compute slot, one chunk of a
//! long request at a time, so other peers' requests interleave with it instead of waiting for
//! the whole of it.

use std::ops::Range;
use std::sync::Arc;

use burn::prelude::*;
use libp2p::PeerId;
use shared_model::cache::SpanCache;
use shared_model::layers::lora::LoraSpan;
use swarm::protocol::{ErrorKind, ProtocolError};

use crate::admission::Admission;
use crate::hosted::{Hosted, refuse};

/// Runs `work` (over `tokens` positions) on the blocking pool under one compute slot of `peer`.
pub async fn blocking<T: Send + 'static>(
    admission: &Arc<Admission>,
    peer: PeerId,
    tokens: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProtocolError> {
    let slot = admission.compute(peer, tokens).await?;
    let out = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| refuse(ErrorKind::Internal, format!("the computation failed: {e}")));
    drop(slot);
    out
}

/// A step's input and what it runs with.
pub struct Step<B: Backend> {
    pub x: Tensor<B, 3>,
    pub blocks: Range<usize>,
    pub prompts: Option<Arc<Tensor<B, 3>>>,
    pub adapter: Option<Arc<LoraSpan<B>>>,
}

/// How a chunked step ended.
pub struct Chunked<B: Backend> {
    /// The cache, extended by what ran (`None` if it was lost with a failed task).
    pub cache: Option<SpanCache<B>>,
    pub output: Result<Tensor<B, 3>, ProtocolError>,
    /// Whether the cache holds part of the step: the session cannot go on after an error.
    pub partial: bool,
}

/// Runs `step` through the blocks, extending `cache`, `chunk` tokens (per row) at a time, each
/// chunk under its own compute slot.
pub async fn chunked<B: Backend>(
    hosted: &Arc<Hosted<B>>,
    admission: &Arc<Admission>,
    peer: PeerId,
    mut cache: SpanCache<B>,
    step: Step<B>,
    chunk: usize,
) -> Chunked<B>
where
    B::Device: Send + Sync,
{
    let [_, new, _] = step.x.dims();
    let chunk = chunk.max(1);
    let mut outputs = Vec::with_capacity(new.div_ceil(chunk));
    let mut at = 0;
    while at < new {
        let len = chunk.min(new - at);
        let x = step.x.clone().narrow(1, at, len);
        let (hosted, blocks, prompts, adapter) = (
            hosted.clone(),
            step.blocks.clone(),
            step.prompts.clone(),
            step.adapter.clone(),
        );
        let slot = match admission.compute(peer, len * step.x.dims()[0]).await {
            Ok(slot) => slot,
            Err(e) => {
                return Chunked {
                    cache: Some(cache),
                    output: Err(e),
                    partial: at > 0,
                };
            }
        };
        let ran = tokio::task::spawn_blocking(move || {
            let out = hosted
                .span
                .forward_blocks_prompted(x, &mut cache, blocks, prompts.as_deref(), adapter.as_deref(), |_, _| {})
                .map_err(|e| refuse(ErrorKind::BadRequest, e.to_string()));
            (cache, out)
        })
        .await;
        drop(slot);
        match ran {
            Ok((back, Ok(y))) => {
                cache = back;
                outputs.push(y);
            }
            Ok((back, Err(e))) => {
                return Chunked {
                    cache: Some(back),
                    output: Err(e),
                    partial: at > 0,
                };
            }
            Err(e) => {
                return Chunked {
                    cache: None,
                    output: Err(refuse(ErrorKind::Internal, format!("the computation failed: {e}"))),
                    partial: true,
                };
            }
        }
        at += len;
    }
    let output = if outputs.len() == 1 {
        outputs.pop().ok_or_else(|| refuse(ErrorKind::Internal, "no output"))
    } else {
        Ok(Tensor::cat(outputs, 1))
    };
    Chunked {
        cache: Some(cache),
        output,
        partial: false,
    }
}

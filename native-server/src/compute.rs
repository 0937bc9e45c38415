//! Running the blocks for a peer: a backward on the blocking pool under a compute slot; a
//! forward one chunk of a long request at a time through the batcher, so other peers' steps
//! interleave with it (and share its forwards) instead of waiting for the whole of it.

use std::sync::Arc;

use burn::prelude::*;
use libp2p::PeerId;
use shared_model::cache::SpanCache;
use swarm::protocol::{ErrorKind, ProtocolError};

use crate::admission::Admission;
use crate::batch::Batcher;
use crate::hosted::refuse;

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
pub type Step<B> = crate::batch::Work<B>;

/// How a chunked step ended.
pub struct Chunked<B: Backend> {
    /// The cache, extended by what ran (`None` if it was lost with a failed task).
    pub cache: Option<SpanCache<B>>,
    pub output: Result<Tensor<B, 3>, ProtocolError>,
    /// Whether the cache holds part of the step: the session cannot go on after an error.
    pub partial: bool,
}

/// Runs `step` through the blocks, extending `cache`, `chunk` tokens (per row) at a time, each
/// chunk in a batch of its own (with other sessions' steps: see [`crate::batch`]) for the
/// session `session` of `peer`.
pub async fn chunked<B: Backend>(
    batcher: &Batcher<B>,
    peer: PeerId,
    session: u64,
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
        let work = Step {
            x: if len == new {
                step.x.clone()
            } else {
                step.x.clone().narrow(1, at, len)
            },
            blocks: step.blocks.clone(),
            prompts: step.prompts.clone(),
            adapter: step.adapter.clone(),
        };
        let done = batcher.run(peer, session, cache, work).await;
        match (done.cache, done.output) {
            (Some(back), Ok(y)) => {
                cache = back;
                outputs.push(y);
            }
            (Some(back), Err(e)) => {
                return Chunked {
                    cache: Some(back),
                    output: Err(e),
                    partial: at > 0,
                };
            }
            (None, output) => {
                return Chunked {
                    cache: None,
                    output: output.and_then(|_| Err(refuse(ErrorKind::Internal, "the session cache was lost"))),
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

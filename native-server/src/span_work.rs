//! Stateless work on the span (`/corolla/span/3`): a forward over whole sequences (chunked,
//! with a cache that lives only as long as the request) or a backward (the fine-tuning path),
//! one request per stream.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::prelude::*;
use libp2p::{PeerId, Stream};
use shared_model::cache::SpanCache;
use shared_model::model::to_host;
use shared_model::tuning::span_backward;
use swarm::protocol::{ErrorKind, ProtocolError, SpanRequest, SpanResponse};
use swarm::wire::WireTensor;

use crate::admission::{MemoryGrant, Ticket};
use crate::compute::{self, Step};
use crate::cost::CostModel;
use crate::hosted::{bad_request, pads, refuse, to_wire};
use crate::io::{self, IoError};
use crate::serve::Context;

/// Answers the one request of a span stream.
pub async fn serve<B: Backend>(ctx: Arc<Context<B>>, peer: PeerId, mut stream: Stream, ticket: Ticket)
where
    B::Device: Send + Sync,
{
    let (response, _memory) = match handle(&ctx, peer, &mut stream, ticket).await {
        Ok(done) => done,
        Err(e) => (SpanResponse::Error(e), None),
    };
    ctx.metrics.request("span");
    if let SpanResponse::Error(e) = &response {
        tracing::debug!(%peer, error = %e, "span request refused");
        ctx.metrics.error(e.kind);
    }
    let limits = ctx.admission.limits();
    // The reply's memory stays reserved until it is written.
    if let Err(e) = io::write(
        &mut stream,
        &response,
        limits.wire.max_frame_bytes,
        limits.write_timeout,
    )
    .await
    {
        tracing::debug!(%peer, error = %e, "span reply not delivered");
    }
    let _ = tokio::time::timeout(limits.write_timeout, futures::AsyncWriteExt::close(&mut stream)).await;
}

pub fn io_refusal(e: IoError) -> ProtocolError {
    match e {
        IoError::Timeout { .. } => refuse(ErrorKind::Closed, e.to_string()),
        IoError::Wire(w) => bad_request(w),
    }
}

/// Reads the request under admission and runs it; returns the reply and the memory it holds.
async fn handle<B: Backend>(
    ctx: &Arc<Context<B>>,
    peer: PeerId,
    stream: &mut Stream,
    ticket: Ticket,
) -> Result<(SpanResponse, Option<MemoryGrant>), ProtocolError>
where
    B::Device: Send + Sync,
{
    let limits = ctx.admission.limits();
    let len = io::read_len(stream, limits.wire.max_frame_bytes, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    let mut memory = ctx
        .admission
        .memory(peer, ctx.cost.frame(len), "a span request")
        .await?;
    let request: SpanRequest = io::read_body(stream, len, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    io::read_end(stream, limits.open_timeout).await.map_err(io_refusal)?;
    drop(ticket);
    let response = match request {
        SpanRequest::Forward {
            model,
            start,
            end,
            pad,
            hidden,
            reply_dtype,
            prompts,
        } => {
            let blocks = ctx.hosted.check_span(&model, start, end)?;
            let (batch, seq) = ctx.hosted.hidden_shape(&hidden, None)?;
            let pad = sequence_pads(&pad, batch, seq)?;
            ctx.hosted.check_context(seq)?;
            let prefix = ctx.hosted.prompts_shape(prompts.as_ref(), &blocks)?;
            let padded = pad.iter().any(|&p| p > 0);
            let cost = |n: usize| {
                ctx.cost
                    .forward(batch, n, blocks.len(), hidden.dtype, reply_dtype, prefix, padded)
            };
            memory
                .fit(cost(seq), &format!("a forward of {batch} x {seq} tokens"), |capacity| {
                    CostModel::largest(capacity, ctx.hosted.limits.max_step_tokens / batch, cost)
                })
                .await?;
            let step = Step {
                x: ctx.hosted.upload(&hidden)?,
                blocks: blocks.clone(),
                prompts: ctx.hosted.upload_prompts(prompts.as_ref())?.map(Arc::new),
                adapter: None,
            };
            drop(hidden);
            // The request's own cache, allocated once for the whole sequence and gone with it.
            let cache = SpanCache::with_max_len(blocks.len(), pad, seq);
            let computing = std::time::Instant::now();
            let session = ctx.batcher.session_id();
            let ran = compute::chunked(&ctx.batcher, peer, session, cache, step, ctx.cost.chunk_tokens()).await;
            tracing::debug!(%peer, batch, seq, bytes = memory.bytes(), compute_ms = computing.elapsed().as_secs_f64() * 1e3, "forward");
            SpanResponse::Tensor(ctx.faults.output(to_wire(ran.output?, reply_dtype)))
        }
        SpanRequest::Backward {
            model,
            start,
            end,
            pad,
            hidden,
            grad_output,
            reply_dtype,
            prompts,
        } => {
            let blocks = ctx.hosted.check_span(&model, start, end)?;
            let (batch, seq) = ctx.hosted.hidden_shape(&hidden, None)?;
            if grad_output.shape != hidden.shape {
                return Err(refuse(ErrorKind::BadRequest, "grad_output must have the input's shape"));
            }
            ctx.hosted.hidden_shape(&grad_output, Some(batch))?;
            let pad = sequence_pads(&pad, batch, seq)?;
            ctx.hosted.check_context(seq)?;
            let prefix = ctx.hosted.prompts_shape(prompts.as_ref(), &blocks)?;
            let padded = pad.iter().any(|&p| p > 0);
            let cost = |n: usize| {
                ctx.cost
                    .backward(batch, n, blocks.len(), hidden.dtype, reply_dtype, prefix, padded)
            };
            memory
                .fit(
                    cost(seq),
                    &format!("a backward of {batch} x {seq} tokens"),
                    |capacity| CostModel::largest(capacity, ctx.hosted.limits.max_step_tokens / batch, cost),
                )
                .await?;
            let x = ctx.hosted.upload(&hidden)?;
            let g = ctx.hosted.upload(&grad_output)?;
            let p = ctx.hosted.upload_prompts(prompts.as_ref())?;
            drop((hidden, grad_output));
            let hosted = ctx.hosted.clone();
            // A backward costs about three forwards.
            compute::blocking(&ctx.admission, peer, 3 * batch * seq, move || {
                backward(&hosted.span, blocks, pad, x, p, g, reply_dtype)
            })
            .await??
        }
    };
    Ok((response, Some(memory)))
}

/// Left padding of whole sequences: one entry per row, each shorter than the sequence.
fn sequence_pads(pad: &[u32], batch: usize, seq: usize) -> Result<Vec<usize>, ProtocolError> {
    let pad = pads(pad, batch)?;
    if pad.iter().any(|&p| p >= seq) {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("every row's padding must be shorter than its {seq} positions"),
        ));
    }
    Ok(pad)
}

fn backward<B: Backend>(
    span: &shared_model::model::BlockSpan<B>,
    blocks: std::ops::Range<usize>,
    pad: Vec<usize>,
    x: Tensor<B, 3>,
    prompts: Option<Tensor<B, 3>>,
    grad: Tensor<B, 3>,
    reply_dtype: swarm::wire::WireDtype,
) -> Result<SpanResponse, ProtocolError> {
    let span = span
        .autodiff()
        .map_err(|e| refuse(ErrorKind::Internal, e.to_string()))?;
    let (grad, prompt_grad) = span_backward::<Autodiff<B>>(
        &span,
        blocks,
        pad,
        Tensor::from_inner(x),
        prompts.map(Tensor::from_inner),
        Tensor::from_inner(grad),
    )
    .map_err(bad_request)?;
    let input = WireTensor::encode(&to_host(grad), reply_dtype);
    Ok(match prompt_grad {
        Some(p) => SpanResponse::Gradients {
            input,
            prompts: WireTensor::encode(&to_host(p), reply_dtype),
        },
        None => SpanResponse::Tensor(input),
    })
}

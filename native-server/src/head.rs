//! Head service (`/corolla/head/3`, `server --serve-head`): the embeddings and LM head, run
//! for clients that cannot hold them (a browser facing a 176B model's vocabulary), one request
//! per stream.

use std::sync::Arc;

use burn::prelude::*;
use libp2p::{PeerId, Stream};
use shared_model::model::{Embeddings, LmHead, to_host};
use swarm::protocol::{ErrorKind, HeadRequest, HeadResponse, LimitExceeded, ProtocolError};
use swarm::wire::{WireDtype, WireTensor};

use crate::admission::{MemoryGrant, Ticket};
use crate::compute;
use crate::cost::CostModel;
use crate::hosted::{bad_request, refuse};
use crate::io;
use crate::serve::Context;
use crate::span_work::io_refusal;

/// What a reply frame carries besides its tensor's bytes (CBOR tags, shape, the enum).
const FRAME_OVERHEAD: usize = 1024;

/// The embeddings and LM head.
pub struct HeadParts<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub head: LmHead<B>,
}

/// Answers the one request of a head stream.
pub async fn serve<B: Backend>(ctx: Arc<Context<B>>, peer: PeerId, mut stream: Stream, ticket: Ticket)
where
    B::Device: Send + Sync,
{
    let (response, _memory) = match handle(&ctx, peer, &mut stream, ticket).await {
        Ok((t, memory)) => (HeadResponse::Tensor(t), Some(memory)),
        Err(e) => (HeadResponse::Error(e), None),
    };
    ctx.metrics.request("head");
    if let HeadResponse::Error(e) = &response {
        tracing::debug!(%peer, error = %e, "head request refused");
        ctx.metrics.error(e.kind);
    }
    let limits = ctx.admission.limits();
    if let Err(e) = io::write(
        &mut stream,
        &response,
        limits.wire.max_frame_bytes,
        limits.write_timeout,
    )
    .await
    {
        tracing::debug!(%peer, error = %e, "head reply not delivered");
    }
    let _ = tokio::time::timeout(limits.write_timeout, futures::AsyncWriteExt::close(&mut stream)).await;
}

async fn handle<B: Backend>(
    ctx: &Arc<Context<B>>,
    peer: PeerId,
    stream: &mut Stream,
    ticket: Ticket,
) -> Result<(WireTensor, MemoryGrant), ProtocolError>
where
    B::Device: Send + Sync,
{
    let limits = ctx.admission.limits();
    let len = io::read_len(stream, limits.wire.max_frame_bytes, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    let Some(parts) = ctx.head.clone() else {
        return Err(refuse(ErrorKind::WrongSpan, "this server offers no head service"));
    };
    let mut memory = ctx
        .admission
        .memory(peer, ctx.cost.frame(len), "a head request")
        .await?;
    let request: HeadRequest = io::read_body(stream, len, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    io::read_end(stream, limits.open_timeout).await.map_err(io_refusal)?;
    drop(ticket);
    let wire = &ctx.hosted.limits;
    let check_model = |model: &str| {
        if model == ctx.hosted.fingerprint {
            Ok(())
        } else {
            Err(refuse(
                ErrorKind::WrongModel,
                format!("this server serves {}", ctx.hosted.fingerprint),
            ))
        }
    };
    let out = match request {
        HeadRequest::Embed {
            model,
            batch,
            token_ids,
            reply_dtype,
        } => {
            check_model(&model)?;
            let batch = batch as usize;
            if batch == 0
                || batch > wire.max_batch
                || token_ids.is_empty()
                || token_ids.len() % batch != 0
                || token_ids.len() > wire.max_step_tokens
            {
                return Err(refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "{} token ids do not make {batch} equal rows within the limits",
                        token_ids.len()
                    ),
                ));
            }
            let n = token_ids.len();
            fit_reply(
                n * ctx.hosted.hidden_size(),
                reply_dtype,
                wire.max_frame_bytes,
                ctx.hosted.hidden_size(),
            )?;
            let cost = |n: usize| ctx.cost.embed(n, reply_dtype);
            memory
                .fit(cost(n), &format!("embeddings of {n} tokens"), |capacity| {
                    CostModel::largest(capacity, wire.max_step_tokens, cost)
                })
                .await?;
            compute::blocking(&ctx.admission, peer, n, move || {
                let rows: Vec<Vec<u32>> = token_ids.chunks(n / batch).map(<[u32]>::to_vec).collect();
                let x = parts.embeddings.forward(&rows).map_err(bad_request)?;
                Ok::<_, ProtocolError>(WireTensor::encode(&to_host(x), reply_dtype))
            })
            .await??
        }
        HeadRequest::Logits { model, hidden } => {
            check_model(&model)?;
            let (batch, seq) = ctx.hosted.hidden_shape(&hidden, None)?;
            let positions = batch * seq;
            let vocab = ctx.hosted.span.config().vocab_size;
            fit_reply(positions * vocab, WireDtype::F32, wire.max_frame_bytes, vocab)?;
            let cost = |n: usize| ctx.cost.logits(n, hidden.dtype);
            memory
                .fit(
                    cost(positions),
                    &format!("logits of {positions} positions"),
                    |capacity| CostModel::largest(capacity, wire.max_step_tokens, cost),
                )
                .await?;
            let x = ctx.hosted.upload(&hidden)?;
            drop(hidden);
            compute::blocking(&ctx.admission, peer, positions, move || {
                WireTensor::encode(&to_host(parts.head.forward(x)), WireDtype::F32)
            })
            .await?
        }
    };
    Ok((out, memory))
}

/// Refuses a request whose reply (`values` values of `dtype`, `per_position` a position)
/// would not fit one frame, naming the largest that would.
fn fit_reply(values: usize, dtype: WireDtype, max_frame: usize, per_position: usize) -> Result<(), ProtocolError> {
    let bytes = values.saturating_mul(dtype.size()).saturating_add(FRAME_OVERHEAD);
    if bytes <= max_frame {
        return Ok(());
    }
    let largest = max_frame.saturating_sub(FRAME_OVERHEAD) / (per_position * dtype.size()).max(1);
    Err(ProtocolError::too_large(
        format!("the reply would be a {bytes}-byte frame; frames are limited to {max_frame} bytes"),
        LimitExceeded {
            limit: "max frame size".into(),
            needed: bytes as u64,
            allowed: max_frame as u64,
            unit: "bytes".into(),
            largest_tokens: Some(largest as u64),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_over_a_frame_is_refused_with_the_largest_that_fits() {
        assert!(fit_reply(1000, WireDtype::F32, 1 << 20, 100).is_ok());
        let e = fit_reply(16384 * 128_000, WireDtype::F32, 256 << 20, 128_000).expect_err("8 GB");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert_eq!(e.limit.expect("limit").largest_tokens, Some(524));
    }
}

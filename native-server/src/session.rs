//! The inference session protocol (`/corolla/inference/1`): on its own stream, an `Open`
//! within `--open-timeout`, then `Step`s, each answered with the span's output, until `Close`,
//! the end of the stream, an idle timeout or a reply the peer does not take in time.
//!
//! The session's slot and KV cache are taken only after a valid `Open` and are given back the
//! moment the session ends, however it ends.

use std::ops::Range;
use std::sync::Arc;

use burn::prelude::*;
use libp2p::{PeerId, Stream};
use shared_model::cache::SpanCache;
use shared_model::layers::lora::LoraSpan;
use swarm::protocol::{ErrorKind, ProtocolError, SessionRequest, SessionResponse};
use swarm::wire::{WireDtype, WireTensor};

use crate::admission::{MemoryGrant, Ticket};
use crate::compute::{self, Step};
use crate::cost::{CostModel, SessionShape};
use crate::hosted::{bad_request, pads, refuse, to_wire};
use crate::io::{self, IoError};
use crate::serve::Context;

/// An open session's fixed parameters.
struct Opened<B: Backend> {
    blocks: Range<usize>,
    batch: usize,
    max_length: usize,
    reply_dtype: WireDtype,
    prompts: Option<Arc<Tensor<B, 3>>>,
    prefix_len: usize,
    /// Some row is left-padded.
    padded: bool,
    adapter: Option<Arc<LoraSpan<B>>>,
}

/// Serves one session stream to its end.
pub async fn serve<B: Backend>(ctx: Arc<Context<B>>, peer: PeerId, mut stream: Stream, ticket: Ticket)
where
    B::Device: Send + Sync,
{
    ctx.metrics.request("session");
    if let Err(e) = run(&ctx, peer, &mut stream, ticket).await {
        tracing::debug!(%peer, error = %e, "session ended with an error");
        ctx.metrics.error(e.kind);
        let limits = &ctx.admission.limits().wire;
        // Best effort, and short: the peer may be the reason it failed.
        let _ = io::write(
            &mut stream,
            &SessionResponse::Error(e),
            limits.max_frame_bytes,
            ctx.admission
                .limits()
                .open_timeout
                .min(ctx.admission.limits().write_timeout),
        )
        .await;
    }
}

fn io_refusal(e: IoError) -> ProtocolError {
    match e {
        IoError::Timeout { .. } => refuse(ErrorKind::Closed, e.to_string()),
        IoError::Wire(w) => bad_request(w),
    }
}

async fn run<B: Backend>(
    ctx: &Arc<Context<B>>,
    peer: PeerId,
    stream: &mut Stream,
    ticket: Ticket,
) -> Result<(), ProtocolError>
where
    B::Device: Send + Sync,
{
    let limits = ctx.admission.limits().clone();
    let max = limits.wire.max_frame_bytes;
    let len = io::read_len(stream, max, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    let mut memory = ctx
        .admission
        .memory(peer, ctx.cost.frame(len), "an Open message")
        .await?;
    let first: SessionRequest = io::read_body(stream, len, limits.open_timeout)
        .await
        .map_err(io_refusal)?;
    let (opened, pad) = open(ctx, first)?;
    let prompt_elements = (opened.blocks.len() * opened.prefix_len * ctx.hosted.hidden_size()) as u64;
    let tokens = ctx
        .cost
        .session_tokens(opened.batch, opened.max_length, prompt_elements);
    let grant = ctx.admission.open_session(peer, tokens).await?;
    // The stream now holds a session, no longer a pending stream.
    drop(ticket);
    drop(memory);
    tracing::debug!(%peer, blocks = ?opened.blocks, batch = opened.batch, max_length = opened.max_length, tokens, "session opened");
    io::write(
        stream,
        &SessionResponse::Opened {
            cache_tokens: grant.charged_tokens(),
        },
        max,
        limits.write_timeout,
    )
    .await
    .map_err(io_refusal)?;

    let session = ctx.batcher.session_id();
    // Never more than the session was charged for.
    let mut cache: Option<SpanCache<B>> = Some(SpanCache::with_max_len(opened.blocks.len(), pad, opened.max_length));
    loop {
        let read = tokio::select! {
            read = io::read_len(stream, max, limits.session_timeout) => read,
            // The span moved while the session idled: its client fails over.
            () = ctx.retired.cancelled() => {
                return Err(ctx
                    .batcher
                    .retired()
                    .unwrap_or_else(|| refuse(ErrorKind::WrongSpan, "this server no longer serves these blocks")));
            }
        };
        let len = match read {
            Ok(len) => len,
            Err(e) if e.is_closed() => return Ok(()),
            Err(IoError::Timeout { .. }) => return Err(refuse(ErrorKind::Closed, "session idle for too long")),
            Err(e) => return Err(io_refusal(e)),
        };
        memory = match ctx
            .admission
            .memory(peer, ctx.cost.frame(len), "a session message")
            .await
        {
            Ok(m) => m,
            Err(mut e) => {
                // A frame too large to take at all: say how many tokens a step's frame may hold.
                if let Some(limit) = e.limit.as_mut() {
                    let per_token = (opened.batch * ctx.hosted.hidden_size() * opened.reply_dtype.size()) as u64;
                    limit.largest_tokens = Some(limit.allowed / 2 / per_token.max(1)).filter(|&n| n > 0);
                }
                // Skip the body without holding it: the session goes on at the next frame.
                io::discard(stream, len, limits.open_timeout)
                    .await
                    .map_err(io_refusal)?;
                reply(ctx, stream, &SessionResponse::Error(e)).await?;
                continue;
            }
        };
        let request: SessionRequest = match io::read_body(stream, len, limits.open_timeout).await {
            Ok(r) => r,
            Err(IoError::Wire(e @ swarm::wire::WireError::Decode(_))) => {
                // The frame boundary is intact: report and keep the session.
                drop(memory);
                reply(ctx, stream, &SessionResponse::Error(bad_request(e))).await?;
                continue;
            }
            Err(e) => return Err(io_refusal(e)),
        };
        let (step, hidden, start_from) = match request {
            SessionRequest::Close => return Ok(()),
            SessionRequest::Open { .. } => {
                drop(memory);
                reply(
                    ctx,
                    stream,
                    &SessionResponse::Error(refuse(ErrorKind::BadRequest, "session already open")),
                )
                .await?;
                continue;
            }
            SessionRequest::Step {
                step,
                hidden,
                start_from,
            } => (step, hidden, start_from),
        };
        let Some(mut c) = cache.take() else {
            return Err(refuse(ErrorKind::Internal, "session cache lost"));
        };
        if let Some(to) = start_from
            && let Err(e) = roll_back(&mut c, to)
        {
            cache = Some(c);
            drop(memory);
            ctx.metrics.error(e.kind);
            reply(ctx, stream, &SessionResponse::Error(e)).await?;
            continue;
        }
        let stepping = std::time::Instant::now();
        let (back, response, fatal) = run_step(ctx, peer, session, &opened, c, &hidden, &mut memory).await;
        drop(hidden);
        let Some(back) = back else {
            return Err(refuse(ErrorKind::Internal, "session cache lost"));
        };
        cache = Some(back);
        let response = match response {
            Ok(out) => {
                ctx.faults.delay_step().await;
                SessionResponse::Output {
                    step,
                    hidden: ctx.faults.output(out),
                }
            }
            Err(e) if fatal => return Err(e),
            Err(e) => {
                ctx.metrics.error(e.kind);
                SessionResponse::Error(e)
            }
        };
        reply(ctx, stream, &response).await?;
        ctx.metrics.steps.inc();
        ctx.metrics.step_seconds.observe(stepping.elapsed().as_secs_f64());
        drop(memory);
    }
}

async fn reply<B: Backend>(
    ctx: &Context<B>,
    stream: &mut Stream,
    response: &SessionResponse,
) -> Result<(), ProtocolError> {
    let limits = ctx.admission.limits();
    io::write(stream, response, limits.wire.max_frame_bytes, limits.write_timeout)
        .await
        .map_err(io_refusal)
}

/// Rolls the session's cache back to `to` positions (`Step::start_from`): what speculative
/// decoding rejected is forgotten. Rolling forward is refused; the cache is unchanged then.
fn roll_back<B: Backend>(cache: &mut SpanCache<B>, to: u64) -> Result<(), ProtocolError> {
    let len = cache.len;
    usize::try_from(to)
        .ok()
        .and_then(|to| cache.truncate(to).ok())
        .ok_or_else(|| {
            refuse(
                ErrorKind::BadRequest,
                format!("start_from {to} is past the {len} positions this session holds"),
            )
        })
}

/// Validates `Open` into the session's parameters and the rows' padding.
fn open<B: Backend>(ctx: &Context<B>, request: SessionRequest) -> Result<(Opened<B>, Vec<usize>), ProtocolError> {
    let SessionRequest::Open {
        model,
        start,
        end,
        batch,
        max_length,
        pad,
        reply_dtype,
        prompts,
        adapter,
    } = request
    else {
        return Err(refuse(ErrorKind::BadRequest, "a session must start with Open"));
    };
    let hosted = &ctx.hosted;
    let blocks = hosted.check_span(&model, start, end)?;
    let prefix_len = hosted.prompts_shape(prompts.as_ref(), &blocks)?;
    let adapter = hosted.adapter(adapter.as_deref())?;
    let batch = batch as usize;
    let max_length = max_length as usize;
    if batch == 0 || batch > hosted.limits.max_batch || max_length == 0 {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!(
                "batch {batch} / max_length {max_length} out of range (batch 1..={}, max_length >= 1)",
                hosted.limits.max_batch
            ),
        ));
    }
    if let Some(context) = hosted.span.config().max_position_embeddings
        && max_length > context
    {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("max_length {max_length} exceeds the context of {context}"),
        ));
    }
    let pad = pads(&pad, batch)?;
    if pad.iter().any(|&p| p >= max_length) {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("every row's padding must be shorter than max_length {max_length}"),
        ));
    }
    let prompts = hosted.upload_prompts(prompts.as_ref())?.map(Arc::new);
    Ok((
        Opened {
            blocks,
            batch,
            max_length,
            reply_dtype,
            prompts,
            prefix_len,
            padded: pad.iter().any(|&p| p > 0),
            adapter,
        },
        pad,
    ))
}

/// Runs one step. Returns the cache (if it survived), the reply, and whether an error leaves
/// the session unusable.
async fn run_step<B: Backend>(
    ctx: &Arc<Context<B>>,
    peer: PeerId,
    session: u64,
    opened: &Opened<B>,
    cache: SpanCache<B>,
    hidden: &WireTensor,
    memory: &mut MemoryGrant,
) -> (Option<SpanCache<B>>, Result<WireTensor, ProtocolError>, bool)
where
    B::Device: Send + Sync,
{
    let (_, new) = match ctx.hosted.hidden_shape(hidden, Some(opened.batch)) {
        Ok(shape) => shape,
        Err(e) => return (Some(cache), Err(e), false),
    };
    if cache.len + new > opened.max_length {
        let e = refuse(
            ErrorKind::BadRequest,
            format!(
                "{new} more tokens exceed the session's max_length of {} ({} used)",
                opened.max_length, cache.len
            ),
        );
        return (Some(cache), Err(e), false);
    }
    let past = cache.len;
    let shape = SessionShape {
        prefix_len: opened.prefix_len,
        padded: opened.padded,
        lora: opened.adapter.is_some(),
    };
    // What the cache holds room for now: a step that fits pays no regrowth.
    let capacity = cache.layers.first().map(|l| l.capacity());
    let cost = |n: usize| {
        ctx.cost.step(
            opened.batch,
            n,
            past,
            opened.blocks.len(),
            hidden.dtype,
            opened.reply_dtype,
            &shape,
            capacity,
        )
    };
    let room = (opened.max_length - past).min(ctx.hosted.limits.max_step_tokens / opened.batch);
    let waiting = std::time::Instant::now();
    let fitted = memory
        .fit(cost(new), &format!("a step of {new} tokens"), |capacity| {
            CostModel::largest(capacity, room, cost)
        })
        .await;
    let memory_wait = waiting.elapsed();
    if let Err(e) = fitted {
        return (Some(cache), Err(e), false);
    }
    let x = match ctx.hosted.upload(hidden) {
        Ok(x) => x,
        Err(e) => return (Some(cache), Err(e), false),
    };
    let step = Step {
        x,
        blocks: opened.blocks.clone(),
        prompts: opened.prompts.clone(),
        adapter: opened.adapter.clone(),
    };
    let computing = std::time::Instant::now();
    let ran = compute::chunked(&ctx.batcher, peer, session, cache, step, ctx.cost.chunk_tokens()).await;
    tracing::debug!(
        %peer,
        new,
        past,
        bytes = memory.bytes(),
        memory_wait_ms = memory_wait.as_secs_f64() * 1e3,
        compute_ms = computing.elapsed().as_secs_f64() * 1e3,
        "step"
    );
    let dtype = opened.reply_dtype;
    let output = ran.output.map(|y| to_wire(y, dtype));
    let fatal = ran.partial || ran.cache.is_none();
    (ran.cache, output, fatal)
}

//! The inference session protocol (`/corolla/inference/1`): on its own stream, an `Open`
//! within `--open-timeout`, then `Step`s, each answered with the span's output, until `Close`,
//! the end of the stream, an idle timeout or a reply the peer does not take in time.
//!
//! The session's slot and KV cache are taken only after a valid `Open` and are given back the
//! moment the session ends, however it ends.
//!
//! After a `Link`, steps also arrive pushed by the previous hop's server ([`crate::push`]):
//! both sources run through [`Core`], one step at a time, and each answers on the client's
//! stream.

use std::ops::Range;
use std::sync::Arc;

use burn::prelude::*;
use futures::AsyncReadExt;
use futures::io::{ReadHalf, WriteHalf};
use libp2p::{PeerId, Stream};
use shared_model::cache::SpanCache;
use shared_model::layers::lora::LoraSpan;
use swarm::node;
use swarm::protocol::{
    ErrorKind, PUSH_MAX_TOKENS, ProtocolError, PushStep, PushTarget, SessionRequest, SessionResponse,
};
use swarm::wire::{WireDtype, WireTensor};

use crate::admission::{MemoryGrant, Ticket};
use crate::compute::{self, Step};
use crate::cost::{CostModel, SessionShape};
use crate::hosted::{bad_request, pads, refuse, to_wire};
use crate::io::{self, IoError};
use crate::push::Pusher;
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
pub async fn serve<B: Backend>(ctx: Arc<Context<B>>, client: node::Client, peer: PeerId, stream: Stream, ticket: Ticket)
where
    B::Device: Send + Sync,
{
    ctx.metrics.request("session");
    let (mut reader, writer) = stream.split();
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
    if let Err(e) = run(&ctx, client, peer, &mut reader, &writer, ticket).await {
        tracing::debug!(%peer, error = %e, "session ended with an error");
        ctx.metrics.error(e.kind);
        let limits = ctx.admission.limits();
        // Best effort, and short: the peer may be the reason it failed.
        let _ = tokio::time::timeout(limits.open_timeout.min(limits.write_timeout), async {
            let mut writer = writer.lock().await;
            io::write(
                &mut *writer,
                &SessionResponse::Error(e),
                limits.wire.max_frame_bytes,
                limits.open_timeout.min(limits.write_timeout),
            )
            .await
        })
        .await;
    }
}

fn io_refusal(e: IoError) -> ProtocolError {
    match e {
        IoError::Timeout { .. } => refuse(ErrorKind::Closed, e.to_string()),
        IoError::Wire(w) => bad_request(w),
    }
}

/// The client's side of the stream, shared by the session's two sources of steps.
type Writer = Arc<tokio::sync::Mutex<WriteHalf<Stream>>>;

/// An open session: what its steps read and change, whoever sends them.
pub struct Core<B: Backend> {
    ctx: Arc<Context<B>>,
    client: node::Client,
    /// The client.
    peer: PeerId,
    session: u64,
    opened: Opened<B>,
    live: tokio::sync::Mutex<Live<B>>,
    writer: Writer,
    /// The only peer whose pushes this session takes (its client's `Link`).
    from: std::sync::Mutex<Option<PeerId>>,
    /// When a step last ran: pushes keep a session alive whose client sends nothing.
    active: std::sync::Mutex<std::time::Instant>,
}

struct Live<B: Backend> {
    cache: Option<SpanCache<B>>,
    /// The name pushes for this session carry, once linked.
    token: Option<u64>,
    pusher: Option<Pusher>,
}

/// Where a step came from, and so how it is answered.
enum Origin {
    /// The client's `Step`, answered with `Output`.
    Client { step: u64 },
    /// The previous hop's push, answered with `Pushed`; `position` is where it begins.
    Push { position: u64 },
}

impl<B: Backend> Core<B> {
    /// The peer that opened the session: its steps run on this peer's budgets, whoever
    /// delivers them.
    pub fn client(&self) -> PeerId {
        self.peer
    }

    pub fn takes_pushes_from(&self, peer: &PeerId) -> bool {
        *self.from.lock().unwrap_or_else(|p| p.into_inner()) == Some(*peer)
    }

    async fn reply(&self, response: &SessionResponse) -> Result<(), ProtocolError> {
        let limits = self.ctx.admission.limits();
        let mut writer = self.writer.lock().await;
        io::write(
            &mut *writer,
            response,
            limits.wire.max_frame_bytes,
            limits.write_timeout,
        )
        .await
        .map_err(io_refusal)
    }

    /// A step pushed by the previous hop. Errors go to the client, which then sends the step
    /// itself; a stale push (the client already re-sent it) is dropped.
    pub async fn pushed(self: &Arc<Self>, step: PushStep, memory: &mut MemoryGrant)
    where
        B::Device: Send + Sync,
    {
        let origin = Origin::Push {
            position: step.position,
        };
        if let Err(e) = self.step(origin, step.hidden, step.start_from, true, memory).await {
            tracing::debug!(peer = %self.peer, error = %e, "a pushed step ended the session's stream");
        }
    }

    /// Runs one step and answers it; `Err` only when the session cannot go on.
    async fn step(
        self: &Arc<Self>,
        origin: Origin,
        hidden: WireTensor,
        start_from: Option<u64>,
        push: bool,
        memory: &mut MemoryGrant,
    ) -> Result<(), ProtocolError>
    where
        B::Device: Send + Sync,
    {
        let ctx = &self.ctx;
        let mut live = self.live.lock().await;
        let Some(mut c) = live.cache.take() else {
            return Err(refuse(ErrorKind::Internal, "session cache lost"));
        };
        let refused = |cache: SpanCache<B>, live: &mut Live<B>, e: ProtocolError| {
            live.cache = Some(cache);
            ctx.metrics.error(e.kind);
            SessionResponse::Error(e)
        };
        if let Some(to) = start_from
            && let Err(e) = roll_back(&mut c, to)
        {
            let response = refused(c, &mut live, e);
            return self.reply(&response).await;
        }
        let position = c.len as u64;
        if let Origin::Push { position: at } = origin
            && at != position
        {
            live.cache = Some(c);
            if at < position {
                // The client sent this step itself after the push was late: nothing to do.
                return Ok(());
            }
            let e = refuse(
                ErrorKind::BadRequest,
                format!("a push for position {at}, but the session holds {position}"),
            );
            ctx.metrics.error(e.kind);
            return self.reply(&SessionResponse::Error(e)).await;
        }
        let new = hidden.shape.get(1).copied().unwrap_or(0);
        if push && new > PUSH_MAX_TOKENS as u64 {
            let e = refuse(
                ErrorKind::BadRequest,
                format!("a pushed step holds at most {PUSH_MAX_TOKENS} positions"),
            );
            let response = refused(c, &mut live, e);
            return self.reply(&response).await;
        }
        let stepping = std::time::Instant::now();
        let (back, response, fatal) = run_step(ctx, self.peer, self.session, &self.opened, c, &hidden, memory).await;
        drop(hidden);
        let Some(back) = back else {
            return Err(refuse(ErrorKind::Internal, "session cache lost"));
        };
        live.cache = Some(back);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        let response = match response {
            Ok(out) => {
                ctx.faults.delay_step().await;
                let out = ctx.faults.output(out);
                // The next hop first: it is on the token's critical path, the client is not.
                let pushed = match live.pusher.as_mut() {
                    Some(pusher) if push => {
                        let limits = ctx.admission.limits();
                        pusher
                            .push(
                                &self.client,
                                position,
                                start_from,
                                out.clone(),
                                limits.write_timeout.min(limits.open_timeout),
                                limits.wire.max_frame_bytes,
                            )
                            .await
                    }
                    _ => false,
                };
                match origin {
                    Origin::Client { step } => SessionResponse::Output {
                        step,
                        hidden: out,
                        pushed,
                    },
                    Origin::Push { position } => SessionResponse::Pushed {
                        position,
                        hidden: out,
                        pushed,
                    },
                }
            }
            Err(e) if fatal => return Err(e),
            Err(e) => {
                ctx.metrics.error(e.kind);
                SessionResponse::Error(e)
            }
        };
        self.reply(&response).await?;
        ctx.metrics.steps.inc();
        ctx.metrics.step_seconds.observe(stepping.elapsed().as_secs_f64());
        Ok(())
    }

    /// `Link`: where this session's pushes go and whose it takes.
    async fn link(self: &Arc<Self>, token: u64, from: Option<String>, to: Option<PushTarget>) -> SessionResponse {
        let from = match from.map(|f| f.parse::<PeerId>()) {
            None => None,
            Some(Ok(peer)) => Some(peer),
            Some(Err(_)) => {
                return SessionResponse::Error(refuse(ErrorKind::BadRequest, "Link.from is not a peer id"));
            }
        };
        let pusher = match to.map(Pusher::new).transpose() {
            Ok(p) => p,
            Err(e) => return SessionResponse::Error(e),
        };
        if pusher.as_ref().is_some_and(|p| p.peer() == self.client.peer_id()) {
            return SessionResponse::Error(refuse(ErrorKind::BadRequest, "a session cannot push to its own server"));
        }
        let mut live = self.live.lock().await;
        if let Err(e) = self.ctx.pushes.register(token, live.token, self) {
            return SessionResponse::Error(e);
        }
        live.token = Some(token);
        live.pusher = pusher;
        *self.from.lock().unwrap_or_else(|p| p.into_inner()) = from;
        SessionResponse::Linked
    }
}

impl<B: Backend> Drop for Core<B> {
    fn drop(&mut self) {
        if let Ok(live) = self.live.try_lock()
            && let Some(token) = live.token
        {
            self.ctx.pushes.unregister(token);
        }
    }
}

async fn run<B: Backend>(
    ctx: &Arc<Context<B>>,
    client: node::Client,
    peer: PeerId,
    stream: &mut ReadHalf<Stream>,
    writer: &Writer,
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
    // Never more than the session was charged for.
    let cache = SpanCache::with_max_len(opened.blocks.len(), pad, opened.max_length);
    let core = Arc::new(Core {
        ctx: ctx.clone(),
        client,
        peer,
        session: ctx.batcher.session_id(),
        opened,
        live: tokio::sync::Mutex::new(Live {
            cache: Some(cache),
            token: None,
            pusher: None,
        }),
        writer: writer.clone(),
        from: std::sync::Mutex::new(None),
        active: std::sync::Mutex::new(std::time::Instant::now()),
    });
    core.reply(&SessionResponse::Opened {
        cache_tokens: grant.charged_tokens(),
    })
    .await?;

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
            Err(IoError::Timeout { .. }) => {
                let active = *core.active.lock().unwrap_or_else(|p| p.into_inner());
                if active.elapsed() < limits.session_timeout {
                    // Its steps come pushed: the session is busy, not idle.
                    continue;
                }
                return Err(refuse(ErrorKind::Closed, "session idle for too long"));
            }
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
                    let opened = &core.opened;
                    let per_token = (opened.batch * ctx.hosted.hidden_size() * opened.reply_dtype.size()) as u64;
                    limit.largest_tokens = Some(limit.allowed / 2 / per_token.max(1)).filter(|&n| n > 0);
                }
                // Skip the body without holding it: the session goes on at the next frame.
                io::discard(stream, len, limits.open_timeout)
                    .await
                    .map_err(io_refusal)?;
                core.reply(&SessionResponse::Error(e)).await?;
                continue;
            }
        };
        let request: SessionRequest = match io::read_body(stream, len, limits.open_timeout).await {
            Ok(r) => r,
            Err(IoError::Wire(e @ swarm::wire::WireError::Decode(_))) => {
                // The frame boundary is intact: report and keep the session.
                drop(memory);
                core.reply(&SessionResponse::Error(bad_request(e))).await?;
                continue;
            }
            Err(e) => return Err(io_refusal(e)),
        };
        match request {
            SessionRequest::Close => return Ok(()),
            SessionRequest::Open { .. } => {
                drop(memory);
                core.reply(&SessionResponse::Error(refuse(
                    ErrorKind::BadRequest,
                    "session already open",
                )))
                .await?;
            }
            SessionRequest::Link { token, from, to } => {
                drop(memory);
                let response = core.link(token, from, to).await;
                core.reply(&response).await?;
            }
            SessionRequest::Step {
                step,
                hidden,
                start_from,
                push,
            } => {
                core.step(Origin::Client { step }, hidden, start_from, push, &mut memory)
                    .await?;
                drop(memory);
            }
        }
    }
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
    let compute_ms = computing.elapsed().as_secs_f64() * 1e3;
    let dtype = opened.reply_dtype;
    // The copy back waits for the device: what `compute_ms` only queued shows up here.
    let reading = std::time::Instant::now();
    let output = ran.output.map(|y| to_wire(y, dtype));
    tracing::debug!(
        %peer,
        new,
        past,
        bytes = memory.bytes(),
        memory_wait_ms = memory_wait.as_secs_f64() * 1e3,
        compute_ms,
        read_back_ms = reading.elapsed().as_secs_f64() * 1e3,
        "step"
    );
    let fatal = ran.partial || ran.cache.is_none();
    (ran.cache, output, fatal)
}

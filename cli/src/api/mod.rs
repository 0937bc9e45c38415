//! `corolla api`: an OpenAI-compatible HTTP API over the swarm (`--initial-peers`) or over a
//! model run here (`--model PATH`): `GET /v1/models`, `POST /v1/chat/completions`, `POST
//! /v1/completions` (streamed as server-sent events or whole), `GET /health`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use libp2p::Multiaddr;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

use crate::args::{RoutingArg, WireDtypeArg};

mod catalog;
mod engine;
mod error;
mod openai;
mod text;

use catalog::{Card, Catalog, SwarmModels};
use engine::{Engine, Event};
use error::ApiError;
use openai::{Kind, Reply};

/// Largest request body: a long chat fits many times over.
const MAX_BODY_BYTES: usize = 8 << 20;

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Address to serve the API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Relays or servers of the swarm whose models to serve.
    #[arg(long, num_args = 1.., required_unless_present = "model", conflicts_with = "model")]
    pub initial_peers: Vec<Multiaddr>,
    /// Run this model here instead (an HF-layout folder, a .gguf file or a Hub id
    /// `org/name[@revision]`), on the CPU.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The name `--model` is served under (default: the file's name without extension).
    #[arg(long, requires = "model")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Generations run at once; more get 429 (OpenAI clients retry them).
    #[arg(long, default_value_t = 16)]
    pub max_concurrent: usize,
    /// The private swarm's pre-shared key (IPFS swarm.key format), if it is one.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Where client bundles of swarm models are cached (default: the corolla cache).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Share of hop answers spot-checked on another server (0 turns it off).
    #[arg(long, default_value_t = swarm::remote::DEFAULT_VERIFY_RATE)]
    pub verify: f64,
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub wire_dtype: WireDtypeArg,
    #[arg(long, value_enum, default_value_t = RoutingArg::Latency)]
    pub routing: RoutingArg,
    /// Speculative decoding for every request: check up to K prompt-lookup drafts a step
    /// (0 turns it off; tokens and their distribution do not change).
    #[arg(long, default_value_t = 0, value_name = "K", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub speculative: u16,
    /// Write the address the API listens on to this file once it does (for scripts: with
    /// `--listen 127.0.0.1:0`).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

/// Shared by every handler.
struct ApiState {
    catalog: Catalog,
    /// SHA-256 of the API key: compared digest to digest.
    api_key: Option<[u8; 32]>,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
}

pub fn run(args: ApiArgs) -> Result<()> {
    if args.max_concurrent == 0 {
        anyhow::bail!("--max-concurrent must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.verify) {
        anyhow::bail!("--verify must be within 0..1");
    }
    let (runtime, catalog) = match &args.model {
        Some(path) => {
            let files = crate::fetch::open_model(path, args.cache_dir.clone())?;
            let name = args
                .served_model_name
                .clone()
                .unwrap_or_else(|| shared_model::hub::model_name(path));
            let engine = Engine::local(files, name)?.with_speculative(usize::from(args.speculative));
            (tokio::runtime::Runtime::new()?, Catalog::Local(Arc::new(engine)))
        }
        None => {
            let (runtime, client) = crate::remote::connect(&args.initial_peers, args.swarm_key.as_deref())?;
            let catalog = Catalog::Swarm(SwarmModels {
                client,
                cache: crate::fetch::cache_dir(args.cache_dir.clone()),
                verify_rate: args.verify,
                wire_dtype: args.wire_dtype,
                routing: args.routing,
                speculative: usize::from(args.speculative),
                loaded: Default::default(),
            });
            (runtime, catalog)
        }
    };
    let state = Arc::new(ApiState {
        catalog,
        api_key: args.api_key.as_deref().map(digest),
        slots: Arc::new(Semaphore::new(args.max_concurrent)),
        max_concurrent: args.max_concurrent,
    });
    runtime.block_on(serve(args.listen, args.addr_file, state, shutdown_signal()))
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn serve(
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "OpenAI-compatible API listening");
    eprintln!("corolla api: http://{addr}/v1");
    if let Some(path) = &addr_file {
        std::fs::write(path, addr.to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let limits = swarm::http::HttpLimits {
        // A whole (not streamed) reply may take this long.
        handler_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let server = swarm::http::serve(listener, swarm::http::public(router(state), &limits), limits);
    tokio::select! {
        () = server => Ok(()),
        () = shutdown => Ok(()),
    }
}

fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .merge(v1)
        .fallback(|uri: axum::http::Uri| async move { ApiError::not_found(uri.path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

async fn authorize(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(digest);
        if given.as_ref() != Some(key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

fn card_json(card: &Card) -> serde_json::Value {
    json!({
        "id": card.name,
        "object": "model",
        "created": 0,
        "owned_by": "corolla",
        "fingerprint": card.fingerprint,
        "servers": card.servers,
    })
}

async fn models(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let cards = state.catalog.cards().await?;
    let data: Vec<_> = cards.iter().map(card_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn model(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let cards = state.catalog.cards().await?;
    match cards.iter().find(|c| c.name == id || c.fingerprint == id) {
        Some(card) => Ok(axum::Json(card_json(card)).into_response()),
        None => Err(ApiError::unknown_model(
            &id,
            &cards.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        )),
    }
}

async fn chat(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: openai::ChatRequest = openai::parse(&body)?;
    let generation = openai::generation(&request.common)?;
    let messages = openai::messages(&request.messages)?;
    let engine = state.catalog.engine(&generation.model).await?;
    let ids = engine.chat_prompt(&messages)?;
    let job = engine.job(ids, &generation)?;
    respond(&state, engine, job, &generation, Kind::Chat).await
}

async fn completions(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: openai::CompletionRequest = openai::parse(&body)?;
    if request.echo == Some(true) {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    if request.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::bad("best_of", "only best_of = 1"));
    }
    let generation = openai::generation(&request.common)?;
    let engine = state.catalog.engine(&generation.model).await?;
    let ids = match &request.prompt {
        openai::Prompt::Text(text) => engine.encode(text)?,
        openai::Prompt::Texts(texts) if texts.len() == 1 => engine.encode(&texts[0])?,
        openai::Prompt::Texts(_) => return Err(ApiError::bad("prompt", "one prompt per request")),
        openai::Prompt::Tokens(ids) => ids.clone(),
    };
    let job = engine.job(ids, &generation)?;
    respond(&state, engine, job, &generation, Kind::Text).await
}

/// Starts the generation and answers with its first event in hand, so that a request the
/// swarm cannot serve gets its error status rather than a broken stream.
async fn respond(
    state: &ApiState,
    engine: Arc<Engine>,
    job: engine::Job,
    generation: &openai::Generation,
    kind: Kind,
) -> Result<Response, ApiError> {
    let permit = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy(state.max_concurrent))?;
    let (tx, mut rx) = mpsc::channel(64);
    let worker = engine.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker.run(job, tx);
    });
    let reply = Reply::new(kind, engine.name.clone(), engine.fingerprint.clone());
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the generation ended without an answer"))?;
    if let Event::Failed(e) = first {
        return Err(e);
    }
    if generation.stream {
        Ok(stream(reply, first, rx, generation.include_usage))
    } else {
        whole(reply, first, rx).await
    }
}

async fn whole(reply: Reply, first: Event, mut rx: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut event = Some(first);
    while let Some(e) = event.take() {
        match e {
            Event::Route(route) => tracing::debug!(%route, "route"),
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, usage, .. } => {
                return Ok(axum::Json(reply.complete(&text, finish, usage)).into_response());
            }
            Event::Failed(e) => return Err(e),
        }
        event = rx.recv().await;
    }
    Err(ApiError::internal("the generation ended without finishing"))
}

/// Server-sent events: (chat) a role delta first, content deltas, the finish reason, the usage
/// chunk if asked, `[DONE]`; the route and timing as comments, which clients skip.
fn stream(reply: Reply, first: Event, rx: mpsc::Receiver<Event>, include_usage: bool) -> Response {
    let mut queue = VecDeque::new();
    if reply.kind == Kind::Chat {
        queue.push_back(data(reply.chunk(true, Some(""), None, include_usage)));
    }
    let mut streamer = Streamer {
        reply,
        rx,
        queue,
        include_usage,
        done: false,
    };
    streamer.push(first);
    let events = futures::stream::unfold(streamer, |mut s| async move {
        loop {
            if let Some(event) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(event) => s.push(event),
                None => s.push(Event::Failed(ApiError::internal(
                    "the generation ended without finishing",
                ))),
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A `data:` event of JSON.
fn data(value: serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

struct Streamer {
    reply: Reply,
    rx: mpsc::Receiver<Event>,
    queue: VecDeque<SseEvent>,
    include_usage: bool,
    done: bool,
}

impl Streamer {
    fn push(&mut self, event: Event) {
        let usage = self.include_usage;
        match event {
            Event::Route(route) => self
                .queue
                .push_back(SseEvent::default().comment(format!("route {route}"))),
            Event::Text(t) => self
                .queue
                .push_back(data(self.reply.chunk(false, Some(&t), None, usage))),
            Event::Done {
                finish,
                usage: u,
                timing,
            } => {
                self.queue
                    .push_back(data(self.reply.chunk(false, None, Some(finish), usage)));
                if usage {
                    self.queue.push_back(data(self.reply.usage_chunk(u)));
                }
                let per_token = timing.ms_per_token.map_or("-".into(), |ms| format!("{ms:.1}"));
                self.queue.push_back(SseEvent::default().comment(format!(
                    "timing first_token_ms={:.1} ms_per_token={per_token}",
                    timing.first_token_ms
                )));
                self.queue.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
            Event::Failed(e) => {
                self.queue.push_back(data(e.to_json()));
                self.queue.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
        }
    }
}

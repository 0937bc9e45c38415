//! One model ready to answer: its tokenizer, template, embeddings and head here, its blocks
//! here too (`--model PATH`) or in the swarm. Each generation runs on a blocking thread and
//! sends its text as it comes; when the receiver goes (the HTTP client disconnected), the
//! generation stops at its next token and its sessions close, freeing the servers' caches.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::prelude::Tensor;
use shared_model::Cpu;
use shared_model::generate::{BlockRunner, GenerateParams, LocalBlocks, TokenEvent, generate};
use shared_model::loader::ModelFiles;
use shared_model::model::{BlockSpan, Embeddings, LmHead};
use shared_model::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use swarm::node::Client;
use swarm::remote::{RemoteBlocks, RemoteConfig};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::{Finish, Generation, Usage};
use super::text::{Filtered, StopFilter};

/// The most new tokens a request gets when it names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 4096;

enum Blocks {
    Local(Vec<BlockSpan<Cpu>>),
    Swarm {
        handle: tokio::runtime::Handle,
        client: Client,
        config: RemoteConfig,
    },
}

pub struct Engine {
    /// The name clients use (what the server or `--model` calls it).
    pub name: String,
    pub fingerprint: String,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    stop_ids: Vec<u32>,
    context: Option<usize>,
    vocab: usize,
    embeddings: Embeddings<Cpu>,
    head: LmHead<Cpu>,
    blocks: Blocks,
    /// Draft tokens checked per step (speculative decoding; 0: off).
    speculative: usize,
}

/// What a generation sends, in order: route changes and text as they come, then its end.
#[derive(Debug)]
pub enum Event {
    /// The swarm route now (at the first token, and after each failover): `peer:start-end`s.
    Route(String),
    Text(String),
    Done {
        finish: Finish,
        usage: Usage,
        timing: Timing,
    },
    Failed(ApiError),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub first_token_ms: f64,
    pub ms_per_token: Option<f64>,
}

/// A prompt ready to run.
#[derive(Debug)]
pub struct Job {
    pub prompt_ids: Vec<u32>,
    pub params: GenerateParams,
    pub stop: Vec<String>,
}

impl Engine {
    /// Everything of `files` here (`corolla api --model PATH`).
    pub fn local(files: ModelFiles, name: String) -> Result<Self> {
        let fingerprint = shared_model::fingerprint::fingerprint(&files.config, files.weights.as_ref())
            .context("cannot fingerprint the model")?;
        let model = crate::fetch::load_local::<Cpu>(&files, &Default::default())?;
        Self::new(
            files,
            name,
            fingerprint,
            model.embeddings,
            model.head,
            Blocks::Local(model.spans),
        )
    }

    /// The embeddings and head of `files` (a checked client bundle) here, the blocks in the swarm.
    pub fn swarm(files: ModelFiles, name: String, client: Client, config: RemoteConfig) -> Result<Self> {
        let device = Default::default();
        let embeddings = Embeddings::<Cpu>::load(&files.config, files.weights.as_ref(), &device)?;
        let head = LmHead::<Cpu>::load(&files.config, files.weights.as_ref(), &device)?;
        let fingerprint = config.model.clone();
        let blocks = Blocks::Swarm {
            handle: tokio::runtime::Handle::current(),
            client,
            config,
        };
        Self::new(files, name, fingerprint, embeddings, head, blocks)
    }

    fn new(
        files: ModelFiles,
        name: String,
        fingerprint: String,
        embeddings: Embeddings<Cpu>,
        head: LmHead<Cpu>,
        blocks: Blocks,
    ) -> Result<Self> {
        let tokenizer = files
            .tokenizer
            .context("the model has no tokenizer: the API needs one to read and write text")?;
        Ok(Self {
            name,
            fingerprint,
            tokenizer,
            template: files.chat_template,
            stop_ids: files.stop_ids,
            context: files.config.max_position_embeddings,
            vocab: files.config.vocab_size,
            embeddings,
            head,
            blocks,
            speculative: 0,
        })
    }

    /// Checks up to `k` prompt-lookup drafts a step in every generation (0: off).
    pub fn with_speculative(mut self, k: usize) -> Self {
        self.speculative = k;
        self
    }

    /// The prompt of a chat, through the model's template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| ApiError::bad("model", "this model has no chat template: use /v1/completions"))?;
        let text = template
            .render(messages, true)
            .map_err(|e| ApiError::bad("messages", format!("the chat template refused the messages: {e}")))?;
        self.encode(&text)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad("prompt", format!("cannot tokenize the prompt: {e}")))
    }

    /// Checks `ids` against the vocabulary and the context, and settles `max_tokens`.
    pub fn job(&self, prompt_ids: Vec<u32>, g: &Generation) -> Result<Job, ApiError> {
        if prompt_ids.is_empty() {
            return Err(ApiError::bad("prompt", "the prompt is empty"));
        }
        if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(ApiError::bad(
                "prompt",
                format!("token id {id} is out of range (vocabulary of {})", self.vocab),
            ));
        }
        let room = self.context.map(|c| c.saturating_sub(prompt_ids.len()));
        if room == Some(0) {
            return Err(ApiError::bad(
                "messages",
                format!(
                    "the prompt has {} tokens: no room left in the model's context of {}",
                    prompt_ids.len(),
                    self.context.unwrap_or(0)
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let max_new_tokens = match (g.max_tokens, room) {
            (Some(n), Some(room)) if n > room => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!(
                        "the prompt ({} tokens) plus max_tokens {n} exceeds the model's context of {}",
                        prompt_ids.len(),
                        self.context.unwrap_or(0)
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            (Some(n), _) => n,
            (None, room) => room.unwrap_or(DEFAULT_MAX_TOKENS).min(DEFAULT_MAX_TOKENS),
        };
        Ok(Job {
            prompt_ids,
            params: GenerateParams {
                max_new_tokens,
                sampling: g.sampling.clone(),
                stop_ids: self.stop_ids.clone(),
                ignore_eos: false,
                speculative: self.speculative,
            },
            stop: g.stop.clone(),
        })
    }

    /// Runs `job` on this (blocking) thread, sending its [`Event`]s to `out`.
    pub fn run(&self, job: Job, out: mpsc::Sender<Event>) {
        let start = Instant::now();
        let mut text = self.tokenizer.stream(true);
        let mut filter = StopFilter::new(job.stop.clone());
        let mut stamps: Vec<Instant> = Vec::new();
        let mut stopped = false;
        let mut gone = false;
        let mut route = String::new();
        let mut send = |event: Event| {
            if out.blocking_send(event).is_err() {
                gone = true;
            }
            !gone
        };
        let mut on_token = |event: TokenEvent, route_now: Option<String>| -> ControlFlow<()> {
            stamps.push(Instant::now());
            if let Some(now) = route_now
                && now != route
            {
                route = now.clone();
                if !send(Event::Route(now)) {
                    return ControlFlow::Break(());
                }
            }
            let piece = match text.push(event.token) {
                Ok(piece) => piece,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot decode a token");
                    String::new()
                }
            };
            let (piece, stop) = match filter.push(&piece) {
                Filtered::More(p) => (p, false),
                Filtered::Stopped(p) => (p, true),
            };
            stopped |= stop;
            if !piece.is_empty() && !send(Event::Text(piece)) {
                return ControlFlow::Break(());
            }
            if stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let prompts = [job.prompt_ids.clone()];
        let route_now = RefCell::new(String::new());
        let result = match &self.blocks {
            Blocks::Local(spans) => match LocalBlocks::new(spans) {
                Ok(mut blocks) => generate(&self.embeddings, &self.head, &mut blocks, &prompts, &job.params, |e| {
                    on_token(e, None)
                })
                .map_err(|e| ApiError::internal(e.to_string())),
                Err(e) => Err(ApiError::internal(e.to_string())),
            },
            Blocks::Swarm { handle, client, config } => {
                // Dropped at the end of this arm: its sessions close in the background.
                let mut blocks =
                    RemoteBlocks::<Cpu>::new(handle.clone(), client.clone(), config.clone(), Default::default());
                let mut runner = RouteWatch {
                    inner: &mut blocks,
                    route: &route_now,
                };
                generate(&self.embeddings, &self.head, &mut runner, &prompts, &job.params, |e| {
                    on_token(e, Some(route_now.borrow().clone()))
                })
                .map_err(|e| ApiError::unavailable(format!("the swarm could not run the model: {e}")))
            }
        };
        let tokens = match result {
            Ok(mut rows) => rows.pop().unwrap_or_default(),
            Err(e) => {
                let _ = out.blocking_send(Event::Failed(e));
                return;
            }
        };
        if gone {
            tracing::info!(tokens = tokens.len(), "client went away: generation stopped");
            return;
        }
        if !stopped {
            let rest = text.finish().unwrap_or_default();
            let mut tail = match filter.push(&rest) {
                Filtered::More(p) => p,
                Filtered::Stopped(p) => {
                    stopped = true;
                    p
                }
            };
            if !stopped {
                tail.push_str(&filter.finish());
            }
            if !tail.is_empty() {
                let _ = out.blocking_send(Event::Text(tail));
            }
        }
        let hit_stop_id = tokens.last().is_some_and(|t| self.stop_ids.contains(t));
        let finish = if stopped || hit_stop_id || tokens.len() < job.params.max_new_tokens {
            Finish::Stop
        } else {
            Finish::Length
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timing = Timing {
            first_token_ms: stamps.first().map_or(0.0, |t| ms(t.duration_since(start))),
            ms_per_token: match (stamps.first(), stamps.last()) {
                (Some(a), Some(b)) if stamps.len() > 1 => Some(ms(b.duration_since(*a)) / (stamps.len() - 1) as f64),
                _ => None,
            },
        };
        let usage = Usage {
            prompt_tokens: job.prompt_ids.len(),
            completion_tokens: tokens.len(),
        };
        let _ = out.blocking_send(Event::Done { finish, usage, timing });
    }
}

/// `peer…:start-end` for each hop.
fn describe_route(route: &[(libp2p::PeerId, usize, usize)]) -> String {
    route
        .iter()
        .map(|(peer, start, end)| {
            let id = peer.to_string();
            format!("{}:{start}-{end}", &id[id.len().saturating_sub(8)..])
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Remote blocks that note their route after each step, for the SSE comments.
struct RouteWatch<'a> {
    inner: &'a mut RemoteBlocks<Cpu>,
    route: &'a RefCell<String>,
}

impl BlockRunner<Cpu> for RouteWatch<'_> {
    type Error = swarm::remote::RemoteError;

    fn start(&mut self, pad: Vec<usize>, max_length: usize) -> Result<(), Self::Error> {
        self.inner.start(pad, max_length)
    }

    fn step(&mut self, hidden: Tensor<Cpu, 3>) -> Result<Tensor<Cpu, 3>, Self::Error> {
        let out = self.inner.step(hidden);
        *self.route.borrow_mut() = describe_route(&self.inner.route());
        out
    }

    fn rollback(&mut self, len: usize) -> Result<(), Self::Error> {
        self.inner.rollback(len)
    }
}

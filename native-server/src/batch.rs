//! Continuous batching: every step that runs the blocks (a session's decode or prefill chunk,
//! a chunk of a stateless forward) waits here, and whenever the device frees, the steps that
//! are ready run as ONE forward per block (`BlockSpan::forward_batch`): a decode step is bound
//! by reading the weights, so the sessions of a batch cost about what one costs. Each step
//! attends to its own session's cache; outputs equal the unbatched ones.
//!
//! Which steps go together is decided as the compute slots are: by start-time fair queueing
//! ([`FairTags`], weighed by tokens), so a peer's flood of long chunks queues behind itself
//! and a light user's decode joins the next batch. A batch takes the earliest-tagged step
//! (never skipped, so large steps are not starved), then every other step in tag order that
//! fits `--max-batch-tokens` and runs the same blocks. Steps with deep prompts or a LoRA
//! adapter run alone. One batch runs at a time, under one compute slot; `--batch-wait-ms`
//! lets a batch wait a little for the sessions that stepped in the last second.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use burn::prelude::*;
use libp2p::PeerId;
use shared_model::cache::SpanCache;
use shared_model::layers::lora::LoraSpan;
use swarm::protocol::{ErrorKind, ProtocolError};
use tokio::sync::{Notify, oneshot};

use crate::admission::Admission;
use crate::fair::FairTags;
use crate::hosted::{Hosted, refuse};
use crate::metrics::ServerMetrics;

/// How batches form.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most tokens (rows x new positions) of one forward; a single larger step runs alone.
    pub max_tokens: usize,
    /// How long a batch may wait for recently active sessions' steps.
    pub wait: Duration,
    /// Most steps queued at once; more are told `Busy`.
    pub max_queued: usize,
    /// The chunk size that one unit of fair cost stands for.
    pub chunk_tokens: usize,
}

/// Sessions that stepped this recently count as active for `--batch-wait-ms`.
const ACTIVE: Duration = Duration::from_secs(1);

/// One step: its input, the blocks it runs and what it runs with.
pub struct Work<B: Backend> {
    /// `[rows, new, hidden]`, on the device.
    pub x: Tensor<B, 3>,
    pub blocks: Range<usize>,
    pub prompts: Option<Arc<Tensor<B, 3>>>,
    pub adapter: Option<Arc<LoraSpan<B>>>,
}

impl<B: Backend> Work<B> {
    fn solo(&self) -> bool {
        self.prompts.is_some() || self.adapter.is_some()
    }
}

/// How a step ended: the cache back (`None` if it was lost with a failed computation) and the
/// output.
pub struct Done<B: Backend> {
    pub cache: Option<SpanCache<B>>,
    pub output: Result<Tensor<B, 3>, ProtocolError>,
}

struct Job<B: Backend> {
    peer: PeerId,
    session: u64,
    seq: u64,
    start: f64,
    finish: f64,
    tokens: usize,
    queued: Instant,
    work: Work<B>,
    cache: SpanCache<B>,
    reply: oneshot::Sender<Done<B>>,
}

impl<B: Backend> Job<B> {
    fn answer(self, output: Result<Tensor<B, 3>, ProtocolError>) {
        let _ = self.reply.send(Done {
            cache: Some(self.cache),
            output,
        });
    }
}

struct Queue<B: Backend> {
    jobs: Vec<Job<B>>,
    tags: FairTags,
    next_seq: u64,
    /// When each session last queued a step (pruned past [`ACTIVE`]).
    recent: HashMap<u64, Instant>,
}

/// The server's one batcher; [`Batcher::run`] submits a step, [`Batcher::serve`] runs them.
pub struct Batcher<B: Backend> {
    hosted: Arc<Hosted<B>>,
    admission: Arc<Admission>,
    metrics: Arc<ServerMetrics>,
    config: BatchConfig,
    queue: Mutex<Queue<B>>,
    wake: Notify,
    next_session: AtomicU64,
    /// Once set (the span is no longer served), every step is answered with it.
    retired: OnceLock<ProtocolError>,
}

impl<B: Backend> Batcher<B>
where
    B::Device: Send + Sync,
{
    pub fn new(
        hosted: Arc<Hosted<B>>,
        admission: Arc<Admission>,
        metrics: Arc<ServerMetrics>,
        config: BatchConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            hosted,
            admission,
            metrics,
            config,
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                tags: FairTags::default(),
                next_seq: 0,
                recent: HashMap::new(),
            }),
            wake: Notify::new(),
            next_session: AtomicU64::new(0),
            retired: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue<B>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new id for a session (or a stateless request) whose steps come here.
    pub fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs `work` on `cache` in the next batch that takes it.
    pub async fn run(&self, peer: PeerId, session: u64, cache: SpanCache<B>, work: Work<B>) -> Done<B> {
        let [rows, new, _] = work.x.dims();
        let tokens = rows * new;
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.lock();
            if let Some(e) = self.retired.get() {
                return Done {
                    cache: Some(cache),
                    output: Err(e.clone()),
                };
            }
            if queue.jobs.len() >= self.config.max_queued {
                drop(queue);
                return Done {
                    cache: Some(cache),
                    output: Err(refuse(
                        ErrorKind::Busy,
                        format!("{} steps are already waiting for a batch", self.config.max_queued),
                    )),
                };
            }
            let cost = tokens as f64 / self.config.chunk_tokens.max(1) as f64;
            let (start, finish) = queue.tags.tag(peer, cost);
            let seq = queue.next_seq;
            queue.next_seq += 1;
            queue.recent.insert(session, Instant::now());
            queue.jobs.push(Job {
                peer,
                session,
                seq,
                start,
                finish,
                tokens,
                queued: Instant::now(),
                work,
                cache,
                reply: tx,
            });
        }
        self.wake.notify_one();
        rx.await.unwrap_or_else(|_| Done {
            cache: None,
            output: Err(refuse(ErrorKind::Internal, "the computation failed")),
        })
    }

    /// What steps are answered with since [`Self::retire`].
    pub fn retired(&self) -> Option<ProtocolError> {
        self.retired.get().cloned()
    }

    /// Answers every queued and future step with `error`: the span is no longer served (the
    /// server moved). Steps already in a running batch finish.
    pub fn retire(&self, error: ProtocolError) {
        let jobs = {
            let mut queue = self.lock();
            let _ = self.retired.set(error.clone());
            std::mem::take(&mut queue.jobs)
        };
        for job in jobs {
            job.answer(Err(error.clone()));
        }
    }

    /// Forms and runs batches until the task is dropped.
    pub async fn serve(self: Arc<Self>) {
        loop {
            self.ready().await;
            self.wait_for_active().await;
            let batch = self.take_batch();
            if batch.is_empty() {
                continue;
            }
            self.run_batch(batch).await;
        }
    }

    /// Waits until some step is queued.
    async fn ready(&self) {
        loop {
            let notified = self.wake.notified();
            if !self.lock().jobs.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// With `--batch-wait-ms`: waits, at most that long, until every session that stepped in
    /// the last second has a step queued.
    async fn wait_for_active(&self) {
        if self.config.wait.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.config.wait;
        loop {
            let notified = self.wake.notified();
            {
                let mut queue = self.lock();
                let now = Instant::now();
                queue.recent.retain(|_, at| now.duration_since(*at) < ACTIVE);
                let queued: HashSet<u64> = queue.jobs.iter().map(|j| j.session).collect();
                let tokens: usize = queue.jobs.iter().map(|j| j.tokens).sum();
                if tokens >= self.config.max_tokens || queue.recent.keys().all(|s| queued.contains(s)) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Takes the next batch from the queue (see the module's docs).
    fn take_batch(&self) -> Vec<Job<B>> {
        let mut queue = self.lock();
        queue
            .jobs
            .sort_by(|a, b| a.finish.total_cmp(&b.finish).then(a.seq.cmp(&b.seq)));
        if queue.jobs.is_empty() {
            return Vec::new();
        }
        let first = queue.jobs.remove(0);
        let mut budget = self.config.max_tokens.saturating_sub(first.tokens);
        let mut batch = vec![first];
        if !batch[0].work.solo() {
            let blocks = batch[0].work.blocks.clone();
            let mut i = 0;
            while i < queue.jobs.len() && budget > 0 {
                let job = &queue.jobs[i];
                if !job.work.solo() && job.work.blocks == blocks && job.tokens <= budget {
                    budget -= job.tokens;
                    batch.push(queue.jobs.remove(i));
                } else {
                    i += 1;
                }
            }
        }
        for job in &batch {
            queue.tags.served(job.start);
        }
        batch
    }

    /// Runs `batch` on the blocking pool under one compute slot, answering every step.
    async fn run_batch(&self, batch: Vec<Job<B>>) {
        let tokens: usize = batch.iter().map(|j| j.tokens).sum();
        // The slot is weighed by the leading step alone: the others ride along.
        let slot = match self.admission.compute(batch[0].peer, batch[0].tokens).await {
            Ok(slot) => slot,
            Err(e) => {
                for job in batch {
                    job.answer(Err(e.clone()));
                }
                return;
            }
        };
        let steps = batch.len();
        for job in &batch {
            self.metrics.queue_seconds.observe(job.queued.elapsed().as_secs_f64());
        }
        let hosted = self.hosted.clone();
        let started = Instant::now();
        // A panic inside drops the jobs' reply senders: their steps end with their caches lost.
        let _ = tokio::task::spawn_blocking(move || forward(&hosted, batch)).await;
        drop(slot);
        self.metrics.batch(steps, tokens, started.elapsed());
        tracing::trace!(steps, tokens, "batch");
    }
}

/// Runs one batch and answers each step: a step that fails its checks is answered alone and
/// the rest still run together.
fn forward<B: Backend>(hosted: &Hosted<B>, mut batch: Vec<Job<B>>) {
    let span = &hosted.span;
    let bad = |e: shared_model::error::ModelError| refuse(ErrorKind::BadRequest, e.to_string());
    if batch.len() == 1 {
        let Some(Job {
            work:
                Work {
                    x,
                    blocks,
                    prompts,
                    adapter,
                },
            mut cache,
            reply,
            ..
        }) = batch.pop()
        else {
            return;
        };
        let output = span
            .forward_blocks_prompted(x, &mut cache, blocks, prompts.as_deref(), adapter.as_deref(), |_, _| {})
            .map_err(bad);
        let _ = reply.send(Done {
            cache: Some(cache),
            output,
        });
        return;
    }
    let mut ready = Vec::with_capacity(batch.len());
    for job in batch {
        match span.check_batch_step(job.work.x.dims(), &job.cache, &job.work.blocks) {
            Ok(()) => ready.push(job),
            Err(e) => job.answer(Err(bad(e))),
        }
    }
    let Some(blocks) = ready.first().map(|j| j.work.blocks.clone()) else {
        return;
    };
    let steps = ready.iter_mut().map(|j| (j.work.x.clone(), &mut j.cache)).collect();
    match span.forward_batch(steps, blocks) {
        Ok(outputs) => {
            for (job, y) in ready.into_iter().zip(outputs) {
                job.answer(Ok(y));
            }
        }
        Err(e) => {
            let e = bad(e);
            for job in ready {
                job.answer(Err(e.clone()));
            }
        }
    }
}

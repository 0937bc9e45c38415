//! Moving a live server to other blocks (rebalancing), without losing anyone's work.
//!
//! When memory holds both spans, the new one loads beside the old; new streams get it at once
//! and it is announced in place of the old. The old span keeps serving the sessions it has
//! until they end (or [`DRAIN_BESIDE`] passes), then it is retired and freed. When memory
//! holds one span only, the server stops announcing and admitting, lets the old span's
//! sessions finish for up to [`DRAIN_FIRST`], retires it, waits for it to be freed, then loads
//! the new one. A retired span answers every step, and ends every idle session, with
//! `WrongSpan` ("moved"): the clients fail over, replaying their history elsewhere, so their
//! tokens do not change.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use burn::prelude::*;
use swarm::protocol::{ErrorKind, ProtocolError};

use crate::announce::Announcer;
use crate::args::BackendKind;
use crate::hosted::refuse;
use crate::serve::{Context, Current, Shared};
use crate::span_choice;

/// How long the old span keeps its sessions once the new one serves beside it.
const DRAIN_BESIDE: Duration = Duration::from_secs(120);
/// How long the old span's sessions may go on when it must be unloaded first: new sessions
/// are refused meanwhile, so this is kept short.
const DRAIN_FIRST: Duration = Duration::from_secs(30);
/// How long a retired span's sessions get to end before the move goes on regardless.
const RELEASE: Duration = Duration::from_secs(10);
/// How often a draining span is looked at.
const POLL: Duration = Duration::from_millis(100);
/// Memory left free beside a second span on the host.
const HOST_RESERVE: u64 = 1 << 30;

/// What a move needs: the span in service, how to load another, and the announcer.
pub struct Relocator<B: Backend> {
    pub current: Arc<Current<B>>,
    pub shared: Arc<Shared<B>>,
    pub announcer: Arc<Announcer>,
}

/// What a session on a span that moved is told.
fn moved(to: &Range<usize>) -> ProtocolError {
    refuse(
        ErrorKind::WrongSpan,
        format!("this server moved to blocks {}..{}", to.start, to.end),
    )
}

impl<B: Backend> Relocator<B>
where
    B::Device: Send + Sync,
{
    /// The span served now, if any.
    pub fn span(&self) -> Option<Range<usize>> {
        self.current.get().map(|c| c.hosted.span.range())
    }

    /// Moves the server's span to start at `start` (same length). Errors only if the server
    /// is left with nothing to serve: it could load neither the new span nor the old again.
    pub async fn move_to(&self, start: usize) -> Result<()> {
        let Some(old) = self.current.get() else {
            return Ok(());
        };
        let from = old.hosted.span.range();
        let to = start..(start + from.len()).min(self.shared.model.num_layers);
        if to == from || to.is_empty() {
            return Ok(());
        }
        tracing::info!(from = ?from, to = ?to, "moving to other blocks");
        if self.room_for_both(to.len()) {
            self.move_beside(old, from, to).await;
            Ok(())
        } else {
            self.move_after_draining(old, from, to).await
        }
    }

    /// Loads `to` beside the old span, switches to it, and retires the old one once drained.
    async fn move_beside(&self, old: Arc<Context<B>>, from: Range<usize>, to: Range<usize>) {
        match self.load(to.clone()).await {
            Ok(new) => {
                self.current.set(Some(new));
                self.announcer.set_span(to.start, to.end);
                self.shared.metrics.span(&to);
                self.shared.metrics.moved("both");
                tracing::info!(from = ?from, to = ?to, "serving the new blocks; the old ones serve their sessions until they end");
                tokio::spawn(async move {
                    let old = drained(old, DRAIN_BESIDE).await;
                    old.retire(moved(&to));
                    drop(released(old, RELEASE).await);
                });
            }
            Err(e) => {
                self.shared.metrics.moved("failed");
                tracing::warn!(from = ?from, to = ?to, error = %format!("{e:#}"), "cannot load the new blocks; staying");
            }
        }
    }

    /// Stops serving the old span, waits for it to be freed, then loads `to` (or the old
    /// span back, if `to` cannot load).
    async fn move_after_draining(&self, old: Arc<Context<B>>, from: Range<usize>, to: Range<usize>) -> Result<()> {
        self.announcer.pause().await;
        self.current.set(None);
        let old = drained(old, DRAIN_FIRST).await;
        old.retire(moved(&to));
        if let Some(still) = released(old, RELEASE).await {
            tracing::warn!(
                holders = Arc::strong_count(&still) - 1,
                "the old blocks are still in use; loading the new ones regardless"
            );
        }
        let (served, outcome) = match self.load(to.clone()).await {
            Ok(new) => ((new, to), "drained"),
            Err(e) => {
                tracing::warn!(from = ?from, to = ?to, error = %format!("{e:#}"), "cannot load the new blocks; loading the old ones again");
                let back = self
                    .load(from.clone())
                    .await
                    .context("cannot load the new blocks, nor the old ones again")?;
                ((back, from), "failed")
            }
        };
        let (ctx, blocks) = served;
        self.current.set(Some(ctx));
        self.announcer.set_span(blocks.start, blocks.end);
        self.shared.metrics.span(&blocks);
        self.shared.metrics.moved(outcome);
        if outcome == "drained" {
            tracing::info!(blocks = ?blocks, "serving the new blocks after unloading the old ones");
        } else {
            tracing::warn!(blocks = ?blocks, "serving the old blocks again");
        }
        Ok(())
    }

    async fn load(&self, blocks: Range<usize>) -> Result<Arc<Context<B>>> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reload(blocks))
            .await
            .context("loading the blocks failed")?
    }

    /// Whether a span of `blocks` blocks fits beside the one loaded, with room to spare.
    fn room_for_both(&self, blocks: usize) -> bool {
        let shared = &self.shared;
        if shared.config.faults.one_span_only() {
            return false;
        }
        let weights = blocks as u64
            * span_choice::block_weight_bytes(&shared.model, shared.config.dtype.bytes(), shared.config.quant) as u64;
        let (free, reserve) = match shared.config.backend {
            BackendKind::Cpu => (crate::memory::available_memory(), HOST_RESERVE),
            BackendKind::Cuda => {
                let total = shared_model::kernels::gpu_memory_bytes::<B>(&shared.device).unwrap_or(0);
                (
                    shared_model::kernels::gpu_free_bytes::<B>(&shared.device),
                    (total / 10).max(2 << 30),
                )
            }
            // wgpu reports no free memory: unload first.
            BackendKind::Wgpu => (None, 0),
        };
        let fits = free.is_some_and(|free| free >= weights + reserve);
        tracing::debug!(weights, ?free, reserve, fits, "room for a second span?");
        fits
    }
}

/// `ctx` once nothing but the caller holds it (its sessions ended), or after `limit`.
async fn drained<B: Backend>(ctx: Arc<Context<B>>, limit: Duration) -> Arc<Context<B>> {
    let deadline = tokio::time::Instant::now() + limit;
    while Arc::strong_count(&ctx) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    ctx
}

/// Drops `ctx` once nothing else holds it, freeing its span; gives it back if others still do
/// after `limit`.
async fn released<B: Backend>(ctx: Arc<Context<B>>, limit: Duration) -> Option<Arc<Context<B>>> {
    let ctx = drained(ctx, limit).await;
    (Arc::strong_count(&ctx) > 1).then_some(ctx)
}

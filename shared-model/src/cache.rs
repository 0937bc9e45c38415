//! KV caches live here, outside the weight modules: one server holds many sessions' caches
//! for the same blocks.

use burn::prelude::*;

/// Keys and values of one block for one session.
///
/// # Shapes
/// `k`, `v`: `[batch, kv_heads, len, head_dim]`
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// A stateless forward (training) must not keep anything.
    keep: bool,
}

impl<B: Backend> LayerCache<B> {
    pub fn new() -> Self {
        Self { kv: None, keep: true }
    }

    /// A cache that forgets: for one-shot forwards over whole sequences.
    pub fn scratch() -> Self {
        Self { kv: None, keep: false }
    }

    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values; returns all of them.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        if self.keep {
            self.kv = Some((k.clone(), v.clone()));
        }
        (k, v)
    }
}

impl<B: Backend> Default for LayerCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// The KV cache of one session over a span of blocks, plus where its sequences stand.
#[derive(Debug, Clone)]
pub struct SpanCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// Left padding of each batch row.
    pub pad: Vec<usize>,
    /// Tokens already processed (padding included).
    pub len: usize,
}

impl<B: Backend> SpanCache<B> {
    pub fn new(num_blocks: usize, pad: Vec<usize>) -> Self {
        Self {
            layers: (0..num_blocks).map(|_| LayerCache::new()).collect(),
            pad,
            len: 0,
        }
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }
}

//! KV caches live here, outside the weight modules: one server holds many sessions' caches
//! for the same blocks.

use burn::prelude::*;

/// Keys and values of one block for one session.
///
/// The buffers are allocated ahead, [`GROWTH`] positions at a time, and each step writes its
/// keys into place: concatenating instead copied the whole cache on every token, and a
/// kernel specialized on each new length had to be found (or compiled) on every token.
///
/// # Shapes
/// buffers `[batch, kv_heads, capacity, head_dim]`, of which the first `len` positions hold
/// keys and values
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    len: usize,
    /// A stateless forward (training) must not keep anything.
    keep: bool,
}

/// Positions a cache grows by when it is full (rounded up to hold a whole step).
pub const GROWTH: usize = 256;

impl<B: Backend> LayerCache<B> {
    pub fn new() -> Self {
        Self {
            kv: None,
            len: 0,
            keep: true,
        }
    }

    /// A cache that forgets: for one-shot forwards over whole sequences.
    pub fn scratch() -> Self {
        Self {
            kv: None,
            len: 0,
            keep: false,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold room for.
    pub fn capacity(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Appends this step's keys and values; returns all of them (views of the buffers).
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, kv_heads, new, head_dim]`
    /// - returns `[batch, kv_heads, len + new, head_dim]` each
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        if !self.keep {
            return match self.kv.take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            };
        }
        let [b, h, new, d] = k.dims();
        let total = self.len + new;
        let (mut kb, mut vb) = match self.kv.take() {
            Some((kb, vb)) if kb.dims()[2] >= total => (kb, vb),
            old => {
                let capacity = total.div_ceil(GROWTH) * GROWTH;
                let device = k.device();
                let (mut kb, mut vb) = (
                    Tensor::<B, 4>::zeros([b, h, capacity, d], (&device, k.dtype())),
                    Tensor::<B, 4>::zeros([b, h, capacity, d], (&device, v.dtype())),
                );
                if let Some((ok, ov)) = old
                    && self.len > 0
                {
                    let kept = [0..b, 0..h, 0..self.len, 0..d];
                    kb = kb.slice_assign(kept.clone(), ok.slice(kept.clone()));
                    vb = vb.slice_assign(kept.clone(), ov.slice(kept));
                }
                (kb, vb)
            }
        };
        let at = [0..b, 0..h, self.len..total, 0..d];
        kb = kb.slice_assign(at.clone(), k);
        vb = vb.slice_assign(at, v);
        self.len = total;
        let view = [0..b, 0..h, 0..total, 0..d];
        let out = (kb.clone().slice(view.clone()), vb.clone().slice(view));
        self.kv = Some((kb, vb));
        out
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

//! KV caches live here, outside the weight modules: one server holds many sessions' caches
//! for the same blocks.

use burn::prelude::*;

/// Errors of a KV cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The session reserved `max` positions; an append would need `needed`.
    #[error("the KV cache holds at most {max} positions, {needed} were asked for")]
    Full { needed: usize, max: usize },
    /// Keys and values of another shape than the cache's.
    #[error("keys {keys:?} and values {values:?} do not fit a cache of shape {expected:?}")]
    Shape {
        keys: Vec<usize>,
        values: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A rollback past what the cache holds.
    #[error("cannot roll the KV cache back to {to} positions: it holds {len}")]
    Rollback { to: usize, len: usize },
}

/// Keys and values of one block for one session.
///
/// The buffers are allocated ahead, [`GROWTH`] positions at a time, and each step writes its
/// keys into place: concatenating instead copied the whole cache on every token, and a
/// kernel specialized on each new length had to be found (or compiled) on every token.
/// A cache made with a maximum length never allocates past it: what a session reserved is
/// what it can hold, so a server's KV budget counts what is really allocated.
///
/// # Shapes
/// buffers `[batch, kv_heads, capacity, head_dim]`, of which the first `len` positions hold
/// keys and values
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    len: usize,
    /// A stateless forward on an autodiff backend must not keep anything.
    keep: bool,
    /// Positions the buffers may never exceed; `None`: unbounded.
    max_len: Option<usize>,
    /// Allocate `max_len` positions at the first append (a stateless forward knows its length:
    /// growing would copy the keys once a chunk).
    eager: bool,
}

/// Positions a cache grows by when it is full (rounded up to hold a whole step).
pub const GROWTH: usize = 256;

/// The capacity a cache of at most `max_len` positions allocates to hold `len` of them.
pub fn capacity_for(len: usize, max_len: Option<usize>) -> usize {
    let grown = len.div_ceil(GROWTH) * GROWTH;
    max_len.map_or(grown, |max| grown.min(max))
}

impl<B: Backend> LayerCache<B> {
    /// An unbounded cache.
    pub fn new() -> Self {
        Self {
            kv: None,
            len: 0,
            keep: true,
            max_len: None,
            eager: false,
        }
    }

    /// A cache that never holds more than `max_len` positions.
    pub fn with_max_len(max_len: usize) -> Self {
        Self {
            max_len: Some(max_len),
            ..Self::new()
        }
    }

    /// A cache of exactly `len` positions, allocated whole at the first append.
    pub fn preallocated(len: usize) -> Self {
        Self {
            max_len: Some(len),
            eager: true,
            ..Self::new()
        }
    }

    /// A cache that forgets: for one-shot forwards over whole sequences on an autodiff backend
    /// (the graph keeps every activation anyway; a buffer written in place would only add a
    /// copy to it).
    pub fn scratch() -> Self {
        Self {
            keep: false,
            ..Self::new()
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

    /// The most positions this cache may hold; `None`: unbounded.
    pub fn max_len(&self) -> Option<usize> {
        self.max_len
    }

    /// Positions allocated, over every batch row (`batch x capacity`), for one of K and V.
    pub fn allocated_positions(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[0] * k.dims()[2])
    }

    /// Bytes of both buffers.
    pub fn allocated_bytes(&self) -> u64 {
        self.kv.as_ref().map_or(0, |(k, v)| {
            let bytes = |t: &Tensor<B, 4>| t.dims().iter().product::<usize>() as u64 * t.dtype().size() as u64;
            bytes(k) + bytes(v)
        })
    }

    /// Appends this step's keys and values; returns all of them (views of the buffers).
    /// Fails, changing nothing, when the cache would grow past its maximum length or the
    /// shapes do not match what it holds.
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, kv_heads, new, head_dim]`
    /// - returns `[batch, kv_heads, len + new, head_dim]` each
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 4>), CacheError> {
        let [b, h, new, d] = k.dims();
        let total = self.len + new;
        if let Some(max) = self.max_len
            && total > max
        {
            return Err(CacheError::Full { needed: total, max });
        }
        let held = self.kv.as_ref().map(|(kb, _)| kb.dims());
        let fits = |dims: [usize; 4]| dims[0] == b && dims[1] == h && dims[3] == d;
        if v.dims() != k.dims() || held.is_some_and(|dims| !fits(dims)) {
            return Err(CacheError::Shape {
                keys: k.dims().to_vec(),
                values: v.dims().to_vec(),
                expected: held.map_or_else(Vec::new, |d| d.to_vec()),
            });
        }
        if !self.keep {
            self.len = total;
            return Ok(match self.kv.take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            });
        }
        let (mut kb, mut vb) = match self.kv.take() {
            Some((kb, vb)) if kb.dims()[2] >= total => (kb, vb),
            old => {
                let capacity = match self.max_len {
                    Some(max) if self.eager => max,
                    max => capacity_for(total, max),
                };
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
        Ok(out)
    }
}

impl<B: Backend> LayerCache<B> {
    /// Forgets every position from `len` on (speculative decoding's rejected drafts): the
    /// next append writes over them. The buffers keep their room.
    pub fn truncate(&mut self, len: usize) -> Result<(), CacheError> {
        if len > self.len {
            return Err(CacheError::Rollback { to: len, len: self.len });
        }
        self.len = len;
        Ok(())
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
    /// An unbounded cache (it grows as far as the steps go).
    pub fn new(num_blocks: usize, pad: Vec<usize>) -> Self {
        Self {
            layers: (0..num_blocks).map(|_| LayerCache::new()).collect(),
            pad,
            len: 0,
        }
    }

    /// A cache that never holds more than `max_len` positions a row (padding included), nor
    /// allocates room for more: at most `batch x max_len` positions of K and of V per layer
    /// ([`crate::cost::kv_cache_bytes`] of them).
    pub fn with_max_len(num_blocks: usize, pad: Vec<usize>, max_len: usize) -> Self {
        Self {
            layers: (0..num_blocks).map(|_| LayerCache::with_max_len(max_len)).collect(),
            pad,
            len: 0,
        }
    }

    /// A cache of exactly `len` positions a row, each layer's allocated whole at its first
    /// append: for a stateless forward in chunks, which knows its length.
    pub fn preallocated(num_blocks: usize, pad: Vec<usize>, len: usize) -> Self {
        Self {
            layers: (0..num_blocks).map(|_| LayerCache::preallocated(len)).collect(),
            pad,
            len: 0,
        }
    }

    /// A cache for a stateless forward on an autodiff backend (see [`LayerCache::scratch`]).
    pub fn scratch(num_blocks: usize, pad: Vec<usize>) -> Self {
        Self {
            layers: (0..num_blocks).map(|_| LayerCache::scratch()).collect(),
            pad,
            len: 0,
        }
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// The most positions a row may hold; `None`: unbounded.
    pub fn max_len(&self) -> Option<usize> {
        self.layers.iter().filter_map(LayerCache::max_len).min()
    }

    /// Positions that `new` more would need, checked against the maximum length before any
    /// work is done (a step that fails half-way would leave layers of different lengths).
    pub fn check_room(&self, new: usize) -> Result<(), CacheError> {
        match self.max_len() {
            Some(max) if self.len + new > max => Err(CacheError::Full {
                needed: self.len + new,
                max,
            }),
            _ => Ok(()),
        }
    }

    /// Rolls every layer back to the first `len` positions (padding included), as Petals'
    /// `start_from_position`: a step after it continues from there. Fails, changing nothing,
    /// past what the cache holds.
    pub fn truncate(&mut self, len: usize) -> Result<(), CacheError> {
        if len > self.len || self.layers.iter().any(|l| l.len() < len) {
            return Err(CacheError::Rollback { to: len, len: self.len });
        }
        for layer in &mut self.layers {
            layer.truncate(len)?;
        }
        self.len = len;
        Ok(())
    }

    /// Positions allocated over every layer and batch row, for one of K and V.
    pub fn allocated_positions(&self) -> usize {
        self.layers.iter().map(LayerCache::allocated_positions).sum()
    }

    /// Bytes of every layer's K and V buffers.
    pub fn allocated_bytes(&self) -> u64 {
        self.layers.iter().map(LayerCache::allocated_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::Cpu;

    fn kv(batch: usize, heads: usize, new: usize, dim: usize) -> Tensor<B, 4> {
        Tensor::ones([batch, heads, new, dim], &Default::default())
    }

    /// Appends `steps` (cycled) until the cache refuses; checks every state on the way.
    fn fill(batch: usize, max_len: usize, steps: &[usize]) {
        let (heads, dim) = (2, 3);
        let mut cache = LayerCache::<B>::with_max_len(max_len);
        let mut held = 0;
        for &new in steps.iter().cycle().take(4 * max_len + 8) {
            let result = cache.append(kv(batch, heads, new, dim), kv(batch, heads, new, dim));
            if held + new > max_len {
                assert_eq!(
                    result.err(),
                    Some(CacheError::Full {
                        needed: held + new,
                        max: max_len
                    })
                );
                assert_eq!(cache.len(), held, "a refused append changes nothing");
            } else {
                let (k, _) = result.expect("fits");
                held += new;
                assert_eq!(k.dims(), [batch, heads, held, dim]);
            }
            assert!(
                cache.allocated_positions() <= batch * max_len,
                "batch {batch} max {max_len}: {} positions allocated",
                cache.allocated_positions()
            );
            assert!(cache.capacity() <= max_len);
            let bytes = 2 * (batch * heads * cache.capacity() * dim * 4) as u64;
            assert_eq!(cache.allocated_bytes(), bytes);
            if held == max_len {
                break;
            }
        }
    }

    #[test]
    fn hostile_shapes_never_allocate_past_the_reservation() {
        fill(64, 1, &[1]);
        fill(64, 1, &[2, 1]);
        for max_len in 1..=600 {
            fill(1, max_len, &[1]);
            fill(1, max_len, &[max_len]);
            fill(1, max_len, &[257, 3, 1]);
            fill(1, max_len, &[max_len + 1, 255, 256]);
        }
        fill(5, 300, &[7, 64, 1, 200]);
    }

    #[test]
    fn kv_cache_bytes_is_what_a_full_session_cache_allocates() {
        let mut config = crate::synthetic::Shape::Tiny.config().expect("config");
        config.attention.num_kv_heads = 2;
        config.attention.head_dim = 3;
        for (batch, max_len) in [(1, 1), (64, 1), (3, 255), (2, 257), (1, 600)] {
            let mut cache = SpanCache::<B>::with_max_len(4, vec![0; batch], max_len);
            let mut held = 0;
            while held < max_len {
                let new = (max_len - held).min(100);
                for layer in &mut cache.layers {
                    layer.append(kv(batch, 2, new, 3), kv(batch, 2, new, 3)).expect("fits");
                }
                held += new;
            }
            cache.len = held;
            assert_eq!(
                cache.allocated_bytes(),
                crate::cost::kv_cache_bytes(&config, 4, batch, max_len, 4)
            );
            assert_eq!(
                cache.check_room(1),
                Err(CacheError::Full {
                    needed: max_len + 1,
                    max: max_len
                })
            );
        }
    }
}

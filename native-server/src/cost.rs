//! What each request costs in memory, from its shape alone, before anything is computed: the
//! message as it arrives and is decoded, the tensors on the device, the blocks' scratch (from
//! `shared_model::cost`, which models the code that runs), the reply as it is encoded and
//! framed. Weights and the sessions' KV caches are budgeted apart.

use shared_model::ModelConfig;
use shared_model::cost::{self as model_cost, StepShape};
use shared_model::layers::positions::AttentionTiling;
use swarm::wire::WireDtype;

/// Bytes of an f32 on the host (decoded messages, replies before encoding).
const HOST: u64 = 4;

/// What a session's steps share: deep prompts, padding, an adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionShape {
    pub prefix_len: usize,
    pub padded: bool,
    pub lora: bool,
}

/// The cost of this server's requests.
#[derive(Debug, Clone)]
pub struct CostModel {
    config: ModelConfig,
    /// Blocks hosted (a session may use part of them; KV is charged for all, conservatively).
    hosted_blocks: usize,
    /// Bytes of an element on the device.
    elem: u64,
    /// Tokens per row a long request runs at a time.
    chunk: usize,
    /// Rank of the largest LoRA adapter offered (its per-step deltas), if any.
    lora_rank: Option<usize>,
    /// When the span tiles attention.
    tiling: AttentionTiling,
}

impl CostModel {
    pub fn new(
        config: &ModelConfig,
        hosted_blocks: usize,
        elem_bytes: usize,
        chunk: usize,
        lora_rank: Option<usize>,
        tiling: AttentionTiling,
    ) -> Self {
        Self {
            config: config.clone(),
            hosted_blocks,
            elem: elem_bytes as u64,
            chunk: chunk.max(1),
            lora_rank,
            tiling,
        }
    }

    fn shape(&self, batch: usize, new: usize, past: usize, blocks: usize) -> StepShape {
        StepShape {
            tiling: self.tiling,
            ..StepShape::new(batch, new, past, blocks, self.elem as usize)
        }
    }

    pub fn chunk_tokens(&self) -> usize {
        self.chunk
    }

    fn hidden(&self) -> u64 {
        self.config.hidden_size as u64
    }

    /// KV cache bytes of one token (one batch row) over every hosted block.
    pub fn kv_bytes_per_token(&self) -> u64 {
        model_cost::kv_cache_bytes(&self.config, self.hosted_blocks, 1, 1, self.elem as usize).max(1)
    }

    /// Bytes of deep prompts of `prefix_len` positions over `blocks` blocks on the device.
    pub fn prompt_bytes(&self, blocks: usize, prefix_len: usize) -> u64 {
        model_cost::deep_prompt_bytes(&self.config, blocks, prefix_len, self.elem as usize)
    }

    /// Cache tokens a session is charged: its `batch x max_length` positions (what its cache
    /// can ever allocate) plus its deep prompts (`prompt_elements` values, kept on the device
    /// for the session's life) counted as the tokens of KV they weigh.
    pub fn session_tokens(&self, batch: usize, max_length: usize, prompt_elements: u64) -> u64 {
        let kv = (batch as u64).saturating_mul(max_length as u64);
        let prompts = prompt_elements
            .saturating_mul(self.elem)
            .div_ceil(self.kv_bytes_per_token());
        kv.saturating_add(prompts)
    }

    /// A frame about to be read: its bytes, and the message decoded from them (at most as
    /// large: CBOR carries tensors as byte strings).
    pub fn frame(&self, len: usize) -> u64 {
        2 * len as u64
    }

    /// The host and device copies of `[.., hidden]` values that a request brings in and a
    /// reply takes out: decoded (`wire` in), f32 on the host, on the device, and out again as
    /// f32, encoded (`wire` out) and framed.
    fn io(&self, values: u64, wire_in: WireDtype, wire_out: WireDtype) -> u64 {
        let (win, wout) = (wire_in.size() as u64, wire_out.size() as u64);
        values.saturating_mul(win + HOST + self.elem + self.elem + HOST + 2 * wout)
    }

    /// A session step of `new` tokens per row after `past`, over `blocks` blocks, chunked,
    /// into a cache that can hold `max_length` positions.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        batch: usize,
        new: usize,
        past: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        session: &SessionShape,
        cache_capacity: Option<usize>,
    ) -> u64 {
        let values = (batch * new) as u64 * self.hidden();
        let shape = StepShape {
            lora_rank: if session.lora { self.lora_rank } else { None },
            prefix_len: session.prefix_len,
            padded: session.padded,
            cache_capacity,
            ..self.shape(batch, new, past, blocks)
        };
        let scratch = model_cost::chunked_bytes(&self.config, &shape, self.chunk);
        self.io(values, wire_in, wire_out).saturating_add(scratch)
    }

    /// A stateless forward of `[batch, seq]` over `blocks` blocks: chunks through a KV cache
    /// of `seq` positions that lives as long as the request.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        batch: usize,
        seq: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        prefix_len: usize,
        padded: bool,
    ) -> u64 {
        let values = (batch * seq) as u64 * self.hidden();
        let shape = StepShape {
            prefix_len,
            padded,
            cache_capacity: Some(seq),
            ..self.shape(batch, seq, 0, blocks)
        };
        let cache = model_cost::kv_cache_bytes(&self.config, blocks, batch, seq, self.elem as usize);
        let scratch = model_cost::chunked_bytes(&self.config, &shape, self.chunk);
        self.io(values, wire_in, wire_out)
            .saturating_add(cache)
            .saturating_add(scratch)
    }

    /// A backward of `[batch, seq]` over `blocks` blocks: the input and output gradient in, the
    /// input (and prompt) gradients out, and autodiff's saved activations.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        batch: usize,
        seq: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        prefix_len: usize,
        padded: bool,
    ) -> u64 {
        let values = (batch * seq) as u64 * self.hidden();
        let prompts = (blocks * prefix_len) as u64 * self.hidden();
        let shape = StepShape {
            prefix_len,
            padded,
            ..self.shape(batch, seq, 0, blocks)
        };
        let scratch = model_cost::backward_bytes(&self.config, &shape);
        self.io(values, wire_in, wire_out)
            .saturating_mul(2)
            .saturating_add(self.io(prompts, wire_in, wire_out))
            .saturating_add(scratch)
    }

    /// Head service: logits of `positions` rows, returned in f32.
    pub fn logits(&self, positions: usize, wire_in: WireDtype) -> u64 {
        let p = positions as u64;
        let vocab = self.config.vocab_size as u64;
        let inputs = p * self.hidden() * (wire_in.size() as u64 + HOST + self.elem);
        // The head's scratch (its logits on the host as f32 included), then the logits encoded
        // and framed.
        let head = model_cost::head_bytes(&self.config, 1, positions, self.elem as usize);
        inputs.saturating_add(head).saturating_add(p * vocab * 8)
    }

    /// Head service: embeddings of `tokens` ids.
    pub fn embed(&self, tokens: usize, wire_out: WireDtype) -> u64 {
        let t = tokens as u64;
        let rows = t * self.hidden() * (2 * self.elem + HOST + 2 * wire_out.size() as u64);
        // The ids decoded, and as device indices.
        t * 16 + rows
    }

    /// The most tokens `cost(tokens)` allows within `capacity` bytes, up to `cap` (`None` if
    /// not even one).
    pub fn largest(capacity: u64, cap: usize, cost: impl Fn(usize) -> u64) -> Option<u64> {
        let n = model_cost::largest_within(capacity, cap.max(1), |n| cost(n.max(1)));
        (n > 0 && cost(n) <= capacity).then_some(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_finds_the_boundary() {
        let cost = |n: usize| 100 + 10 * n as u64;
        assert_eq!(CostModel::largest(99, 1000, cost), None);
        assert_eq!(CostModel::largest(110, 1000, cost), Some(1));
        assert_eq!(CostModel::largest(1055, 1000, cost), Some(95));
        assert_eq!(CostModel::largest(1 << 40, 1000, cost), Some(1000));
    }
}

//! What each request costs in memory, from its shape alone, before anything is computed: the
//! message as it arrives and is decoded, the tensors on the device, the blocks' scratch (from
//! `shared_model::cost`, which models the code that runs), the reply as it is encoded and
//! framed. Weights and the sessions' KV caches are budgeted apart.

use shared_model::ModelConfig;
use swarm::wire::WireDtype;

/// Bytes of an f32 on the host (decoded messages, replies before encoding).
const HOST: u64 = 4;

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
}

impl CostModel {
    pub fn new(
        config: &ModelConfig,
        hosted_blocks: usize,
        elem_bytes: usize,
        chunk: usize,
        lora_rank: Option<usize>,
    ) -> Self {
        Self {
            config: config.clone(),
            hosted_blocks,
            elem: elem_bytes as u64,
            chunk: chunk.max(1),
            lora_rank,
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

    /// A session step of `new` tokens per row after `past`, over `blocks` blocks, chunked.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        batch: usize,
        new: usize,
        past: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        prefix_len: usize,
        lora: bool,
    ) -> u64 {
        let values = (batch * new) as u64 * self.hidden();
        let scratch = model_cost::chunked_bytes(
            &self.config,
            &model_cost::ChunkedShape {
                batch,
                new,
                past,
                chunk: self.chunk,
                blocks,
                elem_bytes: self.elem as usize,
                lora_rank: if lora { self.lora_rank } else { None },
                prefix_len,
            },
        );
        self.io(values, wire_in, wire_out).saturating_add(scratch)
    }

    /// A stateless forward of `[batch, seq]` over `blocks` blocks (its own temporary cache
    /// included).
    pub fn forward(
        &self,
        batch: usize,
        seq: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        prefix_len: usize,
    ) -> u64 {
        let values = (batch * seq) as u64 * self.hidden();
        let scratch = model_cost::stateless_forward_bytes(
            &self.config,
            &model_cost::ChunkedShape {
                batch,
                new: seq,
                past: 0,
                chunk: self.chunk,
                blocks,
                elem_bytes: self.elem as usize,
                lora_rank: None,
                prefix_len,
            },
        );
        self.io(values, wire_in, wire_out).saturating_add(scratch)
    }

    /// A backward of `[batch, seq]` over `blocks` blocks: the input and output gradient in, the
    /// input (and prompt) gradients out, and autodiff's saved activations.
    pub fn backward(
        &self,
        batch: usize,
        seq: usize,
        blocks: usize,
        wire_in: WireDtype,
        wire_out: WireDtype,
        prefix_len: usize,
    ) -> u64 {
        let values = (batch * seq) as u64 * self.hidden();
        let prompts = (blocks * prefix_len) as u64 * self.hidden();
        let scratch = model_cost::backward_bytes(
            &self.config,
            &model_cost::ChunkedShape {
                batch,
                new: seq,
                past: 0,
                chunk: seq.max(1),
                blocks,
                elem_bytes: self.elem as usize,
                lora_rank: None,
                prefix_len,
            },
        );
        self.io(values, wire_in, wire_out)
            .saturating_mul(2)
            .saturating_add(self.io(prompts, wire_in, wire_out))
            .saturating_add(scratch)
    }

    /// Head service: logits of `positions` rows, returned in f32.
    pub fn logits(&self, positions: usize, wire_in: WireDtype) -> u64 {
        let p = positions as u64;
        let vocab = self.config.vocab_size as u64;
        let inputs = p * self.hidden() * (wire_in.size() as u64 + HOST + 2 * self.elem);
        // Logits on the device (and the final norm's output), on the host, encoded, framed.
        let outputs = p * vocab * (self.elem + HOST + 4 + 4);
        inputs.saturating_add(outputs)
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
        if cost(1) > capacity {
            return None;
        }
        let (mut lo, mut hi) = (1usize, cap.max(1));
        if cost(hi) <= capacity {
            return Some(hi as u64);
        }
        // cost(lo) fits, cost(hi) does not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cost(mid) <= capacity {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo as u64)
    }
}

/// PROVISIONAL stand-in for `shared_model::cost` (being written beside this): the direct
/// (untiled) attention path's scratch, which over-counts the tiled path.
mod model_cost {
    use shared_model::ModelConfig;
    use shared_model::config::MlpKind;

    pub struct ChunkedShape {
        pub batch: usize,
        pub new: usize,
        pub past: usize,
        pub chunk: usize,
        pub blocks: usize,
        pub elem_bytes: usize,
        pub lora_rank: Option<usize>,
        pub prefix_len: usize,
    }

    pub fn kv_cache_bytes(config: &ModelConfig, blocks: usize, batch: usize, positions: usize, elem: usize) -> u64 {
        let a = config.attention;
        (2 * a.num_kv_heads * a.head_dim * blocks * batch * positions * elem) as u64
    }

    fn step(config: &ModelConfig, batch: usize, new: usize, keys: usize, elem: usize) -> u64 {
        let h = config.hidden_size;
        let inter = match config.mlp {
            MlpKind::Gated { intermediate, .. } | MlpKind::Plain { intermediate, .. } => intermediate,
            MlpKind::Moe {
                intermediate, top_k, ..
            } => intermediate * top_k,
        };
        let a = config.attention;
        let rows = batch * new;
        let acts = rows * (6 * h + 3 * config.qkv_width() + 4 * inter) * elem;
        let scores = 3 * batch * a.num_heads * new * keys * elem + batch * new * keys * 4;
        (acts + scores) as u64 * 2
    }

    pub fn chunked_bytes(config: &ModelConfig, s: &ChunkedShape) -> u64 {
        let chunk = s.chunk.min(s.new).max(1);
        let worst = step(config, s.batch, chunk, s.past + s.new, s.elem_bytes);
        let out = (2 * s.batch * s.new * config.hidden_size * s.elem_bytes) as u64;
        worst + out
    }

    pub fn stateless_forward_bytes(config: &ModelConfig, s: &ChunkedShape) -> u64 {
        chunked_bytes(config, s) + kv_cache_bytes(config, s.blocks, s.batch, s.new, s.elem_bytes)
    }

    pub fn backward_bytes(config: &ModelConfig, s: &ChunkedShape) -> u64 {
        step(config, s.batch, s.new, s.new, s.elem_bytes) * s.blocks as u64 * 2
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

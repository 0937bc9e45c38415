//! The messages Corolla peers exchange, and the protocol names they travel under.
//!
//! Every protocol is versioned. Tensors travel as [`WireTensor`] (`{dtype, shape, bytes}`),
//! and every size in a message is checked against [`Limits`] before anything is allocated.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::wire::{WireDtype, WireTensor};

/// Inference sessions: one stream per session, carrying [`SessionRequest`]s and
/// [`SessionResponse`]s as length-prefixed CBOR frames.
pub const INFERENCE_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/inference/1");
/// Stateless forward/backward over a span: one stream per request, one length-prefixed CBOR
/// frame each way ([`crate::request`]), so the server admits a request's memory from its
/// length prefix before reading the body.
pub const SPAN_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/span/3");
/// A server describes itself (request-response, CBOR).
pub const INFO_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/info/1");

/// Server-to-server push: a server sends a session's step output straight to the server of
/// the next span ([`PushStep`] frames on one stream per session and hop), which answers its
/// own client with [`SessionResponse::Pushed`]. Servers push only to the peer their client
/// named in [`SessionRequest::Link`] and take pushes only from the peer it named.
pub const PUSH_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/push/1");

/// The most tokens per row a pushed step carries (decode steps, and speculative decoding's
/// drafts): prefill and replays go through the client.
pub const PUSH_MAX_TOKENS: usize = 64;

/// Embeddings and LM head run by a server for a client that cannot hold them (one stream per
/// request, framed like [`SPAN_PROTOCOL`]).
pub const HEAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/head/3");

/// Version of the message formats below; announced in the DHT, and clients use only servers
/// of their own version.
///
/// 2: deep prompts on span requests and session opens, prompt gradients on backward, LoRA
/// adapters (`ServerInfo::adapters`, `Open::adapter`). The new fields are optional, so a
/// version-1 message still decodes; the version keeps a 1 server, which would silently ignore
/// them, out of a 2 client's routes.
///
/// 3: span and head requests on their own streams, [`ErrorKind::TooLarge`] with
/// [`LimitExceeded`] (what was refused and the largest request that would pass), and a
/// server's [`ServerLoad`] in its info.
///
/// 4: DHT records are signed envelopes ([`crate::record`]); readers refuse unsigned ones.
///
/// 5: a server's client bundle is announced with its content digests ([`BundleOffer`],
/// replacing `client_url`), and bundles name their model; clients check both before using a
/// download ([`crate::bundles`]).
///
/// 6: `Step::start_from` (KV rollback). A 5 server would ignore it and compute on stale
/// positions, so it must not be routed to.
///
/// 7: server-to-server push ([`PUSH_PROTOCOL`], [`SessionRequest::Link`], `Step::push`,
/// [`SessionResponse::Pushed`], `Output::pushed`).
pub const PROTOCOL_VERSION: u32 = 7;

/// Upper bounds a peer enforces on what it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (or request-response message) in bytes.
    pub max_frame_bytes: usize,
    /// Largest tensor in elements.
    pub max_tensor_elements: usize,
    /// Largest batch of a session or request.
    pub max_batch: usize,
    /// Most tokens in one step or stateless request (batch x positions).
    pub max_step_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 256 << 20,
            max_tensor_elements: 64 << 20,
            max_batch: 64,
            max_step_tokens: 16384,
        }
    }
}

/// Client -> server on an inference stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionRequest {
    /// Must come first. Reserves a KV cache of `batch x max_length` tokens on blocks
    /// `[start, end)` of the model with this fingerprint.
    Open {
        model: String,
        start: u32,
        end: u32,
        batch: u32,
        max_length: u32,
        /// Left padding of each row (rows of a batch may differ in prompt length).
        pad: Vec<u32>,
        /// How the server should encode its replies.
        reply_dtype: WireDtype,
        /// Deep prompts of blocks `[start, end)`: `[end - start, prefix_len, hidden_size]`,
        /// added to the first `prefix_len` positions after each row's padding before each
        /// block (see `shared_model::tuning`).
        #[serde(default)]
        prompts: Option<WireTensor>,
        /// A LoRA adapter this server announced, applied to every step of the session.
        #[serde(default)]
        adapter: Option<String>,
    },
    /// The next positions: `hidden` is `[batch, new, hidden_size]`.
    Step {
        step: u64,
        hidden: WireTensor,
        /// Roll the cache back to this many positions per row (padding included) before
        /// this step, as Petals' `start_from_position`: speculative decoding's rejected
        /// drafts. At most what the cache holds; the same value again changes nothing.
        #[serde(default)]
        start_from: Option<u64>,
        /// Also send the output to the next hop named by [`SessionRequest::Link`] (at most
        /// [`PUSH_MAX_TOKENS`] positions per row).
        #[serde(default)]
        push: bool,
    },
    /// Joins this session to its neighbours on the route for pushes (answered with
    /// [`SessionResponse::Linked`]); a later `Link` replaces it (after a failover).
    Link {
        /// This session's name in pushes: chosen at random by the client, unique on the server.
        token: u64,
        /// The only peer whose pushes this session takes (the previous hop's server).
        from: Option<String>,
        /// Where `push` steps' outputs go.
        to: Option<PushTarget>,
    },
    /// Frees the session's cache now (it is also freed when the stream ends or idles out).
    Close,
}

/// Server -> client on an inference stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionResponse {
    Opened {
        cache_tokens: u64,
    },
    /// Output of the last block of the span for `step`: `[batch, new, hidden_size]`.
    Output {
        step: u64,
        hidden: WireTensor,
        /// For a `push` step: whether the output went on to the next hop (if not, the
        /// client sends it there itself).
        #[serde(default)]
        pushed: bool,
    },
    /// The output of a step the previous hop pushed, which began at `position` (the cache's
    /// length after any rollback).
    Pushed {
        position: u64,
        hidden: WireTensor,
        pushed: bool,
    },
    /// `Link` took effect.
    Linked,
    Error(ProtocolError),
}

/// The next hop of a route, as a client names it to the hop before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTarget {
    pub peer: String,
    /// Where to dial it (each ending in `/p2p/<peer>`; others are ignored), at most
    /// [`MAX_PUSH_ADDRS`].
    pub addrs: Vec<String>,
    /// The next hop's session, as its `Link` named it.
    pub token: u64,
}

/// The most addresses a [`PushTarget`] may list.
pub const MAX_PUSH_ADDRS: usize = 8;

/// Server -> server on a [`PUSH_PROTOCOL`] stream: a step's output, the next hop's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushStep {
    /// The receiving session's token.
    pub token: u64,
    /// Positions per row the sessions hold before this step (after `start_from`).
    pub position: u64,
    /// The client's rollback for this step, passed along the route.
    pub start_from: Option<u64>,
    /// `[batch, new, hidden_size]`.
    pub hidden: WireTensor,
}

/// Stateless work on a span: batch of whole sequences in, hidden states (or input gradients)
/// out. The fine-tuning path builds on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SpanRequest {
    Forward {
        model: String,
        start: u32,
        end: u32,
        pad: Vec<u32>,
        /// `[batch, seq, hidden_size]`
        hidden: WireTensor,
        reply_dtype: WireDtype,
        /// Deep prompts of blocks `[start, end)`: `[end - start, prefix_len, hidden_size]`.
        #[serde(default)]
        prompts: Option<WireTensor>,
    },
    /// Gradient of a loss w.r.t. the span's input, given the gradient w.r.t. its output.
    Backward {
        model: String,
        start: u32,
        end: u32,
        pad: Vec<u32>,
        /// `[batch, seq, hidden_size]`: the span's input.
        hidden: WireTensor,
        /// `[batch, seq, hidden_size]`: d loss / d output.
        grad_output: WireTensor,
        reply_dtype: WireDtype,
        /// Deep prompts as in `Forward`; their gradient comes back in
        /// [`SpanResponse::Gradients`].
        #[serde(default)]
        prompts: Option<WireTensor>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SpanResponse {
    /// Forward: the output; backward: the gradient w.r.t. the input.
    Tensor(WireTensor),
    /// Backward with deep prompts: gradients w.r.t. the input and the prompts.
    Gradients {
        input: WireTensor,
        prompts: WireTensor,
    },
    Error(ProtocolError),
}

/// A client's request to a server offering head service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HeadRequest {
    /// The input of block 0 for these tokens: `token_ids` is `[batch, seq]` row-major.
    Embed {
        model: String,
        batch: u32,
        token_ids: Vec<u32>,
        reply_dtype: WireDtype,
    },
    /// Final norm and LM head over `[batch, seq, hidden_size]` (the last block's output).
    Logits { model: String, hidden: WireTensor },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HeadResponse {
    /// Embed: `[batch, seq, hidden_size]`; logits: `[batch, seq, vocab]` in f32.
    Tensor(WireTensor),
    Error(ProtocolError),
}

/// Ask a server what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoRequest;

/// An error sent back to the peer that caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProtocolError {
    pub kind: ErrorKind,
    pub message: String,
    /// With [`ErrorKind::TooLarge`]: the limit and what would have passed.
    #[serde(default)]
    pub limit: Option<LimitExceeded>,
}

impl ProtocolError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            limit: None,
        }
    }

    /// A request refused for good by one of the server's limits.
    pub fn too_large(message: impl Into<String>, limit: LimitExceeded) -> Self {
        Self {
            kind: ErrorKind::TooLarge,
            message: message.into(),
            limit: Some(limit),
        }
    }
}

/// Which limit refused a request, by how much, and the largest request that would pass: a
/// client can split its work to fit instead of giving up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitExceeded {
    /// The server flag that sets the limit, e.g. `--max-request-memory`.
    pub limit: String,
    /// What the request needs, in the limit's unit (`unit`).
    pub needed: u64,
    /// What the limit allows.
    pub allowed: u64,
    /// `bytes`, `tokens`, `sessions`, ...
    pub unit: String,
    /// The most tokens (positions) a request of this shape may carry now, if any would pass.
    pub largest_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Out of room for now (cache, memory, compute or sessions) within the wait timeout: try
    /// again later or another server.
    Busy,
    /// Larger than this server's limits allow at all; [`ProtocolError::limit`] says which and
    /// what would pass. Retrying the same request cannot succeed.
    TooLarge,
    /// The message is malformed (shape, size, order of messages).
    BadRequest,
    /// A different checkpoint than the one asked for.
    WrongModel,
    /// Blocks outside what this server hosts.
    WrongSpan,
    /// The session idled out or the stream was reset.
    Closed,
    Internal,
}

/// What a server announces in the DHT (and answers on [`INFO_PROTOCOL`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub peer_id: String,
    /// Model fingerprint (see [`crate::fingerprint`]).
    pub model: String,
    /// Human-readable model name.
    pub model_name: String,
    pub start: u32,
    pub end: u32,
    /// Measured tokens per second through the whole span at batch 1 (decode).
    pub throughput: f64,
    pub free_cache_tokens: u64,
    pub version: String,
    pub protocol: u32,
    pub public_name: Option<String>,
    /// Reached through a relay circuit (not directly dialable).
    pub relayed: bool,
    /// Addresses to dial, each ending in `/p2p/<peer id>`.
    pub addrs: Vec<String>,
    /// Milliseconds since the Unix epoch after which this record is stale.
    pub expires_at_ms: u64,
    /// Where clients download the model's client bundle (tokenizer, config, embeddings and LM
    /// head: see `shared_model::bundle`) over HTTP, and what they must find there, if this
    /// server offers it.
    #[serde(default)]
    pub bundle: Option<BundleOffer>,
    /// Whether this server runs the embeddings and LM head for clients that cannot hold them
    /// (a browser facing a 176B model's head), on [`HEAD_PROTOCOL`].
    #[serde(default)]
    pub serves_head: bool,
    /// LoRA adapters this server can apply (`server --adapters`), by name.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// The server's budgets and how much of each is free (answered on [`INFO_PROTOCOL`]; a
    /// DHT record carries it as of its announcement).
    #[serde(default)]
    pub load: Option<ServerLoad>,
    /// How the server computes (`f32`, `f16`, `bf16`, with `+q8`/`+q4` when quantized):
    /// clients compare outputs only between servers that compute alike.
    #[serde(default)]
    pub numerics: String,
    /// How many blocks the whole model has (0: not said, by servers before this field): a
    /// monitor tells a model with its last blocks uncovered from a shorter one.
    #[serde(default)]
    pub model_blocks: u32,
}

#[cfg(test)]
impl ServerInfo {
    /// A server of model `m` on blocks `[start, end)`, for unit tests.
    pub(crate) fn for_test(peer: &str, start: u32, end: u32, throughput: f64, expires_at_ms: u64) -> Self {
        Self {
            peer_id: peer.to_string(),
            model: "m".into(),
            model_name: "M".into(),
            start,
            end,
            throughput,
            free_cache_tokens: 1024,
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            public_name: None,
            relayed: false,
            addrs: Vec::new(),
            expires_at_ms,
            bundle: None,
            serves_head: false,
            adapters: Vec::new(),
            load: None,
            numerics: "f32".into(),
            model_blocks: 0,
        }
    }
}

/// A server's client bundle as its signed record describes it: the URLs of the full bundle and
/// of its tensor-free twin, and what a client must find at each (content digests, see
/// `shared_model::bundle::digest`, and sizes). Since the record is signed, whoever serves the
/// bytes (the server, a proxy, a CDN, a cache) cannot change them unnoticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleOffer {
    pub url: String,
    /// Content digest of the bundle at `url` (64 hex digits).
    pub digest: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The bundle without tensors (config, tokenizer, chat template).
    pub meta_url: String,
    pub meta_digest: String,
    pub meta_bytes: u64,
}

/// A server's budgets, whole and free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLoad {
    pub sessions: u32,
    pub max_sessions: u32,
    pub cache_tokens: u64,
    pub free_cache_tokens: u64,
    pub request_memory: u64,
    pub free_request_memory: u64,
    /// Inbound streams that have not yet sent their first message.
    pub pending_streams: u32,
    /// Requests waiting for memory or compute, and running.
    pub queued: u32,
    pub running: u32,
    /// Connections open now, the most at once, and those refused or evicted by the limits
    /// since start.
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub peak_connections: u64,
    #[serde(default)]
    pub connections_refused: u64,
    #[serde(default)]
    pub connections_evicted: u64,
}

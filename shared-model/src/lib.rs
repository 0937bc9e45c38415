//! Corolla's model core: configs, weight loading, the one config-driven transformer block,
//! embeddings, LM head, KV caches, sampling, tokenizers and the generation loop.
//!
//! The model is split the way a swarm runs it: a client holds [`model::Embeddings`] and
//! [`model::LmHead`], servers hold [`model::BlockSpan`]s.

pub mod bundle;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod error;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kernels;
pub mod layers;
pub mod loader;
pub mod model;
pub mod precision;
#[cfg(feature = "progress")]
pub mod progress;
pub mod quant;
pub mod sampling;
pub mod speculative;
pub mod synthetic;
pub mod tokenizer;
pub mod tuning;
pub mod weights;

pub use config::ModelConfig;
pub use error::ModelError;

/// The default CPU backend (burn's pure-Rust `flex`, see docs/ARCHITECTURE.md for why).
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for gradients.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

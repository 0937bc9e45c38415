use crate::cache::CacheError;
use crate::config::ConfigError;
use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;
use crate::weights::WeightError;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("token id {id} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{tokens} tokens do not fit the model's context of {context}")]
    ContextTooLong { tokens: usize, context: usize },
    #[error("blocks {start}..{end} are not within the model's {layers} blocks")]
    BadSpan { start: usize, end: usize, layers: usize },
    #[error("input has shape {actual:?}, expected {expected}")]
    Shape { actual: Vec<usize>, expected: String },
    #[error("{0}")]
    Invalid(String),
}

//! Tokenizers (Hugging Face `tokenizer.json` or rebuilt from GGUF metadata), streaming
//! detokenization and chat templates.

mod chat;
mod stream;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::TextStream;

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

/// Errors from tokenizers and chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load tokenizer {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("GGUF tokenizer: {0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer model `{0}` is not supported (only `gpt2` byte-level BPE is)")]
    UnsupportedModel(String),
    #[error("pre-tokenizer `{0}` is not supported")]
    UnsupportedPreTokenizer(String),
    #[error("tokenizer.ggml.merges entry {index} (`{merge}`) is not two space-separated tokens")]
    BadMerge { index: usize, merge: String },
    #[error("tokenizer.ggml.token_type has {types} entries for {tokens} tokens")]
    TokenTypeCount { tokens: usize, types: usize },
    #[error("cannot build the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("cannot decode ids: {0}")]
    Decode(#[source] tokenizers::Error),
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("{0} has no chat template")]
    NoChatTemplate(String),
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
}

/// GGUF `tokenizer.ggml.token_type` values.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Tokens that end a chat turn in common chat formats, besides the declared EOS.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<|end|>",
    "<end_of_turn>",
];

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A text tokenizer plus the special-token facts generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner`'s vocabulary size with added tokens, which tokenizers recounts on every call
    /// (a hash-map walk) while `decode` needs it for every streamed token.
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    chat_template: Option<String>,
}

// The wrapped tokenizer's Debug prints the whole vocabulary.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS ids are not part of that file; set them
    /// with [`Tokenizer::with_special_ids`] from the model config.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let json = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner = parse_json(&json).map_err(|source| TokenizerError::Load {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            bos_id: None,
            eos_id: None,
            chat_template: None,
        })
    }

    /// Parses a `tokenizer.json` held in memory (what [`Tokenizer::to_json`] writes).
    pub fn from_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        let inner = parse_json(json).map_err(TokenizerError::Build)?;
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            bos_id: None,
            eos_id: None,
            chat_template: None,
        })
    }

    /// The tokenizer as `tokenizer.json` text (BOS/EOS ids and the chat template are not in it).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(false).map_err(TokenizerError::Build)
    }

    /// Rebuilds the tokenizer llama.cpp's converter stored in GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            // "llama" is SentencePiece, not supported yet.
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = pre_tokenizer(pre)?;

        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(index, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::BadMerge {
                        index,
                        merge: m.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // No word cache: tokenizers 0.23 keeps it in a thread-local map keyed per BPE
            // instance and never frees it, so every tokenizer built (or cloned) leaked up to
            // 10,000 cached words per thread (found by fuzzing: a process building tokenizers
            // grew without bound). Merging a word again costs microseconds.
            .cache_capacity(0)
            // Llama 3's tokenizer takes whole-word vocabulary hits before merging, as
            // llama.cpp and the original tokenizer.json do.
            .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
            .build()
            .map_err(TokenizerError::Build)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        if pre == "qwen2" {
            inner.with_normalizer(Some(NFC)).map_err(TokenizerError::Build)?;
        }

        if let Some(types) = file.opt_i32_array("tokenizer.ggml.token_type")? {
            if types.len() != tokens.len() {
                return Err(TokenizerError::TokenTypeCount {
                    tokens: tokens.len(),
                    types: types.len(),
                });
            }
            // Control tokens are specials (skippable when decoding); user-defined tokens are
            // matched whole in text but decode like ordinary text.
            let added = |kind: i32, special: bool| {
                tokens
                    .iter()
                    .zip(&types)
                    .filter(move |(_, t)| **t == kind)
                    .map(move |(tok, _)| AddedToken::from(tok.clone(), special).normalized(false))
            };
            inner
                .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
                .map_err(TokenizerError::Build)?;
            inner
                .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
                .map_err(TokenizerError::Build)?;
        }

        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            bos_id: file.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_id: file.opt_u32("tokenizer.ggml.eos_token_id")?,
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_string),
        })
    }

    /// Sets the BOS/EOS ids (for `tokenizer.json` tokenizers, whose ids live in the config).
    pub fn with_special_ids(mut self, bos_id: Option<u32>, eos_id: Option<u32>) -> Tokenizer {
        self.bos_id = bos_id;
        self.eos_id = eos_id;
        self
    }

    /// Encodes `text` without adding BOS/EOS; special tokens written in the text (such as
    /// `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        // tokenizers silently drops unknown ids; an id beyond the vocabulary means a model and
        // tokenizer mismatch, which should not pass unnoticed.
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::UnknownId { id, vocab_size });
        }
        self.inner.decode(ids, skip_special).map_err(TokenizerError::Decode)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids that end generation: the declared EOS plus every known end-of-turn token present
    /// in the vocabulary. Checkpoints often declare a document EOS while their chat template
    /// ends turns with another token (SmolLM2: `<|endoftext|>` vs `<|im_end|>`), as llama.cpp
    /// also accounts for.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .eos_id
            .into_iter()
            .chain(END_OF_TURN_TOKENS.iter().filter_map(|t| self.token_id(t)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The chat template embedded in a GGUF file, if any. BOS/EOS strings come from the
    /// tokenizer's own ids.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>, TokenizerError> {
        let Some(source) = &self.chat_template else {
            return Ok(None);
        };
        let name = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        ChatTemplate::new(source.clone(), name(self.bos_id), name(self.eos_id)).map(Some)
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream::new(self, skip_special)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Parses `tokenizer.json` text. The text is checked as JSON first: tokenizers 0.23 panics
/// (`expect("Helper")` in its decoder's `Deserialize`) when the `decoder` value is not valid
/// JSON, and a client reads this text from a server's bundle. The model's word cache is turned
/// off, as in [`Tokenizer::from_gguf`]: tokenizers 0.23 never frees it. (With capacity 0 an
/// instance still leaves one empty map entry per thread that encodes with it.)
fn parse_json(json: &str) -> Result<tokenizers::Tokenizer, tokenizers::Error> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    let mut inner: tokenizers::Tokenizer = serde_json::from_value(value)?;
    let mut model = inner.get_model().clone();
    model.resize_cache(0);
    inner.with_model(model);
    Ok(inner)
}

/// The pre-tokenizer llama.cpp uses for each `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    // ByteLevel's own regex (use_regex) is the GPT-2 split.
    let gpt2 = ByteLevel::new(false, true, true);
    Ok(match pre {
        "gpt2" | "default" => gpt2.into(),
        // llama.cpp splits digits one by one before the GPT-2 regex for these, as the
        // original StarCoder/SmolLM tokenizer.json does with `Digits(individual_digits)`.
        "smollm" | "starcoder" | "refact" => Sequence::new(vec![Digits::new(true).into(), gpt2.into()]).into(),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT)?,
        "qwen2" => split(QWEN2_SPLIT)?,
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    })
}

#[cfg(test)]
mod tests;

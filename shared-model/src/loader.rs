//! Opening a model from disk: an HF folder (config.json + safetensors + optional
//! tokenizer files) or a single GGUF file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::GgufModel;
use crate::model::{BlockSpan, Embeddings, LmHead, check_coverage};
use crate::tokenizer::{ChatTemplate, Tokenizer, TokenizerError};
use crate::weights::{SafetensorsSource, WeightError, WeightSource};

/// The files of an HF-layout model besides its weights.
#[derive(Debug, Clone)]
pub struct HfFiles {
    pub config: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

/// Everything on disk about one model, with tensors not yet read.
pub struct ModelFiles {
    pub path: PathBuf,
    pub config: ModelConfig,
    /// The config in Hugging Face form (for GGUF files, as converted), handed to clients.
    pub hf_config: serde_json::Value,
    pub weights: Arc<dyn WeightSource>,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end a generation (EOS and end-of-turn tokens).
    pub stop_ids: Vec<u32>,
}

impl ModelFiles {
    /// Opens an HF-layout folder or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let meta = std::fs::metadata(path).map_err(|source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            Self::open_hf_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        let files = HfFiles {
            config: dir.join("config.json"),
            tokenizer: optional("tokenizer.json"),
            tokenizer_config: optional("tokenizer_config.json"),
            generation_config: optional("generation_config.json"),
        };
        Self::from_hf_files(dir, files, || Ok(Arc::new(SafetensorsSource::open_dir(dir)?)))
    }

    /// A model from the files of an HF-layout folder (on disk or in the Hub cache) and its
    /// weights, opened once the config is valid; `path` is where it is, for messages.
    pub fn from_hf_files(
        path: &Path,
        files: HfFiles,
        weights: impl FnOnce() -> Result<Arc<dyn WeightSource>, ModelError>,
    ) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(&files.config).map_err(|source| crate::config::ConfigError::Io {
            path: files.config.clone(),
            source,
        })?;
        let hf_config: serde_json::Value = serde_json::from_str(&text).map_err(crate::config::ConfigError::from)?;
        let config = ModelConfig::from_json_value(hf_config.clone())?;
        let weights = weights()?;
        let tokenizer = match &files.tokenizer {
            Some(path) => Some(Tokenizer::from_file(path)?),
            None => None,
        };
        let chat_template = match &files.tokenizer_config {
            Some(path) => match ChatTemplate::from_tokenizer_config(path) {
                Ok(template) => Some(template),
                Err(TokenizerError::NoChatTemplate(_)) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let eos = match &files.generation_config {
            Some(path) => generation_eos(path)?,
            None => None,
        };
        let mut stop_ids = eos.unwrap_or_else(|| config.eos_token_ids.clone());
        stop_ids.dedup();
        Ok(Self {
            path: path.to_path_buf(),
            config,
            hf_config,
            weights,
            tokenizer,
            chat_template,
            stop_ids,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self, ModelError> {
        let model = GgufModel::open(path)?;
        let hf_config = model.hf_config()?;
        let config = ModelConfig::from_json_value(hf_config.clone())?;
        let tokenizer = Tokenizer::from_gguf(model.file())?;
        let chat_template = tokenizer.chat_template()?;
        let mut stop_ids = tokenizer.end_of_turn_ids();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            path: path.to_path_buf(),
            config,
            hf_config,
            weights: Arc::new(model),
            tokenizer: Some(tokenizer),
            chat_template,
            stop_ids,
        })
    }

    /// The client part of a model from its (verified) client bundle, kept at `path`: what a
    /// swarm client needs when the blocks are the servers' (the embeddings, final norm and
    /// LM head are its only tensors).
    pub fn from_bundle(bundle: crate::bundle::ClientBundle, path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            config: bundle.config,
            hf_config: bundle.hf_config,
            weights: Arc::new(bundle.weights),
            tokenizer: bundle.tokenizer,
            chat_template: bundle.chat_template,
            stop_ids: bundle.stop_ids,
        }
    }
}

/// `eos_token_id` of `generation_config.json`, if the file exists and names one.
fn generation_eos(path: &Path) -> Result<Option<Vec<u32>>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(crate::config::ConfigError::from)?;
    let ids = match json.get("eos_token_id") {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => return Ok(None),
    };
    Ok(Some(ids))
}

/// A whole model in one process: what `corolla generate` runs without a swarm.
pub struct LocalModel<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub spans: Vec<BlockSpan<B>>,
    pub head: LmHead<B>,
}

impl<B: Backend> LocalModel<B> {
    /// Loads every part, failing on tensors that no part reads.
    pub fn load(files: &ModelFiles, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_from(&files.config, files.weights.as_ref(), device)
    }

    /// [`LocalModel::load`] from `source` (the model's weights behind a progress bar).
    pub fn load_from(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device) -> Result<Self, ModelError> {
        check_coverage(config, source)?;
        Ok(Self {
            embeddings: Embeddings::load(config, source, device)?,
            spans: vec![BlockSpan::load(config, source, 0..config.num_layers, device)?],
            head: LmHead::load(config, source, device)?,
        })
    }
}

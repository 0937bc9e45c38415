//! The client bundle: everything a client needs to run a model whose blocks live in the swarm
//! (config, tokenizer, chat template, stop tokens, and the embedding, embedding-norm, final
//! norm and LM head tensors) in one safetensors file, so a browser fetches and caches one URL.
//!
//! Tensors keep the checkpoint's precision: f32 as f32, and GGUF Q8_0/Q4_0/Q4_1 blocks as
//! their raw bytes (a `U8` tensor whose format is named in the metadata), dequantized by the
//! client exactly as a native client does. The text parts travel in the safetensors metadata,
//! with the fingerprint of the model the bundle belongs to.
//!
//! A client never uses a bundle it merely downloaded: [`ClientBundle::verified`] checks its
//! content [`digest`] against the one the server signed in its DHT record, and its fingerprint
//! against the model the client asked for.

use std::collections::{BTreeSet, HashMap};

use safetensors::{Dtype, SafeTensors};

use crate::checkpoint::{self, LM_HEAD};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::quant::{QuantKind, QuantMatrix};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::weights::{HostTensor, StoredTensor, WeightError, WeightSource, copy_range};

mod digest;
mod file;

pub use digest::{DIGEST_HEX_LEN, digest, digest_file, is_digest};
pub use file::{bundle_recipe, write_bundle_file};

/// Bumped when the layout below changes; clients refuse other versions.
///
/// 2: the model's fingerprint (`fingerprint`), which clients check.
pub const BUNDLE_FORMAT: &str = "corolla-client-bundle/2";

const KEY_FORMAT: &str = "format";
const KEY_CONFIG: &str = "config";
const KEY_NAME: &str = "name";
const KEY_FINGERPRINT: &str = "fingerprint";
const KEY_TOKENIZER: &str = "tokenizer";
const KEY_BOS_ID: &str = "bos_id";
const KEY_EOS_ID: &str = "eos_id";
const KEY_TEMPLATE: &str = "chat_template";
const KEY_TEMPLATE_BOS: &str = "chat_template.bos_token";
const KEY_TEMPLATE_EOS: &str = "chat_template.eos_token";
const KEY_STOP_IDS: &str = "stop_ids";
const QUANT_PREFIX: &str = "quant.";

/// Why a bundle cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a client bundle: {0}")]
    Format(String),
    #[error("client bundle field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    /// Its content is not what the server's signed record promises.
    #[error("sha256 {got}, expected {want}")]
    Digest { got: String, want: String },
    /// It belongs to another model than the one asked for.
    #[error("it is a bundle of model {got}, not of {want}")]
    WrongModel { got: String, want: String },
    /// A bundle file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn bad(field: &'static str, reason: impl ToString) -> BundleError {
    BundleError::Field {
        field,
        reason: reason.to_string(),
    }
}

/// Names of the tensors a client loads: everything outside the blocks.
pub fn client_tensor_names(config: &ModelConfig, source: &dyn WeightSource) -> Vec<String> {
    let mut prefixes = vec![
        checkpoint::embedding_name(config.family),
        checkpoint::final_norm_prefix(config.family),
        LM_HEAD.to_string(),
    ];
    if config.embedding_norm {
        prefixes.push(checkpoint::embedding_norm_prefix(config.family));
    }
    source
        .names()
        .into_iter()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect()
}

/// Bytes the client part of a model takes in f32 once loaded (embeddings plus an untied head):
/// what decides whether a browser can hold it, known from the config alone.
pub fn client_f32_bytes(config: &ModelConfig) -> u64 {
    let matrix = config.vocab_size as u64 * config.hidden_size as u64 * 4;
    if config.tie_word_embeddings { matrix } else { 2 * matrix }
}

/// The text parts of a bundle.
#[derive(Debug, Clone)]
pub struct BundleMeta<'a> {
    pub name: &'a str,
    /// The model's fingerprint (`shared_model::fingerprint`).
    pub fingerprint: &'a str,
    pub hf_config: &'a serde_json::Value,
    pub tokenizer: Option<&'a Tokenizer>,
    pub chat_template: Option<&'a ChatTemplate>,
    pub stop_ids: &'a [u32],
}

/// Writes the bundle of a model.
pub fn write_bundle(
    meta: &BundleMeta<'_>,
    config: &ModelConfig,
    source: &dyn WeightSource,
) -> Result<Vec<u8>, ModelError> {
    write_bundle_parts(meta, config, Some(source))
}

/// Writes the bundle without tensors: what a client reads first to learn the model (and
/// whether it can hold the embeddings and head at all) before downloading them.
pub fn write_meta_bundle(meta: &BundleMeta<'_>, config: &ModelConfig) -> Result<Vec<u8>, ModelError> {
    write_bundle_parts(meta, config, None)
}

fn write_bundle_parts(
    meta: &BundleMeta<'_>,
    config: &ModelConfig,
    source: Option<&dyn WeightSource>,
) -> Result<Vec<u8>, ModelError> {
    let mut metadata = bundle_metadata(meta)?;
    let mut tensors = Vec::new();
    if let Some(source) = source {
        for name in client_tensor_names(config, source) {
            let tensor = read_client_tensor(source, name)?;
            if let Some(value) = &tensor.quant {
                metadata.insert(format!("{QUANT_PREFIX}{}", tensor.name), value.clone());
            }
            tensors.push((tensor.name.clone(), tensor.dtype, tensor.shape.clone(), tensor.bytes()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|err| ModelError::Invalid(format!("tensor {name}: {err}")))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::Invalid(format!("bundle: {e}")))
}

/// The bundle's text parts, as its safetensors metadata (without the `quant.` entries, which
/// come with the tensors).
fn bundle_metadata(meta: &BundleMeta<'_>) -> Result<HashMap<String, String>, ModelError> {
    let mut metadata = HashMap::new();
    metadata.insert(KEY_FORMAT.to_string(), BUNDLE_FORMAT.to_string());
    metadata.insert(KEY_NAME.to_string(), meta.name.to_string());
    metadata.insert(KEY_FINGERPRINT.to_string(), meta.fingerprint.to_string());
    metadata.insert(KEY_CONFIG.to_string(), meta.hf_config.to_string());
    metadata.insert(
        KEY_STOP_IDS.to_string(),
        serde_json::Value::from(meta.stop_ids.to_vec()).to_string(),
    );
    if let Some(tokenizer) = meta.tokenizer {
        metadata.insert(KEY_TOKENIZER.to_string(), tokenizer.to_json()?);
        if let Some(id) = tokenizer.bos_id() {
            metadata.insert(KEY_BOS_ID.to_string(), id.to_string());
        }
        if let Some(id) = tokenizer.eos_id() {
            metadata.insert(KEY_EOS_ID.to_string(), id.to_string());
        }
    }
    if let Some(template) = meta.chat_template {
        let (source, bos, eos) = template.parts();
        metadata.insert(KEY_TEMPLATE.to_string(), source.to_string());
        metadata.insert(KEY_TEMPLATE_BOS.to_string(), bos.to_string());
        metadata.insert(KEY_TEMPLATE_EOS.to_string(), eos.to_string());
    }
    Ok(metadata)
}

/// One client tensor as the bundle stores it.
struct BundleTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The `quant.<name>` metadata value of a quantized tensor (`KIND,ROWS,COLS`).
    quant: Option<String>,
    data: TensorData,
}

/// A tensor's data as read: written out as it is, without a second copy in bytes.
enum TensorData {
    Raw(Vec<u8>),
    F32(Vec<f32>),
}

impl BundleTensor {
    fn byte_len(&self) -> usize {
        match &self.data {
            TensorData::Raw(bytes) => bytes.len(),
            TensorData::F32(values) => values.len() * 4,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::Raw(bytes) => bytes.clone(),
            TensorData::F32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Reads a client tensor in the precision the bundle keeps: quantized blocks as their raw
/// bytes, anything else as f32.
fn read_client_tensor(source: &dyn WeightSource, name: String) -> Result<BundleTensor, ModelError> {
    let quant = if source.names().contains(&name) {
        source.read_quant(&name)?
    } else {
        None
    };
    Ok(match quant {
        Some(q) => {
            let [rows, cols] = q.shape();
            BundleTensor {
                quant: Some(format!("{:?},{rows},{cols}", q.kind())),
                dtype: Dtype::U8,
                shape: vec![q.raw().len()],
                data: TensorData::Raw(q.raw().to_vec()),
                name,
            }
        }
        None => {
            let t = source.read(&name)?;
            BundleTensor {
                quant: None,
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                data: TensorData::F32(t.data),
                name,
            }
        }
    })
}

/// A bundle read back: the client's model parts, with tensors held in memory.
pub struct ClientBundle {
    pub name: String,
    /// The fingerprint of the model the bundle says it belongs to.
    pub fingerprint: String,
    pub config: ModelConfig,
    /// The config in Hugging Face form, as the bundle holds it.
    pub hf_config: serde_json::Value,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
    pub weights: BundleWeights,
}

impl std::fmt::Debug for ClientBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBundle")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// What a client expects of a bundle it downloaded: the model it asked for, and the digest a
/// server of that model signed.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub fingerprint: &'a str,
    pub digest: &'a str,
}

impl ClientBundle {
    /// Parses a downloaded bundle if its content digest is `expected.digest` and it names the
    /// model `expected.fingerprint` (a [`BundleError::Digest`] or [`BundleError::WrongModel`]
    /// otherwise). The digest is checked first, so nothing of a tampered file is parsed beyond
    /// its safetensors header.
    pub fn verified(bytes: Vec<u8>, expected: &Expected<'_>) -> Result<Self, ModelError> {
        let got = digest(&bytes)?;
        if got != expected.digest {
            return Err(BundleError::Digest {
                got,
                want: expected.digest.to_string(),
            }
            .into());
        }
        let bundle = Self::from_bytes(bytes)?;
        if bundle.fingerprint != expected.fingerprint {
            return Err(BundleError::WrongModel {
                got: bundle.fingerprint,
                want: expected.fingerprint.to_string(),
            }
            .into());
        }
        Ok(bundle)
    }

    /// Parses and validates a bundle (without checking where it came from: see
    /// [`ClientBundle::verified`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ModelError> {
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| BundleError::Format(format!("bad safetensors: {e}")))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| BundleError::Format("no metadata".into()))?;
        let get = |key: &'static str| meta.get(key).ok_or_else(|| bad(key, "missing"));
        let format = get(KEY_FORMAT)?;
        if format != BUNDLE_FORMAT {
            return Err(BundleError::Format(format!("format {format}, this client reads {BUNDLE_FORMAT}")).into());
        }
        let fingerprint = get(KEY_FINGERPRINT)?.clone();
        let hf: serde_json::Value = serde_json::from_str(get(KEY_CONFIG)?).map_err(|e| bad(KEY_CONFIG, e))?;
        let config = ModelConfig::from_json_value(hf.clone())?;
        let stop_ids: Vec<u32> = serde_json::from_str(get(KEY_STOP_IDS)?).map_err(|e| bad(KEY_STOP_IDS, e))?;
        let id = |key: &'static str| -> Result<Option<u32>, BundleError> {
            meta.get(key)
                .map(|v| v.parse::<u32>().map_err(|e| bad(key, e)))
                .transpose()
        };
        let tokenizer = match meta.get(KEY_TOKENIZER) {
            Some(json) => Some(Tokenizer::from_json(json)?.with_special_ids(id(KEY_BOS_ID)?, id(KEY_EOS_ID)?)),
            None => None,
        };
        let chat_template = match meta.get(KEY_TEMPLATE) {
            Some(source) => Some(ChatTemplate::new(
                source.clone(),
                meta.get(KEY_TEMPLATE_BOS).cloned().unwrap_or_default(),
                meta.get(KEY_TEMPLATE_EOS).cloned().unwrap_or_default(),
            )?),
            None => None,
        };
        let mut quant = HashMap::new();
        for (key, value) in &meta {
            if let Some(name) = key.strip_prefix(QUANT_PREFIX) {
                quant.insert(name.to_string(), parse_quant(value)?);
            }
        }
        let names: BTreeSet<String> = header.tensors().into_keys().collect();
        for name in quant.keys() {
            if !names.contains(name) {
                return Err(bad("quant", format!("names {name}, which the bundle lacks")).into());
            }
        }
        Ok(Self {
            name: meta.get(KEY_NAME).cloned().unwrap_or_default(),
            fingerprint,
            config,
            hf_config: hf,
            tokenizer,
            chat_template,
            stop_ids,
            weights: BundleWeights {
                files: vec![bytes],
                index: names.iter().map(|n| (n.clone(), 0)).collect(),
                quant,
            },
        })
    }
}

fn parse_quant(value: &str) -> Result<(QuantKind, usize, usize), BundleError> {
    let parts: Vec<&str> = value.split(',').collect();
    let [kind, rows, cols] = parts[..] else {
        return Err(bad("quant", format!("`{value}` is not KIND,ROWS,COLS")));
    };
    let kind = match kind {
        "Q8_0" => QuantKind::Q8_0,
        "Q4_0" => QuantKind::Q4_0,
        "Q4_1" => QuantKind::Q4_1,
        other => return Err(bad("quant", format!("unknown format {other}"))),
    };
    let n = |s: &str| s.parse::<usize>().map_err(|e| bad("quant", e));
    Ok((kind, n(rows)?, n(cols)?))
}

/// The bundle's tensors, as a [`WeightSource`]. Quantized tensors are dequantized when read:
/// clients run them on GPUs (WebGPU) through dense matmuls.
pub struct BundleWeights {
    files: Vec<Vec<u8>>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    quant: HashMap<String, (QuantKind, usize, usize)>,
}

impl BundleWeights {
    /// Plain safetensors files held in memory (a checkpoint's shards, say): where there is no
    /// file system, as in a browser.
    pub fn from_safetensors(files: Vec<Vec<u8>>) -> Result<Self, WeightError> {
        let mut index = HashMap::new();
        for (i, bytes) in files.iter().enumerate() {
            let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| WeightError::BadSafetensors {
                path: format!("in-memory file {i}").into(),
                reason: e.to_string(),
            })?;
            for name in header.tensors().into_keys() {
                index.insert(name, i);
            }
        }
        Ok(Self {
            files,
            index,
            quant: HashMap::new(),
        })
    }
}

impl BundleWeights {
    /// The tensor `name` as it lies in its in-memory file.
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>, WeightError> {
        let bad = |reason: String| WeightError::BadSafetensors {
            path: "client bundle".into(),
            reason,
        };
        let file = self
            .index
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| WeightError::Missing { name: name.into() })?;
        let tensors = SafeTensors::deserialize(file).map_err(|e| bad(e.to_string()))?;
        tensors
            .tensor(name)
            .map_err(|_| WeightError::Missing { name: name.into() })
    }
}

impl WeightSource for BundleWeights {
    fn names(&self) -> BTreeSet<String> {
        self.index.keys().cloned().collect()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        let view = self.view(name)?;
        if let Some(&(kind, rows, cols)) = self.quant.get(name) {
            return QuantMatrix::new(name, kind, rows, cols, view.data().to_vec())?.dequantize();
        }
        if view.dtype() != Dtype::F32 {
            return Err(WeightError::Dtype {
                name: name.into(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostTensor::new(view.shape().to_vec(), data))
    }

    /// Quantized tensors as the GGUF they came from reports them (format name, `[rows, cols]`),
    /// not as the `U8` byte run that carries them.
    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        let view = self.view(name)?;
        let byte_len = view.data().len() as u64;
        Ok(match self.quant.get(name) {
            Some(&(kind, rows, cols)) => StoredTensor {
                dtype: format!("{kind:?}"),
                shape: vec![rows, cols],
                byte_len,
            },
            None => StoredTensor {
                dtype: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
                byte_len,
            },
        })
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        copy_range(name, self.view(name)?.data(), offset, buf)
    }
}

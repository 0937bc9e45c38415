//! Weight sources: where a module's tensors come from.
//!
//! Every source speaks Hugging Face tensor names (`model.layers.3.self_attn.q_proj.weight`), so
//! the modules load from safetensors checkpoints and from GGUF files through one path. Besides
//! f32 (and quantized) reads for loading, every source hands out a tensor's bytes as stored,
//! by range ([`WeightSource::stored`], [`WeightSource::read_stored`]): what the model
//! fingerprint samples without reading the checkpoint.

mod host_tensor;
mod range_file;
mod safetensors_source;
mod stored;

pub use host_tensor::HostTensor;
pub(crate) use range_file::RangeFile;
pub use safetensors_source::{SafetensorsSource, ShardBytes, ShardStore};
pub use stored::StoredTensor;
pub(crate) use stored::{copy_range, tensor_range};

use std::collections::BTreeSet;

use crate::quant::QuantMatrix;
use std::path::PathBuf;

/// Errors while reading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path} is not a valid shard index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    #[error("tensors the model does not use: {names:?}")]
    Unused { names: Vec<String> },
    #[error("GGUF: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    /// A file of a Hugging Face Hub model that could not be fetched or checked.
    #[cfg(feature = "hub")]
    #[error(transparent)]
    Hub(Box<crate::hub::HubError>),
    #[error("the GPU refused the kernel that expands quantized weights")]
    KernelRefused,
    #[error("bytes {offset}..+{len} of tensor `{name}` lie outside its {byte_len} bytes")]
    OutOfRange {
        name: String,
        offset: u64,
        len: u64,
        byte_len: u64,
    },
    #[error("{path}: bytes {offset}..+{len} lie past its end ({file_len} bytes)")]
    PastEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
        file_len: u64,
    },
}

/// A checkpoint that hands out tensors by their Hugging Face name, as f32 on the host.
///
/// Implementations read lazily: only the tensors asked for are read (and, for sharded
/// checkpoints, only the shards that hold them are opened).
pub trait WeightSource: Send + Sync {
    /// Every tensor name the checkpoint holds.
    fn names(&self) -> BTreeSet<String>;
    /// Reads one tensor, converted to f32 (dequantized where stored quantized).
    fn read(&self, name: &str) -> Result<HostTensor, WeightError>;

    /// How `name` is stored (element type, shape, byte length), from the checkpoint's header:
    /// no tensor data is read.
    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError>;

    /// Fills `buf` with the stored bytes `offset..offset + buf.len()` of `name` (offsets count
    /// from the tensor's first byte), reading only those bytes from storage. A range outside
    /// the tensor is [`WeightError::OutOfRange`].
    ///
    /// No default: one that read the whole tensor would silently undo what callers (the model
    /// fingerprint) use this for.
    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError>;

    /// A hint that these stored ranges are read next (by [`WeightSource::read_stored`]), so a
    /// remote checkpoint fetches them together instead of one round trip each.
    fn prefetch_stored(&self, _ranges: &[StoredRange]) -> Result<(), WeightError> {
        Ok(())
    }

    /// Makes these tensors' data local before they are read (a Hub checkpoint downloads the
    /// shards holding them), so that downloading and loading are two steps a user can watch.
    /// Local sources have nothing to do.
    fn fetch_tensors(&self, _names: &[String]) -> Result<(), WeightError> {
        Ok(())
    }

    /// Reads a 2-D tensor in its stored quantized form, if it is stored in a format that
    /// [`QuantMatrix`] computes with directly.
    fn read_quant(&self, _name: &str) -> Result<Option<QuantMatrix>, WeightError> {
        Ok(None)
    }
}

/// Stored bytes `offset..offset + len` of tensor `name` (offsets from its first byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRange {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

/// A projection weight as loaded: dense f32, or quantized blocks.
#[derive(Debug, Clone)]
pub enum WeightData {
    Dense(HostTensor),
    Quant(QuantMatrix),
}

impl WeightData {
    /// `[out, in]`
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Self::Dense(t) => [t.shape[0], t.shape[1]],
            Self::Quant(q) => q.shape(),
        }
    }

    pub fn to_dense(&self) -> Result<HostTensor, WeightError> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quant(q) => q.dequantize(),
        }
    }
}

/// Reads tensors from a source and records which names were taken, so a loader can fail on
/// tensors that are missing, misshapen or left unused.
pub struct TensorReader<'a> {
    source: &'a dyn WeightSource,
    taken: BTreeSet<String>,
}

impl<'a> TensorReader<'a> {
    pub fn new(source: &'a dyn WeightSource) -> Self {
        Self {
            source,
            taken: BTreeSet::new(),
        }
    }

    /// Whether the checkpoint holds `name` (for optional tensors such as an untied LM head).
    pub fn contains(&self, name: &str) -> bool {
        self.source.names().contains(name)
    }

    /// Reads `name` and checks its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor, WeightError> {
        let tensor = self.source.read(name)?;
        if tensor.shape != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.shape,
            });
        }
        self.taken.insert(name.to_string());
        Ok(tensor)
    }

    /// Reads a `[out, in]` projection weight, quantized when the checkpoint stores it so.
    pub fn take_matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<WeightData, WeightError> {
        if let Some(q) = self.source.read_quant(name)? {
            if q.shape() != shape {
                return Err(WeightError::Shape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    actual: q.shape().to_vec(),
                });
            }
            self.taken.insert(name.to_string());
            return Ok(WeightData::Quant(q));
        }
        Ok(WeightData::Dense(self.take(name, &shape)?))
    }

    /// Names taken so far.
    pub fn taken(&self) -> &BTreeSet<String> {
        &self.taken
    }

    /// Fails if any tensor under one of `prefixes` was not taken: a checkpoint with extra
    /// tensors for the part we load means we misread the architecture.
    pub fn finish(self, prefixes: &[String]) -> Result<(), WeightError> {
        let unused: Vec<String> = self
            .source
            .names()
            .into_iter()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
            .filter(|n| !self.taken.contains(n))
            .filter(|n| !is_ignorable(n))
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(WeightError::Unused { names: unused })
        }
    }
}

/// Buffers some checkpoints carry that are derived, not learned.
fn is_ignorable(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || name.ends_with(".attn.masked_bias") || name.ends_with(".attn.bias")
}

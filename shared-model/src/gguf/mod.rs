//! GGUF (llama.cpp) checkpoints: the container format, dequantization, and a Hugging Face view
//! of llama-architecture files.
//!
//! The reader treats the file as untrusted: every count, length and offset is checked against
//! the bytes actually present before anything is allocated, so a truncated or hostile file gives
//! a [`GgufError`], never a panic or an allocation larger than a small multiple of the file.

mod dequant;
mod model;
mod value;

pub use dequant::{BlockLayout, DequantError, GgmlType, dequantize};
pub use model::GgufModel;
pub use value::{GgufArray, GgufValue};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::weights::{HostTensor, RangeFile, WeightError};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal but unused in practice; the cap keeps a hostile file from
/// recursing the parser off the stack.
const MAX_ARRAY_NESTING: usize = 4;

/// Why a file's bytes are not a well-formed GGUF file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    UnsupportedVersion(u32),
    #[error("truncated while reading {what} at byte {offset}: needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what} count {count} cannot fit in the {available} bytes left")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        available: u64,
    },
    #[error("unknown metadata value type {value_type} for key `{key}`")]
    BadValueType { key: String, value_type: u32 },
    #[error("metadata key `{key}` nests arrays deeper than {MAX_ARRAY_NESTING} levels")]
    NestingTooDeep { key: String },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("metadata key `{0}` appears twice")]
    DuplicateKey(String),
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    #[error("general.alignment {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor `{tensor}` has {n_dims} dimensions, expected 1 to {MAX_DIMS}")]
    BadDimCount { tensor: String, n_dims: u32 },
    #[error("tensor `{tensor}` has dims {dims:?} whose element count overflows")]
    ElementOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor `{tensor}` has row length {ne0}, not a multiple of its {ggml_type} block of {block}")]
    PartialBlock {
        tensor: String,
        ggml_type: GgmlType,
        ne0: u64,
        block: u64,
    },
    #[error("tensor `{tensor}` at offset {offset} is not aligned to {alignment} bytes")]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor `{tensor}` spans bytes {offset}..{end} of a {data_len}-byte data section")]
    OutOfBounds {
        tensor: String,
        offset: u64,
        end: u64,
        data_len: u64,
    },
}

/// Errors from GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    Format { path: PathBuf, reason: FormatError },
    #[error("metadata key `{key}` is missing")]
    MissingKey { key: String },
    #[error("metadata key `{key}` holds {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key `{key}` has an unusable value: {reason}")]
    BadValue { key: String, reason: String },
    #[error("tensor `{0}` is not in the file")]
    MissingTensor(String),
    #[error("tensor `{tensor}` has ggml type {ggml_type}, which cannot be dequantized")]
    UnsupportedType { tensor: String, ggml_type: String },
    #[error("tensor `{tensor}` cannot be dequantized: {source}")]
    Dequant {
        tensor: String,
        #[source]
        source: DequantError,
    },
    #[error("tensor `{tensor}` has ggml dims {dims:?}, expected {expected}")]
    TensorShape {
        tensor: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error("architecture `{0}` is not supported (only `llama` is)")]
    UnsupportedArchitecture(String),
    #[error("tensor `{0}` has no Hugging Face equivalent")]
    UnknownTensorName(String),
    #[error("rope_freqs.weight does not match Llama-3 rope scaling: {0}")]
    UnsupportedRopeFreqs(String),
}

/// Where one tensor lives in the file, as the header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) is the fastest-varying dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// PyTorch dimension order (the reverse of ggml's).
    pub fn shape(&self) -> Vec<usize> {
        // Element counts were checked against the file size at open, so each dim fits in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the stored data, when the type's block layout is known.
    pub fn byte_len(&self) -> Option<u64> {
        let layout = self.ggml_type.block_layout()?;
        Some(self.n_elements() / layout.elements as u64 * layout.bytes as u64)
    }
}

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data stays in the (memory-mapped) file until read.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    /// The file opened a second time for [`GgufFile::read_at`], on first use.
    ranges: OnceLock<RangeFile>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this struct. A concurrent writer
        // truncating or rewriting the file could change or unmap bytes under us; checkpoint
        // files are not edited while loaded, the same assumption every mmap-based loader makes.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), Backing::Mapped(map))
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(name.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<GgufFile, GgufError> {
        match Header::parse(backing.bytes()) {
            Ok(h) => Ok(GgufFile {
                path,
                backing,
                version: h.version,
                metadata: h.metadata,
                tensor_index: h.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
                tensors: h.tensors,
                alignment: h.alignment,
                data_offset: h.data_offset,
                ranges: OnceLock::new(),
            }),
            Err(reason) => Err(GgufError::Format { path, reason }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, sorted by key.
    pub fn metadata_map(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensors in header order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The raw stored bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let len = info.byte_len().ok_or_else(|| GgufError::UnsupportedType {
            tensor: name.to_string(),
            ggml_type: info.ggml_type.to_string(),
        })?;
        // Bounds were checked at open for every type with a known layout.
        let start = self.data_offset + info.offset;
        let range = start as usize..(start + len) as usize;
        self.backing.bytes().get(range).ok_or_else(|| GgufError::Format {
            path: self.path.clone(),
            reason: FormatError::OutOfBounds {
                tensor: name.to_string(),
                offset: info.offset,
                end: info.offset + len,
                data_len: self.data_len(),
            },
        })
    }

    /// Reads a tensor as f32 in PyTorch dimension order.
    pub fn read_tensor(&self, name: &str) -> Result<HostTensor, GgufError> {
        let bytes = self.tensor_bytes(name)?;
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let data = dequantize_named(name, info.ggml_type, bytes, info.n_elements() as usize)?;
        Ok(HostTensor::new(info.shape(), data))
    }

    /// Where `info`'s data starts, in bytes from the start of the file.
    pub fn tensor_file_offset(&self, info: &GgufTensorInfo) -> Option<u64> {
        self.data_offset.checked_add(info.offset)
    }

    /// Fills `buf` with the file's bytes at `offset..offset + buf.len()`, reading only those
    /// from storage: a mapped file is opened a second time for positioned reads without
    /// readahead (a fault on the map would read megabytes around each page, see
    /// [`RangeFile`]); an image in memory is copied from.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let image_len = self.backing.bytes().len() as u64;
        let past_end = || WeightError::PastEnd {
            path: self.path.clone(),
            offset,
            len: buf.len() as u64,
            file_len: image_len,
        };
        match &self.backing {
            Backing::Owned(bytes) => {
                let range = usize::try_from(offset)
                    .ok()
                    .and_then(|start| Some(start..start.checked_add(buf.len())?))
                    .ok_or_else(past_end)?;
                let src = bytes.get(range).ok_or_else(past_end)?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Backing::Mapped(_) => {
                if self.ranges.get().is_none() {
                    let file = RangeFile::open(&self.path)?;
                    // The header parsed at open describes the mapped file; another file at
                    // the same path since then would be read at offsets meant for this one.
                    if file.len() != image_len {
                        return Err(WeightError::Io {
                            path: self.path.clone(),
                            source: std::io::Error::other(format!(
                                "the file changed since it was opened ({image_len} bytes then, {} now)",
                                file.len()
                            )),
                        });
                    }
                    // Another thread may have set it meanwhile: either copy will do.
                    let _ = self.ranges.set(file);
                }
                match self.ranges.get() {
                    Some(file) => file.read_exact_at(offset, buf),
                    None => Err(past_end()),
                }
            }
        }
    }

    fn data_len(&self) -> u64 {
        (self.backing.bytes().len() as u64).saturating_sub(self.data_offset)
    }

    // Typed metadata access. `opt_*` treat a missing key as `None` but a wrongly typed one as an
    // error, for keys with a documented default.

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.to_string(),
                expected,
                found: v.type_name(),
            }),
        }
    }

    fn required<T>(&self, key: &str, v: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        v?.ok_or_else(|| GgufError::MissingKey { key: key.to_string() })
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.typed(key, "an integer in u32 range", |v| {
            v.as_u64().and_then(|x| u32::try_from(x).ok())
        })
    }

    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.required(key, self.opt_u32(key))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.required(key, self.opt_u64(key))
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>, GgufError> {
        self.typed(key, "an integer", GgufValue::as_i64)
    }

    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.required(key, self.opt_i64(key))
    }

    /// Accepts f32 or f64 (narrowed).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.typed(key, "a float", |v| v.as_f64().map(|x| x as f32))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.required(key, self.opt_f32(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.required(key, self.opt_bool(key))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.required(key, self.opt_str(key))
    }

    pub fn get_array(&self, key: &str) -> Result<&GgufArray, GgufError> {
        let v = self.typed(key, "an array", GgufValue::as_array);
        self.required(key, v)
    }

    pub fn opt_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        self.typed(key, "an array of strings", |v| match v.as_array()? {
            GgufArray::String(s) => Some(s.as_slice()),
            _ => None,
        })
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.required(key, self.opt_str_array(key))
    }

    /// Any integer array whose values fit in i32.
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        self.typed(key, "an array of integers in i32 range", |v| {
            v.as_array()?
                .to_i64_vec()?
                .into_iter()
                .map(|x| i32::try_from(x).ok())
                .collect()
        })
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.required(key, self.opt_i32_array(key))
    }
}

pub(crate) fn dequantize_named(
    tensor: &str,
    ggml_type: GgmlType,
    bytes: &[u8],
    n: usize,
) -> Result<Vec<f32>, GgufError> {
    dequantize(ggml_type, bytes, n).map_err(|e| match e {
        DequantError::Unsupported(t) => GgufError::UnsupportedType {
            tensor: tensor.to_string(),
            ggml_type: t.to_string(),
        },
        source => GgufError::Dequant {
            tensor: tensor.to_string(),
            source,
        },
    })
}

/// Everything before the data section.
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        let mut cur = Cursor::new(bytes);
        let magic: [u8; 4] = cur.array("magic")?;
        if &magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = cur.u32("version")?;
        // Version 1 used 32-bit counts and lengths; nothing current writes it.
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let tensor_count = cur.u64("tensor count")?;
        let kv_count = cur.u64("metadata count")?;

        // Smallest key/value: 8-byte key length, 4-byte type, 1-byte value.
        let kv_count = cur.check_count(kv_count, 13, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cur.utf8_string("metadata key")?;
            let value_type = cur.u32("metadata value type")?;
            let value = value::read_value(&mut cur, value_type, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(FormatError::DuplicateKey(key));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                Some(a) => return Err(FormatError::BadAlignment(a)),
                None => return Err(FormatError::BadAlignment(0)),
            },
        };

        // Smallest tensor info: 8-byte name length, n_dims, type, offset.
        let tensor_count = cur.check_count(tensor_count, 24, "tensor")?;
        let mut tensors = Vec::with_capacity(tensor_count);
        let mut names = std::collections::HashSet::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = cur.utf8_string("tensor name")?;
            let n_dims = cur.u32("tensor dim count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(FormatError::BadDimCount { tensor: name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64("tensor dim")?);
            }
            let ggml_type = GgmlType(cur.u32("tensor type")?);
            let offset = cur.u64("tensor offset")?;
            if !names.insert(name.clone()) {
                return Err(FormatError::DuplicateTensor(name));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let header_end = cur.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            check_tensor(t, alignment, data_len)?;
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }
}

fn check_tensor(t: &GgufTensorInfo, alignment: u64, data_len: u64) -> Result<(), FormatError> {
    // The nonzero dims' product must fit, not only the whole product: an empty tensor of dims
    // [0, 2^63, 4] has 0 elements, yet a product taken in another order (the shape is
    // reversed) overflows (found by fuzzing).
    t.dims
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(|| FormatError::ElementOverflow {
            tensor: t.name.clone(),
            dims: t.dims.clone(),
        })?;
    let n = t.n_elements();
    if !t.offset.is_multiple_of(alignment) {
        return Err(FormatError::Misaligned {
            tensor: t.name.clone(),
            offset: t.offset,
            alignment,
        });
    }
    // Types we cannot dequantize are only rejected when read, so a file holding one is still
    // inspectable; their extent is unknown here.
    let Some(layout) = t.ggml_type.block_layout() else {
        return Ok(());
    };
    let block = layout.elements as u64;
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(block) {
        return Err(FormatError::PartialBlock {
            tensor: t.name.clone(),
            ggml_type: t.ggml_type,
            ne0,
            block,
        });
    }
    let size = (n / block).checked_mul(layout.bytes as u64);
    let end = size.and_then(|s| t.offset.checked_add(s));
    match end {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(FormatError::OutOfBounds {
            tensor: t.name.clone(),
            offset: t.offset,
            end: end.unwrap_or(u64::MAX),
            data_len,
        }),
    }
}

/// Little-endian reader over the file image that never reads past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let truncated = FormatError::Truncated {
            what,
            offset: self.pos as u64,
            needed: n,
            available: self.remaining(),
        };
        if n > self.remaining() {
            return Err(truncated);
        }
        let end = self.pos + n as usize;
        let slice = self.bytes.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Bounds `count` items of at least `min_size` bytes each by what is left of the file, so
    /// the caller can allocate for `count` safely.
    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<usize, FormatError> {
        let too_large = FormatError::CountTooLarge {
            what,
            count,
            available: self.remaining(),
        };
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() => usize::try_from(count).map_err(|_| too_large),
            _ => Err(too_large),
        }
    }

    fn raw_string(&mut self, what: &'static str) -> Result<&'a [u8], FormatError> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// For keys and tensor names, which must match exactly.
    fn utf8_string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let raw = self.raw_string(what)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| FormatError::BadUtf8 { what })
    }
}

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::range_file::RangeFile;
use super::{HostTensor, StoredTensor, WeightError, WeightSource, tensor_range};

/// safetensors' own limit on a header (`MAX_HEADER_SIZE`), which its reader enforces too.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors checkpoint: one `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`.
///
/// Shards are memory-mapped on first read, so a server that loads blocks 10..20 never maps
/// the shards holding only blocks 0..10. [`WeightSource::stored`] and
/// [`WeightSource::read_stored`] do not map at all: they read a shard's header and the bytes
/// asked for with positioned reads that bypass readahead (`weights::range_file`).
pub struct SafetensorsSource {
    /// Tensor name -> shard file.
    index: BTreeMap<String, PathBuf>,
    opened: Mutex<HashMap<PathBuf, Arc<Mmap>>>,
    headers: Mutex<HashMap<PathBuf, Arc<Header>>>,
}

/// A shard's header, read without mapping the shard.
#[derive(Debug)]
struct Header {
    file: RangeFile,
    /// File offset of the data section (8 + the header's length).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl Header {
    /// Reads and validates the header of `path` as safetensors' own reader does (offsets
    /// contiguous from 0, each tensor's length its dtype times its element count, the data
    /// section ending exactly at the end of the file), reading only the header's bytes.
    fn read(path: &Path) -> Result<Self, WeightError> {
        let bad = |reason: String| WeightError::BadSafetensors {
            path: path.to_path_buf(),
            reason,
        };
        let file = RangeFile::open(path)?;
        let mut len = [0u8; 8];
        file.read_exact_at(0, &mut len)
            .map_err(|_| bad(format!("{} bytes is too short for a header", file.len())))?;
        let header_len = u64::from_le_bytes(len);
        let data_start = header_len
            .checked_add(8)
            .filter(|&end| header_len <= MAX_HEADER_BYTES && end <= file.len())
            .ok_or_else(|| bad(format!("a header of {header_len} bytes in a file of {}", file.len())))?;
        // Bounded by the cap and by the file's size just checked, so the allocation is too.
        let mut text = vec![0u8; header_len as usize];
        file.read_exact_at(8, &mut text)?;
        let text = std::str::from_utf8(&text).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
        let metadata: Metadata = serde_json::from_str(text).map_err(|e| bad(format!("header: {e}")))?;
        let tensors: HashMap<String, TensorInfo> =
            metadata.tensors().into_iter().map(|(n, t)| (n, t.clone())).collect();
        let data_len = tensors.values().map(|t| t.data_offsets.1 as u64).max().unwrap_or(0);
        if data_start.checked_add(data_len) != Some(file.len()) {
            return Err(bad(format!(
                "the header describes {data_len} bytes of data, the file holds {}",
                file.len() - data_start
            )));
        }
        Ok(Self {
            file,
            data_start,
            tensors,
        })
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, WeightError> {
        self.tensors.get(name).ok_or_else(|| WeightError::BadIndex {
            path: self.file.path().to_path_buf(),
            reason: format!("the index puts `{name}` in this shard, but it is not there"),
        })
    }
}

/// safetensors names its dtypes as its enum's variants (`F32`, `BF16`, ...).
fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

impl SafetensorsSource {
    /// Opens the checkpoint in an HF model folder.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightError> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            return Self::open_index(&index_path);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_file(&single);
        }
        Err(WeightError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        })
    }

    /// Opens one safetensors file; its header (which names its tensors) is read now, its data
    /// is mapped on first read.
    pub fn open_file(path: &Path) -> Result<Self, WeightError> {
        let header = Header::read(path)?;
        let index = header
            .tensors
            .keys()
            .map(|name| (name.clone(), path.to_path_buf()))
            .collect();
        Ok(Self {
            index,
            opened: Mutex::new(HashMap::new()),
            headers: Mutex::new(HashMap::from([(path.to_path_buf(), Arc::new(header))])),
        })
    }

    /// Opens a sharded checkpoint from its index; no shard is opened yet.
    pub fn open_index(index_path: &Path) -> Result<Self, WeightError> {
        let bad = |reason: String| WeightError::BadIndex {
            path: index_path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(index_path).map_err(|source| WeightError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut index = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("shard of `{name}` is not a string")))?;
            if !is_shard_name(file) {
                return Err(bad(format!("shard name `{file}` is not a file name")));
            }
            index.insert(name.clone(), dir.join(file));
        }
        Ok(Self {
            index,
            opened: Mutex::new(HashMap::new()),
            headers: Mutex::new(HashMap::new()),
        })
    }

    /// Shard files mapped so far (for checking that a span opens only what it needs).
    pub fn opened_files(&self) -> BTreeSet<PathBuf> {
        self.lock().keys().cloned().collect()
    }

    /// The shard files that hold the given tensors.
    pub fn files_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeSet<PathBuf> {
        names.into_iter().filter_map(|n| self.index.get(n).cloned()).collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<Mmap>>> {
        // A panic while holding this lock cannot leave the map half-updated: recover.
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_path(&self, name: &str) -> Result<&PathBuf, WeightError> {
        self.index
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string() })
    }

    /// The header of the shard holding `name`, read once per shard.
    fn header(&self, name: &str) -> Result<Arc<Header>, WeightError> {
        let path = self.shard_path(name)?;
        // As `lock`: an insert is the only update.
        let mut headers = self.headers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = headers.get(path) {
            return Ok(h.clone());
        }
        let header = Arc::new(Header::read(path)?);
        headers.insert(path.clone(), header.clone());
        Ok(header)
    }

    fn shard(&self, path: &Path) -> Result<Arc<Mmap>, WeightError> {
        let mut opened = self.lock();
        if let Some(m) = opened.get(path) {
            return Ok(m.clone());
        }
        let mmap = Arc::new(map(path)?);
        opened.insert(path.to_path_buf(), mmap.clone());
        tracing::debug!(shard = %path.display(), "opened shard");
        Ok(mmap)
    }
}

/// A shard name is one plain file name: anything else could reach outside the model folder.
/// The empty name joins to the folder itself, whose parent is outside it (found by fuzzing);
/// `:` makes a Windows drive-relative path or an alternate data stream.
fn is_shard_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    let single = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(c)), None) if c == OsStr::new(name)
    );
    single && !name.starts_with('.') && !name.contains(['/', '\\', ':', '\0'])
}

fn map(path: &Path) -> Result<Mmap, WeightError> {
    let io = |source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; checkpoints are not modified while a process serves them
    // (the same contract as every safetensors loader).
    #[allow(unsafe_code)]
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    Ok(mmap)
}

impl WeightSource for SafetensorsSource {
    fn names(&self) -> BTreeSet<String> {
        self.index.keys().cloned().collect()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        let path = self.shard_path(name)?;
        let mmap = self.shard(path)?;
        let tensors = SafeTensors::deserialize(&mmap[..]).map_err(|e| WeightError::BadSafetensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let view = tensors.tensor(name).map_err(|_| WeightError::BadIndex {
            path: path.clone(),
            reason: format!("the index puts `{name}` in this shard, but it is not there"),
        })?;
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightError::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(HostTensor::new(shape, data))
    }

    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        let header = self.header(name)?;
        let info = header.info(name)?;
        let (start, end) = info.data_offsets;
        Ok(StoredTensor {
            dtype: dtype_name(info.dtype),
            shape: info.shape.clone(),
            // Validated when the header was read: `start <= end`.
            byte_len: (end - start) as u64,
        })
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let header = self.header(name)?;
        let (start, end) = header.info(name)?.data_offsets;
        let range = tensor_range(name, offset, buf.len(), (end - start) as u64)?;
        // Every tensor lies inside the file (checked with the header), so this cannot overflow;
        // checked all the same, and the read checks it against the file's size again.
        let at = header
            .data_start
            .checked_add(start as u64)
            .and_then(|a| a.checked_add(range.start as u64))
            .ok_or_else(|| WeightError::OutOfRange {
                name: name.to_string(),
                offset,
                len: buf.len() as u64,
                byte_len: (end - start) as u64,
            })?;
        header.file.read_exact_at(at, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_stay_in_the_model_folder() {
        for good in ["model-00001-of-00002.safetensors", "model.safetensors", "a b"] {
            assert!(is_shard_name(good), "{good}");
        }
        for bad in [
            "", ".", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "C:x", "C:", "a\0b", "x/",
        ] {
            assert!(!is_shard_name(bad), "{bad:?}");
        }
    }

    /// Found by the `safetensors` fuzz target: an empty shard name made the folder itself a
    /// shard, and every file it named lay outside the folder.
    #[test]
    fn an_index_naming_no_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("corolla-shard-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let index = dir.join("model.safetensors.index.json");
        for name in ["", "..", "sub/x.safetensors", "C:x.safetensors"] {
            let json = serde_json::json!({"weight_map": {"w": name}});
            std::fs::write(&index, json.to_string()).expect("write the index");
            let err = SafetensorsSource::open_index(&index).err();
            assert!(matches!(err, Some(WeightError::BadIndex { .. })), "{name:?}: {err:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

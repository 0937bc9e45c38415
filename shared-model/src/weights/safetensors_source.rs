use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::range_file::RangeFile;
use super::{HostTensor, StoredRange, StoredTensor, WeightError, WeightSource, tensor_range};

/// safetensors' own limit on a header (`MAX_HEADER_SIZE`), which its reader enforces too.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Random access to one shard's bytes, without holding it whole: a local file read by
/// positioned reads, or (`hub`) a remote file read by HTTP range requests.
pub trait ShardBytes: Send + Sync + std::fmt::Debug {
    /// Where the bytes are, for errors.
    fn path(&self) -> &Path;
    /// The shard's size in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`; a range past the end is an
    /// error, not a short read.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WeightError>;
    /// A hint that these `(offset, len)` ranges are read next, so a remote shard can fetch them
    /// at once rather than one round trip each.
    fn prefetch(&self, _ranges: &[(u64, u64)]) -> Result<(), WeightError> {
        Ok(())
    }
}

impl ShardBytes for RangeFile {
    fn path(&self) -> &Path {
        RangeFile::path(self)
    }
    fn len(&self) -> u64 {
        RangeFile::len(self)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        RangeFile::read_exact_at(self, offset, buf)
    }
}

/// Where a checkpoint's shard files are: a model folder, or (`hub`) a Hub repository whose
/// shards are downloaded only when a tensor of theirs is read.
pub trait ShardStore: Send + Sync {
    /// The shard's local path, where it is or will be once fetched.
    fn location(&self, shard: &str) -> PathBuf;
    /// Random access to the shard without fetching it whole (headers, fingerprint samples).
    fn bytes(&self, shard: &str) -> Result<Arc<dyn ShardBytes>, WeightError>;
    /// The shard as a local file, fetched (and checked) first if it is not here yet.
    fn fetch(&self, shard: &str) -> Result<PathBuf, WeightError>;
}

/// Shards that are files of one folder.
struct LocalDir(PathBuf);

impl ShardStore for LocalDir {
    fn location(&self, shard: &str) -> PathBuf {
        self.0.join(shard)
    }
    fn bytes(&self, shard: &str) -> Result<Arc<dyn ShardBytes>, WeightError> {
        Ok(Arc::new(RangeFile::open(&self.location(shard))?))
    }
    fn fetch(&self, shard: &str) -> Result<PathBuf, WeightError> {
        Ok(self.location(shard))
    }
}

/// A safetensors checkpoint: one `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`.
///
/// Shards are memory-mapped on first read, so a server that loads blocks 10..20 never maps
/// (nor, from the Hub, downloads) the shards holding only blocks 0..10.
/// [`WeightSource::stored`] and [`WeightSource::read_stored`] do not map at all: they read a
/// shard's header and the bytes asked for through [`ShardBytes`] (positioned reads that bypass
/// readahead, `weights::range_file`, or HTTP ranges).
pub struct SafetensorsSource {
    /// Tensor name -> shard file name.
    index: BTreeMap<String, String>,
    store: Arc<dyn ShardStore>,
    opened: Mutex<HashMap<PathBuf, Arc<Mmap>>>,
    headers: Mutex<HashMap<String, Arc<Header>>>,
}

/// A shard's header, read without mapping the shard.
#[derive(Debug)]
struct Header {
    file: Arc<dyn ShardBytes>,
    /// File offset of the data section (8 + the header's length).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl Header {
    /// Reads and validates the header of `path` as safetensors' own reader does (offsets
    /// contiguous from 0, each tensor's length its dtype times its element count, the data
    /// section ending exactly at the end of the file), reading only the header's bytes.
    fn read(file: Arc<dyn ShardBytes>) -> Result<Self, WeightError> {
        let path = file.path().to_path_buf();
        let bad = |reason: String| WeightError::BadSafetensors {
            path: path.clone(),
            reason,
        };
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
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => (dir, name.to_string_lossy().into_owned()),
            _ => {
                return Err(WeightError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
                });
            }
        };
        Self::single(&name, Arc::new(LocalDir(dir.to_path_buf())))
    }

    /// A checkpoint of one shard, `shard` of `store`; its header is read now.
    pub fn single(shard: &str, store: Arc<dyn ShardStore>) -> Result<Self, WeightError> {
        let header = Header::read(store.bytes(shard)?)?;
        let index = header
            .tensors
            .keys()
            .map(|name| (name.clone(), shard.to_string()))
            .collect();
        Ok(Self {
            index,
            store,
            opened: Mutex::new(HashMap::new()),
            headers: Mutex::new(HashMap::from([(shard.to_string(), Arc::new(header))])),
        })
    }

    /// Opens a sharded checkpoint from its index; no shard is opened yet.
    pub fn open_index(index_path: &Path) -> Result<Self, WeightError> {
        let dir = index_path.parent().unwrap_or(Path::new("."));
        Self::from_index(index_path, Arc::new(LocalDir(dir.to_path_buf())))
    }

    /// A sharded checkpoint whose index is the file at `index_path` and whose shards are in
    /// `store`; no shard is opened yet.
    pub fn from_index(index_path: &Path, store: Arc<dyn ShardStore>) -> Result<Self, WeightError> {
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
        let mut index = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("shard of `{name}` is not a string")))?;
            if !is_shard_name(file) {
                return Err(bad(format!("shard name `{file}` is not a file name")));
            }
            index.insert(name.clone(), file.to_string());
        }
        Ok(Self {
            index,
            store,
            opened: Mutex::new(HashMap::new()),
            headers: Mutex::new(HashMap::new()),
        })
    }

    /// The shard file names that hold the given tensors.
    pub fn shards_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        names.into_iter().filter_map(|n| self.index.get(n).cloned()).collect()
    }

    /// Shard files mapped so far (for checking that a span opens only what it needs).
    pub fn opened_files(&self) -> BTreeSet<PathBuf> {
        self.lock().keys().cloned().collect()
    }

    /// The shard files that hold the given tensors.
    pub fn files_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeSet<PathBuf> {
        self.shards_for(names).iter().map(|s| self.store.location(s)).collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<Mmap>>> {
        // A panic while holding this lock cannot leave the map half-updated: recover.
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_name(&self, name: &str) -> Result<&str, WeightError> {
        self.index
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| WeightError::Missing { name: name.to_string() })
    }

    /// The header of the shard holding `name`, read once per shard.
    fn header(&self, name: &str) -> Result<Arc<Header>, WeightError> {
        let shard = self.shard_name(name)?;
        // As `lock`: an insert is the only update.
        let mut headers = self.headers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = headers.get(shard) {
            return Ok(h.clone());
        }
        let header = Arc::new(Header::read(self.store.bytes(shard)?)?);
        headers.insert(shard.to_string(), header.clone());
        Ok(header)
    }

    /// The shard holding `name`, fetched if it is remote and mapped once; the path is for errors.
    fn shard(&self, name: &str) -> Result<(PathBuf, Arc<Mmap>), WeightError> {
        let shard = self.shard_name(name)?;
        let location = self.store.location(shard);
        if let Some(m) = self.lock().get(&location) {
            return Ok((location, m.clone()));
        }
        // Outside the lock: a download takes long, and other shards may be read meanwhile.
        let path = self.store.fetch(shard)?;
        let mut opened = self.lock();
        if let Some(m) = opened.get(&location) {
            return Ok((location, m.clone()));
        }
        let mmap = Arc::new(map(&path)?);
        opened.insert(location.clone(), mmap.clone());
        tracing::debug!(shard = %path.display(), "opened shard");
        Ok((location, mmap))
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
        let (path, mmap) = self.shard(name)?;
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

    fn fetch_tensors(&self, names: &[String]) -> Result<(), WeightError> {
        for shard in self.shards_for(names.iter().map(String::as_str)) {
            self.store.fetch(&shard)?;
        }
        Ok(())
    }

    fn prefetch_stored(&self, ranges: &[StoredRange]) -> Result<(), WeightError> {
        // Per shard: its header, and the file ranges asked of it.
        type Asked = (Arc<Header>, Vec<(u64, u64)>);
        let mut by_shard: BTreeMap<&str, Asked> = BTreeMap::new();
        for r in ranges {
            let shard = self.shard_name(&r.name)?;
            if !by_shard.contains_key(shard) {
                by_shard.insert(shard, (self.header(&r.name)?, Vec::new()));
            }
            if let Some((header, list)) = by_shard.get_mut(shard) {
                let (start, _) = header.info(&r.name)?.data_offsets;
                // A hint only: a range that overflows is left for the read to refuse.
                if let Some(at) = header
                    .data_start
                    .checked_add(start as u64)
                    .and_then(|a| a.checked_add(r.offset))
                {
                    list.push((at, r.len));
                }
            }
        }
        for (header, list) in by_shard.values() {
            header.file.prefetch(list)?;
        }
        Ok(())
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{HostTensor, WeightError, WeightSource};

/// A safetensors checkpoint: one `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`.
///
/// Shards are memory-mapped on first use, so a server that loads blocks 10..20 never opens
/// the shards holding only blocks 0..10.
pub struct SafetensorsSource {
    /// Tensor name -> shard file.
    index: BTreeMap<String, PathBuf>,
    opened: Mutex<HashMap<PathBuf, Arc<Mmap>>>,
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

    /// Opens one safetensors file (it is mapped now, since its header names its tensors).
    pub fn open_file(path: &Path) -> Result<Self, WeightError> {
        let mmap = map(path)?;
        let (_, metadata) = SafeTensors::read_metadata(&mmap[..]).map_err(|e| WeightError::BadSafetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let index = metadata
            .tensors()
            .into_keys()
            .map(|name| (name, path.to_path_buf()))
            .collect();
        let opened = HashMap::from([(path.to_path_buf(), Arc::new(mmap))]);
        Ok(Self {
            index,
            opened: Mutex::new(opened),
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
        })
    }

    /// Shard files opened so far (for checking that a span opens only what it needs).
    pub fn opened_files(&self) -> BTreeSet<PathBuf> {
        self.lock().keys().cloned().collect()
    }

    /// The shard files that hold the given tensors.
    pub fn files_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> BTreeSet<PathBuf> {
        names.into_iter().filter_map(|n| self.index.get(n).cloned()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<Mmap>>> {
        // A panic while holding this lock cannot leave the map half-updated: recover.
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
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
        let path = self
            .index
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string() })?;
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

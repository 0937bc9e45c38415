//! Writing a bundle to a file one tensor at a time: a 70B model's embeddings and head are
//! gigabytes in f32, and building the whole file in memory first (then serializing it, a
//! second copy) would take twice that at every server start.
//!
//! safetensors puts the header, with every tensor's offsets, before the data, and a tensor's
//! stored size is known only once it is read (whether it stays quantized, say). So the tensors
//! go to a spool file first, one at a time, and the bundle is the header followed by the
//! spool's bytes: peak memory is the largest tensor, at the price of writing the data twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};

use super::{
    BundleError, BundleMeta, BundleTensor, QUANT_PREFIX, TensorData, bundle_metadata, client_tensor_names,
    read_client_tensor,
};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::weights::WeightSource;

/// f32 values converted to bytes this many at a time on their way to the file.
const F32_CHUNK: usize = 1 << 16;

/// Writes the bundle of a model to `path` (created or truncated) and returns its length in
/// bytes. The file equals [`super::write_bundle`]'s bytes in content (so in
/// [`super::digest`]), not necessarily byte for byte: safetensors' metadata map has no order.
pub fn write_bundle_file(
    meta: &BundleMeta<'_>,
    config: &ModelConfig,
    source: &dyn WeightSource,
    path: &Path,
) -> Result<u64, ModelError> {
    let (spool, spool_file) = Spool::create(path)?;
    let mut metadata = bundle_metadata(meta)?;
    let mut infos = Vec::new();
    let mut writer = BufWriter::new(spool_file);
    let mut offset = 0usize;
    for name in client_tensor_names(config, source) {
        let tensor = read_client_tensor(source, name)?;
        write_tensor(&mut writer, &tensor).map_err(|e| spool.io(e))?;
        let end = offset + tensor.byte_len();
        if let Some(value) = &tensor.quant {
            metadata.insert(format!("{QUANT_PREFIX}{}", tensor.name), value.clone());
        }
        infos.push((
            tensor.name,
            TensorInfo {
                dtype: tensor.dtype,
                shape: tensor.shape,
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    // Closed before it is read back (and before the spool is removed, which Windows refuses
    // for an open file).
    drop(writer.into_inner().map_err(|e| spool.io(e.into_error()))?);

    let header =
        Metadata::new(Some(metadata), infos).map_err(|e| ModelError::Invalid(format!("bundle header: {e}")))?;
    let mut text = serde_json::to_vec(&header).map_err(|e| ModelError::Invalid(format!("bundle header: {e}")))?;
    // As safetensors writes it: the data starts 8-aligned, the header padded with spaces.
    text.resize(text.len().next_multiple_of(8), b' ');

    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(File::create(path).map_err(io)?);
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&text).map_err(io)?;
    let mut data = File::open(&spool.path).map_err(|e| spool.io(e))?;
    std::io::copy(&mut data, &mut out).map_err(io)?;
    let out = out.into_inner().map_err(|e| io(e.into_error()))?;
    out.sync_all().map_err(io)?;
    Ok(out.metadata().map_err(io)?.len())
}

fn write_tensor(writer: &mut impl Write, tensor: &BundleTensor) -> std::io::Result<()> {
    match &tensor.data {
        TensorData::Raw(bytes) => writer.write_all(bytes),
        TensorData::F32(values) => {
            let mut bytes = Vec::with_capacity(F32_CHUNK * 4);
            for chunk in values.chunks(F32_CHUNK) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                writer.write_all(&bytes)?;
            }
            Ok(())
        }
    }
}

/// The tensors' data on its way into the bundle, removed when done (or failed).
struct Spool {
    path: PathBuf,
}

impl Spool {
    fn create(bundle: &Path) -> Result<(Self, File), BundleError> {
        let mut name = bundle.file_name().unwrap_or_default().to_os_string();
        name.push(".spool");
        let path = bundle.with_file_name(name);
        let file = File::create(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        Ok((Self { path }, file))
    }

    fn io(&self, source: std::io::Error) -> BundleError {
        BundleError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Nothing to report: a spool left behind is garbage in a cache folder.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A key for a bundle written before: a hash of everything that decides its content but the
/// tensors' bytes (the text parts, how each client tensor is stored, and `variant`, what the
/// server does to the weights on load, such as quantizing them), so a server can reuse the
/// file it wrote at its last start without reading a tensor. The tensors' bytes are covered
/// by the model's fingerprint, which is among the text parts.
pub fn bundle_recipe(
    meta: &BundleMeta<'_>,
    config: &ModelConfig,
    source: &dyn WeightSource,
    variant: &str,
) -> Result<String, ModelError> {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    let mut put = |part: &[u8]| {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    };
    put(b"corolla-bundle-recipe/1");
    put(super::BUNDLE_FORMAT.as_bytes());
    put(variant.as_bytes());
    let metadata: std::collections::BTreeMap<String, String> = bundle_metadata(meta)?.into_iter().collect();
    for (key, value) in &metadata {
        put(key.as_bytes());
        put(value.as_bytes());
    }
    for name in client_tensor_names(config, source) {
        let stored = source.stored(&name)?;
        put(name.as_bytes());
        put(stored.dtype.as_bytes());
        put(format!("{:?}", stored.shape).as_bytes());
        put(&stored.byte_len.to_le_bytes());
    }
    Ok(super::digest::hex(hasher))
}

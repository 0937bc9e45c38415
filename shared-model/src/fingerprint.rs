//! Model fingerprints: servers and clients of different checkpoints never mix.
//!
//! The fingerprint is the model's id in the swarm (`corolla/model/<fingerprint>` in the DHT,
//! the `model` of every request): the first 16 bytes, as 32 hex digits, of
//!
//! ```text
//! sha256("corolla-fingerprint/2\n" || validated config || tensor count
//!        || for each tensor in name order:
//!           name || stored dtype || shape || byte length || sampled stored bytes)
//! ```
//!
//! (strings and the config prefixed by their length, numbers as little-endian u64). The bytes
//! are the tensor's as stored (bf16 as bf16, GGUF blocks as blocks), read with
//! [`WeightSource::read_stored`]: nothing is dequantized and only the sampled bytes are read
//! from storage, so a server of 2 blocks of an 80-block checkpoint does not read the other 78
//! to learn the model's name.
//!
//! # Sample
//!
//! A tensor of up to [`CHUNKS`] x [`CHUNK_BYTES`] (4 KiB) is hashed whole; a larger one by
//! [`CHUNKS`] chunks of [`CHUNK_BYTES`] evenly spaced over its bytes, the first at its start
//! and the last ending at its end. Offsets count from the tensor's first byte, so one
//! checkpoint gives one fingerprint sharded or in a single file. At most 4 KiB a tensor is
//! hashed; the reads touch at most two pages a chunk (a Llama-70B checkpoint's 723 tensors:
//! under 3 MiB hashed, under 50 MiB read of its 140 GB).
//!
//! # What it tells apart
//!
//! Another config, another set of tensor names, dtypes or shapes (an f32 and a bf16 copy of one
//! model, a GGUF and its safetensors source), and weights that differ in a sampled byte. A
//! fine-tune changes nearly every weight of every tensor it trains, so it gets another
//! fingerprint; a change outside the samples (one weight edited by hand) does not. The
//! fingerprint separates checkpoints, it does not authenticate them. `--quant` on a server
//! leaves it as it is: the stored bytes are the checkpoint's.
//!
//! The version tag changes whenever what is hashed does, so fingerprints of two schemes never
//! coincide (version 1 hashed sampled f32 values of every tensor, read whole).

use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::weights::{StoredRange, WeightError, WeightSource};

/// Hashed first: bumped whenever the hashed input changes.
pub const VERSION_TAG: &str = "corolla-fingerprint/2\n";
/// Chunks sampled from a tensor larger than `CHUNKS * CHUNK_BYTES`.
pub const CHUNKS: u64 = 8;
/// Bytes in a chunk: small enough that most chunks lie in one 4 KiB page.
pub const CHUNK_BYTES: u64 = 512;

/// Hex fingerprint of a checkpoint (first 16 bytes of the sha256, as 32 hex digits).
pub fn fingerprint(config: &ModelConfig, source: &dyn WeightSource) -> Result<String, WeightError> {
    let mut hasher = Sha256::new();
    hasher.update(VERSION_TAG.as_bytes());
    put_str(&mut hasher, &format!("{config:?}"));
    let names = source.names();
    hasher.update((names.len() as u64).to_le_bytes());
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        tensors.push((name, source.stored(name)?));
    }
    // Every range is known before any is read: a remote checkpoint fetches them together.
    let ranges: Vec<StoredRange> = tensors
        .iter()
        .flat_map(|(name, stored)| {
            sample(stored.byte_len).into_iter().map(|(offset, len)| StoredRange {
                name: (*name).clone(),
                offset,
                len,
            })
        })
        .collect();
    source.prefetch_stored(&ranges)?;
    let mut buf = Vec::new();
    for (name, stored) in &tensors {
        put_str(&mut hasher, name);
        put_str(&mut hasher, &stored.dtype);
        hasher.update((stored.shape.len() as u64).to_le_bytes());
        for d in &stored.shape {
            hasher.update((*d as u64).to_le_bytes());
        }
        hasher.update(stored.byte_len.to_le_bytes());
        for (offset, len) in sample(stored.byte_len) {
            // At most 4 KiB (see `sample`).
            buf.resize(len as usize, 0);
            source.read_stored(name, offset, &mut buf)?;
            hasher.update(&buf);
        }
    }
    Ok(hasher.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect())
}

fn put_str(hasher: &mut Sha256, s: &str) {
    hasher.update((s.len() as u64).to_le_bytes());
    hasher.update(s.as_bytes());
}

/// The `(offset, length)` byte ranges hashed of a tensor of `byte_len` bytes: the whole tensor
/// when it is at most `CHUNKS * CHUNK_BYTES`, else `CHUNKS` chunks evenly spaced from its
/// first byte to its last.
pub fn sample(byte_len: u64) -> Vec<(u64, u64)> {
    if byte_len <= CHUNKS * CHUNK_BYTES {
        return if byte_len == 0 { vec![] } else { vec![(0, byte_len)] };
    }
    let span = byte_len - CHUNK_BYTES;
    (0..CHUNKS)
        // In u128: `i * span` overflows u64 for tensors past 2^61 bytes.
        .map(|i| ((i as u128 * span as u128 / (CHUNKS - 1) as u128) as u64, CHUNK_BYTES))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_small_tensors_and_spread_over_large_ones() {
        assert!(sample(0).is_empty());
        assert_eq!(sample(10), vec![(0, 10)]);
        assert_eq!(sample(4096), vec![(0, 4096)]);
        let chunks = sample(1 << 20);
        assert_eq!(chunks.len(), CHUNKS as usize);
        assert_eq!(chunks.first(), Some(&(0, CHUNK_BYTES)));
        assert_eq!(chunks.last(), Some(&((1 << 20) - CHUNK_BYTES, CHUNK_BYTES)));
        assert!(chunks.windows(2).all(|w| w[0].0 + CHUNK_BYTES <= w[1].0));
        // Overlapping chunks just past the threshold, still inside the tensor.
        let chunks = sample(4097);
        assert!(chunks.iter().all(|&(o, l)| o + l <= 4097));
        let huge = sample(u64::MAX);
        assert_eq!(huge.last(), Some(&(u64::MAX - CHUNK_BYTES, CHUNK_BYTES)));
    }
}

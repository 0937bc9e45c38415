//! The content digest of a client bundle: what a server's signed DHT record promises, and what
//! a client checks a download against before it uses or caches it.
//!
//! It hashes the bundle's content in a canonical form, not the file's bytes: safetensors
//! writes its metadata map in a `HashMap`'s order, so two servers of one checkpoint write
//! different files with the same content, and a digest of the bytes would make every server's
//! bundle look like another model's. The form, hashed with sha256 (every count and length a
//! little-endian u64 before what it counts):
//!
//! ```text
//! "corolla-bundle-digest/1\n"
//! number of metadata entries, then each (key, value), in key order
//! number of tensors, then for each tensor in name order:
//!     name, dtype (as the header spells it), rank, each dimension, data bytes
//! ```
//!
//! That is everything a client reads from a bundle; what it leaves out (the header's JSON
//! layout and padding, the order of entries) a client never reads. Lengths before every part
//! keep two different bundles from hashing the same concatenation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::Metadata;
use sha2::{Digest, Sha256};

use super::BundleError;

/// A digest as text: sha256, 64 lowercase hex digits.
pub const DIGEST_HEX_LEN: usize = 64;

/// Bumped if the canonical form above changes (old and new digests then never compare equal).
const DOMAIN: &[u8] = b"corolla-bundle-digest/1\n";

/// Bytes of the safetensors length prefix before the header.
const PREFIX: usize = 8;

/// Tensor bytes are hashed this many at a time (the hash is the same either way). In a
/// browser it makes the page's check 10x faster: V8 first runs WASM code unoptimised and only
/// switches a function to its optimised build at its next call, so one `update` over a 100 MB
/// tensor ran entirely at the baseline's ~20 MB/s, where 1 MiB pieces run at ~250 MB/s.
const PIECE: usize = 1 << 20;

/// The largest header a bundle file may have (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The canonical content digest of a bundle file (full or meta), as 64 hex digits. Fails only
/// on bytes that are not a valid safetensors file.
pub fn digest(bytes: &[u8]) -> Result<String, BundleError> {
    let (header_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| BundleError::Format(format!("bad safetensors: {e}")))?;
    // `read_metadata` has checked that the header and every tensor's offsets lie inside
    // `bytes`; the `get`s below fail rather than panic should that ever change.
    let data = PREFIX
        .checked_add(header_len)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| BundleError::Format("header past the end of the file".into()))?;
    digest_of(&header, |name, (start, end), hasher| {
        let bytes = data
            .get(start..end)
            .ok_or_else(|| BundleError::Format(format!("tensor {name} lies outside the file")))?;
        for piece in bytes.chunks(PIECE) {
            hasher.update(piece);
        }
        Ok(())
    })
}

/// [`digest`] of a bundle file on disk, and its length, reading it piece by piece: a bundle
/// of a 70B model's embeddings and head is gigabytes, which need not be in memory at once.
pub fn digest_file(path: &Path) -> Result<(String, u64), BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format = |reason: String| BundleError::Format(format!("{}: {reason}", path.display()));
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; PREFIX];
    file.read_exact(&mut prefix).map_err(io)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER || PREFIX as u64 + header_len > len {
        return Err(format(format!("a header of {header_len} bytes in a file of {len}")));
    }
    let mut text = vec![0u8; header_len as usize];
    file.read_exact(&mut text).map_err(io)?;
    // Deserializing checks that the tensors' offsets follow each other and match their shapes.
    let header: Metadata = serde_json::from_slice(&text).map_err(|e| format(format!("bad safetensors header: {e}")))?;
    let data_start = PREFIX as u64 + header_len;
    let data_len = header
        .tensors()
        .values()
        .map(|info| info.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    if data_start.checked_add(data_len) != Some(len) {
        return Err(format(format!(
            "the header describes {data_len} bytes of data, the file holds {}",
            len - data_start
        )));
    }
    let mut piece = vec![0u8; PIECE];
    let digest = digest_of(&header, |_, (start, end), hasher| {
        file.seek(SeekFrom::Start(data_start + start as u64)).map_err(io)?;
        let mut left = end - start;
        while left > 0 {
            let n = left.min(PIECE);
            file.read_exact(&mut piece[..n]).map_err(io)?;
            hasher.update(&piece[..n]);
            left -= n;
        }
        Ok(())
    })?;
    Ok((digest, len))
}

/// The canonical form's hash; `data` feeds the hasher a tensor's bytes, given its name and
/// its `data_offsets`.
fn digest_of(
    header: &Metadata,
    mut data: impl FnMut(&str, (usize, usize), &mut Sha256) -> Result<(), BundleError>,
) -> Result<String, BundleError> {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    let put = |hasher: &mut Sha256, part: &[u8]| {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    };

    let metadata: BTreeMap<&String, &String> = header.metadata().iter().flatten().collect();
    hasher.update((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put(&mut hasher, key.as_bytes());
        put(&mut hasher, value.as_bytes());
    }

    let tensors: BTreeMap<String, _> = header.tensors().into_iter().collect();
    hasher.update((tensors.len() as u64).to_le_bytes());
    for (name, info) in tensors {
        put(&mut hasher, name.as_bytes());
        // Debug spells a dtype as the header does ("F32", "U8").
        put(&mut hasher, format!("{:?}", info.dtype).as_bytes());
        hasher.update((info.shape.len() as u64).to_le_bytes());
        for &d in &info.shape {
            hasher.update((d as u64).to_le_bytes());
        }
        let (start, end) = info.data_offsets;
        let len = end
            .checked_sub(start)
            .ok_or_else(|| BundleError::Format(format!("tensor {name} ends before it starts")))?;
        hasher.update((len as u64).to_le_bytes());
        data(&name, (start, end), &mut hasher)?;
    }
    Ok(hex(hasher))
}

/// A finished sha256 as lowercase hex, as digests and recipes are written.
pub(super) fn hex(hasher: Sha256) -> String {
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` has a digest's form (64 lowercase hex digits), as a record must carry it.
pub fn is_digest(text: &str) -> bool {
    text.len() == DIGEST_HEX_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    use super::*;

    fn file(metadata: &[(&str, &str)], tensors: &[(&str, Vec<usize>, &[u8])]) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                let view = TensorView::new(Dtype::U8, shape.clone(), bytes).expect("view");
                (name.to_string(), view)
            })
            .collect();
        let metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        safetensors::serialize(views, Some(metadata)).expect("serialize")
    }

    #[test]
    fn the_digest_is_of_the_content_not_of_the_bytes() {
        let a = file(
            &[("a", "1"), ("b", "2")],
            &[("x", vec![2], b"ab"), ("y", vec![1], b"c")],
        );
        // The same content written with the header in another order.
        let n = u64::from_le_bytes(a[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&a[8..8 + n]).expect("header");
        let mut entries: Vec<(String, serde_json::Value)> =
            header.as_object().expect("object").clone().into_iter().collect();
        entries.reverse();
        let mut text = String::from("{");
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!("{}:{}", serde_json::Value::from(k.as_str()), v));
        }
        text.push('}');
        let mut b = (text.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(&a[8 + n..]);
        assert_ne!(a, b);
        let d = digest(&a).expect("digest");
        assert_eq!(d, digest(&b).expect("digest"));
        assert!(is_digest(&d), "{d}");

        // Any change of content changes it: a value, a key, a tensor byte, a shape, a name.
        for other in [
            file(
                &[("a", "1"), ("b", "3")],
                &[("x", vec![2], b"ab"), ("y", vec![1], b"c")],
            ),
            file(
                &[("a", "1"), ("c", "2")],
                &[("x", vec![2], b"ab"), ("y", vec![1], b"c")],
            ),
            file(
                &[("a", "1"), ("b", "2")],
                &[("x", vec![2], b"ab"), ("y", vec![1], b"d")],
            ),
            file(
                &[("a", "1"), ("b", "2")],
                &[("x", vec![1, 2], b"ab"), ("y", vec![1], b"c")],
            ),
            file(
                &[("a", "1"), ("b", "2")],
                &[("x", vec![2], b"ab"), ("z", vec![1], b"c")],
            ),
            // The same bytes split differently between key and value.
            file(
                &[("a", "1"), ("b2", "")],
                &[("x", vec![2], b"ab"), ("y", vec![1], b"c")],
            ),
        ] {
            assert_ne!(digest(&other).expect("digest"), d);
        }
        assert!(digest(b"not safetensors").is_err());
        assert!(digest(&a[..a.len() - 1]).is_err());
    }

    /// A fixed file's digest, pinned: the web app's WASM tests check the same value there, so
    /// the page and native clients agree (every length is hashed as a u64 on both).
    #[test]
    fn a_fixed_file_has_a_pinned_digest() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let bytes = file(&[("k", "v")], &[("t", vec![64, 64], &data)]);
        assert_eq!(digest(&bytes).expect("digest"), PINNED);
    }

    const PINNED: &str = "dc33e1783d7eebd1ca352459099cb1768bd9d8224bf03988759aca4a3877522e";

    #[test]
    fn digests_have_one_spelling() {
        assert!(is_digest(&"0a".repeat(32)));
        assert!(!is_digest(&"0A".repeat(32)));
        assert!(!is_digest(&"0a".repeat(31)));
        assert!(!is_digest(&"zz".repeat(32)));
    }
}

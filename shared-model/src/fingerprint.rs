//! Model fingerprints: servers and clients of different checkpoints never mix.
//!
//! `sha256(validated config || for each tensor in name order: name, shape, digest)`, where a
//! tensor's digest hashes its length and a sample of its values (all of them for tensors up to
//! 64 Ki elements, else 64 Ki evenly spaced ones). Two checkpoints with the same config and
//! tensor names but other weights (a fine-tune) get different fingerprints; computing it reads
//! only a sample of each tensor.

use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::weights::{WeightError, WeightSource};

const SAMPLES: usize = 1 << 16;

/// Hex fingerprint of a checkpoint (first 16 bytes of the sha256, as 32 hex digits).
pub fn fingerprint(config: &ModelConfig, source: &dyn WeightSource) -> Result<String, WeightError> {
    let mut hasher = Sha256::new();
    hasher.update(format!("{config:?}").as_bytes());
    for name in source.names() {
        let tensor = source.read(&name)?;
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        for d in &tensor.shape {
            hasher.update((*d as u64).to_le_bytes());
        }
        let n = tensor.data.len();
        hasher.update((n as u64).to_le_bytes());
        let stride = n.div_ceil(SAMPLES).max(1);
        for x in tensor.data.iter().step_by(stride) {
            hasher.update(x.to_le_bytes());
        }
    }
    Ok(hasher.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect())
}

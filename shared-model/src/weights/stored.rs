//! A tensor as its checkpoint stores it: element type, shape and bytes, before any conversion.
//!
//! What the model fingerprint hashes ([`crate::fingerprint`]): reading these bytes needs no
//! dequantisation and, through [`super::WeightSource::read_stored`], only the bytes asked for.

use std::ops::Range;

use super::WeightError;

/// How one tensor is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// The element type as the format names it: safetensors' `F32`, `F16`, `BF16`, ..., GGUF's
    /// `Q4_1`, `Q8_0`, ... (GGUF and safetensors share the names of the types they share).
    pub dtype: String,
    /// PyTorch dimension order, as [`super::WeightSource::read`] returns it.
    pub shape: Vec<usize>,
    /// Length of the stored data in bytes.
    pub byte_len: u64,
}

/// The bytes `offset..offset + len` of a tensor of `byte_len` bytes, as a range of `usize`, or
/// the error naming the tensor when any of it lies outside (or the sum overflows).
pub(crate) fn tensor_range(name: &str, offset: u64, len: usize, byte_len: u64) -> Result<Range<usize>, WeightError> {
    let out_of_range = || WeightError::OutOfRange {
        name: name.to_string(),
        offset,
        len: len as u64,
        byte_len,
    };
    let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > byte_len {
        return Err(out_of_range());
    }
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = usize::try_from(end).map_err(|_| out_of_range())?;
    Ok(start..end)
}

/// Copies `offset..offset + buf.len()` of an in-memory tensor's bytes into `buf`.
pub(crate) fn copy_range(name: &str, bytes: &[u8], offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
    let range = tensor_range(name, offset, buf.len(), bytes.len() as u64)?;
    buf.copy_from_slice(&bytes[range]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(tensor_range("t", 2, 3, 5).ok(), Some(2..5));
        assert_eq!(tensor_range("t", 5, 0, 5).ok(), Some(5..5));
        for (offset, len) in [(3, 3), (6, 0), (u64::MAX, 1)] {
            let err = tensor_range("t", offset, len, 5).err();
            assert!(
                matches!(err, Some(WeightError::OutOfRange { .. })),
                "{offset}+{len}: {err:?}"
            );
        }
        let mut buf = [0u8; 2];
        copy_range("t", &[1, 2, 3], 1, &mut buf).expect("in range");
        assert_eq!(buf, [2, 3]);
        assert!(copy_range("t", &[1, 2, 3], 2, &mut buf).is_err());
    }
}

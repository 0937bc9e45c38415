//! ggml tensor types and their conversion to f32.

use half::f16;

/// A ggml tensor type id, as stored in GGUF tensor infos. Unknown ids are kept (not rejected)
/// so that a file can be inspected even when some tensors cannot be dequantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// How many elements a block of a type holds and how many bytes it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub elements: usize,
    pub bytes: usize,
}

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type (`"Q4_K"`), or `None` for an id ggml does not define.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return None,
        })
    }

    /// Block layout of the types this crate can dequantize; `None` for all others.
    pub fn block_layout(self) -> Option<BlockLayout> {
        let (elements, bytes) = match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            // f16 scale + 32 x i8
            GgmlType::Q8_0 => (32, 34),
            // f16 scale + 16 bytes of nibbles
            GgmlType::Q4_0 => (32, 18),
            // f16 scale, f16 min + 16 bytes of nibbles
            GgmlType::Q4_1 => (32, 20),
            _ => return None,
        };
        Some(BlockLayout { elements, bytes })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

/// Why a buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("ggml type {0} is not supported")]
    Unsupported(GgmlType),
    #[error("{n} elements is not a whole number of {ggml_type} blocks of {block}")]
    PartialBlock {
        ggml_type: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("{n} {ggml_type} elements take {expected} bytes, got {actual}")]
    Length {
        ggml_type: GgmlType,
        n: usize,
        expected: usize,
        actual: usize,
    },
}

/// Converts `n` elements of `ggml_type` stored in `bytes` to f32, in storage order.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let layout = ggml_type.block_layout().ok_or(DequantError::Unsupported(ggml_type))?;
    if !n.is_multiple_of(layout.elements) {
        return Err(DequantError::PartialBlock {
            ggml_type,
            n,
            block: layout.elements,
        });
    }
    let expected = n / layout.elements * layout.bytes;
    if bytes.len() != expected {
        return Err(DequantError::Length {
            ggml_type,
            n,
            expected,
            actual: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(n);
    let blocks = bytes.chunks_exact(layout.bytes);
    match ggml_type {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| half_at(b, 0))),
        GgmlType::BF16 => out.extend(blocks.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))),
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = half_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = half_at(b, 0);
                let qs = &b[2..18];
                // Low nibbles hold elements 0..16 of the block, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (i32::from(q & 0x0f) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let d = half_at(b, 0);
                let m = half_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        // block_layout() returned Some only for the types handled above.
        _ => return Err(DequantError::Unsupported(ggml_type)),
    }
    Ok(out)
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

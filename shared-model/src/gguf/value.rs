//! GGUF metadata values.

use super::{Cursor, FormatError, MAX_ARRAY_NESTING};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. Arrays are homogeneous in GGUF, so each element type gets its own vector:
/// a 49k-entry vocabulary costs one `Vec<String>`, not 49k tagged values.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer type holding a value >= 0. Writers disagree on integer widths (u32 vs u64,
    /// signed vs unsigned), so getters go by value, not by stored type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x.into()),
            GgufValue::U16(x) => Some(x.into()),
            GgufValue::U32(x) => Some(x.into()),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(x) => Some(x.into()),
            GgufValue::U16(x) => Some(x.into()),
            GgufValue::U32(x) => Some(x.into()),
            GgufValue::U64(x) => i64::try_from(x).ok(),
            GgufValue::I8(x) => Some(x.into()),
            GgufValue::I16(x) => Some(x.into()),
            GgufValue::I32(x) => Some(x.into()),
            GgufValue::I64(x) => Some(x),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x.into()),
            GgufValue::F64(x) => Some(x),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer arrays as i64; `None` for non-integer arrays or u64 values beyond i64.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn widen<T: Copy + Into<i64>>(v: &[T]) -> Option<Vec<i64>> {
            Some(v.iter().map(|&x| x.into()).collect())
        }
        match self {
            GgufArray::U8(v) => widen(v),
            GgufArray::I8(v) => widen(v),
            GgufArray::U16(v) => widen(v),
            GgufArray::I16(v) => widen(v),
            GgufArray::U32(v) => widen(v),
            GgufArray::I32(v) => widen(v),
            GgufArray::I64(v) => Some(v.clone()),
            GgufArray::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect(),
            _ => None,
        }
    }
}

/// Smallest encoded size of one value of `value_type`, for bounding array counts.
fn min_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 => Some(8),
        // element type + count
        9 => Some(12),
        10..=12 => Some(8),
        _ => None,
    }
}

pub(super) fn read_value(
    cur: &mut Cursor<'_>,
    value_type: u32,
    key: &str,
    depth: usize,
) -> Result<GgufValue, FormatError> {
    const W: &str = "metadata value";
    Ok(match value_type {
        0 => GgufValue::U8(u8::from_le_bytes(cur.array(W)?)),
        1 => GgufValue::I8(i8::from_le_bytes(cur.array(W)?)),
        2 => GgufValue::U16(u16::from_le_bytes(cur.array(W)?)),
        3 => GgufValue::I16(i16::from_le_bytes(cur.array(W)?)),
        4 => GgufValue::U32(u32::from_le_bytes(cur.array(W)?)),
        5 => GgufValue::I32(i32::from_le_bytes(cur.array(W)?)),
        6 => GgufValue::F32(f32::from_le_bytes(cur.array(W)?)),
        // The spec says 0 or 1; like llama.cpp, read any non-zero byte as true.
        7 => GgufValue::Bool(u8::from_le_bytes(cur.array(W)?) != 0),
        8 => GgufValue::String(lossy_string(cur, key)?),
        9 => GgufValue::Array(read_array(cur, key, depth + 1)?),
        10 => GgufValue::U64(u64::from_le_bytes(cur.array(W)?)),
        11 => GgufValue::I64(i64::from_le_bytes(cur.array(W)?)),
        12 => GgufValue::F64(f64::from_le_bytes(cur.array(W)?)),
        _ => {
            return Err(FormatError::BadValueType {
                key: key.to_string(),
                value_type,
            });
        }
    })
}

/// String values (vocabulary entries above all) are read lossily: a stray invalid byte in one
/// token should not make the whole file unreadable.
fn lossy_string(cur: &mut Cursor<'_>, key: &str) -> Result<String, FormatError> {
    let raw = cur.raw_string("metadata string")?;
    Ok(match std::str::from_utf8(raw) {
        Ok(s) => s.to_string(),
        Err(_) => {
            tracing::warn!(key, "GGUF string value is not valid UTF-8; replacing invalid bytes");
            String::from_utf8_lossy(raw).into_owned()
        }
    })
}

fn fixed<T, const N: usize>(cur: &mut Cursor<'_>, n: usize, f: fn([u8; N]) -> T) -> Result<Vec<T>, FormatError> {
    let raw = cur.take((n * N) as u64, "metadata array")?;
    Ok(raw
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

fn read_array(cur: &mut Cursor<'_>, key: &str, depth: usize) -> Result<GgufArray, FormatError> {
    if depth > MAX_ARRAY_NESTING {
        return Err(FormatError::NestingTooDeep { key: key.to_string() });
    }
    let elem_type = cur.u32("array element type")?;
    let count = cur.u64("array length")?;
    let min = min_size(elem_type).ok_or_else(|| FormatError::BadValueType {
        key: key.to_string(),
        value_type: elem_type,
    })?;
    let n = cur.check_count(count, min, "array element")?;
    Ok(match elem_type {
        0 => GgufArray::U8(fixed(cur, n, u8::from_le_bytes)?),
        1 => GgufArray::I8(fixed(cur, n, i8::from_le_bytes)?),
        2 => GgufArray::U16(fixed(cur, n, u16::from_le_bytes)?),
        3 => GgufArray::I16(fixed(cur, n, i16::from_le_bytes)?),
        4 => GgufArray::U32(fixed(cur, n, u32::from_le_bytes)?),
        5 => GgufArray::I32(fixed(cur, n, i32::from_le_bytes)?),
        6 => GgufArray::F32(fixed(cur, n, f32::from_le_bytes)?),
        7 => GgufArray::Bool(fixed(cur, n, |[b]: [u8; 1]| b != 0)?),
        8 => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(lossy_string(cur, key)?);
            }
            GgufArray::String(v)
        }
        9 => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(cur, key, depth + 1)?);
            }
            GgufArray::Array(v)
        }
        10 => GgufArray::U64(fixed(cur, n, u64::from_le_bytes)?),
        11 => GgufArray::I64(fixed(cur, n, i64::from_le_bytes)?),
        12 => GgufArray::F64(fixed(cur, n, f64::from_le_bytes)?),
        _ => {
            return Err(FormatError::BadValueType {
                key: key.to_string(),
                value_type: elem_type,
            });
        }
    })
}

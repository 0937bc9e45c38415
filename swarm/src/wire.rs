//! Tensors on the wire and length-prefixed CBOR frames.
//!
//! Everything here may come from a hostile peer: sizes are checked before any allocation.
//!
//! # Allocation on hostile input
//!
//! A frame is a `u32` little-endian length followed by that many bytes of CBOR. The declared
//! length is checked against the limit before anything is allocated, and the body is then read
//! incrementally, so memory grows only with bytes actually received (a peer that declares
//! 256 MiB and sends 10 bytes costs 10 bytes, not 256 MiB).
//!
//! Inside the body, CBOR headers declare lengths too (a byte string "of 2^62 bytes" in a
//! 20-byte frame). ciborium 0.2 does not trust them: byte and text strings longer than its
//! 4 KiB scratch buffer are read in segments and appended to a growing `Vec`, so a lie ends in
//! an end-of-input error after at most the frame's size. Arrays are handed to serde with the
//! declared length as a size hint only; serde caps preallocation from hints at 1 MiB
//! (`Vec<T>`), `serde_bytes` at 4 KiB, and [`WireTensor::shape`] is decoded through a visitor
//! that refuses more than [`MAX_RANK`] dimensions. Tests below (`hostile_*`) pin this down:
//! if a future ciborium started preallocating, they would abort instead of passing. Nesting
//! depth is bounded by [`CBOR_RECURSION_LIMIT`].
//!
//! What remains is the ordinary expansion of a decoded message over its encoding (e.g. a
//! `Vec<u32>` of small integers takes 4 bytes per 1-byte CBOR element), bounded by a small
//! factor times the frame limit.

use std::fmt;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use half::{bf16, f16};
use serde::de::{DeserializeOwned, Deserializer, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use shared_model::weights::HostTensor;

use crate::protocol::Limits;

/// Most dimensions a tensor on the wire may have.
pub const MAX_RANK: usize = 8;

/// Deepest nesting of CBOR arrays/maps accepted when decoding a message.
pub const CBOR_RECURSION_LIMIT: usize = 32;

/// Size of the length prefix of a frame.
const PREFIX_BYTES: usize = 4;

/// The body buffer starts at most this large; it then grows with the bytes actually received.
const INITIAL_BODY_CAPACITY: usize = 64 << 10;

/// Element type of a tensor on the wire. f16/bf16 halve the bytes at the cost of precision;
/// the client chooses per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDtype {
    F32,
    F16,
    Bf16,
}

impl WireDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }
}

/// `{dtype, shape, bytes}`, little-endian, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    pub dtype: WireDtype,
    /// Decoding refuses more than [`MAX_RANK`] dimensions.
    #[serde(deserialize_with = "deserialize_shape")]
    pub shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// Errors decoding what a peer sent.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("tensor of {elements} elements exceeds the limit of {max}")]
    TensorTooLarge { elements: u128, max: usize },
    /// The product of the non-zero dimensions exceeds the element limit (an empty tensor such
    /// as `[0, 2^40, 2^40]` would otherwise overflow any stride computation downstream).
    #[error("tensor shape {shape:?} has dimensions whose product exceeds the limit of {max} elements")]
    DimensionsTooLarge { shape: Vec<u64>, max: usize },
    #[error("tensor shape {shape:?} with {dtype:?} needs {expected} bytes, got {actual}")]
    ByteLength {
        shape: Vec<u64>,
        dtype: WireDtype,
        expected: u128,
        actual: usize,
    },
    #[error("tensor has shape {actual:?}, expected {expected}")]
    Shape { actual: Vec<u64>, expected: String },
    #[error("tensor holds a non-finite value")]
    NonFinite,
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("stream closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The peer ended or reset the stream without a word: what a server under a stream flood
    /// does to streams it has no room for (libp2p drops inbound streams its accept queue cannot
    /// take, and a server drops those over its pending-stream caps). Worth asking again, unlike
    /// a malformed or refused answer.
    pub fn is_dropped_stream(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            WireError::Closed => true,
            WireError::Io(e) => matches!(
                e.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::WriteZero
            ),
            _ => false,
        }
    }
}

impl WireTensor {
    /// Encodes `t` as `dtype`. f16/bf16 round to nearest (ties to even); finite values beyond
    /// their range saturate to the largest finite value rather than becoming infinite (which
    /// the receiver would reject). Non-finite values are sent as they are and will be rejected
    /// by [`WireTensor::decode`].
    pub fn encode(t: &HostTensor, dtype: WireDtype) -> WireTensor {
        let shape = t.shape.iter().map(|&d| d as u64).collect();
        let mut bytes = Vec::with_capacity(t.data.len() * dtype.size());
        match dtype {
            WireDtype::F32 => {
                for &v in &t.data {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireDtype::F16 => {
                for &v in &t.data {
                    let mut h = f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        h = if v > 0.0 { f16::MAX } else { f16::MIN };
                    }
                    bytes.extend_from_slice(&h.to_le_bytes());
                }
            }
            WireDtype::Bf16 => {
                for &v in &t.data {
                    let mut h = bf16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        h = if v > 0.0 { bf16::MAX } else { bf16::MIN };
                    }
                    bytes.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
        WireTensor { dtype, shape, bytes }
    }

    /// Number of elements: the product of the dimensions (1 for rank 0).
    ///
    /// Computed in `u128`, saturating at `u128::MAX` (eight `u64` dimensions can exceed even
    /// `u128`); a saturated count is far above any limit, so [`WireTensor::check`] still
    /// rejects it. Rank above [`MAX_RANK`] is an error.
    pub fn elements(&self) -> Result<u128, WireError> {
        if self.shape.len() > MAX_RANK {
            return Err(self.rank_error());
        }
        Ok(self
            .shape
            .iter()
            .fold(1u128, |acc, &d| acc.saturating_mul(u128::from(d))))
    }

    /// Checks rank (1..=[`MAX_RANK`]), size against `limits.max_tensor_elements` and that the
    /// byte length matches shape and dtype. Allocates nothing unless it fails.
    pub fn check(&self, limits: &Limits) -> Result<(), WireError> {
        if self.shape.is_empty() || self.shape.len() > MAX_RANK {
            return Err(self.rank_error());
        }
        let elements = self.elements()?;
        let max = limits.max_tensor_elements;
        if elements > max as u128 {
            return Err(WireError::TensorTooLarge { elements, max });
        }
        // Zero dimensions make `elements` small whatever the others are; bound those too, so
        // that every dimension (and every partial product) fits comfortably in a `usize`.
        let extent = self
            .shape
            .iter()
            .fold(1u128, |acc, &d| acc.saturating_mul(u128::from(d.max(1))));
        if extent > max as u128 {
            return Err(WireError::DimensionsTooLarge {
                shape: self.shape.clone(),
                max,
            });
        }
        let expected = elements * self.dtype.size() as u128;
        if expected != self.bytes.len() as u128 {
            return Err(WireError::ByteLength {
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected,
                actual: self.bytes.len(),
            });
        }
        Ok(())
    }

    /// Checks the shape against a pattern: same rank, and each `Some(d)` must equal the
    /// dimension at that position (`None` accepts any). The error shows the pattern as
    /// `[2, *, 64]`.
    pub fn expect_shape(&self, expected: &[Option<u64>]) -> Result<(), WireError> {
        let matches = self.shape.len() == expected.len()
            && self.shape.iter().zip(expected).all(|(&d, e)| e.is_none_or(|e| e == d));
        if matches {
            return Ok(());
        }
        let dims: Vec<String> = expected
            .iter()
            .map(|e| match e {
                Some(d) => d.to_string(),
                None => "*".to_owned(),
            })
            .collect();
        Err(WireError::Shape {
            actual: self.shape.clone(),
            expected: format!("[{}]", dims.join(", ")),
        })
    }

    /// [`check`](WireTensor::check)s the tensor, then converts it to f32. Any NaN or infinity
    /// is rejected ([`WireError::NonFinite`]): a hostile peer must not poison a KV cache.
    pub fn decode(&self, limits: &Limits) -> Result<HostTensor, WireError> {
        self.check(limits)?;
        let shape = self
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| WireError::DimensionsTooLarge {
                shape: self.shape.clone(),
                max: limits.max_tensor_elements,
            })?;
        let data = match self.dtype {
            WireDtype::F32 => convert::<4>(&self.bytes, f32::from_le_bytes)?,
            WireDtype::F16 => convert::<2>(&self.bytes, |b| f16::from_le_bytes(b).to_f32())?,
            WireDtype::Bf16 => convert::<2>(&self.bytes, |b| bf16::from_le_bytes(b).to_f32())?,
        };
        Ok(HostTensor { shape, data })
    }

    fn rank_error(&self) -> WireError {
        WireError::Shape {
            actual: self.shape.clone(),
            expected: format!("rank 1..={MAX_RANK}"),
        }
    }
}

/// Converts little-endian `N`-byte elements to f32, refusing non-finite values.
/// `bytes.len()` is a multiple of `N` (checked by the caller).
fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Result<Vec<f32>, WireError> {
    let (chunks, rest) = bytes.as_chunks::<N>();
    if !rest.is_empty() {
        return Err(WireError::Decode(format!(
            "{} bytes is not a whole number of {N}-byte elements",
            bytes.len()
        )));
    }
    let mut data = Vec::with_capacity(chunks.len());
    for &chunk in chunks {
        let v = f(chunk);
        if !v.is_finite() {
            return Err(WireError::NonFinite);
        }
        data.push(v);
    }
    Ok(data)
}

/// Decodes a shape, refusing more than [`MAX_RANK`] dimensions as they arrive.
fn deserialize_shape<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    struct ShapeVisitor;

    impl<'de> Visitor<'de> for ShapeVisitor {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a shape of at most {MAX_RANK} dimensions")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut shape = Vec::with_capacity(MAX_RANK);
            while let Some(d) = seq.next_element::<u64>()? {
                if shape.len() == MAX_RANK {
                    return Err(A::Error::invalid_length(MAX_RANK + 1, &self));
                }
                shape.push(d);
            }
            Ok(shape)
        }
    }

    deserializer.deserialize_seq(ShapeVisitor)
}

/// Serializes a message as CBOR.
pub fn to_cbor<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::new();
    ciborium::into_writer(msg, &mut buf).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(buf)
}

/// Deserializes one CBOR message that must span all of `bytes` (trailing bytes are an error).
/// Nesting deeper than [`CBOR_RECURSION_LIMIT`] is refused.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let mut rest = bytes;
    let msg = ciborium::de::from_reader_with_recursion_limit(&mut rest, CBOR_RECURSION_LIMIT)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Writes `msg` as one frame (u32 little-endian length, then CBOR) and flushes. A message
/// whose body would exceed `max_frame_bytes` (or `u32::MAX`) is not sent.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max_frame_bytes: usize,
) -> Result<(), WireError> {
    let mut buf = vec![0u8; PREFIX_BYTES];
    ciborium::into_writer(msg, &mut buf).map_err(|e| WireError::Encode(e.to_string()))?;
    let len = buf.len() - PREFIX_BYTES;
    let too_large = WireError::FrameTooLarge {
        len,
        max: max_frame_bytes,
    };
    if len > max_frame_bytes {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?.to_le_bytes();
    buf[..PREFIX_BYTES].copy_from_slice(&prefix);
    // Natively this is one write and one flush.
    for piece in buf.chunks(WRITE_PIECE_BYTES) {
        w.write_all(piece).await?;
        w.flush().await?;
    }
    Ok(())
}

/// The largest write handed to the transport at once. In the browser every flushed write
/// becomes one WebRTC data-channel message, and native libp2p-webrtc peers (webrtc-rs) read
/// messages into an 8 KiB buffer, failing on longer ones ("Short buffer"): frames from a page
/// go out in pieces that fit, each flushed on its own. Elsewhere writes are not split.
#[cfg(target_arch = "wasm32")]
const WRITE_PIECE_BYTES: usize = 8 * 1024 - 64;
#[cfg(not(target_arch = "wasm32"))]
const WRITE_PIECE_BYTES: usize = usize::MAX;

/// Reads one frame and decodes it.
///
/// A clean end of stream before the first length byte is [`WireError::Closed`]; an end of
/// stream anywhere later is an `UnexpectedEof` I/O error. A declared length above
/// `max_frame_bytes` is refused before anything is allocated, and the body buffer grows only
/// with the bytes actually received.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max_frame_bytes: usize,
) -> Result<T, WireError> {
    let len = read_frame_len(r, max_frame_bytes).await?;
    read_frame_body(r, len).await
}

/// Reads a frame's length prefix only, so that a receiver can reserve what the message will
/// cost before reading it. [`WireError::Closed`] on a clean end of stream; a length above
/// `max_frame_bytes` is [`WireError::FrameTooLarge`].
pub async fn read_frame_len<R: AsyncRead + Unpin>(r: &mut R, max_frame_bytes: usize) -> Result<usize, WireError> {
    read_frame_len_resumable(r, &mut PartialPrefix::default(), max_frame_bytes).await
}

/// The bytes of a length prefix read so far (see [`read_frame_len_resumable`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct PartialPrefix {
    bytes: [u8; PREFIX_BYTES],
    filled: usize,
}

/// [`read_frame_len`] that may be abandoned (a timeout dropping the future) and called again
/// later without losing bytes: what it has read stays in `partial`, which it empties once the
/// prefix is whole. So a reader may stop waiting for a frame to start and keep the stream.
pub async fn read_frame_len_resumable<R: AsyncRead + Unpin>(
    r: &mut R,
    partial: &mut PartialPrefix,
    max_frame_bytes: usize,
) -> Result<usize, WireError> {
    while partial.filled < PREFIX_BYTES {
        match r.read(&mut partial.bytes[partial.filled..]).await {
            Ok(0) if partial.filled == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(unexpected_eof("frame length")),
            Ok(n) => partial.filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let declared = u32::from_le_bytes(partial.bytes);
    *partial = PartialPrefix::default();
    let len = usize::try_from(declared).map_err(|_| WireError::FrameTooLarge {
        len: usize::MAX,
        max: max_frame_bytes,
    })?;
    if len > max_frame_bytes {
        return Err(WireError::FrameTooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(len)
}

/// Reads and decodes the `len`-byte body that [`read_frame_len`] announced. The buffer grows
/// only with the bytes actually received.
pub async fn read_frame_body<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R, len: usize) -> Result<T, WireError> {
    let declared = u64::try_from(len).map_err(|_| unexpected_eof("frame body"))?;
    let mut body = Vec::with_capacity(len.min(INITIAL_BODY_CAPACITY));
    (&mut *r).take(declared).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(unexpected_eof("frame body"));
    }
    from_cbor(&body)
}

/// Reads up to the end of the stream, which must come next: a one-message stream is over.
/// Taking in the sender's close matters in the browser: a WebRTC sender waits for it to be
/// acknowledged before it reads the reply, and until then the reply piles up in its queue
/// ("remote overloaded us with messages").
pub async fn read_end<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), WireError> {
    let mut rest = [0u8; 1];
    loop {
        match r.read(&mut rest).await {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(WireError::Decode("bytes after the message".into())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn unexpected_eof(what: &str) -> WireError {
    WireError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("stream ended inside the {what}"),
    ))
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use futures::executor::block_on;
    use serde::de::DeserializeOwned;

    use super::*;
    use crate::protocol::{ErrorKind, ProtocolError, SessionRequest, SessionResponse, SpanRequest, SpanResponse};

    const MAX: usize = 1 << 20;

    fn limits() -> Limits {
        Limits::default()
    }

    fn ramp(shape: Vec<usize>) -> HostTensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| (i as f32 - n as f32 / 2.0) * 0.37 + 1.0 / (i as f32 + 3.0))
            .collect();
        HostTensor { shape, data }
    }

    fn wire(dtype: WireDtype, shape: Vec<u64>, bytes: usize) -> WireTensor {
        WireTensor {
            dtype,
            shape,
            bytes: vec![0; bytes],
        }
    }

    // ---- tensors ----

    #[test]
    fn dtype_sizes() {
        assert_eq!(WireDtype::F32.size(), 4);
        assert_eq!(WireDtype::F16.size(), 2);
        assert_eq!(WireDtype::Bf16.size(), 2);
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let t = ramp(vec![2, 3, 5]);
        let w = WireTensor::encode(&t, WireDtype::F32);
        assert_eq!(w.shape, vec![2, 3, 5]);
        assert_eq!(w.bytes.len(), 30 * 4);
        assert_eq!(w.decode(&limits()).expect("decode"), t);
    }

    #[test]
    fn half_round_trips_within_precision() {
        let t = ramp(vec![4, 7, 9]);
        // Relative precision: 2^-11 for f16, 2^-8 for bf16 (round to nearest), plus a
        // subnormal floor for f16.
        for (dtype, rel, abs) in [
            (WireDtype::F16, 1.0 / 2048.0, 1e-7),
            (WireDtype::Bf16, 1.0 / 256.0, 0.0),
        ] {
            let w = WireTensor::encode(&t, dtype);
            assert_eq!(w.bytes.len(), t.data.len() * 2);
            let back = w.decode(&limits()).expect("decode");
            assert_eq!(back.shape, t.shape);
            for (&a, &b) in t.data.iter().zip(&back.data) {
                assert!((a - b).abs() <= a.abs() * rel + abs, "{dtype:?}: {a} became {b}");
            }
        }
    }

    #[test]
    fn half_saturates_instead_of_overflowing() {
        let t = HostTensor {
            shape: vec![4],
            data: vec![1e6, -1e6, f32::MAX, f32::MIN],
        };
        let f = WireTensor::encode(&t, WireDtype::F16).decode(&limits()).expect("f16");
        assert_eq!(f.data, vec![65504.0, -65504.0, 65504.0, -65504.0]);
        let b = WireTensor::encode(&t, WireDtype::Bf16).decode(&limits()).expect("bf16");
        assert!(b.data.iter().all(|v| v.is_finite()));
        assert_eq!(b.data[2], bf16::MAX.to_f32());
        assert_eq!(b.data[3], bf16::MIN.to_f32());
    }

    #[test]
    fn byte_length_mismatch_is_rejected() {
        for (dtype, bytes) in [
            (WireDtype::F32, 23),
            (WireDtype::F32, 25),
            (WireDtype::F16, 11),
            (WireDtype::Bf16, 0),
        ] {
            let err = wire(dtype, vec![2, 3], bytes).decode(&limits()).expect_err("must fail");
            assert!(
                matches!(err, WireError::ByteLength { expected, actual, .. } if expected == 6 * dtype.size() as u128 && actual == bytes),
                "{err}"
            );
        }
    }

    #[test]
    fn too_many_elements_is_rejected() {
        let small = Limits {
            max_tensor_elements: 100,
            ..Limits::default()
        };
        assert!(wire(WireDtype::F32, vec![10, 10], 400).check(&small).is_ok());
        let err = wire(WireDtype::F32, vec![10, 11], 440)
            .check(&small)
            .expect_err("must fail");
        assert!(
            matches!(
                err,
                WireError::TensorTooLarge {
                    elements: 110,
                    max: 100
                }
            ),
            "{err}"
        );
        // Products beyond u64 and u128 saturate instead of wrapping around.
        let huge = wire(WireDtype::F32, vec![u64::MAX; 8], 0);
        assert_eq!(huge.elements().expect("rank 8"), u128::MAX);
        assert!(matches!(huge.check(&limits()), Err(WireError::TensorTooLarge { .. })));
        let wrap = wire(WireDtype::F32, vec![1 << 32, 1 << 32], 0);
        assert_eq!(wrap.elements().expect("rank 2"), 1 << 64);
        assert!(matches!(wrap.check(&limits()), Err(WireError::TensorTooLarge { .. })));
    }

    #[test]
    fn empty_tensors_are_fine_but_their_other_dims_are_bounded() {
        let t = wire(WireDtype::F16, vec![3, 0, 64], 0);
        let h = t.decode(&limits()).expect("empty tensor");
        assert_eq!(h.shape, vec![3, 0, 64]);
        assert!(h.data.is_empty());
        let err = wire(WireDtype::F32, vec![0, 1 << 40, 1 << 40], 0)
            .check(&limits())
            .expect_err("must fail");
        assert!(matches!(err, WireError::DimensionsTooLarge { .. }), "{err}");
    }

    #[test]
    fn rank_0_and_rank_9_are_rejected() {
        let err = wire(WireDtype::F32, vec![], 4)
            .decode(&limits())
            .expect_err("must fail");
        assert!(
            matches!(&err, WireError::Shape { expected, .. } if expected == "rank 1..=8"),
            "{err}"
        );
        let nine = wire(WireDtype::F32, vec![1; 9], 4);
        assert!(matches!(nine.elements(), Err(WireError::Shape { .. })));
        assert!(matches!(nine.decode(&limits()), Err(WireError::Shape { .. })));
        assert!(wire(WireDtype::F32, vec![1; 8], 4).decode(&limits()).is_ok());
    }

    #[test]
    fn non_finite_values_are_rejected() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut t = ramp(vec![2, 8]);
            t.data[11] = bad;
            for dtype in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
                let err = WireTensor::encode(&t, dtype).decode(&limits()).expect_err("must fail");
                assert!(matches!(err, WireError::NonFinite), "{dtype:?} {bad}: {err}");
            }
        }
        // Raw NaN patterns with payloads, too.
        let w = WireTensor {
            dtype: WireDtype::F16,
            shape: vec![2],
            bytes: vec![0, 0, 0x01, 0x7e],
        };
        assert!(matches!(w.decode(&limits()), Err(WireError::NonFinite)));
        let w = WireTensor {
            dtype: WireDtype::Bf16,
            shape: vec![1],
            bytes: vec![0x80, 0xff],
        };
        assert!(matches!(w.decode(&limits()), Err(WireError::NonFinite)));
    }

    #[test]
    fn expect_shape_matches_and_explains() {
        let t = wire(WireDtype::F32, vec![2, 5, 64], 0);
        assert!(t.expect_shape(&[Some(2), None, Some(64)]).is_ok());
        assert!(t.expect_shape(&[None, None, None]).is_ok());
        let err = t.expect_shape(&[Some(2), None, Some(32)]).expect_err("must fail");
        assert_eq!(err.to_string(), "tensor has shape [2, 5, 64], expected [2, *, 32]");
        let err = t.expect_shape(&[Some(2), None]).expect_err("must fail");
        assert_eq!(err.to_string(), "tensor has shape [2, 5, 64], expected [2, *]");
        let err = t.expect_shape(&[None, None, None, None]).expect_err("must fail");
        assert_eq!(err.to_string(), "tensor has shape [2, 5, 64], expected [*, *, *, *]");
        let err = t.expect_shape(&[]).expect_err("must fail");
        assert_eq!(err.to_string(), "tensor has shape [2, 5, 64], expected []");
    }

    // ---- frames ----

    fn tensor(dtype: WireDtype) -> WireTensor {
        WireTensor::encode(&ramp(vec![2, 3, 4]), dtype)
    }

    fn error() -> ProtocolError {
        ProtocolError::new(ErrorKind::Busy, "no cache left")
    }

    fn session_requests() -> Vec<SessionRequest> {
        vec![
            SessionRequest::Open {
                model: "abc123".into(),
                start: 3,
                end: 17,
                batch: 2,
                max_length: 2048,
                pad: vec![0, 5],
                reply_dtype: WireDtype::Bf16,
                prompts: Some(tensor(WireDtype::F32)),
                adapter: Some("lora-a".into()),
            },
            SessionRequest::Step {
                step: 42,
                hidden: tensor(WireDtype::F16),
                start_from: Some(17),
                push: false,
            },
            SessionRequest::Step {
                step: 43,
                hidden: tensor(WireDtype::F32),
                start_from: None,
                push: true,
            },
            SessionRequest::Link {
                token: u64::MAX,
                from: Some("12D3KooWprev".into()),
                to: Some(crate::protocol::PushTarget {
                    peer: "12D3KooWnext".into(),
                    addrs: vec!["/ip4/10.0.0.2/tcp/1/p2p/12D3KooWnext".into()],
                    token: 9,
                }),
            },
            SessionRequest::Link {
                token: 0,
                from: None,
                to: None,
            },
            SessionRequest::Close,
        ]
    }

    fn session_responses() -> Vec<SessionResponse> {
        vec![
            SessionResponse::Opened { cache_tokens: 4096 },
            SessionResponse::Output {
                step: 7,
                hidden: tensor(WireDtype::F32),
                pushed: true,
            },
            SessionResponse::Pushed {
                position: 12,
                hidden: tensor(WireDtype::Bf16),
                pushed: false,
            },
            SessionResponse::Linked,
            SessionResponse::Error(error()),
        ]
    }

    fn span_requests() -> Vec<SpanRequest> {
        vec![
            SpanRequest::Forward {
                model: "m".into(),
                start: 0,
                end: 4,
                pad: vec![1, 0],
                hidden: tensor(WireDtype::Bf16),
                reply_dtype: WireDtype::F32,
                prompts: None,
            },
            SpanRequest::Backward {
                model: "m".into(),
                start: 4,
                end: 8,
                pad: vec![],
                hidden: tensor(WireDtype::F32),
                grad_output: tensor(WireDtype::F16),
                reply_dtype: WireDtype::F16,
                prompts: Some(tensor(WireDtype::F32)),
            },
        ]
    }

    fn span_responses() -> Vec<SpanResponse> {
        let mut errors: Vec<SpanResponse> = [
            ErrorKind::Busy,
            ErrorKind::BadRequest,
            ErrorKind::WrongModel,
            ErrorKind::WrongSpan,
            ErrorKind::Closed,
            ErrorKind::Internal,
        ]
        .into_iter()
        .map(|kind| SpanResponse::Error(ProtocolError::new(kind, format!("{kind:?} happened"))))
        .collect();
        errors.insert(0, SpanResponse::Tensor(tensor(WireDtype::F16)));
        errors.insert(
            1,
            SpanResponse::Gradients {
                input: tensor(WireDtype::F32),
                prompts: tensor(WireDtype::F16),
            },
        );
        errors
    }

    /// Writes every message into one buffer, reads them back (through a reader that yields
    /// a single byte per poll, to exercise partial reads), then expects a clean close.
    fn frame_round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(msgs: &[T]) {
        block_on(async {
            let mut buf: Vec<u8> = Vec::new();
            for m in msgs {
                write_frame(&mut buf, m, MAX).await.expect("write");
            }
            let mut r: &[u8] = &buf;
            for m in msgs {
                assert_eq!(&read_frame::<_, T>(&mut r, MAX).await.expect("read"), m);
            }
            assert!(matches!(read_frame::<_, T>(&mut r, MAX).await, Err(WireError::Closed)));

            let mut slow = Trickle(&buf);
            for m in msgs {
                assert_eq!(&read_frame::<_, T>(&mut slow, MAX).await.expect("read"), m);
            }
            assert!(matches!(
                read_frame::<_, T>(&mut slow, MAX).await,
                Err(WireError::Closed)
            ));
        });
    }

    /// An `AsyncRead` yielding at most one byte per call.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Poll::Ready(Ok(1))
                }
                _ => Poll::Ready(Ok(0)),
            }
        }
    }

    #[test]
    fn every_message_round_trips_through_frames() {
        frame_round_trip(&session_requests());
        frame_round_trip(&session_responses());
        frame_round_trip(&span_requests());
        frame_round_trip(&span_responses());
        frame_round_trip(&[crate::protocol::PushStep {
            token: 3,
            position: 40,
            start_from: Some(38),
            hidden: tensor(WireDtype::F16),
        }]);
    }

    #[tokio::test]
    async fn frames_cross_a_concurrent_pipe() {
        // A writer task and a reader task joined by an in-memory pipe (futures' AsyncRead side
        // backed by a channel of chunks).
        let (tx, rx) = futures::channel::mpsc::unbounded::<std::io::Result<Vec<u8>>>();
        let writer = tokio::spawn(async move {
            let mut out = futures::io::AllowStdIo::new(Vec::new());
            for m in session_requests() {
                write_frame(&mut out, &m, MAX).await?;
                let chunk = std::mem::take(out.get_mut());
                // Split each frame in two chunks to cross a chunk boundary mid-frame.
                let (a, b) = chunk.split_at(chunk.len() / 2);
                let _ = tx.unbounded_send(Ok(a.to_vec()));
                let _ = tx.unbounded_send(Ok(b.to_vec()));
            }
            Ok::<(), WireError>(())
        });
        let mut r = futures::TryStreamExt::into_async_read(rx);
        for m in session_requests() {
            assert_eq!(read_frame::<_, SessionRequest>(&mut r, MAX).await.expect("read"), m);
        }
        writer.await.expect("join").expect("write");
        assert!(matches!(
            read_frame::<_, SessionRequest>(&mut r, MAX).await,
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn truncated_frames_are_unexpected_eof() {
        block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut buf, &session_requests()[1], MAX).await.expect("write");
            for cut in 1..buf.len() {
                let mut r: &[u8] = &buf[..cut];
                let err = read_frame::<_, SessionRequest>(&mut r, MAX)
                    .await
                    .expect_err("must fail");
                assert!(
                    matches!(&err, WireError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                    "cut at {cut}: {err}"
                );
            }
            let mut r: &[u8] = &[];
            assert!(matches!(
                read_frame::<_, SessionRequest>(&mut r, MAX).await,
                Err(WireError::Closed)
            ));
        });
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        block_on(async {
            // Declared 4 GiB - 1 with a 1 MiB limit: refused from the prefix alone.
            let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xa0];
            let err = read_frame::<_, SessionRequest>(&mut r, MAX)
                .await
                .expect_err("must fail");
            assert!(
                matches!(
                    err,
                    WireError::FrameTooLarge {
                        len: 0xffff_ffff,
                        max: MAX
                    }
                ),
                "{err}"
            );
            // One byte over the limit.
            let mut buf = Vec::new();
            write_frame(&mut buf, &SessionRequest::Close, MAX).await.expect("write");
            let body = buf.len() - 4;
            let mut r: &[u8] = &buf;
            assert!(matches!(
                read_frame::<_, SessionRequest>(&mut r, body - 1).await,
                Err(WireError::FrameTooLarge { .. })
            ));
            let mut r: &[u8] = &buf;
            assert!(read_frame::<_, SessionRequest>(&mut r, body).await.is_ok());
            // Writing: nothing is sent.
            let mut out = Vec::new();
            let big = SessionRequest::Step {
                step: 0,
                hidden: tensor(WireDtype::F32),
                start_from: None,
                push: false,
            };
            let err = write_frame(&mut out, &big, 64).await.expect_err("must fail");
            assert!(matches!(err, WireError::FrameTooLarge { max: 64, .. }), "{err}");
            assert!(out.is_empty());
        });
    }

    #[test]
    fn trailing_bytes_and_wrong_types_are_decode_errors() {
        let mut bytes = to_cbor(&SessionRequest::Close).expect("encode");
        assert!(from_cbor::<SessionRequest>(&bytes).is_ok());
        bytes.push(0);
        assert!(matches!(from_cbor::<SessionRequest>(&bytes), Err(WireError::Decode(_))));
        let bytes = to_cbor(&SpanResponse::Error(error())).expect("encode");
        assert!(matches!(from_cbor::<SessionRequest>(&bytes), Err(WireError::Decode(_))));
        assert!(matches!(from_cbor::<SessionRequest>(&[]), Err(WireError::Decode(_))));
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 10_000 nested one-element arrays, read as a message that ignores unknown content.
        let mut bytes = vec![0xa1, 0x61, b'x'];
        bytes.extend(std::iter::repeat_n(0x81, 10_000));
        bytes.push(0x00);
        let err = from_cbor::<WireTensor>(&bytes).expect_err("must fail");
        assert!(matches!(err, WireError::Decode(_)), "{err}");
    }

    // ---- hostile declared lengths inside a frame ----

    fn text(s: &str) -> Vec<u8> {
        let mut v = vec![0x60 + s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    /// A CBOR header with an 8-byte argument: `major` in 0..8, length `n`.
    fn header64(major: u8, n: u64) -> Vec<u8> {
        let mut v = vec![(major << 5) | 27];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }

    /// `{"Step": {"step": 0, "hidden": {"dtype": "F32", <tensor fields>}}}`
    fn step_with(tensor_fields: &[u8], n_fields: u8) -> Vec<u8> {
        let mut v = vec![0xa1];
        v.extend(text("Step"));
        v.push(0xa2);
        v.extend(text("step"));
        v.push(0x00);
        v.extend(text("hidden"));
        v.push(0xa0 + n_fields + 1);
        v.extend(text("dtype"));
        v.extend(text("F32"));
        v.extend_from_slice(tensor_fields);
        v
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn assert_decode_error_quickly<T: DeserializeOwned + fmt::Debug>(body: &[u8]) {
        let start = Instant::now();
        let framed = frame(body);
        let mut r: &[u8] = &framed;
        let res = block_on(read_frame::<_, T>(&mut r, MAX));
        assert!(matches!(res, Err(WireError::Decode(_))), "{res:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    }

    #[test]
    fn hostile_huge_byte_string_is_not_preallocated() {
        // The tensor's bytes declare 2^62 bytes (a preallocation would abort the process),
        // followed by a handful of real bytes.
        let mut fields = text("shape");
        fields.extend([0x81, 0x01]);
        fields.extend(text("bytes"));
        fields.extend(header64(2, 1 << 62));
        fields.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_decode_error_quickly::<SessionRequest>(&step_with(&fields, 2));
        // Same as a bare tensor, with a 2^40 declaration.
        let mut t = vec![0xa3];
        t.extend(text("dtype"));
        t.extend(text("F16"));
        t.extend(text("shape"));
        t.extend([0x81, 0x01]);
        t.extend(text("bytes"));
        t.extend(header64(2, 1 << 40));
        assert_decode_error_quickly::<WireTensor>(&t);
        // And as the array form serde_bytes also accepts.
        let mut fields = text("shape");
        fields.extend([0x81, 0x01]);
        fields.extend(text("bytes"));
        fields.extend(header64(4, 1 << 62));
        fields.extend([1, 2, 3]);
        assert_decode_error_quickly::<SessionRequest>(&step_with(&fields, 2));
    }

    #[test]
    fn hostile_huge_arrays_and_strings_are_not_preallocated() {
        // shape: an array declaring 2^62 dimensions (refused at the 9th by the shape visitor).
        let mut fields = text("shape");
        fields.extend(header64(4, 1 << 62));
        fields.extend([1; 12]);
        assert_decode_error_quickly::<SessionRequest>(&step_with(&fields, 1));
        // pad: a Vec<u32> declaring 2^62 elements with 3 present.
        let mut open = vec![0xa1];
        open.extend(text("Open"));
        open.push(0xa7);
        open.extend(text("model"));
        open.extend(text("m"));
        for key in ["start", "end", "batch", "max_length"] {
            open.extend(text(key));
            open.push(0x01);
        }
        open.extend(text("pad"));
        open.extend(header64(4, 1 << 62));
        open.extend([0, 0, 0]);
        assert_decode_error_quickly::<SessionRequest>(&open);
        // model: a text string declaring 2^62 bytes.
        let mut open = vec![0xa1];
        open.extend(text("Open"));
        open.push(0xa7);
        open.extend(text("model"));
        open.extend(header64(3, 1 << 62));
        open.extend(b"abc");
        assert_decode_error_quickly::<SessionRequest>(&open);
        // A map declaring 2^62 entries.
        let mut m = vec![0xa1];
        m.extend(text("Output"));
        m.extend(header64(5, 1 << 62));
        m.extend(text("step"));
        m.push(0x00);
        assert_decode_error_quickly::<SessionResponse>(&m);
        // An unknown field holding a huge array/bytes is skipped, not buffered.
        let mut fields = text("zzz");
        fields.extend(header64(2, 1 << 62));
        assert_decode_error_quickly::<SessionRequest>(&step_with(&fields, 1));
    }

    // ---- garbage ----

    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn decode_all(bytes: &[u8]) {
        let small = Limits {
            max_tensor_elements: 1 << 16,
            ..Limits::default()
        };
        let _ = from_cbor::<SessionRequest>(bytes);
        let _ = from_cbor::<SessionResponse>(bytes);
        let _ = from_cbor::<SpanRequest>(bytes);
        let _ = from_cbor::<SpanResponse>(bytes);
        if let Ok(t) = from_cbor::<WireTensor>(bytes) {
            let _ = t.decode(&small);
            let _ = t.expect_shape(&[Some(1), None]);
        }
        let mut r = bytes;
        let _ = block_on(read_frame::<_, SessionRequest>(&mut r, 4096));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Lcg(0x5eed);
        for _ in 0..4000 {
            let len = (rng.next() % 96) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            decode_all(&bytes);
        }
        // Mutations of valid encodings get much further into the decoder.
        let mut valid: Vec<Vec<u8>> = Vec::new();
        valid.extend(session_requests().iter().map(|m| to_cbor(m).expect("encode")));
        valid.extend(session_responses().iter().map(|m| to_cbor(m).expect("encode")));
        valid.extend(span_requests().iter().map(|m| to_cbor(m).expect("encode")));
        valid.extend(span_responses().iter().map(|m| to_cbor(m).expect("encode")));
        valid.push(to_cbor(&tensor(WireDtype::F16)).expect("encode"));
        for i in 0..4000 {
            let mut bytes = valid[i % valid.len()].clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() as usize) % bytes.len();
                match rng.next() % 3 {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.next() as u8),
                }
                if bytes.is_empty() {
                    bytes.push(0);
                }
            }
            decode_all(&bytes);
            decode_all(&frame(&bytes));
        }
    }

    /// Gives at most one byte a read, and is not ready before every byte (a slow link).
    struct Stutter<'a> {
        data: &'a [u8],
        ready: bool,
    }

    impl AsyncRead for Stutter<'_> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            match (self.data.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.data = rest;
                    Poll::Ready(Ok(1))
                }
                _ => Poll::Ready(Ok(0)),
            }
        }
    }

    /// Polls a fresh length read once per round (then drops it, as a timeout does) until one
    /// finishes; `resume` keeps the prefix read so far across rounds.
    fn length_through_abandoned_waits(framed: &[u8], resume: bool) -> (Result<usize, WireError>, Vec<u8>) {
        use std::future::Future;
        let mut r = Stutter {
            data: framed,
            ready: false,
        };
        let mut partial = PartialPrefix::default();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..64 {
            if !resume {
                partial = PartialPrefix::default();
            }
            let mut read = Box::pin(read_frame_len_resumable(&mut r, &mut partial, MAX));
            if let Poll::Ready(len) = read.as_mut().poll(&mut cx) {
                drop(read);
                return (len, r.data.to_vec());
            }
        }
        panic!("neither a length nor an error after 64 rounds");
    }

    #[test]
    fn a_length_read_abandoned_midway_resumes_where_it_stopped() {
        let response = SessionResponse::Linked;
        let body = to_cbor(&response).expect("encodes");
        let framed = frame(&body);
        let (len, rest) = length_through_abandoned_waits(&framed, true);
        let len = len.expect("a length");
        assert_eq!((len, rest.as_slice()), (body.len(), body.as_slice()));
        let mut rest: &[u8] = &rest;
        let back: SessionResponse = block_on(read_frame_body(&mut rest, len)).expect("decodes");
        assert_eq!(back, response);
        // Without resuming, each abandoned wait loses the byte it took: the stream runs out
        // before a length is whole.
        let (lost, _) = length_through_abandoned_waits(&framed, false);
        assert!(matches!(lost, Err(WireError::Closed)), "{lost:?}");
    }
}

//! What the fuzz targets share: reading a byte stream the way a peer's stream is read, the
//! model fingerprint's reads of stored tensor bytes (`sample_stored`), and the
//! properties every decoded message must have.
//!
//! The checks are generic over the message types (anything `Serialize + DeserializeOwned`), and
//! tensors are found by walking the decoded message's CBOR tree, so new message types, fields and
//! variants in `swarm::protocol` are covered without touching the targets.

use std::pin::Pin;
use std::task::{Context, Poll};

use ciborium::Value;
use futures::AsyncRead;
use futures::executor::block_on;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared_model::fingerprint::sample;
use shared_model::weights::WeightSource;
use swarm::protocol::Limits;
use swarm::wire::{self, MAX_RANK, WireError, WireTensor};

/// Most frames read from one input: every frame costs at least its 4-byte prefix, so this only
/// matters for inputs of empty-ish frames, which exercise nothing new after a few.
const MAX_FRAMES: usize = 64;

/// A reader over `bytes` that hands out at most `chunk` bytes per poll: peers' bytes arrive in
/// arbitrary pieces, and `read_frame` must not care how they are cut.
pub struct Chunked<'a> {
    bytes: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(bytes: &'a [u8], chunk: usize) -> Self {
        Self {
            bytes,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let n = self.chunk.min(buf.len()).min(self.bytes.len());
        let (head, rest) = self.bytes.split_at(n);
        buf[..n].copy_from_slice(head);
        self.bytes = rest;
        Poll::Ready(Ok(n))
    }
}

/// Reads frames of `T` from `bytes` (as a peer's stream, `chunk` bytes at a time) until the
/// stream ends or a frame is refused, checking every message decoded on the way.
pub fn read_frames<T: Serialize + DeserializeOwned>(bytes: &[u8], chunk: usize, max_frame_bytes: usize) {
    let mut r = Chunked::new(bytes, chunk);
    for _ in 0..MAX_FRAMES {
        match block_on(wire::read_frame::<_, T>(&mut r, max_frame_bytes)) {
            Ok(msg) => check_message(&msg),
            Err(WireError::FrameTooLarge { len, max }) => assert!(len > max, "refused {len} <= {max}"),
            Err(_) => return,
        }
    }
}

/// Properties of any decoded message: it re-encodes, the re-encoding decodes to a message
/// that encodes the same way again (encoding is a fixed point after one trip), and every tensor
/// in it passes the checks of [`check_tensor`].
pub fn check_message<T: Serialize + DeserializeOwned>(msg: &T) {
    let first = wire::to_cbor(msg).expect("a decoded message encodes");
    let back: T = wire::from_cbor(&first).expect("a re-encoded message decodes");
    let second = wire::to_cbor(&back).expect("a decoded message encodes");
    assert_eq!(first, second, "encoding is not stable across a round trip");
    let tree: Value = ciborium::from_reader(first.as_slice()).expect("our own encoding parses as CBOR");
    for_each_tensor(&tree, &mut |t| check_tensor(&t));
}

/// Calls `f` on every map in `tree` that decodes as a [`WireTensor`].
fn for_each_tensor(tree: &Value, f: &mut impl FnMut(WireTensor)) {
    match tree {
        Value::Map(entries) => {
            let is_tensor = ["dtype", "shape", "bytes"]
                .iter()
                .all(|k| entries.iter().any(|(key, _)| key.as_text() == Some(k)));
            if is_tensor && let Ok(t) = tree.deserialized::<WireTensor>() {
                f(t);
            }
            for (k, v) in entries {
                for_each_tensor(k, f);
                for_each_tensor(v, f);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| for_each_tensor(v, f)),
        Value::Tag(_, inner) => for_each_tensor(inner, f),
        _ => {}
    }
}

/// What a server does with a tensor a peer sent, under the default limits and under small
/// ones, and the properties tying `elements`, `check`, `expect_shape` and `decode` together.
pub fn check_tensor(t: &WireTensor) {
    assert!(
        t.shape.len() <= MAX_RANK,
        "decoding let {} dimensions through",
        t.shape.len()
    );
    for limits in [
        Limits::default(),
        Limits {
            max_tensor_elements: 1 << 12,
            ..Limits::default()
        },
    ] {
        let checked = t.check(&limits);
        let elements = t.elements().expect("rank is within MAX_RANK");
        if checked.is_ok() {
            assert!(elements <= limits.max_tensor_elements as u128);
            assert_eq!(elements * t.dtype.size() as u128, t.bytes.len() as u128);
        }
        let own: Vec<Option<u64>> = t.shape.iter().map(|&d| Some(d)).collect();
        assert!(t.expect_shape(&own).is_ok(), "a tensor does not match its own shape");
        let mut longer = own.clone();
        longer.push(None);
        assert!(t.expect_shape(&longer).is_err(), "a pattern of another rank matched");
        match t.decode(&limits) {
            Ok(host) => {
                assert!(checked.is_ok(), "decode accepted what check refused");
                assert_eq!(host.data.len() as u128, elements);
                assert_eq!(host.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), t.shape);
                assert!(
                    host.data.iter().all(|v| v.is_finite()),
                    "a non-finite value got through"
                );
                // What the server sends back is what it decoded: encoding it again is exact in
                // the tensor's own dtype.
                let again = WireTensor::encode(&host, t.dtype);
                assert_eq!(again.decode(&limits).expect("re-encoded tensor decodes"), host);
            }
            Err(WireError::NonFinite) => assert!(checked.is_ok(), "NonFinite before the shape checks"),
            Err(_) => assert!(checked.is_err(), "decode refused what check accepted"),
        }
    }
}

pub mod json;

/// Reads `bytes` as one-request streams (the span and head protocols, `swarm::request`) and
/// through libp2p's CBOR codec (the info protocol), as a server or client reads them from a peer.
pub mod codecs {
    use super::*;
    use libp2p::StreamProtocol;
    use libp2p::request_response::Codec;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/fuzz/1");

    /// A server's reading of a request stream (length prefix, body, end of stream: the steps
    /// `native-server` takes with admission between the first two), and a client's reading of
    /// the answer (`swarm::request::call`).
    pub fn request_stream<Req, Resp>(bytes: &[u8], chunk: usize, max_frame_bytes: usize)
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        let mut r = Chunked::new(bytes, chunk);
        let request = block_on(async {
            let len = wire::read_frame_len(&mut r, max_frame_bytes).await?;
            assert!(len <= max_frame_bytes, "admitted {len} > {max_frame_bytes}");
            let request: Req = wire::read_frame_body(&mut r, len).await?;
            wire::read_end(&mut r).await?;
            Ok::<_, WireError>(request)
        });
        if let Ok(req) = request {
            check_message(&req);
        }
        if let Ok(resp) = block_on(wire::read_frame::<_, Resp>(
            &mut Chunked::new(bytes, chunk),
            max_frame_bytes,
        )) {
            check_message(&resp);
        }
    }

    pub fn cbor_codec<Req, Resp>(bytes: &[u8], chunk: usize)
    where
        Req: Serialize + DeserializeOwned + Send + Clone + 'static,
        Resp: Serialize + DeserializeOwned + Send + Clone + 'static,
    {
        // The limits the node runs its info protocol with (libp2p's defaults).
        let mut codec = libp2p::request_response::cbor::codec::Codec::<Req, Resp>::default();
        if let Ok(req) = block_on(codec.read_request(&PROTOCOL, &mut Chunked::new(bytes, chunk))) {
            check_message(&req);
        }
        if let Ok(resp) = block_on(codec.read_response(&PROTOCOL, &mut Chunked::new(bytes, chunk))) {
            check_message(&resp);
        }
    }
}

/// Reads a tensor's stored bytes as the model fingerprint samples them, and one byte past its
/// end: offsets and lengths from a hostile header must give bytes or an error, never a panic
/// or a read outside the tensor.
pub fn sample_stored(source: &dyn WeightSource, name: &str) {
    let Ok(stored) = source.stored(name) else {
        return;
    };
    let mut buf = Vec::new();
    for (offset, len) in sample(stored.byte_len) {
        buf.resize(len as usize, 0);
        let _ = source.read_stored(name, offset, &mut buf);
    }
    assert!(
        source.read_stored(name, stored.byte_len, &mut [0]).is_err(),
        "read past the end of `{name}`"
    );
}

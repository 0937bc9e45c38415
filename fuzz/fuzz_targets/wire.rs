//! Everything a peer sends over a stream: length-prefixed CBOR frames of every message type in
//! `swarm::protocol`, the span and head request streams, libp2p's CBOR codec (the info
//! protocol), and the tensors inside (checked and decoded as a server does).
//!
//! Input: one selector byte, then the stream. The selector's low nibble picks what is read,
//! its high nibble how the stream is cut (0: as it comes; n: n bytes per read).
#![no_main]

use corolla_fuzz::{check_message, check_tensor, codecs, read_frames};
use libfuzzer_sys::fuzz_target;
use swarm::protocol::{
    HeadRequest, HeadResponse, InfoRequest, Limits, ServerInfo, SessionRequest, SessionResponse, SpanRequest,
    SpanResponse,
};
use swarm::wire::{self, WireTensor};

fn decode_as<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8]) {
    if let Ok(msg) = wire::from_cbor::<T>(bytes) {
        check_message(&msg);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let chunk = match selector >> 4 {
        0 => usize::MAX,
        n => n as usize,
    };
    let max = Limits::default().max_frame_bytes;
    match selector & 0x0f {
        0 => read_frames::<SessionRequest>(stream, chunk, max),
        1 => read_frames::<SessionResponse>(stream, chunk, max),
        2 => read_frames::<SpanRequest>(stream, chunk, max),
        3 => read_frames::<SpanResponse>(stream, chunk, max),
        4 => read_frames::<HeadRequest>(stream, chunk, max),
        5 => read_frames::<HeadResponse>(stream, chunk, max),
        6 => read_frames::<ServerInfo>(stream, chunk, max),
        7 => read_frames::<InfoRequest>(stream, chunk, max),
        8 => codecs::request_stream::<SpanRequest, SpanResponse>(stream, chunk, max),
        9 => codecs::request_stream::<HeadRequest, HeadResponse>(stream, chunk, max),
        10 => codecs::cbor_codec::<InfoRequest, ServerInfo>(stream, chunk),
        11 => {
            if let Ok(t) = wire::from_cbor::<WireTensor>(stream) {
                check_tensor(&t);
            }
        }
        _ => {
            decode_as::<SessionRequest>(stream);
            decode_as::<SessionResponse>(stream);
            decode_as::<SpanRequest>(stream);
            decode_as::<SpanResponse>(stream);
            decode_as::<HeadRequest>(stream);
            decode_as::<HeadResponse>(stream);
        }
    }
});

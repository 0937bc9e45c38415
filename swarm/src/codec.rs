//! Request-response codec for the span and head protocols: each message is one of our frames
//! ([`wire::write_frame`]), not libp2p's CBOR-until-end-of-stream. Frames carry their length,
//! so a receiver refuses an oversized message before allocating it, and a page's writes go out
//! in the pieces native WebRTC peers can read (see [`wire`]'s 8 KiB note): with libp2p's CBOR
//! codec a page's span request of more than 8 KiB (a training step's hidden states) never
//! reached the server.

use std::io;
use std::marker::PhantomData;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{self, WireError};

/// Frames `Req` and `Resp` with a size limit in each direction.
pub struct FrameCodec<Req, Resp> {
    max_frame_bytes: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_frame_bytes)
    }
}

/// One frame, then the end of the stream. Reading up to the end also takes in the sender's
/// close: a WebRTC sender waits for that acknowledgement before it reads the reply, and until
/// then the reply's messages pile up in its queue ("remote overloaded us with messages").
async fn read_message<T, M>(io: &mut T, max: usize) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: DeserializeOwned,
{
    let msg = wire::read_frame(io, max).await.map_err(io_error)?;
    let mut rest = [0u8; 1];
    match io.read(&mut rest).await? {
        0 => Ok(msg),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bytes after the message")),
    }
}

fn io_error(e: WireError) -> io::Error {
    match e {
        WireError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<Req, Resp> request_response::Codec for FrameCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync,
    Resp: Serialize + DeserializeOwned + Send + Sync,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> impl Future<Output = io::Result<Req>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_frame_bytes)
    }

    fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> impl Future<Output = io::Result<Resp>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_frame_bytes)
    }

    fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        // The request-response handler closes the stream after this.
        let max = self.max_frame_bytes;
        async move { wire::write_frame(io, &req, max).await.map_err(io_error) }
    }

    fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        let max = self.max_frame_bytes;
        async move { wire::write_frame(io, &res, max).await.map_err(io_error) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use libp2p::request_response::Codec;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/test/1");

    #[test]
    fn messages_round_trip_and_oversized_ones_are_refused() {
        let mut codec = FrameCodec::<Vec<u32>, String>::new(1 << 16);
        let request: Vec<u32> = (0..5000).collect();
        let mut buf = Vec::new();
        block_on(codec.write_request(&PROTOCOL, &mut buf, request.clone())).expect("write");
        let back = block_on(codec.read_request(&PROTOCOL, &mut futures::io::Cursor::new(&buf))).expect("read");
        assert_eq!(back, request);

        let mut small = FrameCodec::<Vec<u32>, String>::new(64);
        let err = block_on(small.read_request(&PROTOCOL, &mut futures::io::Cursor::new(&buf))).expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let err = block_on(small.write_request(&PROTOCOL, &mut Vec::new(), request)).expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        let mut out = Vec::new();
        block_on(codec.write_response(&PROTOCOL, &mut out, "ok".to_string())).expect("write");
        let mut longer = out.clone();
        longer.push(0);
        let err =
            block_on(codec.read_response(&PROTOCOL, &mut futures::io::Cursor::new(&longer))).expect_err("trailing");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let cut = &out[..out.len() - 1];
        let err = block_on(codec.read_response(&PROTOCOL, &mut futures::io::Cursor::new(cut))).expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}

//! One request and its response on a stream of their own ([`SPAN_PROTOCOL`] and
//! [`HEAD_PROTOCOL`]): the client writes one frame and closes its side, the server reads it
//! (after admitting what the frame's length prefix says it will cost), answers with one frame
//! and closes. Streams instead of libp2p's request-response behaviour put the server in charge
//! of when a request's bytes are read, so a flood of large requests waits at their length
//! prefixes instead of being buffered whole by the connection handler.
//!
//! [`SPAN_PROTOCOL`]: crate::protocol::SPAN_PROTOCOL
//! [`HEAD_PROTOCOL`]: crate::protocol::HEAD_PROTOCOL

use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::node::{Client, NodeError};
use crate::protocol::Limits;
use crate::wire;

/// Sends `request` to `peer` on a new `protocol` stream and reads the one-frame answer. The
/// caller bounds the time it waits (`rt::timeout`).
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    peer: PeerId,
    protocol: StreamProtocol,
    request: &Req,
    limits: &Limits,
) -> Result<Resp, NodeError> {
    let failed = |reason: String| NodeError::Request { peer, reason };
    let mut stream = client.open_stream(peer, protocol).await?;
    wire::write_frame(&mut stream, request, limits.max_frame_bytes)
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream.close().await.map_err(|e| failed(e.to_string()))?;
    let response = wire::read_frame(&mut stream, limits.max_frame_bytes)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(response)
}

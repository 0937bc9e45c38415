//! One request and its response on a stream of their own ([`SPAN_PROTOCOL`] and
//! [`HEAD_PROTOCOL`]): the client writes one frame and closes its side, the server reads it
//! (after admitting what the frame's length prefix says it will cost), answers with one frame
//! and closes. Streams instead of libp2p's request-response behaviour put the server in charge
//! of when a request's bytes are read, so a flood of large requests waits at their length
//! prefixes instead of being buffered whole by the connection handler.
//!
//! [`SPAN_PROTOCOL`]: crate::protocol::SPAN_PROTOCOL
//! [`HEAD_PROTOCOL`]: crate::protocol::HEAD_PROTOCOL

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::node::{Client, NodeError};
use crate::protocol::Limits;
use crate::wire::{self, WireError};

/// How many times a request whose stream the server dropped unanswered is sent again.
const DROPPED_RETRIES: u32 = 4;

/// Sends `request` to `peer` on a new `protocol` stream and reads the one-frame answer. A
/// stream the server ended without answering (a flooded server drops some unread) is tried
/// again a few times, after a growing pause: requests here are stateless, so asking twice is
/// safe. The caller bounds the whole time it waits (`rt::timeout`).
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    peer: PeerId,
    protocol: StreamProtocol,
    request: &Req,
    limits: &Limits,
) -> Result<Resp, NodeError> {
    let mut dropped = 0;
    loop {
        match call_once(client, peer, protocol.clone(), request, limits).await {
            Err(Failure::Wire(e)) if e.is_dropped_stream() && dropped < DROPPED_RETRIES => {
                dropped += 1;
                tracing::debug!(%peer, %protocol, attempt = dropped, error = %e, "stream dropped unanswered; asking again");
                crate::rt::sleep(Duration::from_millis(100) * 2u32.pow(dropped)).await;
            }
            Err(Failure::Wire(e)) => {
                return Err(NodeError::Request {
                    peer,
                    reason: e.to_string(),
                });
            }
            Err(Failure::Node(e)) => return Err(e),
            Ok(response) => return Ok(response),
        }
    }
}

enum Failure {
    Node(NodeError),
    Wire(WireError),
}

async fn call_once<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    peer: PeerId,
    protocol: StreamProtocol,
    request: &Req,
    limits: &Limits,
) -> Result<Resp, Failure> {
    let mut stream = client.open_stream(peer, protocol).await.map_err(Failure::Node)?;
    wire::write_frame(&mut stream, request, limits.max_frame_bytes)
        .await
        .map_err(Failure::Wire)?;
    stream.close().await.map_err(|e| Failure::Wire(e.into()))?;
    wire::read_frame(&mut stream, limits.max_frame_bytes)
        .await
        .map_err(Failure::Wire)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::identity::Keypair;

    use super::*;
    use crate::node::{self, NodeConfig};
    use crate::protocol::SPAN_PROTOCOL;

    async fn listening_node() -> (Client, libp2p::Multiaddr) {
        let mut config = NodeConfig::new(Keypair::generate_ed25519());
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        let (client, _inbound, event_loop) = node::start(config).expect("node");
        tokio::spawn(event_loop.run());
        for _ in 0..100 {
            let listen = client.addresses().await.expect("addresses").listen;
            if let Some(addr) = listen.into_iter().next() {
                let addr = addr.with(libp2p::multiaddr::Protocol::P2p(client.peer_id()));
                return (client, addr);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the node never listened");
    }

    /// A server that drops streams unread (as a flooded one does) is asked again; one that
    /// keeps dropping them is a failure, not a hang.
    #[tokio::test]
    async fn a_dropped_stream_is_asked_again_a_few_times() {
        let (server, addr) = listening_node().await;
        let mut incoming = server.accept(SPAN_PROTOCOL).expect("accept");
        let answered = tokio::spawn(async move {
            let mut seen = 0u32;
            while let Some((_, mut stream)) = incoming.next().await {
                seen += 1;
                // The first two are dropped unread; the third and later are answered.
                if seen > 2 {
                    let n: u32 = wire::read_frame(&mut stream, 1 << 20).await.expect("request");
                    wire::write_frame(&mut stream, &(n + seen), 1 << 20)
                        .await
                        .expect("answer");
                    let _ = stream.close().await;
                }
            }
        });
        let (client, _) = listening_node().await;
        client.dial(addr.clone()).await.expect("dial");
        let peer = server.peer_id();
        let limits = Limits::default();
        let answer: u32 = call(&client, peer, SPAN_PROTOCOL, &7u32, &limits)
            .await
            .expect("answered");
        assert_eq!(answer, 10, "the third stream carries the answer");

        // A peer that never answers: the call ends with an error after its retries.
        let (silent, silent_addr) = listening_node().await;
        let mut dropped = silent.accept(SPAN_PROTOCOL).expect("accept");
        let count = tokio::spawn(async move {
            let mut n = 0u32;
            while let Some((_, stream)) = dropped.next().await {
                n += 1;
                drop(stream);
            }
            n
        });
        client.dial(silent_addr).await.expect("dial");
        let result = call::<u32, u32>(&client, silent.peer_id(), SPAN_PROTOCOL, &1, &limits).await;
        assert!(matches!(result, Err(NodeError::Request { .. })), "{result:?}");
        drop(silent);
        answered.abort();
        count.abort();
    }
}

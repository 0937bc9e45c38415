//! The transports a node dials and listens with, in an open swarm or a private one.
//!
//! Byte-stream transports (TCP, relay circuits) are upgraded with Noise and Yamux; with a
//! private swarm's key, `pnet` wraps them first, so a peer without the key fails before
//! Noise. QUIC and WebRTC-direct authenticate and multiplex by themselves and cannot carry the
//! key: callers include them only where [`crate::private`] allows.

use futures::future::Either;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OptionalTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{PeerId, Transport, noise, relay, yamux};

use crate::node::NodeError;

/// Streams one connection may have open at once. A client needs a few (a session and a
/// request or two per server); each stream may buffer Yamux's 256 KiB window of unread data,
/// so this bounds what one connection can make a server hold.
pub const MAX_STREAMS_PER_CONNECTION: usize = 128;

pub fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
    config
}

/// Which transports a node gets.
pub struct Transports {
    /// A private swarm's key: `pnet` on every byte-stream transport.
    pub psk: Option<PreSharedKey>,
    /// The relay client's transport (dialing and listening through circuits), if any.
    pub relay_client: Option<relay::client::Transport>,
    /// TCP (native only).
    pub tcp: bool,
    /// QUIC (native only).
    pub quic: bool,
    /// WebRTC-direct: natively with this certificate; in the browser, any `Some`.
    #[cfg(not(target_arch = "wasm32"))]
    pub webrtc: Option<libp2p_webrtc::tokio::Certificate>,
    #[cfg(target_arch = "wasm32")]
    pub webrtc: bool,
}

type Muxed = Boxed<(PeerId, StreamMuxerBox)>;

fn transport_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Transport(e.to_string())
}

fn optional<T>(transport: Option<T>) -> OptionalTransport<T> {
    match transport {
        Some(t) => OptionalTransport::some(t),
        None => OptionalTransport::none(),
    }
}

/// Builds the node's transport from `t`.
pub fn build(key: &Keypair, t: Transports) -> Result<Muxed, NodeError> {
    let noise = noise::Config::new(key).map_err(transport_err)?;
    let psk = t.psk;
    #[cfg(not(target_arch = "wasm32"))]
    let raw = optional(t.relay_client)
        .or_transport(optional(t.tcp.then(|| {
            libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true))
        })));
    #[cfg(target_arch = "wasm32")]
    let raw = optional(t.relay_client);
    let streams = raw
        .and_then(move |socket, _| async move {
            match psk {
                Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
                None => Ok(Either::Right(socket)),
            }
        })
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux_config());
    #[cfg(not(target_arch = "wasm32"))]
    let streams = streams.timeout(std::time::Duration::from_secs(20));
    let mut transport: Muxed = streams
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed();

    #[cfg(not(target_arch = "wasm32"))]
    {
        if t.quic {
            let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
                .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
            transport = transport
                .or_transport(quic)
                .map(|either, _| either.into_inner())
                .boxed();
        }
        if let Some(certificate) = t.webrtc {
            let webrtc = libp2p_webrtc::tokio::Transport::new(key.clone(), certificate)
                .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
            transport = transport
                .or_transport(webrtc)
                .map(|either, _| either.into_inner())
                .boxed();
        }
    }
    #[cfg(target_arch = "wasm32")]
    if t.webrtc {
        let webrtc = libp2p::webrtc_websys::Transport::new(libp2p::webrtc_websys::Config::new(key))
            .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
        transport = transport
            .or_transport(webrtc)
            .map(|either, _| either.into_inner())
            .boxed();
    }
    Ok(transport)
}

//! Corolla's libp2p protocol, shared by native code and the browser: message types,
//! the tensor wire format, DHT records, and the swarm event loop with its client handle.

pub mod bundles;
pub mod dht;
pub mod dht_store;
#[cfg(not(target_arch = "wasm32"))]
pub mod http;
pub mod identity;
pub mod limits;
#[cfg(not(target_arch = "wasm32"))]
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod private;
pub mod protocol;
pub mod record;
pub mod remote;
pub mod request;
pub mod routing;
pub mod rt;
pub mod session;
pub mod transport;
pub mod wire;

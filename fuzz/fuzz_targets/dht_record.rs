//! DHT records as a client reads them: CBOR `ServerInfo`s from any peer, through the same
//! validation `swarm::dht` applies before a server is used.
//!
//! Input: the record's value. Peer, model and clock are fixed; the seeds are real records of
//! that peer, so mutations explore both sides of every check.
#![no_main]

use corolla_fuzz::check_message;
use libfuzzer_sys::fuzz_target;
use swarm::dht;
use swarm::protocol::{PROTOCOL_VERSION, ServerInfo};
use swarm::wire;

/// The peer and model the seed records were written for (see `fuzz/seeds.rs`).
const PEER: &str = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp";
const MODEL: &str = "sha256:5d1f0c9e6a7b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5";
const NOW_MS: u64 = 1_750_000_000_000;

fuzz_target!(|data: &[u8]| {
    let peer = PEER.parse().expect("a valid peer id");
    let decoded = wire::from_cbor::<ServerInfo>(data);
    if let Ok(info) = &decoded {
        check_message(info);
    }
    for model in [None, Some(MODEL)] {
        if let Some(info) = dht::live_info(data, &peer, model, NOW_MS) {
            assert_eq!(info.peer_id, PEER, "a record spoke for another peer");
            assert!(
                model.is_none_or(|m| info.model == m),
                "a record of another model was taken"
            );
            assert_eq!(info.protocol, PROTOCOL_VERSION);
            assert!(info.expires_at_ms > NOW_MS, "an expired record was taken");
            assert!(decoded.is_ok());
        }
    }
});

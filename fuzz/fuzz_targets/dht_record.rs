//! DHT records as a client reads them, through the same checks `swarm::dht` applies before a
//! server is used (`swarm::record::verify`).
//!
//! Each input is tried twice: as a signed record envelope, as a peer could store it; and as a
//! CBOR `ServerInfo` that a fixed key signs first, so that mutations reach every field check
//! behind the signature. Peer, model and clock are fixed; the seeds are real records (see
//! `fuzz/examples/seeds.rs`), so mutations explore both sides of every check.
#![no_main]

use corolla_fuzz::check_message;
use libfuzzer_sys::fuzz_target;
use libp2p::identity::Keypair;
use swarm::dht;
use swarm::protocol::{PROTOCOL_VERSION, ServerInfo};
use swarm::record::{self, CLOCK_SKEW, Expect, MAX_ANNOUNCE_TTL, MAX_BLOCKS, MAX_THROUGHPUT};
use swarm::wire;

/// The peer id the seed infos name; the signing path swaps in the fixed key's.
const PEER: &str = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp";
const MODEL: &str = "sha256:5d1f0c9e6a7b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5";
const NOW_MS: u64 = 1_750_000_000_000;
/// The seeds' signing key (seeds.rs uses the same bytes).
const KEY_SEED: [u8; 32] = [7; 32];

fn accepted(info: &ServerInfo, expect: &Expect<'_>) {
    assert_eq!(info.peer_id, expect.peer.to_string(), "a record spoke for another peer");
    assert!(
        expect.model.is_none_or(|m| info.model == m),
        "a record of another model was taken"
    );
    assert_eq!(info.protocol, PROTOCOL_VERSION);
    assert!(info.expires_at_ms > NOW_MS, "an expired record was taken");
    let horizon = NOW_MS + (2 * MAX_ANNOUNCE_TTL + CLOCK_SKEW).as_millis() as u64;
    assert!(info.expires_at_ms <= horizon, "a record from the far future was taken");
    assert!(info.start < info.end && info.end <= expect.num_blocks.unwrap_or(MAX_BLOCKS));
    assert!(info.throughput > 0.0 && info.throughput <= MAX_THROUGHPUT);
}

fuzz_target!(|data: &[u8]| {
    let Ok(key) = Keypair::ed25519_from_bytes(KEY_SEED) else {
        return;
    };
    let peer = key.public().to_peer_id();
    let expects = [None, Some(MODEL)].map(|model| Expect {
        peer: &peer,
        model,
        num_blocks: model.map(|_| 30),
        now_ms: NOW_MS,
    });
    for expect in &expects {
        if let Some(info) = dht::live_info(data, expect) {
            accepted(&info, expect);
        }
    }
    if let Ok(mut info) = wire::from_cbor::<ServerInfo>(data) {
        check_message(&info);
        if info.peer_id == PEER {
            info.peer_id = peer.to_string();
        }
        let Ok(signed) = record::sign(&key, &info) else {
            return;
        };
        for expect in &expects {
            if let Ok(info) = record::verify(&signed, expect) {
                accepted(&info, expect);
            }
        }
    }
});

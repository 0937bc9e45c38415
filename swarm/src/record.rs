//! Signed server records: the [`ServerInfo`] a server publishes in the DHT, signed with its
//! libp2p identity key, and the checks a reader makes before believing one.
//!
//! Anyone can put any bytes under any DHT key, so a record proves itself: it carries the
//! signer's public key and an ed25519 (or other libp2p key type) signature over a
//! domain-separated copy of the info's CBOR bytes. A reader accepts it only when the key hashes
//! to the peer id the record's key names, the signature holds, the info names that same peer,
//! speaks our protocol, has not expired and does not claim to live longer than a server may
//! announce (`2 x MAX_ANNOUNCE_TTL` plus clock skew), and every field is within bounds
//! (a client bundle offer: http(s) URLs, digests of 64 hex digits, sizes within
//! [`MAX_BUNDLE_BYTES`] and [`MAX_META_BUNDLE_BYTES`]).

use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::protocol::{BundleOffer, PROTOCOL_VERSION, ServerInfo};
use crate::wire;

/// What is signed: this prefix, then the info's CBOR bytes. A signature made for anything else
/// with the same key (a libp2p handshake, another protocol version) never verifies here.
const SIGNING_DOMAIN: &[u8] = b"corolla/server-record/";

/// The longest `--announce-ttl` a server may use; a reader refuses records that claim to live
/// longer than twice that (plus [`CLOCK_SKEW`]) from now.
pub const MAX_ANNOUNCE_TTL: Duration = Duration::from_secs(3600);
/// How far a server's clock may run ahead of the reader's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

/// The largest record read at all (a real one is a few KiB).
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Most blocks a model may have when the reader does not know the model.
pub const MAX_BLOCKS: u32 = 4096;
/// The fastest a span can plausibly be, in tokens per second at batch 1: a decode step of
/// 10 µs through a whole span. Records claiming more are lies.
pub const MAX_THROUGHPUT: f64 = 1e5;

/// The largest client bundle a record may announce: more than any model's embeddings and LM
/// head take in f32 (BLOOM-176B's: 29 GB). Clients apply lower limits of their own.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 40;
/// The largest tensor-free bundle a record may announce: a safetensors header is at most
/// 100 MB.
pub const MAX_META_BUNDLE_BYTES: u64 = 128 << 20;

const MAX_NAME: usize = 256;
const MAX_VERSION: usize = 64;
const MAX_ADDRS: usize = 16;
const MAX_ADDR: usize = 512;
const MAX_URL: usize = 2048;
const MAX_ADAPTERS: usize = 64;

/// The envelope stored in the DHT.
#[derive(Serialize, Deserialize)]
struct SignedRecord {
    /// [`ServerInfo`] as CBOR: the exact bytes signed.
    #[serde(with = "serde_bytes")]
    info: Vec<u8>,
    /// The signer's libp2p public key (protobuf encoding).
    #[serde(with = "serde_bytes")]
    public_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

/// Why a record was not believed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("record of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("cannot sign the record: {0}")]
    Sign(String),
    #[error("the signing key is not a libp2p public key")]
    BadKey,
    #[error("signed by {signer}, not by {peer} whose record this is")]
    WrongSigner { signer: PeerId, peer: PeerId },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the info names peer {named}, not its signer {peer}")]
    WrongPeer { named: String, peer: PeerId },
    #[error("of model {got}, not {want}")]
    WrongModel { got: String, want: String },
    #[error("protocol version {got}, this peer speaks {PROTOCOL_VERSION}")]
    Protocol { got: u32 },
    #[error("expired at {expires_at_ms} (now {now_ms})")]
    Expired { expires_at_ms: u64, now_ms: u64 },
    #[error("expires at {expires_at_ms}, later than any announcement may live (limit {limit_ms})")]
    TooFarAhead { expires_at_ms: u64, limit_ms: u64 },
    #[error("span {start}..{end} is not inside a model of {blocks} blocks")]
    Span { start: u32, end: u32, blocks: u32 },
    #[error("the record says the model has {said} blocks, not {blocks}")]
    ModelBlocks { said: u32, blocks: u32 },
    #[error("throughput {0} tokens/s is not plausible")]
    Throughput(f64),
    #[error("client bundle offer: {0}")]
    Bundle(String),
    #[error("field {field} has {len} bytes or entries, over {max}")]
    Field {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// What a reader expects of a record.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The peer the record's DHT key names.
    pub peer: &'a PeerId,
    /// The model fingerprint asked for, if any.
    pub model: Option<&'a str>,
    /// The model's number of blocks, when the reader knows the model.
    pub num_blocks: Option<u32>,
    pub now_ms: u64,
}

fn signed_bytes(info: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 12 + info.len());
    out.extend_from_slice(SIGNING_DOMAIN);
    out.extend_from_slice(PROTOCOL_VERSION.to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(info);
    out
}

/// `info` as a record signed by `keypair` (whose peer id the info must name).
pub fn sign(keypair: &Keypair, info: &ServerInfo) -> Result<Vec<u8>, RecordError> {
    let peer = keypair.public().to_peer_id();
    if info.peer_id != peer.to_string() {
        return Err(RecordError::WrongPeer {
            named: info.peer_id.clone(),
            peer,
        });
    }
    let info = wire::to_cbor(info).map_err(|e| RecordError::Sign(e.to_string()))?;
    let signature = keypair
        .sign(&signed_bytes(&info))
        .map_err(|e| RecordError::Sign(e.to_string()))?;
    let record = SignedRecord {
        info,
        public_key: keypair.public().encode_protobuf(),
        signature,
    };
    wire::to_cbor(&record).map_err(|e| RecordError::Sign(e.to_string()))
}

/// The [`ServerInfo`] in `bytes` if every check passes (see the module docs).
pub fn verify(bytes: &[u8], expect: &Expect<'_>) -> Result<ServerInfo, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            len: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    let record: SignedRecord = wire::from_cbor(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let key = PublicKey::try_decode_protobuf(&record.public_key).map_err(|_| RecordError::BadKey)?;
    let signer = key.to_peer_id();
    if signer != *expect.peer {
        return Err(RecordError::WrongSigner {
            signer,
            peer: *expect.peer,
        });
    }
    if !key.verify(&signed_bytes(&record.info), &record.signature) {
        return Err(RecordError::BadSignature);
    }
    let info: ServerInfo = wire::from_cbor(&record.info).map_err(|e| RecordError::Malformed(e.to_string()))?;
    check_info(&info, expect)?;
    Ok(info)
}

/// The checks on a signed info's fields.
fn check_info(info: &ServerInfo, expect: &Expect<'_>) -> Result<(), RecordError> {
    if info.peer_id != expect.peer.to_string() {
        return Err(RecordError::WrongPeer {
            named: info.peer_id.clone(),
            peer: *expect.peer,
        });
    }
    if info.protocol != PROTOCOL_VERSION {
        return Err(RecordError::Protocol { got: info.protocol });
    }
    if let Some(want) = expect.model
        && info.model != want
    {
        return Err(RecordError::WrongModel {
            got: info.model.clone(),
            want: want.to_string(),
        });
    }
    if info.expires_at_ms <= expect.now_ms {
        return Err(RecordError::Expired {
            expires_at_ms: info.expires_at_ms,
            now_ms: expect.now_ms,
        });
    }
    let ahead = (2 * MAX_ANNOUNCE_TTL + CLOCK_SKEW).as_millis() as u64;
    let limit_ms = expect.now_ms.saturating_add(ahead);
    if info.expires_at_ms > limit_ms {
        return Err(RecordError::TooFarAhead {
            expires_at_ms: info.expires_at_ms,
            limit_ms,
        });
    }
    let blocks = match (expect.num_blocks, info.model_blocks) {
        (Some(n), _) => n,
        (None, 0) => MAX_BLOCKS,
        (None, n) => n.min(MAX_BLOCKS),
    };
    let said = info.model_blocks;
    if said != 0 && (said > MAX_BLOCKS || said != blocks) {
        return Err(RecordError::ModelBlocks {
            said,
            blocks: blocks.min(MAX_BLOCKS),
        });
    }
    if info.start >= info.end || info.end > blocks {
        return Err(RecordError::Span {
            start: info.start,
            end: info.end,
            blocks,
        });
    }
    if !(info.throughput.is_finite() && info.throughput > 0.0 && info.throughput <= MAX_THROUGHPUT) {
        return Err(RecordError::Throughput(info.throughput));
    }
    check_sizes(info)
}

fn check_sizes(info: &ServerInfo) -> Result<(), RecordError> {
    let field = |field, len, max| {
        if len > max {
            Err(RecordError::Field { field, len, max })
        } else {
            Ok(())
        }
    };
    field("model", info.model.len(), MAX_NAME)?;
    field("model_name", info.model_name.len(), MAX_NAME)?;
    field("version", info.version.len(), MAX_VERSION)?;
    field(
        "public_name",
        info.public_name.as_ref().map_or(0, String::len),
        MAX_NAME,
    )?;
    if let Some(offer) = &info.bundle {
        field("bundle.url", offer.url.len(), MAX_URL)?;
        field("bundle.meta_url", offer.meta_url.len(), MAX_URL)?;
        check_bundle(offer)?;
    }
    field("addrs", info.addrs.len(), MAX_ADDRS)?;
    for addr in &info.addrs {
        field("addrs[]", addr.len(), MAX_ADDR)?;
    }
    field("numerics", info.numerics.len(), MAX_VERSION)?;
    field("adapters", info.adapters.len(), MAX_ADAPTERS)?;
    for adapter in &info.adapters {
        field("adapters[]", adapter.len(), MAX_NAME)?;
    }
    Ok(())
}

/// A bundle offer a client could act on: what it fetches is an http(s) URL without spaces or
/// control characters, and what it checks is a digest's form and a plausible size.
fn check_bundle(offer: &BundleOffer) -> Result<(), RecordError> {
    let bad = |reason: String| Err(RecordError::Bundle(reason));
    for (field, url) in [("url", &offer.url), ("meta_url", &offer.meta_url)] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return bad(format!("{field} is not an http(s) URL"));
        }
        if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return bad(format!("{field} has spaces or control characters"));
        }
    }
    for (field, digest) in [("digest", &offer.digest), ("meta_digest", &offer.meta_digest)] {
        if !shared_model::bundle::is_digest(digest) {
            return bad(format!("{field} is not 64 lowercase hex digits"));
        }
    }
    if offer.bytes == 0 || offer.bytes > MAX_BUNDLE_BYTES {
        return bad(format!("{} bytes, not within 1..={MAX_BUNDLE_BYTES}", offer.bytes));
    }
    if offer.meta_bytes == 0 || offer.meta_bytes > MAX_META_BUNDLE_BYTES {
        return bad(format!(
            "meta bundle of {} bytes, not within 1..={MAX_META_BUNDLE_BYTES}",
            offer.meta_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn info(peer: &PeerId) -> ServerInfo {
        ServerInfo::for_test(&peer.to_string(), 0, 4, 10.0, NOW + 300_000)
    }

    fn expect(peer: &PeerId) -> Expect<'_> {
        Expect {
            peer,
            model: Some("m"),
            num_blocks: Some(8),
            now_ms: NOW,
        }
    }

    #[test]
    fn a_signed_record_verifies_and_a_forged_one_does_not() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let good = info(&peer);
        let bytes = sign(&key, &good).expect("sign");
        assert_eq!(verify(&bytes, &expect(&peer)), Ok(good.clone()));

        // Another peer's record re-published under this peer's key.
        let other = Keypair::generate_ed25519();
        let mut forged = good.clone();
        forged.peer_id = other.public().to_peer_id().to_string();
        let bytes = sign(&other, &forged).expect("sign");
        assert!(matches!(
            verify(&bytes, &expect(&peer)),
            Err(RecordError::WrongSigner { .. })
        ));

        // Signed by one key, claiming another's public key: the signature fails.
        let mut record: SignedRecord = wire::from_cbor(&sign(&other, &forged).expect("sign")).expect("decode");
        record.public_key = key.public().encode_protobuf();
        let bytes = wire::to_cbor(&record).expect("encode");
        assert_eq!(verify(&bytes, &expect(&peer)), Err(RecordError::BadSignature));

        // Tampered after signing.
        let mut record: SignedRecord = wire::from_cbor(&sign(&key, &good).expect("sign")).expect("decode");
        let mut changed = good.clone();
        changed.throughput = 20.0;
        record.info = wire::to_cbor(&changed).expect("encode");
        assert_eq!(
            verify(&wire::to_cbor(&record).expect("encode"), &expect(&peer)),
            Err(RecordError::BadSignature)
        );

        // The old unsigned format, garbage, and a huge record.
        assert!(matches!(
            verify(&wire::to_cbor(&good).expect("encode"), &expect(&peer)),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            verify(b"\xff\x00", &expect(&peer)),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            verify(&vec![0; MAX_RECORD_BYTES + 1], &expect(&peer)),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn signed_lies_are_refused_field_by_field() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let check = |change: &dyn Fn(&mut ServerInfo)| {
            let mut i = info(&peer);
            change(&mut i);
            verify(&sign(&key, &i).expect("sign"), &expect(&peer))
        };
        assert!(matches!(
            check(&|i| i.expires_at_ms = u64::MAX),
            Err(RecordError::TooFarAhead { .. })
        ));
        assert!(matches!(
            check(&|i| i.expires_at_ms = NOW),
            Err(RecordError::Expired { .. })
        ));
        assert!(matches!(
            check(&|i| (i.start, i.end) = (3, 2)),
            Err(RecordError::Span { .. })
        ));
        assert!(matches!(
            check(&|i| (i.start, i.end) = (2, 2)),
            Err(RecordError::Span { .. })
        ));
        assert!(matches!(
            check(&|i| i.model_blocks = 9),
            Err(RecordError::ModelBlocks { said: 9, blocks: 8 })
        ));
        assert!(check(&|i| i.model_blocks = 8).is_ok(), "the model's own count");
        assert!(matches!(
            check(&|i| (i.start, i.end) = (4, 9)),
            Err(RecordError::Span { .. })
        ));
        assert!(matches!(
            check(&|i| i.throughput = 1e9),
            Err(RecordError::Throughput(_))
        ));
        assert!(matches!(
            check(&|i| i.throughput = f64::NAN),
            Err(RecordError::Throughput(_))
        ));
        assert!(matches!(
            check(&|i| i.throughput = 0.0),
            Err(RecordError::Throughput(_))
        ));
        assert!(matches!(check(&|i| i.protocol -= 1), Err(RecordError::Protocol { .. })));
        assert!(matches!(
            check(&|i| i.model = "other".into()),
            Err(RecordError::WrongModel { .. })
        ));
        assert!(matches!(
            check(&|i| i.addrs = vec!["x".into(); 17]),
            Err(RecordError::Field { field: "addrs", .. })
        ));
        assert!(matches!(
            check(&|i| i.model_name = "n".repeat(300)),
            Err(RecordError::Field { .. })
        ));
        // Bundle offers: URLs a client can fetch, digests of one form, sizes in range.
        let offer = crate::protocol::BundleOffer {
            url: "http://127.0.0.1:8000/corolla/v1/bundles/a.safetensors".into(),
            digest: "ab".repeat(32),
            bytes: 1 << 20,
            meta_url: "https://example.org/b".into(),
            meta_digest: "cd".repeat(32),
            meta_bytes: 4096,
        };
        assert!(check(&|i| i.bundle = Some(offer.clone())).is_ok());
        let lies: [&dyn Fn(&mut crate::protocol::BundleOffer); 9] = [
            &|o| o.url = "javascript:alert(1)".into(),
            &|o| o.meta_url = "file:///etc/passwd".into(),
            &|o| o.url = "http://a b/".into(),
            &|o| o.digest = "AB".repeat(32),
            &|o| o.meta_digest = "ab".repeat(31),
            &|o| o.bytes = 0,
            &|o| o.bytes = MAX_BUNDLE_BYTES + 1,
            &|o| o.meta_bytes = MAX_META_BUNDLE_BYTES + 1,
            &|o| o.meta_bytes = 0,
        ];
        for lie in lies {
            let mut o = offer.clone();
            lie(&mut o);
            assert!(
                matches!(check(&|i| i.bundle = Some(o.clone())), Err(RecordError::Bundle(_))),
                "{o:?}"
            );
        }
        let mut long = offer.clone();
        long.url = format!("http://x/{}", "a".repeat(MAX_URL));
        assert!(matches!(
            check(&|i| i.bundle = Some(long.clone())),
            Err(RecordError::Field {
                field: "bundle.url",
                ..
            })
        ));
        // Within the limits: an expiry at the far edge of what a server may announce.
        let edge = NOW + (2 * MAX_ANNOUNCE_TTL + CLOCK_SKEW).as_millis() as u64;
        assert!(check(&|i| i.expires_at_ms = edge).is_ok());
        // A reader that does not know the model checks against MAX_BLOCKS.
        let mut i = info(&peer);
        i.end = MAX_BLOCKS + 1;
        let unknown = Expect {
            num_blocks: None,
            model: None,
            ..expect(&peer)
        };
        assert!(matches!(
            verify(&sign(&key, &i).expect("sign"), &unknown),
            Err(RecordError::Span { .. })
        ));
        // Signing for another peer is refused up front.
        let mut i = info(&peer);
        i.peer_id = Keypair::generate_ed25519().public().to_peer_id().to_string();
        assert!(matches!(sign(&key, &i), Err(RecordError::WrongPeer { .. })));
    }
}

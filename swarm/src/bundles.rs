//! Which server's client bundle a client downloads, and the check every download must pass
//! before it is used or cached; shared by the page and `corolla generate`, so both trust
//! exactly the same bytes.
//!
//! Each server signs its bundle's content digest ([`BundleOffer`], see
//! `shared_model::bundle::digest`) in its DHT record. Servers of one checkpoint announce one
//! digest unless their bundles differ (another model name given to the same weights, another
//! version of the bundle format, a liar), so a client prefers the digest announced by the most
//! servers, tries each of its servers in turn, and only then the next digest. A download is
//! taken only if it has the size and digest its own record promised and names the model asked
//! for; anything else is an error naming the URL.
//!
//! What this does not prove: that the bundle is the fingerprinted checkpoint's. A server signs
//! its own record, so a lone liar can announce the digest of a bundle it forged; preferring
//! the digest most servers agree on is what stands against that.

use std::collections::HashMap;

use shared_model::ModelError;
use shared_model::bundle::{BundleError, ClientBundle, Expected};

use crate::protocol::{BundleOffer, ServerInfo};

/// The two files of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Config, tokenizer, chat template, embeddings and LM head.
    Full,
    /// The same without tensors, read first to learn the model.
    Meta,
}

impl BundleOffer {
    /// The URL, digest and size of one part.
    pub fn part(&self, part: Part) -> (&str, &str, u64) {
        match part {
            Part::Full => (&self.url, &self.digest, self.bytes),
            Part::Meta => (&self.meta_url, &self.meta_digest, self.meta_bytes),
        }
    }
}

/// One server's offer, as a client should try it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate<'a> {
    pub peer: &'a str,
    pub offer: &'a BundleOffer,
    /// How many servers announce this offer's digests.
    pub agreeing: usize,
}

/// The servers' offers in the order to try them: grouped by their (bundle, meta bundle)
/// digests, the group announced by the most servers first (ties broken by digest, so every
/// client agrees), each URL once.
pub fn candidates(servers: &[ServerInfo]) -> Vec<Candidate<'_>> {
    let offers: Vec<(&str, &BundleOffer)> = servers
        .iter()
        .filter_map(|s| s.bundle.as_ref().map(|o| (s.peer_id.as_str(), o)))
        .collect();
    let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
    for (_, o) in &offers {
        *counts.entry((&o.digest, &o.meta_digest)).or_default() += 1;
    }
    let mut out: Vec<Candidate<'_>> = Vec::new();
    for (peer, offer) in offers {
        if out
            .iter()
            .any(|c| c.offer.url == offer.url && c.offer.digest == offer.digest)
        {
            continue;
        }
        let agreeing = counts
            .get(&(offer.digest.as_str(), offer.meta_digest.as_str()))
            .copied()
            .unwrap_or(0);
        out.push(Candidate { peer, offer, agreeing });
    }
    // Stable: within a group, servers keep the order discovery found them in.
    out.sort_by(|a, b| {
        b.agreeing
            .cmp(&a.agreeing)
            .then_with(|| a.offer.digest.cmp(&b.offer.digest))
            .then_with(|| a.offer.meta_digest.cmp(&b.offer.meta_digest))
    });
    out
}

/// Why a downloaded bundle was not taken. Each message is whole (the URL and the reason), so
/// the reason is not also chained as a source.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the client bundle from {url} does not match the model's signed record ({reason})")]
    Mismatch { url: String, reason: BundleError },
    #[error("the client bundle from {url} has {got} bytes, not the {want} the model's signed record announces")]
    Size { url: String, got: u64, want: u64 },
    #[error("the client bundle from {url} is unusable: {reason}")]
    Invalid { url: String, reason: ModelError },
}

/// Checks the size of a download before it is read, from its announced length (HTTP
/// `Content-Length`), so a wrong one is refused without downloading it.
pub fn check_size(offer: &BundleOffer, part: Part, got: u64) -> Result<(), CheckError> {
    let (url, _, want) = offer.part(part);
    if got != want {
        return Err(CheckError::Size {
            url: url.to_string(),
            got,
            want,
        });
    }
    Ok(())
}

/// `bytes`, downloaded from `offer`'s `part` (or read back from a cache), as a bundle of model
/// `fingerprint`, if its size and digest are those the offer promises and it names that model.
pub fn verify(bytes: Vec<u8>, offer: &BundleOffer, part: Part, fingerprint: &str) -> Result<ClientBundle, CheckError> {
    check_size(offer, part, bytes.len() as u64)?;
    let (url, digest, _) = offer.part(part);
    let expected = Expected { fingerprint, digest };
    ClientBundle::verified(bytes, &expected).map_err(|e| match e {
        ModelError::Bundle(reason @ (BundleError::Digest { .. } | BundleError::WrongModel { .. })) => {
            CheckError::Mismatch {
                url: url.to_string(),
                reason,
            }
        }
        reason => CheckError::Invalid {
            url: url.to_string(),
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(url: &str, digest: char) -> BundleOffer {
        BundleOffer {
            url: url.into(),
            digest: digest.to_string().repeat(64),
            bytes: 10,
            meta_url: format!("{url}-meta"),
            meta_digest: "0".repeat(64),
            meta_bytes: 5,
        }
    }

    fn server(peer: &str, bundle: Option<BundleOffer>) -> ServerInfo {
        let mut info = ServerInfo::for_test(peer, 0, 4, 10.0, 1);
        info.bundle = bundle;
        info
    }

    #[test]
    fn the_digest_most_servers_announce_comes_first() {
        let servers = [
            server("lone", Some(offer("http://lone/b", 'f'))),
            server("none", None),
            server("a", Some(offer("http://a/b", 'a'))),
            server("b", Some(offer("http://b/b", 'a'))),
            // Another server announcing the same URL: tried once.
            server("c", Some(offer("http://a/b", 'a'))),
            server("other", Some(offer("http://other/b", 'e'))),
        ];
        let order: Vec<(&str, usize)> = candidates(&servers).iter().map(|c| (c.peer, c.agreeing)).collect();
        assert_eq!(order, [("a", 3), ("b", 3), ("other", 1), ("lone", 1)]);
        assert!(candidates(&servers[1..2]).is_empty());
    }

    #[test]
    fn a_download_must_have_the_announced_size_and_digest() {
        let o = offer("http://a/b", 'a');
        let err = verify(vec![0; 9], &o, Part::Full, "m").expect_err("short");
        assert!(matches!(err, CheckError::Size { got: 9, want: 10, .. }), "{err}");
        let err = verify(vec![0; 5], &o, Part::Meta, "m").expect_err("not a bundle");
        assert!(
            matches!(&err, CheckError::Invalid { url, .. } if url == "http://a/b-meta"),
            "{err}"
        );
        assert!(check_size(&o, Part::Full, 10).is_ok());
    }

    /// A real (tensor-free) bundle: taken with its digest, refused with another, the error
    /// naming the URL and both digests.
    #[test]
    fn a_bundle_is_taken_only_with_its_signed_digest() {
        use shared_model::bundle::{BundleMeta, digest, write_meta_bundle};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama");
        let files = shared_model::loader::ModelFiles::open(&dir).expect("fixture");
        let meta = BundleMeta {
            name: "llama",
            fingerprint: "m",
            hf_config: &files.hf_config,
            tokenizer: None,
            chat_template: None,
            stop_ids: &files.stop_ids,
        };
        let bytes = write_meta_bundle(&meta, &files.config).expect("meta bundle");
        let mut o = offer("http://a/b", 'a');
        o.meta_bytes = bytes.len() as u64;
        o.meta_digest = digest(&bytes).expect("digest");
        let bundle = verify(bytes.clone(), &o, Part::Meta, "m").expect("verifies");
        assert_eq!(bundle.name, "llama");
        let err = verify(bytes.clone(), &o, Part::Meta, "n").expect_err("another model");
        assert!(err.to_string().contains("it is a bundle of model m, not of n"), "{err}");
        let want = "1".repeat(64);
        o.meta_digest = want.clone();
        let err = verify(bytes, &o, Part::Meta, "m").expect_err("another digest");
        assert_eq!(
            err.to_string(),
            format!(
                "the client bundle from http://a/b-meta does not match the model's signed record (sha256 {}, expected {want})",
                match &err {
                    CheckError::Mismatch {
                        reason: BundleError::Digest { got, .. },
                        ..
                    } => got.clone(),
                    other => panic!("{other}"),
                }
            )
        );
    }
}

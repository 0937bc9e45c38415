//! Getting a model's client bundle: from which server, and only once it is checked.
//!
//! The servers' offers are tried in `swarm::bundles::candidates`' order (the digest most
//! servers sign first, each of its servers before the next digest). From each, the page reads
//! the tensor-free meta bundle, then, if this tab should hold the embeddings and head, the full
//! bundle; each must pass `swarm::bundles::verify` against the record the URL came from (size,
//! content digest, fingerprint) before it is used or cached. The cache is keyed by digest and
//! checked again when read. An offer that fails is logged and the next one tried; when all
//! fail, the first (preferred) offer's error is the page's.

use shared_model::bundle::ClientBundle;
use swarm::bundles::{self, Candidate, Part};
use swarm::protocol::ServerInfo;
use swarm::record::MAX_META_BUNDLE_BYTES;

use crate::client::{BROWSER_HEAD_BUDGET, ClientError};
use crate::fetch::{self, Origin};

/// The largest full bundle the page downloads: the embeddings and head it would hold at most,
/// with the text parts.
const MAX_BUNDLE_BYTES: u64 = BROWSER_HEAD_BUDGET + MAX_META_BUNDLE_BYTES;

/// A model's client part as this page will run it.
pub struct Obtained {
    /// The full bundle, or the meta bundle when a server runs the embeddings and head.
    pub bundle: ClientBundle,
    /// Where the full bundle came from (`None`: only the meta bundle was read).
    pub origin: Option<Origin>,
    /// Why a server must run the embeddings and head, if one must.
    pub remote_reason: Option<String>,
}

/// Progress reports to the page while a bundle is fetched.
pub trait Report {
    fn status(&self, text: &str);
    fn progress(&self, done: u64, total: Option<u64>);
}

/// The checked bundle of model `fingerprint` from one of `servers`' offers. `remote_reason`
/// decides from the meta bundle whether the page holds the tensors (`Some(reason)`: it does
/// not, and only the meta bundle is downloaded).
pub async fn obtain(
    servers: &[ServerInfo],
    fingerprint: &str,
    remote_reason: impl Fn(&ClientBundle) -> Option<String>,
    report: &impl Report,
) -> Result<Obtained, ClientError> {
    let candidates = bundles::candidates(servers);
    if candidates.is_empty() {
        return Err(ClientError::Setup(
            "no server of this model offers its client bundle over HTTP".into(),
        ));
    }
    let mut first_error = None;
    let mut failed = 0usize;
    for candidate in &candidates {
        match from_offer(candidate, fingerprint, &remote_reason, report).await {
            Ok(obtained) => return Ok(obtained),
            Err(e) => {
                tracing::warn!(peer = candidate.peer, error = %e, "client bundle refused; trying the next server");
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let first = first_error.map_or_else(String::new, |e| e.to_string());
    Err(ClientError::Bundle(if failed > 1 {
        format!("{first} (and {} other offers of this model failed too)", failed - 1)
    } else {
        first
    }))
}

async fn from_offer(
    candidate: &Candidate<'_>,
    fingerprint: &str,
    remote_reason: &impl Fn(&ClientBundle) -> Option<String>,
    report: &impl Report,
) -> Result<Obtained, ClientError> {
    let offer = candidate.offer;
    report.status("Reading the model's description…");
    let meta = fetch::checked(
        &offer.meta_url,
        &cache_key(&offer.meta_digest),
        offer.meta_bytes,
        |bytes| bundles::verify(bytes, offer, Part::Meta, fingerprint).map_err(ClientError::from),
        |_, _| {},
    )
    .await?
    .value;
    if let Some(reason) = remote_reason(&meta) {
        return Ok(Obtained {
            bundle: meta,
            origin: None,
            remote_reason: Some(reason),
        });
    }
    if offer.bytes > MAX_BUNDLE_BYTES {
        return Err(ClientError::Bundle(format!(
            "the client bundle from {} has {} bytes, more than this page downloads ({MAX_BUNDLE_BYTES})",
            offer.url, offer.bytes
        )));
    }
    report.status("Downloading the tokenizer, embeddings and LM head…");
    let full = fetch::checked(
        &offer.url,
        &cache_key(&offer.digest),
        offer.bytes,
        |bytes| {
            report.status("Checking the client bundle…");
            bundles::verify(bytes, offer, Part::Full, fingerprint).map_err(ClientError::from)
        },
        |done, total| report.progress(done, total),
    )
    .await?;
    Ok(Obtained {
        bundle: full.value,
        origin: Some(full.origin),
        remote_reason: None,
    })
}

/// The cache entry of a bundle: its digest, under a path of the page's own origin that is
/// never fetched (the Cache API wants a URL).
fn cache_key(digest: &str) -> String {
    format!("/corolla/cache/bundles/{digest}.safetensors")
}

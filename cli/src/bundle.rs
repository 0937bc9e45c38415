//! `corolla generate --model FINGERPRINT --initial-peers ...`: the model's client bundle
//! (config, tokenizer, chat template, embeddings, LM head) from one of its servers, checked as
//! the page checks it (`swarm::bundles`), and cached by content digest.
//!
//! Offers are tried in `swarm::bundles::candidates`' order (the digest most servers sign
//! first). For each: the cached copy `<cache>/bundles/<digest>.safetensors` if it passes the
//! check again (one that does not is deleted), else a download over HTTP (connect and read
//! timeouts, at most the announced size), written to the cache only once it passed. When every
//! offer fails, the preferred one's error is the command's.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shared_model::bundle::ClientBundle;
use shared_model::loader::ModelFiles;
use swarm::bundles::{self, Candidate, Part};
use swarm::dht;
use swarm::node::Client;
use swarm::protocol::ServerInfo;

/// How long to look for the model's servers in the DHT (a fresh node's first lookups may miss).
const DISCOVERY_PATIENCE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A download that stalls this long (no byte read) fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest bundle this client holds in memory, whatever a record announces: more than the
/// f32 embeddings and head of the largest supported models (BLOOM-176B's: 29 GB).
const MAX_BUNDLE_BYTES: u64 = 48 << 30;

/// Whether `text` is a model fingerprint as `shared_model::fingerprint` writes it.
pub fn is_fingerprint(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The client part of model `fingerprint`, from a checked bundle (cached under `cache`).
pub fn fetch(runtime: &tokio::runtime::Handle, client: &Client, fingerprint: &str, cache: &Path) -> Result<ModelFiles> {
    let servers = runtime.block_on(find_offers(client, fingerprint))?;
    let dir = cache.join("bundles");
    let mut first_error = None;
    let mut failed = 0usize;
    for candidate in bundles::candidates(&servers) {
        match from_offer(&candidate, fingerprint, &dir) {
            Ok((bundle, path)) => return Ok(ModelFiles::from_bundle(bundle, &path)),
            Err(e) => {
                tracing::warn!(peer = candidate.peer, error = format!("{e:#}"), "client bundle refused");
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let Some(first) = first_error else {
        bail!("no server of model {fingerprint} offers its client bundle");
    };
    if failed > 1 {
        return Err(first.context(format!(
            "no client bundle of model {fingerprint} passed its check ({failed} offers tried; the first one's error follows)"
        )));
    }
    Err(first)
}

/// The model's live servers, once at least one offers its bundle.
async fn find_offers(client: &Client, fingerprint: &str) -> Result<Vec<ServerInfo>> {
    let start = Instant::now();
    loop {
        let servers = dht::discover(client, fingerprint, None, Duration::from_secs(10))
            .await
            .unwrap_or_default();
        if servers.iter().any(|s| s.bundle.is_some()) {
            return Ok(servers);
        }
        if start.elapsed() >= DISCOVERY_PATIENCE {
            if servers.is_empty() {
                bail!("no server of model {fingerprint} was found in the swarm");
            }
            bail!(
                "none of the {} servers of model {fingerprint} offers its client bundle (a server offers it with --http-listen)",
                servers.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One offer's bundle: the cached copy if it still checks out, else a checked download.
fn from_offer(candidate: &Candidate<'_>, fingerprint: &str, dir: &Path) -> Result<(ClientBundle, PathBuf)> {
    let offer = candidate.offer;
    if offer.bytes > MAX_BUNDLE_BYTES {
        bail!(
            "the client bundle from {} has {} bytes, more than this client holds ({MAX_BUNDLE_BYTES})",
            offer.url,
            offer.bytes
        );
    }
    let path = dir.join(format!("{}.safetensors", offer.digest));
    if let Some(bytes) = read_cached(&path, offer.bytes) {
        match bundles::verify(bytes, offer, Part::Full, fingerprint) {
            Ok(bundle) => {
                tracing::info!(path = %path.display(), "client bundle from the cache");
                return Ok((bundle, path));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "a cached client bundle failed its check; downloading it again");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let bytes = download(&offer.url, offer.bytes)?;
    // Written aside before the check (which keeps the bytes), renamed into place only after it.
    let partial = dir.join(format!("{}.partial-{}", offer.digest, std::process::id()));
    let written = write_partial(dir, &partial, &bytes);
    let checked = bundles::verify(bytes, offer, Part::Full, fingerprint);
    match (&checked, written) {
        (Ok(_), Ok(())) => {
            if let Err(e) = std::fs::rename(&partial, &path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache the client bundle");
                let _ = std::fs::remove_file(&partial);
            }
        }
        (_, written) => {
            if let Err(e) = written {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot cache the client bundle");
            }
            let _ = std::fs::remove_file(&partial);
        }
    }
    let bundle = checked?;
    tracing::info!(url = %offer.url, "client bundle downloaded and checked");
    Ok((bundle, path))
}

/// The cached file if it has the announced size (anything else is not that bundle).
fn read_cached(path: &Path, bytes: u64) -> Option<Vec<u8>> {
    let len = std::fs::metadata(path).ok()?.len();
    if len != bytes {
        tracing::warn!(path = %path.display(), len, bytes, "a cached client bundle has the wrong size; deleting it");
        let _ = std::fs::remove_file(path);
        return None;
    }
    std::fs::read(path).ok()
}

fn write_partial(dir: &Path, partial: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut file = std::fs::File::create(partial)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// GETs `url`, refusing more than `limit` bytes (before reading, when the response announces
/// more).
fn download(url: &str, limit: u64) -> Result<Vec<u8>> {
    if !url.starts_with("http://") {
        bail!("cannot download {url}: this client fetches client bundles over plain http:// only");
    }
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .timeout_write(CONNECT_TIMEOUT)
        .build();
    let response = agent
        .get(url)
        .call()
        .with_context(|| format!("cannot download the client bundle from {url}"))?;
    let announced = response.header("content-length").and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced
        && n > limit
    {
        bail!("{url} sends {n} bytes, more than the {limit} the model's signed record announces");
    }
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0).min(limit) as usize);
    response
        .into_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot download the client bundle from {url}"))?;
    if bytes.len() as u64 > limit {
        bail!("{url} sends more than the {limit} bytes the model's signed record announces");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_32_lowercase_hex_digits() {
        assert!(is_fingerprint("00112233445566778899aabbccddeeff"));
        assert!(!is_fingerprint("00112233445566778899AABBCCDDEEFF"));
        assert!(!is_fingerprint("tests/fixtures/llama"));
        assert!(!is_fingerprint("00112233445566778899aabbccddeef"));
    }
}

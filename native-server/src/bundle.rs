//! The model's client bundle (tokenizer, config, embeddings, LM head) over HTTP, for browsers
//! and `corolla generate --model FINGERPRINT` (`server --http-listen`).
//!
//! Both files are addressed by their content digest (`/corolla/v1/bundles/<digest>.safetensors`),
//! which the server also signs into its DHT record ([`BundleOffer`]): a URL always names the
//! same bytes, so browsers may cache it for good, and clients can check what they got.

use std::sync::Arc;

use anyhow::{Context, Result};
use shared_model::bundle::{BundleMeta, digest, write_bundle, write_meta_bundle};
use shared_model::loader::ModelFiles;
use swarm::http;
use swarm::protocol::BundleOffer;

/// A served bundle: what the record announces and how many bytes it keeps in memory.
pub struct ServedBundle {
    pub offer: BundleOffer,
    pub bytes: u64,
}

/// Builds the bundle and its tensor-free twin and serves them; `base_url` is the URL clients
/// reach `addr` at (a proxy in front of it, say), by default `http://<addr>`.
pub async fn serve(
    files: &ModelFiles,
    name: &str,
    fingerprint: &str,
    addr: std::net::SocketAddr,
    base_url: Option<&str>,
) -> Result<ServedBundle> {
    let meta = BundleMeta {
        name,
        fingerprint,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    };
    let bundle =
        Arc::new(write_bundle(&meta, &files.config, files.weights.as_ref()).context("cannot build the client bundle")?);
    let meta_bundle = Arc::new(write_meta_bundle(&meta, &files.config).context("cannot build the client bundle")?);
    let bundle_digest = digest(&bundle).context("cannot digest the client bundle")?;
    let meta_digest = digest(&meta_bundle).context("cannot digest the client bundle")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let bound = listener.local_addr()?;
    let base = base_url.map_or_else(|| format!("http://{bound}"), str::to_string);
    let path = format!("/corolla/v1/bundles/{bundle_digest}.safetensors");
    let meta_path = format!("/corolla/v1/bundles/{meta_digest}.safetensors");
    let offer = BundleOffer {
        url: format!("{base}{path}"),
        digest: bundle_digest.clone(),
        bytes: bundle.len() as u64,
        meta_url: format!("{base}{meta_path}"),
        meta_digest: meta_digest.clone(),
        meta_bytes: meta_bundle.len() as u64,
    };
    let handler: http::Handler = Arc::new(move |request: &http::HttpRequest| {
        if request.path == path {
            http::HttpResponse::ok("application/octet-stream", bundle.clone()).immutable(&bundle_digest)
        } else if request.path == meta_path {
            http::HttpResponse::ok("application/octet-stream", meta_bundle.clone()).immutable(&meta_digest)
        } else {
            http::HttpResponse::error(404, "not found")
        }
    });
    tokio::spawn(http::serve(listener, handler));
    tracing::info!(
        url = %offer.url,
        digest = %offer.digest,
        meta_digest = %offer.meta_digest,
        bytes = offer.bytes,
        "serving the client bundle"
    );
    Ok(ServedBundle {
        bytes: offer.bytes + offer.meta_bytes,
        offer,
    })
}

//! The model's client bundle (tokenizer, config, embeddings, LM head) over HTTP, for browsers
//! and `corolla generate --model FINGERPRINT` (`server --http-listen`).
//!
//! Both files are addressed by their content digest (`/corolla/v1/bundles/<digest>.safetensors`),
//! which the server also signs into its DHT record ([`BundleOffer`]): a URL always names the
//! same bytes, so browsers may cache it for good, and clients can check what they got.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{HeaderValue, header};
use shared_model::bundle::{BundleMeta, digest, write_bundle, write_meta_bundle};
use shared_model::loader::ModelFiles;
use swarm::http;
use swarm::protocol::BundleOffer;
use tower_http::services::ServeFile;
use tower_http::set_header::SetResponseHeaderLayer;

/// A served bundle: what the record announces.
pub struct ServedBundle {
    pub offer: BundleOffer,
}

/// Builds the bundle and its tensor-free twin, writes them under `dir` (named by digest, so a
/// restart reuses them) and serves them from there, with range requests; `base_url` is the
/// URL clients reach `addr` at (a proxy in front of it, say), by default `http://<addr>`.
pub async fn serve(
    files: &ModelFiles,
    name: &str,
    fingerprint: &str,
    addr: std::net::SocketAddr,
    base_url: Option<&str>,
    dir: &Path,
) -> Result<ServedBundle> {
    let meta = BundleMeta {
        name,
        fingerprint,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    };
    let (bundle_digest, bundle_file, bytes) = {
        let bundle =
            write_bundle(&meta, &files.config, files.weights.as_ref()).context("cannot build the client bundle")?;
        store(dir, &bundle)?
    };
    let (meta_digest, meta_file, meta_bytes) = {
        let bundle = write_meta_bundle(&meta, &files.config).context("cannot build the client bundle")?;
        store(dir, &bundle)?
    };
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
        bytes,
        meta_url: format!("{base}{meta_path}"),
        meta_digest: meta_digest.clone(),
        meta_bytes,
    };
    let router = immutable(&path, bundle_file, &bundle_digest)?
        .merge(immutable(&meta_path, meta_file, &meta_digest)?)
        .fallback(|| async { http::error(axum::http::StatusCode::NOT_FOUND, "not found") });
    let limits = http::HttpLimits::default();
    tokio::spawn(http::serve(listener, http::public(router, &limits), limits));
    tracing::info!(
        url = %offer.url,
        digest = %offer.digest,
        meta_digest = %offer.meta_digest,
        bytes = offer.bytes,
        "serving the client bundle"
    );
    Ok(ServedBundle { offer })
}

/// A route serving `file` at `path`. Content addressed by its digest never changes: browsers
/// may keep it for good.
fn immutable(path: &str, file: PathBuf, digest: &str) -> Result<Router> {
    let etag = HeaderValue::from_str(&format!("\"{digest}\""))?;
    Ok(Router::new()
        .route_service(path, ServeFile::new(file))
        .layer(SetResponseHeaderLayer::overriding(header::ETAG, etag))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        )))
}

/// Writes `bytes` to `<dir>/<digest>.safetensors` (atomically; kept if already there) and
/// returns the digest, the file and its size.
fn store(dir: &Path, bytes: &[u8]) -> Result<(String, PathBuf, u64)> {
    let digest = digest(bytes).context("cannot digest the client bundle")?;
    let path = dir.join(format!("{digest}.safetensors"));
    let size = bytes.len() as u64;
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".{digest}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((digest, path, size))
}

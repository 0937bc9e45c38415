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
use shared_model::bundle::{
    BundleMeta, bundle_recipe, digest, digest_file, is_digest, write_bundle_file, write_meta_bundle,
};
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
/// `variant` names what the server does to the weights on load (quantizing them), which
/// changes the bundle but not the checkpoint.
pub async fn serve(
    files: &ModelFiles,
    name: &str,
    fingerprint: &str,
    variant: &str,
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
    let (bundle_digest, bundle_file, bytes) = full_bundle(&meta, files, variant, dir)?;
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

/// The full bundle's digest, file and size: the file an earlier start wrote for the same
/// recipe ([`bundle_recipe`]), else one written now, tensor by tensor (never whole in memory).
fn full_bundle(meta: &BundleMeta<'_>, files: &ModelFiles, variant: &str, dir: &Path) -> Result<(String, PathBuf, u64)> {
    let recipe = bundle_recipe(meta, &files.config, files.weights.as_ref(), variant)
        .context("cannot describe the client bundle")?;
    let note = dir.join("recipes").join(recipe);
    if let Some(found) = written_before(&note, dir) {
        tracing::info!(digest = %found.0, bytes = found.2, "reusing the client bundle written before");
        return Ok(found);
    }
    let started = std::time::Instant::now();
    std::fs::create_dir_all(note.parent().unwrap_or(dir))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".bundle.{}.tmp", std::process::id()));
    let built = write_bundle_file(meta, &files.config, files.weights.as_ref(), &tmp)
        .context("cannot build the client bundle")
        .and_then(|_| digest_file(&tmp).context("cannot digest the client bundle"));
    let (digest, size) = match built {
        Ok(found) => found,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = dir.join(format!("{digest}.safetensors"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        // Another server of this model wrote (and may be serving) the same content.
        let _ = std::fs::remove_file(&tmp);
    } else {
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // The note last: it promises a complete file.
    let note_tmp = note.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&note_tmp, format!("{digest} {size}\n"))
        .with_context(|| format!("cannot write {}", note_tmp.display()))?;
    std::fs::rename(&note_tmp, &note).with_context(|| format!("cannot write {}", note.display()))?;
    tracing::info!(%digest, bytes = size, elapsed_ms = started.elapsed().as_millis() as u64, "built the client bundle");
    Ok((digest, path, size))
}

/// The bundle a recipe's note names, if the note is well-formed and its file is still there
/// with the size the note gives (anything else: build it again).
fn written_before(note: &Path, dir: &Path) -> Option<(String, PathBuf, u64)> {
    let text = std::fs::read_to_string(note).ok()?;
    let (digest, size) = text.trim().split_once(' ')?;
    let size: u64 = size.parse().ok()?;
    if !is_digest(digest) {
        return None;
    }
    let path = dir.join(format!("{digest}.safetensors"));
    (std::fs::metadata(&path).ok()?.len() == size).then(|| (digest.to_string(), path, size))
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

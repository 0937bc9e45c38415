//! The model's client bundle (tokenizer, config, embeddings, LM head) over HTTP, for browsers
//! (`server --http-listen`).

use std::sync::Arc;

use anyhow::{Context, Result};
use shared_model::bundle::{BundleMeta, write_bundle, write_meta_bundle};
use shared_model::loader::ModelFiles;
use swarm::http;

/// A served bundle: its URL and how many bytes it keeps in memory.
pub struct ServedBundle {
    pub url: String,
    pub bytes: u64,
}

/// Builds the bundle and serves it; returns its URL.
pub async fn serve(
    files: &ModelFiles,
    name: &str,
    fingerprint: &str,
    addr: std::net::SocketAddr,
    base_url: Option<&str>,
) -> Result<ServedBundle> {
    let meta = BundleMeta {
        name,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    };
    let bundle =
        Arc::new(write_bundle(&meta, &files.config, files.weights.as_ref()).context("cannot build the client bundle")?);
    let meta_bundle = Arc::new(write_meta_bundle(&meta, &files.config).context("cannot build the client bundle")?);
    let bytes = (bundle.len() + meta_bundle.len()) as u64;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let bound = listener.local_addr()?;
    let path = format!("/corolla/v1/models/{fingerprint}/client.safetensors");
    let meta_path = format!("/corolla/v1/models/{fingerprint}/client-meta.safetensors");
    let url = format!(
        "{}{path}",
        base_url.map_or_else(|| format!("http://{bound}"), str::to_string)
    );
    let fp = fingerprint.to_string();
    let handler: http::Handler = Arc::new(move |request: &http::HttpRequest| {
        if request.path == path {
            http::HttpResponse::ok("application/octet-stream", bundle.clone()).immutable(&fp)
        } else if request.path == meta_path {
            http::HttpResponse::ok("application/octet-stream", meta_bundle.clone()).immutable(&format!("{fp}-meta"))
        } else {
            http::HttpResponse::error(404, "not found")
        }
    });
    tokio::spawn(http::serve(listener, handler));
    tracing::info!(%url, "serving the client bundle");
    Ok(ServedBundle { url, bytes })
}

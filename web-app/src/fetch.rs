//! HTTP from the page: small JSON documents, and large downloads that report progress and are
//! kept in the browser's Cache API, so a reload does not download the weights again.

use js_sys::{Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, Request, Response};

/// The Cache API bucket; bundles are addressed by fingerprint, so entries never go stale.
const CACHE_NAME: &str = "corolla-bundles-v1";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Failed { url: String, reason: String },
}

fn failed(url: &str, reason: impl std::fmt::Display) -> FetchError {
    FetchError::Failed {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

fn js_reason(v: JsValue) -> String {
    v.as_string()
        .or_else(|| Reflect::get(&v, &"message".into()).ok().and_then(|m| m.as_string()))
        .unwrap_or_else(|| format!("{v:?}"))
}

async fn fetch_response(url: &str) -> Result<Response, FetchError> {
    let window = web_sys::window().ok_or_else(|| failed(url, "no window"))?;
    let response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| failed(url, js_reason(e)))?;
    let response: Response = response.dyn_into().map_err(|_| failed(url, "not a Response"))?;
    if !response.ok() {
        return Err(failed(url, format!("HTTP {}", response.status())));
    }
    Ok(response)
}

/// GETs a JSON document.
pub async fn json(url: &str) -> Result<serde_json::Value, FetchError> {
    let response = fetch_response(url).await?;
    let text = JsFuture::from(response.text().map_err(|e| failed(url, js_reason(e)))?)
        .await
        .map_err(|e| failed(url, js_reason(e)))?
        .as_string()
        .unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| failed(url, e))
}

async fn open_cache() -> Option<Cache> {
    let caches = web_sys::window()?.caches().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into().ok()
}

/// Where a download came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Network,
}

/// GETs `url` from the cache, or from the network while calling `progress(done, total)`, then
/// stores it in the cache.
pub async fn cached_bytes(
    url: &str,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<(Vec<u8>, Origin), FetchError> {
    let cache = open_cache().await;
    if let Some(cache) = &cache
        && let Ok(hit) = JsFuture::from(cache.match_with_str(url)).await
        && let Ok(response) = hit.dyn_into::<Response>()
    {
        let buffer = JsFuture::from(response.array_buffer().map_err(|e| failed(url, js_reason(e)))?)
            .await
            .map_err(|e| failed(url, js_reason(e)))?;
        let bytes = Uint8Array::new(&buffer).to_vec();
        progress(bytes.len() as u64, Some(bytes.len() as u64));
        return Ok((bytes, Origin::Cache));
    }

    let response = fetch_response(url).await?;
    let total = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<u64>().ok());
    let body = response.body().ok_or_else(|| failed(url, "empty body"))?;
    let reader: web_sys::ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| failed(url, "no stream reader"))?;
    let mut bytes = Vec::with_capacity(total.unwrap_or(0).min(4 << 30) as usize);
    loop {
        let chunk = JsFuture::from(reader.read())
            .await
            .map_err(|e| failed(url, js_reason(e)))?;
        let done = Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            break;
        }
        let value = Reflect::get(&chunk, &"value".into()).map_err(|e| failed(url, js_reason(e)))?;
        let part: Uint8Array = value.dyn_into().map_err(|_| failed(url, "chunk is not bytes"))?;
        let start = bytes.len();
        bytes.resize(start + part.length() as usize, 0);
        part.copy_to(&mut bytes[start..]);
        progress(bytes.len() as u64, total);
    }
    if let Some(total) = total
        && total != bytes.len() as u64
    {
        return Err(failed(url, format!("got {} of {total} bytes", bytes.len())));
    }
    if let Some(cache) = &cache {
        let array = Uint8Array::from(bytes.as_slice());
        let init = web_sys::ResponseInit::new();
        let headers = Object::new();
        let _ = Reflect::set(&headers, &"content-type".into(), &"application/octet-stream".into());
        init.set_headers(&headers);
        if let Ok(copy) = Response::new_with_opt_buffer_source_and_init(Some(&array), &init)
            && let Ok(request) = Request::new_with_str(url)
        {
            // A full quota only costs the next reload a download.
            if let Err(e) = JsFuture::from(cache.put_with_request(&request, &copy)).await {
                tracing::warn!(error = %js_reason(e), "cannot cache the bundle");
            }
        }
    }
    Ok((bytes, Origin::Network))
}

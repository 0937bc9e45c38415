//! HTTP from the page: small JSON documents, and large downloads that report progress, are
//! checked by the caller before anything keeps them, and are then kept in the browser's Cache
//! API (and checked again when read back), so a reload does not download the weights again.

use js_sys::{Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, Request, Response};

/// The Cache API bucket; entries are keyed by content digest, so they never go stale.
const CACHE_NAME: &str = "corolla-bundles-v2";
/// The bucket of pages that cached bundles by URL without checking them: deleted unread.
const OLD_CACHE: &str = "corolla-bundles-v1";

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
    let _ = JsFuture::from(caches.delete(OLD_CACHE)).await;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into().ok()
}

/// Where a download came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Network,
}

/// A download that passed its check: what the check made of it, and where it came from.
#[derive(Debug)]
pub struct Checked<T> {
    pub value: T,
    pub origin: Origin,
}

/// A download checked before anything keeps it: the cache entry `key` if there is one and
/// `check` takes it (an entry it refuses is deleted), else `url`, read while calling
/// `progress(done, total)` and refused past `limit` bytes (before reading, when the response
/// announces more), then stored under `key` only once `check` takes it.
///
/// `key` names the content (the bundle's digest), not the URL: the same bytes from another
/// server are the same entry, and other bytes at the same URL are never taken for them.
pub async fn checked<T, E: From<FetchError>>(
    url: &str,
    key: &str,
    limit: u64,
    mut check: impl FnMut(Vec<u8>) -> Result<T, E>,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Checked<T>, E> {
    let cache = open_cache().await;
    if let Some(cache) = &cache
        && let Some(bytes) = cache_read(cache, key, limit).await
    {
        let len = bytes.len() as u64;
        match check(bytes) {
            Ok(value) => {
                progress(len, Some(len));
                return Ok(Checked {
                    value,
                    origin: Origin::Cache,
                });
            }
            Err(_) => {
                // Damaged in storage (or written by a page that checked less): download again.
                tracing::warn!(key, "a cached bundle failed its check; downloading it again");
                let _ = JsFuture::from(cache.delete_with_str(key)).await;
            }
        }
    }

    let bytes = download(url, limit, &mut progress).await?;
    // The copy to store is made before `check` takes the bytes (a bundle keeps them).
    let copy = cache.as_ref().map(|_| Uint8Array::from(bytes.as_slice()));
    let value = check(bytes)?;
    if let (Some(cache), Some(copy)) = (&cache, copy) {
        cache_put(cache, key, &copy).await;
    }
    Ok(Checked {
        value,
        origin: Origin::Network,
    })
}

/// The entry `key` if there is one of at most `limit` bytes.
async fn cache_read(cache: &Cache, key: &str, limit: u64) -> Option<Vec<u8>> {
    let hit = JsFuture::from(cache.match_with_str(key)).await.ok()?;
    let response = hit.dyn_into::<Response>().ok()?;
    let buffer = JsFuture::from(response.array_buffer().ok()?).await.ok()?;
    let array = Uint8Array::new(&buffer);
    if u64::from(array.length()) > limit {
        return None;
    }
    Some(array.to_vec())
}

async fn cache_put(cache: &Cache, key: &str, bytes: &Uint8Array) {
    let init = web_sys::ResponseInit::new();
    let headers = Object::new();
    let _ = Reflect::set(&headers, &"content-type".into(), &"application/octet-stream".into());
    init.set_headers(&headers);
    if let Ok(copy) = Response::new_with_opt_buffer_source_and_init(Some(bytes), &init)
        && let Ok(request) = Request::new_with_str(key)
    {
        // A full quota only costs the next reload a download.
        if let Err(e) = JsFuture::from(cache.put_with_request(&request, &copy)).await {
            tracing::warn!(error = %js_reason(e), "cannot cache the bundle");
        }
    }
}

/// GETs `url`, refusing more than `limit` bytes.
async fn download(url: &str, limit: u64, progress: &mut impl FnMut(u64, Option<u64>)) -> Result<Vec<u8>, FetchError> {
    let response = fetch_response(url).await?;
    let total = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(total) = total
        && total > limit
    {
        return Err(failed(url, format!("{total} bytes, more than the {limit} expected")));
    }
    let body = response.body().ok_or_else(|| failed(url, "empty body"))?;
    let reader: web_sys::ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| failed(url, "no stream reader"))?;
    let mut bytes = Vec::with_capacity(total.unwrap_or(0).min(limit) as usize);
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
        let end = start as u64 + u64::from(part.length());
        if end > limit {
            let _ = reader.cancel();
            return Err(failed(url, format!("more than the {limit} bytes expected")));
        }
        bytes.resize(end as usize, 0);
        part.copy_to(&mut bytes[start..]);
        progress(bytes.len() as u64, total);
    }
    if let Some(total) = total
        && total != bytes.len() as u64
    {
        return Err(failed(url, format!("got {} of {total} bytes", bytes.len())));
    }
    Ok(bytes)
}

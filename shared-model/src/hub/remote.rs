//! Reading parts of a Hub file without downloading it: metadata and HTTP range requests.
//!
//! A shard a server does not serve is still read a little: its header (which names its
//! tensors) and the fingerprint's samples, a few KiB a tensor. [`RemoteShard`] fetches those
//! ranges (all of a shard's at once, a few requests in parallel) and appends them to a small
//! file in Corolla's cache, so a second start (or an offline one) reads them from disk.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{FileMeta, HubError, HubId, HubOptions, REQUEST_TIMEOUT};
use crate::weights::{ShardBytes, WeightError};

/// Ranges closer than this are fetched as one.
const MERGE_GAP: u64 = 4096;
/// A merged range is at most this long.
const MAX_MERGED: u64 = 1 << 20;
/// Requests in flight at once while prefetching.
const PARALLEL: usize = 16;
/// A range file larger than this is not trusted to be ours, and is started afresh.
const MAX_RANGE_FILE: u64 = 256 << 20;
const MAGIC: &[u8] = b"corolla-ranges/1\n";
/// Relative redirects followed while reading metadata (the Hub redirects renamed repos).
const MAX_REDIRECTS: usize = 5;

/// The HTTP client for metadata and ranges (hf-hub's downloads use their own).
#[derive(Clone)]
pub(super) struct Http {
    /// Follows no redirect: metadata must come from the Hub itself, not from its CDN.
    no_redirect: ureq::Agent,
    /// Follows redirects to the CDN (without the token: ureq drops `Authorization` there).
    follow: ureq::Agent,
    token: Option<String>,
}

impl Http {
    pub(super) fn new(opts: &HubOptions) -> Http {
        let builder = || {
            ureq::AgentBuilder::new()
                .timeout_connect(REQUEST_TIMEOUT)
                .timeout_read(REQUEST_TIMEOUT)
                .try_proxy_from_env(true)
                .user_agent(concat!("corolla/", env!("CARGO_PKG_VERSION")))
        };
        Http {
            no_redirect: builder().redirects(0).build(),
            // One kept-alive connection per prefetch worker.
            follow: builder().max_idle_connections_per_host(PARALLEL).build(),
            token: opts.token.clone(),
        }
    }

    fn get(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let request = agent.get(url);
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The commit, hash and size of a file, asked of the Hub itself (a one-byte range request,
    /// as `huggingface_hub` does).
    pub(super) fn metadata(&self, url: &str, id: &HubId, file: &str) -> Result<FileMeta, HubError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let response = match self.get(&self.no_redirect, &url).set("Range", "bytes=0-0").call() {
                Ok(r) => r,
                Err(e) => return Err(status_error(&url, e, id, file)),
            };
            if (300..400).contains(&response.status()) {
                let location = response.header("Location").unwrap_or_default();
                // A relative redirect stays on the Hub (a renamed repo); an absolute one goes
                // to the CDN, and the Hub's headers are on this response already.
                if location.starts_with('/') {
                    url = format!("{}{}", origin(&url), location);
                    continue;
                }
            }
            let header = |name| response.header(name).map(str::to_string);
            let etag = header("X-Linked-Etag").or_else(|| header("ETag")).unwrap_or_default();
            let commit = header("X-Repo-Commit").unwrap_or_default();
            // The Hub's own answer names the size when it redirects (`X-Linked-Size`); a direct
            // answer has it in `Content-Range`, or, from a server that ignores ranges, in
            // `Content-Length` (its body is then left unread).
            let size = header("X-Linked-Size")
                .and_then(|s| s.parse().ok())
                .or_else(|| header("Content-Range").and_then(|r| parse_content_range(&r).map(|(_, _, t)| t)))
                .or_else(|| {
                    (response.status() == 200)
                        .then(|| header("Content-Length").and_then(|s| s.parse().ok()))
                        .flatten()
                })
                .ok_or_else(|| HubError::Http {
                    url: url.clone(),
                    reason: "no X-Linked-Size or Content-Range: the endpoint does not answer as the Hub".into(),
                })?;
            return Ok(FileMeta {
                commit: commit.trim_matches('"').to_string(),
                etag,
                size,
            });
        }
        Err(HubError::Http {
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// Bytes `offset..offset + len` of the file at `url` (`len > 0`), and the file's size.
    fn range(&self, url: &str, offset: u64, len: u64) -> Result<(Vec<u8>, u64, String), HubError> {
        let last = offset + len - 1;
        let response = self
            .get(&self.follow, url)
            .set("Range", &format!("bytes={offset}-{last}"))
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(status, _) => HubError::Status {
                    url: url.to_string(),
                    status,
                },
                e => HubError::Http {
                    url: url.to_string(),
                    reason: e.to_string(),
                },
            })?;
        let bad = |reason: String| HubError::Http {
            url: url.to_string(),
            reason,
        };
        if response.status() != 206 {
            return Err(bad(format!(
                "answered {} to a range request: the endpoint must serve byte ranges",
                response.status()
            )));
        }
        let range = response.header("Content-Range").and_then(parse_content_range);
        let total = match range {
            Some((start, end, total)) if start == offset && end == last => total,
            _ => return Err(bad(format!("asked for bytes {offset}-{last}, got {range:?}"))),
        };
        let final_url = response.get_url().to_string();
        let mut bytes = Vec::with_capacity(len as usize);
        // One byte past the range: reading to the body's end hands the connection back to
        // ureq's pool (stopping at `len` would cost a new connection per range), and a longer
        // body than asked is caught below.
        response
            .into_reader()
            .take(len + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 != len {
            return Err(bad(format!("{} of {len} bytes came", bytes.len())));
        }
        Ok((bytes, total, final_url))
    }
}

fn status_error(url: &str, e: ureq::Error, id: &HubId, file: &str) -> HubError {
    match e {
        ureq::Error::Status(404, _) => HubError::NotFound {
            repo: id.repo.clone(),
            file: file.to_string(),
            revision: id.revision.clone(),
        },
        ureq::Error::Status(status @ (401 | 403), _) => HubError::Denied {
            url: url.to_string(),
            status,
        },
        e => HubError::Http {
            url: url.to_string(),
            reason: e.to_string(),
        },
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// `bytes START-END/TOTAL` -> (start, end, total).
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.parse().ok()?, end.parse().ok()?, total.parse().ok()?);
    (start <= end && end < total).then_some((start, end, total))
}

/// A Hub shard read by ranges, with what was fetched kept on disk.
pub struct RemoteShard {
    label: PathBuf,
    url: String,
    /// Where ranges were redirected last (the CDN): asked directly next time.
    direct: Mutex<Option<String>>,
    http: Http,
    offline: bool,
    len: u64,
    cache: Mutex<RangeCache>,
}

impl std::fmt::Debug for RemoteShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteShard")
            .field("label", &self.label)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl RemoteShard {
    /// Opens a shard at `url`, its fetched ranges kept in `ranges_path`; its size comes from
    /// that file or from the first range request.
    pub(super) fn open(
        label: PathBuf,
        url: String,
        ranges_path: PathBuf,
        http: Http,
        offline: bool,
        not_found: impl FnOnce() -> HubError,
    ) -> Result<RemoteShard, HubError> {
        let mut cache = RangeCache::load(ranges_path);
        let len = match cache.len {
            Some(len) => len,
            None if offline => {
                return Err(HubError::Offline {
                    what: label.display().to_string(),
                    cache: cache.path.clone(),
                });
            }
            None => {
                let (bytes, total, _) = http.range(&url, 0, 8).map_err(|e| match e {
                    HubError::Status { status: 404, .. } => not_found(),
                    e => e,
                })?;
                cache.start(total);
                cache.put(&[(0, bytes)]);
                total
            }
        };
        Ok(RemoteShard {
            label,
            url,
            direct: Mutex::new(None),
            http,
            offline,
            len,
            cache: Mutex::new(cache),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RangeCache> {
        // Only inserts happen under the lock: a panic leaves a usable cache.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches ranges (none cached), through the CDN address a redirect gave before if any.
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, WeightError> {
        if self.offline {
            return Err(HubError::Offline {
                what: format!("bytes {offset}..+{len} of {}", self.label.display()),
                cache: self.lock().path.clone(),
            }
            .into());
        }
        let direct = self.direct.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(direct) = direct
            && let Ok((bytes, total, _)) = self.http.range(&direct, offset, len)
            && total == self.len
        {
            return Ok(bytes);
        }
        // The signed CDN address expires: the Hub's own URL redirects to a fresh one.
        let (bytes, total, final_url) = self.http.range(&self.url, offset, len)?;
        if total != self.len {
            return Err(HubError::Http {
                url: self.url.clone(),
                reason: format!("the file is {total} bytes now, {} before", self.len),
            }
            .into());
        }
        if final_url != self.url {
            *self.direct.lock().unwrap_or_else(|p| p.into_inner()) = Some(final_url);
        }
        Ok(bytes)
    }

    /// The fetched ranges, for comparing with the file once it is downloaded.
    pub(super) fn fetched(&self) -> Vec<(u64, Vec<u8>)> {
        self.lock().ranges.iter().map(|(o, b)| (*o, b.clone())).collect()
    }

    /// Forgets the fetched ranges, on disk too.
    pub(super) fn discard(&self) {
        let cache = self.lock();
        let _ = std::fs::remove_file(&cache.path);
    }
}

impl ShardBytes for RemoteShard {
    fn path(&self) -> &Path {
        &self.label
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(WeightError::PastEnd {
                path: self.label.clone(),
                offset,
                len,
                file_len: self.len,
            });
        }
        if len == 0 || self.lock().get(offset, buf) {
            return Ok(());
        }
        let bytes = self.fetch(offset, len)?;
        buf.copy_from_slice(&bytes);
        self.lock().put(&[(offset, bytes)]);
        Ok(())
    }

    fn prefetch(&self, ranges: &[(u64, u64)]) -> Result<(), WeightError> {
        let wanted: Vec<(u64, u64)> = {
            let cache = self.lock();
            ranges
                .iter()
                .copied()
                .filter(|&(o, l)| l > 0 && o.checked_add(l).is_some_and(|e| e <= self.len) && !cache.covers(o, l))
                .collect()
        };
        let merged = merge(wanted);
        if merged.is_empty() {
            return Ok(());
        }
        let results: Mutex<Vec<(u64, Vec<u8>)>> = Mutex::new(Vec::with_capacity(merged.len()));
        let first_error: Mutex<Option<WeightError>> = Mutex::new(None);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL.min(merged.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(offset, len)) = merged.get(i) else { break };
                        match self.fetch(offset, len) {
                            Ok(bytes) => results.lock().unwrap_or_else(|p| p.into_inner()).push((offset, bytes)),
                            Err(e) => {
                                first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        self.lock().put(&results);
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Sorted, with neighbours closer than [`MERGE_GAP`] joined (up to [`MAX_MERGED`]).
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in ranges {
        let end = offset + len;
        if let Some(last) = out.last_mut() {
            let last_end = last.0 + last.1;
            if offset <= last_end + MERGE_GAP && end.max(last_end) - last.0 <= MAX_MERGED {
                last.1 = end.max(last_end) - last.0;
                continue;
            }
        }
        out.push((offset, len));
    }
    out
}

/// Fetched ranges of one file, in memory and appended to a file:
/// `MAGIC, u64 file size, then (u64 offset, u64 length, bytes)*`, little-endian.
struct RangeCache {
    path: PathBuf,
    len: Option<u64>,
    ranges: BTreeMap<u64, Vec<u8>>,
}

impl RangeCache {
    /// Reads what an earlier run kept; a missing, foreign or cut-off file keeps what it can.
    fn load(path: PathBuf) -> RangeCache {
        let mut cache = RangeCache {
            path,
            len: None,
            ranges: BTreeMap::new(),
        };
        let Ok(meta) = std::fs::metadata(&cache.path) else {
            return cache;
        };
        if meta.len() > MAX_RANGE_FILE {
            return cache;
        }
        let Ok(bytes) = std::fs::read(&cache.path) else {
            return cache;
        };
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return cache;
        };
        let mut words = rest;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = (words.get(..n)?, words.get(n..)?);
            words = tail;
            Some(head)
        };
        let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_le_bytes);
        let Some(len) = take(8).and_then(u64_of) else {
            return cache;
        };
        cache.len = Some(len);
        while let (Some(offset), Some(n)) = (take(8).and_then(u64_of), take(8).and_then(u64_of)) {
            let Some(data) = usize::try_from(n).ok().and_then(&mut take) else {
                break;
            };
            if offset.checked_add(n).is_none_or(|end| end > len) {
                break;
            }
            cache.ranges.insert(offset, data.to_vec());
        }
        cache
    }

    /// A new file of `len` bytes: the cache file starts over.
    fn start(&mut self, len: u64) {
        self.len = Some(len);
        self.ranges.clear();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&len.to_le_bytes());
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(&self.path, header) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot keep fetched ranges; they will be fetched again");
        }
    }

    fn covers(&self, offset: u64, len: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(&start, data)| offset + len <= start + data.len() as u64)
    }

    /// Copies a cached range into `buf`, if one holds it whole.
    fn get(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some((&start, data)) = self.ranges.range(..=offset).next_back() else {
            return false;
        };
        let from = (offset - start) as usize;
        match data.get(from..from + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn put(&mut self, new: &[(u64, Vec<u8>)]) {
        let mut record = Vec::new();
        for (offset, data) in new {
            record.extend_from_slice(&offset.to_le_bytes());
            record.extend_from_slice(&(data.len() as u64).to_le_bytes());
            record.extend_from_slice(data);
            self.ranges.insert(*offset, data.clone());
        }
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&record));
        if let Err(e) = appended {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot keep fetched ranges");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_and_bad_ones_do_not() {
        assert_eq!(parse_content_range("bytes 0-7/100"), Some((0, 7, 100)));
        for bad in [
            "bytes 7-0/100",
            "bytes 0-100/100",
            "0-7/100",
            "bytes 0-7/*",
            "bytes -1-7/9",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        assert_eq!(origin("http://127.0.0.1:9/a/b"), "http://127.0.0.1:9");
    }

    #[test]
    fn close_ranges_merge_and_far_ones_do_not() {
        assert_eq!(
            merge(vec![(100, 10), (0, 10), (20_000, 5)]),
            vec![(0, 110), (20_000, 5)]
        );
        assert_eq!(
            merge(vec![(0, MAX_MERGED), (MAX_MERGED, 1)]),
            vec![(0, MAX_MERGED), (MAX_MERGED, 1)]
        );
    }

    #[test]
    fn fetched_ranges_survive_a_restart_and_a_cut_off_file() {
        let dir = std::env::temp_dir().join(format!("corolla-range-cache-{}", std::process::id()));
        let path = dir.join("sub/shard.ranges");
        let mut cache = RangeCache::load(path.clone());
        assert_eq!(cache.len, None);
        cache.start(1000);
        cache.put(&[(0, vec![1; 8]), (500, vec![2, 3, 4])]);
        let again = RangeCache::load(path.clone());
        assert_eq!(again.len, Some(1000));
        let mut buf = [0u8; 2];
        assert!(again.get(501, &mut buf));
        assert_eq!(buf, [3, 4]);
        assert!(!again.get(502, &mut buf), "past the range's end");
        assert!(again.covers(0, 8) && !again.covers(0, 9));
        // A write cut short keeps the records before it.
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("cut");
        let cut = RangeCache::load(path.clone());
        assert!(cut.covers(0, 8) && !cut.covers(500, 1));
        // A record past the file's size is not believed.
        let mut bad = bytes[..MAGIC.len() + 8].to_vec();
        bad.extend_from_slice(&999u64.to_le_bytes());
        bad.extend_from_slice(&2u64.to_le_bytes());
        bad.extend_from_slice(&[0, 0]);
        std::fs::write(&path, bad).expect("write");
        assert!(RangeCache::load(path).ranges.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

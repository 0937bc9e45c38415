//! Models by Hugging Face Hub id: `--model org/name[@revision]`.
//!
//! Files go into the standard Hugging Face cache (`$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`: `models--org--name/{blobs,snapshots,refs}`), so a cache shared
//! with transformers is reused and what Corolla downloads is reused by it. `hf-hub` does the
//! downloads (resumable `.part` files, the cache layout, `HF_ENDPOINT`); this module adds what
//! a volunteer's server needs on top:
//!
//! - **Only the span's shards.** The config, tokenizer files and the shard index come first;
//!   a shard is downloaded when a tensor of it is first read ([`store::HubShards`]), so a
//!   server of blocks 0..2 fetches the shards of blocks 0..2 and a client the embeddings' and
//!   head's. The model fingerprint samples a few KiB of every tensor: those bytes come by
//!   HTTP range requests ([`remote::RemoteShard`]) and are kept beside Corolla's cache, so a
//!   second start fetches nothing.
//! - **Checked against the Hub's hashes.** Every downloaded file is hashed and compared with
//!   the hash the Hub serves for it (`X-Linked-Etag`, the sha256 of an LFS file, or the git
//!   blob id of a small one); a mismatch deletes the file and is an error.
//! - **One commit.** A branch or tag is resolved to its commit once; every file then comes
//!   from that commit, so a push to the repository during a download cannot mix two versions.
//! - `HF_TOKEN` (else the token file `huggingface-cli login` writes) and `HF_HUB_OFFLINE=1`
//!   (everything from the cache, a clear error for what is not there).

mod remote;
mod store;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use store::HubShards;

use crate::error::ModelError;
use crate::loader::{HfFiles, ModelFiles};
use crate::weights::{SafetensorsSource, WeightError, WeightSource};

/// Files other than weight shards are read whole into memory: bounded (a Llama-3 tokenizer is
/// 9 MB).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// How long one request may wait for the Hub to answer or to send more bytes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A model on the Hub: `org/name`, optionally `@revision` (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// Parses `org/name[@revision]`; `None` for anything else (a path, a fingerprint).
    pub fn parse(text: &str) -> Option<HubId> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (text, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        // Branch names may hold `/` (they become folders under `refs/`, as in Python's cache):
        // no component may climb out of it.
        let revision_ok = !revision.is_empty() && revision.len() <= 256 && revision.split('/').all(part);
        (part(org) && part(name) && revision_ok).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The cache folder's name, as the Hub libraries spell it.
    fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The Hub cache (`$HF_HOME/hub`).
    pub cache: PathBuf,
    /// `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: String,
    /// `$HF_TOKEN`, else the cached login token.
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
    /// Where the fingerprint's sampled bytes of shards not downloaded are kept (Corolla's own
    /// cache: the Hub cache holds only the Hub's files).
    pub samples: PathBuf,
    /// Draw progress bars (they stay hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl HubOptions {
    /// From the environment, as the Hugging Face libraries read it; `samples` is a folder of
    /// Corolla's cache.
    pub fn from_env(samples: PathBuf) -> HubOptions {
        let cache = hf_hub::Cache::from_env();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        HubOptions {
            cache: cache.path().clone(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_true(&v)),
            samples,
            progress: true,
        }
    }
}

/// `huggingface_hub`'s reading of a boolean variable.
fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
}

/// What went wrong reaching a Hub model.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{what} is not in the Hub cache ({cache}) and HF_HUB_OFFLINE is set")]
    Offline { what: String, cache: PathBuf },
    #[error("{repo} has no file {file} at {revision}")]
    NotFound {
        repo: String,
        file: String,
        revision: String,
    },
    #[error(
        "the Hub refused {url} ({status}): the model may not exist, or be gated or private (accept its terms on the Hub and set HF_TOKEN)"
    )]
    Denied { url: String, status: u16 },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("downloading {file}: {reason}")]
    Download { file: String, reason: String },
    #[error("{file} does not match the Hub's hash (expected {expected}, got {actual}); the download was deleted")]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("the Hub gives no usable hash for {file} (etag {etag:?}), so it cannot be checked")]
    NoHash { file: String, etag: String },
    #[error(
        "{file}: the bytes sampled by range requests differ from the downloaded file; the samples were deleted, start again"
    )]
    Inconsistent { file: String },
    #[error("{file} is {size} bytes, more than the {max} a config or tokenizer file may be")]
    TooLarge { file: String, size: u64, max: u64 },
    #[error(
        "{repo} has neither model.safetensors.index.json nor model.safetensors (for a GGUF, download it and pass its path)"
    )]
    NoWeights { repo: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<HubError> for WeightError {
    fn from(e: HubError) -> Self {
        WeightError::Hub(Box::new(e))
    }
}

impl From<HubError> for ModelError {
    fn from(e: HubError) -> Self {
        ModelError::Weights(e.into())
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the Hub says of one file before it is downloaded.
#[derive(Debug)]
struct FileMeta {
    commit: String,
    /// The hash to check the download against (sha256 for LFS files, the git blob id else).
    etag: String,
    size: u64,
}

/// One repository at one commit, and the clients that reach it.
pub struct HubRepo {
    id: HubId,
    commit: String,
    opts: HubOptions,
    /// For downloads (hf-hub), bound to the commit.
    api: hf_hub::api::sync::ApiRepo,
    /// For metadata and range requests.
    http: remote::Http,
}

impl std::fmt::Debug for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRepo")
            .field("id", &self.id)
            .field("commit", &self.commit)
            .finish_non_exhaustive()
    }
}

impl HubRepo {
    /// Resolves `id`'s revision to a commit: from the cache (`refs/`) when it is there, else
    /// by asking the Hub (and recording the answer in the cache).
    pub fn open(id: &HubId, opts: HubOptions) -> Result<HubRepo, HubError> {
        let http = remote::Http::new(&opts);
        let dir = opts.cache.join(id.folder());
        let commit = if is_commit(&id.revision) {
            id.revision.clone()
        } else {
            let ref_path = dir.join("refs").join(&id.revision);
            match std::fs::read_to_string(&ref_path) {
                Ok(c) if is_commit(c.trim()) => c.trim().to_string(),
                _ if opts.offline => {
                    return Err(HubError::Offline {
                        what: id.to_string(),
                        cache: opts.cache.clone(),
                    });
                }
                _ => {
                    let url = file_url(&opts.endpoint, &id.repo, &id.revision, "config.json");
                    let meta = http.metadata(&url, id, "config.json")?;
                    if !is_commit(&meta.commit) {
                        return Err(HubError::Http {
                            url,
                            reason: format!("X-Repo-Commit {:?} is not a commit id", meta.commit),
                        });
                    }
                    if let Some(parent) = ref_path.parent() {
                        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
                    }
                    std::fs::write(&ref_path, &meta.commit).map_err(io_error(&ref_path))?;
                    meta.commit
                }
            }
        };
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_token(opts.token.clone())
            .with_progress(false)
            .with_retries(3)
            .build()
            .map_err(|e| HubError::Download {
                file: id.to_string(),
                reason: e.to_string(),
            })?
            .repo(hf_hub::Repo::with_revision(
                id.repo.clone(),
                hf_hub::RepoType::Model,
                commit.clone(),
            ));
        tracing::debug!(model = %id, %commit, "hub revision");
        Ok(HubRepo {
            id: id.clone(),
            commit,
            opts,
            api,
            http,
        })
    }

    pub fn id(&self) -> &HubId {
        &self.id
    }

    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// The snapshot folder of this commit in the Hub cache.
    pub fn snapshot(&self) -> PathBuf {
        self.opts
            .cache
            .join(self.id.folder())
            .join("snapshots")
            .join(&self.commit)
    }

    /// Python's marker of a file known not to exist at a commit (so offline runs know too).
    fn no_exist(&self, file: &str) -> PathBuf {
        self.opts
            .cache
            .join(self.id.folder())
            .join(".no_exist")
            .join(&self.commit)
            .join(file)
    }

    fn url(&self, file: &str) -> String {
        file_url(&self.opts.endpoint, &self.id.repo, &self.commit, file)
    }

    /// A file that must exist: from the cache, else downloaded and checked.
    pub fn file(&self, file: &str) -> Result<PathBuf, HubError> {
        self.fetch(file, None)
    }

    /// A small file (config, tokenizer) that may not exist: `None` when the Hub says so.
    pub fn optional(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        match self.fetch(file, Some(MAX_SMALL_FILE)) {
            Ok(path) => Ok(Some(path)),
            Err(HubError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn fetch(&self, file: &str, max: Option<u64>) -> Result<PathBuf, HubError> {
        let path = self.snapshot().join(file);
        if path.exists() {
            return Ok(path);
        }
        let not_found = || HubError::NotFound {
            repo: self.id.repo.clone(),
            file: file.to_string(),
            revision: self.commit.clone(),
        };
        if self.no_exist(file).exists() {
            return Err(not_found());
        }
        if self.opts.offline {
            return Err(HubError::Offline {
                what: format!("{} of {}", file, self.id),
                cache: self.opts.cache.clone(),
            });
        }
        let meta = match self.http.metadata(&self.url(file), &self.id, file) {
            Err(HubError::NotFound { .. }) => {
                let marker = self.no_exist(file);
                if let Some(parent) = marker.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&marker, b"");
                return Err(not_found());
            }
            other => other?,
        };
        if let Some(max) = max.filter(|&max| meta.size > max) {
            return Err(HubError::TooLarge {
                file: file.to_string(),
                size: meta.size,
                max,
            });
        }
        let expected = verify::Expected::from_etag(file, &meta.etag)?;
        tracing::info!(model = %self.id, file, bytes = meta.size, "downloading");
        let downloaded = if self.opts.progress {
            let bar = indicatif::ProgressBar::new(meta.size);
            self.api.download_with_progress(file, bar)
        } else {
            self.api.download_with_progress(file, ())
        };
        let downloaded = downloaded.map_err(|e| HubError::Download {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
        if let Err(e) = verify::check(&downloaded, file, &expected) {
            // The blob the link points to, then the link: neither may be used again.
            if let Ok(blob) = std::fs::canonicalize(&downloaded) {
                let _ = std::fs::remove_file(blob.with_extension("lock"));
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&downloaded);
            return Err(e);
        }
        Ok(downloaded)
    }
}

fn is_commit(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `{endpoint}/{repo}/resolve/{revision}/{file}`, the revision's `/` escaped as the Hub wants.
fn file_url(endpoint: &str, repo: &str, revision: &str, file: &str) -> String {
    format!("{endpoint}/{repo}/resolve/{}/{file}", revision.replace('/', "%2F"))
}

/// The Hub id a `--model` names: one spelled as an id that is not an existing path.
fn hub_id(arg: &Path) -> Option<HubId> {
    if arg.exists() {
        None
    } else {
        arg.to_str().and_then(HubId::parse)
    }
}

/// Opens `--model`: an existing path (a folder or a `.gguf`), else a Hub id.
pub fn open_model(arg: &Path, opts: &HubOptions) -> Result<ModelFiles, ModelError> {
    match hub_id(arg) {
        Some(id) => open(&id, opts.clone()),
        None => ModelFiles::open(arg),
    }
}

/// The name a `--model` is shown and announced under: a Hub id's repository, else the file's
/// or folder's name.
pub fn model_name(arg: &Path) -> String {
    if let Some(id) = hub_id(arg) {
        return id.repo;
    }
    arg.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Opens a Hub model: its config, tokenizer files and shard index now, its shards when read.
pub fn open(id: &HubId, opts: HubOptions) -> Result<ModelFiles, ModelError> {
    let repo = Arc::new(HubRepo::open(id, opts)?);
    let config = repo.fetch("config.json", Some(MAX_SMALL_FILE))?;
    let files = HfFiles {
        config,
        tokenizer: repo.optional("tokenizer.json")?,
        tokenizer_config: repo.optional("tokenizer_config.json")?,
        generation_config: repo.optional("generation_config.json")?,
    };
    let weights = || -> Result<Arc<dyn WeightSource>, ModelError> {
        let store = Arc::new(HubShards::new(repo.clone()));
        let weights = match repo.optional("model.safetensors.index.json")? {
            Some(index) => SafetensorsSource::from_index(&index, store)?,
            None => match SafetensorsSource::single("model.safetensors", store) {
                Err(WeightError::Hub(e)) if matches!(*e, HubError::NotFound { .. }) => {
                    return Err(HubError::NoWeights { repo: id.repo.clone() }.into());
                }
                other => other?,
            },
        };
        Ok(Arc::new(weights))
    };
    let model = ModelFiles::from_hf_files(&repo.snapshot(), files, weights)?;
    tracing::info!(model = %id, commit = repo.commit(), "opened from the Hub");
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_org_name_and_an_optional_revision() {
        assert_eq!(
            HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(HubId {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                revision: "main".into()
            })
        );
        let id = HubId::parse("org/name@refs/pr/1").expect("a branch with slashes");
        assert_eq!(id.revision, "refs/pr/1");
        assert_eq!(id.folder(), "models--org--name");
        for bad in [
            "name",
            "a/b/c",
            "../x",
            "org/..",
            "org/name@",
            "org/name@../../etc",
            "org/.hidden",
            "/abs/path",
            "org/na me",
            "00112233445566778899aabbccddeeff",
            "model.gguf",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn offline_reads_huggingface_hubs_booleans() {
        for yes in ["1", "true", "ON", "yes "] {
            assert!(is_true(yes), "{yes}");
        }
        for no in ["0", "false", "", "off"] {
            assert!(!is_true(no), "{no}");
        }
    }

    #[test]
    fn branch_slashes_are_escaped_in_urls() {
        assert_eq!(
            file_url("http://h", "o/n", "refs/pr/1", "config.json"),
            "http://h/o/n/resolve/refs%2Fpr%2F1/config.json"
        );
    }
}

//! A Hub repository's shards as a [`ShardStore`]: downloaded when a tensor of theirs is read,
//! read by ranges (headers, fingerprint samples) until then.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::remote::RemoteShard;
use super::{HubError, HubRepo};
use crate::weights::{RangeFile, ShardBytes, ShardStore, WeightError};

/// The shards of one repository at one commit.
pub struct HubShards {
    repo: Arc<HubRepo>,
    /// Shards read by ranges so far, kept to compare their bytes with the download.
    remote: Mutex<HashMap<String, Arc<RemoteShard>>>,
}

impl HubShards {
    pub fn new(repo: Arc<HubRepo>) -> HubShards {
        HubShards {
            repo,
            remote: Mutex::new(HashMap::new()),
        }
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RemoteShard>>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the fetched ranges of `shard` are kept: by commit, so they never outlive the bytes.
    fn ranges_path(&self, shard: &str) -> PathBuf {
        let repo = &self.repo;
        repo.opts
            .samples
            .join(repo.id.folder())
            .join(&repo.commit)
            .join(format!("{shard}.ranges"))
    }

    /// The bytes fingerprinted before the download must be the downloaded file's: otherwise
    /// the announced fingerprint is not this checkpoint's.
    fn check_samples(&self, shard: &str, path: &std::path::Path) -> Result<(), HubError> {
        let Some(remote) = self.remote().get(shard).cloned() else {
            return Ok(());
        };
        let file = RangeFile::open(path).map_err(|e| HubError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for (offset, expected) in remote.fetched() {
            let mut actual = vec![0u8; expected.len()];
            if file.read_exact_at(offset, &mut actual).is_err() || actual != expected {
                remote.discard();
                return Err(HubError::Inconsistent {
                    file: shard.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl ShardStore for HubShards {
    fn location(&self, shard: &str) -> PathBuf {
        self.repo.snapshot().join(shard)
    }

    fn bytes(&self, shard: &str) -> Result<Arc<dyn ShardBytes>, WeightError> {
        let local = self.location(shard);
        if local.exists() {
            return Ok(Arc::new(RangeFile::open(&local)?));
        }
        if let Some(remote) = self.remote().get(shard) {
            return Ok(remote.clone());
        }
        let repo = &self.repo;
        let label = PathBuf::from(format!("{}@{}/{shard}", repo.id.repo, &repo.commit[..12]));
        let remote = Arc::new(RemoteShard::open(
            label,
            repo.url(shard),
            self.ranges_path(shard),
            repo.http.clone(),
            repo.opts.offline,
            || HubError::NotFound {
                repo: repo.id.repo.clone(),
                file: shard.to_string(),
                revision: repo.commit.clone(),
            },
        )?);
        self.remote().insert(shard.to_string(), remote.clone());
        Ok(remote)
    }

    fn fetch(&self, shard: &str) -> Result<PathBuf, WeightError> {
        let path = self.repo.file(shard)?;
        self.check_samples(shard, &path)?;
        Ok(path)
    }
}

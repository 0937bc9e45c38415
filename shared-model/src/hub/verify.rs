//! Checking a download against the hash the Hub serves for it.
//!
//! The Hub's `X-Linked-Etag` (for files in LFS or Xet storage) is the file's sha256; the
//! `ETag` of a file kept in git itself is its git blob id, the sha1 of `"blob {len}\0"` and
//! the bytes. Either is checked; a file with neither cannot be, and is refused.

use std::io::Read;
use std::path::Path;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::HubError;

/// The hash a file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Expected {
    Sha256(String),
    GitBlob(String),
}

impl Expected {
    pub(super) fn from_etag(file: &str, etag: &str) -> Result<Expected, HubError> {
        let tag = etag
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase();
        let hex = tag.bytes().all(|b| b.is_ascii_hexdigit());
        match tag.len() {
            64 if hex => Ok(Expected::Sha256(tag)),
            40 if hex => Ok(Expected::GitBlob(tag)),
            _ => Err(HubError::NoHash {
                file: file.to_string(),
                etag: etag.to_string(),
            }),
        }
    }
}

/// Hashes `path` (streaming, so a 10 GB shard needs no memory) and compares.
pub(super) fn check(path: &Path, file: &str, expected: &Expected) -> Result<(), HubError> {
    let io = |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let (want, got) = match expected {
        Expected::Sha256(want) => {
            let mut h = Sha256::new();
            copy_into(&mut f, |b| h.update(b)).map_err(io)?;
            (want, hex(&h.finalize()))
        }
        Expected::GitBlob(want) => {
            let mut h = Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            copy_into(&mut f, |b| h.update(b)).map_err(io)?;
            (want, hex(&h.finalize()))
        }
    };
    if *want == got {
        Ok(())
    } else {
        Err(HubError::HashMismatch {
            file: file.to_string(),
            expected: want.clone(),
            actual: got,
        })
    }
}

fn copy_into(f: &mut std::fs::File, mut sink: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(()),
            n => sink(&buf[..n]),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The git blob id of `bytes` (what the Hub's `ETag` of a small file is).
#[cfg(test)]
pub(super) fn git_blob_id(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_of_hub_hash_are_checked() {
        let dir = std::env::temp_dir().join(format!("corolla-hub-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let path = dir.join("f");
        std::fs::write(&path, b"hello\n").expect("write");
        // `git hash-object` of "hello\n".
        assert_eq!(git_blob_id(b"hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
        let git = Expected::from_etag("f", "\"ce013625030ba8dba906f756967f9e9ca394464a\"").expect("git id");
        check(&path, "f", &git).expect("matches");
        let sha = Expected::from_etag("f", "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
            .expect("sha256");
        check(&path, "f", &sha).expect("matches");
        std::fs::write(&path, b"hellO\n").expect("write");
        assert!(matches!(check(&path, "f", &sha), Err(HubError::HashMismatch { .. })));
        assert!(matches!(check(&path, "f", &git), Err(HubError::HashMismatch { .. })));
        assert!(matches!(
            Expected::from_etag("f", "W/\"abc\""),
            Err(HubError::NoHash { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Node identity (a persistent ed25519 keypair) and the protocol names that keep Corolla's
//! DHT and identify traffic apart from the public IPFS network.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use libp2p::StreamProtocol;
use libp2p::identity::{DecodingError, Keypair};

/// Kademlia protocol name. A distinct name means our nodes never answer, or get added to the
/// routing tables of, IPFS nodes that happen to connect.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/kad/1.0.0");

/// Identify `protocol_version` string. rust-libp2p fixes identify's stream name to
/// `/ipfs/id/1.0.0`, so this is what peers compare instead: only peers announcing it are
/// Corolla nodes whose addresses belong in our DHT.
pub const IDENTIFY_PROTOCOL: &str = "/corolla/id/1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("identity file {} is not a valid libp2p private key: {source}", path.display())]
    Decode { path: PathBuf, source: DecodingError },
    #[error("cannot encode the new keypair for {}: {source}", path.display())]
    Encode { path: PathBuf, source: DecodingError },
}

/// Loads the keypair at `path`, or generates an ed25519 one and stores it there.
///
/// The file holds `Keypair::to_protobuf_encoding` bytes, the format go-libp2p and js-libp2p
/// also use, so a key can move between implementations.
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let io_err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path);
            Keypair::from_protobuf_encoding(&bytes).map_err(|source| IdentityError::Decode {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding().map_err(|source| IdentityError::Encode {
                path: path.to_path_buf(),
                source,
            })?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
            write_private_atomically(path, &bytes).map_err(io_err)?;
            tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created new identity");
            Ok(keypair)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes via a temporary file in the same directory and a rename, so a crash never leaves a
/// truncated key behind (which would silently change the node's peer id on the next start).
fn write_private_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Set at creation, so the key is never readable by others, not even briefly.
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "identity file is accessible by other users; consider chmod 600");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn scratch(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "swarm-identity-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_then_reloads_same_key() {
        let dir = scratch("reload");
        let path = dir.join("nested/deeper/node.key");
        let first = load_or_create(&path).unwrap();
        assert!(path.exists());
        assert!(first.clone().try_into_ed25519().is_ok(), "new keys are ed25519");
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        // No temp file left behind.
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_is_protobuf_encoding() {
        let dir = scratch("format");
        let path = dir.join("node.key");
        let key = load_or_create(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes, key.to_protobuf_encoding().unwrap());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn distinct_files_give_distinct_keys() {
        let dir = scratch("distinct");
        let a = load_or_create(&dir.join("a.key")).unwrap();
        let b = load_or_create(&dir.join("b.key")).unwrap();
        assert_ne!(a.public().to_peer_id(), b.public().to_peer_id());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relative_path_without_parent_works() {
        // `Path::parent` of a bare file name is `Some("")`; creating "" must not be attempted.
        let name = PathBuf::from(format!("swarm-identity-bare-{}.key", std::process::id()));
        let path_in_cwd = std::env::current_dir().unwrap().join(&name);
        let _ = fs::remove_file(&path_in_cwd);
        let key = load_or_create(&name).unwrap();
        assert_eq!(
            load_or_create(&path_in_cwd).unwrap().public().to_peer_id(),
            key.public().to_peer_id()
        );
        fs::remove_file(path_in_cwd).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("node.key");
        load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_file_is_decode_error() {
        let dir = scratch("garbage");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        fs::write(&path, b"not a key").unwrap();
        match load_or_create(&path) {
            Err(IdentityError::Decode { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected Decode error, got {other:?}"),
        }
        // The bad file must be left alone: overwriting it would silently change the peer id.
        assert_eq!(fs::read(&path).unwrap(), b"not a key");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn empty_file_is_decode_error() {
        let dir = scratch("empty");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        fs::write(&path, b"").unwrap();
        assert!(matches!(load_or_create(&path), Err(IdentityError::Decode { .. })));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unreadable_path_is_io_error() {
        // A directory where the file should be: reading it fails with something other than
        // NotFound, which must surface rather than trigger key generation.
        let dir = scratch("isdir");
        fs::create_dir_all(dir.join("node.key")).unwrap();
        match load_or_create(&dir.join("node.key")) {
            Err(IdentityError::Io { path, .. }) => assert_eq!(path, dir.join("node.key")),
            other => panic!("expected Io error, got {other:?}"),
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn protocol_names_are_corolla_specific() {
        assert_eq!(KAD_PROTOCOL.as_ref(), "/corolla/kad/1.0.0");
        assert!(IDENTIFY_PROTOCOL.starts_with("/corolla/"));
    }
}

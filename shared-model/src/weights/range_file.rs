//! Reading a few byte ranges of a large file without the kernel reading the rest.
//!
//! Page faults on a memory map and buffered reads trigger readahead: on a disk with
//! `read_ahead_kb = 8192` (this project's CI VM), touching one byte of each 4 MiB tensor of a
//! mapped 64 MiB file reads all 64 MiB (`shared-model/tests/fingerprint.rs` measures it), and
//! reads that look sequential (a header right after its length, small tensors stored one after
//! another) grow a window up to that size. A [`RangeFile`] opens its own file description (so
//! the hint below does not touch the memory maps the loader reads tensors through), tells the
//! kernel that access is random (`POSIX_FADV_RANDOM`: each read brings in only the pages it
//! covers), and reads with positioned reads (`pread`), checking every range against the file's
//! size first.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::WeightError;

/// An open file read in small positioned pieces.
#[derive(Debug)]
pub(crate) struct RangeFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl RangeFile {
    /// Opens `path` for random access; its size is taken now, and reads are checked against it.
    pub(crate) fn open(path: &Path) -> Result<Self, WeightError> {
        let io = |source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        no_readahead(&file, path);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes when it was opened.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`; a range past the end of the
    /// file (or one whose end overflows) is an error, not a short read.
    pub(crate) fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(WeightError::PastEnd {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                file_len: self.len,
            });
        }
        read_at(&self.file, offset, buf).map_err(|source| WeightError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(unix)]
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut offset: u64, mut buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// No file system here (wasm32): nothing opens a file, so nothing reads one.
#[cfg(not(any(unix, windows)))]
fn read_at(_file: &File, _offset: u64, _buf: &mut [u8]) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Turns readahead off for this file description (Linux: `POSIX_FADV_RANDOM`). Only a hint:
/// where it fails or does not exist, reads still return the right bytes, the kernel just reads
/// more around them.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn no_readahead(file: &File, path: &Path) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the whole call (`file` is borrowed), and
    // posix_fadvise only records an access-pattern hint on it; no memory is passed.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc != 0 {
        tracing::debug!(path = %path.display(), errno = rc, "posix_fadvise(RANDOM) failed; reads may read ahead");
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn no_readahead(_file: &File, _path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ranges_and_refuses_past_the_end() {
        let dir = std::env::temp_dir().join(format!("corolla-range-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let path = dir.join("bytes");
        std::fs::write(&path, (0u8..100).collect::<Vec<_>>()).expect("write");
        let file = RangeFile::open(&path).expect("opens");
        assert_eq!(file.len(), 100);
        let mut buf = [0u8; 4];
        file.read_exact_at(96, &mut buf).expect("last four bytes");
        assert_eq!(buf, [96, 97, 98, 99]);
        for offset in [97, 100, u64::MAX - 1] {
            let err = file.read_exact_at(offset, &mut buf).err();
            assert!(matches!(err, Some(WeightError::PastEnd { .. })), "{offset}: {err:?}");
        }
        file.read_exact_at(100, &mut []).expect("an empty read at the end");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Frames on a peer's stream, each read and write bounded in time: a peer that stops sending
//! or stops reading loses the stream instead of holding what it was given.

use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use serde::Serialize;
use serde::de::DeserializeOwned;
use swarm::wire::{self, WireError};

/// The slowest a frame's body may arrive once its length is known (a 256 MiB frame gets about
/// four minutes), so a trickling sender cannot hold the memory reserved for it for long.
const MIN_BODY_RATE: u64 = 1 << 20;

/// Why a frame did not go through.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("the peer did not {what} within {timeout:?}")]
    Timeout { what: &'static str, timeout: Duration },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl IoError {
    /// The peer closed the stream cleanly between messages.
    pub fn is_closed(&self) -> bool {
        matches!(self, IoError::Wire(WireError::Closed))
    }
}

/// Writes one frame; a peer that does not take it within `timeout` loses the stream.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    stream: &mut W,
    msg: &T,
    max: usize,
    timeout: Duration,
) -> Result<(), IoError> {
    tokio::time::timeout(timeout, wire::write_frame(stream, msg, max))
        .await
        .map_err(|_| IoError::Timeout {
            what: "read our reply",
            timeout,
        })?
        .map_err(IoError::from)
}

/// Reads the next frame's length prefix within `timeout`.
pub async fn read_len<R: AsyncRead + Unpin>(stream: &mut R, max: usize, timeout: Duration) -> Result<usize, IoError> {
    tokio::time::timeout(timeout, wire::read_frame_len(stream, max))
        .await
        .map_err(|_| IoError::Timeout {
            what: "send a message",
            timeout,
        })?
        .map_err(IoError::from)
}

/// Reads a `len`-byte body at no less than [`MIN_BODY_RATE`] (and within `floor` at least).
pub async fn read_body<R: AsyncRead + Unpin, T: DeserializeOwned>(
    stream: &mut R,
    len: usize,
    floor: Duration,
) -> Result<T, IoError> {
    let timeout = floor.max(Duration::from_secs(len as u64 / MIN_BODY_RATE));
    tokio::time::timeout(timeout, wire::read_frame_body(stream, len))
        .await
        .map_err(|_| IoError::Timeout {
            what: "send the whole message",
            timeout,
        })?
        .map_err(IoError::from)
}

/// Reads the end of a one-message stream (the sender's close) within `timeout`.
pub async fn read_end<R: AsyncRead + Unpin>(stream: &mut R, timeout: Duration) -> Result<(), IoError> {
    tokio::time::timeout(timeout, wire::read_end(stream))
        .await
        .map_err(|_| IoError::Timeout {
            what: "close its side of the stream",
            timeout,
        })?
        .map_err(IoError::from)
}

/// Reads and drops a `len`-byte body without holding it, so that a refused message leaves the
/// stream at the next frame.
pub async fn discard<R: AsyncRead + Unpin>(stream: &mut R, len: usize, floor: Duration) -> Result<(), IoError> {
    use futures::AsyncReadExt;
    let timeout = floor.max(Duration::from_secs(len as u64 / MIN_BODY_RATE));
    let copied = tokio::time::timeout(
        timeout,
        futures::io::copy((&mut *stream).take(len as u64), &mut futures::io::sink()),
    )
    .await
    .map_err(|_| IoError::Timeout {
        what: "send the whole message",
        timeout,
    })?
    .map_err(WireError::from)?;
    if copied != len as u64 {
        return Err(IoError::Wire(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stream ended inside the frame body",
        ))));
    }
    Ok(())
}

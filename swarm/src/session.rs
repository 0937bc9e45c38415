//! The client side of one inference session with one server: a stream carrying
//! [`SessionRequest`]s out and [`SessionResponse`]s back.

use std::time::Duration;

use libp2p::{PeerId, Stream};
use shared_model::weights::HostTensor;

use crate::node::{Client, NodeError};
use crate::protocol::{INFERENCE_PROTOCOL, Limits, ProtocolError, PushTarget, SessionRequest, SessionResponse};
use crate::routing::Gap;
use crate::wire::{self, WireDtype, WireError, WireTensor};

/// Why a remote step failed. Every variant makes the client try another server.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("server {peer} refused: {error}")]
    Remote { peer: PeerId, error: ProtocolError },
    #[error("server {peer} did not answer within {timeout:?}")]
    Timeout { peer: PeerId, timeout: Duration },
    #[error("server {peer} answered out of order")]
    Protocol { peer: PeerId },
    /// The stream ended before the server answered `Open`: a server flooded with streams
    /// drops some unread. Asked again like a busy server.
    #[error("server {peer} closed the stream before answering (overloaded?): {source}")]
    Dropped { peer: PeerId, source: WireError },
    /// A spot check caught the server: two other servers agree on outputs it contradicts.
    #[error("server {peer} returned outputs that two other servers contradict")]
    Mismatch { peer: PeerId },
    #[error("cannot roll the session back to {to} positions: only {held} were sent")]
    Rollback { to: usize, held: usize },
    #[error("{gap} of model {model}")]
    NoRoute { gap: Gap, model: String },
    #[error("every server for blocks {start}..{end} failed; last error: {last}")]
    Exhausted { start: usize, end: usize, last: String },
}

/// An open session on one server over blocks `[start, end)`.
pub struct HopSession {
    pub peer: PeerId,
    pub start: usize,
    pub end: usize,
    stream: Stream,
    step: u64,
    limits: Limits,
    reply_dtype: WireDtype,
    timeout: Duration,
    /// A reply's length prefix, as far as it was read before a wait for it was cut short.
    prefix: wire::PartialPrefix,
}

/// What the client asks of a session.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub model: String,
    pub batch: usize,
    pub max_length: usize,
    pub pad: Vec<usize>,
    pub dtype: WireDtype,
    pub timeout: Duration,
    pub limits: Limits,
    /// Deep prompts of every block `[num_layers, prefix_len, hidden]`; each hop gets its rows.
    pub deep_prompts: Option<HostTensor>,
    /// The LoRA adapter every hop applies.
    pub adapter: Option<String>,
}

impl HopSession {
    pub async fn open(
        client: &Client,
        peer: PeerId,
        start: usize,
        end: usize,
        spec: &SessionSpec,
    ) -> Result<Self, SessionError> {
        let stream = crate::rt::timeout(spec.timeout, client.open_stream(peer, INFERENCE_PROTOCOL))
            .await
            .map_err(|_| SessionError::Timeout {
                peer,
                timeout: spec.timeout,
            })??;
        let mut session = Self {
            peer,
            start,
            end,
            stream,
            step: 0,
            limits: spec.limits,
            reply_dtype: spec.dtype,
            timeout: spec.timeout,
            prefix: wire::PartialPrefix::default(),
        };
        let open = SessionRequest::Open {
            model: spec.model.clone(),
            start: start as u32,
            end: end as u32,
            batch: spec.batch as u32,
            max_length: spec.max_length as u32,
            pad: spec.pad.iter().map(|&p| p as u32).collect(),
            reply_dtype: spec.dtype,
            prompts: spec
                .deep_prompts
                .as_ref()
                .map(|d| WireTensor::encode(&shared_model::tuning::deep_rows(d, start..end), WireDtype::F32)),
            adapter: spec.adapter.clone(),
        };
        let opened = session.exchange(&open).await.map_err(|e| match e {
            SessionError::Wire(source) if source.is_dropped_stream() => SessionError::Dropped { peer, source },
            other => other,
        })?;
        match opened {
            SessionResponse::Opened { .. } => Ok(session),
            _ => Err(SessionError::Protocol { peer }),
        }
    }

    /// Sends `[batch, new, hidden]` states, returns the span's output for them. With
    /// `start_from`, the server first rolls its cache back to that many positions.
    pub async fn step(&mut self, hidden: &HostTensor, start_from: Option<usize>) -> Result<HostTensor, SessionError> {
        let request = self.next_step(hidden, start_from, false);
        match self.exchange(&request).await? {
            SessionResponse::Output { step, hidden: out, .. } if step == self.step => self.decode(out, &hidden.shape),
            _ => Err(SessionError::Protocol { peer: self.peer }),
        }
    }

    /// Starts a step whose output the server also pushes to the next hop ([`Self::link`]);
    /// [`Self::output`] waits for the answer.
    pub async fn send_push(&mut self, hidden: &HostTensor, start_from: Option<usize>) -> Result<(), SessionError> {
        let request = self.next_step(hidden, start_from, true);
        let (peer, timeout, max) = (self.peer, self.timeout, self.limits.max_frame_bytes);
        crate::rt::timeout(timeout, wire::write_frame(&mut self.stream, &request, max))
            .await
            .map_err(|_| SessionError::Timeout { peer, timeout })??;
        Ok(())
    }

    /// The answer to the step begun with [`Self::send_push`] (`position: None`), or to the
    /// step pushed to this hop that began at `position`: its `[batch, new, hidden]` output
    /// (`shape`), and whether the server pushed it on.
    pub async fn output(
        &mut self,
        position: Option<usize>,
        shape: &[usize],
    ) -> Result<(HostTensor, bool), SessionError> {
        self.output_within(position, shape, self.timeout).await
    }

    /// How long a step may take before the server counts as failed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// [`Self::output`], waiting at most `timeout` (a pushed output is given less than the
    /// session's step timeout: see [`crate::remote`]).
    pub async fn output_within(
        &mut self,
        position: Option<usize>,
        shape: &[usize],
        timeout: Duration,
    ) -> Result<(HostTensor, bool), SessionError> {
        let peer = self.peer;
        let wait = timeout.min(self.timeout);
        let want = self.step;
        loop {
            // Only the wait for a reply to start may be cut short (the prefix read so far is
            // kept); a reply that has started is read whole, within the step timeout.
            let len = crate::rt::timeout(wait, self.reply_len())
                .await
                .map_err(|_| SessionError::Timeout { peer, timeout: wait })??;
            let reply = crate::rt::timeout(self.timeout, wire::read_frame_body(&mut self.stream, len))
                .await
                .map_err(|_| SessionError::Timeout {
                    peer,
                    timeout: self.timeout,
                })??;
            let (out, pushed) = match reply {
                SessionResponse::Output { step, hidden, pushed } if position.is_none() && step == want => {
                    (hidden, pushed)
                }
                SessionResponse::Pushed {
                    position: at,
                    hidden,
                    pushed,
                } if position == Some(at as usize) => (hidden, pushed),
                // A push the client has since sent itself.
                SessionResponse::Pushed { position: at, .. } if position.is_none_or(|p| (at as usize) < p) => continue,
                SessionResponse::Error(error) => return Err(SessionError::Remote { peer, error }),
                _ => return Err(SessionError::Protocol { peer }),
            };
            return Ok((self.decode(out, shape)?, pushed));
        }
    }

    /// The next reply's length, resuming a prefix that an abandoned wait began to read.
    async fn reply_len(&mut self) -> Result<usize, WireError> {
        wire::read_frame_len_resumable(&mut self.stream, &mut self.prefix, self.limits.max_frame_bytes).await
    }

    /// Names this session's neighbours for pushes: whose pushes it takes (`from`, the
    /// previous hop's server) and where it pushes (`to`).
    pub async fn link(&mut self, token: u64, from: Option<PeerId>, to: Option<PushTarget>) -> Result<(), SessionError> {
        let request = SessionRequest::Link {
            token,
            from: from.map(|p| p.to_string()),
            to,
        };
        match self.exchange(&request).await? {
            SessionResponse::Linked => Ok(()),
            _ => Err(SessionError::Protocol { peer: self.peer }),
        }
    }

    /// The next `Step` of this session (numbered in order).
    fn next_step(&mut self, hidden: &HostTensor, start_from: Option<usize>, push: bool) -> SessionRequest {
        self.step += 1;
        SessionRequest::Step {
            step: self.step,
            hidden: WireTensor::encode(hidden, self.reply_dtype),
            start_from: start_from.map(|p| p as u64),
            push,
        }
    }

    fn decode(&self, out: WireTensor, shape: &[usize]) -> Result<HostTensor, SessionError> {
        out.expect_shape(&shape.iter().map(|&d| Some(d as u64)).collect::<Vec<_>>())?;
        Ok(out.decode(&self.limits)?)
    }

    /// Frees the server's cache now rather than at its idle timeout.
    pub async fn close(mut self) {
        let _ = wire::write_frame(&mut self.stream, &SessionRequest::Close, self.limits.max_frame_bytes).await;
    }

    async fn exchange(&mut self, request: &SessionRequest) -> Result<SessionResponse, SessionError> {
        let peer = self.peer;
        let timeout = self.timeout;
        let max = self.limits.max_frame_bytes;
        let io = async {
            wire::write_frame(&mut self.stream, request, max).await?;
            loop {
                let len = self.reply_len().await?;
                match wire::read_frame_body::<_, SessionResponse>(&mut self.stream, len).await? {
                    // The answer to a push the client has since sent itself.
                    SessionResponse::Pushed { .. } => {}
                    other => return Ok::<_, WireError>(other),
                }
            }
        };
        match crate::rt::timeout(timeout, io).await {
            Err(_) => Err(SessionError::Timeout { peer, timeout }),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(SessionResponse::Error(error))) => Err(SessionError::Remote { peer, error }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

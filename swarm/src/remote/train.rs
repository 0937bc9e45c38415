//! Training through the swarm: [`TrainBlocks`] over stateless span requests.
//!
//! The forward keeps every hop's input; the backward walks the hops in reverse, each server
//! recomputing its span's forward with autodiff. A server lost in either pass is banned and
//! its blocks re-routed: in the forward the rest of the chain is planned again from the failed
//! hop's input; in the backward the replacement hops first rerun the forward from the lost
//! hop's input (to learn their own inputs), then take the backward. Span requests are pure
//! functions of their inputs, so the step's result is that of an undisturbed run.

#[cfg(not(target_arch = "wasm32"))]
use burn::prelude::*;
use libp2p::{Multiaddr, PeerId};
#[cfg(not(target_arch = "wasm32"))]
use shared_model::ModelError;
#[cfg(not(target_arch = "wasm32"))]
use shared_model::tuning::TrainBlocks;
use shared_model::tuning::deep_rows;
use shared_model::weights::HostTensor;

use super::RemoteChain;
#[cfg(not(target_arch = "wasm32"))]
use super::{RemoteBlocks, RemoteError};
use crate::protocol::{ErrorKind, SpanRequest, SpanResponse};
use crate::routing::Hop;
use crate::session::SessionError;
use crate::wire::{WireDtype, WireTensor};

/// One hop of the last training forward.
#[derive(Debug, Clone)]
pub(super) struct TrainHop {
    peer: String,
    start: usize,
    end: usize,
    /// `[batch, seq, hidden]`: what the hop was given.
    input: HostTensor,
}

impl RemoteChain {
    /// The hops of the last training forward: (peer, start, end).
    pub fn train_route(&self) -> Vec<(String, usize, usize)> {
        self.train.iter().map(|h| (h.peer.clone(), h.start, h.end)).collect()
    }

    fn peer_of(&self, peer: &str) -> Result<PeerId, SessionError> {
        peer.parse().map_err(|_| SessionError::Protocol {
            peer: self.client.peer_id(),
        })
    }

    /// Sends one span request to `peer` (dialing its announced addresses first).
    pub(super) async fn span_call(&self, peer: &str, request: SpanRequest) -> Result<SpanResponse, SessionError> {
        let id = self.peer_of(peer)?;
        if let Some(info) = self.servers.iter().find(|s| s.peer_id == peer) {
            for addr in &info.addrs {
                if let Ok(addr) = addr.parse::<Multiaddr>() {
                    let _ = self.client.dial(addr).await;
                }
            }
        }
        let timeout = self.config.step_timeout;
        let mut busy = 0;
        loop {
            match crate::rt::timeout(timeout, self.client.span_request(id, request.clone())).await {
                Err(_) => return Err(SessionError::Timeout { peer: id, timeout }),
                Ok(Err(e)) => return Err(e.into()),
                // A busy server is asked again a few times before it counts as failed.
                Ok(Ok(SpanResponse::Error(error))) if error.kind == ErrorKind::Busy && busy < super::BUSY_RETRIES => {
                    busy += 1;
                    tracing::debug!(%peer, attempt = busy, error = %error, "server busy; asking again");
                    crate::rt::sleep(std::time::Duration::from_millis(250) * 2u32.pow(busy)).await;
                }
                Ok(Ok(SpanResponse::Error(error))) => return Err(SessionError::Remote { peer: id, error }),
                Ok(Ok(r)) => return Ok(r),
            }
        }
    }

    fn prompts_for(&self, start: usize, end: usize) -> Option<WireTensor> {
        self.train_deep
            .as_ref()
            .map(|d| WireTensor::encode(&deep_rows(d, start..end), WireDtype::F32))
    }

    async fn hop_forward(&self, hop: &Hop, x: &HostTensor) -> Result<HostTensor, SessionError> {
        let request = SpanRequest::Forward {
            model: self.config.model.clone(),
            start: hop.start as u32,
            end: hop.end as u32,
            pad: vec![0; x.shape[0]],
            hidden: WireTensor::encode(x, self.config.dtype),
            reply_dtype: self.config.dtype,
            prompts: self.prompts_for(hop.start, hop.end),
        };
        let peer = self.peer_of(&hop.peer)?;
        match self.span_call(&hop.peer, request).await? {
            SpanResponse::Tensor(t) => {
                t.expect_shape(&x.shape.iter().map(|&d| Some(d as u64)).collect::<Vec<_>>())?;
                Ok(t.decode(&self.config.limits)?)
            }
            _ => Err(SessionError::Protocol { peer }),
        }
    }

    async fn hop_backward(
        &self,
        hop: &TrainHop,
        grad: &HostTensor,
    ) -> Result<(HostTensor, Option<HostTensor>), SessionError> {
        let prompts = self.prompts_for(hop.start, hop.end);
        let deep_shape = prompts.as_ref().map(|p| p.shape.clone());
        let request = SpanRequest::Backward {
            model: self.config.model.clone(),
            start: hop.start as u32,
            end: hop.end as u32,
            pad: vec![0; hop.input.shape[0]],
            hidden: WireTensor::encode(&hop.input, self.config.dtype),
            grad_output: WireTensor::encode(grad, self.config.dtype),
            reply_dtype: self.config.dtype,
            prompts,
        };
        let peer = self.peer_of(&hop.peer)?;
        let shape: Vec<Option<u64>> = hop.input.shape.iter().map(|&d| Some(d as u64)).collect();
        match (self.span_call(&hop.peer, request).await?, deep_shape) {
            (SpanResponse::Tensor(t), None) => {
                t.expect_shape(&shape)?;
                Ok((t.decode(&self.config.limits)?, None))
            }
            (SpanResponse::Gradients { input, prompts }, Some(deep_shape)) => {
                input.expect_shape(&shape)?;
                prompts.expect_shape(&deep_shape.iter().map(|&d| Some(d)).collect::<Vec<_>>())?;
                Ok((
                    input.decode(&self.config.limits)?,
                    Some(prompts.decode(&self.config.limits)?),
                ))
            }
            _ => Err(SessionError::Protocol { peer }),
        }
    }

    /// Runs blocks `[start, end)` from `x`, re-routing around failed servers; returns the hops
    /// taken (with their inputs) and the output.
    async fn forward_range(
        &mut self,
        start: usize,
        end: usize,
        x: HostTensor,
        failovers: &mut usize,
    ) -> Result<(Vec<TrainHop>, HostTensor), SessionError> {
        let mut route = self.plan(start, end).await?;
        let mut done = Vec::new();
        let mut h = x;
        let mut i = 0;
        while i < route.len() {
            let hop = route[i].clone();
            match self.hop_forward(&hop, &h).await {
                Ok(out) => {
                    done.push(TrainHop {
                        peer: hop.peer,
                        start: hop.start,
                        end: hop.end,
                        input: std::mem::replace(&mut h, out),
                    });
                    i += 1;
                }
                Err(e) => {
                    self.fail(&hop.peer, hop.start, hop.end, &e, failovers)?;
                    route = self.plan(hop.start, end).await?;
                    i = 0;
                }
            }
        }
        Ok((done, h))
    }

    /// Bans a failed server, or gives up after too many failovers in one pass.
    fn fail(
        &mut self,
        peer: &str,
        start: usize,
        end: usize,
        e: &SessionError,
        failovers: &mut usize,
    ) -> Result<(), SessionError> {
        *failovers += 1;
        tracing::warn!(%peer, start, end, error = %e, "server failed; re-routing its blocks");
        if *failovers > self.config.max_failovers {
            return Err(SessionError::Exhausted {
                start,
                end,
                last: e.to_string(),
            });
        }
        if let Ok(peer) = peer.parse() {
            self.ban(&peer);
        }
        Ok(())
    }

    pub async fn train_forward(
        &mut self,
        x: &HostTensor,
        deep: Option<&HostTensor>,
    ) -> Result<HostTensor, SessionError> {
        if self.servers.is_empty() {
            self.refresh().await?;
        }
        self.train_deep = deep.cloned();
        let mut failovers = 0;
        let (hops, out) = self
            .forward_range(0, self.config.num_layers, x.clone(), &mut failovers)
            .await?;
        tracing::debug!(route = ?hops.iter().map(|h| (&h.peer, h.start, h.end)).collect::<Vec<_>>(), "training route");
        self.train = hops;
        Ok(out)
    }

    pub async fn train_backward(
        &mut self,
        grad_output: &HostTensor,
    ) -> Result<(HostTensor, Option<HostTensor>), SessionError> {
        let mut stack = std::mem::take(&mut self.train);
        let mut g = grad_output.clone();
        let mut parts: Vec<(usize, HostTensor)> = Vec::new();
        let mut failovers = 0;
        while let Some(hop) = stack.pop() {
            match self.hop_backward(&hop, &g).await {
                Ok((gx, gd)) => {
                    g = gx;
                    parts.extend(gd.map(|d| (hop.start, d)));
                }
                Err(e) => {
                    self.fail(&hop.peer, hop.start, hop.end, &e, &mut failovers)?;
                    let (replacement, _) = self
                        .forward_range(hop.start, hop.end, hop.input.clone(), &mut failovers)
                        .await?;
                    stack.extend(replacement);
                }
            }
        }
        let deep = match &self.train_deep {
            Some(d) => {
                parts.sort_by_key(|(start, _)| *start);
                let mut data = Vec::with_capacity(d.numel());
                for (_, part) in &parts {
                    data.extend_from_slice(&part.data);
                }
                if data.len() != d.numel() {
                    return Err(SessionError::Protocol {
                        peer: self.client.peer_id(),
                    });
                }
                Some(HostTensor::new(d.shape.clone(), data))
            }
            None => None,
        };
        Ok((g, deep))
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> RemoteBlocks<B> {
    /// The hops of the last training forward: (peer, start, end).
    pub fn train_route(&self) -> Vec<(String, usize, usize)> {
        self.chain.train_route()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> TrainBlocks for RemoteBlocks<B> {
    type Error = RemoteError;

    fn forward(&mut self, x: &HostTensor, deep: Option<&HostTensor>) -> Result<HostTensor, RemoteError> {
        let handle = self.handle.clone();
        Ok(handle.block_on(self.chain.train_forward(x, deep))?)
    }

    fn backward(&mut self, grad_output: &HostTensor) -> Result<(HostTensor, Option<HostTensor>), RemoteError> {
        if self.chain.train.is_empty() {
            return Err(ModelError::Invalid("backward needs a forward first".into()).into());
        }
        let handle = self.handle.clone();
        Ok(handle.block_on(self.chain.train_backward(grad_output))?)
    }
}

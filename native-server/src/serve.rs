use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::prelude::*;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Stream};
use shared_model::bundle::{BundleMeta, write_bundle, write_meta_bundle};
use shared_model::cache::SpanCache;
use shared_model::fingerprint::fingerprint;
use shared_model::layers::lora::{LoraAdapter, LoraSpan};
use shared_model::loader::ModelFiles;
use shared_model::model::{BlockSpan, Embeddings, LmHead, to_host};
use shared_model::tuning::span_backward;
use swarm::node::{self, Client, InboundEvent, NodeConfig};
use swarm::protocol::{
    ErrorKind, HeadRequest, HeadResponse, INFERENCE_PROTOCOL, Limits, PROTOCOL_VERSION, ProtocolError, ServerInfo,
    SessionRequest, SessionResponse, SpanRequest, SpanResponse,
};
use swarm::wire::{self, WireDtype, WireError, WireTensor};
use swarm::{dht, http};
use tokio::sync::Semaphore;

use crate::args::{BackendKind, ServerConfig};
use crate::span_choice;

/// Runs the server until `shutdown` resolves.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    match config.backend {
        BackendKind::Cpu => serve::<shared_model::Cpu>(config, Default::default(), shutdown).await,
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            shared_model::kernels::cache_compiled_kernels(&kernel_cache_dir());
            #[cfg(feature = "cuda")]
            return serve::<burn::backend::Cuda>(config, Default::default(), shutdown).await;
            #[cfg(not(feature = "cuda"))]
            bail!("this server was built without CUDA support (rebuild with `--features cuda`)")
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return serve::<burn::backend::Wgpu>(config, Default::default(), shutdown).await;
            #[cfg(not(feature = "wgpu"))]
            bail!("this server was built without wgpu support (rebuild with `--features wgpu`)")
        }
    }
}

/// `$COROLLA_CACHE/kernels`, else under `$XDG_CACHE_HOME` or `~/.cache` (as the CLI's cache).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("COROLLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("corolla")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/corolla")))
        .unwrap_or_else(|| PathBuf::from(".cache/corolla"))
        .join("kernels")
}

/// What every session task shares.
///
/// Everything lives on the plain backend `B`, so inference (sessions, stateless forward, head
/// service) runs burn's inference ops and the GPU fast paths of `shared_model::kernels`, and
/// quantized weights stay quantized. A backward request runs on `Autodiff<B>` over
/// [`BlockSpan::autodiff`], which shares the span's dense weights (no second copy).
struct Shared<B: Backend> {
    span: BlockSpan<B>,
    fingerprint: String,
    device: B::Device,
    limits: Limits,
    cache_budget: Semaphore,
    sessions: Semaphore,
    session_timeout: Duration,
    /// LoRA adapters for this span, by name.
    adapters: Vec<(String, Arc<LoraSpan<B>>)>,
}

impl<B: Backend> Shared<B> {
    /// The adapter a session asked for, if this server has it.
    fn adapter(&self, name: Option<&str>) -> Result<Option<Arc<LoraSpan<B>>>, ProtocolError> {
        let Some(name) = name else { return Ok(None) };
        match self.adapters.iter().find(|(n, _)| n == name) {
            Some((_, span)) => Ok(Some(span.clone())),
            None => Err(refuse(
                ErrorKind::BadRequest,
                format!("this server has no adapter {name:?}"),
            )),
        }
    }
}

async fn serve<B: Backend>(config: ServerConfig, device: B::Device, shutdown: impl Future<Output = ()>) -> Result<()>
where
    B::Device: Send + Sync,
{
    // Before any tensor exists: burn fixes a device's float type at its first tensor.
    config.dtype.apply::<B>(&device)?;
    let mut files =
        ModelFiles::open(&config.model).with_context(|| format!("cannot open model {}", config.model.display()))?;
    // Dense reads stay as stored, so the fingerprint is the unquantized model's.
    crate::args::apply_quant(config.quant, &mut files);
    let num_layers = files.config.num_layers;
    let model_fp = fingerprint(&files.config, files.weights.as_ref()).context("cannot fingerprint the model")?;
    let model_name = config
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());

    let keypair = match &config.identity {
        Some(path) => swarm::identity::load_or_create(path)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let relay_only = config
        .listen
        .iter()
        .all(|a| a.iter().any(|p| p == Protocol::P2pCircuit));
    let mut node_config = NodeConfig::new(keypair);
    node_config.listen = config.listen.clone();
    node_config.bootstrap = config.initial_peers.clone();
    node_config.dht_server = !relay_only;
    node_config.record_ttl = config.announce_ttl;
    node_config.auto_relay = !relay_only;
    let (client, mut inbound, event_loop) = node::start(node_config)?;
    tokio::spawn(event_loop.run());
    let peer_id = client.peer_id();

    let num_blocks = match (config.blocks, config.num_blocks) {
        (None, None) => Some(fill_memory::<B>(&files.config, &config, &device)?),
        (_, n) => n,
    };
    let (start, end) = match (config.blocks, num_blocks) {
        (Some((a, b)), _) => (a, b),
        (None, Some(n)) => {
            // Let the DHT settle before reading it: the bootstrap connection is fresh.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let servers = dht::discover(&client, &model_fp, Duration::from_secs(5))
                .await
                .unwrap_or_default();
            let start = span_choice::choose_start(&span_choice::block_throughputs(num_layers, &servers), n);
            tracing::info!(
                start,
                end = start + n.min(num_layers),
                known_servers = servers.len(),
                "chose blocks"
            );
            (start, (start + n).min(num_layers))
        }
        (None, None) => bail!("give --blocks or --num-blocks"),
    };
    if end > num_layers {
        bail!("--blocks {start}:{end} is outside the model's {num_layers} blocks");
    }
    let span = BlockSpan::<B>::load(&files.config, files.weights.as_ref(), start..end, &device)
        .context("cannot load the blocks")?;
    let head: Option<Arc<HeadParts<B>>> = if config.serve_head {
        Some(Arc::new(HeadParts {
            embeddings: Embeddings::load(&files.config, files.weights.as_ref(), &device)
                .context("cannot load the embeddings for head service")?,
            head: LmHead::load(&files.config, files.weights.as_ref(), &device)
                .context("cannot load the LM head for head service")?,
            fingerprint: model_fp.clone(),
            hidden_size: files.config.hidden_size,
            device: device.clone(),
        }))
    } else {
        None
    };
    let client_url = match config.http_listen {
        Some(addr) => {
            Some(serve_client_bundle(&files, &model_name, &model_fp, addr, config.http_url.as_deref()).await?)
        }
        None => None,
    };
    let mut adapters: Vec<(String, Arc<LoraSpan<B>>)> = Vec::new();
    for path in &config.adapters {
        let adapter = LoraAdapter::load(path, &files.config, start..end)
            .with_context(|| format!("cannot load adapter {}", path.display()))?;
        if adapters.iter().any(|(n, _)| *n == adapter.name) {
            bail!("two adapters are named {}", adapter.name);
        }
        tracing::info!(name = %adapter.name, "loaded LoRA adapter");
        adapters.push((adapter.name.clone(), Arc::new(adapter.to_device(&device))));
    }
    let adapter_names: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
    let throughput = measure_throughput(&span, &device)?;
    tracing::info!(%peer_id, start, end, throughput, fingerprint = %model_fp, quant = ?config.quant, "serving");

    let shared = Arc::new(Shared {
        span,
        fingerprint: model_fp.clone(),
        device,
        limits: Limits::default(),
        cache_budget: Semaphore::new(config.cache_tokens.min(Semaphore::MAX_PERMITS)),
        sessions: Semaphore::new(config.max_sessions),
        session_timeout: config.session_timeout,
        adapters,
    });

    let mut incoming = client.accept(INFERENCE_PROTOCOL)?;
    let sessions = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let shared = shared.clone();
                tokio::spawn(async move { serve_session(shared, peer, stream).await });
            }
        })
    };

    let info = |addrs: Vec<String>, relayed: bool, free: u64| ServerInfo {
        peer_id: peer_id.to_string(),
        model: model_fp.clone(),
        model_name: model_name.clone(),
        start: start as u32,
        end: end as u32,
        throughput,
        free_cache_tokens: free,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        public_name: config.public_name.clone(),
        relayed,
        addrs,
        expires_at_ms: dht::now_ms() + config.announce_ttl.as_millis() as u64,
        client_url: client_url.clone(),
        serves_head: head.is_some(),
        adapters: adapter_names.clone(),
    };

    let mut announce = tokio::time::interval(config.announce_ttl / 3);
    let mut announced_once = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = announce.tick() => {
                let (addrs, relayed) = announce_addrs(&client, peer_id, relay_only).await;
                if addrs.is_empty() {
                    // Not reachable yet (a relay circuit still being set up): try again soon.
                    announce.reset_after(Duration::from_millis(500));
                    continue;
                }
                let free = shared.cache_budget.available_permits() as u64;
                match dht::announce(&client, &info(addrs.clone(), relayed, free)).await {
                    Ok(()) => {
                        if !announced_once {
                            tracing::info!(?addrs, "announced in the DHT");
                            if let Some(path) = &config.addr_file {
                                write_atomically(path, &addrs.join("\n"))?;
                            }
                            announced_once = true;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "announcement failed; retrying");
                        announce.reset_after(Duration::from_secs(1));
                    }
                }
            }
            event = inbound.recv() => match event {
                Some(InboundEvent::Span { peer, request, channel }) => {
                    let shared = shared.clone();
                    let client = client.clone();
                    tokio::spawn(async move {
                        let response = span_request(&shared, request).await;
                        if let SpanResponse::Error(e) = &response {
                            tracing::debug!(%peer, error = %e, "span request refused");
                        }
                        let _ = client.respond_span(channel, response).await;
                    });
                }
                Some(InboundEvent::Head { peer, request, channel }) => {
                    let head = head.clone();
                    let client = client.clone();
                    tokio::spawn(async move {
                        let response = match head {
                            Some(head) => tokio::task::spawn_blocking(move || head.answer(request))
                                .await
                                .unwrap_or_else(|e| HeadResponse::Error(refuse(ErrorKind::Internal, e.to_string()))),
                            None => HeadResponse::Error(refuse(ErrorKind::WrongSpan, "this server offers no head service")),
                        };
                        if let HeadResponse::Error(e) = &response {
                            tracing::debug!(%peer, error = %e, "head request refused");
                        }
                        let _ = client.respond_head(channel, response).await;
                    });
                }
                Some(InboundEvent::Info { channel, .. }) => {
                    let (addrs, relayed) = announce_addrs(&client, peer_id, relay_only).await;
                    let free = shared.cache_budget.available_permits() as u64;
                    let _ = client.respond_info(channel, info(addrs, relayed, free)).await;
                }
                None => break,
            },
        }
    }
    let _ = dht::withdraw(&client, &model_fp).await;
    sessions.abort();
    Ok(())
}

/// The embeddings and LM head, run for clients that cannot hold them.
struct HeadParts<B: Backend> {
    embeddings: Embeddings<B>,
    head: LmHead<B>,
    fingerprint: String,
    hidden_size: usize,
    device: B::Device,
}

impl<B: Backend> HeadParts<B> {
    fn answer(&self, request: HeadRequest) -> HeadResponse {
        match self.compute(request) {
            Ok(t) => HeadResponse::Tensor(t),
            Err(e) => HeadResponse::Error(e),
        }
    }

    fn compute(&self, request: HeadRequest) -> Result<WireTensor, ProtocolError> {
        let limits = Limits::default();
        let bad = |e: String| refuse(ErrorKind::BadRequest, e);
        let check_model = |model: &str| {
            if model == self.fingerprint {
                Ok(())
            } else {
                Err(refuse(
                    ErrorKind::WrongModel,
                    format!("this server serves {}", self.fingerprint),
                ))
            }
        };
        match request {
            HeadRequest::Embed {
                model,
                batch,
                token_ids,
                reply_dtype,
            } => {
                check_model(&model)?;
                let batch = batch as usize;
                if batch == 0
                    || batch > limits.max_batch
                    || token_ids.is_empty()
                    || token_ids.len() % batch != 0
                    || token_ids.len() > limits.max_step_tokens
                {
                    return Err(bad(format!(
                        "{} token ids do not make {batch} equal rows within the limits",
                        token_ids.len()
                    )));
                }
                let rows: Vec<Vec<u32>> = token_ids.chunks(token_ids.len() / batch).map(<[u32]>::to_vec).collect();
                let x = self.embeddings.forward(&rows).map_err(|e| bad(e.to_string()))?;
                Ok(WireTensor::encode(&to_host(x), reply_dtype))
            }
            HeadRequest::Logits { model, hidden } => {
                check_model(&model)?;
                hidden
                    .expect_shape(&[None, None, Some(self.hidden_size as u64)])
                    .map_err(|e| bad(e.to_string()))?;
                let h = hidden.decode(&limits).map_err(|e| bad(e.to_string()))?;
                if h.shape[0] * h.shape[1] > limits.max_step_tokens || h.data.iter().any(|v| !v.is_finite()) {
                    return Err(bad("too many positions, or non-finite values".into()));
                }
                let x = Tensor::<B, 3>::from_data(TensorData::new(h.data, h.shape), &self.device);
                Ok(WireTensor::encode(&to_host(self.head.forward(x)), WireDtype::F32))
            }
        }
    }
}

/// Serves the model's client bundle over HTTP; returns its URL.
async fn serve_client_bundle(
    files: &ModelFiles,
    name: &str,
    fingerprint: &str,
    addr: std::net::SocketAddr,
    base_url: Option<&str>,
) -> Result<String> {
    let meta = BundleMeta {
        name,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    };
    let bundle =
        Arc::new(write_bundle(&meta, &files.config, files.weights.as_ref()).context("cannot build the client bundle")?);
    let meta_bundle = Arc::new(write_meta_bundle(&meta, &files.config).context("cannot build the client bundle")?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    let bound = listener.local_addr()?;
    let path = format!("/corolla/v1/models/{fingerprint}/client.safetensors");
    let meta_path = format!("/corolla/v1/models/{fingerprint}/client-meta.safetensors");
    let url = format!(
        "{}{path}",
        base_url.map_or_else(|| format!("http://{bound}"), str::to_string)
    );
    let fp = fingerprint.to_string();
    let handler: http::Handler = Arc::new(move |request: &http::HttpRequest| {
        if request.path == path {
            http::HttpResponse::ok("application/octet-stream", bundle.clone()).immutable(&fp)
        } else if request.path == meta_path {
            http::HttpResponse::ok("application/octet-stream", meta_bundle.clone()).immutable(&format!("{fp}-meta"))
        } else {
            http::HttpResponse::error(404, "not found")
        }
    });
    tokio::spawn(http::serve(listener, handler));
    tracing::info!(%url, "serving the client bundle");
    Ok(url)
}

/// Addresses others can dial: circuit addresses, plus direct listeners unless relay-only.
async fn announce_addrs(client: &Client, peer: PeerId, relay_only: bool) -> (Vec<String>, bool) {
    let Ok(addrs) = client.addresses().await else {
        return (Vec::new(), false);
    };
    let mut out: Vec<Multiaddr> = addrs
        .external
        .iter()
        .filter(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
        .cloned()
        .collect();
    if !relay_only {
        out.extend(
            addrs
                .listen
                .iter()
                .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))
                .cloned(),
        );
    }
    let full = out
        .into_iter()
        .map(|mut a| {
            if !matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                a.push(Protocol::P2p(peer));
            }
            a.to_string()
        })
        .collect();
    (full, addrs.relayed)
}

fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `--num-blocks` when neither it nor `--blocks` is given: as many blocks as the GPU holds,
/// each with its weights and a KV cache of `--cache-tokens` tokens.
fn fill_memory<B: Backend>(
    model: &shared_model::ModelConfig,
    config: &ServerConfig,
    device: &B::Device,
) -> Result<usize> {
    let total = shared_model::kernels::gpu_memory_bytes::<B>(device)
        .context("give --blocks or --num-blocks: this backend does not report its memory (only CUDA does)")?;
    let elem = config.dtype.bytes();
    let (blocks, reserve) = span_choice::blocks_for_memory(model, elem, config.quant, config.cache_tokens, total);
    let a = model.attention;
    tracing::info!(
        blocks,
        gpu_gib = total as f64 / (1u64 << 30) as f64,
        reserve_gib = reserve as f64 / (1u64 << 30) as f64,
        block_weights_mib =
            span_choice::block_weight_bytes(model, elem, config.quant) as f64 / (1u64 << 20) as f64,
        quant = ?config.quant,
        kv_cache_mib_per_block =
            (2 * a.num_kv_heads * a.head_dim * config.cache_tokens * elem) as f64 / (1u64 << 20) as f64,
        cache_tokens = config.cache_tokens,
        dtype = config.dtype.name(),
        "no --blocks or --num-blocks: serving as many blocks as fit the GPU (weights + KV cache, minus a reserve)"
    );
    Ok(blocks)
}

/// Decode tokens per second of the whole span at batch 1, after a short prefill.
///
/// One decode step runs untimed first: on a GPU the first step of a process compiles its
/// kernels (seconds), which would otherwise be announced as the server's speed.
fn measure_throughput<B: Backend>(span: &BlockSpan<B>, device: &B::Device) -> Result<f64> {
    let hidden = span.config().hidden_size;
    let mut cache = span.new_cache(vec![0]);
    let x = Tensor::<B, 3>::zeros([1, 8, hidden], device);
    span.forward(x, &mut cache)?;
    let _ = to_host(span.forward(Tensor::<B, 3>::zeros([1, 1, hidden], device), &mut cache)?);
    let steps = 4;
    let start = Instant::now();
    for _ in 0..steps {
        let x = Tensor::<B, 3>::zeros([1, 1, hidden], device);
        let _ = to_host(span.forward(x, &mut cache)?);
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(kind, message)
}

/// Checks a request's model and blocks against what this server hosts.
fn check_span<B: Backend>(
    shared: &Shared<B>,
    model: &str,
    start: u32,
    end: u32,
) -> Result<Range<usize>, ProtocolError> {
    if model != shared.fingerprint {
        return Err(refuse(
            ErrorKind::WrongModel,
            format!("this server serves model {}", shared.fingerprint),
        ));
    }
    let hosted = shared.span.range();
    let (start, end) = (start as usize, end as usize);
    if start >= end || start < hosted.start || end > hosted.end {
        return Err(refuse(
            ErrorKind::WrongSpan,
            format!(
                "blocks {start}..{end} are not within the hosted {}..{}",
                hosted.start, hosted.end
            ),
        ));
    }
    Ok(start..end)
}

/// Decodes a `[batch, tokens, hidden]` tensor after checking every size.
fn hidden_input<B: Backend>(
    shared: &Shared<B>,
    t: &WireTensor,
    batch: Option<usize>,
) -> Result<Tensor<B, 3>, ProtocolError> {
    let h = shared.span.config().hidden_size as u64;
    let bad = |e: WireError| refuse(ErrorKind::BadRequest, e.to_string());
    t.expect_shape(&[batch.map(|b| b as u64), None, Some(h)]).map_err(bad)?;
    let (b, n) = (t.shape[0] as usize, t.shape[1] as usize);
    if b == 0 || n == 0 || b > shared.limits.max_batch || b.saturating_mul(n) > shared.limits.max_step_tokens {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!(
                "batch {b} x {n} tokens is outside the limits (batch <= {}, tokens <= {})",
                shared.limits.max_batch, shared.limits.max_step_tokens
            ),
        ));
    }
    let host = t.decode(&shared.limits).map_err(bad)?;
    Ok(Tensor::from_data(
        TensorData::new(host.data, host.shape),
        &shared.device,
    ))
}

/// Decodes deep prompts for `blocks` after checking their shape: `[blocks, prefix, hidden]`.
fn deep_prompts<B: Backend>(
    shared: &Shared<B>,
    t: Option<&WireTensor>,
    blocks: &Range<usize>,
) -> Result<Option<Tensor<B, 3>>, ProtocolError> {
    let Some(t) = t else { return Ok(None) };
    let h = shared.span.config().hidden_size as u64;
    let bad = |e: WireError| refuse(ErrorKind::BadRequest, e.to_string());
    t.expect_shape(&[Some(blocks.len() as u64), None, Some(h)])
        .map_err(bad)?;
    let prefix = t.shape[1] as usize;
    if prefix == 0 || prefix > shared.limits.max_step_tokens {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("deep prompts of {prefix} positions"),
        ));
    }
    let host = t.decode(&shared.limits).map_err(bad)?;
    Ok(Some(Tensor::from_data(
        TensorData::new(host.data, host.shape),
        &shared.device,
    )))
}

fn pads(pad: &[u32], batch: usize) -> Result<Vec<usize>, ProtocolError> {
    if pad.len() != batch {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("{} pad entries for a batch of {batch}", pad.len()),
        ));
    }
    Ok(pad.iter().map(|&p| p as usize).collect())
}

fn to_wire<B: Backend>(t: Tensor<B, 3>, dtype: WireDtype) -> WireTensor {
    WireTensor::encode(&to_host(t), dtype)
}

/// Stateless forward / backward over (part of) the span.
async fn span_request<B: Backend>(shared: &Arc<Shared<B>>, request: SpanRequest) -> SpanResponse
where
    B::Device: Send + Sync,
{
    let shared = shared.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<SpanResponse, ProtocolError> {
        match request {
            SpanRequest::Forward {
                model,
                start,
                end,
                pad,
                hidden,
                reply_dtype,
                prompts,
            } => {
                let blocks = check_span(&shared, &model, start, end)?;
                let x = hidden_input(&shared, &hidden, None)?;
                let pad = pads(&pad, x.dims()[0])?;
                let prompts = deep_prompts(&shared, prompts.as_ref(), &blocks)?;
                let y = shared
                    .span
                    .forward_full_prompted(x, pad, blocks, prompts.as_ref(), None)
                    .map_err(|e| refuse(ErrorKind::BadRequest, e.to_string()))?;
                Ok(SpanResponse::Tensor(to_wire(y, reply_dtype)))
            }
            SpanRequest::Backward {
                model,
                start,
                end,
                pad,
                hidden,
                grad_output,
                reply_dtype,
                prompts,
            } => {
                let blocks = check_span(&shared, &model, start, end)?;
                let x = hidden_input(&shared, &hidden, None)?;
                let batch = x.dims()[0];
                let g = hidden_input(&shared, &grad_output, Some(batch))?;
                if g.dims() != x.dims() {
                    return Err(refuse(ErrorKind::BadRequest, "grad_output must have the input's shape"));
                }
                let pad = pads(&pad, batch)?;
                let prompts = deep_prompts(&shared, prompts.as_ref(), &blocks)?;
                let span = shared
                    .span
                    .autodiff()
                    .map_err(|e| refuse(ErrorKind::Internal, e.to_string()))?;
                let (grad, prompt_grad) = span_backward::<Autodiff<B>>(
                    &span,
                    blocks,
                    pad,
                    Tensor::from_inner(x),
                    prompts.map(Tensor::from_inner),
                    Tensor::from_inner(g),
                )
                .map_err(|e| refuse(ErrorKind::BadRequest, e.to_string()))?;
                let input = WireTensor::encode(&to_host(grad), reply_dtype);
                Ok(match prompt_grad {
                    Some(p) => SpanResponse::Gradients {
                        input,
                        prompts: WireTensor::encode(&to_host(p), reply_dtype),
                    },
                    None => SpanResponse::Tensor(input),
                })
            }
        }
    });
    match work.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => SpanResponse::Error(e),
        Err(e) => SpanResponse::Error(refuse(ErrorKind::Internal, e.to_string())),
    }
}

/// One inference session: `Open`, then `Step`s, on its own stream.
async fn serve_session<B: Backend>(shared: Arc<Shared<B>>, peer: PeerId, mut stream: Stream)
where
    B::Device: Send + Sync,
{
    let max = shared.limits.max_frame_bytes;
    if let Err(e) = session_loop(&shared, &mut stream).await {
        tracing::debug!(%peer, error = %e, "session ended with an error");
        let _ = wire::write_frame(&mut stream, &SessionResponse::Error(e), max).await;
    }
}

async fn session_loop<B: Backend>(shared: &Arc<Shared<B>>, stream: &mut Stream) -> Result<(), ProtocolError>
where
    B::Device: Send + Sync,
{
    let max = shared.limits.max_frame_bytes;
    let bad = |e: WireError| refuse(ErrorKind::BadRequest, e.to_string());
    let _slot = shared
        .sessions
        .try_acquire()
        .map_err(|_| refuse(ErrorKind::Busy, "this server has reached --max-sessions"))?;
    let first = tokio::time::timeout(
        shared.session_timeout,
        wire::read_frame::<_, SessionRequest>(stream, max),
    )
    .await
    .map_err(|_| refuse(ErrorKind::Closed, "no Open message"))?
    .map_err(bad)?;
    let SessionRequest::Open {
        model,
        start,
        end,
        batch,
        max_length,
        pad,
        reply_dtype,
        prompts,
        adapter,
    } = first
    else {
        return Err(refuse(ErrorKind::BadRequest, "a session must start with Open"));
    };
    let blocks = check_span(shared, &model, start, end)?;
    let prompts = deep_prompts(shared, prompts.as_ref(), &blocks)?.map(Arc::new);
    let adapter = shared.adapter(adapter.as_deref())?;
    let batch = batch as usize;
    let max_length = max_length as usize;
    if batch == 0 || batch > shared.limits.max_batch || max_length == 0 {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("batch {batch} / max_length {max_length} out of range"),
        ));
    }
    if let Some(context) = shared.span.config().max_position_embeddings
        && max_length > context
    {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("max_length {max_length} exceeds the context of {context}"),
        ));
    }
    let pad = pads(&pad, batch)?;
    let tokens = batch.saturating_mul(max_length);
    let permits = u32::try_from(tokens).map_err(|_| refuse(ErrorKind::BadRequest, "cache request too large"))?;
    // Wait a little for other sessions to finish before saying busy.
    let _cache = tokio::time::timeout(Duration::from_secs(5), shared.cache_budget.acquire_many(permits))
        .await
        .map_err(|_| refuse(ErrorKind::Busy, format!("no room for {tokens} cache tokens")))?
        .map_err(|_| refuse(ErrorKind::Internal, "cache budget closed"))?;
    wire::write_frame(
        stream,
        &SessionResponse::Opened {
            cache_tokens: tokens as u64,
        },
        max,
    )
    .await
    .map_err(bad)?;

    let mut cache: Option<SpanCache<B>> = Some(SpanCache::new(blocks.len(), pad));
    loop {
        let request = match tokio::time::timeout(
            shared.session_timeout,
            wire::read_frame::<_, SessionRequest>(stream, max),
        )
        .await
        {
            Err(_) => return Err(refuse(ErrorKind::Closed, "session idle for too long")),
            Ok(Err(WireError::Closed)) => return Ok(()),
            Ok(Err(e @ WireError::Decode(_))) => {
                // The frame boundary is intact: report and keep the session.
                wire::write_frame(stream, &SessionResponse::Error(bad(e)), max)
                    .await
                    .map_err(bad)?;
                continue;
            }
            Ok(Err(e)) => return Err(bad(e)),
            Ok(Ok(r)) => r,
        };
        let (step, hidden) = match request {
            SessionRequest::Close => return Ok(()),
            SessionRequest::Open { .. } => {
                wire::write_frame(
                    stream,
                    &SessionResponse::Error(refuse(ErrorKind::BadRequest, "session already open")),
                    max,
                )
                .await
                .map_err(bad)?;
                continue;
            }
            SessionRequest::Step { step, hidden } => (step, hidden),
        };
        let Some(mut c) = cache.take() else {
            return Err(refuse(ErrorKind::Internal, "session cache lost"));
        };
        let result = match hidden_input(shared, &hidden, Some(batch)) {
            Err(e) => Err(e),
            Ok(_) if c.len + hidden.shape[1] as usize > max_length => Err(refuse(
                ErrorKind::BadRequest,
                format!(
                    "{} more tokens exceed the session's max_length of {max_length}",
                    hidden.shape[1]
                ),
            )),
            Ok(x) => {
                let worker = shared.clone();
                let blocks = blocks.clone();
                let prompts = prompts.clone();
                let adapter = adapter.clone();
                let joined = tokio::task::spawn_blocking(move || {
                    let out = worker
                        .span
                        .forward_blocks_prompted(x, &mut c, blocks, prompts.as_deref(), adapter.as_deref(), |_, _| {})
                        .map(|y| to_wire(y, reply_dtype));
                    (c, out)
                })
                .await;
                match joined {
                    Ok((c_back, out)) => {
                        c = c_back;
                        out.map_err(|e| refuse(ErrorKind::BadRequest, e.to_string()))
                    }
                    Err(e) => return Err(refuse(ErrorKind::Internal, e.to_string())),
                }
            }
        };
        cache = Some(c);
        let response = match result {
            Ok(hidden) => SessionResponse::Output { step, hidden },
            Err(e) => SessionResponse::Error(e),
        };
        wire::write_frame(stream, &response, max).await.map_err(bad)?;
    }
}

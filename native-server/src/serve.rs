//! Start-up and wiring: load the span, join the swarm, then hand each inbound stream to its
//! protocol's handler under [`Admission`], and announce in the background until shutdown.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use burn::prelude::*;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{PeerId, Stream};
use shared_model::fingerprint::fingerprint;
use shared_model::layers::lora::{LoraAdapter, LoraSpan};
use shared_model::loader::ModelFiles;
use shared_model::model::{BlockSpan, Embeddings, LmHead, client_tensor_names, span_tensor_names, to_host};
use shared_model::progress::LoadBar;
use swarm::dht;
use swarm::limits::{MemoryCeiling, Protect};
use swarm::node::{self, NodeConfig};
use swarm::protocol::{
    HEAD_PROTOCOL, INFERENCE_PROTOCOL, Limits, PROTOCOL_VERSION, PUSH_PROTOCOL, ProtocolError, SPAN_PROTOCOL,
    ServerInfo,
};
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, ServerLimits, Ticket};
use crate::announce::Announcer;
use crate::args::{BackendKind, ServerConfig};
use crate::batch::{BatchConfig, Batcher};
use crate::cost::CostModel;
use crate::head::HeadParts;
use crate::hosted::Hosted;
use crate::memory::Ceiling;
use crate::metrics::ServerMetrics;
use crate::span_choice;

/// Runs the server until `shutdown` resolves.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    match config.backend {
        BackendKind::Cpu => serve::<shared_model::Cpu>(config, Default::default(), shutdown).await,
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            shared_model::kernels::cache_compiled_kernels(&cache_dir("kernels"));
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

/// `$COROLLA_CACHE/<sub>`, else under `$XDG_CACHE_HOME` or `~/.cache` (as the CLI's cache).
fn cache_dir(sub: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("COROLLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("corolla")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/corolla")))
        .unwrap_or_else(|| PathBuf::from(".cache/corolla"))
        .join(sub)
}

/// What every handler shares.
pub struct Context<B: Backend> {
    pub hosted: Arc<Hosted<B>>,
    pub admission: Arc<Admission>,
    pub cost: CostModel,
    /// With `--serve-head`.
    pub head: Option<Arc<HeadParts<B>>>,
    /// Test-only lies (feature `fault-injection`); none otherwise.
    pub faults: crate::faults::Faults,
    /// Every forward through the blocks goes through it.
    pub batcher: Arc<Batcher<B>>,
    pub metrics: Arc<ServerMetrics>,
    /// Cancelled when this span stops being served: its idle sessions end.
    pub retired: CancellationToken,
    /// This span's sessions that take pushes from the previous hop.
    pub pushes: crate::push::Registry<B>,
    /// The batcher's task, which ends with the context (and frees the span with it).
    batching: tokio::task::AbortHandle,
}

impl<B: Backend> Context<B> {
    /// Stops serving this span: queued and future steps, and idle sessions, are answered with
    /// `error` (their clients fail over).
    pub fn retire(&self, error: ProtocolError) {
        self.batcher.retire(error);
        self.retired.cancel();
    }
}

impl<B: Backend> Drop for Context<B> {
    fn drop(&mut self) {
        self.batching.abort();
    }
}

/// What every span the server serves shares: the flags, the device, the model's identity, the
/// head service, the budgets and the metrics. A move to other blocks builds a new
/// [`Context`] from it.
pub struct Shared<B: Backend> {
    pub config: ServerConfig,
    pub device: B::Device,
    pub fingerprint: String,
    pub model: shared_model::ModelConfig,
    pub head: Option<Arc<HeadParts<B>>>,
    pub admission: Arc<Admission>,
    pub metrics: Arc<ServerMetrics>,
}

impl<B: Backend> Shared<B>
where
    B::Device: Send + Sync,
{
    /// Loads blocks `blocks` from `source` (with their LoRA adapters) and builds their context;
    /// its batcher starts at once. Blocking: call from a blocking thread inside the runtime.
    pub fn context(
        &self,
        files: &ModelFiles,
        source: &dyn shared_model::weights::WeightSource,
        blocks: std::ops::Range<usize>,
    ) -> Result<Arc<Context<B>>> {
        let span = BlockSpan::<B>::load(&files.config, source, blocks.clone(), &self.device)
            .context("cannot load the blocks")?;
        let (adapters, lora_rank) = load_adapters::<B>(&self.config, files, blocks.clone(), &self.device)?;
        let limits = self.admission.limits();
        let cost = CostModel::new(
            &files.config,
            blocks.len(),
            self.config.dtype.bytes(),
            limits.chunk_tokens,
            lora_rank,
            span.attention_tiling(),
        );
        let hosted = Arc::new(Hosted {
            span,
            fingerprint: self.fingerprint.clone(),
            device: self.device.clone(),
            limits: limits.wire,
            adapters,
        });
        let batcher = Batcher::new(
            hosted.clone(),
            self.admission.clone(),
            self.metrics.clone(),
            BatchConfig {
                max_tokens: self.config.max_batch_tokens,
                wait: self.config.batch_wait,
                // Every queued step belongs to a session or a request that admission let in.
                max_queued: (limits.max_sessions as usize + self.config.max_pending_streams).max(64),
                chunk_tokens: self.config.chunk_tokens,
            },
        );
        let batching = tokio::spawn(batcher.clone().serve()).abort_handle();
        Ok(Arc::new(Context {
            hosted,
            admission: self.admission.clone(),
            cost,
            head: self.head.clone(),
            faults: self.config.faults.clone(),
            batcher,
            metrics: self.metrics.clone(),
            retired: CancellationToken::new(),
            pushes: Default::default(),
            batching,
        }))
    }

    /// Opens the model again and loads `blocks` (downloading their shards for a Hub model):
    /// a move's new span. Refuses if the checkpoint on disk is no longer the one served.
    pub fn reload(&self, blocks: std::ops::Range<usize>) -> Result<Arc<Context<B>>> {
        let files = open_files(&self.config)?;
        let fp = fingerprint(&files.config, files.weights.as_ref()).context("cannot fingerprint the model")?;
        if fp != self.fingerprint {
            bail!(
                "the model on disk changed (fingerprint {fp}, serving {}): not loading other blocks of it",
                self.fingerprint
            );
        }
        let names = span_tensor_names(&files.config, files.weights.as_ref(), blocks.clone());
        let source = LoadBar::fetch_and_wrap(
            &files.weights,
            &names,
            &format!("blocks {}..{}", blocks.start, blocks.end),
        )
        .context("cannot download the blocks")?;
        let ctx = self.context(&files, source.as_ref(), blocks)?;
        source.finish();
        Ok(ctx)
    }
}

/// The model's files as the flags say: opened (from the Hub if named so), quantized on load
/// as `--quant` says.
fn open_files(config: &ServerConfig) -> Result<ModelFiles> {
    let hub = shared_model::hub::HubOptions::from_env(cache_dir("hub-samples"));
    let mut files = shared_model::hub::open_model(&config.model, &hub)
        .with_context(|| format!("cannot open model {}", config.model.display()))?;
    // Dense reads stay as stored, so the fingerprint is the unquantized model's.
    crate::args::apply_quant(config.quant, &mut files);
    Ok(files)
}

/// How many blocks to serve: `--blocks`, `--num-blocks`, or as many as the GPU holds.
fn block_count<B: Backend>(files: &ModelFiles, config: &ServerConfig, device: &B::Device) -> Result<usize> {
    let num_layers = files.config.num_layers;
    let n = match (config.blocks, config.num_blocks) {
        (Some((a, b)), _) => {
            if b > num_layers {
                bail!("--blocks {a}:{b} is outside the model's {num_layers} blocks");
            }
            b - a
        }
        (None, Some(n)) => n,
        (None, None) => fill_memory::<B>(&files.config, config, device)?,
    };
    Ok(n.min(num_layers))
}

/// Where the span of `count` blocks sits: `--blocks`, or the weakest window of the swarm.
async fn choose_blocks(
    files: &ModelFiles,
    config: &ServerConfig,
    client: &node::Client,
    model_fp: &str,
    count: usize,
) -> (usize, usize) {
    if let Some(blocks) = config.blocks {
        return blocks;
    }
    let num_layers = files.config.num_layers;
    // Let the DHT settle before reading it: the bootstrap connection is fresh.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let servers = dht::discover(client, model_fp, Some(num_layers as u32), Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let start = span_choice::choose_start(&span_choice::block_throughputs(num_layers, &servers), count);
    tracing::info!(
        start,
        end = start + count,
        known_servers = servers.len(),
        "chose blocks"
    );
    (start, (start + count).min(num_layers))
}

/// Refuses to start with a record that readers would refuse (a name or an adapter list over
/// their bounds), rather than serve unseen.
fn check_own_record(keypair: &libp2p::identity::Keypair, template: &ServerInfo, ttl: Duration) -> Result<()> {
    let now_ms = dht::now_ms();
    let info = ServerInfo {
        expires_at_ms: now_ms + ttl.as_millis() as u64,
        ..template.clone()
    };
    let peer = keypair.public().to_peer_id();
    let expect = swarm::record::Expect {
        peer: &peer,
        model: Some(&info.model),
        num_blocks: None,
        now_ms,
    };
    swarm::record::sign(keypair, &info)
        .and_then(|bytes| swarm::record::verify(&bytes, &expect))
        .context("this server's DHT record would be refused by every client")?;
    Ok(())
}

/// The memory ceiling, from the flags and the model before anything is loaded.
fn ceiling(files: &ModelFiles, config: &ServerConfig, limits: &ServerLimits, blocks: usize) -> Ceiling {
    let model = &files.config;
    let elem = config.dtype.bytes();
    let mut weights = blocks as u64 * span_choice::block_weight_bytes(model, elem, config.quant) as u64;
    if config.serve_head {
        weights += 2 * (model.vocab_size * model.hidden_size * elem) as u64;
    }
    // LoRA adapters: their files, read as f32 on the host and uploaded.
    let adapters: u64 = config
        .adapters
        .iter()
        .map(|dir| std::fs::metadata(dir.join("adapter_model.safetensors")).map_or(0, |m| m.len()))
        .sum();
    let kv = limits
        .cache_tokens
        .saturating_mul(shared_model::cost::kv_cache_bytes(model, blocks, 1, 1, elem));
    Ceiling::new(
        limits,
        config.max_connections,
        config.backend == BackendKind::Cpu,
        weights + 4 * adapters,
        kv,
    )
}

/// The server's limits: the flags, with per-peer defaults that need the model's context.
fn server_limits(config: &ServerConfig, context: Option<usize>) -> ServerLimits {
    let cache = config.cache_tokens as u64;
    // A quarter of the budget, raised towards one whole-context session but never past half:
    // one peer alone cannot take the cache.
    let per_peer = config.max_cache_tokens_per_peer.map_or_else(
        || (cache / 4).max(context.map_or(0, |c| c as u64)).min(cache / 2),
        |n| n as u64,
    );
    ServerLimits {
        max_sessions: config.max_sessions as u32,
        max_sessions_per_peer: config.max_sessions_per_peer as u32,
        cache_tokens: cache,
        max_cache_tokens_per_peer: per_peer.max(1),
        max_request_memory: config.max_request_memory,
        compute_slots: config.compute_slots as u32,
        max_pending_streams: config.max_pending_streams as u32,
        max_pending_streams_per_peer: config.max_pending_streams_per_peer as u32,
        max_requests_per_peer: config.max_requests_per_peer as u32,
        open_timeout: config.open_timeout,
        write_timeout: config.write_timeout,
        session_timeout: config.session_timeout,
        queue_timeout: config.queue_timeout,
        chunk_tokens: config.chunk_tokens,
        wire: Limits::default(),
    }
}

async fn serve<B: Backend>(config: ServerConfig, device: B::Device, shutdown: impl Future<Output = ()>) -> Result<()>
where
    B::Device: Send + Sync,
{
    // Before any tensor exists: burn fixes a device's float type at its first tensor.
    config.dtype.apply::<B>(&device)?;
    let files = open_files(&config)?;
    let model_fp = fingerprint(&files.config, files.weights.as_ref()).context("cannot fingerprint the model")?;
    let model_name = shared_model::hub::model_name(&config.model);

    let count = block_count::<B>(&files, &config, &device)?;
    // Written to disk (and served from there) before the weights load.
    let bundle = match config.http_listen {
        Some(addr) => Some(
            crate::bundle::serve(
                &files,
                &model_name,
                &model_fp,
                &config
                    .quant
                    .map_or_else(String::new, |kind| format!("quantize-on-load={kind:?}")),
                addr,
                config.http_url.as_deref(),
                &cache_dir("served-bundles"),
            )
            .await?,
        ),
        None => None,
    };
    let limits = server_limits(&config, files.config.max_position_embeddings);
    let ceiling = ceiling(&files, &config, &limits, count);

    let keypair = match &config.identity {
        Some(path) => swarm::identity::load_or_create(path)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let relay_only = config
        .listen
        .iter()
        .all(|a| a.iter().any(|p| p == Protocol::P2pCircuit));
    let admission = Admission::new(limits);
    // Peers that hold a session or a request here keep their connections when a flood fills
    // the connection limit.
    let mut node_config = NodeConfig::new(keypair.clone());
    node_config.listen = config.listen.clone();
    node_config.bootstrap = config.initial_peers.clone();
    node_config.dht_server = !relay_only;
    node_config.record_ttl = config.announce_ttl;
    node_config.swarm_key = config.swarm_key.clone();
    node_config.allow_peers = config.allow_peers.clone();
    if let Some(key) = &config.swarm_key {
        tracing::info!(swarm_key = %key.fingerprint(), "private swarm");
    }
    node_config.auto_relay = !relay_only;
    node_config.connections.max_connections = config.max_connections;
    node_config.connections.max_per_peer = config.max_connections_per_peer.min(config.max_connections);
    node_config.connections.memory_ceiling = Some(MemoryCeiling::Bytes(ceiling.total() as usize));
    node_config.connections.protect = {
        let admission = admission.clone();
        Protect::new(move |peer| admission.holds(peer))
    };
    let (client, inbound, event_loop) = node::start(node_config)?;
    let event_loop = tokio::spawn(event_loop.run());
    let peer_id = client.peer_id();

    let (start, end) = choose_blocks(&files, &config, &client, &model_fp, count).await;
    let mut names = span_tensor_names(&files.config, files.weights.as_ref(), start..end);
    if config.serve_head {
        names.extend(client_tensor_names(&files.config, files.weights.as_ref()));
    }
    // Downloads (a Hub model's shards of this span) first, then loading: two bars, in turn.
    let source = LoadBar::fetch_and_wrap(&files.weights, &names, &format!("blocks {start}..{end}"))
        .context("cannot download the blocks")?;
    let head = if config.serve_head {
        Some(Arc::new(HeadParts {
            embeddings: Embeddings::<B>::load(&files.config, source.as_ref(), &device)
                .context("cannot load the embeddings for head service")?,
            head: LmHead::load(&files.config, source.as_ref(), &device)
                .context("cannot load the LM head for head service")?,
        }))
    } else {
        None
    };
    let net = {
        let client = client.clone();
        swarm::metrics::NetCollector::new(move || client.net_stats())
    };
    let metrics = Arc::new(ServerMetrics::new(Some(net)));
    let shared = Arc::new(Shared {
        config: config.clone(),
        device: device.clone(),
        fingerprint: model_fp.clone(),
        model: files.config.clone(),
        head,
        admission: admission.clone(),
        metrics: metrics.clone(),
    });
    let ctx = shared.context(&files, source.as_ref(), start..end)?;
    source.finish();
    let throughput = measure_throughput(&ctx.hosted.span, &device)?;
    tracing::info!(%peer_id, start, end, throughput, fingerprint = %model_fp, quant = ?config.quant, "serving");
    metrics.span(&(start..end));

    ceiling.log();
    let limits = admission.limits();
    tracing::info!(
        max_sessions = limits.max_sessions,
        max_sessions_per_peer = limits.max_sessions_per_peer,
        cache_tokens = limits.cache_tokens,
        max_cache_tokens_per_peer = limits.max_cache_tokens_per_peer,
        max_request_memory = limits.max_request_memory,
        compute_slots = limits.compute_slots,
        chunk_tokens = limits.chunk_tokens,
        "budgets"
    );
    let template = ServerInfo {
        peer_id: peer_id.to_string(),
        model: model_fp.clone(),
        model_name: model_name.clone(),
        start: start as u32,
        end: end as u32,
        // A prior for clients, who measure for themselves; readers refuse more than this.
        throughput: config.faults.announced(throughput.min(swarm::record::MAX_THROUGHPUT)),
        free_cache_tokens: 0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        public_name: config.public_name.clone(),
        relayed: false,
        addrs: Vec::new(),
        expires_at_ms: 0,
        bundle: bundle.map(|b| b.offer),
        serves_head: ctx.head.is_some(),
        adapters: ctx.hosted.adapters.iter().map(|(n, _)| n.clone()).collect(),
        load: None,
        model_blocks: files.config.num_layers as u32,
        numerics: match config.quant {
            Some(q) => format!("{}+{q:?}", config.dtype.name()).to_ascii_lowercase(),
            None => config.dtype.name().to_string(),
        },
    };
    check_own_record(&keypair, &template, config.announce_ttl)?;
    // Everything is loaded: the checkpoint's mapped pages need not stay resident.
    drop(files);
    let current = Arc::new(Current::new(ctx));

    let mut tasks = vec![
        accept(&current, &admission, &client, INFERENCE_PROTOCOL, Handler::Session)?,
        accept(&current, &admission, &client, SPAN_PROTOCOL, Handler::Span)?,
        accept(&current, &admission, &client, HEAD_PROTOCOL, Handler::Head)?,
        accept(&current, &admission, &client, PUSH_PROTOCOL, Handler::Push)?,
    ];
    if let Some(addr) = config.metrics_listen {
        let refresh = {
            let (metrics, admission) = (metrics.clone(), admission.clone());
            move || metrics.refresh(&admission.load())
        };
        let router = swarm::metrics::router(metrics.registry(), refresh);
        let (task, bound) = swarm::metrics::listen(addr, router)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(address = %bound, "serving metrics at /metrics");
        tasks.push(task);
    }
    let announcer = Announcer::new(
        client.clone(),
        keypair.clone(),
        template,
        config.announce_ttl,
        relay_only,
        admission,
        config.addr_file.clone(),
    );
    tasks.push(tokio::spawn(announcer.clone().answer_info(inbound)));
    tasks.push(tokio::spawn(announcer.clone().run()));
    let balancing = match config.balance {
        Some(balance) => {
            let relocator = Arc::new(crate::relocate::Relocator {
                current: current.clone(),
                shared,
                announcer,
            });
            let rebalance = crate::balance::run(relocator, client.clone(), balance, model_fp.clone());
            futures::future::Either::Left(rebalance)
        }
        None => futures::future::Either::Right(futures::future::pending()),
    };

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        result = balancing => result,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), dht::withdraw(&client, &model_fp)).await;
    for task in tasks {
        task.abort();
    }
    event_loop.abort();
    outcome
}

/// The context new streams get: the span served now, or none while a move reloads.
pub struct Current<B: Backend> {
    ctx: RwLock<Option<Arc<Context<B>>>>,
}

impl<B: Backend> Current<B> {
    pub fn new(ctx: Arc<Context<B>>) -> Self {
        Self {
            ctx: RwLock::new(Some(ctx)),
        }
    }

    pub fn get(&self) -> Option<Arc<Context<B>>> {
        self.ctx.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `ctx` in place (none: new streams are refused) and returns what was there.
    pub fn set(&self, ctx: Option<Arc<Context<B>>>) -> Option<Arc<Context<B>>> {
        std::mem::replace(&mut *self.ctx.write().unwrap_or_else(|e| e.into_inner()), ctx)
    }
}

/// The LoRA adapters of `--adapters` and the largest fused rank.
#[allow(clippy::type_complexity)]
fn load_adapters<B: Backend>(
    config: &ServerConfig,
    files: &ModelFiles,
    blocks: std::ops::Range<usize>,
    device: &B::Device,
) -> Result<(Vec<(String, Arc<LoraSpan<B>>)>, Option<usize>)> {
    let mut adapters: Vec<(String, Arc<LoraSpan<B>>)> = Vec::new();
    let mut rank = None::<usize>;
    for path in &config.adapters {
        let adapter = LoraAdapter::load(path, &files.config, blocks.clone())
            .with_context(|| format!("cannot load adapter {}", path.display()))?;
        if adapters.iter().any(|(n, _)| *n == adapter.name) {
            bail!("two adapters are named {}", adapter.name);
        }
        for pair in adapter
            .blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.out, &b.gate_up, &b.down])
            .flatten()
        {
            rank = Some(rank.unwrap_or(0).max(pair.a.shape[0]));
        }
        tracing::info!(name = %adapter.name, "loaded LoRA adapter");
        adapters.push((adapter.name.clone(), Arc::new(adapter.to_device(device))));
    }
    Ok((adapters, rank))
}

/// Which protocol a stream speaks.
#[derive(Debug, Clone, Copy)]
enum Handler {
    Session,
    Span,
    Head,
    Push,
}

/// Accepts `protocol`'s streams: each is admitted as a pending stream (or dropped at once) and
/// served in a task of its own, on the span served when it arrived. The loop itself never
/// waits on anything else, so streams are never dropped for lack of a reader.
fn accept<B: Backend>(
    current: &Arc<Current<B>>,
    admission: &Arc<Admission>,
    client: &node::Client,
    protocol: libp2p::StreamProtocol,
    handler: Handler,
) -> Result<tokio::task::JoinHandle<()>>
where
    B::Device: Send + Sync,
{
    let mut incoming = client.accept(protocol)?;
    let (current, admission, client) = (current.clone(), admission.clone(), client.clone());
    Ok(tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Some(ctx) = current.get() else {
                // Moving to other blocks, none loaded: the peer's client tries elsewhere.
                tracing::debug!(%peer, ?handler, "stream refused while moving");
                drop(stream);
                continue;
            };
            match admission.stream(peer) {
                Ok(ticket) => {
                    tokio::spawn(handle(ctx, client.clone(), handler, peer, stream, ticket));
                }
                Err(e) => {
                    tracing::debug!(%peer, ?handler, error = %e, "stream refused");
                    drop(stream);
                }
            }
        }
    }))
}

async fn handle<B: Backend>(
    ctx: Arc<Context<B>>,
    client: node::Client,
    handler: Handler,
    peer: PeerId,
    stream: Stream,
    ticket: Ticket,
) where
    B::Device: Send + Sync,
{
    match handler {
        Handler::Session => crate::session::serve(ctx, client, peer, stream, ticket).await,
        Handler::Push => crate::push::serve(ctx, peer, stream, ticket).await,
        Handler::Span => crate::span_work::serve(ctx, peer, stream, ticket).await,
        Handler::Head => crate::head::serve(ctx, peer, stream, ticket).await,
    }
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

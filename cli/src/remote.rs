//! `corolla generate --initial-peers ...`: embeddings and LM head here (from a checkpoint or a
//! downloaded client bundle), blocks in the swarm.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::prelude::Backend;
use shared_model::ModelConfig;
use shared_model::fingerprint::fingerprint;
use shared_model::generate::{GenerateParams, generate_drafted};
use shared_model::loader::ModelFiles;
use shared_model::model::{Embeddings, LmHead};
use shared_model::tuning::Prompts;
use swarm::node::{self, Client, NodeConfig};
use swarm::protocol::Limits;
use swarm::remote::{RemoteBlocks, RemoteConfig};
use swarm::routing::RouteMode;
use swarm::wire::WireDtype;

use crate::args::{GenerateArgs, RoutingArg, WireDtypeArg};
use crate::backend::OnBackend;
use crate::generate::emit;

/// A swarm client node on its own runtime, connected to at least one initial peer.
pub fn connect(
    initial_peers: &[libp2p::Multiaddr],
    swarm_key: Option<&std::path::Path>,
) -> Result<(tokio::runtime::Runtime, Client)> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut config = NodeConfig::new(libp2p::identity::Keypair::generate_ed25519());
    config.bootstrap = initial_peers.to_vec();
    config.swarm_key = swarm_key.map(swarm::private::SwarmKey::read).transpose()?;
    let (client, _inbound, event_loop) = {
        let _guard = runtime.enter();
        node::start(config)?
    };
    runtime.spawn(event_loop.run());
    let reachable = runtime.block_on(async {
        let mut any = false;
        for addr in initial_peers {
            match tokio::time::timeout(Duration::from_secs(10), client.dial(addr.clone())).await {
                Ok(Ok(())) => any = true,
                Ok(Err(e)) => tracing::warn!(%addr, error = %e, "initial peer unreachable"),
                Err(_) => tracing::warn!(%addr, "initial peer did not answer"),
            }
        }
        any
    });
    if !reachable {
        bail!("no initial peer is reachable (relay unreachable?): {initial_peers:?}");
    }
    Ok((runtime, client))
}

/// A joined swarm and the model to run in it.
pub struct Joined {
    pub runtime: tokio::runtime::Runtime,
    pub client: Client,
    /// The model's fingerprint.
    pub model: String,
    /// What logs call it.
    pub model_name: String,
}

impl Joined {
    /// Joins through `initial_peers` to run the checkpoint `files`.
    pub fn for_checkpoint(
        files: &ModelFiles,
        initial_peers: &[libp2p::Multiaddr],
        swarm_key: Option<&std::path::Path>,
    ) -> Result<Self> {
        let model = fingerprint(&files.config, files.weights.as_ref()).context("cannot fingerprint the model")?;
        let (runtime, client) = connect(initial_peers, swarm_key)?;
        Ok(Self {
            runtime,
            client,
            model,
            model_name: files.path.display().to_string(),
        })
    }
}

/// Remote execution settings for this model.
pub fn remote_config(files: &ModelFiles, dtype: WireDtypeArg, routing: RoutingArg) -> Result<RemoteConfig> {
    let model = fingerprint(&files.config, files.weights.as_ref()).context("cannot fingerprint the model")?;
    Ok(config_for(
        model,
        files.path.display().to_string(),
        &files.config,
        dtype,
        routing,
    ))
}

/// Remote execution settings for the model `fingerprint` whose client part is `files`.
pub fn config_for_bundle(
    fingerprint: &str,
    name: &str,
    files: &ModelFiles,
    dtype: WireDtypeArg,
    routing: RoutingArg,
) -> RemoteConfig {
    config_for(fingerprint.to_string(), name.to_string(), &files.config, dtype, routing)
}

/// Remote execution settings for the model with fingerprint `model`.
fn config_for(
    model: String,
    model_name: String,
    config: &ModelConfig,
    dtype: WireDtypeArg,
    routing: RoutingArg,
) -> RemoteConfig {
    RemoteConfig {
        model,
        model_name,
        num_layers: config.num_layers,
        dtype: match dtype {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
            WireDtypeArg::Bf16 => WireDtype::Bf16,
        },
        step_timeout: Duration::from_secs(60),
        discovery_timeout: Duration::from_secs(10),
        max_failovers: 8,
        limits: Limits::default(),
        deep_prompts: None,
        adapter: None,
        hidden_size: config.hidden_size,
        chunk_tokens: swarm::remote::DEFAULT_CHUNK_TOKENS,
        verify_rate: swarm::remote::DEFAULT_VERIFY_RATE,
        verify_seed: swarm::dht::now_ms(),
        push: true,
        route_mode: match routing {
            RoutingArg::Latency => RouteMode::MinLatency,
            RoutingArg::Throughput => RouteMode::MaxThroughput,
        },
    }
}

/// Generates with the embeddings and head of `files` here, on `args.backend`, and the blocks
/// in `joined`'s swarm.
pub fn run(
    files: &ModelFiles,
    args: &GenerateArgs,
    prompt_ids: Vec<u32>,
    params: GenerateParams,
    prompts: Option<Prompts>,
    joined: Joined,
) -> Result<()> {
    crate::backend::dispatch(
        args.backend,
        SwarmJob {
            files,
            args,
            prompt_ids,
            params,
            prompts,
            joined,
        },
    )
}

struct SwarmJob<'a> {
    files: &'a ModelFiles,
    args: &'a GenerateArgs,
    prompt_ids: Vec<u32>,
    params: GenerateParams,
    prompts: Option<Prompts>,
    joined: Joined,
}

impl OnBackend for SwarmJob<'_> {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let (files, args, prompt_ids, params, prompts) =
            (self.files, self.args, self.prompt_ids, self.params, self.prompts);
        let Joined {
            runtime,
            client,
            model,
            model_name,
        } = self.joined;
        let embeddings = Embeddings::<B>::load(&files.config, files.weights.as_ref(), &device)?;
        let head = LmHead::<B>::load(&files.config, files.weights.as_ref(), &device)?;
        let mut remote_config = config_for(model, model_name, &files.config, args.wire_dtype, args.routing);
        remote_config.adapter = args.adapter.clone();
        remote_config.verify_rate = args.verify;
        remote_config.push = !args.no_push;
        if let Some(seed) = args.verify_seed {
            remote_config.verify_seed = seed;
        }
        remote_config.deep_prompts = prompts.as_ref().and_then(|p| p.deep.clone());
        let prefix = prompts.map(|p| crate::generate::upload_prompt::<B>(&p, &device));
        let mut blocks = RemoteBlocks::<B>::new(runtime.handle().clone(), client, remote_config, device.clone());
        let report = blocks.verify_report();
        let mut drafter = crate::generate::drafter::<B>(files, args, &params, prompt_ids.len(), &device)?;
        let result = emit(files, args, &prompt_ids, &params, Some(report), |params, on_token| {
            Ok(generate_drafted(
                &embeddings,
                &head,
                &mut blocks,
                std::slice::from_ref(&prompt_ids),
                prefix.as_ref(),
                params,
                drafter.as_mut(),
                on_token,
            )?)
        });
        drop(blocks);
        // Let the session-closing messages go out.
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
        result
    }
}

//! The page's swarm client: joins the swarm through a relay over WebRTC-direct, finds models
//! and their servers in the DHT, and generates with the blocks run by the servers (the same
//! protocol and failover as the native client). Getting the client bundle is `crate::bundle`'s.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use shared_model::bundle::{ClientBundle, client_f32_bytes};
use shared_model::sampling::{Sampler, SamplingParams};
use shared_model::speculative::{self, Draft, PromptLookup};
use shared_model::tokenizer::ChatMessage;
use shared_model::tuning::Prompts;
use shared_model::weights::HostTensor;
use swarm::dht::{self, ModelListing};
use swarm::node::{self, Client, NodeConfig};
use swarm::private::SwarmKey;
use swarm::protocol::{Limits, ServerInfo};
use swarm::remote::{RemoteChain, RemoteConfig};
use swarm::routing::RouteMode;
use swarm::rt::{self, Instant};
use swarm::wire::WireDtype;

use crate::compute::{ClientModel, ComputeError};
use crate::fetch;

/// Largest client part (embeddings + LM head, f32) the page loads itself; beyond it a server
/// must run them ("head service").
pub const BROWSER_HEAD_BUDGET: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Node(#[from] swarm::node::NodeError),
    #[error(transparent)]
    Session(#[from] swarm::session::SessionError),
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    Model(#[from] shared_model::ModelError),
    #[error(transparent)]
    Compute(#[from] ComputeError),
    #[error(transparent)]
    Sampling(#[from] shared_model::sampling::SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] shared_model::tokenizer::TokenizerError),
    #[error(transparent)]
    Tuning(#[from] shared_model::tuning::TuningError),
    /// A downloaded bundle that is not what the model's signed record promises.
    #[error(transparent)]
    Check(#[from] swarm::bundles::CheckError),
    #[error("{0}")]
    Bundle(String),
}

/// The relays' WebRTC-direct addresses: from the URL, else from the JSON the relay serves next
/// to the page.
pub async fn bootstrap_addrs(from_url: &[String]) -> Result<Vec<Multiaddr>, ClientError> {
    let texts: Vec<String> = if from_url.is_empty() {
        let doc = fetch::json("/corolla/v1/bootstrap.json").await?;
        doc.get("relays")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    } else {
        from_url.to_vec()
    };
    let addrs: Vec<Multiaddr> = texts.iter().filter_map(|t| t.parse().ok()).collect();
    if addrs.is_empty() {
        return Err(ClientError::Setup(
            "no relay address: give ?relay=/ip4/.../webrtc-direct/certhash/.../p2p/... or serve /corolla/v1/bootstrap.json"
                .into(),
        ));
    }
    Ok(addrs)
}

/// Starts the browser's libp2p node; `swarm_key` (64 hex digits) joins a private swarm.
pub fn start_node(relays: Vec<Multiaddr>, swarm_key: Option<&str>) -> Result<Client, ClientError> {
    let mut config = NodeConfig::new(libp2p::identity::Keypair::generate_ed25519());
    config.bootstrap = relays;
    config.swarm_key = swarm_key
        .map(SwarmKey::from_hex)
        .transpose()
        .map_err(|e| ClientError::Setup(format!("the swarm key in the page address (#swarm_key=...): {e}")))?;
    config.dht_server = false;
    config.request_timeout = Duration::from_secs(60);
    let (client, mut inbound, event_loop) = node::start(config)?;
    rt::spawn(event_loop.run());
    // A browser serves nothing; drain what peers might send anyway.
    rt::spawn(async move { while inbound.recv().await.is_some() {} });
    Ok(client)
}

/// The models live servers announce; waits up to `patience` for the first to appear.
pub async fn list_models(client: &Client, patience: Duration) -> Result<Vec<ModelListing>, ClientError> {
    let start = Instant::now();
    loop {
        match dht::list_models(client, Duration::from_secs(10)).await {
            Ok(models) if !models.is_empty() => return Ok(models),
            Ok(_) | Err(_) if start.elapsed() < patience => rt::sleep(Duration::from_millis(700)).await,
            Ok(_) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The live servers of a model (their records say where to get its client bundle).
pub async fn find_servers(client: &Client, model: &str) -> Result<Vec<ServerInfo>, ClientError> {
    Ok(dht::discover(client, model, None, Duration::from_secs(10)).await?)
}

/// Why this page should not hold the model's embeddings and head (known from the config
/// alone, before any tensor is downloaded), if it should not.
pub fn too_large(bundle: &ClientBundle) -> Option<String> {
    let bytes = client_f32_bytes(&bundle.config);
    (bytes > BROWSER_HEAD_BUDGET).then(|| {
        format!(
            "the embeddings and LM head take {:.1} GB, too much for a browser tab",
            bytes as f64 / 1e9
        )
    })
}

/// A server of this model offering head service, dialed.
pub async fn head_server(client: &Client, servers: &[ServerInfo]) -> Result<PeerId, ClientError> {
    let info = servers
        .iter()
        .find(|s| s.serves_head)
        .ok_or_else(|| ClientError::Setup("no server of this model offers head service".into()))?;
    let peer: PeerId = info
        .peer_id
        .parse()
        .map_err(|_| ClientError::Setup(format!("bad peer id {}", info.peer_id)))?;
    for addr in info.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
        let _ = client.dial(addr).await;
    }
    Ok(peer)
}

/// A loaded model, ready to chat.
pub struct Loaded {
    pub bundle: ClientBundle,
    pub model: ClientModel,
    pub fingerprint: String,
}

/// Sampling settings from the page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Speculative decoding's draft length (prompt lookup); 0 turns it off.
    pub speculative: usize,
}

/// Figures of one reply, for the swarm view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub tokens: usize,
    pub first_token_ms: f64,
    pub last_token_ms: f64,
    pub tokens_per_s: f64,
    /// Steps after the prompt's, the draft tokens they checked and those kept.
    pub decode_steps: usize,
    pub drafted: usize,
    pub accepted: usize,
}

/// One hop of the current route, for the swarm view.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteHop {
    pub peer: String,
    pub start: usize,
    pub end: usize,
    pub rtt_ms: Option<f64>,
}

/// How the page reaches a model's blocks; `deep_prompts` go to the servers with every session.
pub fn remote_config(loaded: &Loaded, deep_prompts: Option<HostTensor>) -> RemoteConfig {
    RemoteConfig {
        model: loaded.fingerprint.clone(),
        model_name: loaded.bundle.name.clone(),
        num_layers: loaded.bundle.config.num_layers,
        dtype: WireDtype::F32,
        step_timeout: Duration::from_secs(60),
        discovery_timeout: Duration::from_secs(10),
        max_failovers: 4,
        limits: Limits::default(),
        route_mode: RouteMode::MinLatency,
        deep_prompts,
        adapter: None,
        hidden_size: loaded.bundle.config.hidden_size,
        chunk_tokens: swarm::remote::DEFAULT_CHUNK_TOKENS,
        verify_rate: swarm::remote::DEFAULT_VERIFY_RATE,
        verify_seed: swarm::dht::now_ms(),
        // Servers carry each step's output to the next; one that cannot says so, and the page
        // carries it instead.
        push: true,
    }
}

/// A conversation's link to the swarm.
pub struct Chat {
    client: Client,
    chain: RemoteChain,
    /// Tuned prompts this conversation runs with (from the Tune view).
    prompts: Option<Prompts>,
}

impl Chat {
    pub fn new(client: Client, loaded: &Loaded, prompts: Option<Prompts>) -> Self {
        let config = remote_config(loaded, prompts.as_ref().and_then(|p| p.deep.clone()));
        Self {
            chain: RemoteChain::new(client.clone(), config),
            client,
            prompts,
        }
    }

    /// Frees the servers' caches of the current session (in the background).
    pub fn close(&mut self) {
        rt::spawn(self.chain.close());
    }

    /// The route without RTTs (which need the node).
    fn route_now(&self) -> Vec<RouteHop> {
        self.chain
            .route()
            .into_iter()
            .map(|(peer, start, end)| RouteHop {
                peer: short_peer(&peer),
                start,
                end,
                rtt_ms: None,
            })
            .collect()
    }

    /// What the spot checks of this conversation's answers found so far.
    pub fn verify_report(&self) -> swarm::remote::verify::VerifyReport {
        self.chain.verify_report().lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub async fn route(&self) -> Vec<RouteHop> {
        let mut out = Vec::new();
        for (peer, start, end) in self.chain.route() {
            let rtt = self.client.rtt(peer).await.map(|d| d.as_secs_f64() * 1e3);
            out.push(RouteHop {
                peer: short_peer(&peer),
                start,
                end,
                rtt_ms: rtt,
            });
        }
        out
    }

    /// Generates the assistant's reply to `messages`, calling `on_token(id, text so far)` for
    /// every token; stops early when `stop` is set.
    pub async fn reply(
        &mut self,
        loaded: &Loaded,
        messages: &[ChatMessage],
        settings: Settings,
        stop: Rc<Cell<bool>>,
        mut on_token: impl FnMut(&[u32], &str, &Stats),
        mut on_route: impl FnMut(Vec<RouteHop>),
    ) -> Result<(Vec<u32>, String), ClientError> {
        let tokenizer = loaded
            .bundle
            .tokenizer
            .as_ref()
            .ok_or_else(|| ClientError::Setup("this model has no tokenizer".into()))?;
        let template = loaded
            .bundle
            .chat_template
            .as_ref()
            .ok_or_else(|| ClientError::Setup("this model has no chat template".into()))?;
        let prompt = tokenizer.encode(&template.render(messages, true)?)?;
        let prefix = self.prompts.as_ref().map_or(0, Prompts::prefix_len);
        let context = loaded.bundle.config.max_position_embeddings.unwrap_or(usize::MAX);
        if prefix + prompt.len() >= context {
            return Err(ClientError::Setup(format!(
                "the conversation ({} tokens, plus {prefix} tuned prompt positions) no longer fits the model's context of {context}",
                prompt.len()
            )));
        }
        let max_new = settings.max_tokens.min(context - prefix - prompt.len());
        let mut sampler = Sampler::new(SamplingParams {
            temperature: settings.temperature,
            top_k: None,
            top_p: Some(settings.top_p),
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: settings.seed,
        })?;
        let started = Instant::now();
        self.chain.start(vec![0], prefix + prompt.len() + max_new).await?;
        on_route(self.route_now());
        let mut history = prompt.clone();
        let mut out: Vec<u32> = Vec::new();
        let mut stats = Stats {
            prompt_tokens: history.len(),
            ..Stats::default()
        };
        let mut last = Instant::now();
        let lookup = PromptLookup::default();
        // Positions the servers hold (tuned prompt included).
        let mut fed = 0;
        'steps: while out.len() < max_new && !stop.get() {
            let remaining = max_new - out.len();
            // The step feeds the prompt, then the last token with a draft of what may follow
            // it (speculative decoding: all checked in this one step).
            let (input, draft) = match out.last() {
                None => (prompt.clone(), Draft::default()),
                Some(&token) => {
                    let k = settings.speculative.min(remaining - 1);
                    let draft = Draft {
                        tokens: lookup.lookup(&history, k),
                        dists: None,
                    };
                    (
                        std::iter::once(token).chain(draft.tokens.iter().copied()).collect(),
                        draft,
                    )
                }
            };
            let hidden = match &self.prompts {
                Some(p) if out.is_empty() => loaded.model.embed_prompted(&[input], &p.prompt).await?,
                _ => loaded.model.embed(&[input]).await?,
            };
            fed += hidden.shape[1];
            let before = self.chain.route();
            let hidden = self.chain.step(hidden).await?;
            if self.chain.route() != before {
                on_route(self.route_now());
            }
            let logits = loaded.model.tail_logits(&hidden, draft.tokens.len() + 1).await?;
            let vocab = logits.shape[2];
            let checked = speculative::check(
                &mut sampler,
                |j| logits.data[j * vocab..(j + 1) * vocab].to_vec(),
                &history,
                &draft,
                remaining - 1,
            );
            if !out.is_empty() {
                stats.decode_steps += 1;
                stats.drafted += draft.tokens.len();
                stats.accepted += checked.accepted;
            }
            // The servers forget the drafts that were not kept.
            let keep = fed - (draft.tokens.len() - checked.accepted);
            if keep < fed {
                self.chain.rollback(keep)?;
                fed = keep;
            }
            for &token in &checked.tokens {
                history.push(token);
                out.push(token);
                let now = Instant::now();
                if out.len() == 1 {
                    stats.first_token_ms = now.duration_since(started).as_secs_f64() * 1e3;
                }
                stats.tokens = out.len();
                stats.last_token_ms = now.duration_since(last).as_secs_f64() * 1e3;
                let decode = now.duration_since(started).as_secs_f64() - stats.first_token_ms / 1e3;
                stats.tokens_per_s = if out.len() > 1 && decode > 0.0 {
                    (out.len() - 1) as f64 / decode
                } else {
                    0.0
                };
                last = now;
                let text = tokenizer.decode(&out, true)?;
                on_token(&out, &text, &stats);
                if loaded.bundle.stop_ids.contains(&token) {
                    break 'steps;
                }
            }
        }
        let text = tokenizer.decode(&out, true)?;
        Ok((out, text))
    }
}

pub fn short_peer(peer: &PeerId) -> String {
    short_peer_text(&peer.to_string())
}

/// [`short_peer`] of a peer id as text.
pub fn short_peer_text(peer: &str) -> String {
    let tail: String = peer
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

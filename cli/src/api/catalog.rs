//! The models the API answers for: the one `--model` loaded, or those the swarm's servers
//! announce, each loaded (its checked client bundle fetched) on first use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use swarm::dht::{self, ModelListing};
use swarm::node::Client;
use tokio::sync::Mutex;

use super::engine::Engine;
use super::error::ApiError;

/// How long a model list may take to gather from the DHT.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub name: String,
    pub fingerprint: String,
    /// Servers announcing it (swarm models).
    pub servers: Option<usize>,
}

pub enum Catalog {
    Local(Arc<Engine>),
    Swarm(SwarmModels),
}

/// Remote settings every swarm model gets.
pub struct SwarmModels {
    pub client: Client,
    pub cache: PathBuf,
    pub verify_rate: f64,
    pub wire_dtype: crate::args::WireDtypeArg,
    pub routing: crate::args::RoutingArg,
    /// Draft tokens checked per step (`--speculative`).
    pub speculative: usize,
    /// Loaded models by fingerprint; the lock also keeps two requests from loading one twice.
    pub loaded: Mutex<HashMap<String, Arc<Engine>>>,
}

impl Catalog {
    pub async fn cards(&self) -> Result<Vec<Card>, ApiError> {
        match self {
            Self::Local(engine) => Ok(vec![Card {
                name: engine.name.clone(),
                fingerprint: engine.fingerprint.clone(),
                servers: None,
            }]),
            Self::Swarm(swarm) => Ok(swarm
                .listings()
                .await?
                .into_iter()
                .map(|m| Card {
                    name: m.name,
                    fingerprint: m.fingerprint,
                    servers: Some(m.servers),
                })
                .collect()),
        }
    }

    /// The engine for a request's `model`: a name or a fingerprint.
    pub async fn engine(&self, model: &str) -> Result<Arc<Engine>, ApiError> {
        match self {
            Self::Local(engine) => {
                if model == engine.name || model == engine.fingerprint {
                    Ok(engine.clone())
                } else {
                    Err(ApiError::unknown_model(model, std::slice::from_ref(&engine.name)))
                }
            }
            Self::Swarm(swarm) => swarm.engine(model).await,
        }
    }
}

impl SwarmModels {
    async fn listings(&self) -> Result<Vec<ModelListing>, ApiError> {
        dht::list_models(&self.client, LIST_TIMEOUT)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot list the swarm's models: {e}")))
    }

    async fn engine(&self, model: &str) -> Result<Arc<Engine>, ApiError> {
        let listings = self.listings().await?;
        // A fingerprint names one model; a name may be announced for several (different
        // weights, same file name): the best-served one.
        let chosen = listings
            .iter()
            .find(|m| m.fingerprint == model)
            .or_else(|| listings.iter().filter(|m| m.name == model).max_by_key(|m| m.servers))
            .cloned();
        let Some(listing) = chosen else {
            let mut known: Vec<String> = listings.iter().map(|m| m.name.clone()).collect();
            known.sort();
            known.dedup();
            return Err(ApiError::unknown_model(model, &known));
        };
        let mut loaded = self.loaded.lock().await;
        if let Some(engine) = loaded.get(&listing.fingerprint) {
            return Ok(engine.clone());
        }
        let client = self.client.clone();
        let cache = self.cache.clone();
        let (verify_rate, wire_dtype, routing) = (self.verify_rate, self.wire_dtype, self.routing);
        let speculative = self.speculative;
        let handle = tokio::runtime::Handle::current();
        let engine = tokio::task::spawn_blocking(move || {
            let _entered = handle.enter();
            let files = crate::bundle::fetch(&handle, &client, &listing.fingerprint, &cache)?;
            let mut config =
                crate::remote::config_for_bundle(&listing.fingerprint, &listing.name, &files, wire_dtype, routing);
            config.verify_rate = verify_rate;
            Engine::swarm(files, listing.name.clone(), client, config).map(|e| e.with_speculative(speculative))
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading the model failed: {e}")))?
        .map_err(|e| ApiError::unavailable(format!("cannot load the model {model} from the swarm: {e:#}")))?;
        let engine = Arc::new(engine);
        loaded.insert(engine.fingerprint.clone(), engine.clone());
        Ok(engine)
    }
}

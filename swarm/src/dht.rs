//! What servers put in the DHT, and how clients find them.
//!
//! A server is a *provider* of `corolla/model/<fingerprint>` (so clients can enumerate the
//! servers of a model) and publishes its [`ServerInfo`] as the record
//! `corolla/server/<fingerprint>/<peer id>`. Both expire unless re-announced; clients also
//! drop infos whose `expires_at_ms` has passed.

use std::time::Duration;

use crate::rt::{self, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use libp2p::PeerId;
use libp2p::kad::RecordKey;

use crate::node::{Client, NodeError};
use crate::protocol::{PROTOCOL_VERSION, ServerInfo};
use crate::wire;

pub fn model_key(fingerprint: &str) -> RecordKey {
    RecordKey::new(&format!("corolla/model/{fingerprint}"))
}

pub fn server_key(fingerprint: &str, peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("corolla/server/{fingerprint}/{peer}"))
}

/// Every server provides this key, so a client that knows no model yet can list them.
pub fn all_servers_key() -> RecordKey {
    RecordKey::new(&"corolla/servers")
}

/// A server's latest [`ServerInfo`], whatever its model.
pub fn peer_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("corolla/peer/{peer}"))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Publishes (or refreshes) this server's presence.
pub async fn announce(client: &Client, info: &ServerInfo) -> Result<(), NodeError> {
    let value = wire::to_cbor(info).map_err(|e| NodeError::Dht(e.to_string()))?;
    client
        .put_record(server_key(&info.model, &client.peer_id()), value.clone())
        .await?;
    client.put_record(peer_key(&client.peer_id()), value).await?;
    client.start_providing(model_key(&info.model)).await?;
    client.start_providing(all_servers_key()).await
}

/// Withdraws this server (it also disappears by itself once its records expire).
pub async fn withdraw(client: &Client, fingerprint: &str) -> Result<(), NodeError> {
    client.stop_providing(model_key(fingerprint)).await?;
    client.stop_providing(all_servers_key()).await
}

/// A model some live server serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelListing {
    pub fingerprint: String,
    pub name: String,
    /// How many live servers announce it.
    pub servers: usize,
}

/// Every model that live servers announce, by fingerprint.
pub async fn list_models(client: &Client, timeout: Duration) -> Result<Vec<ModelListing>, NodeError> {
    let infos = live_infos(client, all_servers_key(), peer_key, None, timeout).await?;
    let mut models: Vec<ModelListing> = Vec::new();
    for info in infos {
        match models.iter_mut().find(|m| m.fingerprint == info.model) {
            Some(m) => m.servers += 1,
            None => models.push(ModelListing {
                fingerprint: info.model,
                name: info.model_name,
                servers: 1,
            }),
        }
    }
    models.sort_by(|a, b| b.servers.cmp(&a.servers).then(a.name.cmp(&b.name)));
    Ok(models)
}

/// Every live server of the model, newest record per peer.
pub async fn discover(client: &Client, fingerprint: &str, timeout: Duration) -> Result<Vec<ServerInfo>, NodeError> {
    let record = |peer: &PeerId| server_key(fingerprint, peer);
    live_infos(client, model_key(fingerprint), record, Some(fingerprint), timeout).await
}

/// The newest live [`ServerInfo`] of each provider of `providers`, read from the record
/// `record(peer)`; with `model`, only infos of that model.
async fn live_infos(
    client: &Client,
    providers: RecordKey,
    record: impl Fn(&PeerId) -> RecordKey,
    model: Option<&str>,
    timeout: Duration,
) -> Result<Vec<ServerInfo>, NodeError> {
    let providers = rt::timeout(timeout, client.get_providers(providers))
        .await
        .map_err(|_| NodeError::Dht("provider lookup timed out".into()))??;
    let now = now_ms();
    let record = &record;
    let lookups = providers.into_iter().map(|peer| async move {
        let records = rt::timeout(timeout, client.get_record(record(&peer)))
            .await
            .ok()?
            .ok()?;
        records
            .iter()
            .filter_map(|bytes| live_info(bytes, &peer, model, now))
            .max_by_key(|info| info.expires_at_ms)
    });
    Ok(join_all(lookups).await.into_iter().flatten().collect())
}

/// A DHT record read back as the [`ServerInfo`] of `peer`: `None` unless it decodes, names
/// that peer (a record cannot speak for another server), is of `model` when one is asked for,
/// speaks our protocol version and has not expired at `now_ms`.
pub fn live_info(bytes: &[u8], peer: &PeerId, model: Option<&str>, now_ms: u64) -> Option<ServerInfo> {
    let info = wire::from_cbor::<ServerInfo>(bytes).ok()?;
    let live = info.peer_id == peer.to_string()
        && model.is_none_or(|m| info.model == m)
        && info.protocol == PROTOCOL_VERSION
        && info.expires_at_ms > now_ms;
    live.then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()
    }

    fn info(peer: &PeerId) -> ServerInfo {
        ServerInfo {
            peer_id: peer.to_string(),
            model: "m".into(),
            model_name: "M".into(),
            start: 0,
            end: 4,
            throughput: 10.0,
            free_cache_tokens: 1024,
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            public_name: None,
            relayed: false,
            addrs: Vec::new(),
            expires_at_ms: 2000,
            client_url: None,
            serves_head: false,
            adapters: Vec::new(),
            load: None,
        }
    }

    #[test]
    fn live_info_takes_only_live_records_of_the_peer() {
        let peer = random_peer();
        let record = |i: &ServerInfo| wire::to_cbor(i).expect("encode");
        let good = info(&peer);
        assert_eq!(live_info(&record(&good), &peer, Some("m"), 1000), Some(good.clone()));
        assert_eq!(live_info(&record(&good), &peer, None, 1000), Some(good.clone()));
        assert_eq!(live_info(&record(&good), &peer, Some("other"), 1000), None);
        assert_eq!(live_info(&record(&good), &peer, None, 2000), None, "expired");
        assert_eq!(
            live_info(&record(&good), &random_peer(), None, 1000),
            None,
            "another peer's"
        );
        let old = ServerInfo {
            protocol: PROTOCOL_VERSION - 1,
            ..good.clone()
        };
        assert_eq!(live_info(&record(&old), &peer, None, 1000), None, "another protocol");
        let mut bytes = record(&good);
        bytes.truncate(bytes.len() - 1);
        assert_eq!(live_info(&bytes, &peer, None, 1000), None, "truncated");
    }
}

//! What servers put in the DHT, and how clients find them.
//!
//! A server is a *provider* of `corolla/model/<fingerprint>` (so clients can enumerate the
//! servers of a model) and publishes its [`ServerInfo`] as the record
//! `corolla/server/<fingerprint>/<peer id>`. Both expire unless re-announced. Records are
//! signed by the server's identity key ([`crate::record`]); readers believe only those that
//! verify, and count and log (at debug) the ones they ignore.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::rt::{self, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::kad::RecordKey;

use crate::node::{Client, NodeError};
use crate::protocol::ServerInfo;
use crate::record::{self, Expect};

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

/// Publishes (or refreshes) this server's presence, signed with `keypair` (the node's
/// identity).
pub async fn announce(client: &Client, keypair: &Keypair, info: &ServerInfo) -> Result<(), NodeError> {
    let value = record::sign(keypair, info).map_err(|e| NodeError::Dht(e.to_string()))?;
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
    let infos = live_infos(client, all_servers_key(), peer_key, None, None, timeout).await?;
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

/// Every live server of the model, newest verified record per peer. With `num_blocks` (the
/// model's, when the caller knows its config), spans outside the model are refused too.
pub async fn discover(
    client: &Client,
    fingerprint: &str,
    num_blocks: Option<u32>,
    timeout: Duration,
) -> Result<Vec<ServerInfo>, NodeError> {
    let record = |peer: &PeerId| server_key(fingerprint, peer);
    live_infos(
        client,
        model_key(fingerprint),
        record,
        Some(fingerprint),
        num_blocks,
        timeout,
    )
    .await
}

/// How many DHT records this process has ignored because they did not verify.
pub fn refused_records() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// The newest live [`ServerInfo`] of each provider of `providers`, read from the record
/// `record(peer)`; with `model`, only infos of that model.
async fn live_infos(
    client: &Client,
    providers: RecordKey,
    record: impl Fn(&PeerId) -> RecordKey,
    model: Option<&str>,
    num_blocks: Option<u32>,
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
            .filter_map(|bytes| {
                let expect = Expect {
                    peer: &peer,
                    model,
                    num_blocks,
                    now_ms: now,
                };
                live_info(bytes, &expect)
            })
            .max_by_key(|info| info.expires_at_ms)
    });
    Ok(join_all(lookups).await.into_iter().flatten().collect())
}

/// A DHT record read back as a [`ServerInfo`]: `None` (counted, and logged at debug with the
/// reason) unless it verifies as [`record::verify`] says.
pub fn live_info(bytes: &[u8], expect: &Expect<'_>) -> Option<ServerInfo> {
    match record::verify(bytes, expect) {
        Ok(info) => Some(info),
        // An expired record is ordinary (a server that left); anything else is a lie or a bug.
        Err(record::RecordError::Expired { .. }) => None,
        Err(e) => {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %expect.peer, error = %e, "DHT record refused");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(peer: &PeerId) -> ServerInfo {
        ServerInfo::for_test(&peer.to_string(), 0, 4, 10.0, 2000)
    }

    #[test]
    fn live_info_takes_only_verified_live_records_and_counts_the_rest() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let good = info(&peer);
        let bytes = record::sign(&key, &good).expect("sign");
        let at = |now_ms| Expect {
            peer: &peer,
            model: Some("m"),
            num_blocks: Some(4),
            now_ms,
        };
        assert_eq!(live_info(&bytes, &at(1000)), Some(good.clone()));
        let before = refused_records();
        assert_eq!(live_info(&bytes, &at(2000)), None, "expired");
        assert_eq!(refused_records(), before, "an expired record is not a lie");
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let elsewhere = Expect {
            peer: &other,
            ..at(1000)
        };
        assert_eq!(live_info(&bytes, &elsewhere), None, "another peer's");
        assert!(refused_records() > before, "counted");
    }
}

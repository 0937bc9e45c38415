//! Prometheus metrics over HTTP (`server` and `relay` `--metrics-listen`): a registry's
//! OpenMetrics text at `GET /metrics`, and a node's connection and DHT counters, read at each
//! scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::http::{self, HttpLimits};
use crate::limits::NetStatsSnapshot;

/// The OpenMetrics text format, which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A node's connection limits and DHT store, as counters and gauges read at each scrape.
pub struct NetCollector {
    read: Box<dyn Fn() -> NetStatsSnapshot + Send + Sync>,
}

impl NetCollector {
    pub fn new(read: impl Fn() -> NetStatsSnapshot + Send + Sync + 'static) -> Self {
        Self { read: Box::new(read) }
    }
}

impl std::fmt::Debug for NetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetCollector").finish_non_exhaustive()
    }
}

impl Collector for NetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = (self.read)();
        let gauges = [
            ("connections", "Established connections now.", s.connections.established),
            (
                "connections_peak",
                "The most connections established at once since start.",
                s.connections.peak_established,
            ),
            ("dht_records", "DHT value records held now.", s.dht.records),
            ("dht_providers", "DHT provider records held now.", s.dht.providers),
            ("dht_bytes", "Estimated bytes of DHT records held now.", s.dht.bytes),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "connections_refused",
                "Inbound connections refused by a limit.",
                s.connections.refused,
            ),
            (
                "connections_evicted",
                "Inbound connections closed to make room for newer ones.",
                s.connections.evicted,
            ),
            ("dht_stored", "DHT records of other peers accepted.", s.dht.stored),
            ("dht_refused", "DHT records of other peers refused.", s.dht.refused),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

/// Renders `registry` (plus whatever `refresh` updates first) as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// A router answering `GET /metrics`; `refresh` runs before each scrape (gauges read then).
pub fn router(registry: Arc<Registry>, refresh: impl Fn() + Clone + Send + Sync + 'static) -> Router {
    let scrape = move || {
        refresh();
        let text = render(&registry);
        async move {
            match text {
                Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
                Err(_) => http::error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics"),
            }
        }
    };
    Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(|| async { http::error(StatusCode::NOT_FOUND, "metrics are at /metrics") })
}

/// Binds `addr` and serves `router` there in a task of its own; returns the bound address.
pub async fn listen(addr: SocketAddr, router: Router) -> std::io::Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let limits = HttpLimits {
        max_connections: 64,
        ..HttpLimits::default()
    };
    let task = tokio::spawn(http::serve(listener, http::public(router, &limits), limits));
    Ok((task, bound))
}

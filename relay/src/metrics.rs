//! What the relay counts for `--metrics-listen` (Prometheus): reservations and circuits, open
//! and over time, with the node's connection and DHT counters read at each scrape.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use swarm::limits::NetStats;
use swarm::metrics::NetCollector;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Default, Clone)]
pub struct RelayMetrics {
    /// Peers holding a reservation now (servers reachable only through this relay).
    pub reservations: Gauge,
    /// Circuits open now.
    pub circuits: Gauge,
    /// Reservation requests by outcome (`accepted`, `renewed`, `denied`).
    pub reservation_requests: Family<Labels, Counter>,
    /// Circuit requests by outcome (`accepted`, `denied`), and circuits closed
    /// (`closed`, `failed`).
    pub circuit_events: Family<Labels, Counter>,
}

impl RelayMetrics {
    /// The metrics and their registry, with `stats` read at each scrape.
    pub fn new(stats: &NetStats) -> (Self, Registry) {
        let metrics = Self::default();
        let mut registry = Registry::with_prefix("corolla_relay");
        registry.register(
            "reservations",
            "Peers holding a reservation now",
            metrics.reservations.clone(),
        );
        registry.register("circuits", "Circuits open now", metrics.circuits.clone());
        registry.register(
            "reservation_requests",
            "Reservation requests by outcome",
            metrics.reservation_requests.clone(),
        );
        registry.register(
            "circuit_events",
            "Circuit requests by outcome, and circuits closed",
            metrics.circuit_events.clone(),
        );
        let stats = stats.clone();
        registry.register_collector(Box::new(NetCollector::new(move || stats.snapshot())));
        (metrics, registry)
    }

    pub fn reservation(&self, outcome: &'static str) {
        self.reservation_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn circuit(&self, outcome: &'static str) {
        self.circuit_events.get_or_create(&vec![("outcome", outcome)]).inc();
    }
}

//! What the server counts for `--metrics-listen` (Prometheus): sessions and cache, steps and
//! tokens, batch sizes, latencies, errors by kind, connections. Counters and histograms move
//! as work is done; gauges are read from [`Admission`] at each scrape.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use swarm::protocol::{ErrorKind, ServerLoad};

type Labels = Vec<(&'static str, &'static str)>;

/// The server's metrics; cheap to update from any task.
pub struct ServerMetrics {
    registry: Arc<Registry>,
    /// Sessions' steps (or stateless requests' chunks) per batched forward.
    pub batch_size: Histogram,
    /// Tokens per batched forward.
    pub batch_tokens: Histogram,
    /// A step's wait in the batch queue (seconds).
    pub queue_seconds: Histogram,
    /// One batched forward through the blocks (seconds).
    pub forward_seconds: Histogram,
    /// Session steps answered (with an output or an error).
    pub steps: Counter,
    /// Steps that arrived pushed by the previous hop and were taken to run.
    pub pushed_steps: Counter,
    /// Tokens (rows x positions) that went through the blocks.
    pub tokens: Counter,
    /// A session step, from its message read to its reply written (seconds).
    pub step_seconds: Histogram,
    /// Requests by protocol (`session`, `span`, `head`).
    pub requests: Family<Labels, Counter>,
    /// Errors answered, by kind.
    pub errors: Family<Labels, Counter>,
    /// Moves to other blocks (rebalancing), by how they went: `both` (the new span loaded
    /// beside the old), `drained` (the old span drained first) or `failed`.
    pub moves: Family<Labels, Counter>,
    /// The span served now.
    pub span_start: Gauge,
    pub span_end: Gauge,
    gauges: Gauges,
}

#[derive(Default)]
struct Gauges {
    sessions: Gauge,
    max_sessions: Gauge,
    cache_tokens: Gauge,
    free_cache_tokens: Gauge,
    request_memory_bytes: Gauge,
    free_request_memory_bytes: Gauge,
    pending_streams: Gauge,
    queued: Gauge,
    running: Gauge,
}

fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Busy => "busy",
        ErrorKind::TooLarge => "too_large",
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::WrongModel => "wrong_model",
        ErrorKind::WrongSpan => "wrong_span",
        ErrorKind::Closed => "closed",
        ErrorKind::Internal => "internal",
    }
}

impl ServerMetrics {
    /// The metrics, with the node's connection and DHT counters read through `net`.
    pub fn new(net: Option<swarm::metrics::NetCollector>) -> Self {
        let mut registry = Registry::with_prefix("corolla_server");
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            batch_tokens: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            queue_seconds: seconds(),
            forward_seconds: seconds(),
            steps: Counter::default(),
            pushed_steps: Counter::default(),
            tokens: Counter::default(),
            step_seconds: seconds(),
            requests: Family::default(),
            errors: Family::default(),
            moves: Family::default(),
            span_start: Gauge::default(),
            span_end: Gauge::default(),
            gauges: Gauges::default(),
        };
        registry.register(
            "batch_size",
            "Steps (of sessions, or chunks of stateless requests) in one batched forward",
            metrics.batch_size.clone(),
        );
        registry.register(
            "batch_tokens",
            "Tokens in one batched forward",
            metrics.batch_tokens.clone(),
        );
        registry.register(
            "queue_seconds",
            "Time a step waited for its batch",
            metrics.queue_seconds.clone(),
        );
        registry.register(
            "forward_seconds",
            "Time of one batched forward through the blocks",
            metrics.forward_seconds.clone(),
        );
        registry.register("steps", "Session steps answered", metrics.steps.clone());
        registry.register(
            "pushed_steps",
            "Steps pushed by the previous server and taken to run",
            metrics.pushed_steps.clone(),
        );
        registry.register(
            "tokens",
            "Tokens (rows x positions) run through the blocks",
            metrics.tokens.clone(),
        );
        registry.register(
            "step_seconds",
            "A session step from its message to its reply",
            metrics.step_seconds.clone(),
        );
        registry.register("requests", "Requests by protocol", metrics.requests.clone());
        registry.register("errors", "Errors answered, by kind", metrics.errors.clone());
        registry.register(
            "span_moves",
            "Moves to other blocks (rebalancing), by outcome",
            metrics.moves.clone(),
        );
        registry.register("span_start", "First block served", metrics.span_start.clone());
        registry.register(
            "span_end",
            "End (exclusive) of the blocks served",
            metrics.span_end.clone(),
        );
        let g = &metrics.gauges;
        for (name, help, gauge) in [
            ("sessions", "Open inference sessions", &g.sessions),
            ("max_sessions", "Most inference sessions at once", &g.max_sessions),
            ("cache_tokens", "KV cache budget in tokens", &g.cache_tokens),
            ("free_cache_tokens", "KV cache tokens free", &g.free_cache_tokens),
            (
                "request_memory_bytes",
                "Request memory budget in bytes",
                &g.request_memory_bytes,
            ),
            (
                "free_request_memory_bytes",
                "Request memory free in bytes",
                &g.free_request_memory_bytes,
            ),
            (
                "pending_streams",
                "Streams that have not sent their first message",
                &g.pending_streams,
            ),
            ("queued", "Requests waiting for memory or compute", &g.queued),
            ("running", "Compute slots held", &g.running),
        ] {
            registry.register(name, help, gauge.clone());
        }
        if let Some(net) = net {
            registry.register_collector(Box::new(net));
        }
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Reads the gauges from the server's load.
    pub fn refresh(&self, load: &ServerLoad) {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        let g = &self.gauges;
        set(&g.sessions, u64::from(load.sessions));
        set(&g.max_sessions, u64::from(load.max_sessions));
        set(&g.cache_tokens, load.cache_tokens);
        set(&g.free_cache_tokens, load.free_cache_tokens);
        set(&g.request_memory_bytes, load.request_memory);
        set(&g.free_request_memory_bytes, load.free_request_memory);
        set(&g.pending_streams, u64::from(load.pending_streams));
        set(&g.queued, u64::from(load.queued));
        set(&g.running, u64::from(load.running));
    }

    pub fn request(&self, protocol: &'static str) {
        self.requests.get_or_create(&vec![("protocol", protocol)]).inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&vec![("kind", kind_label(kind))]).inc();
    }

    pub fn moved(&self, outcome: &'static str) {
        self.moves.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    pub fn span(&self, blocks: &std::ops::Range<usize>) {
        self.span_start.set(blocks.start as i64);
        self.span_end.set(blocks.end as i64);
    }

    /// One batched forward of `steps` steps and `tokens` tokens that took `took`.
    pub fn batch(&self, steps: usize, tokens: usize, took: Duration) {
        self.batch_size.observe(steps as f64);
        self.batch_tokens.observe(tokens as f64);
        self.forward_seconds.observe(took.as_secs_f64());
        self.tokens.inc_by(tokens as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = ServerMetrics::new(None);
        m.batch(3, 3, Duration::from_millis(2));
        m.batch(1, 40, Duration::from_millis(9));
        m.error(ErrorKind::Busy);
        m.request("session");
        m.refresh(&ServerLoad {
            sessions: 2,
            max_sessions: 64,
            cache_tokens: 100,
            free_cache_tokens: 60,
            request_memory: 1 << 20,
            free_request_memory: 1 << 19,
            pending_streams: 0,
            queued: 1,
            running: 1,
            connections: 0,
            peak_connections: 0,
            connections_refused: 0,
            connections_evicted: 0,
        });
        let text = swarm::metrics::render(&m.registry()).expect("render");
        for line in [
            "corolla_server_batch_size_count 2",
            "corolla_server_batch_size_sum 4.0",
            "corolla_server_batch_size_bucket{le=\"2.0\"} 1",
            "corolla_server_batch_size_bucket{le=\"4.0\"} 2",
            "corolla_server_tokens_total 43",
            "corolla_server_errors_total{kind=\"busy\"} 1",
            "corolla_server_requests_total{protocol=\"session\"} 1",
            "corolla_server_sessions 2",
            "corolla_server_max_sessions 64",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }
}

//! The server's memory ceiling: what its flags allow it to hold, whatever peers send. Logged
//! at start-up; the hostile-peer tests hold the process's resident memory to it.

use crate::admission::ServerLimits;

/// Memory a connection costs besides its streams (Noise and Yamux state, buffers).
pub const PER_CONNECTION: u64 = 128 << 10;
/// Memory a stream may buffer that nobody has read yet: Yamux's 256 KiB window, which it may
/// double for a fast stream.
pub const PER_STREAM: u64 = 512 << 10;
/// The process without weights, caches or requests: runtime, libp2p, allocator slack.
pub const BASE: u64 = 192 << 20;

/// The parts of the ceiling, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// Weights (and the head service's embeddings and LM head) in host memory: all of them
    /// on the CPU backend, none on a GPU.
    pub weights: u64,
    /// KV caches in host memory (`--cache-tokens`), on the CPU backend.
    pub kv_cache: u64,
    /// `--max-request-memory`.
    pub requests: u64,
    /// Connections and their unread stream buffers.
    pub connections: u64,
    pub base: u64,
}

impl Ceiling {
    /// `weights` and `kv_cache` are what the span and cache take on the device; they count
    /// here only when the device is host memory.
    pub fn new(limits: &ServerLimits, max_connections: u32, on_host: bool, weights: u64, kv_cache: u64) -> Self {
        let streams = u64::from(limits.max_pending_streams)
            + u64::from(limits.max_sessions)
            + u64::from(limits.compute_slots) * u64::from(limits.max_requests_per_peer);
        Self {
            weights: if on_host { weights } else { 0 },
            kv_cache: if on_host { kv_cache } else { 0 },
            requests: limits.max_request_memory,
            connections: u64::from(max_connections) * PER_CONNECTION + streams * PER_STREAM,
            base: BASE,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.requests + self.connections + self.base
    }

    pub fn log(&self) {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        tracing::info!(
            ceiling_bytes = self.total(),
            ceiling_mib = mib(self.total()),
            weights_mib = mib(self.weights),
            kv_cache_mib = mib(self.kv_cache),
            requests_mib = mib(self.requests),
            connections_mib = mib(self.connections),
            base_mib = mib(self.base),
            "memory ceiling (resident memory stays under it whatever peers send)"
        );
    }
}

/// The machine's physical memory in bytes, if the OS says.
pub fn physical_memory() -> Option<u64> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let total = system.total_memory();
    (total > 0).then_some(total)
}

/// `--max-request-memory` when not given: a quarter of the machine's memory, at least 256 MiB
/// and at most 32 GiB.
pub fn default_request_memory() -> u64 {
    physical_memory().map_or(1 << 30, |m| (m / 4).clamp(256 << 20, 32 << 30))
}

/// Memory the machine can still give this process without swapping, if the OS says.
pub fn available_memory() -> Option<u64> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let free = system.available_memory();
    (free > 0).then_some(free)
}

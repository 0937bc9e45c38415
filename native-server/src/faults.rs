//! A server that lies, for the tests of what clients check (spot checks of outputs, routing on
//! measured speed). The flags that turn it on exist only with the cargo feature
//! `fault-injection`, off in normal builds: a released `server` behaves honestly, always.

use std::time::Duration;

use swarm::protocol::Limits;
use swarm::wire::WireTensor;

/// How outputs are corrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CorruptKind {
    /// Every element changed (`x -> 1 - 2x`).
    #[default]
    Gross,
    /// A few elements nudged by 1% of the tensor's scale: within no dtype's rounding.
    Subtle,
}

/// `server --corrupt-outputs RATE --corrupt-kind KIND --delay-steps-ms MS --claim-throughput T
/// --drop-pushes`
/// (feature `fault-injection` only).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FaultArgs {
    /// Share (0 to 1) of step and span outputs to corrupt.
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_outputs: f64,
    #[arg(long, value_enum, default_value_t = CorruptKind::Gross)]
    pub corrupt_kind: CorruptKind,
    /// Answer every session step this many milliseconds late.
    #[arg(long, default_value_t = 0)]
    pub delay_steps_ms: u64,
    /// Announce this throughput (tokens/s) instead of the measured one.
    #[arg(long)]
    pub claim_throughput: Option<f64>,
    /// Seed of the choice of outputs to corrupt.
    #[arg(long, default_value_t = 1)]
    pub fault_seed: u64,
    /// Move (rebalance) as if memory held one span only: unload the old blocks first.
    #[arg(long)]
    pub no_room_for_two_spans: bool,
    /// Take pushed steps from other servers and never run them (their clients wait in vain).
    #[arg(long)]
    pub drop_pushes: bool,
}

#[cfg(feature = "fault-injection")]
impl FaultArgs {
    pub fn validate(&self) -> anyhow::Result<Faults> {
        if !(0.0..=1.0).contains(&self.corrupt_outputs) {
            anyhow::bail!("--corrupt-outputs is a share from 0 to 1");
        }
        Ok(Faults {
            corrupt_rate: self.corrupt_outputs,
            corrupt_kind: self.corrupt_kind,
            delay: Duration::from_millis(self.delay_steps_ms),
            claim_throughput: self.claim_throughput,
            one_span: self.no_room_for_two_spans,
            drop_pushes: self.drop_pushes,
            state: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(self.fault_seed | 1)),
        })
    }
}

/// The faults in effect (none by default).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    corrupt_rate: f64,
    corrupt_kind: CorruptKind,
    delay: Duration,
    claim_throughput: Option<f64>,
    one_span: bool,
    drop_pushes: bool,
    state: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Faults {
    /// The throughput to announce for a measured `throughput`.
    pub fn announced(&self, throughput: f64) -> f64 {
        self.claim_throughput.unwrap_or(throughput)
    }

    /// Whether a move must unload the old span first, whatever memory is free.
    pub fn one_span_only(&self) -> bool {
        self.one_span
    }

    /// Whether pushed steps are read and thrown away.
    pub fn drops_pushes(&self) -> bool {
        self.drop_pushes
    }

    /// Waits as long as a session step should be late.
    pub async fn delay_step(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    /// `output`, corrupted with probability `--corrupt-outputs`.
    pub fn output(&self, output: WireTensor) -> WireTensor {
        if self.corrupt_rate <= 0.0 || self.uniform() >= self.corrupt_rate {
            return output;
        }
        let limits = Limits::default();
        let Ok(mut t) = output.decode(&limits) else {
            return output;
        };
        match self.corrupt_kind {
            CorruptKind::Gross => t.data.iter_mut().for_each(|x| *x = 1.0 - 2.0 * *x),
            CorruptKind::Subtle => {
                let scale = t.data.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
                let n = t.data.len();
                for _ in 0..3.min(n) {
                    let i = (self.uniform() * n as f64) as usize % n.max(1);
                    t.data[i] += 0.01 * scale;
                }
            }
        }
        tracing::debug!(kind = ?self.corrupt_kind, "fault injection: corrupted an output");
        WireTensor::encode(&t, output.dtype)
    }

    /// A uniform draw in [0, 1) (xorshift; shared by every task of the server).
    fn uniform(&self) -> f64 {
        use std::sync::atomic::Ordering;
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

//! One direction of one emulated link: when a packet that enters it now leaves it, or that it
//! is lost. Pure arithmetic on instants, so it is tested without namespaces or clocks.

use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

/// What a link does to the packets crossing it, in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSpec {
    /// One-way propagation delay.
    #[serde(serialize_with = "millis")]
    pub delay: Duration,
    /// Each packet's delay varies uniformly within `delay ± jitter` (never below zero), but
    /// packets never overtake each other: real links rarely reorder, and TCP treats a reorder
    /// as a loss.
    #[serde(serialize_with = "millis")]
    pub jitter: Duration,
    /// Probability that a packet is dropped, in [0, 1).
    pub loss: f64,
    /// Bandwidth cap in bits per second over whole IP packets; 0 means no cap.
    pub rate_bps: u64,
    /// The longest a packet may wait behind others for the bandwidth (the bottleneck's buffer);
    /// a packet that would wait longer is dropped, as a full router queue drops it.
    #[serde(serialize_with = "millis")]
    pub queue: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Why a link specification cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("loss must be in [0, 1), got {0}")]
    Loss(f64),
    #[error("jitter {jitter:?} exceeds the delay {delay:?}: delays would go below zero")]
    Jitter { jitter: Duration, delay: Duration },
    #[error("a delay of {0:?} is more than the emulator allows (10 s)")]
    Delay(Duration),
}

impl LinkSpec {
    /// A link of `rtt` round trip (half each way) and `mbit` Mbit/s, no jitter or loss, with a
    /// buffer of 100 ms at that rate.
    pub fn symmetric(rtt: Duration, mbit: f64) -> LinkSpec {
        LinkSpec {
            delay: rtt / 2,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: (mbit * 1e6).round() as u64,
            queue: Duration::from_millis(100),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(SpecError::Loss(self.loss));
        }
        if self.jitter > self.delay {
            return Err(SpecError::Jitter {
                jitter: self.jitter,
                delay: self.delay,
            });
        }
        if self.delay > Duration::from_secs(10) {
            return Err(SpecError::Delay(self.delay));
        }
        Ok(())
    }

    /// The time `bytes` take to go onto the wire at this link's rate.
    pub fn serialization(&self, bytes: usize) -> Duration {
        if self.rate_bps == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((bytes as u128 * 8 * 1_000_000_000 / self.rate_bps as u128) as u64)
    }
}

/// The state of one direction of a link: when its wire is free and when it delivered last.
#[derive(Debug)]
pub struct Link {
    spec: LinkSpec,
    busy_until: Instant,
    last_delivery: Instant,
}

/// What becomes of a packet offered to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Deliver(Instant),
    /// Dropped at random (the link's loss rate).
    Lost,
    /// Dropped because the bottleneck's queue was full.
    Overflow,
}

impl Link {
    pub fn new(spec: LinkSpec, now: Instant) -> Link {
        Link {
            spec,
            busy_until: now,
            last_delivery: now,
        }
    }

    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// The fate of a packet of `bytes` that enters the link at `now`.
    pub fn offer(&mut self, bytes: usize, now: Instant, rng: &mut impl Rng) -> Fate {
        if self.spec.loss > 0.0 && rng.random::<f64>() < self.spec.loss {
            return Fate::Lost;
        }
        let start = self.busy_until.max(now);
        if start - now > self.spec.queue {
            return Fate::Overflow;
        }
        self.busy_until = start + self.spec.serialization(bytes);
        let mut delay = self.spec.delay;
        if !self.spec.jitter.is_zero() {
            let j = self.spec.jitter.as_secs_f64();
            delay = Duration::from_secs_f64((delay.as_secs_f64() + rng.random_range(-j..=j)).max(0.0));
        }
        let at = (self.busy_until + delay).max(self.last_delivery);
        self.last_delivery = at;
        Fate::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn spec(delay_ms: u64, mbit: f64) -> LinkSpec {
        LinkSpec::symmetric(Duration::from_millis(2 * delay_ms), mbit)
    }

    #[test]
    fn delay_and_serialization_add_and_the_wire_is_shared() {
        let t0 = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // 1000 bytes at 8 Mbit/s take 1 ms on the wire.
        let mut link = Link::new(spec(20, 8.0), t0);
        assert_eq!(
            link.offer(1000, t0, &mut rng),
            Fate::Deliver(t0 + Duration::from_millis(21))
        );
        // A second packet at the same instant waits for the first to leave the wire.
        assert_eq!(
            link.offer(1000, t0, &mut rng),
            Fate::Deliver(t0 + Duration::from_millis(22))
        );
        // Later, on an idle wire, only delay and its own serialization count.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            link.offer(1000, t1, &mut rng),
            Fate::Deliver(t1 + Duration::from_millis(21))
        );
    }

    #[test]
    fn a_full_queue_drops_and_the_rate_holds() {
        let t0 = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut link = Link::new(spec(5, 10.0), t0);
        // Offer 10x the rate for one second: 1250-byte packets every 100 us.
        let (mut delivered, mut overflow, mut last) = (0usize, 0usize, t0);
        for i in 0..10_000u32 {
            match link.offer(1250, t0 + Duration::from_micros(100) * i, &mut rng) {
                Fate::Deliver(at) => {
                    delivered += 1;
                    last = at;
                }
                Fate::Overflow => overflow += 1,
                Fate::Lost => panic!("no loss was asked"),
            }
        }
        assert!(overflow > 8000, "{overflow}");
        // What got through left at 10 Mbit/s: 1 ms a packet.
        let span = (last - t0).as_secs_f64();
        let rate = delivered as f64 * 1250.0 * 8.0 / (span - 0.005);
        assert!((rate / 10e6 - 1.0).abs() < 0.01, "{rate}");
    }

    #[test]
    fn loss_follows_its_rate_and_jitter_never_reorders() {
        let t0 = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut s = spec(50, 0.0);
        s.loss = 0.1;
        s.jitter = Duration::from_millis(20);
        let mut link = Link::new(s, t0);
        let (mut lost, mut last, mut spread) = (0, t0, (Duration::MAX, Duration::ZERO));
        for i in 0..20_000u32 {
            let now = t0 + Duration::from_millis(10) * i;
            match link.offer(100, now, &mut rng) {
                Fate::Lost => lost += 1,
                Fate::Deliver(at) => {
                    assert!(at >= last, "packet {i} overtook the one before it");
                    last = at;
                    spread = (spread.0.min(at - now), spread.1.max(at - now));
                }
                Fate::Overflow => panic!("no cap was asked"),
            }
        }
        assert!((1800..2200).contains(&lost), "{lost}");
        assert!(
            spread.0 >= Duration::from_millis(30) && spread.0 < Duration::from_millis(32),
            "{spread:?}"
        );
        assert!(
            spread.1 <= Duration::from_millis(70) && spread.1 > Duration::from_millis(68),
            "{spread:?}"
        );
    }

    #[test]
    fn bad_specs_say_why() {
        let mut s = spec(10, 1.0);
        s.loss = 1.0;
        assert_eq!(s.validate(), Err(SpecError::Loss(1.0)));
        let mut s = spec(10, 1.0);
        s.jitter = Duration::from_millis(11);
        assert!(matches!(s.validate(), Err(SpecError::Jitter { .. })));
        assert_eq!(spec(10, 1.0).validate(), Ok(()));
    }
}

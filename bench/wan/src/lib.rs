//! A WAN emulator for tests and benchmarks (issue 15). Each peer gets a network namespace with
//! one TUN device, `wan0`, holding its address `10.201.0.<i+1>/24`; a router in this process
//! moves packets between the devices, holding each for its link's delay and jitter, dropping
//! at its loss rate, and pacing it to its bandwidth cap ([`link`]). TCP, UDP, QUIC and WebRTC
//! all go through it alike. It exists because this kernel has no `netem`.
//!
//! Programs run in a peer's namespace with `ip netns exec <ns> <program>`; the emulator
//! measures itself ([`Wan::check`]) before anyone relies on it.

#![cfg(target_os = "linux")]

pub mod link;
pub mod netns;
pub mod probe;
pub mod router;

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::link::{LinkSpec, SpecError};
use crate::netns::NetnsError;
use crate::probe::{ProbeError, RateMeasurement, RttMeasurement};
use crate::router::Router;

/// The most peers one emulator holds (the probes' port plan and the /24).
pub const MAX_PEERS: usize = 64;
/// The names of every emulator's namespaces start with it.
pub const NS_PREFIX: &str = "corolla-wan-";

/// The emulated network: how many peers, and every link between them.
#[derive(Debug, Clone)]
pub struct WanConfig {
    pub peers: usize,
    /// Every link's spec unless `overrides` names the pair.
    pub link: LinkSpec,
    /// `(a, b, spec)`: the link between `a` and `b`, both directions.
    pub overrides: Vec<(usize, usize, LinkSpec)>,
    /// Seeds jitter and loss.
    pub seed: u64,
}

/// Why the emulator cannot start or check itself.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("{0} peers asked; the emulator holds 2 to {MAX_PEERS}")]
    Peers(usize),
    #[error("link {0}-{1} names a peer that does not exist")]
    NoSuchPeer(usize, usize),
    #[error("link {a}-{b}: {source}")]
    Spec { a: usize, b: usize, source: SpecError },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot open the TUN device in {ns}: {source} (the emulator needs root, or CAP_NET_ADMIN)")]
    Tun { ns: String, source: std::io::Error },
    #[error("cannot start the router: {0}")]
    Router(std::io::Error),
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

impl WanConfig {
    /// The spec from `from` to `to`.
    pub fn spec(&self, from: usize, to: usize) -> LinkSpec {
        self.overrides
            .iter()
            .rev()
            .find(|(a, b, _)| (*a, *b) == (from, to) || (*a, *b) == (to, from))
            .map_or(self.link, |(_, _, s)| *s)
    }

    pub fn validate(&self) -> Result<(), WanError> {
        if !(2..=MAX_PEERS).contains(&self.peers) {
            return Err(WanError::Peers(self.peers));
        }
        self.link
            .validate()
            .map_err(|source| WanError::Spec { a: 0, b: 0, source })?;
        for (a, b, spec) in &self.overrides {
            if *a >= self.peers || *b >= self.peers || a == b {
                return Err(WanError::NoSuchPeer(*a, *b));
            }
            spec.validate()
                .map_err(|source| WanError::Spec { a: *a, b: *b, source })?;
        }
        Ok(())
    }
}

/// One emulated peer: run its programs with `ip netns exec <ns>`; it is reached at `addr`.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// A running emulator. Dropping it removes the namespaces' names; the router's threads and
/// the namespaces themselves last until the process ends, so run it in a process of its own
/// (the `wan` binary) rather than inside a long-lived one.
#[derive(Debug)]
pub struct Wan {
    config: WanConfig,
    peers: Vec<Peer>,
    router: Router,
}

/// The self-check's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub rtt: Vec<RttMeasurement>,
    pub rate: Vec<RateMeasurement>,
    /// Whether every figure is within tolerance ([`Check::problems`] says which is not).
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Wan {
    /// Creates a namespace and TUN device per peer and starts routing among them.
    pub fn start(config: WanConfig) -> Result<Wan, WanError> {
        config.validate()?;
        netns::delete_stale(NS_PREFIX);
        let pid = std::process::id();
        let peers: Vec<Peer> = (0..config.peers)
            .map(|i| Peer {
                ns: format!("{NS_PREFIX}{pid}-{i}"),
                addr: Ipv4Addr::new(10, 201, 0, i as u8 + 1),
            })
            .collect();
        let mut devices = Vec::with_capacity(peers.len());
        let mut made = Vec::new();
        let result = (|| {
            for peer in &peers {
                netns::create(&peer.ns)?;
                made.push(peer.ns.clone());
                let ns = peer.ns.clone();
                let device = netns::run_in(&peer.ns, || {
                    tun_rs::DeviceBuilder::new().name("wan0").mtu(1500).build_sync()
                })?
                .map_err(|source| WanError::Tun { ns, source })?;
                let addr = format!("{}/24", peer.addr);
                netns::ip(&["-n", &peer.ns, "addr", "add", &addr, "dev", "wan0"])?;
                netns::ip(&["-n", &peer.ns, "link", "set", "wan0", "up"])?;
                devices.push(device);
            }
            Ok::<(), WanError>(())
        })();
        if let Err(e) = result {
            for ns in made {
                let _ = netns::delete(&ns);
            }
            return Err(e);
        }
        let addrs = peers.iter().map(|p| p.addr).collect();
        let spec_config = config.clone();
        let router =
            Router::start(devices, addrs, move |a, b| spec_config.spec(a, b), config.seed).map_err(WanError::Router)?;
        Ok(Wan { config, peers, router })
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Measures the round trip of every pair (20 echoes each, all pairs at once) and the
    /// bandwidth from peer 0 to peer 1 and from the last peer to peer 0, and compares them with
    /// what was asked: RTT within 5% or 1 ms, bandwidth within 5%.
    pub fn check(&self) -> Result<Check, WanError> {
        let n = self.peers.len();
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect();
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(a, b)| {
                let (pa, pb) = (self.peers[a].clone(), self.peers[b].clone());
                let asked = self.config.spec(a, b).delay + self.config.spec(b, a).delay;
                std::thread::spawn(move || probe::rtt((a, &pa.ns), (b, &pb.ns, pb.addr), asked, 20))
            })
            .collect();
        let mut rtt = Vec::new();
        for h in handles {
            rtt.push(h.join().map_err(|_| NetnsError::Thread("rtt probe".into()))??);
        }
        let mut rate = Vec::new();
        let mut directions = vec![(0, 1)];
        if n > 2 {
            directions.push((n - 1, 0));
        }
        for (a, b) in directions {
            let bps = self.config.spec(a, b).rate_bps;
            if bps == 0 {
                continue;
            }
            let (pa, pb) = (&self.peers[a], &self.peers[b]);
            rate.push(probe::rate((a, &pa.ns), (b, &pb.ns, pb.addr), bps, 1.5)?);
        }
        let mut problems = Vec::new();
        for r in &rtt {
            let tolerance = (r.asked_ms * 0.05).max(1.0);
            if (r.median_ms - r.asked_ms).abs() > tolerance {
                problems.push(format!(
                    "RTT {}-{}: asked {:.1} ms, measured {:.2} ms",
                    r.from, r.to, r.asked_ms, r.median_ms
                ));
            }
        }
        for r in &rate {
            if (r.measured_mbit / r.asked_mbit - 1.0).abs() > 0.05 {
                problems.push(format!(
                    "bandwidth {}->{}: asked {:.1} Mbit/s, measured {:.2}",
                    r.from, r.to, r.asked_mbit, r.measured_mbit
                ));
            }
        }
        Ok(Check {
            rtt,
            rate,
            ok: problems.is_empty(),
            problems,
        })
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        for peer in &self.peers {
            let _ = netns::delete(&peer.ns);
        }
    }
}

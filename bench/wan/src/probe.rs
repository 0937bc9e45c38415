//! The emulator's self-check: round trips and bandwidth measured end to end, by sockets in the
//! peers' namespaces, through the kernel and the router as real traffic goes.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::netns::{self, NetnsError};

/// What went wrong measuring.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("probe socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("no echo came back from {0} ({1} probes sent)")]
    NoEcho(Ipv4Addr, usize),
    #[error("no datagram reached {0}")]
    NoTraffic(Ipv4Addr),
}

/// Ports for the probes of pair (from, to): `PORT + from * 64 + to` (at most 64 peers).
const PORT: u16 = 47_001;
const RATE_PORT: u16 = 52_001;
/// IPv4 + UDP headers: the router caps whole packets.
const HEADERS: usize = 28;

/// Round trips measured between two peers.
#[derive(Debug, Clone, Serialize)]
pub struct RttMeasurement {
    pub from: usize,
    pub to: usize,
    pub asked_ms: f64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub probes: usize,
}

/// A bandwidth cap measured one way between two peers.
#[derive(Debug, Clone, Serialize)]
pub struct RateMeasurement {
    pub from: usize,
    pub to: usize,
    pub asked_mbit: f64,
    pub measured_mbit: f64,
}

/// `probes` UDP echoes from `from_ns` to `to` (in `to_ns`), `gap` apart.
pub fn rtt(
    (from, from_ns): (usize, &str),
    (to, to_ns, to_addr): (usize, &str, Ipv4Addr),
    asked: Duration,
    probes: usize,
) -> Result<RttMeasurement, ProbeError> {
    let port = PORT + (from * 64 + to) as u16;
    let bound = netns::run_in(to_ns, move || UdpSocket::bind(SocketAddrV4::new(to_addr, port)))??;
    bound.set_read_timeout(Some(Duration::from_millis(200)))?;
    let echo_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = echo_done.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((len, peer)) = bound.recv_from(&mut buf) {
                let _ = bound.send_to(&buf[..len], peer);
            }
        }
    });
    let client = netns::run_in(from_ns, || UdpSocket::bind("0.0.0.0:0"))??;
    let timeout = asked * 4 + Duration::from_millis(500);
    client.set_read_timeout(Some(timeout))?;
    let mut samples = Vec::with_capacity(probes);
    let mut buf = [0u8; 64];
    for i in 0..probes as u64 {
        let sent = Instant::now();
        client.send_to(&i.to_le_bytes(), SocketAddrV4::new(to_addr, port))?;
        // Skip late echoes of earlier probes.
        loop {
            match client.recv_from(&mut buf) {
                Ok((8, _)) if buf[..8] == i.to_le_bytes() => {
                    samples.push(sent.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    echo_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo.join();
    if samples.len() < probes / 2 + 1 {
        return Err(ProbeError::NoEcho(to_addr, probes));
    }
    samples.sort_by(f64::total_cmp);
    Ok(RttMeasurement {
        from,
        to,
        asked_ms: asked.as_secs_f64() * 1e3,
        median_ms: samples[samples.len() / 2],
        min_ms: samples[0],
        max_ms: samples[samples.len() - 1],
        probes: samples.len(),
    })
}

/// Offers `from` -> `to` UDP at 1.25x the cap `asked_bps` for `seconds` and measures the rate
/// that arrives, over whole IP packets, once the bottleneck's queue has filled.
pub fn rate(
    (from, from_ns): (usize, &str),
    (to, to_ns, to_addr): (usize, &str, Ipv4Addr),
    asked_bps: u64,
    seconds: f64,
) -> Result<RateMeasurement, ProbeError> {
    const PAYLOAD: usize = 1172;
    let port = RATE_PORT + (from * 64 + to) as u16;
    let sink = netns::run_in(to_ns, move || UdpSocket::bind(SocketAddrV4::new(to_addr, port)))??;
    sink.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut arrivals: Vec<Instant> = Vec::new();
        while let Ok((len, _)) = sink.recv_from(&mut buf) {
            if len == 1 {
                break;
            }
            arrivals.push(Instant::now());
        }
        arrivals
    });
    let sender = netns::run_in(from_ns, || UdpSocket::bind("0.0.0.0:0"))??;
    let target = SocketAddrV4::new(to_addr, port);
    let offered_bps = asked_bps as f64 * 1.25;
    let packet_bits = ((PAYLOAD + HEADERS) * 8) as f64;
    let payload = [0u8; PAYLOAD];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let due = (start.elapsed().as_secs_f64() * offered_bps / packet_bits) as u64;
        while sent < due {
            // A full socket buffer only means we offered more than the path takes.
            let _ = sender.send_to(&payload, target);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // The end marker, after the queue has drained.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        sender.send_to(&[0u8], target)?;
    }
    let arrivals = receiver.join().map_err(|_| NetnsError::Thread(to_ns.to_string()))?;
    // Skip the first fifth (the queue filling, and the rate above the cap before it does).
    let skip = arrivals.len() / 5;
    let (Some(first), Some(last)) = (arrivals.get(skip), arrivals.last()) else {
        return Err(ProbeError::NoTraffic(to_addr));
    };
    let span = (*last - *first).as_secs_f64();
    let packets = (arrivals.len() - skip - 1) as f64;
    if span <= 0.0 {
        return Err(ProbeError::NoTraffic(to_addr));
    }
    Ok(RateMeasurement {
        from,
        to,
        asked_mbit: asked_bps as f64 / 1e6,
        measured_mbit: packets * packet_bits / span / 1e6,
    })
}

//! `wan up`: starts the emulator, checks it, writes where its peers are, and routes until
//! SIGTERM or SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use corolla_wan::link::LinkSpec;
use corolla_wan::{Wan, WanConfig};

#[derive(Parser, Debug)]
#[command(
    name = "wan",
    about = "A WAN emulator: peers in network namespaces, links with delay, jitter, loss and a bandwidth cap"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates the peers' namespaces, measures the links, writes `--ready-file`, and routes
    /// until stopped. Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
    Up(UpArgs),
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Number of peers (namespaces), 2 to 64.
    #[arg(long)]
    peers: usize,
    /// Round-trip time of every link, in milliseconds (half each way).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Each packet's one-way delay varies by up to this much, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Probability that a packet is lost, each way.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bandwidth cap of every link, each way, in Mbit/s; 0 for none.
    #[arg(long, default_value_t = 100.0)]
    mbit: f64,
    /// The bottleneck's buffer, in milliseconds at the cap.
    #[arg(long, default_value_t = 100.0)]
    queue_ms: f64,
    /// A link unlike the others: `A-B=RTT_MS` or `A-B=RTT_MS,MBIT` (peers from 0).
    #[arg(long = "link", value_parser = parse_link)]
    links: Vec<(usize, usize, f64, Option<f64>)>,
    /// Seeds jitter and loss.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the peers and the self-check (JSON), once routing.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Start even if the self-check finds a link off what was asked.
    #[arg(long)]
    allow_off_spec: bool,
}

fn parse_link(s: &str) -> Result<(usize, usize, f64, Option<f64>), String> {
    let usage = || format!("`{s}`: expected A-B=RTT_MS or A-B=RTT_MS,MBIT");
    let (pair, values) = s.split_once('=').ok_or_else(usage)?;
    let (a, b) = pair.split_once('-').ok_or_else(usage)?;
    let mut values = values.split(',');
    let rtt = values.next().and_then(|v| v.parse().ok()).ok_or_else(usage)?;
    let mbit = match values.next() {
        Some(v) => Some(v.parse().map_err(|_| usage())?),
        None => None,
    };
    Ok((
        a.parse().map_err(|_| usage())?,
        b.parse().map_err(|_| usage())?,
        rtt,
        mbit,
    ))
}

fn millis(ms: f64, what: &str) -> anyhow::Result<Duration> {
    if !(0.0..=20_000.0).contains(&ms) {
        bail!("{what} must be 0 to 20000 ms, got {ms}");
    }
    Ok(Duration::from_secs_f64(ms / 1e3))
}

fn spec(rtt_ms: f64, mbit: f64, args: &UpArgs) -> anyhow::Result<LinkSpec> {
    if !(0.0..=100_000.0).contains(&mbit) {
        bail!("--mbit must be 0 to 100000, got {mbit}");
    }
    Ok(LinkSpec {
        jitter: millis(args.jitter_ms, "--jitter-ms")?,
        loss: args.loss,
        queue: millis(args.queue_ms, "--queue-ms")?,
        ..LinkSpec::symmetric(millis(rtt_ms, "--rtt-ms")?, mbit)
    })
}

fn config(args: &UpArgs) -> anyhow::Result<WanConfig> {
    let link = spec(args.rtt_ms, args.mbit, args)?;
    let overrides = args
        .links
        .iter()
        .map(|&(a, b, rtt, mbit)| Ok((a, b, spec(rtt, mbit.unwrap_or(args.mbit), args)?)))
        .collect::<anyhow::Result<_>>()?;
    let config = WanConfig {
        peers: args.peers,
        link,
        overrides,
        seed: args.seed,
    };
    config.validate()?;
    Ok(config)
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let wan = Wan::start(config).context("starting the emulator")?;
    let check = wan.check().context("checking the emulator")?;
    for r in &check.rtt {
        eprintln!(
            "wan: RTT {}-{}: asked {:.1} ms, measured {:.2} ms (median of {}, {:.2}..{:.2})",
            r.from, r.to, r.asked_ms, r.median_ms, r.probes, r.min_ms, r.max_ms
        );
    }
    for r in &check.rate {
        eprintln!(
            "wan: bandwidth {}->{}: asked {:.1} Mbit/s, measured {:.2} Mbit/s",
            r.from, r.to, r.asked_mbit, r.measured_mbit
        );
    }
    if !check.ok && !args.allow_off_spec {
        bail!("the emulator is off what was asked: {}", check.problems.join("; "));
    }
    let ready = serde_json::json!({
        "pid": std::process::id(),
        "peers": wan.peers(),
        "link": wan.config().link,
        "check": check,
    });
    if let Some(path) = &args.ready_file {
        // Written whole and renamed, so a reader never sees half of it.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&ready)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "wan: routing among {} peers; stop with SIGTERM or Ctrl-C",
        wan.peers().len()
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    for (from, to, c) in wan.router().counters() {
        eprintln!(
            "wan: {from}->{to}: {} packets, {} bytes, {} lost, {} overflowed",
            c.delivered, c.bytes, c.lost, c.overflow
        );
    }
    drop(wan);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(args) => up(args),
    }
}

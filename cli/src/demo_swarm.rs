//! The demo swarm: a relay serving the chat page, and servers sharing the model's blocks, all
//! in this process on the local machine.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use corolla_relay::RelayConfig;
use corolla_server::{ServerArgs, ServerConfig};
use libp2p::Multiaddr;
use shared_model::loader::ModelFiles;

use crate::args::DemoArgs;

pub fn run(args: &DemoArgs, model: &Path) -> Result<()> {
    if !args.web_root.join("index.html").exists() {
        bail!(
            "no chat page at {}: build it with `scripts/build-web.sh` (scripts/demo.sh does it for you) or give --web-root",
            args.web_root.display()
        );
    }
    if args.servers == 0 {
        bail!("--servers must be at least 1");
    }
    let num_layers = ModelFiles::open(model)
        .with_context(|| format!("cannot open model {}", model.display()))?
        .config
        .num_layers;
    let servers = args.servers.min(num_layers);
    let work = std::env::temp_dir().join(format!("corolla-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(swarm(args, model, num_layers, servers, &work));
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn addr(text: String) -> Result<Multiaddr> {
    text.parse().with_context(|| format!("bad address {text}"))
}

async fn swarm(args: &DemoArgs, model: &Path, num_layers: usize, servers: usize, work: &Path) -> Result<()> {
    let ip = args.bind;
    let ip_proto = match ip {
        IpAddr::V4(_) => "ip4",
        IpAddr::V6(_) => "ip6",
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let relay_addrs = work.join("relay.addr");
    let relay = RelayConfig {
        listen: vec![
            addr(format!("/{ip_proto}/{ip}/tcp/0"))?,
            addr(format!("/{ip_proto}/{ip}/udp/0/webrtc-direct"))?,
        ],
        external_addrs: Vec::new(),
        identity: None,
        addr_file: Some(relay_addrs.clone()),
        limits: corolla_relay::RelayLimits {
            max_circuits: 64,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 1 << 30,
            max_reservations: 64,
        },
        // The demo's relay shares its process with the servers and their weights: no memory
        // ceiling of its own.
        connections: swarm::limits::ConnectionPolicy::default(),
        dht_store: swarm::dht_store::DhtStoreLimits::default(),
        stats_interval: Duration::from_secs(60),
        record_ttl: Duration::from_secs(120),
        http_listen: Some(SocketAddr::new(ip, args.http_port)),
        metrics_listen: None,
        web_root: Some(args.web_root.clone()),
        swarm_key: None,
        allow_peers: None,
    };
    let relay_task = tokio::spawn(corolla_relay::run(relay, shutdown()));
    let bootstrap = wait_for_lines(&relay_addrs, Duration::from_secs(20))
        .await
        .context("the relay did not start")?;
    let tcp = bootstrap
        .iter()
        .find(|a| a.contains("/tcp/"))
        .cloned()
        .context("the relay has no TCP address")?;

    let mut tasks = Vec::new();
    let mut addr_files = Vec::new();
    for i in 0..servers {
        let start = i * num_layers / servers;
        let end = (i + 1) * num_layers / servers;
        let addr_file = work.join(format!("server{i}.addr"));
        let mut argv = vec![
            "server".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--blocks".into(),
            format!("{start}:{end}"),
            "--initial-peers".into(),
            tcp.clone(),
            "--listen".into(),
            format!("/{ip_proto}/{ip}/tcp/0"),
            "--listen".into(),
            format!("/{ip_proto}/{ip}/udp/0/webrtc-direct"),
            "--public-name".into(),
            format!("demo-{i}"),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        if i == 0 {
            argv.extend(["--http-listen".to_string(), SocketAddr::new(ip, 0).to_string()]);
        }
        let config: ServerConfig = <ServerArgs as clap::Parser>::try_parse_from(argv)?.validate()?;
        tasks.push(tokio::spawn(corolla_server::run(config, shutdown())));
        addr_files.push(addr_file);
    }
    for f in &addr_files {
        wait_for_lines(f, Duration::from_secs(120))
            .await
            .context("a server did not come up")?;
    }
    let url = format!("http://{}/", SocketAddr::new(ip, args.http_port));
    eprintln!(
        "Corolla demo: {} over {servers} server(s), relay {tcp}\nOpen the chat page: {url}\n(Ctrl-C stops the swarm)",
        model.display()
    );
    println!("{url}");

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        r = relay_task => {
            r.context("the relay task failed")??;
            bail!("the relay stopped");
        }
    }
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(())
}

/// Waits until `path` holds at least one line; returns its lines.
async fn wait_for_lines(path: &PathBuf, timeout: Duration) -> Result<Vec<String>> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            if !lines.is_empty() {
                return Ok(lines);
            }
        }
        if start.elapsed() > timeout {
            bail!("nothing written to {} within {timeout:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

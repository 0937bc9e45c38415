//! The `server` binaries' entry point (`server`, and `server-faulty` with the test-only
//! `fault-injection` flags): flags, logging, runtime, shutdown on SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;

use crate::{ServerArgs, run};

/// Parses the flags, runs the server until a shutdown signal, and reports any error.
pub fn main() -> ExitCode {
    let args = ServerArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("COROLLA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = args.validate().and_then(|config| {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(run(config, shutdown_signal()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

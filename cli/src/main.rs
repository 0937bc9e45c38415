//! `corolla`: run a model locally or through the swarm, inspect its outputs, or bring up the
//! demo swarm with its chat page.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use clap::Parser;

mod api;
mod args;
mod backend;
mod bench;
mod bundle;
mod demo;
mod demo_swarm;
mod fetch;
mod forward;
mod generate;
mod remote;
mod train;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("COROLLA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Train(args) => train::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Api(args) => api::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a user can act on: the whole cause chain, colon-separated.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

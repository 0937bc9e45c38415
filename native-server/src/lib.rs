//! The Corolla server: loads a span of blocks, announces it in the DHT, and serves inference
//! sessions, stateless forward/backward requests and the head service for it, to peers that
//! may be hostile. Every limit is in [`admission`].

pub mod admission;
mod announce;
mod args;
mod balance;
mod batch;
mod bundle;
mod compute;
pub mod cost;
pub mod entry;
mod fair;
mod faults;
mod head;
mod hosted;
mod io;
pub mod memory;
mod metrics;
mod push;
mod relocate;
mod serve;
mod session;
mod span_choice;
mod span_work;

pub use args::{BackendKind, QuantArg, ServerArgs, ServerConfig, parse_bytes};
pub use serve::run;

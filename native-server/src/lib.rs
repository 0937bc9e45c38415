//! The Corolla server: loads a span of blocks, announces it in the DHT, and serves inference
//! sessions and stateless forward/backward requests for it.

mod args;
mod serve;
mod span_choice;

pub use args::{BackendKind, QuantArg, ServerArgs, ServerConfig};
pub use serve::run;

//! The building blocks of the one transformer block every family shares.

pub mod attention;
pub mod block;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod norm;
pub mod positions;

pub use attention::{Attention, AttentionPart, AttentionWeights};
pub use block::{Block, BlockWeights};
pub use linear::Linear;
pub use mlp::{Mlp, MlpWeights};
pub use norm::Norm;
pub use positions::{AttentionTiling, StepContext};

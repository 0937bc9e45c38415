//! The floating-point type a process computes in (`--dtype`).

use burn::prelude::Backend;
use burn::tensor::{FloatDType, IntDType, set_default_dtypes};

/// Element type of weights, activations and KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    fn float_dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
            Self::Bf16 => FloatDType::BF16,
        }
    }

    /// Makes every float tensor created on `device` from now on (weights uploaded from f32
    /// host data included) of this type, so the one model code runs in any precision.
    ///
    /// burn fixes a device's default types once per process, at its first tensor: call this
    /// before loading anything. f32 is burn's default and needs no call.
    pub fn apply<B: Backend>(self, device: &B::Device) -> Result<(), PrecisionError> {
        if self == Self::F32 {
            return Ok(());
        }
        set_default_dtypes::<B>(device, self.float_dtype(), IntDType::I32).map_err(|e| PrecisionError {
            precision: self.name(),
            backend: B::name(device),
            reason: format!("{e:?}"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot compute in {precision} on {backend}: {reason}")]
pub struct PrecisionError {
    pub precision: &'static str,
    pub backend: String,
    pub reason: String,
}

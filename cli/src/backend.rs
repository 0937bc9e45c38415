use anyhow::{Result, bail};
use burn::prelude::Backend;

use crate::args::BackendKind;

/// Work to run on whichever backend the user chose.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

pub fn dispatch<W: OnBackend>(kind: BackendKind, work: W) -> Result<W::Output> {
    match kind {
        BackendKind::Cpu => work.run::<shared_model::Cpu>(Default::default()),
        BackendKind::Cuda => cuda(work),
        BackendKind::Wgpu => wgpu(work),
    }
}

#[cfg(feature = "cuda")]
fn cuda<W: OnBackend>(work: W) -> Result<W::Output> {
    shared_model::kernels::cache_compiled_kernels(&crate::fetch::cache_dir(None).join("kernels"));
    work.run::<burn::backend::Cuda>(Default::default())
}

#[cfg(not(feature = "cuda"))]
fn cuda<W: OnBackend>(_: W) -> Result<W::Output> {
    bail!("this corolla was built without CUDA support (rebuild with `--features cuda`)")
}

#[cfg(feature = "wgpu")]
fn wgpu<W: OnBackend>(work: W) -> Result<W::Output> {
    work.run::<burn::backend::Wgpu>(Default::default())
}

#[cfg(not(feature = "wgpu"))]
fn wgpu<W: OnBackend>(_: W) -> Result<W::Output> {
    bail!("this corolla was built without wgpu support (rebuild with `--features wgpu`)")
}

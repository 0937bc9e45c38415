use anyhow::{Context, Result};
use burn::prelude::Backend;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::model::to_host;
use shared_model::weights::HostTensor;

use crate::args::ForwardArgs;
use crate::backend::{OnBackend, dispatch};
use crate::generate::check_prompt;

pub fn run(args: ForwardArgs) -> Result<()> {
    let mut files = crate::fetch::open_model(&args.model, None)?;
    args.quant.apply(&mut files);
    check_prompt(&files, &args.token_ids, 0)?;
    let tensors = dispatch(
        args.backend,
        Job {
            files: &files,
            ids: &args.token_ids,
            dtype: args.dtype,
        },
    )?;
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.data.iter().flat_map(|x| x.to_le_bytes()).collect(), t.shape))
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, shape)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

struct Job<'a> {
    files: &'a ModelFiles,
    ids: &'a [u32],
    dtype: crate::args::DtypeArg,
}

impl OnBackend for Job<'_> {
    /// `logits` [T, V] and `block_out.{i}` [T, H] of the one sequence.
    type Output = Vec<(String, HostTensor)>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output> {
        self.dtype.precision().apply::<B>(&device)?;
        let model = LocalModel::<B>::load(self.files, &device).context("cannot load the model")?;
        let ids = [self.ids.to_vec()];
        let x = model.embeddings.forward(&ids)?;
        let span = &model.spans[0];
        let mut cache = span.new_cache(vec![0]);
        let mut out = Vec::new();
        let h = span.forward_inspect(x, &mut cache, |i, t| {
            out.push((format!("block_out.{i}"), squeeze(to_host(t.clone()))))
        })?;
        out.push(("logits".into(), squeeze(to_host(model.head.forward(h)))));
        Ok(out)
    }
}

/// Drops the batch dimension of a one-row tensor.
fn squeeze(t: HostTensor) -> HostTensor {
    HostTensor::new(t.shape[1..].to_vec(), t.data)
}

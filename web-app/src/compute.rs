//! The page's compute: the embeddings and LM head on the user's GPU through WebGPU (burn's
//! wgpu backend), or on burn's CPU backend compiled to WASM when the browser has no WebGPU.
//! Both sit under burn's autodiff, so the Tune view trains prompts on the same copy of the
//! weights the chat uses (autodiff costs nothing where no tensor asks for gradients).

use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, graphics::WebGpu, init_setup_async};
use burn::prelude::*;
use shared_model::bundle::ClientBundle;
use shared_model::model::{Embeddings, LmHead};
use shared_model::tuning::with_prompt;
use shared_model::weights::HostTensor;
use shared_model::{CpuAutodiff, ModelError};
use swarm::protocol::{HeadRequest, HeadResponse, Limits};
use swarm::wire::{WireDtype, WireTensor};
use wasm_bindgen::JsValue;
use wasm_bindgen_futures::JsFuture;

pub type Gpu = burn::backend::Autodiff<burn::backend::Wgpu>;

/// Which device the page computes on, as shown to the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    WebGpu {
        adapter: String,
    },
    Cpu {
        reason: String,
    },
    /// A server's head service runs the embeddings and LM head.
    Server {
        peer: String,
        reason: String,
    },
}

impl Device {
    pub fn label(&self) -> String {
        match self {
            Device::WebGpu { adapter } => format!("WebGPU: {adapter}"),
            Device::Cpu { reason } => format!("CPU (WASM): {reason}"),
            Device::Server { peer, reason } => format!("server {peer} (head service): {reason}"),
        }
    }
}

/// The adapter WebGPU would give us, or why there is none. Asked through JavaScript first:
/// wgpu panics (aborting the whole page) where the browser has no adapter.
async fn webgpu_adapter() -> Result<String, String> {
    let navigator = web_sys::window().ok_or("no window")?.navigator();
    let gpu = js_sys::Reflect::get(&navigator, &JsValue::from_str("gpu")).map_err(|_| "no navigator.gpu")?;
    if gpu.is_undefined() || gpu.is_null() {
        return Err("this browser has no WebGPU".into());
    }
    let request = js_sys::Reflect::get(&gpu, &JsValue::from_str("requestAdapter"))
        .ok()
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        .ok_or("navigator.gpu.requestAdapter is missing")?;
    let promise = request
        .call0(&gpu)
        .ok()
        .and_then(|p| p.dyn_into::<js_sys::Promise>().ok())
        .ok_or("requestAdapter failed")?;
    let adapter = JsFuture::from(promise)
        .await
        .map_err(|_| "requestAdapter was rejected")?;
    if adapter.is_null() || adapter.is_undefined() {
        return Err("WebGPU offers no adapter".into());
    }
    let info = js_sys::Reflect::get(&adapter, &JsValue::from_str("info")).unwrap_or(JsValue::UNDEFINED);
    let field = |name: &str| {
        js_sys::Reflect::get(&info, &JsValue::from_str(name))
            .ok()
            .and_then(|v| v.as_string())
            .filter(|s| !s.is_empty())
    };
    let parts: Vec<String> = ["vendor", "architecture", "description"]
        .iter()
        .filter_map(|k| field(k))
        .collect();
    Ok(if parts.is_empty() {
        "unknown adapter".into()
    } else {
        parts.join("/")
    })
}

use wasm_bindgen::JsCast;

/// The embeddings and LM head on one backend.
pub struct Parts<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub head: LmHead<B>,
}

impl<B: Backend> Parts<B> {
    fn load(bundle: &ClientBundle, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            embeddings: Embeddings::load(&bundle.config, &bundle.weights, device)?,
            head: LmHead::load(&bundle.config, &bundle.weights, device)?,
        })
    }

    /// # Shapes
    /// - `ids`: rows of equal length `seq`; returns `[rows, seq, hidden]`, block 0's input
    async fn embed(&self, ids: &[Vec<u32>]) -> Result<HostTensor, ComputeError> {
        read(self.embeddings.forward(ids)?).await
    }

    /// Block 0's input with a tuned input prompt after each row's (absent) left padding.
    ///
    /// # Shapes
    /// - `ids`: rows of equal length `seq`; `prompt`: `[prefix, hidden]`; returns
    ///   `[rows, prefix + seq, hidden]`
    async fn embed_prompted(
        &self,
        ids: &[Vec<u32>],
        prompt: &HostTensor,
        device: &B::Device,
    ) -> Result<HostTensor, ComputeError> {
        let p = Tensor::<B, 2>::from_data(TensorData::new(prompt.data.clone(), prompt.shape.clone()), device);
        let raw = self.embeddings.embed_raw(ids)?;
        read(with_prompt(&self.embeddings, raw, &p, &vec![0; ids.len()])).await
    }

    /// # Shapes
    /// - `hidden`: `[rows, seq, hidden]`, the last block's output; returns `[rows, n, vocab]`,
    ///   the logits of the last `n` positions (`1 <= n <= seq`)
    async fn tail_logits(&self, hidden: &HostTensor, n: usize, device: &B::Device) -> Result<HostTensor, ComputeError> {
        let [b, t, h] = tail_shape(hidden, n)?;
        let x = Tensor::<B, 3>::from_data(TensorData::new(hidden.data.clone(), [b, t, h]), device);
        read(self.head.forward(x.narrow(1, t - n, n))).await
    }
}

/// `hidden`'s `[rows, seq, hidden]`, checking that it has at least `n >= 1` positions.
fn tail_shape(hidden: &HostTensor, n: usize) -> Result<[usize; 3], ComputeError> {
    match <[usize; 3]>::try_from(hidden.shape.as_slice()) {
        Ok(shape) if n >= 1 && n <= shape[1] => Ok(shape),
        _ => Err(ComputeError::Shape(hidden.shape.clone())),
    }
}

/// Copies a tensor to the host without blocking the page (WebGPU reads are asynchronous).
pub async fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor, ComputeError> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data_async()
        .await
        .map_err(|e| ComputeError::Read(format!("{e:?}")))?
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ComputeError::Read(format!("{e:?}")))?;
    Ok(HostTensor::new(shape, data))
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot read a result back: {0}")]
    Read(String),
    #[error("unexpected hidden-state shape {0:?}")]
    Shape(Vec<usize>),
    #[error("head service: {0}")]
    Remote(String),
}

/// The client's model parts on the chosen device.
pub enum ClientModel {
    Gpu(Parts<Gpu>, WgpuDevice),
    Cpu(Parts<CpuAutodiff>),
    /// Run by a server offering head service (`/corolla/head/2`).
    Remote(RemoteHead),
}

/// A server's head service, for models whose embeddings and head a tab cannot hold.
pub struct RemoteHead {
    pub client: swarm::node::Client,
    pub peer: libp2p::PeerId,
    pub model: String,
}

impl RemoteHead {
    async fn ask(&self, request: HeadRequest) -> Result<HostTensor, ComputeError> {
        let remote = |e: String| ComputeError::Remote(e);
        match self.client.head_request(self.peer, request).await {
            Ok(HeadResponse::Tensor(t)) => t.decode(&Limits::default()).map_err(|e| remote(e.to_string())),
            Ok(HeadResponse::Error(e)) => Err(remote(e.to_string())),
            Err(e) => Err(remote(e.to_string())),
        }
    }

    async fn embed(&self, ids: &[Vec<u32>]) -> Result<HostTensor, ComputeError> {
        self.ask(HeadRequest::Embed {
            model: self.model.clone(),
            batch: ids.len() as u32,
            token_ids: ids.concat(),
            reply_dtype: WireDtype::F32,
        })
        .await
    }

    async fn tail_logits(&self, hidden: &HostTensor, n: usize) -> Result<HostTensor, ComputeError> {
        let [b, t, h] = tail_shape(hidden, n)?;
        // Only the last positions' logits are needed: send just those.
        let mut last = Vec::with_capacity(b * n * h);
        for row in 0..b {
            last.extend_from_slice(&hidden.data[(row * t + t - n) * h..(row * t + t) * h]);
        }
        let hidden = WireTensor::encode(&HostTensor::new(vec![b, n, h], last), WireDtype::F32);
        let mut logits = self
            .ask(HeadRequest::Logits {
                model: self.model.clone(),
                hidden,
            })
            .await?;
        let v = logits.data.len() / (b * n).max(1);
        logits.shape = vec![b, n, v];
        Ok(logits)
    }
}

impl ClientModel {
    /// Loads onto WebGPU when `prefer_gpu` and the browser offers an adapter, else the CPU.
    pub async fn load(bundle: &ClientBundle, prefer_gpu: bool) -> Result<(Self, Device), ComputeError> {
        let gpu = if prefer_gpu {
            webgpu_adapter().await
        } else {
            Err("CPU requested in the page URL (device=cpu)".to_string())
        };
        match gpu {
            Ok(adapter) => {
                let device = WgpuDevice::default();
                let setup = init_setup_async::<WebGpu>(&device, RuntimeOptions::default()).await;
                let info = setup.adapter.get_info();
                let name = if info.name.is_empty() {
                    adapter
                } else {
                    format!("{adapter} ({})", info.name)
                };
                let parts = Parts::load(bundle, &device)?;
                Ok((ClientModel::Gpu(parts, device), Device::WebGpu { adapter: name }))
            }
            Err(reason) => {
                let parts = Parts::load(bundle, &Default::default())?;
                Ok((ClientModel::Cpu(parts), Device::Cpu { reason }))
            }
        }
    }

    pub async fn embed(&self, ids: &[Vec<u32>]) -> Result<HostTensor, ComputeError> {
        match self {
            ClientModel::Gpu(p, _) => p.embed(ids).await,
            ClientModel::Cpu(p) => p.embed(ids).await,
            ClientModel::Remote(r) => r.embed(ids).await,
        }
    }

    /// [`Self::embed`] with a tuned input prompt (the first step of a tuned chat).
    pub async fn embed_prompted(&self, ids: &[Vec<u32>], prompt: &HostTensor) -> Result<HostTensor, ComputeError> {
        match self {
            ClientModel::Gpu(p, device) => p.embed_prompted(ids, prompt, device).await,
            ClientModel::Cpu(p) => p.embed_prompted(ids, prompt, &Default::default()).await,
            ClientModel::Remote(_) => Err(ComputeError::Remote(
                "tuned prompts need the embeddings on this page, not a server's head service".into(),
            )),
        }
    }

    /// The logits of the last `n` positions (speculative decoding checks a draft's).
    ///
    /// # Shapes
    /// - `hidden`: `[rows, seq, hidden]`; returns `[rows, n, vocab]` (`1 <= n <= seq`)
    pub async fn tail_logits(&self, hidden: &HostTensor, n: usize) -> Result<HostTensor, ComputeError> {
        match self {
            ClientModel::Gpu(p, device) => p.tail_logits(hidden, n, device).await,
            ClientModel::Cpu(p) => p.tail_logits(hidden, n, &Default::default()).await,
            ClientModel::Remote(r) => r.tail_logits(hidden, n).await,
        }
    }
}

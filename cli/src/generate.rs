use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result, bail};
use burn::prelude::Backend;
use burn::prelude::{Tensor, TensorData};
use shared_model::generate::{GenerateParams, LocalBlocks, generate_drafted};
use shared_model::layers::lora::LoraAdapter;
use shared_model::loader::ModelFiles;
use shared_model::sampling::SamplingParams;
use shared_model::speculative::{Drafter, Gated, ModelDrafter, PromptLookup};
use shared_model::tokenizer::ChatMessage;
use shared_model::tuning::Prompts;
use std::path::Path;

use crate::args::GenerateArgs;
use crate::backend::{OnBackend, dispatch};

pub fn run(args: GenerateArgs) -> Result<()> {
    // A fingerprint joins the swarm first: the model's client part comes from its servers.
    let (mut files, joined) = match model_fingerprint(&args)? {
        Some(model) => {
            let (runtime, client) = crate::remote::connect(&args.initial_peers, args.swarm_key.as_deref())?;
            let cache = crate::fetch::cache_dir(args.cache_dir.clone());
            let files = crate::bundle::fetch(runtime.handle(), &client, &model, &cache)?;
            let joined = crate::remote::Joined {
                runtime,
                client,
                model_name: model.clone(),
                model,
            };
            (files, Some(joined))
        }
        None => {
            let files = crate::fetch::open_model(&args.model, args.cache_dir.clone())?;
            (files, None)
        }
    };
    args.quant.apply(&mut files);
    let prompt_ids = prompt_ids(&files, &args)?;
    check_prompt(&files, &prompt_ids, args.max_new_tokens)?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
    };
    sampling.validate()?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids: files.stop_ids.clone(),
        ignore_eos: args.ignore_eos,
        speculative: usize::from(args.speculative),
    };
    let backend = args.backend;
    let prompts = match &args.prompts {
        Some(path) => {
            let p = Prompts::load(path)?;
            p.check(files.config.hidden_size, files.config.num_layers)?;
            check_prompt(&files, &prompt_ids, args.max_new_tokens + p.prefix_len())?;
            Some(p)
        }
        None => None,
    };
    if !args.initial_peers.is_empty() {
        let joined = match joined {
            Some(joined) => joined,
            None => crate::remote::Joined::for_checkpoint(&files, &args.initial_peers, args.swarm_key.as_deref())?,
        };
        return crate::remote::run(&files, &args, prompt_ids, params, prompts, joined);
    }
    // Locally there is no server to name an adapter: `--adapter` is its folder.
    let adapter = match &args.adapter {
        Some(dir) => Some(
            LoraAdapter::load(Path::new(dir), &files.config, 0..files.config.num_layers)
                .with_context(|| format!("cannot load adapter {dir} (locally, --adapter is the adapter's folder)"))?,
        ),
        None => None,
    };
    dispatch(
        backend,
        Job {
            files: &files,
            args: &args,
            prompt_ids,
            params,
            prompts,
            adapter,
        },
    )
}

/// The fingerprint `--model` names, if it names one rather than a checkpoint: a path that
/// does not exist and is spelled as a fingerprint (with --initial-peers, which it needs).
fn model_fingerprint(args: &GenerateArgs) -> Result<Option<String>> {
    let text = args.model.to_string_lossy();
    if args.model.exists() || !crate::bundle::is_fingerprint(&text) {
        return Ok(None);
    }
    if args.initial_peers.is_empty() {
        bail!(
            "--model {text} is a model fingerprint and there is no such file: give --initial-peers to get the model from its servers"
        );
    }
    Ok(Some(text.into_owned()))
}

/// The input prompt as a `[prefix_len, hidden]` tensor.
pub fn upload_prompt<B: Backend>(prompts: &Prompts, device: &B::Device) -> Tensor<B, 2> {
    let p = &prompts.prompt;
    Tensor::from_data(TensorData::new(p.data.clone(), [p.shape[0], p.shape[1]]), device)
}

/// The prompt as token ids: encoded text (optionally through the chat template) or given ids.
pub fn prompt_ids(files: &ModelFiles, args: &GenerateArgs) -> Result<Vec<u32>> {
    match (&args.input.prompt, &args.input.token_ids) {
        (Some(text), _) => {
            let tokenizer = files
                .tokenizer
                .as_ref()
                .context("this model has no tokenizer (no tokenizer.json); pass --token-ids instead of --prompt")?;
            let text = if args.chat {
                let template = files
                    .chat_template
                    .as_ref()
                    .context("this model has no chat template; drop --chat")?;
                template.render(&[ChatMessage::user(text.as_str())], true)?
            } else {
                text.clone()
            };
            Ok(tokenizer.encode(&text)?)
        }
        (None, Some(ids)) => {
            if args.chat {
                bail!("--chat needs --prompt (the template applies to text)");
            }
            Ok(ids.clone())
        }
        (None, None) => bail!("give --prompt or --token-ids"),
    }
}

/// Refuses prompts the model cannot take, before any weights are loaded.
pub fn check_prompt(files: &ModelFiles, ids: &[u32], max_new_tokens: usize) -> Result<()> {
    let vocab = files.config.vocab_size;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!(
            "token id {id} is out of range: the vocabulary has {vocab} tokens (0..{})",
            vocab - 1
        );
    }
    if let Some(context) = files.config.max_position_embeddings {
        if ids.len() > context {
            bail!(
                "the prompt has {} tokens, longer than the model's context of {context}",
                ids.len()
            );
        }
        if ids.len() + max_new_tokens > context {
            bail!(
                "the prompt ({} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's context of {context}",
                ids.len()
            );
        }
    }
    Ok(())
}

/// `--json` output; field order is part of the contract's look.
#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    prompt_ids: &'a [u32],
    /// Only the new tokens, the stop token included.
    token_ids: &'a [u32],
    text: &'a str,
    timing: Timing,
    /// Spot checks of the servers' outputs (remote runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<swarm::remote::verify::VerifyReport>,
}

/// When the tokens came, measured from the start of generation (weights already loaded,
/// the swarm already joined).
#[derive(serde::Serialize)]
struct Timing {
    /// Until the first new token (the prompt's prefill, through the servers if remote).
    first_token_ms: f64,
    /// Mean time per token after the first (decode).
    ms_per_token: Option<f64>,
    /// Each token's time since the previous one (the first: since the start).
    token_ms: Vec<f64>,
    /// Speculative decoding (`--speculative`): mean draft tokens accepted per decode step
    /// (0 without speculation).
    accepted_per_step: f64,
    /// Accepted draft tokens over those proposed (`None` when none were proposed).
    acceptance_rate: Option<f64>,
    /// Steps through the blocks after the prompt's.
    decode_steps: usize,
}

impl Timing {
    fn new(start: std::time::Instant, stamps: &[std::time::Instant], drafts: &DraftCount) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let mut last = start;
        let token_ms = stamps
            .iter()
            .map(|&t| {
                let d = ms(t.saturating_duration_since(last));
                last = t;
                d
            })
            .collect();
        Self {
            first_token_ms: stamps.first().map_or(0.0, |&t| ms(t.saturating_duration_since(start))),
            ms_per_token: match (stamps.first(), stamps.last()) {
                (Some(&a), Some(&b)) if stamps.len() > 1 => {
                    Some(ms(b.saturating_duration_since(a)) / (stamps.len() - 1) as f64)
                }
                _ => None,
            },
            token_ms,
            accepted_per_step: if drafts.steps == 0 {
                0.0
            } else {
                drafts.accepted as f64 / drafts.steps as f64
            },
            acceptance_rate: (drafts.proposed > 0).then(|| drafts.accepted as f64 / drafts.proposed as f64),
            decode_steps: drafts.steps,
        }
    }
}

/// Row 0's speculative decoding, counted from its token events.
#[derive(Default)]
struct DraftCount {
    /// Decode steps (the prompt's excluded).
    steps: usize,
    proposed: usize,
    accepted: usize,
    last_step: Option<usize>,
}

impl DraftCount {
    fn add(&mut self, event: &shared_model::generate::TokenEvent) {
        if self.last_step != Some(event.step) {
            self.last_step = Some(event.step);
            if event.step > 0 {
                self.steps += 1;
                self.proposed += event.proposed;
            }
        }
        self.accepted += usize::from(event.drafted);
    }
}

struct Job<'a> {
    files: &'a ModelFiles,
    args: &'a GenerateArgs,
    prompt_ids: Vec<u32>,
    params: GenerateParams,
    prompts: Option<Prompts>,
    adapter: Option<LoraAdapter>,
}

impl OnBackend for Job<'_> {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        self.args.dtype.precision().apply::<B>(&device)?;
        let model = crate::fetch::load_local::<B>(self.files, &device)?;
        let mut blocks = LocalBlocks::new(&model.spans)?;
        if let Some(deep) = self.prompts.as_ref().and_then(|p| p.deep.as_ref()) {
            let s = &deep.shape;
            blocks = blocks.with_deep_prompts(Tensor::from_data(
                TensorData::new(deep.data.clone(), [s[0], s[1], s[2]]),
                &device,
            ));
        }
        if let Some(adapter) = &self.adapter {
            blocks = blocks.with_lora(adapter)?;
        }
        let prefix = self.prompts.as_ref().map(|p| upload_prompt::<B>(p, &device));
        let mut drafter = drafter::<B>(self.files, self.args, &self.params, self.prompt_ids.len(), &device)?;
        emit(
            self.files,
            self.args,
            &self.prompt_ids,
            &self.params,
            None,
            |params, on_token| {
                Ok(generate_drafted(
                    &model.embeddings,
                    &model.head,
                    &mut blocks,
                    std::slice::from_ref(&self.prompt_ids),
                    prefix.as_ref(),
                    params,
                    drafter.as_mut(),
                    on_token,
                )?)
            },
        )
    }
}

/// The drafts' source for `--speculative`: `--draft`'s model on `device`, else prompt lookup.
pub fn drafter<B: Backend>(
    files: &ModelFiles,
    args: &GenerateArgs,
    params: &GenerateParams,
    prompt_len: usize,
    device: &B::Device,
) -> Result<Box<dyn Drafter>> {
    let drafter = own_drafter::<B>(files, args, params, prompt_len, device)?;
    Ok(if args.adaptive_drafts {
        Box::new(Gated::new(drafter))
    } else {
        drafter
    })
}

/// Prompt lookup, or the `--draft` model.
fn own_drafter<B: Backend>(
    files: &ModelFiles,
    args: &GenerateArgs,
    params: &GenerateParams,
    prompt_len: usize,
    device: &B::Device,
) -> Result<Box<dyn Drafter>> {
    let Some(path) = args.draft.as_ref().filter(|_| params.speculative > 0) else {
        return Ok(Box::new(PromptLookup::default()));
    };
    let mut draft_files = crate::fetch::open_model(path, args.cache_dir.clone())
        .with_context(|| format!("cannot open the draft model {}", path.display()))?;
    args.quant.apply(&mut draft_files);
    let (ours, theirs) = (files.config.vocab_size, draft_files.config.vocab_size);
    if ours != theirs {
        bail!(
            "the draft model {} has a vocabulary of {theirs} tokens, the model {ours}: a draft model must share the tokenizer",
            path.display()
        );
    }
    let model = crate::fetch::load_local::<B>(&draft_files, device).context("cannot load the draft model")?;
    let max_len = prompt_len + params.max_new_tokens + params.speculative;
    Ok(Box::new(ModelDrafter::new(model, &params.sampling, max_len)?))
}

/// Runs `generate` and prints its tokens: streamed text, or one JSON object at the end.
pub fn emit(
    files: &ModelFiles,
    args: &GenerateArgs,
    prompt_ids: &[u32],
    params: &GenerateParams,
    verify: Option<std::sync::Arc<std::sync::Mutex<swarm::remote::verify::VerifyReport>>>,
    generate: impl FnOnce(
        &GenerateParams,
        &mut dyn FnMut(shared_model::generate::TokenEvent) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<u32>>>,
) -> Result<()> {
    {
        let tokenizer = files.tokenizer.as_ref();
        let mut stream = tokenizer.map(|t| t.stream(true));
        let mut text = String::new();
        let mut stdout = std::io::stdout().lock();
        let stops = &args.stop;
        let json = args.json;
        let mut write_error = None;
        let start = std::time::Instant::now();
        let mut stamps = Vec::new();
        let mut drafts = DraftCount::default();
        let out = generate(params, &mut |event| {
            if event.row == 0 {
                stamps.push(std::time::Instant::now());
                drafts.add(&event);
            }
            let piece = match stream.as_mut() {
                Some(s) => s.push(event.token).unwrap_or_default(),
                None => format!("{} ", event.token),
            };
            text.push_str(&piece);
            if !json && let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush()) {
                write_error = Some(e);
                return ControlFlow::Break(());
            }
            if stops.iter().any(|s| text.contains(s.as_str())) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = write_error {
            return Err(e).context("cannot write to stdout");
        }
        let token_ids = out.into_iter().next().unwrap_or_default();
        if json {
            let text = match tokenizer {
                Some(t) => t.decode(&token_ids, false)?,
                None => String::new(),
            };
            let object = JsonOutput {
                prompt_ids,
                token_ids: &token_ids,
                text: &text,
                timing: Timing::new(start, &stamps, &drafts),
                verify: verify.map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            };
            writeln!(stdout, "{}", serde_json::to_string(&object)?)?;
        } else {
            if let Some(s) = stream.as_mut() {
                stdout.write_all(s.finish()?.as_bytes())?;
            }
            writeln!(stdout)?;
        }
        Ok(())
    }
}

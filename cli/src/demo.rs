use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::{Context, Result, bail};
use shared_model::Cpu;
use shared_model::generate::{GenerateParams, LocalBlocks, generate};
use shared_model::loader::{LocalModel, ModelFiles};
use shared_model::sampling::SamplingParams;
use shared_model::tokenizer::ChatMessage;

use crate::args::DemoArgs;
use crate::fetch;

/// `corolla demo`: a local swarm serving the chat page, or (`--terminal`, `--prompt`) a chat
/// in the terminal.
pub fn run(args: DemoArgs) -> Result<()> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => fetch::ensure_smollm2(&fetch::cache_dir(args.fetch.cache_dir.clone()))?,
    };
    if args.terminal || args.prompt.is_some() {
        terminal(args, path)
    } else {
        crate::demo_swarm::run(&args, &path)
    }
}

/// Chats in the terminal, the whole conversation going through the chat template each turn.
fn terminal(args: DemoArgs, path: std::path::PathBuf) -> Result<()> {
    let files = ModelFiles::open(&path).with_context(|| format!("cannot open model {}", path.display()))?;
    let tokenizer = files
        .tokenizer
        .as_ref()
        .context("the demo needs a model with a tokenizer")?;
    let template = files
        .chat_template
        .as_ref()
        .context("the demo needs a model with a chat template")?;
    let device = Default::default();
    let model = LocalModel::<Cpu>::load(&files, &device).context("cannot load the model")?;
    let context = files.config.max_position_embeddings.unwrap_or(usize::MAX);

    let mut messages: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let interactive = args.prompt.is_none();
    if interactive {
        eprintln!(
            "Corolla demo: {} on the CPU. Type a message; an empty line or Ctrl-D quits.",
            path.display()
        );
    }
    let mut turn = 0u64;
    loop {
        let user = match &args.prompt {
            Some(p) if turn == 0 => p.clone(),
            Some(_) => return Ok(()),
            None => {
                eprint!("> ");
                std::io::stderr().flush()?;
                match lines.next() {
                    Some(line) => line?,
                    None => return Ok(()),
                }
            }
        };
        if user.trim().is_empty() {
            return Ok(());
        }
        messages.push(ChatMessage::user(user));
        let ids = tokenizer.encode(&template.render(&messages, true)?)?;
        if ids.len() >= context {
            bail!(
                "the conversation ({} tokens) no longer fits the model's context of {context}",
                ids.len()
            );
        }
        let params = GenerateParams {
            max_new_tokens: args.max_new_tokens.min(context - ids.len()),
            sampling: SamplingParams {
                temperature: args.temperature,
                top_k: None,
                top_p: Some(args.top_p),
                repetition_penalty: 1.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                seed: args.seed.wrapping_add(turn),
            },
            stop_ids: files.stop_ids.clone(),
            ignore_eos: false,
            speculative: 0,
        };
        let mut stream = tokenizer.stream(true);
        let mut stdout = std::io::stdout().lock();
        let mut blocks = LocalBlocks::new(&model.spans)?;
        let out = generate(&model.embeddings, &model.head, &mut blocks, &[ids], &params, |event| {
            let piece = stream.push(event.token).unwrap_or_default();
            match stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush()) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        })?;
        stdout.write_all(stream.finish()?.as_bytes())?;
        writeln!(stdout)?;
        let reply = tokenizer.decode(&out[0], true)?;
        messages.push(ChatMessage::assistant(reply.trim().to_string()));
        turn += 1;
    }
}

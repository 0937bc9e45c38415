//! The page: a chat view with the swarm beside it, and a Tune view that trains prompts.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use leptos::prelude::*;
use leptos::task::spawn_local;
use send_wrapper::SendWrapper;
use shared_model::bundle::ClientBundle;
use shared_model::tokenizer::ChatMessage;
use swarm::dht::ModelListing;
use swarm::node::Client;

use shared_model::tuning::dataset::{DatasetLimits, parse_jsonl};
use shared_model::tuning::{TrainState, TuningMethod};
use wasm_bindgen::JsCast;

use crate::bundle;
use crate::client::{self, Chat, Loaded, RouteHop, Settings, Stats};
use crate::compute::{ClientModel, Device, RemoteHead};
use crate::fetch::Origin;
use crate::params::PageParams;
use crate::plot::LossPlot;
use crate::tune::{self, TuneSettings};

/// One message of the conversation; its fields are signals so a streaming reply re-renders
/// only itself.
#[derive(Clone, Copy)]
struct Message {
    id: usize,
    role: &'static str,
    text: RwSignal<String>,
    tokens: RwSignal<String>,
    done: RwSignal<bool>,
    error: RwSignal<bool>,
}

/// What the page keeps outside signals (not `Send`: it lives on the page's one thread).
#[derive(Default)]
struct State {
    client: RefCell<Option<Client>>,
    loaded: RefCell<Option<Rc<Loaded>>>,
    chat: RefCell<Option<Chat>>,
    history: RefCell<Vec<ChatMessage>>,
    stop: Rc<Cell<bool>>,
    turn: Cell<u64>,
    /// The last Tune run's result.
    tuned: RefCell<Option<TrainState>>,
    tune_stop: Rc<Cell<bool>>,
}

#[derive(Clone, Copy)]
struct Ui {
    status: RwSignal<String>,
    progress: RwSignal<Option<(f64, f64)>>,
    device: RwSignal<String>,
    models: RwSignal<Vec<ModelListing>>,
    model: RwSignal<Option<String>>,
    ready: RwSignal<bool>,
    busy: RwSignal<bool>,
    messages: RwSignal<Vec<Message>>,
    input: RwSignal<String>,
    temperature: RwSignal<f32>,
    top_p: RwSignal<f32>,
    max_tokens: RwSignal<usize>,
    /// Speculative decoding's draft length (the URL's `speculative=`).
    speculative: RwSignal<usize>,
    route: RwSignal<Vec<RouteHop>>,
    /// The spot checks of servers' answers (`swarm::remote::verify`).
    verify: RwSignal<swarm::remote::verify::VerifyReport>,
    stats: RwSignal<Stats>,
    servers: RwSignal<usize>,
    tune_view: RwSignal<bool>,
    /// The Monitor view is shown (over either of the others).
    monitor_view: RwSignal<bool>,
    /// Whether the chat runs with the tuned prompts.
    use_tuned: RwSignal<bool>,
    tune: TuneUi,
}

/// The Tune view's inputs and live results.
#[derive(Clone, Copy)]
struct TuneUi {
    data: RwSignal<String>,
    method: RwSignal<TuningMethod>,
    prefix_len: RwSignal<usize>,
    steps: RwSignal<usize>,
    lr: RwSignal<f32>,
    batch_size: RwSignal<usize>,
    seed: RwSignal<u64>,
    losses: RwSignal<Vec<f32>>,
    total: RwSignal<usize>,
    status: RwSignal<String>,
    busy: RwSignal<bool>,
    /// `idle`, `training`, `done` or `error` (for tests and styling).
    phase: RwSignal<&'static str>,
    /// Steps of the prompts ready to chat with or download (0: none).
    trained: RwSignal<usize>,
}

fn location_search() -> String {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .unwrap_or_default()
}

fn location_hash() -> String {
    web_sys::window()
        .and_then(|w| w.location().hash().ok())
        .unwrap_or_default()
}

#[component]
pub fn App() -> impl IntoView {
    let params = PageParams::parse(&location_search()).with_fragment(&location_hash());
    let ui = Ui {
        status: RwSignal::new("Starting…".to_string()),
        progress: RwSignal::new(None),
        device: RwSignal::new("not chosen yet".to_string()),
        models: RwSignal::new(Vec::new()),
        model: RwSignal::new(None),
        ready: RwSignal::new(false),
        busy: RwSignal::new(false),
        messages: RwSignal::new(Vec::new()),
        input: RwSignal::new(params.prompt.clone().unwrap_or_default()),
        temperature: RwSignal::new(params.temperature.unwrap_or(0.7)),
        top_p: RwSignal::new(params.top_p.unwrap_or(0.9)),
        max_tokens: RwSignal::new(params.max_tokens.unwrap_or(256)),
        speculative: RwSignal::new(params.speculative.unwrap_or(crate::params::DEFAULT_SPECULATIVE)),
        route: RwSignal::new(Vec::new()),
        verify: RwSignal::new(Default::default()),
        stats: RwSignal::new(Stats::default()),
        servers: RwSignal::new(0),
        tune_view: RwSignal::new(params.tune),
        monitor_view: RwSignal::new(params.monitor),
        use_tuned: RwSignal::new(false),
        tune: TuneUi {
            data: RwSignal::new(String::new()),
            method: RwSignal::new(TuningMethod::Prompt),
            prefix_len: RwSignal::new(8),
            steps: RwSignal::new(20),
            lr: RwSignal::new(0.05),
            batch_size: RwSignal::new(4),
            seed: RwSignal::new(0),
            losses: RwSignal::new(Vec::new()),
            total: RwSignal::new(20),
            status: RwSignal::new("Paste or upload a JSONL dataset, then press Train.".into()),
            busy: RwSignal::new(false),
            phase: RwSignal::new("idle"),
            trained: RwSignal::new(0),
        },
    };
    let state = SendWrapper::new(Rc::new(State::default()));

    // The swarm connection and the model load once, when the chat or Tune view first shows
    // (the Monitor view alone needs neither).
    let started = Rc::new(Cell::new(false));
    let ensure_started = {
        let state = state.clone();
        let params = params.clone();
        SendWrapper::new(Rc::new(move || {
            if started.replace(true) {
                return;
            }
            let state = state.clone();
            let params = params.clone();
            spawn_local(async move {
                if let Err(e) = start(ui, state.clone(), &params).await {
                    ui.status.set(format!("Error: {e}"));
                    return;
                }
                if params.send && !ui.input.get_untracked().trim().is_empty() {
                    send(ui, state);
                }
            });
        }))
    };
    if params.monitor {
        ui.status.set("Monitor: open Chat or Tune to load a model.".to_string());
    } else {
        ensure_started();
    }
    let show = {
        let ensure_started = ensure_started.clone();
        move |tune: bool, monitor: bool| {
            ui.tune_view.set(tune);
            ui.monitor_view.set(monitor);
            if !monitor {
                ensure_started();
            }
        }
    };
    let (show_chat, show_tune, show_monitor) = (show.clone(), show.clone(), show);

    let on_send = {
        let state = state.clone();
        move |_| send(ui, state.clone())
    };
    let on_stop = {
        let state = state.clone();
        move |_| state.stop.set(true)
    };
    let on_new_chat = {
        let state = state.clone();
        move |_| new_chat(ui, &state)
    };
    let on_use_tuned = {
        let state = state.clone();
        move |ev: leptos::ev::Event| {
            let on = event_target_checked(&ev);
            ui.use_tuned.set(on);
            new_chat(ui, &state);
        }
    };
    let on_pick = {
        let state = state.clone();
        move |ev: leptos::ev::Event| {
            let fp = event_target_value(&ev);
            let state = state.clone();
            spawn_local(async move {
                if let Err(e) = load_model(ui, &state, &fp, false, false).await {
                    ui.status.set(format!("Error: {e}"));
                }
            });
        }
    };
    view! {
        <header>
            <h1>"Corolla"</h1>
            <label>
                "Model "
                <select data-testid="model-picker" on:change=on_pick prop:disabled=move || ui.busy.get()>
                    <For each=move || ui.models.get() key=|m| m.fingerprint.clone() let:m>
                        <option value=m.fingerprint.clone() selected=move || ui.model.get().as_deref() == Some(m.fingerprint.as_str())>
                            {format!("{} ({} server{})", m.name, m.servers, if m.servers == 1 { "" } else { "s" })}
                        </option>
                    </For>
                </select>
            </label>
            <span class="device">"Compute: " <span data-testid="compute-device">{move || ui.device.get()}</span></span>
            <nav>
                <button data-testid="tab-chat" type="button"
                    class:active=move || !ui.tune_view.get() && !ui.monitor_view.get()
                    on:click=move |_| show_chat(false, false)>"Chat"</button>
                <button data-testid="tab-tune" type="button"
                    class:active=move || ui.tune_view.get() && !ui.monitor_view.get()
                    on:click=move |_| show_tune(true, false)>"Tune"</button>
                <button data-testid="tab-monitor" type="button" class:active=move || ui.monitor_view.get()
                    on:click=move |_| show_monitor(false, true)>"Monitor"</button>
            </nav>
        </header>
        <div class="status" data-testid="status">{move || ui.status.get()}</div>
        <Show when=move || ui.progress.get().is_some()>
            <progress data-testid="progress"
                max=move || ui.progress.get().map_or(1.0, |p| p.1)
                value=move || ui.progress.get().map_or(0.0, |p| p.0)></progress>
        </Show>
        {tune_view(ui, state.clone())}
        {crate::monitor::monitor_view(ui.monitor_view)}
        <main class:hidden=move || ui.tune_view.get() || ui.monitor_view.get()>
            <section class="chat">
                <div class="messages">
                    <For each=move || ui.messages.get() key=|m| m.id let:m>
                        {message_view(m)}
                    </For>
                </div>
                <form on:submit=move |ev: leptos::ev::SubmitEvent| ev.prevent_default()>
                    <textarea data-testid="prompt-input" rows="3" placeholder="Ask something…"
                        prop:value=move || ui.input.get()
                        on:input=move |ev| ui.input.set(event_target_value(&ev))></textarea>
                    <div class="controls">
                        <button data-testid="send" type="button" on:click=on_send
                            prop:disabled=move || !ui.ready.get() || ui.busy.get()>"Send"</button>
                        <button data-testid="stop" type="button" on:click=on_stop
                            prop:disabled=move || !ui.busy.get()>"Stop"</button>
                        <button data-testid="new-chat" type="button" on:click=on_new_chat>"New chat"</button>
                        <label title="Run this conversation with the prompts trained in the Tune view">
                            <input type="checkbox" data-testid="use-tuned"
                                prop:checked=move || ui.use_tuned.get()
                                prop:disabled=move || ui.tune.trained.get() == 0 || ui.busy.get()
                                on:change=on_use_tuned />
                            {move || match ui.tune.trained.get() {
                                0 => " Tuned prompts (train some in Tune)".to_string(),
                                n => format!(" Tuned prompts ({n} steps)"),
                            }}
                        </label>
                        <label>"Temperature "
                            <input type="number" min="0" max="2" step="0.1" data-testid="temperature"
                                prop:value=move || ui.temperature.get().to_string()
                                on:change=move |ev| set_number(&ev, ui.temperature, |t: f32| t >= 0.0) />
                        </label>
                        <label>"Top-p "
                            <input type="number" min="0.05" max="1" step="0.05" data-testid="top-p"
                                prop:value=move || ui.top_p.get().to_string()
                                on:change=move |ev| set_number(&ev, ui.top_p, |p: f32| p > 0.0 && p <= 1.0) />
                        </label>
                        <label>"Max tokens "
                            <input type="number" min="1" max="4096" step="1" data-testid="max-tokens"
                                prop:value=move || ui.max_tokens.get().to_string()
                                on:change=move |ev| set_number(&ev, ui.max_tokens, |n: usize| n > 0) />
                        </label>
                    </div>
                </form>
            </section>
            <aside class="swarm" data-testid="swarm-view">
                <h2>"Swarm"</h2>
                <p>{move || format!("{} server(s) of this model", ui.servers.get())}</p>
                <table data-testid="route">
                    <thead><tr><th>"Server"</th><th>"Blocks"</th><th>"RTT"</th></tr></thead>
                    <tbody>
                        <For each=move || ui.route.get() key=|h| (h.peer.clone(), h.start, h.end) let:h>
                            <tr>
                                <td>{h.peer.clone()}</td>
                                <td>{format!("{}–{}", h.start, h.end)}</td>
                                <td>{h.rtt_ms.map_or("–".to_string(), |r| format!("{r:.1} ms"))}</td>
                            </tr>
                        </For>
                    </tbody>
                </table>
                <dl data-testid="stats">
                    <dt>"Time to first token"</dt><dd data-testid="ttft">{move || format!("{:.0} ms", ui.stats.get().first_token_ms)}</dd>
                    <dt>"Last token"</dt><dd>{move || format!("{:.1} ms", ui.stats.get().last_token_ms)}</dd>
                    <dt>"Tokens/s"</dt><dd data-testid="tokens-per-s">{move || format!("{:.2}", ui.stats.get().tokens_per_s)}</dd>
                    <dt>"Tokens"</dt><dd>{move || format!("{} prompt + {} generated", ui.stats.get().prompt_tokens, ui.stats.get().tokens)}</dd>
                    <dt>"Speculation"</dt>
                    <dd data-testid="speculation" data-steps=move || ui.stats.get().decode_steps
                        data-drafted=move || ui.stats.get().drafted data-accepted=move || ui.stats.get().accepted>
                        {move || {
                            let s = ui.stats.get();
                            if ui.speculative.get() == 0 {
                                "off".to_string()
                            } else if s.drafted == 0 {
                                format!("up to {} drafts a step; none yet", ui.speculative.get())
                            } else {
                                format!(
                                    "{} of {} drafts kept ({:.1} tokens a step)",
                                    s.accepted,
                                    s.drafted,
                                    (s.tokens.saturating_sub(1)) as f64 / s.decode_steps.max(1) as f64
                                )
                            }
                        }}
                    </dd>
                    <dt>"Spot checks"</dt>
                    <dd data-testid="verify" data-checks=move || ui.verify.get().checks
                        data-mismatches=move || ui.verify.get().mismatches>
                        {move || {
                            let v = ui.verify.get();
                            let banned = if v.banned.is_empty() {
                                String::new()
                            } else {
                                format!("; banned {}", v.banned.iter().map(|p| client::short_peer_text(p)).collect::<Vec<_>>().join(", "))
                            };
                            format!("{} answers re-run elsewhere, {} disagreed{banned}", v.checks, v.mismatches)
                        }}
                    </dd>
                </dl>
            </aside>
        </main>
    }
}

/// Sets `signal` from a number input if the value parses and `valid` accepts it.
fn set_number<T>(ev: &leptos::ev::Event, signal: RwSignal<T>, valid: impl Fn(T) -> bool)
where
    T: std::str::FromStr + Copy + Send + Sync + 'static,
{
    if let Ok(v) = event_target_value(ev).parse::<T>()
        && valid(v)
    {
        signal.set(v);
    }
}

fn message_view(m: Message) -> impl IntoView {
    let testid = if m.role == "assistant" {
        "assistant-message"
    } else {
        "user-message"
    };
    view! {
        <div class=format!("message {}", m.role) data-testid=testid
            data-done=move || m.done.get().to_string()
            data-error=move || m.error.get().to_string()
            data-tokens=move || m.tokens.get()>
            <div class="role">{m.role}</div>
            <div class="text">{move || m.text.get()}</div>
        </div>
    }
}

async fn start(ui: Ui, state: SendWrapper<Rc<State>>, params: &PageParams) -> Result<(), client::ClientError> {
    ui.status.set("Connecting to the swarm through the relay…".into());
    let relays = client::bootstrap_addrs(&params.relays).await?;
    let client = client::start_node(relays, params.swarm_key.as_deref())?;
    *state.client.borrow_mut() = Some(client.clone());
    ui.status.set("Looking for models in the DHT…".into());
    // A private swarm's relay drops a page without its key, and its records stay sealed: say
    // so whichever way the lookup ends.
    let hint = if params.swarm_key.is_some() {
        " (or the swarm key in the page address is not this swarm's)"
    } else {
        " (a private swarm's page needs its key: #swarm_key=... in the address)"
    };
    let models = client::list_models(&client, Duration::from_secs(30))
        .await
        .map_err(|e| client::ClientError::Setup(format!("{e}{hint}")))?;
    if models.is_empty() {
        return Err(client::ClientError::Setup(format!(
            "no server announces any model yet{hint}"
        )));
    }
    ui.models.set(models.clone());
    let fp = params
        .model
        .clone()
        .filter(|m| models.iter().any(|l| &l.fingerprint == m))
        .unwrap_or_else(|| models[0].fingerprint.clone());
    load_model(ui, &state, &fp, params.force_cpu, params.remote_head).await
}

async fn load_model(
    ui: Ui,
    state: &SendWrapper<Rc<State>>,
    fingerprint: &str,
    force_cpu: bool,
    force_remote_head: bool,
) -> Result<(), client::ClientError> {
    ui.ready.set(false);
    ui.model.set(Some(fingerprint.to_string()));
    let client = state
        .client
        .borrow()
        .clone()
        .ok_or_else(|| client::ClientError::Setup("not connected".into()))?;
    ui.status.set("Finding the model's servers…".into());
    let servers = client::find_servers(&client, fingerprint).await?;
    ui.servers.set(servers.len());
    let remote_reason = |meta: &ClientBundle| {
        if force_remote_head {
            Some("requested in the page URL (head=remote)".to_string())
        } else {
            client::too_large(meta)
        }
    };
    let obtained = bundle::obtain(&servers, fingerprint, remote_reason, &ui).await;
    ui.progress.set(None);
    let obtained = obtained?;
    let origin = obtained.origin;
    let (bundle, model, device) = match obtained.remote_reason {
        Some(reason) => {
            ui.status
                .set("Asking a server to run the embeddings and LM head…".into());
            let peer = client::head_server(&client, &servers).await?;
            let model = ClientModel::Remote(RemoteHead {
                client: client.clone(),
                peer,
                model: fingerprint.to_string(),
            });
            let device = Device::Server {
                peer: client::short_peer(&peer),
                reason,
            };
            (obtained.bundle, model, device)
        }
        None => {
            ui.status.set("Preparing the model on this device…".into());
            let (model, device) = ClientModel::load(&obtained.bundle, !force_cpu).await?;
            (obtained.bundle, model, device)
        }
    };
    ui.device.set(device.label());
    let loaded = Rc::new(Loaded {
        bundle,
        model,
        fingerprint: fingerprint.to_string(),
    });
    if let Some(mut old) = state.chat.borrow_mut().take() {
        old.close();
    }
    // Prompts trained for another model do not fit this one.
    *state.tuned.borrow_mut() = None;
    ui.tune.trained.set(0);
    ui.use_tuned.set(false);
    *state.chat.borrow_mut() = Some(Chat::new(client, &loaded, None));
    *state.loaded.borrow_mut() = Some(loaded.clone());
    state.history.borrow_mut().clear();
    ui.messages.set(Vec::new());
    let from = match origin {
        Some(Origin::Cache) => "weights from the browser cache",
        Some(Origin::Network) => "weights downloaded",
        None => "embeddings and head on a server",
    };
    ui.status.set(format!("Ready: {} ({from})", loaded.bundle.name));
    ui.ready.set(true);
    Ok(())
}

impl bundle::Report for Ui {
    fn status(&self, text: &str) {
        self.status.set(text.to_string());
    }

    fn progress(&self, done: u64, total: Option<u64>) {
        self.progress
            .set(Some((done as f64, total.unwrap_or(done.max(1)) as f64)));
    }
}

fn send(ui: Ui, state: SendWrapper<Rc<State>>) {
    let text = ui.input.get_untracked().trim().to_string();
    if text.is_empty() || ui.busy.get_untracked() || !ui.ready.get_untracked() {
        return;
    }
    let Some(loaded) = state.loaded.borrow().clone() else {
        return;
    };
    let Some(mut chat) = state.chat.borrow_mut().take() else {
        return;
    };
    ui.busy.set(true);
    ui.input.set(String::new());
    state.stop.set(false);
    state.history.borrow_mut().push(ChatMessage::user(text.clone()));
    let next_id = ui.messages.with_untracked(Vec::len);
    let new_message = |id: usize, role: &'static str, text: String, done: bool| Message {
        id,
        role,
        text: RwSignal::new(text),
        tokens: RwSignal::new(String::new()),
        done: RwSignal::new(done),
        error: RwSignal::new(false),
    };
    let reply = new_message(next_id + 1, "assistant", String::new(), false);
    ui.messages.update(|m| {
        m.push(new_message(next_id, "user", text, true));
        m.push(reply);
    });
    let settings = Settings {
        temperature: ui.temperature.get_untracked(),
        top_p: ui.top_p.get_untracked(),
        max_tokens: ui.max_tokens.get_untracked(),
        speculative: ui.speculative.get_untracked(),
        seed: 0x5eed ^ state.turn.get(),
    };
    state.turn.set(state.turn.get() + 1);
    spawn_local(async move {
        let messages = state.history.borrow().clone();
        ui.status.set("Generating…".into());
        let result = chat
            .reply(
                &loaded,
                &messages,
                settings,
                state.stop.clone(),
                |tokens, text, stats| {
                    reply.text.set(text.to_string());
                    reply
                        .tokens
                        .set(tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
                    ui.stats.set(stats.clone());
                },
                |route| ui.route.set(route),
            )
            .await;
        ui.route.set(chat.route().await);
        ui.verify.set(chat.verify_report());
        match result {
            Ok((_, text)) => {
                state
                    .history
                    .borrow_mut()
                    .push(ChatMessage::assistant(text.trim().to_string()));
                ui.status.set(format!("Ready: {}", loaded.bundle.name));
            }
            Err(e) => {
                reply.error.set(true);
                state.history.borrow_mut().pop();
                ui.status.set(format!("Error: {e}"));
            }
        }
        reply.done.set(true);
        *state.chat.borrow_mut() = Some(chat);
        ui.busy.set(false);
    });
}

/// Starts a new conversation, with the tuned prompts if the user chose them.
fn new_chat(ui: Ui, state: &SendWrapper<Rc<State>>) {
    state.stop.set(true);
    let client = state.client.borrow().clone();
    let loaded = state.loaded.borrow().clone();
    let prompts = if ui.use_tuned.get_untracked() {
        state.tuned.borrow().as_ref().map(|t| t.prompts.clone())
    } else {
        None
    };
    let mut slot = state.chat.borrow_mut();
    if let Some(chat) = slot.as_mut() {
        chat.close();
        if let (Some(client), Some(loaded)) = (client, loaded) {
            *slot = Some(Chat::new(client, &loaded, prompts));
        }
    }
    drop(slot);
    state.history.borrow_mut().clear();
    ui.messages.set(Vec::new());
    ui.route.set(Vec::new());
    ui.stats.set(Stats::default());
}

fn tune_view(ui: Ui, state: SendWrapper<Rc<State>>) -> impl IntoView {
    let t = ui.tune;
    let on_train = {
        let state = state.clone();
        move |_| start_training(ui, state.clone())
    };
    let on_stop = {
        let state = state.clone();
        move |_| state.tune_stop.set(true)
    };
    let on_chat = {
        let state = state.clone();
        move |_| {
            ui.use_tuned.set(true);
            new_chat(ui, &state);
            ui.tune_view.set(false);
        }
    };
    let on_download = {
        let state = state.clone();
        move |_| {
            if let Err(e) = download(&state) {
                t.status.set(format!("Error: {e}"));
            }
        }
    };
    let on_file = move |ev: leptos::ev::Event| {
        let Some(input) = ev.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()) else {
            return;
        };
        let Some(file) = input.files().and_then(|f| f.get(0)) else {
            return;
        };
        spawn_local(async move {
            match wasm_bindgen_futures::JsFuture::from(file.text()).await {
                Ok(text) => {
                    t.data.set(text.as_string().unwrap_or_default());
                    t.status.set(format!("Loaded {}.", file.name()));
                }
                Err(e) => t.status.set(format!("Cannot read {}: {e:?}", file.name())),
            }
        });
    };
    let on_method = move |ev: leptos::ev::Event| {
        t.method.set(if event_target_value(&ev) == "deep-prompt" {
            TuningMethod::DeepPrompt
        } else {
            TuningMethod::Prompt
        })
    };
    view! {
        <section class="tune" class:hidden=move || !ui.tune_view.get() || ui.monitor_view.get() data-testid="tune-view">
            <div class="tune-form">
                <h2>"Prompt tuning"</h2>
                <p class="hint">
                    "One example a line: {\"text\": …}, {\"prompt\": …, \"completion\": …} (the loss covers the completion) "
                    "or {\"token_ids\": […]}. The servers' weights stay frozen: this page trains only the prompts, "
                    "with gradients sent back through the same servers."
                </p>
                <textarea data-testid="tune-data" rows="8" spellcheck="false"
                    placeholder="{\"prompt\": \"My favourite colour is\", \"completion\": \" turquoise\"}"
                    prop:value=move || t.data.get()
                    on:input=move |ev| t.data.set(event_target_value(&ev))></textarea>
                <label>"Or upload a file: "
                    <input type="file" accept=".jsonl,.json,.txt" data-testid="tune-file" on:change=on_file />
                </label>
                <div class="controls">
                    <label>"Method "
                        <select data-testid="tune-method" on:change=on_method prop:disabled=move || t.busy.get()>
                            <option value="prompt" selected=move || t.method.get() == TuningMethod::Prompt>"prompt"</option>
                            <option value="deep-prompt" selected=move || t.method.get() == TuningMethod::DeepPrompt>"deep prompt"</option>
                        </select>
                    </label>
                    <label>"Prefix "
                        <input type="number" min="1" max="256" step="1" data-testid="tune-prefix"
                            prop:value=move || t.prefix_len.get().to_string()
                            on:change=move |ev| set_number(&ev, t.prefix_len, |n: usize| (1..=256).contains(&n)) />
                    </label>
                    <label>"Steps "
                        <input type="number" min="1" max="10000" step="1" data-testid="tune-steps"
                            prop:value=move || t.steps.get().to_string()
                            on:change=move |ev| set_number(&ev, t.steps, |n: usize| (1..=10_000).contains(&n)) />
                    </label>
                    <label>"Learning rate "
                        <input type="number" min="0" max="10" step="0.001" data-testid="tune-lr"
                            prop:value=move || t.lr.get().to_string()
                            on:change=move |ev| set_number(&ev, t.lr, |x: f32| x.is_finite() && x > 0.0) />
                    </label>
                    <label>"Batch "
                        <input type="number" min="1" max="256" step="1" data-testid="tune-batch"
                            prop:value=move || t.batch_size.get().to_string()
                            on:change=move |ev| set_number(&ev, t.batch_size, |n: usize| (1..=256).contains(&n)) />
                    </label>
                    <label>"Seed "
                        <input type="number" min="0" step="1" data-testid="tune-seed"
                            prop:value=move || t.seed.get().to_string()
                            on:change=move |ev| set_number(&ev, t.seed, |_: u64| true) />
                    </label>
                </div>
                <div class="controls">
                    <button data-testid="tune-start" type="button" on:click=on_train
                        prop:disabled=move || !ui.ready.get() || t.busy.get()>"Train"</button>
                    <button data-testid="tune-stop" type="button" on:click=on_stop
                        prop:disabled=move || !t.busy.get()>"Stop"</button>
                    <button data-testid="tune-chat" type="button" on:click=on_chat
                        prop:disabled=move || t.trained.get() == 0 || t.busy.get() || ui.busy.get()>"Chat with these prompts"</button>
                    <button data-testid="tune-download" type="button" on:click=on_download
                        prop:disabled=move || t.trained.get() == 0 || t.busy.get()>"Download prompts"</button>
                </div>
            </div>
            <div class="tune-progress" data-testid="tune-progress"
                data-phase=move || t.phase.get()
                data-losses={move || losses_text(&t.losses.get())}>
                <div class="status" data-testid="tune-status">{move || t.status.get()}</div>
                <LossPlot losses=t.losses total=t.total />
            </div>
        </section>
    }
}

/// The losses as `data-losses` carries them (comma-separated, full precision).
fn losses_text(losses: &[f32]) -> String {
    losses.iter().map(f32::to_string).collect::<Vec<_>>().join(",")
}

fn start_training(ui: Ui, state: SendWrapper<Rc<State>>) {
    let t = ui.tune;
    if t.busy.get_untracked() {
        return;
    }
    let fail = move |message: String| {
        t.status.set(message);
        t.phase.set("error");
    };
    let client = state.client.borrow().clone();
    let loaded = state.loaded.borrow().clone();
    let (Some(client), Some(loaded)) = (client, loaded) else {
        return fail("No model is loaded yet.".into());
    };
    let settings = TuneSettings {
        method: t.method.get_untracked(),
        prefix_len: t.prefix_len.get_untracked(),
        steps: t.steps.get_untracked(),
        lr: t.lr.get_untracked(),
        batch_size: t.batch_size.get_untracked(),
        seed: t.seed.get_untracked(),
    };
    if let Err(e) = settings.check() {
        return fail(format!("Error: {e}"));
    }
    let cfg = &loaded.bundle.config;
    let limits = DatasetLimits {
        vocab_size: cfg.vocab_size,
        context: cfg.max_position_embeddings,
        prefix_len: settings.prefix_len,
    };
    let examples = match parse_jsonl(&t.data.get_untracked(), loaded.bundle.tokenizer.as_ref(), limits) {
        Ok(examples) => examples,
        Err(e) => return fail(format!("Dataset: {e}")),
    };
    t.busy.set(true);
    t.phase.set("training");
    t.losses.set(Vec::new());
    t.total.set(settings.steps);
    state.tune_stop.set(false);
    t.status.set(format!(
        "Training {} on {} example(s) through the swarm…",
        settings.method.name(),
        examples.len()
    ));
    spawn_local(async move {
        let result = tune::train(
            client,
            &loaded,
            &examples,
            settings,
            state.tune_stop.clone(),
            |report| {
                t.losses.update(|l| l.push(report.record.loss));
                t.status.set(format!(
                    "Step {}/{}: loss {:.4}, {:.0} tokens/s",
                    report.step + 1,
                    settings.steps,
                    report.record.loss,
                    report.tokens_per_s
                ));
            },
        )
        .await;
        match result {
            Ok(run) => {
                let n = run.history.len();
                let (first, last) = match (run.history.first(), run.history.last()) {
                    (Some(a), Some(b)) => (a.loss, b.loss),
                    _ => (f32::NAN, f32::NAN),
                };
                t.status.set(format!(
                    "Trained {n} step(s): loss {first:.4} → {last:.4}. Chat with the prompts or download them."
                ));
                *state.tuned.borrow_mut() = (n > 0).then_some(run);
                t.trained.set(n);
                t.phase.set("done");
                if ui.use_tuned.get_untracked() {
                    new_chat(ui, &state);
                }
            }
            Err(e) => fail(format!("Error: {e}")),
        }
        t.busy.set(false);
    });
}

/// Offers the last run (prompts, optimizer state, loss history) as a file `corolla generate
/// --prompts` reads and `corolla train --out` resumes.
fn download(state: &State) -> Result<(), client::ClientError> {
    let js = |e: wasm_bindgen::JsValue| client::ClientError::Setup(format!("cannot offer the download: {e:?}"));
    let tuned = state.tuned.borrow();
    let run = tuned
        .as_ref()
        .ok_or_else(|| client::ClientError::Setup("nothing trained yet".into()))?;
    let bytes = run.to_bytes()?;
    let array = js_sys::Uint8Array::from(bytes.as_slice());
    let options = web_sys::BlobPropertyBag::new();
    options.set_type("application/octet-stream");
    let blob =
        web_sys::Blob::new_with_u8_array_sequence_and_options(&js_sys::Array::of1(&array), &options).map_err(js)?;
    let url = web_sys::Url::create_object_url_with_blob(&blob).map_err(js)?;
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or_else(|| client::ClientError::Setup("no document".into()))?;
    let anchor: web_sys::HtmlAnchorElement = document
        .create_element("a")
        .map_err(js)?
        .dyn_into()
        .map_err(|_| client::ClientError::Setup("cannot create a link".into()))?;
    anchor.set_href(&url);
    anchor.set_download(&format!(
        "corolla-{}-{}steps.safetensors",
        run.prompts.method.name(),
        run.history.len()
    ));
    anchor.click();
    // The browser has the blob once the click is handled; free it a little later.
    spawn_local(async move {
        swarm::rt::sleep(Duration::from_secs(30)).await;
        let _ = web_sys::Url::revoke_object_url(&url);
    });
    Ok(())
}

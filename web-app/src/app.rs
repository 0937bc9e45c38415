//! The page: a chat view and a swarm view.

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

use crate::client::{self, Chat, Loaded, RouteHop, Settings, Stats};
use crate::compute::{ClientModel, Device, RemoteHead};
use crate::fetch::{self, Origin};
use crate::params::PageParams;

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
    route: RwSignal<Vec<RouteHop>>,
    stats: RwSignal<Stats>,
    servers: RwSignal<usize>,
}

fn location_search() -> String {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .unwrap_or_default()
}

#[component]
pub fn App() -> impl IntoView {
    let params = PageParams::parse(&location_search());
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
        route: RwSignal::new(Vec::new()),
        stats: RwSignal::new(Stats::default()),
        servers: RwSignal::new(0),
    };
    let state = SendWrapper::new(Rc::new(State::default()));

    {
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
    }

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
        move |_| {
            state.stop.set(true);
            if let Some(chat) = state.chat.borrow_mut().as_mut() {
                chat.close();
            }
            state.history.borrow_mut().clear();
            ui.messages.set(Vec::new());
            ui.route.set(Vec::new());
            ui.stats.set(Stats::default());
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
        </header>
        <div class="status" data-testid="status">{move || ui.status.get()}</div>
        <Show when=move || ui.progress.get().is_some()>
            <progress data-testid="progress"
                max=move || ui.progress.get().map_or(1.0, |p| p.1)
                value=move || ui.progress.get().map_or(0.0, |p| p.0)></progress>
        </Show>
        <main>
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
    let client = client::start_node(relays)?;
    *state.client.borrow_mut() = Some(client.clone());
    ui.status.set("Looking for models in the DHT…".into());
    let models = client::list_models(&client, Duration::from_secs(30)).await?;
    if models.is_empty() {
        return Err(client::ClientError::Setup("no server announces any model yet".into()));
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
    let (servers, url) = client::find_bundle(&client, fingerprint).await?;
    ui.servers.set(servers.len());
    ui.status.set("Reading the model's description…".into());
    let (meta_bytes, _) = fetch::cached_bytes(&client::meta_url(&url), |_, _| {}).await?;
    let meta = ClientBundle::from_bytes(meta_bytes)?;
    let reason = if force_remote_head {
        Some("requested in the page URL (head=remote)".to_string())
    } else {
        client::too_large(&meta)
    };
    let (bundle, origin, model, device) = match reason {
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
            (meta, None, model, device)
        }
        None => {
            ui.status
                .set("Downloading the tokenizer, embeddings and LM head…".into());
            let (bytes, origin) = fetch::cached_bytes(&url, |done, total| {
                ui.progress
                    .set(Some((done as f64, total.unwrap_or(done.max(1)) as f64)));
            })
            .await?;
            ui.progress.set(None);
            let bundle = ClientBundle::from_bytes(bytes)?;
            ui.status.set("Preparing the model on this device…".into());
            let (model, device) = ClientModel::load(&bundle, !force_cpu).await?;
            (bundle, Some(origin), model, device)
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
    *state.chat.borrow_mut() = Some(Chat::new(client, &loaded));
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

//! The Monitor view: the swarm's health as the relay that serves the page sees it
//! (`/corolla/v1/state`, [`swarm::monitor`]), refreshed every 2 s while the view is open: per
//! model a coverage bar (one cell a block, coloured by how many servers hold it) with the
//! servers' spans under it, and a table of the servers.

use std::time::Duration;

use leptos::prelude::*;
use leptos::task::spawn_local;
use swarm::monitor::{ModelState, Reach, STATE_PATH, ServerState, SwarmState};

/// How often the state is read again.
const REFRESH: Duration = Duration::from_secs(2);

/// The view, shown while `visible` holds.
pub fn monitor_view(visible: RwSignal<bool>) -> impl IntoView {
    let state: RwSignal<Option<SwarmState>> = RwSignal::new(None);
    let status = RwSignal::new("Reading the swarm's state…".to_string());
    spawn_local(async move {
        loop {
            if visible.get_untracked() {
                match read_state().await {
                    Ok(s) => {
                        status.set(format!(
                            "{} model(s), updated {}",
                            s.models.len(),
                            time_of_day(s.updated_ms)
                        ));
                        state.set(Some(s));
                    }
                    Err(e) => status.set(format!("No swarm state here: {e}")),
                }
            }
            swarm::rt::sleep(REFRESH).await;
        }
    });
    view! {
        <section class="monitor" class:hidden=move || !visible.get() data-testid="monitor-view">
            <h2>"Swarm monitor"</h2>
            <p class="hint" data-testid="monitor-status">{move || status.get()}</p>
            {move || state.get().map(|s| s.models.into_iter().map(model_view).collect::<Vec<_>>())}
        </section>
    }
}

async fn read_state() -> Result<SwarmState, String> {
    let json = crate::fetch::json(STATE_PATH).await.map_err(|e| e.to_string())?;
    serde_json::from_value(json).map_err(|e| format!("{STATE_PATH}: {e}"))
}

/// `HH:MM:SS` (UTC) of a time in ms since the epoch.
fn time_of_day(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02} UTC", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn model_view(m: ModelState) -> impl IntoView {
    let blocks = m.num_blocks.max(1) as f64;
    let pct = move |b: u32| format!("{:.4}%", f64::from(b) * 100.0 / blocks);
    let uncovered = if m.uncovered.is_empty() {
        String::new()
    } else {
        let ranges: Vec<String> = m.uncovered.iter().map(|[a, b]| format!("{a}–{b}")).collect();
        format!("; no server for blocks {}", ranges.join(", "))
    };
    let summary = format!(
        "{} blocks, {} server{}{uncovered}",
        m.num_blocks,
        m.servers.len(),
        if m.servers.len() == 1 { "" } else { "s" }
    );
    let cells: Vec<_> = m
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let class = match b.servers {
                0 => "block none",
                1 => "block one",
                _ => "block many",
            };
            let title = format!("block {i}: {} server(s), {:.1} tokens/s", b.servers, b.throughput);
            view! { <span class=class title=title data-servers=b.servers.to_string()></span> }
        })
        .collect();
    let spans: Vec<_> = m
        .servers
        .iter()
        .map(|s| {
            let style = format!("left: {}; width: {}", pct(s.start), pct(s.end.saturating_sub(s.start)));
            let class = if s.state == Reach::Unreachable { "span gone" } else { "span" };
            let label = format!("{} {}–{}", display_name(s), s.start, s.end);
            view! { <div class="span-row"><span class=class style=style title=label.clone()>{label.clone()}</span></div> }
        })
        .collect();
    let rows: Vec<_> = m.servers.iter().cloned().map(server_row).collect();
    let health = if m.healthy { "healthy" } else { "broken" };
    view! {
        <div class="monitor-model" data-testid="monitor-model" data-healthy=m.healthy.to_string()
            data-fingerprint=m.fingerprint.clone()>
            <h3>{m.name.clone()} " "
                <span class=format!("health {health}") data-testid="monitor-health">{health}</span>
            </h3>
            <p class="hint">{summary}</p>
            <div class="coverage" data-testid="coverage">{cells}</div>
            <div class="spans">{spans}</div>
            <table class="servers" data-testid="monitor-servers">
                <thead><tr>
                    <th>"Server"</th><th>"Blocks"</th><th>"State"</th><th>"Tokens/s"</th>
                    <th>"Free cache"</th><th>"Sessions"</th><th>"Link"</th><th>"RTT"</th>
                    <th>"Version"</th><th>"Numerics"</th>
                </tr></thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

fn display_name(s: &ServerState) -> String {
    s.name
        .clone()
        .unwrap_or_else(|| crate::client::short_peer_text(&s.peer_id))
}

fn server_row(s: ServerState) -> impl IntoView {
    let state = match s.state {
        Reach::Online => "online",
        Reach::Unreachable => "unreachable",
        Reach::Unknown => "unknown",
    };
    view! {
        <tr data-testid="monitor-server" data-peer=s.peer_id.clone() data-state=state>
            <td title=s.peer_id.clone()>{display_name(&s)}</td>
            <td>{format!("{}–{}", s.start, s.end)}</td>
            <td class=format!("reach {state}")>{state}</td>
            <td>{format!("{:.1}", s.throughput)}</td>
            <td>{s.free_cache_tokens.to_string()}</td>
            <td>{s.sessions.map_or("–".to_string(), |n| n.to_string())}</td>
            <td>{if s.relayed { "relayed" } else { "direct" }}</td>
            <td>{s.rtt_ms.map_or("–".to_string(), |r| format!("{r:.1} ms"))}</td>
            <td>{s.version.clone()}</td>
            <td>{s.numerics.clone()}</td>
        </tr>
    }
}

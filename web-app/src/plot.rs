//! The Tune view's live loss curve, drawn as SVG (no plotting library: a polyline and a few
//! labels are all it needs).

use leptos::prelude::*;

const W: f64 = 560.0;
const H: f64 = 220.0;
/// Room for the axis labels.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;

/// Where each loss lands in the plot, with the x axis spanning `total` steps and the y axis
/// the losses' range; `(points, y_min, y_max)`.
pub fn layout(losses: &[f32], total: usize) -> (String, f32, f32) {
    let finite = losses.iter().copied().filter(|l| l.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, f32::min);
    let hi = finite.fold(f32::NEG_INFINITY, f32::max);
    if !lo.is_finite() {
        return (String::new(), 0.0, 1.0);
    }
    // A flat curve still gets a visible band.
    let (lo, hi) = if hi - lo < 1e-6 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
    // Some room below the lowest loss, but no negative losses on the axis.
    let lo = (lo - 0.05 * (hi - lo)).max(lo.min(0.0));
    let span_x = total.saturating_sub(1).max(1) as f64;
    let points = losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| {
            let x = LEFT + (W - LEFT - 8.0) * i as f64 / span_x;
            let y = 8.0 + (H - BOTTOM - 8.0) * f64::from((hi - l) / (hi - lo));
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    (points, lo, hi)
}

/// The loss of every step so far against the run's planned steps.
#[component]
pub fn LossPlot(losses: RwSignal<Vec<f32>>, total: RwSignal<usize>) -> impl IntoView {
    let geometry = move || layout(&losses.get(), total.get());
    view! {
        <svg class="loss-plot" data-testid="loss-plot" viewBox=format!("0 0 {W} {H}") role="img"
            aria-label="training loss per step">
            <line x1=LEFT y1=8 x2=LEFT y2=H - BOTTOM class="axis"></line>
            <line x1=LEFT y1=H - BOTTOM x2=W - 8.0 y2=H - BOTTOM class="axis"></line>
            <text x=LEFT - 4.0 y=14 class="label" text-anchor="end">{move || format!("{:.2}", geometry().2)}</text>
            <text x=LEFT - 4.0 y=H - BOTTOM class="label" text-anchor="end">{move || format!("{:.2}", geometry().1)}</text>
            <text x=LEFT y=H - 6.0 class="label">"step 1"</text>
            <text x=W - 8.0 y=H - 6.0 class="label" text-anchor="end">{move || format!("step {}", total.get())}</text>
            <polyline class="curve" fill="none" points=move || geometry().0></polyline>
        </svg>
    }
}

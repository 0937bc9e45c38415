//! The chat page. Built for wasm32 by `scripts/build-web.sh` (or Trunk, `Trunk.toml`); natively
//! it only says so.

#[cfg(target_arch = "wasm32")]
mod app;
#[cfg(target_arch = "wasm32")]
mod bundle;
#[cfg(target_arch = "wasm32")]
mod client;
#[cfg(target_arch = "wasm32")]
mod compute;
#[cfg(target_arch = "wasm32")]
mod fetch;
#[cfg(target_arch = "wasm32")]
mod monitor;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod params;
#[cfg(target_arch = "wasm32")]
mod plot;
#[cfg(target_arch = "wasm32")]
mod tune;
#[cfg(all(test, target_arch = "wasm32"))]
mod wasm_tests;

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("the web app runs in a browser: build it with `scripts/build-web.sh` (see docs/ARCHITECTURE.md)");
    std::process::exit(2);
}

#[cfg(target_arch = "wasm32")]
fn main() {
    console_error_panic_hook::set_once();
    tracing_wasm::set_as_global_default_with_config(
        tracing_wasm::WASMLayerConfigBuilder::new()
            .set_max_level(tracing::Level::INFO)
            .build(),
    );
    leptos::mount::mount_to_body(app::App);
}

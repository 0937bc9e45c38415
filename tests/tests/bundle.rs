//! Client bundles by fingerprint, across real processes on 127.0.0.1: `corolla generate
//! --model <fingerprint>` takes the model's client part (config, embeddings, LM head) from a
//! server's bundle, checked against the digest in the server's signed record. A bundle changed
//! on its way (a proxy in front of the server flips one byte of a tensor) is refused with a
//! non-zero exit and never cached; once an honest server offers the same digest, the tokens
//! are golden; a cached copy damaged on disk is checked again, refused and replaced.

use std::path::Path;
use std::process::{Command, Output};

use corolla_tests::{Swarm, TamperingProxy, bin, csv, fixture, free_port, golden_greedy, has_tensors, temp_dir};
use shared_model::bundle::{digest, digest_file};
use shared_model::fingerprint::fingerprint;
use shared_model::loader::ModelFiles;

/// Flips the last byte of the full bundle: one byte of its last tensor.
fn flip_a_tensor_byte(_path: &str, body: &mut [u8]) {
    if has_tensors(body)
        && let Some(last) = body.last_mut()
    {
        *last ^= 0x40;
    }
}

fn generate(relay: &str, model: &str, cache: &Path) -> Output {
    let (prompt, golden) = golden_greedy("llama");
    Command::new(bin("corolla"))
        .args(["generate", "--model", model, "--initial-peers", relay])
        .arg("--cache-dir")
        .arg(cache)
        .args(["--token-ids", &csv(&prompt)])
        .args(["--max-new-tokens", &golden.len().to_string(), "--ignore-eos", "--json"])
        .output()
        .expect("corolla runs")
}

fn token_ids(out: &Output) -> Vec<u32> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "corolla failed: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    corolla_tests::token_ids(&json)
}

/// The files in the cache's bundle folder.
fn cached(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("bundles"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn generate_by_fingerprint_takes_only_a_bundle_that_matches_the_signed_record() {
    let model = fixture("llama");
    let files = ModelFiles::open(&model).expect("fixture");
    let fp = fingerprint(&files.config, files.weights.as_ref()).expect("fingerprint");
    let (_, golden) = golden_greedy("llama");
    let mut swarm = Swarm::start("bundle-by-fingerprint");
    let cache = temp_dir("bundle-cache");

    // The only server offering the bundle sits behind a proxy that changes it.
    let upstream = free_port();
    let proxy = TamperingProxy::start(upstream, flip_a_tensor_byte);
    let listen = format!("127.0.0.1:{upstream}");
    // The servers' own cache, where each writes the bundle it serves.
    let served = temp_dir("bundle-served");
    let env = [("COROLLA_CACHE", served.as_path())];
    swarm.server_with_env(
        &model,
        "0:4",
        &["--http-listen", &listen, "--http-url", &proxy.url()],
        &env,
    );
    let out = generate(&swarm.relay_addr, &fp, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered bundle was used: {stderr}");
    eprintln!("corolla refused the tampered bundle:\n{stderr}");
    let (path, original) = proxy
        .originals()
        .into_iter()
        .find(|(_, body)| has_tensors(body))
        .expect("the client downloaded the full bundle through the proxy");
    let mut tampered = original.clone();
    flip_a_tensor_byte(&path, &mut tampered);
    let (want, got) = (digest(&original).expect("digest"), digest(&tampered).expect("digest"));
    let expected = format!(
        "the client bundle from {}{path} does not match the model's signed record (sha256 {got}, expected {want})",
        proxy.url()
    );
    assert!(stderr.contains(&expected), "expected `{expected}` in:\n{stderr}");
    assert!(
        cached(&cache).is_empty(),
        "a refused bundle was cached: {:?}",
        cached(&cache)
    );

    // An honest server of the same checkpoint announces the same digest: whichever of the two
    // is tried first, the tokens are golden and the honest bytes are cached under the digest.
    swarm.server_with_env(&model, "0:4", &["--http-listen", "127.0.0.1:0"], &env);
    // The first server wrote the bundle tensor by tensor; the second, of the same checkpoint,
    // serves that file without building it again.
    let logs: Vec<String> = swarm.servers.iter().map(|(p, _)| p.log()).collect();
    assert!(logs[0].contains("built the client bundle"), "{}", logs[0]);
    assert!(
        logs[1].contains("reusing the client bundle written before"),
        "{}",
        logs[1]
    );
    let out = generate(&swarm.relay_addr, &fp, &cache);
    assert_eq!(token_ids(&out), golden);
    let entry = format!("{want}.safetensors");
    assert_eq!(cached(&cache), std::slice::from_ref(&entry));
    let file = cache.join("bundles").join(&entry);
    // Another server's file: the same content, maybe another header order.
    let cached_digest = || digest(&std::fs::read(&file).expect("cached bundle")).expect("digest");
    assert_eq!(cached_digest(), want);
    let served_file = served.join("served-bundles").join(&entry);
    assert_eq!(digest_file(&served_file).expect("the served file").0, want);

    // Damaged on disk: checked on load, refused, downloaded again.
    let mut damaged = std::fs::read(&file).expect("cached bundle");
    flip_a_tensor_byte(&path, &mut damaged);
    std::fs::write(&file, &damaged).expect("damage the cache");
    let out = generate(&swarm.relay_addr, &fp, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(token_ids(&out), golden, "{stderr}");
    assert!(stderr.contains("a cached client bundle failed its check"), "{stderr}");
    assert_eq!(cached_digest(), want);
}

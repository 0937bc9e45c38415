//! safetensors headers through the repository's own loading paths: a client bundle as a browser
//! or native client reads it from a server (config, tokenizer, chat template, quantized and f32
//! tensors) and its content digest as the client checks it, in-memory checkpoint shards, a checkpoint file on disk, and a shard index.
//!
//! Input: one selector byte (which path), then the file's bytes.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shared_model::bundle::BundleWeights;
use shared_model::bundle::{ClientBundle, Expected, client_f32_bytes, digest, is_digest};
use shared_model::tokenizer::ChatMessage;
use shared_model::weights::{SafetensorsSource, WeightSource};

const MAX_READS: usize = 32;

/// A real shard the fuzzed indexes can point at (the llama fixture's second shard).
const SHARD: &[u8] = include_bytes!("../../tests/fixtures/llama/model-00002-of-00020.safetensors");
const SHARD_NAME: &str = "model-00002-of-00020.safetensors";

/// Folders of this process's own for the on-disk paths: one for checkpoint files, one for
/// indexes next to a fixed real shard (so one path never reads what the other wrote).
fn scratch() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("corolla-fuzz-safetensors-{}", std::process::id()));
        let (files, index) = (root.join("file"), root.join("index"));
        std::fs::create_dir_all(&files).expect("scratch folder");
        std::fs::create_dir_all(&index).expect("scratch folder");
        std::fs::write(index.join(SHARD_NAME), SHARD).expect("write the shard");
        (files, index)
    })
}

fn read_all(source: &dyn WeightSource) {
    for name in source.names().into_iter().take(MAX_READS) {
        if let Ok(t) = source.read(&name) {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len(), "{name}");
        }
        let _ = source.read_quant(&name);
        corolla_fuzz::sample_stored(source, &name);
    }
}

fn bundle(bytes: &[u8]) {
    // The digest reads any safetensors file, bundle or not; whatever parses as a bundle has
    // one, and verifies against it.
    let own = digest(bytes);
    if let Ok(d) = &own {
        assert!(is_digest(d), "{d}");
    }
    let Ok(bundle) = ClientBundle::from_bytes(bytes.to_vec()) else {
        return;
    };
    let Ok(own) = own else {
        panic!("a bundle that parses has no digest");
    };
    let expected = Expected {
        fingerprint: &bundle.fingerprint,
        digest: &own,
    };
    assert!(ClientBundle::verified(bytes.to_vec(), &expected).is_ok());
    let _ = client_f32_bytes(&bundle.config);
    read_all(&bundle.weights);
    if let Some(tokenizer) = &bundle.tokenizer
        && let Ok(ids) = tokenizer.encode("Hello <|im_start|>user\n😀")
    {
        let _ = tokenizer.decode(&ids, true);
    }
    if let Some(template) = &bundle.chat_template {
        let _ = template.render(&[ChatMessage::system("s"), ChatMessage::user("u")], true);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => bundle(bytes),
        1 => {
            if let Ok(weights) = BundleWeights::from_safetensors(vec![bytes.to_vec()]) {
                read_all(&weights);
            }
        }
        2 => {
            let path = scratch().0.join("model.safetensors");
            std::fs::write(&path, bytes).expect("write scratch file");
            if let Ok(source) = SafetensorsSource::open_file(&path) {
                read_all(&source);
            }
        }
        _ => {
            let dir = &scratch().1;
            let path = dir.join("model.safetensors.index.json");
            std::fs::write(&path, bytes).expect("write scratch file");
            if let Ok(source) = SafetensorsSource::open_index(&path) {
                for file in source.files_for(source.names().iter().map(String::as_str)) {
                    assert_eq!(file.parent(), Some(dir.as_path()), "a shard outside the model folder");
                }
                read_all(&source);
            }
        }
    }
});

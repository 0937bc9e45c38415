//! Client bundles: what a server hands a browser must give the same embeddings, logits,
//! tokens and chat prompts as the checkpoint it was made from.

use std::path::{Path, PathBuf};

use shared_model::Cpu;
use shared_model::bundle::{BundleError, BundleMeta, ClientBundle, Expected, digest, write_bundle, write_meta_bundle};
use shared_model::loader::ModelFiles;
use shared_model::model::{Embeddings, LmHead, to_host};
use shared_model::tokenizer::ChatMessage;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A stand-in fingerprint (the bundle only carries it; these tests do not need the real one).
const FP: &str = "00112233445566778899aabbccddeeff";

fn bundle_of(files: &ModelFiles) -> ClientBundle {
    let meta = BundleMeta {
        name: "test",
        fingerprint: FP,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    };
    let bytes = write_bundle(&meta, &files.config, files.weights.as_ref()).expect("bundle written");
    ClientBundle::from_bytes(bytes).expect("bundle read back")
}

/// Embeddings and logits from the bundle equal those from the checkpoint, bit for bit.
fn same_outputs(files: &ModelFiles, bundle: &ClientBundle, ids: &[Vec<u32>]) {
    let device = Default::default();
    assert_eq!(bundle.config, files.config);
    let e1 = Embeddings::<Cpu>::load(&files.config, files.weights.as_ref(), &device).expect("embeddings");
    let e2 = Embeddings::<Cpu>::load(&bundle.config, &bundle.weights, &device).expect("bundle embeddings");
    let h1 = e1.forward(ids).expect("embed");
    let h2 = e2.forward(ids).expect("embed");
    assert_eq!(to_host(h1.clone()).data, to_host(h2).data);
    let l1 = LmHead::<Cpu>::load(&files.config, files.weights.as_ref(), &device).expect("head");
    let l2 = LmHead::<Cpu>::load(&bundle.config, &bundle.weights, &device).expect("bundle head");
    let a = to_host(l1.forward(h1.clone())).data;
    let b = to_host(l2.forward(h1)).data;
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    // A quantized head runs quantized kernels natively and a dense matmul from the bundle.
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "logits differ by {worst} (scale {scale})"
    );
}

#[test]
fn fixture_bundles_reproduce_the_checkpoint() {
    for family in ["llama", "bloom", "falcon", "mixtral"] {
        let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
        let bundle = bundle_of(&files);
        assert_eq!(bundle.stop_ids, files.stop_ids, "{family}");
        same_outputs(&files, &bundle, &[vec![1, 5, 9, 200], vec![3, 3, 7, 11]]);
    }
}

#[test]
fn bundles_hold_only_the_client_tensors() {
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let bundle = bundle_of(&files);
    use shared_model::weights::WeightSource;
    let names: Vec<String> = bundle.weights.names().into_iter().collect();
    assert_eq!(
        names,
        ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    );
}

#[test]
fn meta_bundles_describe_the_model_without_tensors() {
    use shared_model::weights::WeightSource;
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let meta = BundleMeta {
        name: "test",
        fingerprint: FP,
        hf_config: &files.hf_config,
        tokenizer: None,
        chat_template: None,
        stop_ids: &files.stop_ids,
    };
    let bytes = write_meta_bundle(&meta, &files.config).expect("meta bundle");
    assert!(bytes.len() < 4096, "{} bytes", bytes.len());
    let bundle = ClientBundle::from_bytes(bytes).expect("read back");
    assert_eq!(bundle.config, files.config);
    assert!(bundle.weights.names().is_empty());
}

#[test]
fn damaged_bundles_are_refused() {
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let meta = BundleMeta {
        name: "test",
        fingerprint: FP,
        hf_config: &files.hf_config,
        tokenizer: None,
        chat_template: None,
        stop_ids: &files.stop_ids,
    };
    let bytes = write_bundle(&meta, &files.config, files.weights.as_ref()).expect("bundle");
    assert!(ClientBundle::from_bytes(bytes[..bytes.len() / 2].to_vec()).is_err());
    assert!(ClientBundle::from_bytes(b"not a bundle at all".to_vec()).is_err());
    // A plain checkpoint is not a bundle: it has no format marker.
    let plain = std::fs::read(fixture("bloom/model.safetensors")).expect("fixture");
    let err = ClientBundle::from_bytes(plain).expect_err("not a bundle").to_string();
    assert!(err.contains("bundle"), "{err}");
}

/// The GGUF's quantized embeddings travel as their blocks; tokenizer and chat template survive.
#[test]
fn smollm2_bundle_matches_the_gguf() {
    let Some(path) = std::env::var_os("COROLLA_SMOLLM2_GGUF") else {
        panic!("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches the model and sets it)");
    };
    let files = ModelFiles::open(Path::new(&path)).expect("GGUF opens");
    let bundle = bundle_of(&files);
    same_outputs(&files, &bundle, &[vec![6403, 1980, 253, 655]]);
    let messages = [ChatMessage::user("What is the capital of France?")];
    let t1 = files
        .chat_template
        .as_ref()
        .expect("template")
        .render(&messages, true)
        .expect("render");
    let t2 = bundle
        .chat_template
        .as_ref()
        .expect("template")
        .render(&messages, true)
        .expect("render");
    assert_eq!(t1, t2);
    let k1 = files.tokenizer.as_ref().expect("tokenizer");
    let k2 = bundle.tokenizer.as_ref().expect("tokenizer");
    assert_eq!(k1.encode(&t1).expect("encode"), k2.encode(&t2).expect("encode"));
    assert_eq!((k1.bos_id(), k1.eos_id()), (k2.bos_id(), k2.eos_id()));
    assert_eq!(bundle.stop_ids, files.stop_ids);
}

fn meta_of(files: &ModelFiles) -> BundleMeta<'_> {
    BundleMeta {
        name: "test",
        fingerprint: FP,
        hf_config: &files.hf_config,
        tokenizer: files.tokenizer.as_ref(),
        chat_template: files.chat_template.as_ref(),
        stop_ids: &files.stop_ids,
    }
}

/// Every write of one model's bundle has the same digest, whatever order safetensors puts the
/// header in (it follows a `HashMap`, seeded anew for every map), full and meta alike.
#[test]
fn bundles_of_one_model_have_one_digest() {
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let meta = meta_of(&files);
    let writes: Vec<Vec<u8>> = (0..8)
        .map(|_| write_bundle(&meta, &files.config, files.weights.as_ref()).expect("bundle"))
        .collect();
    let first = digest(&writes[0]).expect("digest");
    for bytes in &writes {
        assert_eq!(digest(bytes).expect("digest"), first);
    }
    let metas: Vec<Vec<u8>> = (0..8)
        .map(|_| write_meta_bundle(&meta, &files.config).expect("meta"))
        .collect();
    let meta_digest = digest(&metas[0]).expect("digest");
    assert_ne!(meta_digest, first);
    for bytes in &metas {
        assert_eq!(digest(bytes).expect("digest"), meta_digest);
    }
    let renamed = BundleMeta { name: "other", ..meta };
    let bytes = write_bundle(&renamed, &files.config, files.weights.as_ref()).expect("bundle");
    assert_ne!(digest(&bytes).expect("digest"), first, "the name is content too");
}

/// A bundle is used only if its digest and fingerprint are those expected; one changed byte of
/// a tensor or of the metadata (here the name), or a bundle of another model, is refused.
#[test]
fn verified_bundles_match_digest_and_fingerprint() {
    let files = ModelFiles::open(&fixture("llama")).expect("fixture opens");
    let bytes = write_bundle(&meta_of(&files), &files.config, files.weights.as_ref()).expect("bundle");
    let want = digest(&bytes).expect("digest");
    let expected = Expected {
        fingerprint: FP,
        digest: &want,
    };
    let bundle = ClientBundle::verified(bytes.clone(), &expected).expect("the honest bundle verifies");
    assert_eq!(bundle.fingerprint, FP);

    let mut tensor_byte = bytes.clone();
    let last = tensor_byte.len() - 1;
    tensor_byte[last] ^= 1;
    let mut name = bytes.clone();
    let at = name
        .windows(6)
        .position(|w| w == b"\"test\"")
        .expect("the name is in the header");
    name[at + 4] = b'T';
    for tampered in [tensor_byte, name] {
        let err = ClientBundle::verified(tampered.clone(), &expected).expect_err("tampered");
        let got = digest(&tampered).expect("still safetensors");
        assert!(
            matches!(&err, shared_model::ModelError::Bundle(BundleError::Digest { got: g, want: w }) if *g == got && *w == want),
            "{err}"
        );
        assert_eq!(err.to_string(), format!("sha256 {got}, expected {want}"));
    }

    let other = Expected {
        fingerprint: "ffeeddccbbaa99887766554433221100",
        digest: &want,
    };
    let err = ClientBundle::verified(bytes, &other).expect_err("another model's");
    assert!(
        matches!(err, shared_model::ModelError::Bundle(BundleError::WrongModel { .. })),
        "{err}"
    );
}

/// A bundle written to a file tensor by tensor has the content (so the digest) of the one
/// built in memory, reads back as the same model, and its digest from disk equals the digest
/// of its bytes; dense, quantized-on-load (U8 blocks and `quant.` entries) and every family.
#[test]
fn bundle_files_equal_bundles_built_in_memory() {
    use shared_model::bundle::{digest_file, write_bundle_file};
    use shared_model::quant::QuantKind;
    use shared_model::synthetic::QuantizeOnLoad;
    use shared_model::weights::WeightSource;
    let dir = std::env::temp_dir().join(format!("corolla-bundle-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for family in ["llama", "bloom", "falcon", "mixtral"] {
        let files = ModelFiles::open(&fixture(family)).expect("fixture opens");
        let quantized = QuantizeOnLoad::new(files.weights.clone(), QuantKind::Q4_0);
        let sources: [(&str, &dyn WeightSource); 2] = [("dense", files.weights.as_ref()), ("q4", &quantized)];
        for (kind, source) in sources {
            let meta = meta_of(&files);
            let path = dir.join(format!("{family}-{kind}.safetensors"));
            let len = write_bundle_file(&meta, &files.config, source, &path).expect("bundle file");
            let bytes = std::fs::read(&path).expect("read back");
            assert_eq!(len, bytes.len() as u64, "{family} {kind}");
            let want = digest(&write_bundle(&meta, &files.config, source).expect("bundle")).expect("digest");
            assert_eq!(digest(&bytes).expect("digest"), want, "{family} {kind}");
            assert_eq!(digest_file(&path).expect("digest file"), (want, len), "{family} {kind}");
            let bundle = ClientBundle::from_bytes(bytes).expect("the file reads back");
            if kind == "q4" {
                let blocks = bundle
                    .weights
                    .names()
                    .iter()
                    .filter(|n| bundle.weights.stored(n).is_ok_and(|s| s.dtype == "Q4_0"))
                    .count();
                assert!(blocks > 0, "{family}: quantized tensors stay quantized");
            } else {
                same_outputs(&files, &bundle, &[vec![1, 5, 9, 200]]);
            }
            assert!(
                !dir.join(format!("{family}-{kind}.safetensors.spool")).exists(),
                "the spool is removed"
            );
        }
    }
    // A file cut short, or with its header's length past the end, is refused, not read past.
    let path = dir.join("llama-dense.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("write");
    let err = digest_file(&cut).expect_err("a cut file").to_string();
    assert!(err.contains("the file holds"), "{err}");
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&cut, &huge).expect("write");
    assert!(digest_file(&cut).is_err());
    std::fs::remove_dir_all(&dir).expect("clean up");
}

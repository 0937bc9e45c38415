//! GGUF files as a server loads them: the header (metadata and tensor table), every metadata
//! accessor, each tensor's stored bytes and dequantized values, and the Hugging Face view on
//! top (tensor mapping, rebuilt config, tokenizer and chat template from the metadata).
//!
//! Input: the file's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_model::ModelConfig;
use shared_model::gguf::{GgufFile, GgufModel};
use shared_model::tokenizer::Tokenizer;
use shared_model::weights::WeightSource;

/// Tensors read per input: enough to reach every code path, few enough that an input of many
/// small tensors stays fast.
const MAX_READS: usize = 32;

fn accessors(file: &GgufFile) {
    for (key, value) in file.metadata_map() {
        let _ = value.type_name();
        let _ = (
            value.as_u64(),
            value.as_i64(),
            value.as_f64(),
            value.as_bool(),
            value.as_str(),
        );
        if let Some(array) = value.as_array() {
            let _ = (array.len(), array.is_empty(), array.to_i64_vec());
        }
        let _ = file.opt_u32(key);
        let _ = file.opt_u64(key);
        let _ = file.opt_i64(key);
        let _ = file.opt_f32(key);
        let _ = file.opt_bool(key);
        let _ = file.opt_str(key);
        let _ = file.get_array(key);
        let _ = file.opt_str_array(key);
        let _ = file.opt_i32_array(key);
    }
}

fn tensors(file: &GgufFile) {
    for info in file.tensors().iter().take(MAX_READS) {
        assert_eq!(file.tensor_info(&info.name), Some(info));
        let shape = info.shape();
        assert_eq!(shape.iter().product::<usize>() as u64, info.n_elements());
        let _ = file.tensor_bytes(&info.name);
        if let Ok(t) = file.read_tensor(&info.name) {
            assert_eq!(t.shape, shape);
            assert_eq!(t.data.len() as u64, info.n_elements());
        }
    }
}

fn tokenizer(file: &GgufFile) {
    let Ok(tokenizer) = Tokenizer::from_gguf(file) else {
        return;
    };
    if let Ok(ids) = tokenizer.encode("Hello, world! 12345 <|im_start|>user\nçà 😀<|im_end|>") {
        let _ = tokenizer.decode(&ids, false);
        let _ = tokenizer.decode(&ids, true);
    }
    let _ = tokenizer.end_of_turn_ids();
    // The template comes with the model (trusted as much as its weights): compiled here, not
    // rendered; what users put in it is the `chat` target's job.
    let _ = tokenizer.chat_template();
}

fn model(file: GgufFile) {
    let Ok(model) = GgufModel::new(file) else {
        return;
    };
    for name in model.names().into_iter().take(MAX_READS) {
        let _ = model.gguf_name(&name);
        corolla_fuzz::sample_stored(&model, &name);
        if let Ok(t) = model.read(&name) {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
        }
        if let Ok(Some(q)) = model.read_quant(&name)
            && let Ok(t) = q.dequantize()
        {
            assert_eq!(t.shape, q.shape().to_vec());
        }
    }
    if let Ok(config) = model.hf_config() {
        let _ = ModelConfig::from_json_value(config);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let _ = (file.version(), file.alignment(), file.path());
    accessors(&file);
    tensors(&file);
    tokenizer(&file);
    model(file);
});

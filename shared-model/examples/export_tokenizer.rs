//! Writes a GGUF's tokenizer as `tokenizer.json`: how `tests/fixtures/smollm2-tokenizer.json`
//! (used by the browser-side tests, which cannot read a 93 MB GGUF) was made.
//!
//! `cargo run --release -p shared-model --example export_tokenizer -- MODEL.gguf OUT.json`

use shared_model::gguf::GgufFile;
use shared_model::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, gguf, out] = args.as_slice() else {
        return Err("usage: export_tokenizer MODEL.gguf OUT.json".into());
    };
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(std::path::Path::new(gguf))?)?;
    std::fs::write(out, tokenizer.to_json()?)?;
    Ok(())
}

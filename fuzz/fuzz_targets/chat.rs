//! The chat input path: messages whose roles and contents come from users (the chat page, later
//! the OpenAI-style API) rendered through real chat templates, tokenized by SmolLM2's
//! tokenizer, then decoded back and streamed as generation streams its output.
//!
//! Input: one selector byte (low bits: which template; high bit: add the generation prompt),
//! then the conversation as text: messages separated by U+001E, each `role U+001F content`
//! (a message without U+001F is a user or assistant turn, alternating).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shared_model::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

/// Real templates (see `fuzz/templates/README.md`), with the BOS and EOS strings their
/// checkpoints give them.
const TEMPLATES: [(&str, &str, &str); 3] = [
    (include_str!("../templates/smollm2.jinja"), "<|im_start|>", "<|im_end|>"),
    (include_str!("../templates/mistral.jinja"), "<s>", "</s>"),
    (
        include_str!("../templates/llama3.jinja"),
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
];

const TOKENIZER: &str = include_str!("../../tests/fixtures/smollm2-tokenizer.json");

struct Fixed {
    templates: Vec<ChatTemplate>,
    tokenizer: Tokenizer,
    /// Bytes the tokenizer has no token for (SmolLM2 lacks a few control and never-valid
    /// UTF-8 bytes): text holding them cannot survive encoding, whatever our code does.
    unencodable: Vec<u8>,
}

/// GPT-2's byte-level alphabet: the character standing for each byte in a vocabulary.
fn byte_symbol(b: u8) -> char {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let b = u32::from(b);
    let c = if printable(b) {
        b
    } else {
        256 + (0..b).filter(|&x| !printable(x)).count() as u32
    };
    char::from_u32(c).unwrap_or('\u{FFFD}')
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let tokenizer = Tokenizer::from_json(TOKENIZER).expect("the SmolLM2 tokenizer loads");
        let unencodable = (0..=255u8)
            .filter(|&b| tokenizer.token_id(&byte_symbol(b).to_string()).is_none())
            .collect::<Vec<u8>>();
        // A wrong byte map would make every byte unencodable and the round-trip check vacuous.
        assert!(unencodable.len() < 32, "{} bytes without a token", unencodable.len());
        Fixed {
            templates: TEMPLATES
                .iter()
                .map(|&(source, bos, eos)| ChatTemplate::new(source, bos, eos).expect("a real template compiles"))
                .collect(),
            tokenizer,
            unencodable,
        }
    })
}

fn messages(text: &str) -> Vec<ChatMessage> {
    text.split('\u{1e}')
        .enumerate()
        .map(|(i, m)| match m.split_once('\u{1f}') {
            Some((role, content)) => ChatMessage::new(role, content),
            None if i % 2 == 0 => ChatMessage::user(m),
            None => ChatMessage::assistant(m),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let fixed = fixed();
    let index = usize::from(selector & 0x7f) % fixed.templates.len();
    let add_generation_prompt = selector & 0x80 != 0;
    let messages = messages(&String::from_utf8_lossy(rest));
    let Ok(text) = fixed.templates[index].render(&messages, add_generation_prompt) else {
        return;
    };
    if index == 0 {
        // ChatML copies every role and content verbatim: nothing is escaped or dropped.
        for m in &messages {
            assert!(
                text.contains(&m.role) && text.contains(&m.content),
                "{m:?} lost in {text:?}"
            );
        }
    }
    let tokenizer = &fixed.tokenizer;
    let ids = tokenizer.encode(&text).expect("any text encodes");
    let decoded = tokenizer.decode(&ids, false).expect("our own ids decode");
    if !text.bytes().any(|b| fixed.unencodable.contains(&b)) {
        assert_eq!(decoded, text, "decode(encode(text)) changed the text");
    }
    let mut stream = tokenizer.stream(false);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&stream.push(id).expect("push"));
    }
    streamed.push_str(&stream.finish().expect("finish"));
    assert_eq!(streamed, decoded, "streaming gave other text than decoding");
    let _ = tokenizer.decode(&ids, true);
});

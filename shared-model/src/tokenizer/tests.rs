use super::*;

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

fn render(src: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
    ChatTemplate::new(src, "<s>", "</s>")?.render(messages, add_generation_prompt)
}

#[test]
fn chatml_template() {
    let out = render(CHATML, &[ChatMessage::user("Hi")], true).expect("renders");
    assert_eq!(
        out,
        "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = render(
        CHATML,
        &[ChatMessage::system("Be terse"), ChatMessage::user("Hi")],
        false,
    )
    .expect("renders");
    assert_eq!(
        out,
        "<|im_start|>system\nBe terse<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn llama3_template() {
    let template = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").expect("compiles");
    let out = template
        .render(&[ChatMessage::system("Sys "), ChatMessage::user("  Hello\n")], true)
        .expect("renders");
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn llama2_template_and_raise_exception() {
    let out = render(
        LLAMA2,
        &[
            ChatMessage::system("Sys"),
            ChatMessage::user(" Hi "),
            ChatMessage::assistant("Hello"),
            ChatMessage::user("Bye"),
        ],
        false,
    )
    .expect("renders");
    assert_eq!(
        out,
        // strip() applies to the whole first turn, so the user's leading space stays.
        "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\n Hi [/INST] Hello </s><s>[INST] Bye [/INST]"
    );
    let err = render(LLAMA2, &[ChatMessage::assistant("x")], false).expect_err("roles out of order");
    assert!(matches!(err, TokenizerError::Template(_)));
    assert!(err.to_string().contains("Conversation roles must alternate"), "{err}");
}

#[test]
fn trim_and_lstrip_blocks_like_transformers() {
    let src = "{% for message in messages %}\n    {% if message.role == 'user' %}\nU:{{ message.content }}\n    {% endif %}\n{% endfor %}";
    let out = render(
        src,
        &[
            ChatMessage::user("a"),
            ChatMessage::assistant("b"),
            ChatMessage::user("c"),
        ],
        false,
    )
    .expect("renders");
    assert_eq!(out, "U:a\nU:c\n");
}

#[test]
fn bad_template_is_an_error() {
    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(TokenizerError::Template(_))
    ));
}

#[test]
fn strftime_formats() {
    // 2024-07-26 13:25:09 UTC
    let t = 1_722_000_309;
    assert_eq!(
        chat::strftime_for_test("%d %b %Y", t).ok(),
        Some("26 Jul 2024".to_string())
    );
    assert_eq!(
        chat::strftime_for_test("%Y-%m-%d %H:%M:%S %B %%", t).ok(),
        Some("2024-07-26 13:25:09 July %".to_string())
    );
    assert!(chat::strftime_for_test("%Q", t).is_err());
    assert_eq!(
        chat::strftime_for_test("%Y-%m-%d", 951_782_400).ok(),
        Some("2000-02-29".to_string())
    );
}

#[test]
fn tokenizer_config_variants() {
    let dir = std::env::temp_dir().join(format!("shared-model-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tokenizer_config.json");
    let write = |v: serde_json::Value| std::fs::write(&path, v.to_string()).expect("write config");

    write(serde_json::json!({
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}|{{ eos_token }}"}],
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
    }));
    let t = ChatTemplate::from_tokenizer_config(&path).expect("list form");
    assert_eq!(t.render(&[], false).ok(), Some("<s>|</s>".to_string()));

    write(serde_json::json!({"bos_token": null}));
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(&path),
        Err(TokenizerError::NoChatTemplate(_))
    ));
    std::fs::write(dir.join("chat_template.jinja"), "J{{ eos_token }}").expect("write jinja");
    write(serde_json::json!({"eos_token": "E"}));
    let t = ChatTemplate::from_tokenizer_config(&path).expect("sibling jinja");
    assert_eq!(t.render(&[], false).ok(), Some("JE".to_string()));

    write(serde_json::json!({"chat_template": 3}));
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(&path),
        Err(TokenizerError::BadConfig { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A byte-level BPE over the 256 byte symbols and no merges: every byte is one token.
fn byte_tokenizer() -> Tokenizer {
    let vocab: Vocab = ByteLevel::alphabet()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().expect("bpe");
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevel::default()));
    inner
        .add_special_tokens([AddedToken::from("<|im_end|>", true)])
        .expect("special");
    Tokenizer {
        vocab_size: inner.get_vocab_size(true),
        inner,
        bos_id: None,
        eos_id: Some(5),
        chat_template: None,
    }
}

#[test]
fn byte_tokenizer_round_trip_and_specials() {
    let tok = byte_tokenizer();
    let text = "añ€😀<|im_end|>";
    let ids = tok.encode(text).expect("encode");
    // 1 + 2 + 3 + 4 bytes, then the special token.
    assert_eq!(ids.len(), 11);
    let end = tok.token_id("<|im_end|>").expect("special present");
    assert_eq!(ids[10], end);
    assert_eq!(tok.decode(&ids, false).ok(), Some(text.to_string()));
    assert_eq!(tok.decode(&ids, true).ok(), Some("añ€😀".to_string()));
    assert_eq!(tok.end_of_turn_ids(), vec![5, end]);
    assert!(matches!(
        tok.decode(&[100_000], false),
        Err(TokenizerError::UnknownId { id: 100_000, .. })
    ));
}

#[test]
fn text_stream_waits_for_whole_characters() {
    let tok = byte_tokenizer();
    let ids = tok.encode("a€b😀").expect("encode");
    let mut stream = tok.stream(false);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).expect("push")).collect();
    assert_eq!(pieces, vec!["a", "", "", "€", "b", "", "", "", "😀"]);
    assert_eq!(stream.finish().ok(), Some(String::new()));

    // An unfinished character is released by finish() as U+FFFD.
    let euro = tok.encode("€").expect("encode");
    let mut stream = tok.stream(false);
    assert_eq!(stream.push(euro[0]).ok(), Some(String::new()));
    assert_eq!(stream.finish().ok(), Some("\u{FFFD}".to_string()));

    // Specials skipped in the stream produce no text.
    let end = tok.token_id("<|im_end|>").expect("special");
    let mut stream = tok.stream(true);
    assert_eq!(
        stream.push(tok.encode("x").expect("encode")[0]).ok(),
        Some("x".to_string())
    );
    assert_eq!(stream.push(end).ok(), Some(String::new()));
}

#[test]
fn pre_tokenizers_by_name() {
    for pre in [
        "gpt2",
        "default",
        "smollm",
        "starcoder",
        "refact",
        "llama-bpe",
        "llama3",
        "qwen2",
    ] {
        assert!(pre_tokenizer(pre).is_ok(), "{pre}");
    }
    assert!(matches!(pre_tokenizer("mystery"), Err(TokenizerError::UnsupportedPreTokenizer(p)) if p == "mystery"));
}

/// Streams `ids` and returns everything the stream emitted.
fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut stream = tok.stream(false);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&stream.push(id).expect("push"));
    }
    out.push_str(&stream.finish().expect("finish"));
    out
}

/// Found by the `chat` fuzz target: text holding real U+FFFD characters (which models emit)
/// followed by a multi-byte character streamed as more U+FFFD than it holds, and stalled.
#[test]
fn text_stream_with_real_replacement_characters_matches_decode() {
    let tok = byte_tokenizer();
    for text in [
        "d\u{FFFD}\u{FFFD}\u{FFFD}\u{169} x",
        "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}😀 中文",
        "a\u{FFFD}€",
        "\u{FFFD}",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(streamed(&tok, &ids), text, "{text:?}");
    }
}

/// Found by the `safetensors` fuzz target (a client bundle's tokenizer): a `decoder` that is
/// not valid JSON made tokenizers panic instead of returning an error.
#[test]
fn malformed_tokenizer_json_is_an_error_not_a_panic() {
    let json = byte_tokenizer().to_json().expect("to_json");
    let at = json.find("\"decoder\"").expect("has a decoder");
    let (head, tail) = json.split_at(at);
    let broken = format!("{head}{}", tail.replacen("true", "tru", 1));
    assert!(matches!(Tokenizer::from_json(&broken), Err(TokenizerError::Build(_))));
    assert!(Tokenizer::from_json(&json).is_ok());
    assert!(matches!(Tokenizer::from_json("{"), Err(TokenizerError::Build(_))));
}

//! The OpenAI request bodies this API takes, checked into a [`Generation`]; and the JSON of its
//! answers (completions, streamed chunks, model lists).

use serde::Deserialize;
use serde_json::{Value, json};
use shared_model::sampling::SamplingParams;
use shared_model::tokenizer::ChatMessage;

use super::error::ApiError;

/// Most stop sequences a request may give (as OpenAI).
const MAX_STOPS: usize = 4;
/// Longest stop sequence, in bytes.
const MAX_STOP_BYTES: usize = 256;
/// Most messages in one chat request.
const MAX_MESSAGES: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields chat and text completions share.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A checked request: what to generate, however it was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub model: String,
    /// `None`: as many as the context leaves (up to the API's cap).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a JSON body, saying which field is wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::body(format!("the request body is not valid: {e}")))
}

fn refuse_unsupported(c: &Common) -> Result<(), ApiError> {
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::bad(
            "n",
            format!("n = {n}: only one choice per request (n = 1)"),
        ));
    }
    for (param, value) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        match value {
            Some(v) if !(-2.0..=2.0).contains(&v) => {
                return Err(ApiError::bad(param, format!("{param} = {v} is outside -2..2")));
            }
            _ => {}
        }
    }
    let truthy = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false));
    for (param, value) in [
        ("logprobs", &c.logprobs),
        ("top_logprobs", &c.top_logprobs),
        ("tools", &c.tools),
    ] {
        if truthy(value) {
            return Err(ApiError::bad(param, format!("{param} is not supported")));
        }
    }
    if c.logit_bias
        .as_ref()
        .is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
    }
    if let Some(format) = &c.response_format
        && format.get("type").and_then(Value::as_str).is_some_and(|t| t != "text")
    {
        return Err(ApiError::bad(
            "response_format",
            "only the text response format is supported",
        ));
    }
    Ok(())
}

/// Checks the shared fields into a [`Generation`].
pub fn generation(c: &Common) -> Result<Generation, ApiError> {
    refuse_unsupported(c)?;
    if c.model.is_empty() {
        return Err(ApiError::bad("model", "give the model's name or fingerprint"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature = {temperature} is outside 0..2"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", format!("top_p = {top_p} is outside (0, 1]")));
    }
    let max_tokens = match (c.max_completion_tokens, c.max_tokens) {
        (Some(0), _) | (None, Some(0)) => {
            return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
        }
        (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => None,
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad("stop", format!("at most {MAX_STOPS} stop sequences")));
    }
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(
            "stop",
            format!("stop sequences are at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let seed = match c.seed {
        Some(s) => s as u64,
        None => swarm::dht::now_ms(),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: None,
        top_p: (top_p < 1.0).then_some(top_p as f32),
        repetition_penalty: 1.0,
        presence_penalty: c.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0) as f32,
        seed,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad("temperature", e.to_string()))?;
    Ok(Generation {
        model: c.model.clone(),
        max_tokens,
        sampling,
        stop,
        stream: c.stream,
        include_usage: c.stream && c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// The chat's messages for the model's template.
pub fn messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "give at least one message"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad("messages", format!("at most {MAX_MESSAGES} messages")));
    }
    messages
        .iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("role {other:?} is not supported (system, developer, user, assistant)"),
                    ));
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad(
                                    "messages",
                                    format!("content parts of type {kind:?} are not supported (text only)"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Why a reply ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Which endpoint answers: the objects differ in name and in where the text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// One reply's identity, shared by all its chunks.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
}

impl Reply {
    pub fn new(kind: Kind, model: String, fingerprint: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            kind,
            id: format!("{prefix}-{:x}{n:06x}", swarm::dht::now_ms()),
            created: swarm::dht::now_ms() / 1000,
            model,
            fingerprint,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        })
    }

    /// The whole reply (not streamed).
    pub fn complete(&self, text: &str, finish: Finish, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish.name(),
            }),
            Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish.name()}),
        };
        let mut out = self.envelope(false, json!([choice]));
        out["usage"] = usage.to_json();
        out
    }

    /// A streamed piece: the role first (chat), then text, then the finish reason.
    pub fn chunk(&self, role: bool, text: Option<&str>, finish: Option<Finish>, with_usage: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(Finish::name)})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish.map(Finish::name),
            }),
        };
        let mut out = self.envelope(true, json!([choice]));
        if with_usage {
            out["usage"] = Value::Null;
        }
        out
    }

    /// The last chunk of a stream with `include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut out = self.envelope(true, json!([]));
        out["usage"] = usage.to_json();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<(ChatRequest, Generation), ApiError> {
        let request: ChatRequest = parse(body.to_string().as_bytes())?;
        let generation = generation(&request.common)?;
        Ok((request, generation))
    }

    #[test]
    fn a_plain_chat_request_is_read_with_openais_defaults() {
        let (request, g) = chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "presence_penalty": 0, "n": 1, "logprobs": false, "stream": true,
            "stream_options": {"include_usage": true}, "stop": "\n", "user": "ignored",
        }))
        .expect("valid");
        assert_eq!(g.sampling.temperature, 1.0);
        assert_eq!(g.sampling.top_p, None);
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert!(g.stream && g.include_usage);
        assert_eq!(g.max_tokens, None);
        let m = messages(&request.messages).expect("messages");
        assert_eq!(m, vec![ChatMessage::new("user", "hi")]);
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let base = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            chat(body).map(|_| ()).expect_err("refused")
        };
        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (json!({"temperature": 3.5}), "temperature"),
            (json!({"temperature": -1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
        ] {
            let e = base(extra.clone());
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{extra}");
            assert_eq!(e.param, Some(param), "{extra}: {e:?}");
        }
        let e = parse::<ChatRequest>(br#"{"model": "m"}"#).expect_err("no messages");
        assert!(e.message.contains("messages"), "{e:?}");
        let request: ChatRequest =
            parse(br#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#).expect("parses");
        assert_eq!(messages(&request.messages).expect_err("role").param, Some("messages"));
    }

    #[test]
    fn chunks_have_the_shape_clients_read() {
        let reply = Reply::new(Kind::Chat, "m".into(), "fp".into());
        let first = reply.chunk(true, Some(""), None, false);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["choices"][0]["finish_reason"].is_null());
        let last = reply.chunk(false, None, Some(Finish::Length), true);
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert!(last["usage"].is_null() && last.get("usage").is_some());
        let usage = reply.usage_chunk(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        });
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        let text = Reply::new(Kind::Text, "m".into(), "fp".into()).complete("x", Finish::Stop, Usage::default());
        assert_eq!(text["object"], "text_completion");
        assert_eq!(text["choices"][0]["text"], "x");
    }
}

//! Jinja chat templates, rendered the way transformers' `apply_chat_template` does.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::TokenizerError;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings templates see as variables.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, TokenizerError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string/dict methods (`.strip()`, `.startswith()`, `.items()`) that templates
        // written for Jinja2 call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let source = source.into();
        env.add_template_owned(TEMPLATE_NAME, source.clone())?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Reads the template and BOS/EOS strings of a Hugging Face `tokenizer_config.json`. The
    /// template may be a string, a list of named templates (the `default` one is used), or,
    /// in newer checkpoints, a sibling `chat_template.jinja`/`chat_template.json` file.
    pub fn from_tokenizer_config(path: &Path) -> Result<ChatTemplate, TokenizerError> {
        let config = read_json(path)?;
        let bad = |reason: String| TokenizerError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let source = match config.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("chat_template list has no `default` entry".into()))?
                .to_string(),
            Some(Value::Null) | None => {
                sibling_template(path)?.ok_or_else(|| TokenizerError::NoChatTemplate(path.display().to_string()))?
            }
            Some(other) => {
                return Err(bad(format!("chat_template is {other}, expected a string or list")));
            }
        };
        let token = |key: &str| -> Result<String, TokenizerError> {
            Ok(match config.get(key) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{key} is neither a string nor {{content}}")))?
                    .to_string(),
            })
        };
        ChatTemplate::new(source, token("bos_token")?, token("eos_token")?)
    }

    /// The Jinja source, with the BOS and EOS strings it sees (to hand the template on).
    pub fn parts(&self) -> (&str, &str, &str) {
        (&self.source, &self.bos_token, &self.eos_token)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply should begin.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        Ok(template.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn sibling_template(config_path: &Path) -> Result<Option<String>, TokenizerError> {
    let Some(dir) = config_path.parent() else {
        return Ok(None);
    };
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| TokenizerError::Io { path: jinja, source });
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        return Ok(read_json(&json)?
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string));
    }
    Ok(None)
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format (for
/// example, roles out of order).
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)` (used by Llama 3.2 templates for the date line), in
/// UTC, for the common format codes.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let secs = web_time::SystemTime::now()
        .duration_since(web_time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (unix_secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let secs_of_day = unix_secs % 86_400;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{}", other.unwrap_or(' ')),
                ));
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(super) fn strftime_for_test(format: &str, unix_secs: u64) -> Result<String, minijinja::Error> {
    strftime(format, unix_secs)
}

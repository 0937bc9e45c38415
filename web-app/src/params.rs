//! The page URL's query string: a contract used by links and by checks outside the repo
//! (`?prompt=TEXT&send=1&temperature=T&max_tokens=N&speculative=K`), and its fragment, which browsers never
//! send to any server: a private swarm's key travels there (`#swarm_key=<64 hex digits>`).

/// The longest draft the page checks in one step.
pub const MAX_SPECULATIVE: usize = 16;
/// The draft length without `speculative=` in the URL: prompt lookup costs nothing when it
/// has no guess, and a step of a few more positions costs about what one does.
pub const DEFAULT_SPECULATIVE: usize = 4;

/// What the URL asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct PageParams {
    /// Prefills the message box.
    pub prompt: Option<String>,
    /// Sends `prompt` as soon as the model is ready.
    pub send: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<usize>,
    /// Speculative decoding's draft length (`speculative=K`, 0 to 16; 0 turns it off).
    pub speculative: Option<usize>,
    /// Relay addresses (repeatable); default: the relay that serves the page.
    pub relays: Vec<String>,
    /// A model fingerprint to pick instead of the first one found.
    pub model: Option<String>,
    /// `cpu` forces the WASM CPU backend even where WebGPU exists.
    pub force_cpu: bool,
    /// `head=remote` has a server's head service run the embeddings and LM head, as for a
    /// model too large for the tab.
    pub remote_head: bool,
    /// `view=tune` opens the Tune view instead of the chat.
    pub tune: bool,
    /// `view=monitor` opens the Monitor view (and loads no model until the chat is opened).
    pub monitor: bool,
    /// A private swarm's key as 64 hex digits, from the fragment (`#swarm_key=...`).
    pub swarm_key: Option<String>,
}

impl PageParams {
    /// Parses `search` (`?a=1&b=2`, as `location.search` gives it). Unknown keys are ignored;
    /// values that do not parse are dropped (the page's defaults apply).
    pub fn parse(search: &str) -> Self {
        let mut out = PageParams {
            prompt: None,
            send: false,
            temperature: None,
            top_p: None,
            max_tokens: None,
            speculative: None,
            relays: Vec::new(),
            model: None,
            force_cpu: false,
            remote_head: false,
            tune: false,
            monitor: false,
            swarm_key: None,
        };
        for pair in search.trim_start_matches('?').split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value);
            match key {
                "prompt" => out.prompt = Some(value),
                "send" => out.send = matches!(value.as_str(), "1" | "true" | "yes"),
                "temperature" => out.temperature = value.parse().ok().filter(|t: &f32| t.is_finite() && *t >= 0.0),
                "top_p" => out.top_p = value.parse().ok().filter(|p: &f32| *p > 0.0 && *p <= 1.0),
                "max_tokens" => out.max_tokens = value.parse().ok().filter(|n: &usize| *n > 0),
                "speculative" => out.speculative = value.parse().ok().filter(|k: &usize| *k <= MAX_SPECULATIVE),
                "relay" => out.relays.push(value),
                "model" => out.model = Some(value),
                "device" => out.force_cpu = value == "cpu",
                "head" => out.remote_head = value == "remote",
                "view" => {
                    out.tune = value == "tune";
                    out.monitor = value == "monitor";
                }
                _ => {}
            }
        }
        out
    }

    /// Adds what the fragment (`#a=1&b=2`, as `location.hash` gives it) holds.
    pub fn with_fragment(mut self, hash: &str) -> Self {
        for pair in hash.trim_start_matches('#').split('&').filter(|p| !p.is_empty()) {
            if let Some(("swarm_key", value)) = pair.split_once('=') {
                self.swarm_key = Some(decode(value).trim().to_string());
            }
        }
        self
    }
}

/// Percent-decoding with `+` as space (form encoding); invalid escapes are kept as typed.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract() {
        let p = PageParams::parse("?prompt=What+is+the%20capital%3F&send=1&temperature=0&max_tokens=12");
        assert_eq!(p.prompt.as_deref(), Some("What is the capital?"));
        assert!(p.send);
        assert_eq!(p.temperature, Some(0.0));
        assert_eq!(p.max_tokens, Some(12));
        assert_eq!(p.speculative, None);
        assert_eq!(PageParams::parse("?speculative=0").speculative, Some(0));
        assert_eq!(PageParams::parse("?speculative=6").speculative, Some(6));
        assert_eq!(PageParams::parse("?speculative=17").speculative, None, "over the cap");
        let bad = PageParams::parse("temperature=-1&max_tokens=0&top_p=2&prompt=%ZZ%4");
        assert_eq!((bad.temperature, bad.max_tokens, bad.top_p), (None, None, None));
        assert_eq!(bad.prompt.as_deref(), Some("%ZZ%4"));
        assert_eq!(decode("%E2%82%AC"), "€");
        assert!(PageParams::parse("?view=tune").tune);
        assert!(!PageParams::parse("?view=chat").tune);
        assert!(PageParams::parse("?view=monitor").monitor);
        assert!(!PageParams::parse("?view=tune").monitor);
        let key = "ab".repeat(32);
        let p = PageParams::parse("?swarm_key=00").with_fragment(&format!("#x=1&swarm_key={key}"));
        assert_eq!(
            p.swarm_key.as_deref(),
            Some(key.as_str()),
            "only the fragment, never the query"
        );
        assert_eq!(PageParams::parse("?swarm_key=00").swarm_key, None);
    }
}

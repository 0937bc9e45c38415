//! Incremental detokenization for streaming output.

use super::{Tokenizer, TokenizerError};

/// Turns ids arriving one at a time into text, emitting only complete characters.
///
/// Decoding token by token is wrong twice over: byte-level tokens can split a UTF-8 character
/// (so a lone token decodes to U+FFFD), and some decoders change a token's text depending on
/// what precedes it. So each step decodes the pending ids together with the last emitted ones
/// (as context), emits the text beyond that context, and holds it back while it ends in
/// U+FFFD.
///
/// A trailing U+FFFD is held however many ids it takes: from the text alone a character still
/// missing bytes cannot be told from a real U+FFFD (models emit those too), and emitting one
/// that later completes would show a U+FFFD that is not in the text. The wait ends with the
/// first character after it, or at [`TextStream::finish`].
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    /// `ids[..emitted]` were emitted last step (context); the rest are pending.
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one id; returns the text it completes (often empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let (context, full) = self.decode_window()?;
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match full.strip_prefix(context.as_str()) {
            Some("") => return Ok(String::new()),
            Some(new) => new.to_string(),
            // The decoder rewrote the context's text: what was emitted stays, and the stream
            // goes on from the first character that differs, rather than waiting for a prefix
            // that may never come back.
            None => after_common_prefix(&context, &full).to_string(),
        };
        // Only the ids just emitted stay as context, so the window stays short however long
        // the stream runs.
        self.ids.drain(..self.emitted);
        self.emitted = self.ids.len();
        Ok(new)
    }

    /// Returns whatever is held back (an incomplete character comes out as U+FFFD) and resets.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let (context, full) = self.decode_window()?;
        self.ids.clear();
        self.emitted = 0;
        Ok(match full.strip_prefix(context.as_str()) {
            Some(new) => new.to_string(),
            None => after_common_prefix(&context, &full).to_string(),
        })
    }

    fn decode_window(&self) -> Result<(String, String), TokenizerError> {
        let context = match self.ids.get(..self.emitted) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode(ids, self.skip_special)?,
            _ => String::new(),
        };
        let full = self.tokenizer.decode(&self.ids, self.skip_special)?;
        Ok((context, full))
    }
}

/// The part of `full` after the longest prefix it shares with `context`, cut at a character.
fn after_common_prefix<'f>(context: &str, full: &'f str) -> &'f str {
    let common = context
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(context.len().min(full.len()), |((i, _), _)| i);
    // `common` is a character boundary of `context`, and the bytes before it are equal in both.
    full.get(common..).unwrap_or(full)
}

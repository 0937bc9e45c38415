//! Incremental detokenization for streaming output.

use super::{Tokenizer, TokenizerError};

const MAX_PENDING: usize = 4;

/// Turns ids arriving one at a time into text, emitting only complete characters.
///
/// Decoding token by token is wrong twice over: byte-level tokens can split a UTF-8 character
/// (so a lone token decodes to U+FFFD), and some decoders change a token's text depending on
/// what precedes it. So each step decodes the pending ids together with the last emitted ones
/// (as context), emits the text beyond that context, and holds it back while it still ends in
/// U+FFFD.
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
        // A character is at most four bytes, so once that many ids are pending a trailing
        // U+FFFD is a real one (the model produced invalid UTF-8), not a split character.
        if full.ends_with('\u{FFFD}') && self.ids.len() - self.emitted < MAX_PENDING {
            return Ok(String::new());
        }
        // If the decoder rewrote the context, wait: the next id moves the window on.
        let new = match full.strip_prefix(context.as_str()) {
            Some(new) if !new.is_empty() => new.to_string(),
            _ => return Ok(String::new()),
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
            None => full,
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

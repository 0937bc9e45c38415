//! The reply's text as it streams: stop sequences end it (and never reach the client, not even
//! in part), and what is sent is always whole UTF-8 characters (the tokenizer's stream holds
//! back an incomplete one; this holds back a possible start of a stop sequence).

/// Text waiting to be sent, checked against the stop sequences.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

/// What the filter lets out for one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Text to send now (maybe empty); generation goes on.
    More(String),
    /// A stop sequence came: the text before it, and the reply ends.
    Stopped(String),
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Filtered {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return Filtered::Stopped(before);
        }
        let keep = self.held_back();
        let out = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        Filtered::More(out)
    }

    /// What is still held back once the reply has ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that could begin a stop sequence (on a char boundary).
    fn held_back(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if stop.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match f.push(p) {
                Filtered::More(s) => out.push_str(&s),
                Filtered::Stopped(s) => {
                    out.push_str(&s);
                    return (out, true);
                }
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn a_stop_sequence_split_over_pieces_never_leaks() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        let mut f = StopFilter::new(vec!["END".into()]);
        assert_eq!(f.push("hello E"), Filtered::More("hello ".into()));
        assert_eq!(f.push("N"), Filtered::More(String::new()));
        assert_eq!(f.push("x"), Filtered::More("ENx".into()));
    }

    #[test]
    fn without_a_stop_everything_comes_out_and_the_earliest_stop_wins() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["\n\n", "b"], &["a", "b\n\nc"]), ("a".into(), true));
        assert_eq!(run(&["zz"], &["ab", "cz"]), ("abcz".into(), false));
    }

    #[test]
    fn held_back_text_ends_on_a_character_boundary() {
        let mut f = StopFilter::new(vec!["é!".into()]);
        assert_eq!(f.push("café"), Filtered::More("caf".into()));
        assert_eq!(f.push("?"), Filtered::More("é?".into()));
    }
}

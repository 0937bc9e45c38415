//! Training data for prompt tuning: JSONL with one example a line, shared by `corolla train`
//! and the web page's Tune view so both read a file the same way.
//!
//! Each line is one of:
//! - `{"text": ...}`: causal LM, every token after the first is a target;
//! - `{"prompt": ..., "completion": ...}`: the loss covers the completion only;
//! - `{"token_ids": [...]}`: for models without a tokenizer.

use crate::tokenizer::Tokenizer;
use crate::tuning::Example;

/// Why a dataset was refused; `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the dataset holds no examples")]
    Empty,
}

/// What the model allows, checked for every example.
#[derive(Debug, Clone, Copy)]
pub struct DatasetLimits {
    pub vocab_size: usize,
    /// The model's context, if it has one; each example plus the prefix must fit.
    pub context: Option<usize>,
    pub prefix_len: usize,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    text: Option<String>,
    prompt: Option<String>,
    completion: Option<String>,
    token_ids: Option<Vec<u32>>,
}

/// Parses a JSONL dataset; blank lines are skipped.
pub fn parse_jsonl(
    text: &str,
    tokenizer: Option<&Tokenizer>,
    limits: DatasetLimits,
) -> Result<Vec<Example>, DatasetError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| DatasetError::Line { line: n + 1, reason };
        let encode = |s: &str| -> Result<Vec<u32>, DatasetError> {
            let tokenizer = tokenizer
                .ok_or_else(|| err("this model has no tokenizer: give {\"token_ids\": [...]} lines".into()))?;
            tokenizer.encode(s).map_err(|e| err(e.to_string()))
        };
        let parsed: Line = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let (ids, weights) = match parsed {
            Line {
                token_ids: Some(ids),
                text: None,
                prompt: None,
                completion: None,
            } => {
                let w = vec![1.0; ids.len()];
                (ids, w)
            }
            Line {
                text: Some(text),
                token_ids: None,
                prompt: None,
                completion: None,
            } => {
                let ids = encode(&text)?;
                let w = vec![1.0; ids.len()];
                (ids, w)
            }
            Line {
                prompt: Some(prompt),
                completion: Some(completion),
                text: None,
                token_ids: None,
            } => {
                let mut ids = encode(&prompt)?;
                let mut w = vec![0.0; ids.len()];
                let c = encode(&completion)?;
                w.extend(std::iter::repeat_n(1.0, c.len()));
                ids.extend(c);
                (ids, w)
            }
            _ => {
                return Err(err(
                    "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"token_ids\"}".into(),
                ));
            }
        };
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
            return Err(err(format!(
                "token id {id} is out of range for a vocabulary of {}",
                limits.vocab_size
            )));
        }
        if ids.len() < 2 || weights[1..].iter().all(|&w| w == 0.0) {
            return Err(err("needs at least two tokens and one target token".into()));
        }
        if let Some(context) = limits.context
            && ids.len() + limits.prefix_len > context
        {
            return Err(err(format!(
                "{} tokens plus the {}-position prefix exceed the model's context of {context}",
                ids.len(),
                limits.prefix_len
            )));
        }
        out.push(Example { ids, weights });
    }
    if out.is_empty() {
        return Err(DatasetError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DatasetLimits = DatasetLimits {
        vocab_size: 10,
        context: Some(8),
        prefix_len: 2,
    };

    #[test]
    fn token_lines_parse_and_blank_lines_are_skipped() {
        let ex = parse_jsonl("{\"token_ids\": [1, 2, 3]}\n\n{\"token_ids\": [4, 5]}\n", None, LIMITS).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].ids, [1, 2, 3]);
        assert_eq!(ex[1].weights, [1.0, 1.0]);
    }

    #[test]
    fn bad_lines_name_their_line_and_reason() {
        let cases = [
            ("{\"token_ids\": [1, 2]}\n{\"token_ids\": [1, 12]}", 2, "out of range"),
            ("{\"token_ids\": [1]}", 1, "at least two tokens"),
            ("{\"token_ids\": [1, 2, 3, 4, 5, 6, 7]}", 1, "context of 8"),
            ("{\"text\": \"hi\"}", 1, "no tokenizer"),
            ("{\"text\": \"hi\", \"token_ids\": [1, 2]}", 1, "expected"),
            ("{\"tokens\": [1, 2]}", 1, "unknown field"),
            ("not json", 1, "expected"),
        ];
        for (text, line, reason) in cases {
            match parse_jsonl(text, None, LIMITS) {
                Err(DatasetError::Line { line: l, reason: r }) => {
                    assert_eq!(l, line, "{text}");
                    assert!(r.contains(reason), "{text}: {r}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(parse_jsonl("\n \n", None, LIMITS), Err(DatasetError::Empty)));
    }
}

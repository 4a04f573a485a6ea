//! `tokenizer.json` + `tokenizer_config.json`: encoding prompts and decoding streamed tokens.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, LoadError, Result, SubmitError};

/// A Hugging Face tokenizer with the special tokens and chat template of its folder.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token id, if the tokenizer has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids named by `tokenizer_config.json`.
    pub eos_token_ids: Vec<u32>,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The BOS token's text, for chat templates.
    pub bos_token: Option<String>,
    /// The EOS token's text, for chat templates.
    pub eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json` may be a string or `{"content": ...}`.
fn special(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` from a model folder.
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let path = folder.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::from(LoadError::MissingFile { path, what: "tokenizer (tokenizer.json)" }));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::config_because(&path, "-", format!("not a valid tokenizer: {e}"), e))?;
        let cfg_path = folder.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() { crate::shape::read_json(&cfg_path)? } else { Value::Null };
        let bos_token = special(cfg.get("bos_token"));
        let eos_token = special(cfg.get("eos_token"));
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the one named "default".
            Some(Value::Array(items)) => items
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|i| i.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        Ok(TextTokenizer {
            bos_token_id: id(&bos_token),
            eos_token_ids: id(&eos_token).into_iter().collect(),
            inner,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// Encodes text as the model's tokenizer does by default (special tokens such as BOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Encodes text, adding the tokenizer's special tokens only if `add_special` is set
    /// (a rendered chat template already carries them).
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| Error::from(SubmitError::Tokenize(e)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes token ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::from(SubmitError::Tokenize(e)))
    }

    /// The number of entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text deltas, holding back bytes of an unfinished
/// UTF-8 character and re-decoding a short window so merges across tokens come out right.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder whose stream begins after `skip` tokens (the prompt).
    pub fn starting_at(skip: usize) -> Self {
        StreamDecoder { prefix_offset: skip, read_offset: skip }
    }

    /// The text added by the tokens of `ids` not yet seen, or an empty string if they do not
    /// yet form whole characters.
    pub fn next(&mut self, tok: &TextTokenizer, ids: &[u32]) -> Result<String> {
        let prefix = tok.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

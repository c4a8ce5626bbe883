//! `tokenizer.json` through the `tokenizers` crate (no hub access: the file must be local).
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::gguf::tokenizer::check_bpe_merges;

pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            anyhow::bail!("{}: no tokenizer.json", dir.display());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        let inner = parse_tokenizer(&text).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
        Ok(Self { inner, path })
    }

    /// Token ids of `text` without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("{}: cannot encode: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// A `tokenizer.json` text as a tokenizer. The `tokenizers` crate panics on some malformed files
/// (a BPE merge whose parts or result are not in the vocabulary), so those are checked first, and
/// any panic left is caught here and becomes an error.
pub fn parse_tokenizer(text: &str) -> Result<Tokenizer> {
    let json: Value = serde_json::from_str(text).map_err(|e| anyhow!("malformed JSON: {e}"))?;
    if let Some(model) = json.get("model").filter(|m| m.get("type").and_then(Value::as_str) == Some("BPE")) {
        check_bpe_model(model)?;
    }
    match std::panic::catch_unwind(|| Tokenizer::from_str(text)) {
        Ok(result) => result.map_err(|e| anyhow!("{e}")),
        Err(_) => bail!("the tokenizers library cannot read it (it panicked)"),
    }
}

/// The merges of a BPE `model` object against its vocabulary.
fn check_bpe_model(model: &Value) -> Result<()> {
    let empty = serde_json::Map::new();
    let vocab = model.get("vocab").and_then(Value::as_object).unwrap_or(&empty);
    let prefix = model.get("continuing_subword_prefix").and_then(Value::as_str).unwrap_or("");
    let merges = model.get("merges").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    // Merges are "a b" strings or ["a", "b"] pairs; other forms are left to the library to refuse.
    let pairs = merges.iter().filter_map(|merge| match merge {
        Value::String(s) => s.split_once(' '),
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.as_str(), b.as_str())),
            _ => None,
        },
        _ => None,
    });
    check_bpe_merges(|token| vocab.contains_key(token), pairs, prefix).map_err(|e| anyhow!("model.merges: {e}"))
}

//! `tokenizer.json` through the `tokenizers` crate (no hub access: the file must be local).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

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
        let inner = Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
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

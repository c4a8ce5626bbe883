//! Training a byte-level BPE tokenizer (GPT-2 style: bytes mapped to printable characters, the
//! GPT-2 split pattern, no normaliser) on a corpus, with one special token that serves as both
//! beginning and end of text. Used to give the tiny models `cargo xtask train-tiny` trains a
//! vocabulary of their own; the result is an ordinary `tokenizer.json`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

/// The special token that starts and ends every document (id 0 of a trained vocabulary).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Trains a byte-level BPE with `vocab_size` entries (the special token, the 256 byte symbols
/// and the merges) on `texts`. Deterministic: the trainer breaks ties between equally frequent
/// pairs by symbol id, and the byte alphabet is sorted.
pub fn train_byte_level_bpe<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<Tokenizer> {
    let alphabet = ByteLevel::alphabet();
    if vocab_size < alphabet.len() + 1 {
        bail!("a byte-level BPE needs a vocabulary of at least {} (256 bytes + {END_OF_TEXT}), got {vocab_size}", alphabet.len() + 1);
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(alphabet.into_iter().collect::<HashSet<char>>())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    // Offsets trimmed to the visible text, prefix space off: what GPT-2's tokenizer.json does.
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer: TokenizerImpl<ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
        TokenizerImpl::new(BPE::default().into());
    tokenizer.with_pre_tokenizer(Some(byte_level)).with_post_processor(Some(byte_level)).with_decoder(Some(byte_level));
    tokenizer.train(&mut trainer, texts).map_err(|e| anyhow!("BPE training failed: {e}"))?;
    let tokenizer = Tokenizer::from(tokenizer);
    let special = tokenizer.token_to_id(END_OF_TEXT);
    if special != Some(0) {
        bail!("BPE training put {END_OF_TEXT} at id {special:?}, expected 0");
    }
    Ok(tokenizer)
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` that lets transformers'
/// `AutoTokenizer` use it (fast tokenizer, `<|endoftext|>` as BOS/EOS) into `dir`.
pub fn save_tokenizer(tokenizer: &Tokenizer, dir: &Path, model_max_length: usize) -> Result<()> {
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    let config = tokenizer_config(model_max_length);
    let path = dir.join("tokenizer_config.json");
    let mut text = serde_json::to_string_pretty(&config).expect("JSON values always serialise");
    text.push('\n');
    std::fs::write(&path, text).map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))
}

fn tokenizer_config(model_max_length: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good \
        fortune, must be in want of a wife. However little known the feelings or views of such a man may be.";

    #[test]
    fn training_is_deterministic_and_round_trips() {
        let texts: Vec<String> = (0..20).map(|i| format!("{TEXT} {i}\n")).collect();
        let a = train_byte_level_bpe(texts.iter().map(String::as_str), 320).unwrap();
        let b = train_byte_level_bpe(texts.iter().map(String::as_str), 320).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert_eq!(a.get_vocab_size(true), 320);

        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(&a, dir.path(), 128).unwrap();
        let loaded = crate::TextTokenizer::load(dir.path()).unwrap();
        let sample = "a single man, in want of a wife — café 42\n";
        let ids = loaded.encode(sample).unwrap();
        // Merges learnt from the corpus make common words shorter than their bytes.
        assert!(ids.len() < sample.len(), "{} tokens for {} bytes", ids.len(), sample.len());
        assert_eq!(loaded.decode(&ids).unwrap(), sample);
        assert_eq!(loaded.token_id(END_OF_TEXT), Some(0));
        assert_eq!(ids, a.encode(sample, false).unwrap().get_ids());
    }

    #[test]
    fn too_small_a_vocabulary_is_refused() {
        let err = train_byte_level_bpe(std::iter::once(TEXT), 100).unwrap_err();
        assert!(err.to_string().contains("at least 257"), "{err}");
    }
}

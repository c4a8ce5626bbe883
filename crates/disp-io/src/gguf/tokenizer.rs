//! Rebuilds a Hugging Face `tokenizer.json` / `tokenizer_config.json` pair from the
//! `tokenizer.*` metadata of a GGUF file (byte-level BPE, `tokenizer.ggml.model = gpt2`).
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use std::collections::HashSet;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as PostProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::reader::GgufFile;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's pre-tokenizer split (the `llama-bpe` pre type); HF applies it before a regex-free
/// byte-level step.
const LLAMA3_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The rebuilt tokenizer plus what config.json needs from it.
pub(crate) struct TokenizerParts {
    pub tokenizer: Tokenizer,
    pub tokenizer_config: Value,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

fn optional_token_id(gguf: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    let Some(value) = gguf.get(key) else {
        return Ok(None);
    };
    let id = value.as_u64().ok_or_else(|| anyhow!("metadata {key} must be an integer, found {}", value.type_description()))?;
    ensure!(id < vocab_size as u64, "metadata {key} = {id} is outside the vocabulary of {vocab_size} tokens");
    Ok(Some(id as u32))
}

fn optional_bool(gguf: &GgufFile, key: &str) -> Result<Option<bool>> {
    gguf.get(key).map(|v| v.as_bool().ok_or_else(|| anyhow!("metadata {key} must be a bool, found {}", v.type_description()))).transpose()
}

/// Builds the tokenizer from `tokenizer.*` metadata. `model_max_length` goes into
/// tokenizer_config.json.
pub(crate) fn build_tokenizer(gguf: &GgufFile, model_max_length: Option<u64>) -> Result<TokenizerParts> {
    let model = match gguf.get("tokenizer.ggml.model") {
        None => bail!("the GGUF has no tokenizer (metadata tokenizer.ggml.model is missing)"),
        Some(v) => v.as_str().ok_or_else(|| anyhow!("metadata tokenizer.ggml.model must be a string, found {}", v.type_description()))?,
    };
    if model != "gpt2" {
        bail!("unsupported GGUF tokenizer model '{model}' (only 'gpt2' byte-level BPE is supported)");
    }

    let tokens = gguf
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .and_then(|a| a.as_strings())
        .ok_or_else(|| anyhow!("metadata tokenizer.ggml.tokens (array of string) is missing"))?;
    ensure!(!tokens.is_empty(), "metadata tokenizer.ggml.tokens is empty");
    let vocab_size = tokens.len();

    let merges_raw: &[String] = match gguf.get("tokenizer.ggml.merges") {
        None => &[],
        Some(v) => v
            .as_array()
            .and_then(|a| a.as_strings())
            .ok_or_else(|| anyhow!("metadata tokenizer.ggml.merges must be an array of string, found {}", v.type_description()))?,
    };
    let merges = merges_raw
        .iter()
        .enumerate()
        .map(|(i, merge)| match merge.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(anyhow!("tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by one space")),
        })
        .collect::<Result<Vec<_>>>()?;

    let token_types: Option<Vec<i64>> = match gguf.get("tokenizer.ggml.token_type") {
        None => None,
        Some(v) => {
            let types = v
                .as_array()
                .and_then(|a| a.to_i64_vec())
                .ok_or_else(|| anyhow!("metadata tokenizer.ggml.token_type must be an integer array, found {}", v.type_description()))?;
            ensure!(types.len() == vocab_size, "metadata tokenizer.ggml.token_type has {} entries but there are {vocab_size} tokens", types.len());
            Some(types)
        }
    };

    let bos = optional_token_id(gguf, "tokenizer.ggml.bos_token_id", vocab_size)?;
    let eos = optional_token_id(gguf, "tokenizer.ggml.eos_token_id", vocab_size)?;
    let unk = optional_token_id(gguf, "tokenizer.ggml.unknown_token_id", vocab_size)?;
    let pad = optional_token_id(gguf, "tokenizer.ggml.padding_token_id", vocab_size)?;
    let add_bos = optional_bool(gguf, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = optional_bool(gguf, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let chat_template = match gguf.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| anyhow!("metadata tokenizer.chat_template must be a string, found {}", v.type_description()))?),
    };
    let pre = match gguf.get("tokenizer.ggml.pre") {
        None => "default",
        Some(v) => v.as_str().ok_or_else(|| anyhow!("metadata tokenizer.ggml.pre must be a string, found {}", v.type_description()))?,
    };

    // The pre-tokenizer HF uses for each llama.cpp pre type we know; guessing for others would
    // silently tokenise differently, so they are refused.
    let byte_level_with_regex: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level_with_regex, false),
        "smollm" | "starcoder" | "refact" => (PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level_with_regex]).into(), false),
        "llama-bpe" | "llama3" => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT_REGEX.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("cannot compile the llama3 pre-tokenizer regex: {e}"))?;
            (PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into(), true)
        }
        other => bail!("unsupported GGUF pre-tokenizer 'tokenizer.ggml.pre = {other}'"),
    };

    // Keep the first id of a duplicated token: a JSON vocab cannot map one string to two ids.
    let mut vocab = Vocab::default();
    let mut duplicates = 0usize;
    for (id, token) in tokens.iter().enumerate() {
        if vocab.contains_key(token) {
            duplicates += 1;
        } else {
            vocab.insert(token.clone(), id as u32);
        }
    }
    if duplicates > 0 {
        tracing::warn!("{duplicates} duplicated GGUF tokens keep only their first id");
    }

    check_bpe_merges(|token| vocab.contains_key(token), merges.iter().map(|(a, b)| (a.as_str(), b.as_str())), "")
        .map_err(|e| anyhow!("tokenizer.ggml.merges: {e}"))?;
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(false).ignore_merges(ignore_merges);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(token_text(tokens, unk));
    }
    let bpe = bpe.build().map_err(|e| anyhow!("cannot build the BPE model from the GGUF vocabulary: {e}"))?;

    // Special (control/unknown) and user-defined tokens become added tokens so that they are
    // matched whole before BPE runs. Without token types, fall back to the named ids.
    let mut special_ids: Vec<u32> = Vec::new();
    let mut user_defined_ids: Vec<u32> = Vec::new();
    match &token_types {
        Some(types) => {
            for (id, &ty) in types.iter().enumerate() {
                match ty {
                    TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => special_ids.push(id as u32),
                    TOKEN_TYPE_USER_DEFINED => user_defined_ids.push(id as u32),
                    _ => {}
                }
            }
        }
        None => {
            let named: HashSet<u32> = [bos, eos, unk, pad].into_iter().flatten().collect();
            special_ids.extend(named);
            special_ids.sort_unstable();
        }
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let byte_level_post: PostProcessorWrapper = ByteLevel::new(false, false, true).into();
    let post_processor: PostProcessorWrapper = if add_bos || add_eos {
        let template = bos_eos_template(tokens, bos, eos, add_bos, add_eos)?;
        PostProcessorSequence::new(vec![byte_level_post, template.into()]).into()
    } else {
        byte_level_post
    };
    tokenizer.with_post_processor(Some(post_processor));
    let special_tokens: Vec<AddedToken> = special_ids.iter().map(|&id| AddedToken::from(token_text(tokens, id), true)).collect();
    tokenizer.add_special_tokens(special_tokens).map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
    let user_tokens: Vec<AddedToken> = user_defined_ids.iter().map(|&id| AddedToken::from(token_text(tokens, id), false).normalized(false)).collect();
    tokenizer.add_tokens(user_tokens).map_err(|e| anyhow!("cannot add user-defined tokens: {e}"))?;

    let mut added_tokens_decoder = Map::new();
    let mut added: Vec<(u32, bool)> = special_ids.iter().map(|&id| (id, true)).collect();
    added.extend(user_defined_ids.iter().map(|&id| (id, false)));
    added.sort_unstable();
    for (id, special) in added {
        added_tokens_decoder.insert(
            id.to_string(),
            json!({
                "content": token_text(tokens, id),
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": special,
            }),
        );
    }
    let mut config = Map::new();
    config.insert("add_bos_token".into(), add_bos.into());
    config.insert("add_eos_token".into(), add_eos.into());
    config.insert("added_tokens_decoder".into(), added_tokens_decoder.into());
    for (key, id) in [("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)] {
        if let Some(id) = id {
            config.insert(key.into(), token_text(tokens, id).into());
        }
    }
    if let Some(template) = chat_template {
        config.insert("chat_template".into(), template.into());
    }
    config.insert("clean_up_tokenization_spaces".into(), false.into());
    if let Some(n) = model_max_length {
        config.insert("model_max_length".into(), n.into());
    }
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());

    Ok(TokenizerParts { tokenizer, tokenizer_config: Value::Object(config), vocab_size, bos_token_id: bos, eos_token_id: eos, pad_token_id: pad })
}

/// The text of token `id`. Every id used here was checked against the vocabulary (named ids by
/// `optional_token_id`, the others come from enumerating it); an unknown one reads as "".
fn token_text(tokens: &[String], id: u32) -> String {
    tokens.get(id as usize).cloned().unwrap_or_default()
}

/// Checks what the `tokenizers` BPE builder assumes but does not check (it panics instead): both
/// parts of every merge and the token they make are in the vocabulary, and the second part starts
/// with the continuing-subword `prefix`.
pub fn check_bpe_merges<'a>(in_vocab: impl Fn(&str) -> bool, merges: impl Iterator<Item = (&'a str, &'a str)>, prefix: &str) -> Result<()> {
    for (i, (a, b)) in merges.enumerate() {
        for part in [a, b] {
            ensure!(in_vocab(part), "merge #{i} {a:?} + {b:?}: {part:?} is not in the vocabulary");
        }
        let Some(rest) = b.strip_prefix(prefix) else {
            bail!("merge #{i} {a:?} + {b:?}: {b:?} does not start with the subword prefix {prefix:?}");
        };
        let merged = format!("{a}{rest}");
        ensure!(in_vocab(&merged), "merge #{i} {a:?} + {b:?} makes {merged:?}, which is not in the vocabulary");
    }
    Ok(())
}

/// `<bos> $A <eos>` style post-processing for GGUFs that ask for BOS/EOS to be added.
fn bos_eos_template(tokens: &[String], bos: Option<u32>, eos: Option<u32>, add_bos: bool, add_eos: bool) -> Result<TemplateProcessing> {
    let mut special = Vec::new();
    let mut wrap = |flag: bool, id: Option<u32>, what: &str| -> Result<Option<String>> {
        if !flag {
            return Ok(None);
        }
        let id = id.ok_or_else(|| anyhow!("tokenizer.ggml.add_{what}_token is set but there is no {what} token id"))?;
        let token = token_text(tokens, id);
        ensure!(
            !token.contains(char::is_whitespace) && !token.starts_with('$'),
            "the {what} token {token:?} cannot be used in a post-processing template"
        );
        special.push((token.clone(), id));
        Ok(Some(token))
    };
    let bos_token = wrap(add_bos, bos, "bos")?;
    let eos_token = wrap(add_eos, eos, "eos")?;
    let piece = |sequence: &str, type_id: u32| {
        let mut parts = Vec::new();
        parts.extend(bos_token.iter().map(|t| format!("{t}:{type_id}")));
        parts.push(format!("${sequence}:{type_id}"));
        parts.extend(eos_token.iter().map(|t| format!("{t}:{type_id}")));
        parts.join(" ")
    };
    let single = piece("A", 0);
    let pair = format!("{} {}", piece("A", 0), piece("B", 1));
    special.dedup();
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow!("bad post-processing template {single:?}: {e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow!("bad post-processing template {pair:?}: {e}"))?
        .special_tokens(special)
        .build()
        .context("cannot build the BOS/EOS post-processing template")
}

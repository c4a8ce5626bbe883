//! `config.json`: reading it, telling the family apart, and the fields shared by families.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::Device;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::decoder::{BlockKeys, DecoderLm};
use crate::layers::Llama3Scaling;
use crate::weights::Checkpoint;
use crate::{llama, mistral, opt, phi, qwen2, qwen3};

/// The model families `disp` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Opt,
    Phi,
    Qwen2,
    Qwen3,
    Mistral,
}

/// How `config.json` names a family, its block's checkpoint names and its loader.
struct FamilyEntry {
    family: Family,
    model_type: &'static str,
    architecture: &'static str,
    keys: &'static BlockKeys,
    load: fn(&RawConfig, &Checkpoint, &Device) -> Result<DecoderLm>,
}

const FAMILIES: [FamilyEntry; 6] = [
    FamilyEntry { family: Family::Llama, model_type: "llama", architecture: "LlamaForCausalLM", keys: &llama::KEYS, load: llama::load },
    FamilyEntry { family: Family::Opt, model_type: "opt", architecture: "OPTForCausalLM", keys: &opt::KEYS, load: opt::load },
    FamilyEntry { family: Family::Phi, model_type: "phi", architecture: "PhiForCausalLM", keys: &phi::KEYS, load: phi::load },
    FamilyEntry { family: Family::Qwen2, model_type: "qwen2", architecture: "Qwen2ForCausalLM", keys: &llama::KEYS, load: qwen2::load },
    FamilyEntry { family: Family::Qwen3, model_type: "qwen3", architecture: "Qwen3ForCausalLM", keys: &qwen3::KEYS, load: qwen3::load },
    FamilyEntry { family: Family::Mistral, model_type: "mistral", architecture: "MistralForCausalLM", keys: &llama::KEYS, load: mistral::load },
];

impl Family {
    // The table is constants, not file input: every variant is listed once, in FAMILIES above.
    #[allow(clippy::expect_used)]
    fn entry(self) -> &'static FamilyEntry {
        FAMILIES.iter().find(|e| e.family == self).expect("every family has an entry")
    }

    pub fn model_type(self) -> &'static str {
        self.entry().model_type
    }

    /// The checkpoint names of a block's linears and norms.
    pub fn block_keys(self) -> &'static BlockKeys {
        self.entry().keys
    }

    /// Loads a model of this family (see [`crate::load_model_from`]).
    pub(crate) fn load(self, raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
        (self.entry().load)(raw, ck, device)
    }
}

/// A parsed `config.json` and where it came from.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub path: PathBuf,
    pub json: Value,
}

impl RawConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))?;
        if !json.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        Ok(Self { path, json })
    }

    /// The family, from `model_type` or else `architectures`.
    pub fn family(&self) -> Result<Family> {
        let model_type = self.json.get("model_type").and_then(Value::as_str);
        let architecture = self.json.get("architectures").and_then(Value::as_array).and_then(|a| a.first()).and_then(Value::as_str);
        let known = FAMILIES.iter().find(|e| match model_type {
            Some(model_type) => e.model_type == model_type,
            None => architecture == Some(e.architecture),
        });
        match (known, model_type.or(architecture)) {
            (Some(entry), _) => Ok(entry.family),
            (None, None) => bail!("{}: no 'model_type' or 'architectures' field", self.path.display()),
            (None, Some(name)) => {
                let supported: Vec<&str> = FAMILIES.iter().map(|e| e.model_type).collect();
                bail!("{}: unsupported architecture '{name}' (supported: {})", self.path.display(), supported.join(", "))
            }
        }
    }

    /// Deserialises the family's config struct, naming the file on error.
    pub fn parse<T: DeserializeOwned>(&self, family: &str) -> Result<T> {
        serde_json::from_value(self.json.clone()).map_err(|e| anyhow!("{}: invalid {family} config: {e}", self.path.display()))
    }

    pub fn error(&self, problem: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {problem}", self.path.display())
    }

    /// RoPE base and scaling, from the classic `rope_theta`/`rope_scaling` fields or the
    /// `rope_parameters` object newer transformers releases write.
    pub fn rope(&self, default_theta: f64) -> Result<(f64, Option<Llama3Scaling>)> {
        let params = self.json.get("rope_parameters").filter(|v| v.is_object());
        let theta = self
            .json
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(default_theta);
        let scaling = self.json.get("rope_scaling").filter(|v| v.is_object()).or(params);
        let Some(scaling) = scaling else { return Ok((theta, None)) };
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => Ok((theta, None)),
            "llama3" => {
                let field = |name: &str| {
                    scaling.get(name).and_then(Value::as_f64).ok_or_else(|| self.error(format!("rope scaling 'llama3' needs a numeric '{name}'")))
                };
                Ok((
                    theta,
                    Some(Llama3Scaling {
                        factor: field("factor")?,
                        low_freq_factor: field("low_freq_factor")?,
                        high_freq_factor: field("high_freq_factor")?,
                        original_max_position_embeddings: field("original_max_position_embeddings")?,
                    }),
                ))
            }
            other => bail!("{}: unsupported rope scaling '{other}' (supported: llama3)", self.path.display()),
        }
    }
}

impl RawConfig {
    /// `eos_token_id`, which HF configs write as a number or a list.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self.json.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => Vec::new(),
        }
    }
}

/// What a checkpoint can hold, for checking the sizes a config claims before anything is
/// allocated for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointCapacity {
    /// Weight files: their total size and tensor count. `pruned` when the block linears are
    /// stored cut to index sets (the dense sizes then exceed what is stored).
    Files { bytes: u64, tensors: usize, pruned: bool },
    /// Tensors in memory, or zeros made on request: only the memory limit applies.
    Memory,
}

/// The largest size field accepted. Fields that are not in the parameter bound (the number of
/// positions) are still multiplied with others by the loaders; this keeps such products in range.
const MAX_SIZE: u64 = u32::MAX as u64;

/// Bytes per value of the smallest dtype the loaders read (F16/BF16).
const MIN_STORED_BYTES_PER_VALUE: u128 = 2;
/// Bytes per value the models hold in memory (f32).
const HELD_BYTES_PER_VALUE: u128 = 4;

impl RawConfig {
    /// Checks the standard Hugging Face size fields of every family once, before a loader uses
    /// them: sizes are positive integers, heads divide as attention needs, RoPE base and norm
    /// epsilons are positive and finite, and the parameters the sizes imply fit both in the weight
    /// files (`capacity`) and in the available memory.
    pub fn validate(&self, capacity: CheckpointCapacity) -> Result<()> {
        let layers = self.size("num_hidden_layers")?;
        let hidden = self.size("hidden_size")?;
        let heads = self.size("num_attention_heads")?;
        let kv_heads = self.size("num_key_value_heads")?;
        let head_dim = self.size("head_dim")?;
        let vocab = self.size("vocab_size")?;
        let intermediate = self.size("intermediate_size")?;
        let ffn_dim = self.size("ffn_dim")?;
        let embed_dim = self.size("word_embed_proj_dim")?;
        let positions = self.size("max_position_embeddings")?;
        for key in ["rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"] {
            self.positive_number(&self.json, key)?;
        }
        if let Some(params) = self.json.get("rope_parameters").filter(|v| v.is_object()) {
            self.positive_number(params, "rope_theta")?;
        }
        for key in ["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"] {
            if let Some(eps) = self.json.get(key).and_then(Value::as_f64).filter(|&e| e >= 1.0) {
                bail!("{}: '{key}' = {eps} is not a small epsilon (must be below 1)", self.path.display());
            }
        }
        if let Some(factor) = self.json.get("partial_rotary_factor").and_then(Value::as_f64) {
            if !(factor > 0.0 && factor <= 1.0) {
                bail!("{}: 'partial_rotary_factor' = {factor} must be in (0, 1]", self.path.display());
            }
        }
        if let (Some(heads), Some(kv)) = (heads, kv_heads) {
            if heads % kv != 0 {
                bail!("{}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}", self.path.display());
            }
        }
        let (Some(layers), Some(hidden), Some(heads), Some(vocab)) = (layers, hidden, heads, vocab) else {
            // A missing field is reported by the family's own parser, which knows its defaults.
            return Ok(());
        };
        let head_dim = match head_dim {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => bail!("{}: hidden_size = {hidden} is not divisible by num_attention_heads = {heads} (and no head_dim)", self.path.display()),
        };
        let ff = intermediate.or(ffn_dim).unwrap_or(0);
        // OPT stores a learned embedding per position (plus its offset of 2); RoPE families none.
        let learned_positions = if self.family().ok() == Some(Family::Opt) { positions.unwrap_or(2048).saturating_add(2) } else { 0 };
        let claims = SizeClaims {
            layers,
            hidden,
            heads,
            kv_heads: kv_heads.unwrap_or(heads),
            head_dim,
            vocab,
            ff,
            embed_dim: embed_dim.unwrap_or(hidden),
            learned_positions,
        };
        self.check_capacity(claims, capacity)
    }

    fn check_capacity(&self, c: SizeClaims, capacity: CheckpointCapacity) -> Result<()> {
        // A lower bound on what every family stores: q/k/v/o, two MLP matrices, the embedding.
        // Saturating: the fields are u64 each, so products of three can pass u128.
        let product = |factors: &[u128]| factors.iter().fold(1u128, |acc, &f| acc.saturating_mul(f));
        let attention = product(&[2, c.hidden, c.head_dim, c.heads.saturating_add(c.kv_heads)]);
        let per_layer = attention.saturating_add(product(&[2, c.hidden, c.ff]));
        let embedding = product(&[c.vocab, c.embed_dim]).saturating_add(product(&[c.learned_positions, c.hidden]));
        let dense = product(&[c.layers, per_layer]).saturating_add(embedding);
        let claims = format!(
            "num_hidden_layers = {}, hidden_size = {}, vocab_size = {} and the head and MLP sizes imply at least {dense} parameters",
            c.layers, c.hidden, c.vocab
        );
        let held = match capacity {
            CheckpointCapacity::Files { bytes, tensors, pruned } => {
                if c.layers > tensors as u128 {
                    bail!("{}: num_hidden_layers = {} but the weight files hold only {tensors} tensors", self.path.display(), c.layers);
                }
                let bytes = u128::from(bytes);
                // Heads are never pruned: in a pruned folder q/k/v keep every output and o every
                // input (each block keeps at least one position of S1 and S2), so the attention
                // stores at least 2·(heads + kv_heads)·head_dim values per layer.
                let attention_uncut = product(&[c.layers, 2, c.head_dim, c.heads.saturating_add(c.kv_heads)]);
                let stored_at_least = if pruned { embedding.saturating_add(attention_uncut) } else { dense };
                if stored_at_least.saturating_mul(MIN_STORED_BYTES_PER_VALUE) > bytes {
                    let what = if pruned {
                        format!(
                            "vocab_size = {} x hidden_size = {} embedding values and {} layers of {} heads of head_dim {} (never pruned)",
                            c.vocab, c.embed_dim, c.layers, c.heads, c.head_dim
                        )
                    } else {
                        claims.clone()
                    };
                    bail!("{}: {what}, more than the {bytes} bytes of weight files can hold", self.path.display());
                }
                // Weights stay at their stored precision, so memory holds what the files hold (at
                // most the f32 size of the values a dense config claims; a pruned folder stores fewer).
                bytes.min(dense.saturating_mul(HELD_BYTES_PER_VALUE))
            }
            CheckpointCapacity::Memory => dense.saturating_mul(HELD_BYTES_PER_VALUE),
        };
        disp_core::memory::check_fits(&format!("{}: the model ({claims}, at their stored precision)", self.path.display()), held)
    }

    /// A size field: absent (or null), or an integer from 1 to [`MAX_SIZE`].
    fn size(&self, key: &str) -> Result<Option<u128>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(0) => bail!("{}: '{key}' is 0; it must be at least 1", self.path.display()),
                Some(n) if n > MAX_SIZE => bail!("{}: '{key}' = {n} is beyond any model (at most {MAX_SIZE})", self.path.display()),
                Some(n) => Ok(Some(n.into())),
                None => bail!("{}: '{key}' must be a positive integer, got {v}", self.path.display()),
            },
        }
    }

    /// A field of `object` that, when present, must be a finite number above 0.
    fn positive_number(&self, object: &Value, key: &str) -> Result<()> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(()),
                _ => bail!("{}: '{key}' must be a positive number, got {v}", self.path.display()),
            },
        }
    }
}

/// The sizes of a config that decide how much it stores (all at least 1).
#[derive(Debug, Clone, Copy)]
struct SizeClaims {
    layers: u128,
    hidden: u128,
    heads: u128,
    kv_heads: u128,
    head_dim: u128,
    vocab: u128,
    ff: u128,
    embed_dim: u128,
    /// Rows of a learned position embedding (0 without one).
    learned_positions: u128,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn config(edit: impl FnOnce(&mut Value)) -> RawConfig {
        let mut json = serde_json::json!({
            "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        });
        edit(&mut json);
        RawConfig { path: PathBuf::from("m/config.json"), json }
    }

    /// What the fixture-sized config needs: about 300 KB in f32.
    const FILES: CheckpointCapacity = CheckpointCapacity::Files { bytes: 1 << 20, tensors: 20, pruned: false };

    fn problem(edit: impl FnOnce(&mut Value), capacity: CheckpointCapacity) -> String {
        config(edit).validate(capacity).unwrap_err().to_string()
    }

    #[test]
    fn a_sound_config_passes_and_each_bad_field_is_named() {
        config(|_| {}).validate(FILES).unwrap();
        assert_eq!(problem(|c| c["hidden_size"] = 0.into(), FILES), "m/config.json: 'hidden_size' is 0; it must be at least 1");
        assert_eq!(problem(|c| c["vocab_size"] = (-3).into(), FILES), "m/config.json: 'vocab_size' must be a positive integer, got -3");
        assert_eq!(problem(|c| c["num_hidden_layers"] = 2.5.into(), FILES), "m/config.json: 'num_hidden_layers' must be a positive integer, got 2.5");
        assert!(problem(|c| c["max_position_embeddings"] = u64::MAX.into(), FILES)
            .contains("'max_position_embeddings' = 18446744073709551615 is beyond any model (at most 4294967295)"));
        assert_eq!(problem(|c| c["rms_norm_eps"] = 0.into(), FILES), "m/config.json: 'rms_norm_eps' must be a positive number, got 0");
        assert!(problem(|c| c["rms_norm_eps"] = 2.into(), FILES).contains("'rms_norm_eps' = 2 is not a small epsilon"));
        assert!(problem(|c| c["partial_rotary_factor"] = 1.5.into(), FILES).contains("'partial_rotary_factor' = 1.5 must be in (0, 1]"));
        assert!(
            problem(|c| c["num_key_value_heads"] = 3.into(), FILES).contains("num_attention_heads = 4 is not a multiple of num_key_value_heads = 3")
        );
        assert!(problem(|c| c["hidden_size"] = 66.into(), FILES).contains("hidden_size = 66 is not divisible by num_attention_heads = 4"));
        // An explicit head_dim lifts the divisibility requirement.
        config(|c| {
            c["hidden_size"] = 66.into();
            c["head_dim"] = 16.into();
        })
        .validate(FILES)
        .unwrap();
    }

    #[test]
    fn sizes_must_fit_the_weight_files_and_the_memory() {
        let small = CheckpointCapacity::Files { bytes: 1000, tensors: 20, pruned: false };
        let err = problem(|_| {}, small);
        assert!(err.contains("imply at least 73728 parameters, more than the 1000 bytes of weight files can hold"), "{err}");
        // A pruned folder stores less than its dense sizes; only the embedding is certain.
        config(|_| {}).validate(CheckpointCapacity::Files { bytes: 40_000, tensors: 20, pruned: true }).unwrap();
        // Found by the pruned-manifest fuzzer: a head_dim of 2^31 in a pruned folder's config
        // made the rotary table ask for 8 GiB; the unpruned attention outputs bound it.
        let pruned = CheckpointCapacity::Files { bytes: 40_000, tensors: 20, pruned: true };
        let err = problem(|c| c["head_dim"] = (1u64 << 31).into(), pruned);
        assert!(err.contains("head_dim 2147483648 (never pruned)") && err.contains("more than the 40000 bytes"), "{err}");
        let err = problem(|_| {}, CheckpointCapacity::Files { bytes: 1000, tensors: 20, pruned: true });
        assert!(err.contains("vocab_size = 256 x hidden_size = 64 embedding values"), "{err}");
        let err = problem(|c| c["num_hidden_layers"] = 10_000_000.into(), FILES);
        assert!(err.contains("num_hidden_layers = 10000000 but the weight files hold only 20 tensors"), "{err}");
        // In memory, sizes are bounded by what can be allocated; OPT's learned positions count.
        if disp_core::memory::available_bytes().is_some() {
            let err = problem(|c| c["num_hidden_layers"] = 10_000_000.into(), CheckpointCapacity::Memory);
            assert!(err.contains("of memory are available"), "{err}");
            let opt_positions = |c: &mut Value| {
                c["model_type"] = "opt".into();
                c["max_position_embeddings"] = 4_000_000_000u64.into();
            };
            let err = problem(opt_positions, CheckpointCapacity::Memory);
            assert!(err.contains("of memory are available"), "{err}");
            config(|c| c["max_position_embeddings"] = 4_000_000_000u64.into()).validate(CheckpointCapacity::Memory).unwrap();
        }
    }
}

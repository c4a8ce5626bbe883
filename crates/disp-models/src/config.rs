//! `config.json`: reading it, telling the family apart, and the fields shared by families.

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
        let json: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))?;
        if !json.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        Ok(Self { path, json })
    }

    /// The family, from `model_type` or else `architectures`.
    pub fn family(&self) -> Result<Family> {
        let model_type = self.json.get("model_type").and_then(Value::as_str);
        let architecture = self
            .json
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
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
        serde_json::from_value(self.json.clone())
            .map_err(|e| anyhow!("{}: invalid {family} config: {e}", self.path.display()))
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
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match kind {
            "default" => Ok((theta, None)),
            "llama3" => {
                let field = |name: &str| {
                    scaling
                        .get(name)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| self.error(format!("rope scaling 'llama3' needs a numeric '{name}'")))
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

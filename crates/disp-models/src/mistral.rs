//! Mistral family (`MistralForCausalLM`): the LLaMA block with grouped-query attention and no
//! biases, every layer attending over a sliding window of `sliding_window` positions.

use anyhow::Result;
use burn::tensor::Device;
use serde_json::Value;

use crate::config::{Family, RawConfig};
use crate::decoder::DecoderLm;
use crate::llama::{self, LlamaConfig, LlamaVariant};
use crate::weights::Checkpoint;

/// transformers' `MistralConfig.sliding_window` when a config has none (`null` turns it off).
const DEFAULT_WINDOW: usize = 4096;

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: LlamaConfig = raw.parse("Mistral")?;
    let window = match raw.json.get("sliding_window") {
        None => Some(DEFAULT_WINDOW),
        Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(window) if window > 0 => Some(window as usize),
            _ => return Err(raw.error(format!("sliding_window must be a positive integer or null, not {value}"))),
        },
    };
    let variant = LlamaVariant { family: Family::Mistral, keys: &llama::KEYS, qkv_bias: false, out_bias: false, mlp_bias: false, window };
    llama::load_variant(raw, ck, device, &config, variant)
}

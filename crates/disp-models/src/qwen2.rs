//! Qwen2 / Qwen2.5 family (`Qwen2ForCausalLM`): the LLaMA block with biases on q, k and v (not
//! on the output projection), grouped-query attention, and tied embeddings in the small models.

use anyhow::Result;
use burn::tensor::Device;
use serde_json::Value;

use crate::config::{Family, RawConfig};
use crate::decoder::DecoderLm;
use crate::llama::{self, LlamaConfig, LlamaVariant};
use crate::weights::Checkpoint;

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: LlamaConfig = raw.parse("Qwen2")?;
    refuse_sliding_layers(raw)?;
    let variant = LlamaVariant { family: Family::Qwen2, keys: &llama::KEYS, qkv_bias: true, out_bias: false, mlp_bias: false, window: None };
    llama::load_variant(raw, ck, device, &config, variant)
}

/// Qwen2 and Qwen3 configs can give the layers from `max_window_layers` on a sliding window
/// (`use_sliding_window`, or `layer_types` naming `sliding_attention`); released checkpoints do
/// not, and such a config is refused rather than run with full attention.
pub(crate) fn refuse_sliding_layers(raw: &RawConfig) -> Result<()> {
    let enabled = raw.json.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false);
    let layer_types = raw.json.get("layer_types").and_then(Value::as_array);
    let sliding = layer_types.is_some_and(|types| types.iter().any(|t| t.as_str() == Some("sliding_attention")));
    if enabled || sliding {
        return Err(raw.error("sliding-window layers (use_sliding_window) are not supported for Qwen models"));
    }
    Ok(())
}

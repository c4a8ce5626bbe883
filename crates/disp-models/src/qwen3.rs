//! Qwen3 family (`Qwen3ForCausalLM`): the LLaMA block with an RMSNorm over each query and key
//! head before the rotary embedding, no biases (unless `attention_bias`), and a `head_dim` of
//! its own (128 unless the config says otherwise), not `hidden_size / heads`.

use anyhow::Result;
use burn::tensor::Device;

use crate::config::{Family, RawConfig};
use crate::decoder::{BlockKeys, DecoderLm};
use crate::llama::{self, LlamaConfig, LlamaVariant};
use crate::weights::Checkpoint;

pub const KEYS: BlockKeys = BlockKeys { qk_norms: Some(["self_attn.q_norm", "self_attn.k_norm"]), ..llama::KEYS };

/// transformers' `Qwen3Config.head_dim` when a config has none.
const DEFAULT_HEAD_DIM: usize = 128;

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: LlamaConfig = raw.parse("Qwen3")?;
    crate::qwen2::refuse_sliding_layers(raw)?;
    let config = LlamaConfig { head_dim: Some(config.head_dim.unwrap_or(DEFAULT_HEAD_DIM)), ..config };
    let bias = config.attention_bias;
    let variant = LlamaVariant { family: Family::Qwen3, keys: &KEYS, qkv_bias: bias, out_bias: bias, mlp_bias: false, window: None };
    llama::load_variant(raw, ck, device, &config, variant)
}

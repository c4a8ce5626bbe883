//! LLaMA family (`LlamaForCausalLM`): RMSNorm, rotary attention with grouped-query heads and a
//! SwiGLU MLP. Covers LLaMA 1/2/3, SmolLM and similar checkpoints, and is the base of the
//! LLaMA-like families (Qwen2, Qwen3, Mistral), which differ only in biases, q/k norms and the
//! attention window ([`LlamaVariant`]).

use anyhow::Result;
use burn::tensor::Device;
use serde::Deserialize;

use crate::config::{Family, RawConfig};
use crate::decoder::{load_blocks, BlockKeys, BlockSpec, DecoderLm, Ends, NormKind, Wiring};
use crate::layers::{Activation, Rope};
use crate::weights::Checkpoint;

/// The block names of LLaMA and the checkpoints that copy its layout.
pub const KEYS: BlockKeys = BlockKeys {
    attn_inputs: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    attn_output: "self_attn.o_proj",
    mlp_inputs: &["mlp.gate_proj", "mlp.up_proj"],
    mlp_output: "mlp.down_proj",
    attn_norm: "input_layernorm",
    mlp_norm: Some("post_attention_layernorm"),
    qk_norms: None,
};

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// The fields of an HF `LlamaConfig` that change the computation (shared by the LLaMA-like
/// families; each reads its own extras from the raw config).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

/// What a LLaMA-like family changes in the LLaMA block.
pub struct LlamaVariant {
    pub family: Family,
    pub keys: &'static BlockKeys,
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub mlp_bias: bool,
    /// Sliding-window length of every layer (`None`: full causal attention).
    pub window: Option<usize>,
}

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: LlamaConfig = raw.parse("LLaMA")?;
    let (bias, mlp_bias) = (config.attention_bias, config.mlp_bias);
    let variant = LlamaVariant { family: Family::Llama, keys: &KEYS, qkv_bias: bias, out_bias: bias, mlp_bias, window: None };
    load_variant(raw, ck, device, &config, variant)
}

/// Loads a LLaMA-like model: blocks `model.layers.{i}`, then `model.embed_tokens`, the head
/// (`lm_head` or tied) and `model.norm`.
pub fn load_variant(raw: &RawConfig, ck: &Checkpoint, device: &Device, config: &LlamaConfig, variant: LlamaVariant) -> Result<DecoderLm> {
    let name = variant.family.model_type();
    let activation = Activation::from_hf_name(&config.hidden_act)
        .ok_or_else(|| raw.error(format!("unsupported hidden_act '{}' for {name} (supported: {})", config.hidden_act, Activation::SUPPORTED)))?;
    if config.num_attention_heads == 0 || config.kv_heads() == 0 || !config.num_attention_heads.is_multiple_of(config.kv_heads()) {
        return Err(raw.error("num_attention_heads must be a multiple of num_key_value_heads"));
    }
    let hd = config.head_dim();
    if hd == 0 || !hd.is_multiple_of(2) {
        return Err(raw.error(format!("head_dim {hd} must be even and positive for rotary embeddings")));
    }
    let (theta, scaling) = raw.rope(10_000.0)?;
    let (d, heads, kv_heads) = (config.hidden_size, config.num_attention_heads, config.kv_heads());
    let mut shape = BlockSpec::shape_without_biases(d, config.intermediate_size, heads, kv_heads, hd, variant.keys.mlp_kind());
    (shape.qkv_bias, shape.out_bias) = (variant.qkv_bias, variant.out_bias);
    (shape.mlp_in_bias, shape.mlp_out_bias) = (variant.mlp_bias, variant.mlp_bias);
    let norm = NormKind::Rms { eps: config.rms_norm_eps };
    let rope = Some(Rope::new(theta, hd, hd, scaling));
    let spec = BlockSpec { shape, heads, kv_heads, head_dim: hd, rope, activation, wiring: Wiring::PreNorm, norm };
    let windows = vec![variant.window; config.num_hidden_layers];
    let blocks = load_blocks(ck, "model.layers", variant.keys, &spec, &windows, device)?;
    let tied = config.tie_word_embeddings;
    let ends = Ends::load_rotary(ck, [config.vocab_size, d], (norm, "model.norm"), tied, false, device)?;
    let max_positions = config.max_position_embeddings;
    Ok(DecoderLm::new(variant.family, spec, blocks, ends, max_positions, device))
}

//! Phi family (`PhiForCausalLM`, Phi-1, Phi-1.5, Phi-2): one LayerNorm per block feeding
//! attention and MLP in parallel, partial rotary embeddings, biases on every linear and on the
//! head.

use anyhow::Result;
use burn::tensor::Device;
use disp_core::params::MlpKind;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Family, RawConfig};
use crate::decoder::{load_blocks, BlockKeys, BlockSpec, DecoderLm, Ends, NormKind, Wiring};
use crate::layers::{Activation, Rope};
use crate::weights::Checkpoint;

pub const KEYS: BlockKeys = BlockKeys {
    attn_inputs: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    attn_output: "self_attn.dense",
    mlp_inputs: &["mlp.fc1"],
    mlp_output: "mlp.fc2",
    attn_norm: "input_layernorm",
    mlp_norm: None,
    qk_norms: None,
};

/// transformers' `PhiConfig` fills in this rotary fraction when a config names none.
const DEFAULT_PARTIAL_ROTARY_FACTOR: f64 = 0.5;

fn default_eps() -> f64 {
    1e-5
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "gelu_new".into()
}

/// The fields of an HF `PhiConfig` that change the computation; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct PhiConfig {
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
    pub layer_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub qk_layernorm: bool,
}

impl PhiConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// The rotary fraction, top level in configs from older transformers and inside
/// `rope_parameters` in transformers 5 ones.
fn partial_rotary_factor(raw: &RawConfig) -> Result<f64> {
    let top = raw.json.get("partial_rotary_factor");
    let nested = raw.json.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor"));
    match top.or(nested) {
        None | Some(Value::Null) => Ok(DEFAULT_PARTIAL_ROTARY_FACTOR),
        Some(v) => v.as_f64().ok_or_else(|| raw.error("partial_rotary_factor must be a number")),
    }
}

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: PhiConfig = raw.parse("Phi")?;
    if config.qk_layernorm {
        return Err(raw.error("qk_layernorm is not supported"));
    }
    let activation = Activation::from_hf_name(&config.hidden_act)
        .ok_or_else(|| raw.error(format!("unsupported hidden_act '{}' for phi (supported: {})", config.hidden_act, Activation::SUPPORTED)))?;
    let (heads, kv_heads) = (config.num_attention_heads, config.kv_heads());
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(raw.error("num_attention_heads must be a multiple of num_key_value_heads"));
    }
    let hd = config.head_dim();
    // transformers truncates head_dim × factor to an integer, as here.
    let rotary_dim = (hd as f64 * partial_rotary_factor(raw)?) as usize;
    if rotary_dim == 0 || rotary_dim > hd || !rotary_dim.is_multiple_of(2) {
        return Err(raw.error(format!("partial_rotary_factor gives {rotary_dim} rotary dims of head_dim {hd}; need an even number in 2..={hd}")));
    }
    let (theta, scaling) = raw.rope(10_000.0)?;
    let (d, v) = (config.hidden_size, config.vocab_size);
    let mut shape = BlockSpec::shape_without_biases(d, config.intermediate_size, heads, kv_heads, hd, MlpKind::TwoMatrix);
    (shape.qkv_bias, shape.out_bias, shape.mlp_in_bias, shape.mlp_out_bias) = (true, true, true, true);
    let norm = NormKind::Layer { eps: config.layer_norm_eps, affine: true };
    let rope = Some(Rope::new(theta, hd, rotary_dim, scaling));
    let spec = BlockSpec { shape, heads, kv_heads, head_dim: hd, rope, activation, wiring: Wiring::Parallel, norm };
    let blocks = load_blocks(ck, "model.layers", &KEYS, &spec, &vec![None; config.num_hidden_layers], device)?;
    // The head keeps its bias even when its weight is tied.
    let final_norm = (norm, "model.final_layernorm");
    let ends = Ends::load_rotary(ck, [v, d], final_norm, config.tie_word_embeddings, true, device)?;
    let max_positions = config.max_position_embeddings;
    Ok(DecoderLm::new(Family::Phi, spec, blocks, ends, max_positions, device))
}

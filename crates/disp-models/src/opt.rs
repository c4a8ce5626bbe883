//! OPT family (`OPTForCausalLM`): learned positional embeddings, LayerNorm before (OPT-125m,
//! 1.3b, ...) or after (OPT-350m) each sub-block, an fc1/fc2 MLP, biases on every linear, and an
//! optional `project_in`/`project_out` pair when the word embeddings are narrower than the blocks.

use anyhow::Result;
use burn::tensor::Device;
use disp_core::params::MlpKind;
use serde::Deserialize;

use crate::config::{Family, RawConfig};
use crate::decoder::{load_blocks, BlockKeys, BlockSpec, DecoderLm, Ends, LearnedPositions, NormKind, Wiring};
use crate::layers::{Activation, Linear};
use crate::weights::Checkpoint;

pub const KEYS: BlockKeys = BlockKeys {
    attn_inputs: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    attn_output: "self_attn.out_proj",
    mlp_inputs: &["fc1"],
    mlp_output: "fc2",
    attn_norm: "self_attn_layer_norm",
    // Before fc1 when pre-LN, after the residual add when post-LN.
    mlp_norm: Some("final_layer_norm"),
    qk_norms: None,
};

/// OPT's learned position table has two extra leading rows (a fairseq leftover for the padding
/// index): position `p` reads row `p + 2`.
const POSITION_OFFSET: usize = 2;

/// `nn.LayerNorm`'s default; OPT configs have no field for it.
const LAYER_NORM_EPS: f64 = 1e-5;

fn yes() -> bool {
    true
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "relu".into()
}

/// The fields of an HF `OPTConfig` that change the computation; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Width of the token embeddings and the head; `hidden_size` when absent.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub activation_function: String,
}

impl OptConfig {
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
}

pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<DecoderLm> {
    let config: OptConfig = raw.parse("OPT")?;
    let activation = Activation::from_hf_name(&config.activation_function).ok_or_else(|| {
        raw.error(format!("unsupported activation_function '{}' for opt (supported: {})", config.activation_function, Activation::SUPPORTED))
    })?;
    let (d, heads) = (config.hidden_size, config.num_attention_heads);
    if heads == 0 || !d.is_multiple_of(heads) {
        return Err(raw.error("hidden_size must be a multiple of num_attention_heads"));
    }
    // transformers 5 saves `model.decoder.*`; the facebook/opt-* files on the Hub `decoder.*`.
    let root =
        if !ck.contains("model.decoder.embed_tokens.weight") && ck.contains("decoder.embed_tokens.weight") { "decoder" } else { "model.decoder" };
    let mut shape = BlockSpec::shape_without_biases(d, config.ffn_dim, heads, heads, d / heads, MlpKind::TwoMatrix);
    let bias = config.enable_bias;
    (shape.qkv_bias, shape.out_bias, shape.mlp_in_bias, shape.mlp_out_bias) = (bias, bias, bias, bias);
    let norm = NormKind::Layer { eps: LAYER_NORM_EPS, affine: config.layer_norm_elementwise_affine };
    let wiring = if config.do_layer_norm_before { Wiring::PreNorm } else { Wiring::PostNorm };
    let spec = BlockSpec { shape, heads, kv_heads: heads, head_dim: d / heads, rope: None, activation, wiring, norm };
    let blocks = load_blocks(ck, &format!("{root}.layers"), &KEYS, &spec, &vec![None; config.num_hidden_layers], device)?;

    let (e, v) = (config.embed_dim(), config.vocab_size);
    let (project_in, project_out) = if e != d {
        let project_in = Linear::load(ck, &format!("{root}.project_in"), e, d, false, device)?;
        (Some(project_in), Some(Linear::load(ck, &format!("{root}.project_out"), d, e, false, device)?))
    } else {
        (None, None)
    };
    // transformers builds the decoder's final layer norm only for pre-LN models.
    let has_final_norm = config.do_layer_norm_before && !config.remove_final_layer_norm;
    let final_norm = if has_final_norm { Some(norm.load(ck, &format!("{root}.final_layer_norm"), d, device)?) } else { None };
    let tokens = ck.tensor_stored(&format!("{root}.embed_tokens.weight"), [v, e], device)?;
    let rows = config.max_position_embeddings + POSITION_OFFSET;
    let table = ck.tensor(&format!("{root}.embed_positions.weight"), [rows, d], device)?;
    let positions = Some(LearnedPositions { table, offset: POSITION_OFFSET });
    let head = Ends::load_head(ck, &tokens, config.tie_word_embeddings, false, device)?;
    let ends = Ends { tokens, positions, project_in, project_out, final_norm, head, tied: config.tie_word_embeddings };
    let max_positions = config.max_position_embeddings;
    Ok(DecoderLm::new(Family::Opt, spec, blocks, ends, max_positions, device))
}

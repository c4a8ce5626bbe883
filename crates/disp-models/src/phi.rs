//! Phi family (`PhiForCausalLM`, Phi-1, Phi-1.5, Phi-2): one LayerNorm per block feeding
//! attention and MLP in parallel, partial rotary embeddings, biases on every linear and on the
//! head.

use anyhow::{bail, Result};
use burn::tensor::{Device, Int, Tensor};
use disp_core::params::{BlockShape, MlpKind, ModelShape};
use disp_core::plan::PruningPlan;
use disp_core::selection::{BlockGates, BlockIndices, Selector, Site};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Family, RawConfig};
use crate::layers::{causal_attention, split_heads, Activation, KvCache, LayerNorm, Linear, Rope};
use crate::weights::Checkpoint;
use crate::{BlockLinears, CausalLm};

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

    fn block_shape(&self) -> BlockShape {
        BlockShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            q_dim: self.num_attention_heads * self.head_dim(),
            kv_dim: self.kv_heads() * self.head_dim(),
            mlp: MlpKind::TwoMatrix,
            qkv_bias: true,
            out_bias: true,
            mlp_in_bias: true,
            mlp_out_bias: true,
        }
    }

    /// Parameters stored outside the block linears: token embeddings, the per-block and final
    /// LayerNorms (weight and bias), the head's weight unless tied, and the head's bias (kept
    /// even when the weight is tied).
    fn other_params(&self) -> u64 {
        let (d, v) = (self.hidden_size, self.vocab_size);
        let embed = v * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d } + v;
        let norms = (self.num_hidden_layers + 1) * 2 * d;
        (embed + head + norms) as u64
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

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: LayerNorm,
    self_attn: Attention,
    mlp: Mlp,
    /// Set once the layer is pruned: its weights are then cut to these positions.
    kept: Option<BlockIndices>,
}

/// A Phi causal LM, dense or pruned.
#[derive(Debug, Clone)]
pub struct Phi {
    config: PhiConfig,
    activation: Activation,
    embed_tokens: Tensor<2>,
    layers: Vec<DecoderLayer>,
    final_layernorm: LayerNorm,
    /// `hidden -> vocab` with bias; the weight is the transposed embedding when tied.
    lm_head: Linear,
    rope: Rope,
    device: Device,
}

impl Phi {
    pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<Self> {
        let config: PhiConfig = raw.parse("Phi")?;
        if config.qk_layernorm {
            return Err(raw.error("qk_layernorm is not supported"));
        }
        let activation = Activation::from_hf_name(&config.hidden_act).ok_or_else(|| {
            raw.error(format!(
                "unsupported hidden_act '{}' for phi (supported: {})",
                config.hidden_act,
                Activation::SUPPORTED
            ))
        })?;
        if config.num_attention_heads == 0 || config.kv_heads() == 0 || !config.num_attention_heads.is_multiple_of(config.kv_heads()) {
            return Err(raw.error("num_attention_heads must be a multiple of num_key_value_heads"));
        }
        let hd = config.head_dim();
        // transformers truncates head_dim × factor to an integer, as here.
        let rotary_dim = (hd as f64 * partial_rotary_factor(raw)?) as usize;
        if rotary_dim == 0 || rotary_dim > hd || !rotary_dim.is_multiple_of(2) {
            return Err(raw.error(format!(
                "partial_rotary_factor gives {rotary_dim} rotary dims of head_dim {hd}; need an even number in 2..={hd}"
            )));
        }
        let (theta, scaling) = raw.rope(10_000.0)?;
        let (d, ff, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (q_dim, kv_dim) = (config.num_attention_heads * hd, config.kv_heads() * hd);
        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: LayerNorm::load(ck, &format!("{p}.input_layernorm"), d, eps, device)?,
                self_attn: Attention {
                    q_proj: Linear::load(ck, &format!("{p}.self_attn.q_proj"), d, q_dim, true, device)?,
                    k_proj: Linear::load(ck, &format!("{p}.self_attn.k_proj"), d, kv_dim, true, device)?,
                    v_proj: Linear::load(ck, &format!("{p}.self_attn.v_proj"), d, kv_dim, true, device)?,
                    dense: Linear::load(ck, &format!("{p}.self_attn.dense"), q_dim, d, true, device)?,
                },
                mlp: Mlp {
                    fc1: Linear::load(ck, &format!("{p}.mlp.fc1"), d, ff, true, device)?,
                    fc2: Linear::load(ck, &format!("{p}.mlp.fc2"), ff, d, true, device)?,
                },
                kept: ck.kept_indices(i, device),
            });
        }
        let embed_tokens = ck.tensor("model.embed_tokens.weight", [v, d], device)?;
        let lm_head = if config.tie_word_embeddings {
            Linear { weight: embed_tokens.clone().transpose(), bias: Some(ck.tensor("lm_head.bias", [v], device)?) }
        } else {
            Linear::load(ck, "lm_head", d, v, true, device)?
        };
        Ok(Self {
            rope: Rope::new(theta, hd, rotary_dim, scaling),
            final_layernorm: LayerNorm::load(ck, "model.final_layernorm", d, eps, device)?,
            activation,
            embed_tokens,
            layers,
            lm_head,
            config,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }
}

impl DecoderLayer {
    /// One block through `sel`: attention (S1 -> S2) and MLP (S3 -> S4 -> S5) both read the one
    /// normalised copy of the block input and both add into the residual, so neither sees the
    /// other's output.
    fn forward(&self, x: Tensor<3>, sel: Selector, model: &Phi, start: usize, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let (cfg, rope) = (&model.config, &model.rope);
        let hd = cfg.head_dim();
        let normed = self.input_layernorm.forward(x.clone());

        let attn_in = sel.read(Site::AttnIn, normed.clone());
        let q = rope.apply(split_heads(self.self_attn.q_proj.forward(attn_in.clone()), cfg.num_attention_heads, hd), start);
        let k = rope.apply(split_heads(self.self_attn.k_proj.forward(attn_in.clone()), cfg.kv_heads(), hd), start);
        let v = split_heads(self.self_attn.v_proj.forward(attn_in), cfg.kv_heads(), hd);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let context = causal_attention(q, k, v, start);
        sel.observe_attention_context(&context);
        let attn = self.self_attn.dense.forward(context);

        let mlp_in = sel.read(Site::MlpIn, normed);
        let inter = model.activation.forward(self.mlp.fc1.forward(mlp_in));
        let mlp = self.mlp.fc2.forward(sel.scale_intermediate(inter));

        sel.write(Site::MlpOut, sel.write(Site::AttnOut, x, attn), mlp)
    }

    fn pruned(&self, kept: BlockIndices) -> Self {
        let [s1, s2, s3, s4, s5] = Site::ALL.map(|s| kept.get(s).clone());
        let a = &self.self_attn;
        Self {
            input_layernorm: self.input_layernorm.clone(),
            self_attn: Attention {
                q_proj: a.q_proj.keep_inputs(&s1),
                k_proj: a.k_proj.keep_inputs(&s1),
                v_proj: a.v_proj.keep_inputs(&s1),
                dense: a.dense.keep_outputs(&s2),
            },
            mlp: Mlp {
                fc1: self.mlp.fc1.keep_inputs(&s3).keep_outputs(&s4),
                fc2: self.mlp.fc2.keep_inputs(&s4).keep_outputs(&s5),
            },
            kept: Some(kept),
        }
    }

    fn linear_params(&self) -> usize {
        let a = &self.self_attn;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.dense, &self.mlp.fc1, &self.mlp.fc2].iter().map(|l| l.num_params()).sum()
    }
}

impl CausalLm for Phi {
    fn family(&self) -> Family {
        Family::Phi
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn is_pruned(&self) -> bool {
        self.layers.iter().any(|l| l.kept.is_some())
    }

    fn model_shape(&self) -> ModelShape {
        let c = &self.config;
        ModelShape { blocks: vec![c.block_shape(); c.num_hidden_layers], other_params: c.other_params() }
    }


    fn stored_linear_params(&self) -> usize {
        self.layers.iter().map(DecoderLayer::linear_params).sum()
    }

    fn hidden_states(&self, tokens: Tensor<2, Int>, gates: Option<&[BlockGates]>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let d = self.config.hidden_size;
        let mut x = self.embed_tokens.clone().select(0, tokens.reshape([batch * seq])).reshape([batch, seq, d]);
        for (i, layer) in self.layers.iter().enumerate() {
            let sel = crate::selector(layer.kept.as_ref(), gates.map(|g| &g[i]));
            x = layer.forward(x, sel, self, start, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        self.final_layernorm.forward(x)
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head.forward(hidden)
    }

    fn block_linears(&self, layer: usize) -> BlockLinears<'_> {
        let l = &self.layers[layer];
        BlockLinears {
            attn_inputs: vec![&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj],
            attn_output: &l.self_attn.dense,
            mlp_inputs: vec![&l.mlp.fc1],
            mlp_output: &l.mlp.fc2,
        }
    }

    fn prune(&self, plan: &PruningPlan) -> Result<Box<dyn CausalLm>> {
        if self.is_pruned() {
            bail!("model is already pruned");
        }
        plan.validate(&self.identity(), &self.model_shape())?;
        let mut pruned = self.clone();
        for (layer, indices) in pruned.layers.iter_mut().zip(&plan.layers) {
            *layer = layer.pruned(BlockIndices::new(indices, &self.device));
        }
        Ok(Box::new(pruned))
    }

    fn block_linears_mut(&mut self, layer: usize) -> crate::BlockLinearsMut<'_> {
        let l = &mut self.layers[layer];
        crate::BlockLinearsMut {
            attn_inputs: vec![&mut l.self_attn.q_proj, &mut l.self_attn.k_proj, &mut l.self_attn.v_proj],
            attn_output: &mut l.self_attn.dense,
            mlp_inputs: vec![&mut l.mlp.fc1],
            mlp_output: &mut l.mlp.fc2,
        }
    }
}

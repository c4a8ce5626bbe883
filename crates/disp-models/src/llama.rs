//! LLaMA family (`LlamaForCausalLM`): RMSNorm, rotary attention with grouped-query heads and a
//! SwiGLU MLP. Covers LLaMA 1/2/3, SmolLM and similar checkpoints.

use anyhow::{bail, Result};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor};
use disp_core::params::{BlockShape, MlpKind, ModelShape};
use disp_core::plan::PruningPlan;
use disp_core::selection::{BlockGates, BlockIndices, Selector, Site};
use serde::Deserialize;

use crate::config::{Family, RawConfig};
use crate::layers::{causal_attention, split_heads, KvCache, Linear, Rope, RmsNorm};
use crate::weights::Checkpoint;
use crate::{BlockLinears, CausalLm};

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// The fields of an HF `LlamaConfig` that change the computation.
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
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn block_shape(&self) -> BlockShape {
        BlockShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            q_dim: self.num_attention_heads * self.head_dim(),
            kv_dim: self.kv_heads() * self.head_dim(),
            mlp: MlpKind::Gated,
            qkv_bias: self.attention_bias,
            out_bias: self.attention_bias,
            mlp_in_bias: self.mlp_bias,
            mlp_out_bias: self.mlp_bias,
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Set once the layer is pruned: its weights are then cut to these positions.
    kept: Option<BlockIndices>,
}

/// A LLaMA causal LM, dense or pruned.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Tensor<2>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[hidden, vocab]`; a transposed copy of the embedding when tied.
    lm_head: Tensor<2>,
    rope: Rope,
    device: Device,
}

impl Llama {
    pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<Self> {
        let config: LlamaConfig = raw.parse("LLaMA")?;
        if config.hidden_act != "silu" {
            bail!("{}: unsupported hidden_act '{}' for llama (supported: silu)", raw.path.display(), config.hidden_act);
        }
        if config.num_attention_heads % config.kv_heads() != 0 {
            return Err(raw.error("num_attention_heads must be a multiple of num_key_value_heads"));
        }
        let (theta, scaling) = raw.rope(10_000.0)?;
        let (d, ff, hd) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let (q_dim, kv_dim) = (config.num_attention_heads * hd, config.kv_heads() * hd);
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(ck, &format!("{p}.input_layernorm.weight"), d, eps, device)?,
                self_attn: Attention {
                    q_proj: Linear::load(ck, &format!("{p}.self_attn.q_proj"), d, q_dim, ab, device)?,
                    k_proj: Linear::load(ck, &format!("{p}.self_attn.k_proj"), d, kv_dim, ab, device)?,
                    v_proj: Linear::load(ck, &format!("{p}.self_attn.v_proj"), d, kv_dim, ab, device)?,
                    o_proj: Linear::load(ck, &format!("{p}.self_attn.o_proj"), q_dim, d, ab, device)?,
                },
                post_attention_layernorm: RmsNorm::load(ck, &format!("{p}.post_attention_layernorm.weight"), d, eps, device)?,
                mlp: Mlp {
                    gate_proj: Linear::load(ck, &format!("{p}.mlp.gate_proj"), d, ff, mb, device)?,
                    up_proj: Linear::load(ck, &format!("{p}.mlp.up_proj"), d, ff, mb, device)?,
                    down_proj: Linear::load(ck, &format!("{p}.mlp.down_proj"), ff, d, mb, device)?,
                },
                kept: ck.kept_indices(i, device),
            });
        }
        let embed_tokens = ck.tensor("model.embed_tokens.weight", [config.vocab_size, d], device)?;
        let lm_head = if config.tie_word_embeddings || !ck.contains("lm_head.weight") {
            if !config.tie_word_embeddings {
                bail!("{}: missing tensor 'lm_head.weight' (and tie_word_embeddings is false)", ck.describe());
            }
            embed_tokens.clone().transpose()
        } else {
            ck.matrix_in_out("lm_head.weight", d, config.vocab_size, device)?
        };
        Ok(Self {
            rope: Rope::new(theta, hd, hd, scaling),
            norm: RmsNorm::load(ck, "model.norm.weight", d, eps, device)?,
            embed_tokens,
            layers,
            lm_head,
            config,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl DecoderLayer {
    fn forward(&self, x: Tensor<3>, sel: Selector, cfg: &LlamaConfig, rope: &Rope, start: usize, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let hd = cfg.head_dim();
        let attn_in = sel.read(Site::AttnIn, self.input_layernorm.forward(x.clone()));
        let q = rope.apply(split_heads(self.self_attn.q_proj.forward(attn_in.clone()), cfg.num_attention_heads, hd), start);
        let k = rope.apply(split_heads(self.self_attn.k_proj.forward(attn_in.clone()), cfg.kv_heads(), hd), start);
        let v = split_heads(self.self_attn.v_proj.forward(attn_in), cfg.kv_heads(), hd);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let context = causal_attention(q, k, v, start);
        sel.observe_attention_context(&context);
        let attn = self.self_attn.o_proj.forward(context);
        let x = sel.write(Site::AttnOut, x, attn);

        let mlp_in = sel.read(Site::MlpIn, self.post_attention_layernorm.forward(x.clone()));
        let inter = silu(self.mlp.gate_proj.forward(mlp_in.clone())) * self.mlp.up_proj.forward(mlp_in);
        let out = self.mlp.down_proj.forward(sel.scale_intermediate(inter));
        sel.write(Site::MlpOut, x, out)
    }

    fn pruned(&self, kept: BlockIndices) -> Self {
        let [s1, s2, s3, s4, s5] = Site::ALL.map(|s| kept.get(s).clone());
        let a = &self.self_attn;
        let m = &self.mlp;
        Self {
            input_layernorm: self.input_layernorm.clone(),
            self_attn: Attention {
                q_proj: a.q_proj.keep_inputs(&s1),
                k_proj: a.k_proj.keep_inputs(&s1),
                v_proj: a.v_proj.keep_inputs(&s1),
                o_proj: a.o_proj.keep_outputs(&s2),
            },
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            mlp: Mlp {
                gate_proj: m.gate_proj.keep_inputs(&s3).keep_outputs(&s4),
                up_proj: m.up_proj.keep_inputs(&s3).keep_outputs(&s4),
                down_proj: m.down_proj.keep_inputs(&s4).keep_outputs(&s5),
            },
            kept: Some(kept),
        }
    }

    fn linear_params(&self) -> usize {
        let a = &self.self_attn;
        let m = &self.mlp;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            .iter()
            .map(|l| l.num_params())
            .sum()
    }
}

impl CausalLm for Llama {
    fn family(&self) -> Family {
        Family::Llama
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
        let embed = c.vocab_size * c.hidden_size;
        let head = if c.tie_word_embeddings { 0 } else { embed };
        let norms = (2 * c.num_hidden_layers + 1) * c.hidden_size;
        ModelShape { blocks: vec![c.block_shape(); c.num_hidden_layers], other_params: (embed + head + norms) as u64 }
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
            x = layer.forward(x, sel, &self.config, &self.rope, start, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        self.norm.forward(x)
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d] = hidden.dims();
        let vocab = self.config.vocab_size;
        hidden.reshape([batch * seq, d]).matmul(self.lm_head.clone()).reshape([batch, seq, vocab])
    }

    fn block_linears(&self, layer: usize) -> BlockLinears<'_> {
        let l = &self.layers[layer];
        BlockLinears {
            attn_inputs: vec![&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj],
            attn_output: &l.self_attn.o_proj,
            mlp_inputs: vec![&l.mlp.gate_proj, &l.mlp.up_proj],
            mlp_output: &l.mlp.down_proj,
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
            attn_output: &mut l.self_attn.o_proj,
            mlp_inputs: vec![&mut l.mlp.gate_proj, &mut l.mlp.up_proj],
            mlp_output: &mut l.mlp.down_proj,
        }
    }
}

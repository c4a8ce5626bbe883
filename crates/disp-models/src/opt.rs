//! OPT family (`OPTForCausalLM`): learned positional embeddings, LayerNorm before (OPT-125m,
//! 1.3b, ...) or after (OPT-350m) each sub-block, an fc1/fc2 MLP, biases on every linear, and an
//! optional `project_in`/`project_out` pair when the word embeddings are narrower than the blocks.

use anyhow::{bail, Result};
use burn::tensor::{Device, Int, Tensor};
use disp_core::params::{BlockShape, MlpKind, ModelShape};
use disp_core::plan::PruningPlan;
use disp_core::selection::{BlockGates, BlockIndices, Selector, Site};
use serde::Deserialize;

use crate::config::{Family, RawConfig};
use crate::layers::{causal_attention, split_heads, Activation, KvCache, LayerNorm, Linear};
use crate::weights::Checkpoint;
use crate::{BlockLinears, CausalLm};

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
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    fn projects_embeddings(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }

    /// transformers builds the decoder's final layer norm only for pre-LN models.
    fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    fn block_shape(&self) -> BlockShape {
        BlockShape {
            hidden: self.hidden_size,
            intermediate: self.ffn_dim,
            q_dim: self.hidden_size,
            kv_dim: self.hidden_size,
            mlp: MlpKind::TwoMatrix,
            qkv_bias: self.enable_bias,
            out_bias: self.enable_bias,
            mlp_in_bias: self.enable_bias,
            mlp_out_bias: self.enable_bias,
        }
    }

    /// Parameters stored outside the block linears.
    fn other_params(&self) -> u64 {
        let (d, e, v) = (self.hidden_size, self.embed_dim(), self.vocab_size);
        let tokens = v * e;
        let positions = (self.max_position_embeddings + POSITION_OFFSET) * d;
        let projections = if self.projects_embeddings() { 2 * e * d } else { 0 };
        let head = if self.tie_word_embeddings { 0 } else { v * e };
        let norm_count = 2 * self.num_hidden_layers + usize::from(self.has_final_layer_norm());
        let norms = if self.layer_norm_elementwise_affine { norm_count * 2 * d } else { 0 };
        (tokens + positions + projections + head + norms) as u64
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn_layer_norm: LayerNorm,
    self_attn: Attention,
    /// The MLP's layer norm (before fc1 when pre-LN, after the residual add when post-LN).
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Set once the layer is pruned: its weights are then cut to these positions.
    kept: Option<BlockIndices>,
}

/// An OPT causal LM, dense or pruned.
#[derive(Debug, Clone)]
pub struct Opt {
    config: OptConfig,
    activation: Activation,
    /// `[vocab, word_embed_proj_dim]`
    embed_tokens: Tensor<2>,
    /// `[max_position_embeddings + 2, hidden]`
    embed_positions: Tensor<2>,
    project_in: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    project_out: Option<Linear>,
    /// `[word_embed_proj_dim, vocab]`; a transposed copy of the embedding when tied.
    lm_head: Tensor<2>,
    device: Device,
}

impl Opt {
    pub fn load(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<Self> {
        let config: OptConfig = raw.parse("OPT")?;
        let activation = Activation::from_hf_name(&config.activation_function).ok_or_else(|| {
            raw.error(format!(
                "unsupported activation_function '{}' for opt (supported: {})",
                config.activation_function,
                Activation::SUPPORTED
            ))
        })?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(raw.error("hidden_size must be a multiple of num_attention_heads"));
        }
        // transformers 5 saves `model.decoder.*`; the facebook/opt-* files on the Hub `decoder.*`.
        let root = if !ck.contains("model.decoder.embed_tokens.weight") && ck.contains("decoder.embed_tokens.weight") {
            "decoder"
        } else {
            "model.decoder"
        };
        let (d, ff, e, v) = (config.hidden_size, config.ffn_dim, config.embed_dim(), config.vocab_size);
        let bias = config.enable_bias;
        let norm = |prefix: String| -> Result<LayerNorm> {
            if config.layer_norm_elementwise_affine {
                LayerNorm::load(ck, &prefix, d, LAYER_NORM_EPS, device)
            } else {
                Ok(LayerNorm { weight: Tensor::ones([d], device), bias: Tensor::zeros([d], device), eps: LAYER_NORM_EPS })
            }
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("{root}.layers.{i}");
            layers.push(DecoderLayer {
                self_attn_layer_norm: norm(format!("{p}.self_attn_layer_norm"))?,
                self_attn: Attention {
                    q_proj: Linear::load(ck, &format!("{p}.self_attn.q_proj"), d, d, bias, device)?,
                    k_proj: Linear::load(ck, &format!("{p}.self_attn.k_proj"), d, d, bias, device)?,
                    v_proj: Linear::load(ck, &format!("{p}.self_attn.v_proj"), d, d, bias, device)?,
                    out_proj: Linear::load(ck, &format!("{p}.self_attn.out_proj"), d, d, bias, device)?,
                },
                final_layer_norm: norm(format!("{p}.final_layer_norm"))?,
                fc1: Linear::load(ck, &format!("{p}.fc1"), d, ff, bias, device)?,
                fc2: Linear::load(ck, &format!("{p}.fc2"), ff, d, bias, device)?,
                kept: ck.kept_indices(i, device),
            });
        }
        let (project_in, project_out) = if config.projects_embeddings() {
            (
                Some(Linear::load(ck, &format!("{root}.project_in"), e, d, false, device)?),
                Some(Linear::load(ck, &format!("{root}.project_out"), d, e, false, device)?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm =
            if config.has_final_layer_norm() { Some(norm(format!("{root}.final_layer_norm"))?) } else { None };
        let embed_tokens = ck.tensor(&format!("{root}.embed_tokens.weight"), [v, e], device)?;
        let positions = config.max_position_embeddings + POSITION_OFFSET;
        let embed_positions = ck.tensor(&format!("{root}.embed_positions.weight"), [positions, d], device)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone().transpose()
        } else {
            ck.matrix_in_out("lm_head.weight", e, v, device)?
        };
        Ok(Self {
            config,
            activation,
            embed_tokens,
            embed_positions,
            project_in,
            layers,
            final_layer_norm,
            project_out,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &OptConfig {
        &self.config
    }
}

impl DecoderLayer {
    /// One block through `sel`.
    ///
    /// Pre-LN (`do_layer_norm_before`): each sub-block reads its index set from the layer-normed
    /// residual and adds its output back at its write set, exactly the DISP block.
    ///
    /// Post-LN (OPT-350m): the residual stream itself is renormalised after every add, so a
    /// sub-block's input is no longer "a normalised copy of the residual" that it could read
    /// independently. We keep the same three selector calls in the same order: S1 (and S3) read
    /// from the block's un-normalised sub-block input — which after layer 0 is already the output
    /// of the previous layer norm — S2/S5 write into the residual, and the layer norm then runs on
    /// the full-width sum. Masked and pruned still compute the same function (the layer norm
    /// always sees every position), but a removed write position still changes the layer norm's
    /// statistics, so the sets are less "independent" than in the pre-LN case.
    fn forward(&self, x: Tensor<3>, sel: Selector, cfg: &OptConfig, activation: Activation, start: usize, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
        let pre_ln = cfg.do_layer_norm_before;

        let attn_source = if pre_ln { self.self_attn_layer_norm.forward(x.clone()) } else { x.clone() };
        let attn_in = sel.read(Site::AttnIn, attn_source);
        let q = split_heads(self.self_attn.q_proj.forward(attn_in.clone()), heads, hd);
        let k = split_heads(self.self_attn.k_proj.forward(attn_in.clone()), heads, hd);
        let v = split_heads(self.self_attn.v_proj.forward(attn_in), heads, hd);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let context = causal_attention(q, k, v, start);
        sel.observe_attention_context(&context);
        let attn = self.self_attn.out_proj.forward(context);
        let mut x = sel.write(Site::AttnOut, x, attn);
        if !pre_ln {
            x = self.self_attn_layer_norm.forward(x);
        }

        let mlp_source = if pre_ln { self.final_layer_norm.forward(x.clone()) } else { x.clone() };
        let mlp_in = sel.read(Site::MlpIn, mlp_source);
        let inter = activation.forward(self.fc1.forward(mlp_in));
        let out = self.fc2.forward(sel.scale_intermediate(inter));
        let x = sel.write(Site::MlpOut, x, out);
        if pre_ln {
            x
        } else {
            self.final_layer_norm.forward(x)
        }
    }

    fn pruned(&self, kept: BlockIndices) -> Self {
        let [s1, s2, s3, s4, s5] = Site::ALL.map(|s| kept.get(s).clone());
        let a = &self.self_attn;
        Self {
            self_attn_layer_norm: self.self_attn_layer_norm.clone(),
            self_attn: Attention {
                q_proj: a.q_proj.keep_inputs(&s1),
                k_proj: a.k_proj.keep_inputs(&s1),
                v_proj: a.v_proj.keep_inputs(&s1),
                out_proj: a.out_proj.keep_outputs(&s2),
            },
            final_layer_norm: self.final_layer_norm.clone(),
            fc1: self.fc1.keep_inputs(&s3).keep_outputs(&s4),
            fc2: self.fc2.keep_inputs(&s4).keep_outputs(&s5),
            kept: Some(kept),
        }
    }

    fn linear_params(&self) -> usize {
        let a = &self.self_attn;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &self.fc1, &self.fc2].iter().map(|l| l.num_params()).sum()
    }
}

impl CausalLm for Opt {
    fn family(&self) -> Family {
        Family::Opt
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
        // The position table simply ends here; callers check max_positions() and report it.
        assert!(
            start + seq <= self.config.max_position_embeddings,
            "positions {}..{} exceed OPT's {} learned positions",
            start,
            start + seq,
            self.config.max_position_embeddings
        );
        let e = self.config.embed_dim();
        let words = self.embed_tokens.clone().select(0, tokens.reshape([batch * seq])).reshape([batch, seq, e]);
        let words = match &self.project_in {
            Some(project_in) => project_in.forward(words),
            None => words,
        };
        let positions = self.embed_positions.clone().narrow(0, start + POSITION_OFFSET, seq).unsqueeze::<3>();
        let mut x = words + positions;
        for (i, layer) in self.layers.iter().enumerate() {
            let sel = crate::selector(layer.kept.as_ref(), gates.map(|g| &g[i]));
            x = layer.forward(x, sel, &self.config, self.activation, start, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        if let Some(norm) = &self.final_layer_norm {
            x = norm.forward(x);
        }
        if let Some(project_out) = &self.project_out {
            x = project_out.forward(x);
        }
        x
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq, e] = hidden.dims();
        let vocab = self.config.vocab_size;
        hidden.reshape([batch * seq, e]).matmul(self.lm_head.clone()).reshape([batch, seq, vocab])
    }

    fn block_linears(&self, layer: usize) -> BlockLinears<'_> {
        let l = &self.layers[layer];
        BlockLinears {
            attn_inputs: vec![&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj],
            attn_output: &l.self_attn.out_proj,
            mlp_inputs: vec![&l.fc1],
            mlp_output: &l.fc2,
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
            attn_output: &mut l.self_attn.out_proj,
            mlp_inputs: vec![&mut l.fc1],
            mlp_output: &mut l.fc2,
        }
    }
}

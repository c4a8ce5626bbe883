//! The decoder stack every family is built from: attention (multi-head or grouped-query, rotary
//! or not, optional per-head q/k norms and sliding window), a gated or two-matrix MLP, the block
//! with its five selections, and the embed → blocks → norm → head loop behind [`CausalLm`].
//!
//! One description of a block's linears, [`BlockKeys`] (the checkpoint name of each linear and
//! its [`LinearSlot`]), drives loading, pruning, parameter counts, [`BlockLinears`] and the cut
//! table of pruned folders ([`crate::pruned_folder::cut_axes`]). A family only says what differs:
//! its config, its keys, its [`BlockSpec`] (widths, biases, norms, [`Wiring`], positions) and the
//! [`Ends`] around the blocks.

use anyhow::{bail, Result};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use disp_core::params::{BlockShape, MlpKind, ModelShape};
use disp_core::plan::PruningPlan;
use disp_core::selection::{BlockGates, IndexTensors, Selector, Site};

use crate::config::Family;
use crate::layers::{causal_attention, split_heads, Activation, KvCache, LayerNorm, Linear, RmsNorm, Rope};
use crate::weights::Checkpoint;
use crate::{BlockLinears, BlockLinearsMut, CausalLm};

/// The block linear a tensor belongs to, in the order of [`BlockLinears`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearSlot {
    /// q, k, v (index in that order).
    AttnInput(usize),
    AttnOutput,
    /// gate, up (gated MLP) or fc1 (index in that order).
    MlpInput(usize),
    MlpOutput,
}

impl LinearSlot {
    /// The selections that cut this linear: (HF rows = outputs and bias entries, HF columns =
    /// inputs). q/k/v outputs are the head layout, which is never pruned.
    pub fn cut_sites(self) -> (Option<Site>, Option<Site>) {
        match self {
            Self::AttnInput(_) => (None, Some(Site::AttnIn)),
            Self::AttnOutput => (Some(Site::AttnOut), None),
            Self::MlpInput(_) => (Some(Site::MlpInter), Some(Site::MlpIn)),
            Self::MlpOutput => (Some(Site::MlpOut), Some(Site::MlpInter)),
        }
    }
}

/// A family's checkpoint names inside `…layers.{i}.`, without `.weight` / `.bias`.
#[derive(Debug, Clone, Copy)]
pub struct BlockKeys {
    /// q, k, v.
    pub attn_inputs: [&'static str; 3],
    pub attn_output: &'static str,
    /// gate and up (gated MLP: `act(gate) * up`) or the one fc1.
    pub mlp_inputs: &'static [&'static str],
    pub mlp_output: &'static str,
    /// The attention's norm, or the one norm of a parallel block.
    pub attn_norm: &'static str,
    /// The MLP's norm; `None` for a parallel block.
    pub mlp_norm: Option<&'static str>,
    /// Per-head RMSNorms of q and k, applied before the rotary embedding (Qwen3).
    pub qk_norms: Option<[&'static str; 2]>,
}

impl BlockKeys {
    /// Every block linear with its slot, in loading order.
    pub fn linears(&self) -> impl Iterator<Item = (LinearSlot, &'static str)> + '_ {
        let attn = self.attn_inputs.iter().enumerate().map(|(i, k)| (LinearSlot::AttnInput(i), *k));
        let mlp = self.mlp_inputs.iter().enumerate().map(|(i, k)| (LinearSlot::MlpInput(i), *k));
        attn.chain([(LinearSlot::AttnOutput, self.attn_output)]).chain(mlp).chain([(LinearSlot::MlpOutput, self.mlp_output)])
    }

    pub fn mlp_kind(&self) -> MlpKind {
        if self.mlp_inputs.len() == 2 {
            MlpKind::Gated
        } else {
            MlpKind::TwoMatrix
        }
    }
}

/// Where a block's norms sit and how its two sub-blocks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// `x += attn(norm1(x)); x += mlp(norm2(x))` (LLaMA, OPT pre-LN): each sub-block reads its
    /// index set from a normalised copy of the residual, exactly the DISP block.
    PreNorm,
    /// `x = norm1(x + attn(x)); x = norm2(x + mlp(x))` (OPT-350m). The residual stream itself
    /// is renormalised after every add, so S1 and S3 read from the sub-block's un-normalised
    /// input (after layer 0 already the output of the previous norm), S2/S5 write into the
    /// residual and the norm runs on the full-width sum. Masked and pruned still compute the
    /// same function, but a removed write position still changes the norm's statistics.
    PostNorm,
    /// `h = norm(x); x += attn(h) + mlp(h)` (Phi): neither sub-block sees the other's output.
    Parallel,
}

/// Kind of every norm of a family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Rms {
        eps: f64,
    },
    /// `affine: false`: no stored weight or bias (OPT's `layer_norm_elementwise_affine`).
    Layer {
        eps: f64,
        affine: bool,
    },
}

impl NormKind {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` for a LayerNorm).
    pub fn load(self, ck: &Checkpoint, prefix: &str, width: usize, device: &Device) -> Result<Norm> {
        Ok(match self {
            Self::Rms { eps } => {
                let name = format!("{prefix}.weight");
                Norm::Rms(Box::new(RmsNorm::load(ck, &name, width, eps, device)?))
            }
            Self::Layer { eps, affine: true } => Norm::Layer { norm: Box::new(LayerNorm::load(ck, prefix, width, eps, device)?), stored: true },
            Self::Layer { eps, affine: false } => {
                let norm = LayerNorm { weight: Tensor::ones([width], device), bias: Tensor::zeros([width], device), eps };
                Norm::Layer { norm: Box::new(norm), stored: false }
            }
        })
    }
}

#[derive(Debug, Clone)]
pub enum Norm {
    /// Boxed, as `LayerNorm` is: tensor handles are large, and the enum stays small.
    Rms(Box<RmsNorm>),
    /// `stored`: whether the weight and bias are checkpoint parameters.
    Layer { norm: Box<LayerNorm>, stored: bool },
}

impl Norm {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Rms(norm) => norm.forward(x),
            Self::Layer { norm, .. } => norm.forward(x),
        }
    }

    /// Normalises each head of `[B, H, T, hd]` over its `hd` channels.
    fn forward_heads(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, heads, seq, head_dim] = x.dims();
        self.forward(x.reshape([batch, heads * seq, head_dim])).reshape([batch, heads, seq, head_dim])
    }

    fn stored_params(&self) -> usize {
        match self {
            Self::Rms(norm) => norm.weight.dims()[0],
            Self::Layer { norm, stored } => usize::from(*stored) * 2 * norm.weight.dims()[0],
        }
    }
}

/// What every block of a model shares.
#[derive(Debug, Clone)]
pub struct BlockSpec {
    /// Widths and biases, also the parameter accounting's view of the block.
    pub shape: BlockShape,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `None`: positions are added to the embeddings instead (OPT).
    pub rope: Option<Rope>,
    pub activation: Activation,
    pub wiring: Wiring,
    pub norm: NormKind,
}

impl BlockSpec {
    /// The shape of a block with `heads`·`head_dim` query and `kv_heads`·`head_dim` key/value
    /// widths; biases default to none (set the `shape` fields that a family has).
    pub fn shape_without_biases(hidden: usize, intermediate: usize, heads: usize, kv_heads: usize, head_dim: usize, mlp: MlpKind) -> BlockShape {
        BlockShape {
            hidden,
            intermediate,
            q_dim: heads * head_dim,
            kv_dim: kv_heads * head_dim,
            mlp,
            qkv_bias: false,
            out_bias: false,
            mlp_in_bias: false,
            mlp_out_bias: false,
        }
    }
}

/// A block's norms, placed as its [`Wiring`] says.
#[derive(Debug, Clone)]
pub(crate) enum BlockNorms {
    Pre { attn: Norm, mlp: Norm },
    Post { attn: Norm, mlp: Norm },
    Parallel(Norm),
}

/// One decoder block, dense or cut to its index sets.
#[derive(Debug, Clone)]
pub struct Block {
    pub(crate) norms: BlockNorms,
    pub(crate) qk_norms: Option<[Norm; 2]>,
    /// q, k, v.
    pub(crate) attn_inputs: [Linear; 3],
    pub(crate) attn_output: Linear,
    pub(crate) mlp_inputs: Vec<Linear>,
    pub(crate) mlp_output: Linear,
    /// Sliding-window attention: a query sees only the keys of its last `window` positions.
    pub(crate) window: Option<usize>,
    /// Set once the block is pruned: its weights are then cut to these positions.
    pub(crate) kept: Option<IndexTensors>,
}

impl Block {
    /// Loads block `{prefix}.*`: the attention norm, q/k/v/o, the q/k norms, the MLP norm and the
    /// MLP linears, in that order (training from scratch numbers parameters by it).
    fn load(ck: &Checkpoint, prefix: &str, keys: &BlockKeys, spec: &BlockSpec, window: Option<usize>, device: &Device) -> Result<Self> {
        let s = &spec.shape;
        let key = |name: &str| format!("{prefix}.{name}");
        let linear = |(slot, name): (LinearSlot, &str)| {
            let (inputs, outputs, bias) = match slot {
                LinearSlot::AttnInput(0) => (s.hidden, s.q_dim, s.qkv_bias),
                LinearSlot::AttnInput(_) => (s.hidden, s.kv_dim, s.qkv_bias),
                LinearSlot::AttnOutput => (s.q_dim, s.hidden, s.out_bias),
                LinearSlot::MlpInput(_) => (s.hidden, s.intermediate, s.mlp_in_bias),
                LinearSlot::MlpOutput => (s.intermediate, s.hidden, s.mlp_out_bias),
            };
            Linear::load(ck, &key(name), inputs, outputs, bias, device)
        };
        let attn_norm = spec.norm.load(ck, &key(keys.attn_norm), s.hidden, device)?;
        let mut attn = keys.linears().take(4).map(&linear).collect::<Result<Vec<_>>>()?;
        let qk_norms = match keys.qk_norms {
            Some([q, k]) => Some([spec.norm.load(ck, &key(q), spec.head_dim, device)?, spec.norm.load(ck, &key(k), spec.head_dim, device)?]),
            None => None,
        };
        let mlp_norm = keys.mlp_norm.map(|name| spec.norm.load(ck, &key(name), s.hidden, device)).transpose()?;
        let mut mlp_inputs = keys.linears().skip(4).map(&linear).collect::<Result<Vec<_>>>()?;
        let norms = match (spec.wiring, mlp_norm) {
            (Wiring::PreNorm, Some(mlp)) => BlockNorms::Pre { attn: attn_norm, mlp },
            (Wiring::PostNorm, Some(mlp)) => BlockNorms::Post { attn: attn_norm, mlp },
            (Wiring::Parallel, None) => BlockNorms::Parallel(attn_norm),
            (wiring, _) => bail!("{wiring:?} blocks and the keys' MLP norm disagree"),
        };
        let mlp_output = mlp_inputs.pop().expect("an MLP output key");
        let attn_output = attn.pop().expect("an attention output key");
        let attn_inputs: [Linear; 3] = attn.try_into().expect("three attention input keys");
        Ok(Self { norms, qk_norms, attn_inputs, attn_output, mlp_inputs, mlp_output, window, kept: None })
    }

    fn forward(&self, x: Tensor<3>, sel: Selector, spec: &BlockSpec, start: usize, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        match &self.norms {
            BlockNorms::Pre { attn, mlp } => {
                let attn = self.attention(sel.read(Site::AttnIn, attn.forward(x.clone())), sel, spec, start, cache);
                let x = sel.write(Site::AttnOut, x, attn);
                let out = self.mlp(sel.read(Site::MlpIn, mlp.forward(x.clone())), sel, spec);
                sel.write(Site::MlpOut, x, out)
            }
            BlockNorms::Post { attn, mlp } => {
                let attn_out = self.attention(sel.read(Site::AttnIn, x.clone()), sel, spec, start, cache);
                let x = attn.forward(sel.write(Site::AttnOut, x, attn_out));
                let out = self.mlp(sel.read(Site::MlpIn, x.clone()), sel, spec);
                mlp.forward(sel.write(Site::MlpOut, x, out))
            }
            BlockNorms::Parallel(norm) => {
                let normed = norm.forward(x.clone());
                let attn = self.attention(sel.read(Site::AttnIn, normed.clone()), sel, spec, start, cache);
                let out = self.mlp(sel.read(Site::MlpIn, normed), sel, spec);
                sel.write(Site::MlpOut, sel.write(Site::AttnOut, x, attn), out)
            }
        }
    }

    /// q/k/v → heads → q/k norms → rotary → cache → causal attention → output projection.
    fn attention(&self, input: Tensor<3>, sel: Selector, spec: &BlockSpec, start: usize, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let [q, k, v] = &self.attn_inputs;
        let heads = |linear: &Linear, count: usize| split_heads(linear.forward(input.clone()), count, spec.head_dim);
        let (mut q, mut k, v) = (heads(q, spec.heads), heads(k, spec.kv_heads), heads(v, spec.kv_heads));
        if let Some([q_norm, k_norm]) = &self.qk_norms {
            q = q_norm.forward_heads(q);
            k = k_norm.forward_heads(k);
        }
        if let Some(rope) = &spec.rope {
            q = rope.apply(q, start);
            k = rope.apply(k, start);
        }
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let context = causal_attention(q, k, v, start, self.window);
        sel.observe_attention_context(&context);
        self.attn_output.forward(context)
    }

    fn mlp(&self, input: Tensor<3>, sel: Selector, spec: &BlockSpec) -> Tensor<3> {
        let inter = match self.mlp_inputs.as_slice() {
            [gate, up] => spec.activation.forward(gate.forward(input.clone())) * up.forward(input),
            [fc1] => spec.activation.forward(fc1.forward(input)),
            _ => unreachable!("blocks are loaded with one or two MLP inputs"),
        };
        self.mlp_output.forward(sel.scale_intermediate(inter))
    }

    fn linears(&self) -> BlockLinears<'_> {
        BlockLinears {
            attn_inputs: self.attn_inputs.iter().collect(),
            attn_output: &self.attn_output,
            mlp_inputs: self.mlp_inputs.iter().collect(),
            mlp_output: &self.mlp_output,
        }
    }

    fn linears_mut(&mut self) -> BlockLinearsMut<'_> {
        BlockLinearsMut {
            attn_inputs: self.attn_inputs.iter_mut().collect(),
            attn_output: &mut self.attn_output,
            mlp_inputs: self.mlp_inputs.iter_mut().collect(),
            mlp_output: &mut self.mlp_output,
        }
    }

    /// The block with every linear cut to `kept` as its slot says.
    fn pruned(&self, kept: IndexTensors) -> Self {
        let cut = |slot: LinearSlot, linear: &Linear| {
            let (rows, cols) = slot.cut_sites();
            let linear = cols.map_or_else(|| linear.clone(), |site| linear.keep_inputs(kept.get(site)));
            rows.map_or(linear.clone(), |site| linear.keep_outputs(kept.get(site)))
        };
        let attn_inputs = [0, 1, 2].map(|i| cut(LinearSlot::AttnInput(i), &self.attn_inputs[i]));
        let mlp_inputs = self.mlp_inputs.iter().enumerate().map(|(i, l)| cut(LinearSlot::MlpInput(i), l)).collect();
        Self {
            attn_output: cut(LinearSlot::AttnOutput, &self.attn_output),
            mlp_output: cut(LinearSlot::MlpOutput, &self.mlp_output),
            attn_inputs,
            mlp_inputs,
            kept: Some(kept),
            ..self.clone()
        }
    }

    fn linear_params(&self) -> usize {
        self.linears().all().map(Linear::num_params).sum()
    }

    fn norm_params(&self) -> usize {
        let norms: Vec<&Norm> = match &self.norms {
            BlockNorms::Pre { attn, mlp } | BlockNorms::Post { attn, mlp } => vec![attn, mlp],
            BlockNorms::Parallel(norm) => vec![norm],
        };
        norms.into_iter().chain(self.qk_norms.iter().flatten()).map(Norm::stored_params).sum()
    }
}

/// Loads the blocks `{prefix}.{i}` for `i` in `0..windows.len()`, block `i` with sliding window
/// `windows[i]`; in a pruned folder each is cut to its stored index sets.
pub fn load_blocks(
    ck: &Checkpoint,
    prefix: &str,
    keys: &BlockKeys,
    spec: &BlockSpec,
    windows: &[Option<usize>],
    device: &Device,
) -> Result<Vec<Block>> {
    (0..windows.len())
        .map(|i| {
            let block = Block::load(ck, &format!("{prefix}.{i}"), keys, spec, windows[i], device)?;
            Ok(Block { kept: ck.kept_indices(i, device), ..block })
        })
        .collect()
}

/// OPT's learned position table: position `p` reads row `p + offset`.
#[derive(Debug, Clone)]
pub struct LearnedPositions {
    pub table: Tensor<2>,
    pub offset: usize,
}

/// What comes before and after the blocks.
#[derive(Debug, Clone)]
pub struct Ends {
    /// `[vocab, embedding width]`
    pub tokens: Tensor<2>,
    pub positions: Option<LearnedPositions>,
    /// Embedding width → hidden (OPT-350m), and back after the final norm.
    pub project_in: Option<Linear>,
    pub project_out: Option<Linear>,
    pub final_norm: Option<Norm>,
    /// `[embedding width, vocab]`; the transposed token embedding when `tied`.
    pub head: Linear,
    pub tied: bool,
}

impl Ends {
    /// The head: the transposed token embedding when `tied` (with `lm_head.bias` if `bias`), or
    /// `lm_head.*`.
    pub fn load_head(ck: &Checkpoint, tokens: &Tensor<2>, tied: bool, bias: bool, device: &Device) -> Result<Linear> {
        let [vocab, width] = tokens.dims();
        if tied {
            let bias = if bias { Some(ck.tensor("lm_head.bias", [vocab], device)?) } else { None };
            return Ok(Linear::new(tokens.clone().transpose(), bias));
        }
        if !ck.contains("lm_head.weight") {
            bail!("{}: missing tensor 'lm_head.weight' (and tie_word_embeddings is false)", ck.describe());
        }
        Linear::load(ck, "lm_head", width, vocab, bias, device)
    }

    /// The ends of a model with rotary positions: `model.embed_tokens`, the head (see
    /// [`Self::load_head`]) and the final norm `final_norm`, read in that order.
    pub fn load_rotary(
        ck: &Checkpoint,
        shape: [usize; 2],
        final_norm: (NormKind, &str),
        tied: bool,
        head_bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let tokens = ck.tensor_stored("model.embed_tokens.weight", shape, device)?;
        let head = Self::load_head(ck, &tokens, tied, head_bias, device)?;
        let (kind, name) = final_norm;
        let final_norm = Some(kind.load(ck, name, shape[1], device)?);
        Ok(Self { tokens, positions: None, project_in: None, project_out: None, final_norm, head, tied })
    }

    pub(crate) fn embed(&self, tokens: Tensor<2, Int>, start: usize) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let width = self.tokens.dims()[1];
        let x = self.tokens.clone().select(0, tokens.reshape([batch * seq])).reshape([batch, seq, width]);
        // The table keeps the checkpoint's precision; activations are f32.
        let x = if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) };
        let x = match &self.project_in {
            Some(project_in) => project_in.forward(x),
            None => x,
        };
        let Some(positions) = &self.positions else {
            return x;
        };
        // The table simply ends; callers check max_positions() and report it.
        let rows = positions.table.dims()[0] - positions.offset;
        assert!(start + seq <= rows, "positions {start}..{} exceed the {rows} learned positions", start + seq);
        x + positions.table.clone().narrow(0, start + positions.offset, seq).unsqueeze::<3>()
    }

    pub(crate) fn finish(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.final_norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        match &self.project_out {
            Some(project_out) => project_out.forward(x),
            None => x,
        }
    }

    fn stored_params(&self) -> usize {
        let linears = self.project_in.iter().chain(&self.project_out).map(Linear::num_params).sum::<usize>();
        let head = if self.tied { self.head.bias.as_ref().map_or(0, |b| b.dims()[0]) } else { self.head.num_params() };
        let positions = self.positions.as_ref().map_or(0, |p| p.table.dims().iter().product::<usize>());
        let [vocab, width] = self.tokens.dims();
        vocab * width + positions + linears + head + self.final_norm.as_ref().map_or(0, Norm::stored_params)
    }
}

/// A causal LM of any family: the shared implementation of [`CausalLm`].
#[derive(Debug, Clone)]
pub struct DecoderLm {
    pub family: Family,
    pub spec: BlockSpec,
    pub blocks: Vec<Block>,
    pub ends: Ends,
    /// Longest sequence the position encoding supports.
    pub max_positions: usize,
    pub device: Device,
}

impl DecoderLm {
    pub fn new(family: Family, spec: BlockSpec, blocks: Vec<Block>, ends: Ends, max_positions: usize, device: &Device) -> Self {
        Self { family, spec, blocks, ends, max_positions, device: device.clone() }
    }
}

impl CausalLm for DecoderLm {
    fn family(&self) -> Family {
        self.family
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn vocab_size(&self) -> usize {
        self.ends.tokens.dims()[0]
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn is_pruned(&self) -> bool {
        self.blocks.iter().any(|b| b.kept.is_some())
    }

    fn model_shape(&self) -> ModelShape {
        let norms: usize = self.blocks.iter().map(Block::norm_params).sum();
        let other_params = (self.ends.stored_params() + norms) as u64;
        ModelShape { blocks: vec![self.spec.shape; self.blocks.len()], other_params }
    }

    fn stored_linear_params(&self) -> usize {
        self.blocks.iter().map(Block::linear_params).sum()
    }

    fn hidden_states(&self, tokens: Tensor<2, Int>, gates: Option<&[BlockGates]>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [tokens_batch, seq] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = self.ends.embed(tokens, start);
        let host_cache = cache.as_ref().is_some_and(|c| c.is_host()) && tokens_batch == 1;
        if crate::host_forward::covers(self, gates.is_some(), seq, start, host_cache) {
            x = crate::host_forward::blocks(self, x, start, cache.as_deref_mut());
        } else {
            for (i, block) in self.blocks.iter().enumerate() {
                let sel = crate::selector(block.kept.as_ref(), gates.map(|g| &g[i]));
                x = block.forward(x, sel, &self.spec, start, cache.as_deref_mut().map(|c| (c, i)));
            }
        }
        if let Some(c) = cache {
            c.advance(seq);
        }
        self.ends.finish(x)
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let head = &self.ends.head;
        if crate::host_forward::covers_head(self, &hidden) {
            let [batch, seq, _] = hidden.dims();
            let values = hidden.into_data().try_into_vec::<f32>().expect("f32 activations");
            let logits = crate::host_search::head_logits(head, &values, batch * seq);
            return Tensor::from_data(TensorData::new(logits, [batch, seq, head.outputs()]), &self.device);
        }
        head.forward(hidden)
    }

    fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.ends.embed(tokens, 0)
    }

    fn block_forward(&self, layer: usize, x: Tensor<3>, gates: Option<&BlockGates>) -> Tensor<3> {
        let block = &self.blocks[layer];
        block.forward(x, crate::selector(block.kept.as_ref(), gates), &self.spec, 0, None)
    }

    fn finish(&self, x: Tensor<3>) -> Tensor<3> {
        self.ends.finish(x)
    }

    fn weight_bytes(&self) -> u64 {
        let size = |t: &Tensor<2>| t.dims().iter().product::<usize>() as u64 * t.dtype().size() as u64;
        let linear = |l: &Linear| size(&l.weight) + l.bias.as_ref().map_or(0, |b| 4 * b.dims()[0] as u64);
        let blocks: u64 = self.blocks.iter().map(|b| b.linears().all().map(linear).sum::<u64>()).sum();
        let norms: u64 = self.blocks.iter().map(|b| 4 * b.norm_params() as u64).sum();
        let ends = &self.ends;
        let head = if ends.tied { ends.head.bias.as_ref().map_or(0, |b| 4 * b.dims()[0] as u64) } else { linear(&ends.head) };
        let projections: u64 = ends.project_in.iter().chain(&ends.project_out).map(linear).sum();
        let positions = ends.positions.as_ref().map_or(0, |p| size(&p.table));
        blocks + norms + size(&ends.tokens) + head + projections + positions + 4 * ends.final_norm.as_ref().map_or(0, |n| n.stored_params() as u64)
    }

    fn summed_nll(&self, tokens: &[u32], batch: usize) -> Option<f64> {
        crate::host_forward::summed_nll(self, tokens, batch)
    }

    fn gate_gradients(
        &self,
        tokens: &[u32],
        batch: usize,
        gates: &[[Vec<f32>; 5]],
        copies: &crate::host_search::BackwardWeights,
    ) -> Option<crate::host_search::GateGradients> {
        crate::host_search::gate_gradients(self, tokens, batch, gates, copies)
    }

    fn block_linears(&self, layer: usize) -> BlockLinears<'_> {
        self.blocks[layer].linears()
    }

    fn block_linears_mut(&mut self, layer: usize) -> BlockLinearsMut<'_> {
        self.blocks[layer].linears_mut()
    }

    fn compute_in_bf16(&mut self) -> Result<()> {
        if self.device != Device::flex() || self.device.is_autodiff() {
            bail!("--compute bf16 runs on the plain CPU device (flex), not on {:?}", self.device);
        }
        if !crate::host_bf16::fast_kernel_available() {
            bail!("--compute bf16 needs a CPU with AVX512_BF16 (AMD Zen 4, Intel Sapphire Rapids or later); this one has none, use --compute f32");
        }
        if self.spec.activation == Activation::Gelu {
            bail!("--compute bf16: {}'s exact-erf GELU runs on the burn path, which computes in f32", self.family.model_type());
        }
        let packed = |l: &Linear| crate::host_bf16::PackedBf16::bytes_for(l.inputs(), l.outputs()) as u128;
        let head = &self.ends.head;
        // The head is converted to f32 whole while it is packed.
        let head_in_f32 = 4 * (head.inputs() * head.outputs()) as u128;
        let bytes: u128 = self.blocks.iter().map(|b| b.linears().all().map(packed).sum::<u128>()).sum::<u128>() + packed(head) + head_in_f32;
        disp_core::memory::check_fits("--compute bf16's copies of the weights", bytes)?;
        for block in &mut self.blocks {
            block.linears_mut().into_all().for_each(|linear| {
                linear.pack_bf16();
            });
        }
        self.ends.head.pack_bf16();
        Ok(())
    }

    fn prune(&self, plan: &PruningPlan) -> Result<Box<dyn CausalLm>> {
        if self.is_pruned() {
            bail!("model is already pruned");
        }
        plan.validate(&self.identity(), &self.model_shape())?;
        let blocks = self.blocks.iter().zip(&plan.layers).map(|(b, indices)| b.pruned(IndexTensors::new(indices, &self.device))).collect();
        Ok(Box::new(Self { blocks, ..self.clone() }))
    }
}

//! `disp-models` holds the model families `disp` prunes — LLaMA (incl. grouped-query attention),
//! OPT, Phi, Qwen2/2.5, Qwen3 and Mistral — written against burn's device-agnostic tensors,
//! loaded from Hugging Face folders (`config.json`, safetensors, `tokenizer.json`, the chat
//! template) or converted from GGUF. All are one decoder stack ([`decoder`]) configured by a
//! short family file; it
//! implements [`CausalLm`], whose forward pass runs dense, masked (gates from `disp-core` multiply
//! the block's index sets; used during the search) or pruned (weights cut to the index sets,
//! `index_select`/`index_add` against the full-width residual).

pub mod bpe;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod host_attention;
pub mod host_bf16;
pub mod host_forward;
pub mod host_search;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod opt;
pub mod phi;
pub mod pruned_folder;
pub mod qwen2;
pub mod qwen3;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::tensor::{Device, Int, Tensor};
use disp_core::params::ModelShape;
use disp_core::plan::{ModelIdentity, PruningPlan};
use disp_core::selection::{BlockGates, IndexTensors, Selector};

pub use config::{Family, RawConfig};
/// GGUF import lives in the tensor-free `disp-io` (so `cargo xtask fetch-assets` needs no burn).
pub use disp_io::gguf;
pub use layers::KvCache;
pub use tokenizer::TextTokenizer;
pub use weights::Checkpoint;

/// A causal language model `disp` can evaluate and prune.
pub trait CausalLm: Send + Sync {
    fn family(&self) -> Family;
    fn device(&self) -> &Device;
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position encoding supports.
    fn max_positions(&self) -> usize;
    fn num_layers(&self) -> usize;
    fn is_pruned(&self) -> bool;
    /// The prunable structure at full width (the same before and after pruning).
    fn model_shape(&self) -> ModelShape;
    /// What a plan must match: the family and the prunable widths.
    fn identity(&self) -> ModelIdentity {
        let shape = self.model_shape();
        ModelIdentity {
            model_type: self.family().model_type().into(),
            num_layers: shape.blocks.len(),
            hidden_size: shape.blocks[0].hidden,
            intermediate_size: shape.blocks[0].intermediate,
            fingerprint: None,
        }
    }
    /// Parameters of the block linears as actually stored (smaller once pruned).
    fn stored_linear_params(&self) -> usize;

    /// The final hidden states `[B, T, h]` for `tokens` `[B, T]`: the residual stream after the
    /// last block and the final norm (and projection), i.e. what the LM head reads.
    ///
    /// `gates` (one per layer) switches a dense model to masked mode. With a `cache`, the tokens
    /// continue the cached positions and their keys/values are appended.
    fn hidden_states(&self, tokens: Tensor<2, Int>, gates: Option<&[BlockGates]>, cache: Option<&mut KvCache>) -> Tensor<3>;

    /// The LM head: logits `[B, T, vocab]` of hidden states `[B, T, h]`.
    fn logits(&self, hidden: Tensor<3>) -> Tensor<3>;

    /// The residual stream entering block 0 for `tokens` `[B, T]` at positions `0..T`.
    ///
    /// [`Self::embed`], [`Self::block_forward`] for each layer in order and [`Self::finish`]
    /// compute [`Self::hidden_states`] without a cache, one block at a time: the search's
    /// per-block recompute (`disp_train::recompute`) keeps only the residual between blocks.
    fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3>;

    /// Block `layer` on the residual `x` `[B, T, h]` (positions `0..T`), masked by `gates` when
    /// given (dense or pruned as the model is otherwise).
    fn block_forward(&self, layer: usize, x: Tensor<3>, gates: Option<&BlockGates>) -> Tensor<3>;

    /// The final norm (and projection) after the last block: what [`Self::logits`] reads.
    fn finish(&self, x: Tensor<3>) -> Tensor<3>;

    /// Bytes the model's weights occupy in memory, at the dtypes they are held in.
    fn weight_bytes(&self) -> u64;

    /// Logits `[B, T, vocab]` for `tokens` `[B, T]` (see [`CausalLm::hidden_states`]).
    fn forward(&self, tokens: Tensor<2, Int>, gates: Option<&[BlockGates]>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.hidden_states(tokens, gates, cache))
    }

    /// Logits `[B, vocab]` of the last position only: all generation needs after a prompt, and
    /// the vocabulary projection of the other positions (a fifth of a small model's prefill work)
    /// is skipped.
    fn forward_last(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<2> {
        let hidden = self.hidden_states(tokens, None, cache);
        let [batch, seq, _] = hidden.dims();
        self.logits(hidden.narrow(1, seq - 1, 1)).reshape([batch, self.vocab_size()])
    }

    /// Σ next-token NLL of `tokens` (`batch` rows of equal length, each row's last position
    /// predicting nothing) computed without storing the logits, where the model has a host path
    /// for it ([`host_forward`]); `None` otherwise (compute the logits then).
    fn summed_nll(&self, _tokens: &[u32], _batch: usize) -> Option<f64> {
        None
    }

    /// The mean next-token NLL of `tokens` (`batch` rows) under masked gates (per layer, S1..S5)
    /// and its gradient with respect to every gate, computed without autodiff where the model
    /// has a host path for it ([`host_search`]); `None` otherwise (use autodiff then). `copies`
    /// holds the transposed weights that path may keep between calls (one per model).
    fn gate_gradients(
        &self,
        _tokens: &[u32],
        _batch: usize,
        _gates: &[[Vec<f32>; 5]],
        _copies: &host_search::BackwardWeights,
    ) -> Option<host_search::GateGradients> {
        None
    }

    /// The linear layers of block `layer`, grouped by the index set they touch.
    fn block_linears(&self, layer: usize) -> BlockLinears<'_>;

    /// [`Self::block_linears`] for changing weights in place (e.g. zeroing them for
    /// semi-structured sparsity); shapes must stay as they are.
    fn block_linears_mut(&mut self, layer: usize) -> BlockLinearsMut<'_>;

    /// A copy whose blocks are cut to the plan's index sets.
    fn prune(&self, plan: &PruningPlan) -> Result<Box<dyn CausalLm>>;

    /// Makes the host forward (plain CPU device) multiply with bf16 copies of every block linear
    /// and of the head, rounding each product's activations to bf16 and accumulating in f32
    /// (`--compute bf16`, [`host_bf16`]): about twice the f32 products per second where the CPU
    /// has AVX512_BF16, at bf16 precision. Gated (search) passes and the burn path keep f32.
    fn compute_in_bf16(&mut self) -> Result<()> {
        bail!("{} has no bf16 compute path", self.family().model_type())
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }
}

/// The linear layers of one block grouped by the index sets they touch, so that importance
/// scores can be computed without knowing the family.
pub struct BlockLinears<'a> {
    /// Read S1 through their input rows (q, k, v).
    pub attn_inputs: Vec<&'a layers::Linear>,
    /// Writes S2 through its output columns (o_proj / out_proj / dense).
    pub attn_output: &'a layers::Linear,
    /// Read S3 through their rows and produce S4 through their columns (gate+up / fc1).
    pub mlp_inputs: Vec<&'a layers::Linear>,
    /// Reads S4 through its rows and writes S5 through its columns (down_proj / fc2).
    pub mlp_output: &'a layers::Linear,
}

/// The same grouping as [`BlockLinears`], mutable.
pub struct BlockLinearsMut<'a> {
    /// q, k, v.
    pub attn_inputs: Vec<&'a mut layers::Linear>,
    /// o_proj / out_proj / dense.
    pub attn_output: &'a mut layers::Linear,
    /// gate + up / fc1.
    pub mlp_inputs: Vec<&'a mut layers::Linear>,
    /// down_proj / fc2.
    pub mlp_output: &'a mut layers::Linear,
}

impl<'a> BlockLinears<'a> {
    /// Every linear of the block: attention inputs, MLP inputs, attention output, MLP output.
    pub fn all(&self) -> impl Iterator<Item = &'a layers::Linear> + '_ {
        self.attn_inputs.iter().chain(&self.mlp_inputs).copied().chain([self.attn_output, self.mlp_output])
    }
}

impl<'a> BlockLinearsMut<'a> {
    /// Every linear of the block, in [`BlockLinears::all`]'s order.
    pub fn into_all(self) -> impl Iterator<Item = &'a mut layers::Linear> {
        self.attn_inputs.into_iter().chain(self.mlp_inputs).chain([self.attn_output, self.mlp_output])
    }
}

/// Picks how a block applies its index sets: pruned weights win; gates make it masked.
pub(crate) fn selector<'a>(kept: Option<&'a IndexTensors>, gates: Option<&'a BlockGates>) -> Selector<'a> {
    match (kept, gates) {
        (Some(_), Some(_)) => panic!("gates apply to the dense model, not to a pruned one"),
        (Some(kept), None) => Selector::Pruned(kept),
        (None, Some(gates)) => Selector::Masked(gates),
        (None, None) => Selector::Dense,
    }
}

/// Loads the model in an HF folder onto `device`: a dense checkpoint, or a pruned folder written
/// by `disp export` (then the model runs pruned, with the folder's index sets).
pub fn load_model(dir: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
    let raw = RawConfig::read(dir)?;
    let family = raw.family()?;
    let mut ck = Checkpoint::open(dir)?;
    let manifest = pruned_folder::ExportManifest::from_config(&raw)?;
    let mut plan = None;
    if let Some(manifest) = manifest {
        if manifest.source.num_layers != manifest.layer_widths.len() {
            bail!(
                "{}: 'disp' section lists {} layer widths for {} layers",
                raw.path.display(),
                manifest.layer_widths.len(),
                manifest.source.num_layers
            );
        }
        let layers = pruned_folder::read_index_sets(&ck, &manifest)?;
        let stored = manifest.into_plan(layers);
        ck.set_pruned_layout(pruned_folder::PrunedLayout { family, layers: stored.layers.clone() });
        plan = Some(stored);
    }
    let model = load_model_from(&raw, &ck, device)?;
    if let Some(plan) = plan {
        // The index sets are used by `select`, which must never see a position out of range.
        let identity = ModelIdentity { fingerprint: plan.model.fingerprint.clone(), ..model.identity() };
        plan.validate(&identity, &model.model_shape()).map_err(|e| anyhow!("{}: {e:#}", ck.describe()))?;
    }
    Ok(model)
}

/// Loads the model of `raw`'s family from any checkpoint: files, tensors in memory (see
/// [`Checkpoint::from_tensors`]; on `device.autodiff()` the model is differentiable in them) or a
/// probe. Blocks run pruned only when `ck` carries a pruned layout.
pub fn load_model_from(raw: &RawConfig, ck: &Checkpoint, device: &Device) -> Result<Box<dyn CausalLm>> {
    let family = raw.family()?;
    // Once for every family, before a loader allocates anything for the sizes it claims.
    raw.validate(ck.capacity())?;
    Ok(Box::new(family.load(raw, ck, device)?))
}

/// The (name, HF shape) of every tensor the family of `raw` reads for that config, in loading
/// order: what a checkpoint of this config must hold (no `lm_head.weight` when embeddings are
/// tied). Found by loading the model from a [`Checkpoint::probe`] (zeros on `device`).
pub fn parameter_shapes(raw: &RawConfig, device: &Device) -> Result<Vec<(String, Vec<usize>)>> {
    let probe = Checkpoint::probe();
    load_model_from(raw, &probe, device)?;
    Ok(probe.probed())
}

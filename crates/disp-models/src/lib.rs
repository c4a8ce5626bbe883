//! `disp-models` holds the model families `disp` prunes — LLaMA (incl. grouped-query attention),
//! OPT and Phi — written against burn's device-agnostic tensors, loaded from Hugging Face
//! folders (`config.json`, safetensors, `tokenizer.json`) or converted from GGUF. Every family
//! implements [`CausalLm`], whose forward pass runs dense, masked (gates from `disp-core` multiply
//! the block's index sets; used during the search) or pruned (weights cut to the index sets,
//! `index_select`/`index_add` against the full-width residual).

pub mod config;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod opt;
pub mod phi;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor};
use disp_core::params::ModelShape;
use disp_core::plan::{ModelIdentity, PruningPlan};
use disp_core::selection::{BlockGates, BlockIndices, Selector};

pub use config::{Family, RawConfig};
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
    fn identity(&self) -> ModelIdentity;
    /// Parameters of the block linears as actually stored (smaller once pruned).
    fn stored_linear_params(&self) -> usize;

    /// Logits `[B, T, vocab]` for `tokens` `[B, T]`.
    ///
    /// `gates` (one per layer) switches a dense model to masked mode. With a `cache`, the tokens
    /// continue the cached positions and their keys/values are appended.
    fn forward(&self, tokens: Tensor<2, Int>, gates: Option<&[BlockGates]>, cache: Option<&mut KvCache>) -> Tensor<3>;

    /// A copy whose blocks are cut to the plan's index sets.
    fn prune(&self, plan: &PruningPlan) -> Result<Box<dyn CausalLm>>;

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }
}

/// Picks how a block applies its index sets: pruned weights win; gates make it masked.
pub(crate) fn selector<'a>(kept: Option<&'a BlockIndices>, gates: Option<&'a BlockGates>) -> Selector<'a> {
    match (kept, gates) {
        (Some(_), Some(_)) => panic!("gates apply to the dense model, not to a pruned one"),
        (Some(kept), None) => Selector::Pruned(kept),
        (None, Some(gates)) => Selector::Masked(gates),
        (None, None) => Selector::Dense,
    }
}

/// Loads the model in an HF folder onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
    let raw = RawConfig::read(dir)?;
    let family = raw.family()?;
    let ck = Checkpoint::open(dir)?;
    Ok(match family {
        Family::Llama => Box::new(llama::Llama::load(&raw, &ck, device)?),
        Family::Opt => Box::new(opt::Opt::load(&raw, &ck, device)?),
        Family::Phi => Box::new(phi::Phi::load(&raw, &ck, device)?),
    })
}

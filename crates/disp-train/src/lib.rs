//! `disp-train` finds the index sets of DISP-LLM: it trains a small hypernetwork (fixed random
//! inputs → bidirectional GRU → LayerNorm → GELU → one bias-free linear map per gate vector)
//! whose Gumbel-sigmoid gates switch the positions of a frozen model's five selections per block
//! (S1..S5) on and off. The model runs in masked mode on the plain device and never changes;
//! only the hypernetwork, on the same device with autodiff, receives gradients and AdamW
//! updates. The objective is the language-model cross-entropy on calibration windows plus
//! λ·|log(P(S)/(p·P_blocks))|, where P(S) is the exact block parameter count of the hard
//! (straight-through) gates. At the end the deterministic scores are thresholded, one global
//! threshold shift lands the exact parameter count on the target ratio, and the result is a
//! [`PruningPlan`]. Runs are reproducible from the seed, checkpointable and resumable to the
//! same final masks. The objective can instead (or also) be the KL divergence from the dense
//! model's next-token distribution (`--loss kd`, [`loss::kd_loss`]). Recovery fine-tuning of a
//! pruned model with LoRA adapters ([`finetune`], [`lora`]) reuses the losses, batches,
//! optimizer and checkpoint format.

pub mod activation_stats;
pub mod finetune;
pub mod gates;
pub mod generator;
pub mod hypernet;
pub mod lora;
pub mod loss;
pub mod masks;
pub mod pretrain;
pub mod prune;
pub mod recompute;
pub mod rng;
pub mod search;
pub mod search_state;
pub mod step_timing;
pub mod uniform;
pub mod wanda;

use std::path::PathBuf;

use disp_core::params::RatioOf;
use disp_core::plan::PruningPlan;
use disp_models::CausalLm;
use serde::{Deserialize, Serialize};

pub use finetune::{finetune, FinetuneConfig, FinetuneOutcome, FinetuneReport, FinetuneRequest, Finetuner};
pub use generator::{DirectLogits, GateGenerator, GateSource};
pub use hypernet::{HyperNet, HyperNetShape};
pub use lora::{LoraAdapters, LoraTarget};
pub use loss::Objective;
pub use masks::{calibrate, final_indices, Calibration, GateScores};
pub use prune::{prune, Method, PruneOutcome, PruneRequest};
pub use recompute::BackwardMode;
pub use search::{SearchMemory, Searcher};
pub use step_timing::{time_search_steps, StepTimingReport};

/// Settings of one search. [`Default`] holds the paper's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// Fraction of parameters to remove (of `ratio_of`), strictly between 0 and 1.
    pub target_ratio: f64,
    pub ratio_of: RatioOf,
    /// Hypernetwork updates.
    pub steps: usize,
    /// Weight λ of the parameter regulariser.
    pub lambda: f64,
    pub learning_rate: f64,
    /// AdamW (decoupled) weight decay.
    pub weight_decay: f64,
    /// Gumbel-sigmoid temperature τ.
    pub temperature: f64,
    /// Added to every logit before the sigmoid (starts the search near "keep everything").
    pub offset: f64,
    pub seed: u64,
    /// Calibration windows per step.
    pub batch_size: usize,
    /// Where to write checkpoints (none: never).
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0: only after the last step).
    pub checkpoint_every: usize,
    /// Continue from `checkpoint` if it exists.
    pub resume: bool,
    /// What produces the gate logits: the hypernetwork (`disp`) or direct logits (`disp-direct`).
    #[serde(default)]
    pub gate_source: GateSource,
    /// How a step back-propagates through the frozen model (see [`recompute`]); `Auto` picks by
    /// the memory estimate.
    #[serde(default)]
    pub backward: recompute::BackwardMode,
    /// What the masked model is trained against: the calibration text's next tokens (`lm`, the
    /// paper's), the dense model's next-token distributions (`kd`), or both.
    #[serde(default)]
    pub objective: Objective,
    /// Softmax temperature of the distillation loss (used by `kd` and `lm+kd`).
    #[serde(default = "default_kd_temperature")]
    pub kd_temperature: f64,
}

fn default_kd_temperature() -> f64 {
    1.0
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            target_ratio: 0.5,
            ratio_of: RatioOf::Total,
            steps: 10_000,
            lambda: 6.0,
            learning_rate: 1e-3,
            weight_decay: 0.05,
            temperature: 0.4,
            offset: 3.0,
            seed: 0,
            batch_size: 1,
            checkpoint: None,
            checkpoint_every: 500,
            resume: false,
            gate_source: GateSource::HyperNetwork,
            backward: recompute::BackwardMode::Auto,
            objective: Objective::Lm,
            kd_temperature: default_kd_temperature(),
        }
    }
}

/// Progress of one hypernetwork update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps completed, counting this one (1-based).
    pub step: usize,
    /// Mean next-token negative log-likelihood of the batch under the soft gates.
    pub lm_loss: f64,
    /// λ·|log(P(S)/(p·P_blocks))| of the hard gates.
    pub regulariser: f64,
    /// The distillation loss (see [`loss::kd_loss`]), when the objective uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kd_loss: Option<f64>,
    /// Fraction removed (of `ratio_of`) by this step's hard gates.
    pub achieved_ratio: f64,
}

/// Trains the gate generator (by default the hypernetwork) on `windows` (token windows of one length, tokenised by the caller)
/// and returns the pruning plan. `on_step` is called after every update (and not for steps
/// restored from a checkpoint).
pub fn search(model: &dyn CausalLm, windows: &[Vec<u32>], cfg: &SearchConfig, mut on_step: impl FnMut(&StepReport)) -> anyhow::Result<PruningPlan> {
    let mut searcher = Searcher::new(model, windows, cfg)?;
    if cfg.resume {
        searcher.resume()?;
    }
    while searcher.steps_done() < cfg.steps {
        let report = searcher.step()?;
        on_step(&report);
    }
    searcher.finish()
}

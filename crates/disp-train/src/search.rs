//! The search loop: one [`Searcher`] per run, stepping the hypernetwork against a frozen model.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Bytes, Int, Tensor, TensorData};
use disp_core::params::{BlockShape, BlockWidths, ModelShape};
use disp_core::plan::{PruningPlan, PLAN_FORMAT_VERSION};
use disp_models::host_search::BackwardWeights;
use disp_models::CausalLm;
use serde_json::json;

use crate::gates::{self, SampledGates};
use crate::generator::{GateGenerator, GateSource};
use crate::hypernet::{HyperNet, HyperNetShape};
use crate::loss::{kd_loss, lm_loss, KdLoss, LmLoss, Objective};
use crate::masks::{calibrate, GateScores};
use crate::recompute::{lm_gate_gradients_per_block, BackwardMode};
use crate::rng::{mix64, Purpose, ShuffledBatches};
use crate::search_state::{self, SearchStateHeader, SEARCH_STATE_FORMAT_VERSION};
use crate::{SearchConfig, StepReport};
use disp_core::memory::human_bytes;

/// The differentiable losses of one step, before `backward`.
pub struct StepLoss {
    /// Mean next-token NLL under the soft gates (value on the host, surrogate for backward; see
    /// [`crate::loss`]).
    pub lm: LmLoss,
    /// Distillation from the dense model (same model, no gates) to the masked one, when the
    /// objective uses it.
    pub kd: Option<KdLoss>,
    pub objective: Objective,
    /// λ·|log(P(S)/(p·P_blocks))| of the straight-through gates, `[1]`.
    pub regulariser: Tensor<1>,
    /// Hard gates (no graph), per site `[layers, width]`.
    pub hard: [Tensor<2>; 5],
    /// Whether the gate generator's logits were all finite ([`SampledGates::logits_finite`]).
    pub logits_finite: bool,
}

impl StepLoss {
    /// What `backward` is called on: its gradient is that of the objective (LM loss, KD loss or
    /// both) plus the regulariser.
    pub fn total(&self) -> Tensor<1> {
        let mut total = self.regulariser.clone();
        if self.objective.uses_lm() {
            total = total + self.lm.surrogate.clone();
        }
        if let Some(kd) = &self.kd {
            total = total + kd.surrogate.clone();
        }
        total
    }
}

/// Wall-clock seconds of the parts of one step.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct StepTimes {
    /// Hypernetwork, gates, masked model forward and losses (until the loss is on the host).
    pub forward: f64,
    /// `backward()` down to the hypernetwork parameters.
    pub backward: f64,
    /// Gradient collection and the AdamW update.
    pub optimizer: f64,
    /// The whole step, bookkeeping and any checkpoint included.
    pub total: f64,
}

/// One search run: the frozen model, the calibration windows, the gate generator (the
/// hypernetwork, or direct logits for `disp-direct`) and its optimizer, and the number of steps
/// done.
pub struct Searcher<'a> {
    model: &'a dyn CausalLm,
    windows: &'a [Vec<u32>],
    cfg: SearchConfig,
    shape: ModelShape,
    block: BlockShape,
    net_shape: HyperNetShape,
    /// Block parameters to keep: p·P_blocks.
    target_block_params: f64,
    generator: GateGenerator,
    optim: ModuleOptimizer,
    steps_done: usize,
    last: Option<StepReport>,
    first_regulariser: Option<f64>,
    /// The epoch whose window order is cached in `order`.
    batches: ShuffledBatches,
    /// Digest of some of the frozen weights (see [`weights_digest`]), recorded in checkpoints.
    weights_digest: String,
    /// How steps back-propagate through the model (`FullGraph` or `PerBlock`, never `Auto`).
    backward: BackwardMode,
    /// The transposed weight copies the model's host backward keeps between steps.
    backward_weights: BackwardWeights,
}

/// A digest of the output projections of the first and last block: tells apart two models of the
/// same sizes (e.g. a base model and its fine-tune), so a checkpoint of one does not resume on
/// the other. A few small matrices, read once per run.
pub(crate) fn weights_digest(model: &dyn CausalLm) -> String {
    let last = model.num_layers().saturating_sub(1);
    let mut hash = mix64(model.num_layers() as u64);
    for layer in [0, last] {
        let linears = model.block_linears(layer);
        for linear in [linears.attn_output, linears.mlp_output] {
            let values = linear.weight.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            hash = values.iter().fold(mix64(hash ^ values.len() as u64), |h, v| mix64(h ^ u64::from(v.to_bits())));
        }
    }
    format!("{hash:016x}")
}

impl<'a> Searcher<'a> {
    /// Checks the settings and the data and builds a fresh hypernetwork from the seed.
    pub fn new(model: &'a dyn CausalLm, windows: &'a [Vec<u32>], cfg: &SearchConfig) -> Result<Self> {
        if cfg.steps == 0 {
            bail!("the search needs at least one step (steps = 0)");
        }
        if cfg.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
            bail!("Gumbel-sigmoid temperature must be positive, got {}", cfg.temperature);
        }
        if !(cfg.kd_temperature > 0.0 && cfg.kd_temperature.is_finite()) {
            bail!("distillation temperature must be positive, got {}", cfg.kd_temperature);
        }
        if !(cfg.learning_rate > 0.0 && cfg.learning_rate.is_finite()) {
            bail!("learning rate must be positive, got {}", cfg.learning_rate);
        }
        if !(cfg.lambda >= 0.0 && cfg.lambda.is_finite()) {
            bail!("λ must be non-negative, got {}", cfg.lambda);
        }
        if !(cfg.weight_decay >= 0.0 && cfg.weight_decay.is_finite() && cfg.offset.is_finite()) {
            bail!("weight decay must be non-negative and the offset finite");
        }
        if cfg.resume && cfg.checkpoint.is_none() {
            bail!("resume needs a checkpoint path");
        }
        if model.is_pruned() {
            bail!("the search needs the dense model, not a pruned one");
        }
        let shape = model.model_shape();
        let kept = shape.kept_block_fraction(cfg.target_ratio, cfg.ratio_of)?;
        let net_shape = HyperNetShape::of(&shape)?;
        check_windows(windows, model)?;
        let memory = SearchMemory::estimate(model, cfg.batch_size, windows[0].len(), cfg.gate_source, net_shape);
        let available = disp_core::memory::available_bytes();
        let backward = memory.choose(cfg.backward, available)?;
        let copies = BackwardWeights::bytes_for(&shape);
        let backward_weights = if memory.fits_transposed_copies(backward, copies, available) {
            BackwardWeights::transposed_copies()
        } else {
            tracing::info!("the host backward reads the weights as stored: their transposed copies ({}) do not fit", human_bytes(copies.into()));
            BackwardWeights::as_stored()
        };
        if backward == BackwardMode::PerBlock && cfg.objective.uses_kd() {
            bail!(
                "the {} loss needs the full-graph backward, but this search step only fits in memory with per-block recompute ({}); use --loss lm",
                cfg.objective.name(),
                memory.describe(BackwardMode::PerBlock)
            );
        }

        let device = model.device().clone().autodiff();
        let generator = GateGenerator::new(cfg.gate_source, net_shape, cfg.seed, &device);
        Ok(Self {
            model,
            windows,
            cfg: cfg.clone(),
            block: shape.blocks[0],
            target_block_params: kept * shape.dense_block_params() as f64,
            shape,
            net_shape,
            generator,
            optim: adamw(cfg),
            steps_done: 0,
            last: None,
            first_regulariser: None,
            batches: ShuffledBatches::new(windows.len(), cfg.seed, Purpose::Shuffle),
            weights_digest: weights_digest(model),
            backward,
            backward_weights,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// The hypernetwork. Panics when the search trains direct logits (`GateSource::Direct`).
    pub fn hypernet(&self) -> &HyperNet {
        match &self.generator {
            GateGenerator::HyperNetwork { net, .. } => net,
            GateGenerator::Direct(_) => panic!("this search trains direct gate logits, not a hypernetwork"),
        }
    }

    /// Swaps in another hypernetwork (same structure), returning the old one; the optimizer
    /// state stays. For tests and experiments. Panics for `GateSource::Direct`.
    pub fn replace_hypernet(&mut self, net: HyperNet) -> HyperNet {
        match &mut self.generator {
            GateGenerator::HyperNetwork { net: current, .. } => std::mem::replace(current, net),
            GateGenerator::Direct(_) => panic!("this search trains direct gate logits, not a hypernetwork"),
        }
    }

    /// What produces the gate logits (hypernetwork or direct logits).
    pub fn generator(&self) -> &GateGenerator {
        &self.generator
    }

    /// Swaps in another generator of the same source and shape, returning the old one; the
    /// optimizer state stays. For tests and experiments.
    pub fn replace_generator(&mut self, generator: GateGenerator) -> GateGenerator {
        assert_eq!(generator.source(), self.generator.source(), "a search cannot switch gate sources");
        std::mem::replace(&mut self.generator, generator)
    }

    pub fn config(&self) -> &SearchConfig {
        &self.cfg
    }

    /// How steps back-propagate through the model (resolved from the config's mode).
    pub fn backward_mode(&self) -> BackwardMode {
        self.backward
    }

    pub fn last_report(&self) -> Option<&StepReport> {
        self.last.as_ref()
    }

    /// The fixed hypernetwork inputs `[1, 5·layers, 32]`. Panics for `GateSource::Direct`.
    pub fn inputs(&self) -> &Tensor<3> {
        match &self.generator {
            GateGenerator::HyperNetwork { inputs, .. } => inputs,
            GateGenerator::Direct(_) => panic!("this search trains direct gate logits, which have no inputs"),
        }
    }

    /// The indices of the windows of (1-based) step `step`: the batches walk through the windows
    /// in a seeded random order, reshuffled every epoch.
    pub fn batch_windows(&mut self, step: usize) -> Vec<usize> {
        self.batches.batch(step, self.cfg.batch_size)
    }

    /// The gates of (1-based) step `step`, with the step's own noise.
    pub fn sample_gates(&self, step: usize) -> SampledGates {
        let logits = self.generator.logits();
        let mut rng = crate::rng::stream(self.cfg.seed, Purpose::Noise, step as u64);
        let noise = gates::logistic_noise(&mut rng, self.net_shape.layers, self.net_shape.widths);
        gates::sample(logits, noise, self.cfg.offset, self.cfg.temperature)
    }

    /// Forward pass of (1-based) step `step`: LM loss (and, if the objective asks, the
    /// distillation loss) under the soft gates and the regulariser of the straight-through gates.
    ///
    /// The teacher is the same frozen model run dense (no gates) on the plain device, computed
    /// on the fly: each window's teacher forward is needed once per visit, and a search of the
    /// usual length visits a window about once (100–200 steps of batch 1 over a few hundred
    /// windows), so a cache of teacher logits would cost the same forwards plus its memory.
    pub fn step_loss(&mut self, step: usize) -> StepLoss {
        let batch = self.batch_windows(step);
        let sampled = self.sample_gates(step);
        let (lm, kd) = match self.backward {
            BackwardMode::PerBlock => {
                // The model's backward runs here, block by block; what is left for `backward`
                // is the gate generator's. `new` refuses distillation in this mode.
                let tokens = self.tokens(&batch);
                let grads = lm_gate_gradients_per_block(self.model, &tokens, &sampled.soft);
                (LmLoss { value: grads.lm_loss, surrogate: grads.surrogate(&sampled.soft) }, None)
            }
            // Distillation needs the masked logits themselves, which the host gate-gradient path
            // does not return: burn's autodiff through the whole masked forward.
            BackwardMode::FullGraph | BackwardMode::Auto if self.cfg.objective.uses_kd() => {
                let tokens = self.tokens(&batch);
                let logits = self.model.forward(tokens.clone(), Some(&gates::block_gates(&sampled.soft)), None);
                let teacher = self.model.forward(tokens.clone(), None, None);
                let kd = kd_loss(logits.clone(), teacher, self.cfg.kd_temperature);
                (lm_loss(logits, &tokens), Some(kd))
            }
            BackwardMode::FullGraph | BackwardMode::Auto => (self.masked_lm_loss(&batch, &sampled.soft), None),
        };
        let params = gates::parameter_count(&self.block, &sampled.straight_through);
        let regulariser = disp_core::params::parameter_regulariser(params, self.target_block_params, self.cfg.lambda);
        StepLoss { lm, kd, objective: self.cfg.objective, regulariser, hard: sampled.hard, logits_finite: sampled.logits_finite }
    }

    /// The LM loss of the windows `batch` under the soft gates (per site `[layers, width]`). Where
    /// the model computes the gate gradients itself ([`CausalLm::gate_gradients`]: on the plain
    /// CPU device, no autodiff through the frozen model), the surrogate Σ gates · ∂L/∂gates
    /// carries them into the small autodiff graph of the gate generator; otherwise burn's
    /// autodiff runs through the whole masked forward.
    pub fn masked_lm_loss(&self, batch: &[usize], soft: &[Tensor<2>; 5]) -> LmLoss {
        let [layers, _] = soft[0].dims();
        let values: Vec<Vec<f32>> =
            soft.iter().map(|s| s.clone().inner().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 gates")).collect();
        let per_layer: Vec<[Vec<f32>; 5]> = (0..layers)
            .map(|l| {
                std::array::from_fn(|s| {
                    let width = soft[s].dims()[1];
                    values[s][l * width..(l + 1) * width].to_vec()
                })
            })
            .collect();
        let flat: Vec<u32> = batch.iter().flat_map(|&i| self.windows[i].iter().copied()).collect();
        if let Some(host) = self.model.gate_gradients(&flat, batch.len(), &per_layer, &self.backward_weights) {
            let device = soft[0].device();
            let surrogate = (0..5)
                .map(|s| {
                    let width = soft[s].dims()[1];
                    let grad: Vec<f32> = host.layers.iter().flat_map(|l| l[s].iter().copied()).collect();
                    (soft[s].clone() * Tensor::<2>::from_data(TensorData::new(grad, [layers, width]), &device)).sum()
                })
                .reduce(|a, b| a + b)
                .expect("five sites");
            return LmLoss { value: host.loss, surrogate };
        }
        let tokens = self.tokens(batch);
        let block_gates = gates::block_gates(soft);
        lm_loss(self.model.forward(tokens.clone(), Some(&block_gates), None), &tokens)
    }

    /// One update of the gate generator. Fails, without updating, on a non-finite loss.
    pub fn step(&mut self) -> Result<StepReport> {
        Ok(self.step_timed()?.0)
    }

    /// [`Self::step`], also returning how long its parts took.
    pub fn step_timed(&mut self) -> Result<(StepReport, StepTimes)> {
        let step = self.steps_done + 1;
        let start = Instant::now();
        let loss = self.step_loss(step);
        let lm_loss = loss.lm.value;
        let kd_loss = loss.kd.as_ref().map(|kd| kd.value);
        let regulariser = loss.regulariser.clone().into_scalar::<f32>() as f64;
        let forward = start.elapsed().as_secs_f64();
        if !(loss.logits_finite && lm_loss.is_finite() && regulariser.is_finite() && kd_loss.is_none_or(f64::is_finite)) {
            let kept = match &self.cfg.checkpoint {
                Some(path) if path.exists() => format!("last good checkpoint kept at {}", path.display()),
                Some(path) => format!("no checkpoint written yet ({})", path.display()),
                None => "no checkpoint configured".to_string(),
            };
            let kd = kd_loss.map(|v| format!(", KD {v}")).unwrap_or_default();
            let logits = if loss.logits_finite { "" } else { ", non-finite gate logits" };
            bail!("non-finite loss at step {step} (LM {lm_loss}{kd}, regulariser {regulariser}{logits}); {kept}");
        }
        let achieved_ratio = self.hard_ratio(&loss.hard);
        let t = Instant::now();
        let grads = loss.total().backward();
        let backward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.generator.update(&mut self.optim, self.cfg.learning_rate, grads);
        let optimizer = t.elapsed().as_secs_f64();
        self.steps_done = step;
        let report = StepReport { step, lm_loss, regulariser, kd_loss, achieved_ratio };
        self.first_regulariser.get_or_insert(regulariser);
        self.last = Some(report.clone());

        let every = (self.cfg.steps / 100).max(1);
        if step == 1 || step.is_multiple_of(every) || step == self.cfg.steps {
            tracing::info!(step, steps = self.cfg.steps, lm_loss, regulariser, achieved_ratio, "hypernetwork step");
        } else {
            tracing::debug!(step, lm_loss, regulariser, achieved_ratio, "hypernetwork step");
        }
        if let Some(path) = self.cfg.checkpoint.clone() {
            let every = self.cfg.checkpoint_every;
            if (every > 0 && step.is_multiple_of(every)) || step == self.cfg.steps {
                self.save_checkpoint(&path)?;
            }
        }
        let times = StepTimes { forward, backward, optimizer, total: start.elapsed().as_secs_f64() };
        Ok((report, times))
    }

    /// Fraction removed by hard gates `[layers, width]` per site.
    fn hard_ratio(&self, hard: &[Tensor<2>; 5]) -> f64 {
        let counts = Tensor::cat(hard.iter().map(|h| h.clone().sum_dim(1)).collect(), 1); // [L, 5]
        let counts = counts.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 counts");
        let widths: Vec<BlockWidths> = counts
            .chunks_exact(5)
            .map(|c| BlockWidths {
                attn_in: c[0].round() as usize,
                attn_out: c[1].round() as usize,
                mlp_in: c[2].round() as usize,
                mlp_inter: c[3].round() as usize,
                mlp_out: c[4].round() as usize,
            })
            .collect();
        self.shape.removed_ratio(&widths, self.cfg.ratio_of)
    }

    fn tokens(&self, batch: &[usize]) -> Tensor<2, Int> {
        let seq = self.windows[0].len();
        let flat: Vec<i64> = batch.iter().flat_map(|&i| self.windows[i].iter().map(|&t| t as i64)).collect();
        Tensor::from_data(TensorData::new(flat, [batch.len(), seq]), self.model.device())
    }

    /// Deterministic scores: generator logits + offset, no noise.
    pub fn scores(&self) -> GateScores {
        let logits = self.generator.logits();
        let per_site: Vec<Vec<f32>> = logits
            .into_iter()
            .map(|t| t.add_scalar(self.cfg.offset).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits"))
            .collect();
        (0..self.net_shape.layers)
            .map(|l| {
                std::array::from_fn(|s| {
                    let w = self.net_shape.widths[s];
                    per_site[s][l * w..(l + 1) * w].to_vec()
                })
            })
            .collect()
    }

    /// The plan from the current generator: thresholded deterministic scores, calibrated so
    /// that the exact parameter count lands on the target.
    pub fn finish(&self) -> Result<PruningPlan> {
        let scores = self.scores();
        let c = calibrate(&scores, &self.shape, self.cfg.target_ratio, self.cfg.ratio_of);
        let identity = self.model.identity();
        let last = self.last.as_ref();
        let mut plan = PruningPlan {
            format_version: PLAN_FORMAT_VERSION,
            model: identity.clone(),
            method: self.cfg.gate_source.method().into(),
            ratio_of: self.cfg.ratio_of,
            target_ratio: self.cfg.target_ratio,
            achieved_ratio: c.ratio,
            dense_params: self.shape.dense_total_params(),
            pruned_params: c.total_params,
            layers: c.layers,
            search: json!({
                "steps": self.steps_done,
                "lambda": self.cfg.lambda,
                "seed": self.cfg.seed,
                "seq_len": self.windows[0].len(),
                "batch_size": self.cfg.batch_size,
                "windows": self.windows.len(),
                "lr": self.cfg.learning_rate,
                "weight_decay": self.cfg.weight_decay,
                "temperature": self.cfg.temperature,
                "offset": self.cfg.offset,
                "final_lm_loss": last.map(|r| r.lm_loss),
                "final_regulariser": last.map(|r| r.regulariser),
                "first_regulariser": self.first_regulariser,
                "final_hard_gate_ratio": last.map(|r| r.achieved_ratio),
                "raw_ratio": c.raw_ratio,
                "calibrated_ratio": c.ratio,
                "threshold_shift": if c.threshold.is_finite() { json!(c.threshold) } else { json!(null) },
                "gate_source": self.cfg.gate_source,
            }),
        };
        // Recorded only for distillation, so `lm` plans stay byte-identical to earlier ones.
        if self.cfg.objective != Objective::Lm {
            plan.search["loss"] = json!(self.cfg.objective);
            plan.search["kd_temperature"] = json!(self.cfg.kd_temperature);
            plan.search["kd_teacher"] = json!("the same model run dense (no gates), on the fly");
            plan.search["final_kd_loss"] = json!(last.and_then(|r| r.kd_loss));
        }
        if self.cfg.gate_source == GateSource::HyperNetwork {
            plan.search["hypernetwork"] = json!({"input_width": crate::hypernet::INPUT_WIDTH, "gru_hidden": crate::hypernet::GRU_HIDDEN});
        }
        plan.validate(&identity, &self.shape)?;
        tracing::info!(
            target_ratio = self.cfg.target_ratio,
            raw_ratio = c.raw_ratio,
            achieved_ratio = c.ratio,
            threshold_shift = c.threshold,
            "search finished"
        );
        Ok(plan)
    }

    /// The settings a resumed run must share with the one that wrote the checkpoint.
    fn settings(&self) -> serde_json::Value {
        let digest = self.windows.iter().flatten().fold(mix64(self.windows.len() as u64), |h, &t| mix64(h ^ t as u64));
        let mut settings = json!({
            "target_ratio": self.cfg.target_ratio,
            "ratio_of": self.cfg.ratio_of,
            "lambda": self.cfg.lambda,
            "learning_rate": self.cfg.learning_rate,
            "weight_decay": self.cfg.weight_decay,
            "temperature": self.cfg.temperature,
            "offset": self.cfg.offset,
            "seed": self.cfg.seed,
            "batch_size": self.cfg.batch_size,
            "windows": self.windows.len(),
            "seq_len": self.windows[0].len(),
            "windows_digest": format!("{digest:016x}"),
            "weights_digest": self.weights_digest,
        });
        // Only the non-default source is recorded, so hypernetwork checkpoints written before
        // direct logits existed still resume.
        if self.cfg.gate_source != GateSource::HyperNetwork {
            settings["gate_source"] = json!(self.cfg.gate_source);
        }
        if self.cfg.objective != Objective::Lm {
            settings["loss"] = json!(self.cfg.objective);
            settings["kd_temperature"] = json!(self.cfg.kd_temperature);
        }
        settings
    }

    /// Writes the gate generator, the optimizer state and the step (atomically).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let header = SearchStateHeader {
            format_version: SEARCH_STATE_FORMAT_VERSION,
            step: self.steps_done,
            model: self.model.identity(),
            settings: self.settings(),
            last: self.last.clone(),
            first_regulariser: self.first_regulariser,
        };
        let net = self.generator.to_bytes()?;
        let opt = self.optim.into_bytes().map_err(|e| anyhow::anyhow!("cannot serialise the optimizer state: {e:?}"))?;
        search_state::write(path, &header, &net, &opt)?;
        tracing::debug!(step = self.steps_done, path = %path.display(), "checkpoint written");
        Ok(())
    }

    /// Continues from the configured checkpoint if it exists (returns whether it did). The
    /// checkpoint must come from the same model, data and settings (the number of steps may
    /// grow).
    pub fn resume(&mut self) -> Result<bool> {
        let Some(path) = self.cfg.checkpoint.clone() else { bail!("resume needs a checkpoint path") };
        if !path.exists() {
            tracing::info!(path = %path.display(), "no checkpoint yet; starting from step 0");
            return Ok(false);
        }
        self.load_checkpoint(&path)?;
        Ok(true)
    }

    /// Restores the state saved by [`Self::save_checkpoint`].
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let data = search_state::read(path)?;
        let h = &data.header;
        let identity = self.model.identity();
        if h.model != identity {
            bail!("{}: checkpoint is for another model ({:?}, this one is {:?})", path.display(), h.model, identity);
        }
        let settings = self.settings();
        if h.settings.get("weights_digest") != settings.get("weights_digest") {
            bail!("{}: checkpoint is for another model of the same sizes (its weights differ)", path.display());
        }
        if h.settings != settings {
            // Keys of either side: a setting recorded only when not the default (gate_source)
            // may be missing from one of them.
            let mut keys: Vec<&String> = settings.as_object().unwrap().keys().collect();
            keys.extend(h.settings.as_object().into_iter().flat_map(|o| o.keys()));
            keys.sort();
            keys.dedup();
            let null = json!(null);
            let differing: Vec<String> = keys
                .into_iter()
                .filter_map(|k| {
                    let (then, now) = (h.settings.get(k.as_str()).unwrap_or(&null), settings.get(k.as_str()).unwrap_or(&null));
                    (then != now).then(|| format!("{k}: checkpoint {then} vs now {now}"))
                })
                .collect();
            bail!("{}: checkpoint was written with different settings ({})", path.display(), differing.join(", "));
        }
        if h.step > self.cfg.steps {
            bail!("{}: checkpoint is at step {}, beyond the {} steps asked for", path.display(), h.step, self.cfg.steps);
        }
        self.generator.load_bytes(data.hypernet).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
        self.optim = adamw(&self.cfg)
            .from_bytes(Bytes::from_bytes_vec(data.optimizer))
            .map_err(|e| anyhow::anyhow!("{}: bad optimizer record: {e:?}", path.display()))?;
        self.steps_done = h.step;
        self.last = h.last.clone();
        self.first_regulariser = h.first_regulariser;
        tracing::info!(step = h.step, path = %path.display(), "resumed from checkpoint");
        Ok(())
    }
}

fn adamw(cfg: &SearchConfig) -> ModuleOptimizer {
    AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(cfg.weight_decay as f32).init()
}

/// Calibration windows must exist, share one length of at least 2 tokens that the model's
/// positions cover, and hold only in-vocabulary tokens.
/// What a search step holds at its peak, in bytes (estimates; f32 activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchMemory {
    /// The frozen model's weights as held (already loaded when this is estimated).
    pub weights: u64,
    /// The gate generator's parameters, their gradients and AdamW's two moments.
    pub generator: u64,
    /// Activations (and f32 casts of weights stored below f32) kept by one graph of the whole model.
    pub full_graph: u64,
    /// The same for per-block recompute: every block's input residual plus one block's graph.
    pub per_block: u64,
    /// Tokens per step (batch size × sequence length) the activation figures are for.
    pub tokens: u64,
    /// What one more window per step (`--batch-size` + 1) adds to the activations, [full, per block].
    pub per_window: [u64; 2],
    /// The activations at twice the sequence length, [full, per block].
    pub doubled_seq: [u64; 2],
}

impl SearchMemory {
    /// The estimate for `model` with `batch_size` windows of `seq_len` tokens and the generator
    /// `source` for `net` gates.
    pub fn estimate(model: &dyn CausalLm, batch_size: usize, seq_len: usize, source: GateSource, net: HyperNetShape) -> Self {
        let generator_params = match source {
            GateSource::HyperNetwork => {
                let feature = 2 * crate::hypernet::GRU_HIDDEN as u64;
                let gru = 2 * 3 * (crate::hypernet::INPUT_WIDTH as u64 + feature / 2 + 2) * (feature / 2);
                net.layers as u64 * feature * net.widths.iter().sum::<usize>() as u64 + gru
            }
            GateSource::Direct => net.gate_entries() as u64,
        };
        let activations = |batch: u64, seq: u64| Self::activations(model, batch, seq);
        let (batch, seq) = (batch_size as u64, seq_len as u64);
        let [full_graph, per_block] = activations(batch, seq);
        let [full_wider, per_block_wider] = activations(batch + 1, seq);
        let [full_longer, per_block_longer] = activations(batch, 2 * seq);
        Self {
            weights: model.weight_bytes(),
            generator: 4 * 4 * generator_params,
            full_graph,
            per_block,
            tokens: batch * seq,
            per_window: [full_wider - full_graph, per_block_wider - per_block],
            doubled_seq: [full_longer, per_block_longer],
        }
    }

    /// Activation bytes of [full graph, per block] for `batch` windows of `seq` tokens.
    fn activations(model: &dyn CausalLm, batch: u64, seq: u64) -> [u64; 2] {
        let shape = model.model_shape();
        let block = shape.blocks[0];
        let (layers, vocab) = (shape.blocks.len() as u64, model.vocab_size() as u64);
        let tokens = batch * seq;
        let (d, f, q, kv) = (block.hidden as u64, block.intermediate as u64, block.q_dim as u64, block.kv_dim as u64);
        // Head dimensions are 64 or more: at most q/64 heads.
        let heads = q / 64;
        // Per block: norms, residual adds, masks (~12·d), q/k/v, their rotary and grouped-query
        // copies and the attention output (5q + 4kv), the MLP's gate, up, activation, product and
        // masked copies (6·f); plus burn's autodiff attention (a composition of tensor ops): the
        // scores, their mask, softmax and its gradient, four [B, H, T, T] tensors.
        let block_activations = 4 * tokens * (12 * d + 5 * q + 4 * kv + 6 * f) + 4 * 4 * batch * heads * seq * seq;
        // The graph keeps each matmul's weight operand: its f32 cast when stored below f32.
        let below_f32 = model.weight_bytes() < 4 * shape.dense_total_params();
        let block_casts = if below_f32 { 4 * block.linear_params(&block.full_widths()) } else { 0 };
        // Logits, their softmax, the loss's gradient and the surrogate product; the head's cast.
        let head = 4 * tokens * vocab * 4 + if below_f32 { 4 * vocab * d } else { 0 };
        let residual = 4 * tokens * d;
        [layers * (block_activations + block_casts) + head, (layers + 1) * residual + (block_activations + block_casts).max(head)]
    }

    /// Bytes the step needs beyond the loaded weights in `mode` (`Auto` is not a mode here).
    pub fn beyond_weights(&self, mode: BackwardMode) -> u64 {
        self.generator + if mode == BackwardMode::PerBlock { self.per_block } else { self.full_graph }
    }

    /// Whether the host backward's transposed weight copies (`copies` bytes) fit in `available`
    /// bytes beside a step in `mode`. It reads every block weight transposed, which runs its
    /// products slower than a row-major copy of the transpose does (see `BackwardWeights`).
    pub fn fits_transposed_copies(&self, mode: BackwardMode, copies: u64, available: Option<u64>) -> bool {
        available.is_none_or(|a| self.beyond_weights(mode).saturating_add(copies) <= a)
    }

    /// One line: the peak of `mode`, its parts, and what `--batch-size` / `--seq-len` cost.
    pub fn describe(&self, mode: BackwardMode) -> String {
        let i = usize::from(mode == BackwardMode::PerBlock);
        let activations = [self.full_graph, self.per_block][i];
        format!(
            "peak memory estimate {} ({} weights + {} gate generator and AdamW state + {} activations, {} backward; --batch-size +1 adds {}, twice the --seq-len needs {} of activations)",
            human_bytes(u128::from(self.weights + self.beyond_weights(mode))),
            human_bytes(self.weights.into()),
            human_bytes(self.generator.into()),
            human_bytes(activations.into()),
            mode.name(),
            human_bytes(self.per_window[i].into()),
            human_bytes(self.doubled_seq[i].into())
        )
    }

    /// The backward mode for `requested` given `available` bytes (beyond the loaded weights):
    /// `Auto` takes the full graph when it fits, else per-block recompute. Fails with the
    /// estimate and the available memory when the chosen mode does not fit.
    pub fn choose(&self, requested: BackwardMode, available: Option<u64>) -> Result<BackwardMode> {
        let fits = |mode| available.is_none_or(|a| self.beyond_weights(mode) <= a);
        let mode = match requested {
            BackwardMode::Auto if fits(BackwardMode::FullGraph) => BackwardMode::FullGraph,
            BackwardMode::Auto => BackwardMode::PerBlock,
            mode => mode,
        };
        if let (false, Some(available)) = (fits(mode), available) {
            bail!(
                "a search step of {} tokens ({} backward) needs {} beyond the loaded weights (peak {}) but only {} of memory are available",
                self.tokens,
                mode.name(),
                human_bytes(self.beyond_weights(mode).into()),
                human_bytes(u128::from(self.weights + self.beyond_weights(mode))),
                human_bytes(available.into())
            );
        }
        Ok(mode)
    }
}

/// Fails before the first step when one step through burn's full autodiff graph cannot fit:
/// its activations for `batch_size` windows of `seq_len` tokens plus `extra` bytes the caller
/// holds during the step (fine-tuning: the adapted weights it substitutes).
pub(crate) fn check_full_graph_fits(model: &dyn CausalLm, batch_size: usize, seq_len: usize, extra: u64, what: &str) -> Result<()> {
    let [full_graph, _] = SearchMemory::activations(model, batch_size as u64, seq_len as u64);
    disp_core::memory::check_fits(what, u128::from(full_graph) + u128::from(extra))
}

pub(crate) fn check_windows(windows: &[Vec<u32>], model: &dyn CausalLm) -> Result<()> {
    let Some(first) = windows.first() else { bail!("no calibration windows (the calibration text is empty or shorter than one window)") };
    let seq = first.len();
    if seq < 2 {
        bail!("calibration windows need at least 2 tokens, got {seq}");
    }
    if seq > model.max_positions() {
        bail!("window length {seq} exceeds the model's {} positions", model.max_positions());
    }
    let vocab = model.vocab_size();
    for (i, w) in windows.iter().enumerate() {
        if w.len() != seq {
            bail!("calibration window {i} has {} tokens, window 0 has {seq}", w.len());
        }
        if let Some(&t) = w.iter().find(|&&t| t as usize >= vocab) {
            bail!("calibration window {i} holds token {t}, outside the vocabulary of {vocab}");
        }
    }
    Ok(())
}

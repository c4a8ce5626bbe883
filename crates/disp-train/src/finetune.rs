//! Recovery fine-tuning of a pruned model (`disp finetune`): LoRA adapters (see [`crate::lora`])
//! on its block linears, trained with the next-token loss on text, distillation from the dense
//! teacher, or both; then merged into the weights and written as a pruned folder (index sets
//! kept) or a dense-equivalent stock checkpoint.
//!
//! The pruned model and the teacher stay frozen on the plain device; only the adapter factors
//! live on the autodiff device and receive AdamW updates. Windows are visited in a seeded order
//! ([`ShuffledBatches`]) and the initial factors are drawn from the seed, so a run resumed from
//! its checkpoint ends at the same adapters as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Int, Tensor, TensorData};
use disp_export::{ExportFormat, ExportSummary};
use disp_models::{CausalLm, TextTokenizer};
use serde::Serialize;
use serde_json::json;

use crate::lora::{LoraAdapters, LoraTarget};
use crate::loss::{kd_loss, lm_loss, Objective};
use crate::rng::{mix64, Purpose, ShuffledBatches};
use crate::search_state::{self, SearchStateHeader, SEARCH_STATE_FORMAT_VERSION};

/// Settings of one fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinetuneConfig {
    pub steps: usize,
    pub rank: usize,
    /// LoRA α: the update is scaled by α/r.
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Windows per step.
    pub batch_size: usize,
    pub seed: u64,
    pub objective: Objective,
    pub kd_temperature: f64,
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint every this many steps (0: only after the last step).
    pub checkpoint_every: usize,
    pub resume: bool,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            rank: 8,
            alpha: 16.0,
            targets: LoraTarget::ALL.to_vec(),
            learning_rate: 5e-4,
            weight_decay: 0.0,
            batch_size: 1,
            seed: 0,
            objective: Objective::Lm,
            kd_temperature: 1.0,
            checkpoint: None,
            checkpoint_every: 50,
            resume: false,
        }
    }
}

impl FinetuneConfig {
    /// Checks what can be checked without a model.
    pub fn check(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.rank == 0 {
            bail!("--rank must be at least 1");
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            bail!("--alpha must be positive, got {}", self.alpha);
        }
        if self.targets.is_empty() {
            bail!("--targets: name at least one of q, k, v, o, gate, up, down");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!("--lr must be positive, got {}", self.learning_rate);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("--weight-decay must be non-negative, got {}", self.weight_decay);
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.kd_temperature > 0.0 && self.kd_temperature.is_finite()) {
            bail!("--kd-temperature must be positive, got {}", self.kd_temperature);
        }
        if self.resume && self.checkpoint.is_none() {
            bail!("--resume needs --checkpoint FILE");
        }
        Ok(())
    }
}

/// Progress of one update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinetuneReport {
    /// Steps completed, counting this one.
    pub step: usize,
    /// Mean next-token NLL of the batch.
    pub lm_loss: f64,
    /// The distillation loss, when the objective uses it.
    pub kd_loss: Option<f64>,
    /// Tokens trained on per second over this run's steps so far (restored steps not counted).
    pub tokens_per_second: f64,
}

/// One fine-tuning run over a pruned model (changed in place: the adapted weights are installed
/// during steps and merged by [`Finetuner::finish`]).
pub struct Finetuner<'a> {
    model: &'a mut dyn CausalLm,
    teacher: Option<&'a dyn CausalLm>,
    windows: &'a [Vec<u32>],
    cfg: FinetuneConfig,
    adapters: LoraAdapters,
    optim: ModuleOptimizer,
    batches: ShuffledBatches,
    steps_done: usize,
    last: Option<FinetuneReport>,
    /// Tokens and seconds of the steps this process ran.
    trained: (usize, f64),
    weights_digest: String,
}

impl<'a> Finetuner<'a> {
    pub fn new(model: &'a mut dyn CausalLm, teacher: Option<&'a dyn CausalLm>, windows: &'a [Vec<u32>], cfg: &FinetuneConfig) -> Result<Self> {
        cfg.check()?;
        if cfg.objective.uses_kd() && teacher.is_none() {
            bail!("--loss {} needs --teacher DENSE_DIR", cfg.objective);
        }
        crate::search::check_windows(windows, &*model)?;
        // Each step puts W + (α/r)·A·B, in f32, in place of every adapted weight.
        let adapted = 4 * model.stored_linear_params() as u64;
        let what = format!("a fine-tuning step of batch size {} x {} tokens", cfg.batch_size, windows[0].len());
        crate::search::check_full_graph_fits(&*model, cfg.batch_size, windows[0].len(), adapted, &what)?;
        let weights_digest = crate::search::weights_digest(&*model);
        let device = model.device().clone().autodiff();
        let adapters = LoraAdapters::new(model, &cfg.targets, cfg.rank, cfg.alpha, cfg.seed, &device)?;
        Ok(Self {
            model,
            teacher,
            windows,
            optim: adamw(cfg),
            batches: ShuffledBatches::new(windows.len(), cfg.seed, Purpose::FinetuneShuffle),
            cfg: cfg.clone(),
            adapters,
            steps_done: 0,
            last: None,
            trained: (0, 0.0),
            weights_digest,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    pub fn adapters(&self) -> &LoraAdapters {
        &self.adapters
    }

    /// The model as it stands (frozen weights between steps, merged after [`Self::finish`]).
    pub fn model(&self) -> &dyn CausalLm {
        &*self.model
    }

    fn tokens(&self, batch: &[usize]) -> Tensor<2, Int> {
        let seq = self.windows[0].len();
        let flat: Vec<i64> = batch.iter().flat_map(|&i| self.windows[i].iter().map(|&t| t as i64)).collect();
        Tensor::from_data(TensorData::new(flat, [batch.len(), seq]), self.model.device())
    }

    /// One AdamW update of the adapter factors. Fails, without updating, on a non-finite loss.
    pub fn step(&mut self) -> Result<FinetuneReport> {
        let start = Instant::now();
        let step = self.steps_done + 1;
        let batch = self.batches.batch(step, self.cfg.batch_size);
        let tokens = self.tokens(&batch);
        self.adapters.install(self.model);
        let logits = self.model.forward(tokens.clone(), None, None);
        let kd = match (self.cfg.objective.uses_kd(), self.teacher) {
            (true, Some(teacher)) => Some(kd_loss(logits.clone(), teacher.forward(tokens.clone(), None, None), self.cfg.kd_temperature)),
            _ => None,
        };
        let lm = lm_loss(logits, &tokens);
        let kd_value = kd.as_ref().map(|k| k.value);
        if !(lm.value.is_finite() && kd_value.is_none_or(f64::is_finite)) {
            self.adapters.restore(self.model);
            bail!("non-finite loss at fine-tuning step {step} (LM {}, KD {kd_value:?})", lm.value);
        }
        let total = match (self.cfg.objective.uses_lm(), kd) {
            (true, Some(kd)) => lm.surrogate + kd.surrogate,
            (false, Some(kd)) => kd.surrogate,
            (_, None) => lm.surrogate,
        };
        let grads = GradientsParams::from_grads(total.backward(), &self.adapters.factors);
        self.adapters.factors = self.optim.step(self.cfg.learning_rate, self.adapters.factors.clone(), grads);
        // The installed weights hold the old factors' graph; the frozen ones go back until the
        // next step.
        self.adapters.restore(self.model);
        self.steps_done = step;
        self.trained.0 += tokens.dims().iter().product::<usize>();
        self.trained.1 += start.elapsed().as_secs_f64();
        let report =
            FinetuneReport { step, lm_loss: lm.value, kd_loss: kd_value, tokens_per_second: self.trained.0 as f64 / self.trained.1.max(1e-9) };
        tracing::debug!(step, lm_loss = lm.value, kd_loss = kd_value, "fine-tuning step");
        self.last = Some(report.clone());
        if let Some(path) = self.cfg.checkpoint.clone() {
            let every = self.cfg.checkpoint_every;
            if (every > 0 && step.is_multiple_of(every)) || step == self.cfg.steps {
                self.save_checkpoint(&path)?;
            }
        }
        Ok(report)
    }

    /// Merges the adapters into the model's weights (plain tensors) and returns the last report.
    pub fn finish(self) -> Option<FinetuneReport> {
        self.adapters.merge(self.model);
        self.last
    }

    /// The settings a resumed run must share with the run that wrote the checkpoint.
    fn settings(&self) -> serde_json::Value {
        let digest = self.windows.iter().flatten().fold(mix64(self.windows.len() as u64), |h, &t| mix64(h ^ t as u64));
        let mut settings = json!({
            "kind": "finetune",
            "rank": self.cfg.rank,
            "alpha": self.cfg.alpha,
            "targets": self.cfg.targets,
            "learning_rate": self.cfg.learning_rate,
            "weight_decay": self.cfg.weight_decay,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "loss": self.cfg.objective,
            "windows": self.windows.len(),
            "seq_len": self.windows[0].len(),
            "windows_digest": format!("{digest:016x}"),
            "weights_digest": self.weights_digest,
        });
        if let (true, Some(teacher)) = (self.cfg.objective.uses_kd(), self.teacher) {
            settings["kd_temperature"] = json!(self.cfg.kd_temperature);
            settings["teacher_digest"] = json!(crate::search::weights_digest(teacher));
        }
        settings
    }

    /// Writes the factors, the optimizer state and the step (atomically), in the search's
    /// checkpoint format (the settings tell the two apart).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let header = SearchStateHeader {
            format_version: SEARCH_STATE_FORMAT_VERSION,
            step: self.steps_done,
            model: self.model.identity(),
            settings: self.settings(),
            last: None,
            first_regulariser: None,
        };
        let factors = self.adapters.factors.clone().into_record().into_bytes().map_err(|e| anyhow!("cannot serialise the adapters: {e:?}"))?;
        let opt = self.optim.into_bytes().map_err(|e| anyhow!("cannot serialise the optimizer state: {e:?}"))?;
        search_state::write(path, &header, &factors, &opt)
    }

    /// Continues from the configured checkpoint if it exists (returns whether it did).
    pub fn resume(&mut self) -> Result<bool> {
        let Some(path) = self.cfg.checkpoint.clone() else { bail!("--resume needs --checkpoint FILE") };
        if !path.exists() {
            return Ok(false);
        }
        let data = search_state::read(&path)?;
        let h = &data.header;
        if h.model != self.model.identity() {
            bail!("{}: checkpoint is for another model", path.display());
        }
        let settings = self.settings();
        if h.settings != settings {
            bail!("{}: checkpoint was written with different settings (it has {}, this run {})", path.display(), h.settings, settings);
        }
        if h.step > self.cfg.steps {
            bail!("{}: checkpoint is at step {}, beyond the {} steps asked for", path.display(), h.step, self.cfg.steps);
        }
        let record =
            ModuleRecord::from_bytes(Bytes::from_bytes_vec(data.hypernet)).map_err(|e| anyhow!("{}: bad adapter record: {e:?}", path.display()))?;
        self.adapters.factors =
            self.adapters.factors.clone().try_load_record(record).map_err(|e| anyhow!("{}: adapters do not fit: {e:?}", path.display()))?;
        self.optim = adamw(&self.cfg)
            .from_bytes(Bytes::from_bytes_vec(data.optimizer))
            .map_err(|e| anyhow!("{}: bad optimizer record: {e:?}", path.display()))?;
        self.steps_done = h.step;
        tracing::info!(step = h.step, path = %path.display(), "resumed fine-tuning from checkpoint");
        Ok(true)
    }
}

fn adamw(cfg: &FinetuneConfig) -> ModuleOptimizer {
    AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(cfg.weight_decay as f32).init()
}

/// Everything one `disp finetune` run needs.
#[derive(Debug, Clone)]
pub struct FinetuneRequest {
    /// A pruned folder (written by `disp prune --export` or `disp export`).
    pub model_dir: PathBuf,
    /// The dense model the pruned one was cut from, for distillation.
    pub teacher_dir: Option<PathBuf>,
    /// Training text files.
    pub data: Vec<PathBuf>,
    /// Held-out text files scored after training; never trained on.
    pub eval: Vec<PathBuf>,
    /// Windows of each evaluation file scored (none: all).
    pub eval_windows: Option<usize>,
    pub seq_len: usize,
    pub cfg: FinetuneConfig,
    pub out: PathBuf,
    pub format: ExportFormat,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneOutcome {
    pub steps: usize,
    /// Tokens trained on by this process (restored steps not counted).
    pub tokens: usize,
    pub train_seconds: f64,
    pub adapter_params: usize,
    pub last: Option<FinetuneReport>,
    /// Perplexity of each evaluation file after merging.
    pub eval: Vec<(String, f64)>,
    pub weight_bytes: u64,
}

impl FinetuneRequest {
    /// Checks what can be checked before loading: settings, files, and that no training file is
    /// an evaluation file (the same path, or a file with the same contents).
    pub fn check(&self) -> Result<()> {
        self.cfg.check()?;
        if self.data.is_empty() {
            bail!("--data: fine-tuning needs at least one text file");
        }
        if self.cfg.objective.uses_kd() && self.teacher_dir.is_none() {
            bail!("--loss {} needs --teacher DENSE_DIR", self.cfg.objective);
        }
        for train in &self.data {
            for eval in &self.eval {
                if same_file(train, eval)? {
                    bail!("{}: is also an evaluation file of this run ({}); held-out text is never trained on", train.display(), eval.display());
                }
            }
        }
        Ok(())
    }
}

/// Whether two paths name the same file or files with identical contents.
fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()));
    let (ca, cb) = (std::fs::canonicalize(a), std::fs::canonicalize(b));
    if let (Ok(ca), Ok(cb)) = (&ca, &cb) {
        if ca == cb {
            return Ok(true);
        }
    }
    Ok(read(a)? == read(b)?)
}

/// Checks that `teacher` is the dense model `student` was pruned from, as far as shapes and
/// tokenizers tell.
fn check_teacher(student_dir: &Path, student: &dyn CausalLm, teacher_dir: &Path, teacher: &dyn CausalLm) -> Result<()> {
    if teacher.is_pruned() {
        bail!("{}: the teacher must be the dense model, this folder is pruned", teacher_dir.display());
    }
    let (s, t) = (student.identity(), teacher.identity());
    let same =
        s.model_type == t.model_type && s.num_layers == t.num_layers && s.hidden_size == t.hidden_size && s.intermediate_size == t.intermediate_size;
    if !same || student.vocab_size() != teacher.vocab_size() {
        bail!(
            "{}: the teacher is {} ({} layers, hidden {}, MLP {}, vocabulary {}), the pruned model was cut from {} ({} layers, hidden {}, MLP {}, vocabulary {})",
            teacher_dir.display(),
            t.model_type,
            t.num_layers,
            t.hidden_size,
            t.intermediate_size,
            teacher.vocab_size(),
            s.model_type,
            s.num_layers,
            s.hidden_size,
            s.intermediate_size,
            student.vocab_size()
        );
    }
    let tokenizer = |dir: &Path| std::fs::read(dir.join("tokenizer.json")).with_context(|| format!("{}: no tokenizer.json", dir.display()));
    if tokenizer(student_dir)? != tokenizer(teacher_dir)? {
        bail!("{}: the teacher's tokenizer.json differs from the pruned model's ({})", teacher_dir.display(), student_dir.display());
    }
    Ok(())
}

/// Runs `request` on `device`: loads the pruned model (and the teacher), trains the adapters
/// (calling `on_step` after every update), merges them and writes the folder.
pub fn finetune(request: &FinetuneRequest, device: &burn::tensor::Device, mut on_step: impl FnMut(&FinetuneReport)) -> Result<FinetuneOutcome> {
    request.check()?;
    disp_core::fsutil::check_output_folder(&request.out).map_err(|e| anyhow!("--out: {e:#}"))?;
    let mut model = disp_models::load_model(&request.model_dir, device)?;
    if !model.is_pruned() {
        bail!("{}: not a pruned folder (fine-tune the output of `disp prune --export` or `disp export`)", request.model_dir.display());
    }
    let teacher = match &request.teacher_dir {
        Some(dir) => {
            let teacher = disp_models::load_model(dir, device)?;
            check_teacher(&request.model_dir, model.as_ref(), dir, teacher.as_ref())?;
            Some(teacher)
        }
        None => None,
    };
    let tokenizer = TextTokenizer::load(&request.model_dir)?;
    let windows = crate::prune::calibration_windows(&tokenizer, &request.data, request.seq_len)?;
    let mut eval_sets = Vec::new();
    for file in &request.eval {
        let tokens = tokenizer.encode(&disp_eval::read_text(file)?)?;
        let windows = disp_eval::token_windows(&tokens, request.seq_len, request.eval_windows, file)?;
        eval_sets.push((file.clone(), windows, tokens.len()));
    }

    let mut tuner = Finetuner::new(model.as_mut(), teacher.as_deref(), &windows, &request.cfg)?;
    if request.cfg.resume {
        tuner.resume()?;
    }
    let adapter_params = tuner.adapters().num_params();
    let start = Instant::now();
    let (mut tokens, first) = (0, tuner.steps_done());
    while tuner.steps_done() < request.cfg.steps {
        let report = tuner.step()?;
        tokens += windows[0].len() * request.cfg.batch_size;
        on_step(&report);
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let steps = tuner.steps_done();
    let last = tuner.finish();
    tracing::info!(steps = steps - first, tokens, train_seconds, "fine-tuning finished");

    let mut eval = Vec::new();
    for (file, windows, file_tokens) in &eval_sets {
        let report = disp_eval::perplexity(model.as_ref(), windows, *file_tokens, |_| {})?;
        eval.push((file.display().to_string(), report.perplexity));
    }
    let provenance = json!({
        "source": request.model_dir.display().to_string(),
        "teacher": request.teacher_dir.as_ref().map(|d| d.display().to_string()),
        "data": request.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "steps": steps,
        "seq_len": request.seq_len,
        "windows": windows.len(),
        "settings": request.cfg,
        "adapter_params": adapter_params,
        "final": last,
    });
    let summary: ExportSummary = disp_export::export_changed_pruned(&request.model_dir, model.as_ref(), provenance, request.format, &request.out)?;
    Ok(FinetuneOutcome { steps, tokens, train_seconds, adapter_params, last, eval, weight_bytes: summary.weight_bytes })
}

//! `cargo xtask reproduce-table`: the paper's comparison (perplexity of every pruning method at
//! every ratio of total parameters) on the models available here, by driving the `disp` binary.
//!
//! Every cell (model × method × ratio) is a small pipeline of `disp` commands — prune (or, for
//! wanda-2:4, write the sparse model), evaluate perplexity on each held-out text, evaluate the
//! multiple-choice tasks — and its result is cached as JSON under the cache folder together with
//! the settings that produced it, so a rerun skips finished cells and an interrupted run
//! resumes. The markdown table is rewritten from the cache after every cell.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A pruning method as `disp methods --json` describes it: the registry lives in `disp-train`,
/// and the table asks the binary it drives.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MethodInfo {
    pub name: String,
    /// Trains gates (its cost scales with the steps; steps and learning rate are its settings).
    pub searches: bool,
    pub uses_calibration: bool,
    pub uses_activation_statistics: bool,
    /// Produces index sets; a method that does not zeroes half of the block weights instead
    /// (wanda-2:4), so it is one cell, at 50 %.
    pub makes_plan: bool,
}

impl MethodInfo {
    fn applies_at(&self, ratio: f64) -> bool {
        self.makes_plan || (ratio - 0.5).abs() < 1e-9
    }
}

/// A row of the table: a `disp` method, optionally searched with distillation from the dense
/// model (`METHOD+kd`: `prune --loss kd`) and optionally followed by recovery fine-tuning
/// (`METHOD+recovery`: `disp finetune` on the pruned folder, evaluated as that folder).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub method: String,
    pub kd: bool,
    pub recovery: bool,
}

impl Row {
    /// The method part of a row name (`disp` of `disp+kd+recovery`).
    fn method_of(name: &str) -> &str {
        name.split('+').next().unwrap_or_default()
    }

    /// Parses `METHOD[+kd][+recovery]` against the methods `disp` offers.
    pub fn parse(name: &str, registry: &[MethodInfo]) -> Result<Row> {
        let method = Self::method_of(name).to_string();
        let parts = name.split('+').skip(1);
        let info = registry.iter().find(|m| m.name == method).ok_or_else(|| {
            let names: Vec<&str> = registry.iter().map(|r| r.name.as_str()).collect();
            anyhow!("--methods {name}: unknown method '{method}' (expected one of {}, each optionally +kd and/or +recovery)", names.join(", "))
        })?;
        let (mut kd, mut recovery) = (false, false);
        for suffix in parts {
            match suffix {
                "kd" if !kd && !recovery => kd = true,
                "recovery" if !recovery => recovery = true,
                _ => bail!("--methods {name}: '+{suffix}' is not a row suffix here (METHOD[+kd][+recovery])"),
            }
        }
        if kd && !info.searches {
            bail!("--methods {name}: {method} does not search, so it has no loss to distil with");
        }
        if recovery && !info.makes_plan {
            bail!("--methods {name}: {method} writes no index sets, and recovery fine-tunes a pruned folder");
        }
        Ok(Row { method, kd, recovery })
    }

    /// The row this one fine-tunes (`disp+kd` for `disp+kd+recovery`): its plan is reused when
    /// its cell is cached.
    fn before_recovery(&self) -> Option<String> {
        self.recovery.then(|| if self.kd { format!("{}+kd", self.method) } else { self.method.clone() })
    }
}

/// The ratios some rows are limited to (`ROW@R1/R2`), by row name.
pub type RowRatios = BTreeMap<String, Vec<f64>>;

/// Parses `--methods`: rows (see [`Row`]), each optionally limited to some ratios
/// (`ROW@R1/R2`). Returns the row names in the order given and the limits.
pub fn parse_rows(given: &[String], registry: &[MethodInfo]) -> Result<(Vec<String>, RowRatios)> {
    let mut rows = Vec::new();
    let mut limits = BTreeMap::new();
    for entry in given {
        let (name, ratios) = match entry.split_once('@') {
            Some((name, list)) => {
                let ratios = list
                    .split('/')
                    .map(|r| match r.parse::<f64>() {
                        Ok(v) if v > 0.0 && v < 1.0 => Ok(v),
                        _ => Err(anyhow!("--methods {entry}: '{r}' is not a ratio between 0 and 1 (ROW@R1/R2, e.g. disp+kd@0.3/0.5)")),
                    })
                    .collect::<Result<Vec<f64>>>()?;
                (name, Some(ratios))
            }
            None => (entry.as_str(), None),
        };
        Row::parse(name, registry)?;
        if rows.iter().any(|r: &String| r == name) {
            bail!("--methods: the row {name} is given twice");
        }
        rows.push(name.to_string());
        if let Some(ratios) = ratios {
            limits.insert(name.to_string(), ratios);
        }
    }
    Ok((rows, limits))
}

/// The methods `disp` offers, in its order.
pub fn methods_of(binary: &Path) -> Result<Vec<MethodInfo>> {
    let out = disp(binary, &["methods".into(), "--json".into()])?;
    serde_json::from_str(out.trim()).map_err(|e| anyhow!("`disp methods --json` printed no method list: {e}"))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub dir: PathBuf,
    /// The window length the model was trained at, when its config records it (`train-tiny`
    /// models, `disp_train_tiny.seq_len`): its windows are never longer, since positions past it
    /// are untrained.
    pub trained_seq_len: Option<usize>,
}

/// The paper's learning rate for the hypernetwork, `disp prune`'s default.
pub fn paper_learning_rate() -> f64 {
    1e-3
}

/// Everything that determines the cells' results (a cached cell is reused only when equal).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellSettings {
    pub steps: usize,
    /// AdamW learning rate of the search (caches from before it was recorded used 1e-3).
    #[serde(default = "paper_learning_rate")]
    pub learning_rate: f64,
    pub seed: u64,
    pub seq_len: usize,
    pub calibration: Vec<PathBuf>,
    pub calibration_windows: usize,
    pub eval_windows: usize,
    pub heldout: Vec<(String, PathBuf)>,
    pub tasks: Vec<PathBuf>,
    pub mc_limit: Option<usize>,
    /// Softmax temperature of the distillation loss of `+kd` rows.
    #[serde(default = "default_kd_temperature")]
    pub kd_temperature: f64,
    /// Recovery fine-tuning of `+recovery` rows.
    #[serde(default)]
    pub recovery: RecoverySettings,
}

fn default_kd_temperature() -> f64 {
    1.0
}

/// `disp finetune` settings of the `+recovery` rows: LoRA on every block linear, trained on the
/// calibration text (never the held-out one) with the dense model as the teacher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecoverySettings {
    pub steps: usize,
    pub learning_rate: f64,
    pub rank: usize,
    /// lm, kd or lm+kd (`disp finetune --loss`).
    pub loss: String,
}

impl RecoverySettings {
    /// Whether the recovery distils from the dense model (loss kd or lm+kd).
    fn distils(&self) -> bool {
        self.loss.contains("kd")
    }
}

impl Default for RecoverySettings {
    fn default() -> Self {
        RecoverySettings { steps: 200, learning_rate: 5e-4, rank: 8, loss: "kd".into() }
    }
}

#[derive(Debug, Clone)]
pub struct TableSettings {
    pub models: Vec<ModelSpec>,
    pub ratios: Vec<f64>,
    /// The rows of the table (see [`Row`]), in the order given.
    pub methods: Vec<String>,
    /// Rows computed at only some of the ratios (`--methods disp+kd@0.3/0.5`, for rows that
    /// cost many times a plain cell); the other rows are computed at every ratio.
    pub row_ratios: RowRatios,
    /// What the `disp` binary says about every method it offers.
    pub registry: Vec<MethodInfo>,
    pub cell: CellSettings,
    pub cache: PathBuf,
    pub out_markdown: PathBuf,
    pub disp: PathBuf,
    /// The command line, for the report.
    pub command: String,
    pub quick: bool,
    /// Keep the folders a cell evaluates (recovered or sparse models) beside its cell file,
    /// for `disp eval chat` or `disp generate` later; by default they are removed.
    pub keep_models: bool,
}

/// The outcome of one cell.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellResult {
    pub model: String,
    pub method: String,
    pub target_ratio: f64,
    /// Fraction of total parameters removed (for wanda-2:4: zeroed weights over all parameters).
    pub achieved_ratio: f64,
    /// Perplexity per held-out text.
    pub perplexity: BTreeMap<String, f64>,
    /// (acc, acc_norm) per task.
    pub accuracy: BTreeMap<String, (f64, f64)>,
    pub seconds: f64,
    /// Of `seconds`, those spent exporting and fine-tuning (`+recovery` rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_seconds: Option<f64>,
    pub settings: CellSettings,
    /// When the cell finished (UTC) and on what machine (absent in caches written before these
    /// were recorded).
    #[serde(default)]
    pub finished_utc: Option<String>,
    #[serde(default)]
    pub machine: Option<String>,
}

impl TableSettings {
    /// The settings of `model`'s cells: the common ones, with windows no longer than the model
    /// was trained on.
    pub fn cell_for(&self, model: &ModelSpec) -> CellSettings {
        let mut cell = self.cell.clone();
        if let Some(trained) = model.trained_seq_len {
            cell.seq_len = cell.seq_len.min(trained);
        }
        cell
    }

    /// The registry entry of a row's method; none for "dense".
    fn info(&self, row: &str) -> Option<&MethodInfo> {
        let method = Row::method_of(row);
        self.registry.iter().find(|m| m.name == method)
    }

    /// The parsed row; none for "dense".
    fn row(&self, name: &str) -> Result<Option<Row>> {
        if name == "dense" {
            return Ok(None);
        }
        Row::parse(name, &self.registry).map(Some)
    }

    fn searches(&self, method: &str) -> bool {
        self.info(method).is_some_and(|m| m.searches)
    }

    /// Which settings a cached cell of `row` must share with the run to be reused.
    fn relevant(&self, row: &str) -> Relevant {
        let parsed = self.row(row).ok().flatten();
        Relevant {
            search: self.searches(row),
            kd: parsed.as_ref().is_some_and(|r| r.kd || (r.recovery && self.cell.recovery.distils())),
            recovery: parsed.is_some_and(|r| r.recovery),
        }
    }

    /// Whether the table has a cell of `row` at `ratio`: its method applies there (wanda-2:4
    /// only at 50 %) and the row was not limited to other ratios.
    fn has_cell(&self, row: &str, info: &MethodInfo, ratio: f64) -> bool {
        info.applies_at(ratio) && self.row_ratios.get(row).is_none_or(|only| only.iter().any(|r| (r - ratio).abs() < 1e-9))
    }

    /// The pruned cells of each model, (row, ratio, the row's method), ratio by ratio and within
    /// a ratio in the rows' order: the order they are computed and listed in.
    fn cells_of_a_model(&self) -> Result<Vec<(String, f64, &MethodInfo)>> {
        let mut cells = Vec::new();
        for &ratio in &self.ratios {
            for method in &self.methods {
                let info = self.info(method).ok_or_else(|| anyhow!("{}: offers no method '{method}'", self.disp.display()))?;
                if self.has_cell(method, info, ratio) {
                    cells.push((method.clone(), ratio, info));
                }
            }
        }
        Ok(cells)
    }

    fn cell_path(&self, model: &ModelSpec, method: &str, ratio: f64) -> PathBuf {
        self.cache.join(&model.name).join(format!("{}.json", cell_stem(method, ratio)))
    }
}

/// The parts of [`CellSettings`] a row depends on besides the evaluation.
#[derive(Debug, Clone, Copy)]
struct Relevant {
    search: bool,
    kd: bool,
    recovery: bool,
}

/// The file name stem of a cell's cached files: `wanda-2-4-50`, `disp-30`.
fn cell_stem(method: &str, ratio: f64) -> String {
    format!("{}-{:02}", method.replace([':', '+'], "-"), (ratio * 100.0).round() as u32)
}

/// Runs `disp` with `args`; returns stdout, or an error with the command and its last stderr line.
fn disp(binary: &Path, args: &[String]) -> Result<String> {
    let output = Command::new(binary).args(args).output().with_context(|| format!("cannot run {}", binary.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)");
        bail!("`disp {}` failed: {last}", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Model arguments of the evaluation commands for one cell.
enum Evaluated {
    Dense,
    Plan(PathBuf),
    Folder(PathBuf),
}

/// Perplexity per held-out text and (acc, acc_norm) per task.
type Scores = (BTreeMap<String, f64>, BTreeMap<String, (f64, f64)>);

fn evaluate(settings: &TableSettings, model: &ModelSpec, target: &Evaluated) -> Result<Scores> {
    let cell = &settings.cell_for(model);
    let model_args = match target {
        Evaluated::Dense => vec!["--model".into(), s(&model.dir)],
        Evaluated::Plan(plan) => vec!["--model".into(), s(&model.dir), "--plan".into(), s(plan)],
        Evaluated::Folder(dir) => vec!["--model".into(), s(dir)],
    };
    let mut perplexity = BTreeMap::new();
    for (name, text) in &cell.heldout {
        let mut args: Vec<String> = vec!["eval".into(), "ppl".into()];
        args.extend(model_args.iter().cloned());
        args.extend(["--text".into(), s(text), "--seq-len".into(), cell.seq_len.to_string()]);
        args.extend(["--max-windows".into(), cell.eval_windows.to_string(), "--json".into()]);
        let json: serde_json::Value = serde_json::from_str(disp(&settings.disp, &args)?.trim())?;
        let ppl = json["perplexity"].as_f64().ok_or_else(|| anyhow!("eval ppl printed no perplexity"))?;
        perplexity.insert(name.clone(), ppl);
    }
    let mut accuracy = BTreeMap::new();
    if !cell.tasks.is_empty() {
        let mut args: Vec<String> = vec!["eval".into(), "mc".into()];
        args.extend(model_args.iter().cloned());
        args.push("--tasks".into());
        args.extend(cell.tasks.iter().map(|t| s(t)));
        if let Some(limit) = cell.mc_limit {
            args.extend(["--limit".into(), limit.to_string()]);
        }
        args.push("--json".into());
        for line in disp(&settings.disp, &args)?.lines().filter(|l| l.trim_start().starts_with('{')) {
            let json: serde_json::Value = serde_json::from_str(line)?;
            let task = json["task"].as_str().unwrap_or("task").to_string();
            let acc = json["acc"].as_f64().ok_or_else(|| anyhow!("eval mc printed no acc"))?;
            let acc_norm = json["acc_norm"].as_f64().ok_or_else(|| anyhow!("eval mc printed no acc_norm"))?;
            accuracy.insert(task, (acc, acc_norm));
        }
    }
    Ok((perplexity, accuracy))
}

/// Computes one cell (`method` "dense" for the unpruned model, else a [`Row`]).
fn run_cell(settings: &TableSettings, model: &ModelSpec, method: &str, ratio: f64) -> Result<CellResult> {
    let start = Instant::now();
    let cell = &settings.cell_for(model);
    let dir = settings.cache.join(&model.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = cell_stem(method, ratio);
    let calibration = || -> Vec<String> {
        let mut args = vec!["--data".to_string()];
        args.extend(cell.calibration.iter().map(|p| s(p)));
        args
    };
    let mut recovery_seconds = None;
    let (target, achieved) = match (settings.info(method), settings.row(method)?) {
        (Some(info), Some(row)) => {
            let reused = row.before_recovery().and_then(|before| {
                let path = settings.cell_path(model, &before, ratio);
                let plan = path.with_extension("plan.json");
                let cell = cached(&path, cell, settings.relevant(&before))?;
                plan.is_file().then(|| {
                    println!("    the plan of {before} (cached)");
                    (Evaluated::Plan(plan), cell.achieved_ratio)
                })
            });
            let (target, achieved) = match reused {
                Some(found) => found,
                None => {
                    let mut args: Vec<String> = vec!["prune".into(), "--model".into(), s(&model.dir), "--method".into(), row.method.clone()];
                    args.extend(["--seq-len".into(), cell.seq_len.to_string(), "--json".into()]);
                    if info.uses_calibration {
                        args.extend(calibration());
                    }
                    if info.searches {
                        args.extend(["--steps".into(), cell.steps.to_string(), "--seed".into(), cell.seed.to_string()]);
                        args.extend(["--learning-rate".into(), cell.learning_rate.to_string()]);
                    }
                    if row.kd {
                        args.extend(["--loss".into(), "kd".into(), "--kd-temperature".into(), cell.kd_temperature.to_string()]);
                    }
                    if info.uses_activation_statistics {
                        args.extend(["--calibration-windows".into(), cell.calibration_windows.to_string()]);
                    }
                    let target = if info.makes_plan {
                        let plan = dir.join(format!("{stem}.plan.json"));
                        args.extend(["--ratio".into(), ratio.to_string(), "--out".into(), s(&plan)]);
                        Evaluated::Plan(plan)
                    } else {
                        let folder = fresh_folder(&dir.join(format!("{stem}.model")))?;
                        args.extend(["--export".into(), s(&folder)]);
                        Evaluated::Folder(folder)
                    };
                    let stdout = disp(&settings.disp, &args)?;
                    let report: serde_json::Value =
                        serde_json::from_str(stdout.trim()).map_err(|e| anyhow!("`disp prune --json` printed no report: {e}"))?;
                    // Plans are judged by their fraction of total parameters removed (the table's
                    // ratios are of total); wanda-2:4 by its zeroed weights over all parameters.
                    let achieved = report["removed_fraction_of_total"]
                        .as_f64()
                        .ok_or_else(|| anyhow!("`disp prune --json` reported no removed_fraction_of_total"))?;
                    (target, achieved)
                }
            };
            match (&target, row.recovery) {
                (Evaluated::Plan(plan), true) => {
                    let recovery_start = Instant::now();
                    let recovered = recover(settings, model, cell, plan, &dir, &stem)?;
                    recovery_seconds = Some(recovery_start.elapsed().as_secs_f64());
                    (Evaluated::Folder(recovered), achieved)
                }
                _ => (target, achieved),
            }
        }
        _ => (Evaluated::Dense, 0.0),
    };
    let (perplexity, accuracy) = evaluate(settings, model, &target)?;
    if let Evaluated::Folder(folder) = &target {
        // A copy of the model; the cell's numbers are what we keep, unless asked otherwise.
        if !settings.keep_models {
            std::fs::remove_dir_all(folder)?;
        }
    }
    Ok(CellResult {
        model: model.name.clone(),
        method: method.into(),
        target_ratio: ratio,
        achieved_ratio: achieved,
        perplexity,
        accuracy,
        seconds: start.elapsed().as_secs_f64(),
        recovery_seconds,
        settings: cell.clone(),
        finished_utc: Some(crate::util::utc_now()),
        machine: Some(crate::util::machine_description()),
    })
}

/// `path`, removed first if an interrupted cell left it behind.
fn fresh_folder(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(path.to_path_buf())
}

/// Recovery fine-tuning of a plan: the pruned folder, then `disp finetune` on the calibration
/// text with the dense model as the teacher; returns the fine-tuned folder.
fn recover(settings: &TableSettings, model: &ModelSpec, cell: &CellSettings, plan: &Path, dir: &Path, stem: &str) -> Result<PathBuf> {
    let pruned = fresh_folder(&dir.join(format!("{stem}.pruned")))?;
    let recovered = fresh_folder(&dir.join(format!("{stem}.recovered")))?;
    disp(&settings.disp, &["export".into(), "--model".into(), s(&model.dir), "--plan".into(), s(plan), "--out".into(), s(&pruned)])?;
    let recovery = &cell.recovery;
    let mut args: Vec<String> = vec!["finetune".into(), "--model".into(), s(&pruned), "--teacher".into(), s(&model.dir)];
    args.push("--data".into());
    args.extend(cell.calibration.iter().map(|p| s(p)));
    args.extend(["--steps".into(), recovery.steps.to_string(), "--rank".into(), recovery.rank.to_string()]);
    args.extend(["--learning-rate".into(), recovery.learning_rate.to_string(), "--loss".into(), recovery.loss.clone()]);
    args.extend(["--kd-temperature".into(), cell.kd_temperature.to_string(), "--seq-len".into(), cell.seq_len.to_string()]);
    args.extend(["--seed".into(), cell.seed.to_string(), "--out".into(), s(&recovered), "--json".into()]);
    let outcome = disp(&settings.disp, &args);
    std::fs::remove_dir_all(&pruned)?;
    outcome?;
    Ok(recovered)
}

/// The cached result of a cell, if it was computed with the same settings: all those the row
/// depends on (the search's steps and learning rate only for searches, the distillation
/// temperature only for `+kd` rows and KD recovery, the recovery settings only for `+recovery`
/// rows), so that a new setting recomputes only the cells it changes.
fn cached(path: &Path, settings: &CellSettings, relevant: Relevant) -> Option<CellResult> {
    let text = std::fs::read_to_string(path).ok()?;
    let result: CellResult = serde_json::from_str(&text).ok()?;
    let mut wanted = settings.clone();
    if !relevant.search {
        wanted.steps = result.settings.steps;
        wanted.learning_rate = result.settings.learning_rate;
    }
    if !relevant.kd {
        wanted.kd_temperature = result.settings.kd_temperature;
    }
    if !relevant.recovery {
        wanted.recovery = result.settings.recovery.clone();
    }
    (result.settings == wanted).then_some(result)
}

/// Rough seconds per cell, from the model size (measured here on SmolLM2-135M: a search step of
/// 512 tokens ~2 s, ~2.6 s with the dense model's distribution for KD, a recovery step ~2.5 s,
/// an evaluation window of 512 tokens ~1 s, a four-choice question ~0.5 s).
fn estimate_seconds(cell: &CellSettings, params: u64, method: Option<(&MethodInfo, &Row)>) -> f64 {
    let scale = params as f64 / 135e6 * cell.seq_len as f64 / 512.0;
    let evals =
        cell.heldout.len() as f64 * cell.eval_windows as f64 * scale + cell.tasks.len() as f64 * cell.mc_limit.unwrap_or(200) as f64 * 0.5 * scale;
    let prune = match method {
        Some((m, row)) if m.searches => cell.steps as f64 * if row.kd { 2.6 } else { 2.0 } * scale,
        Some((m, _)) if m.uses_activation_statistics => cell.calibration_windows as f64 * scale,
        _ => 2.0,
    };
    let recovery = match method {
        Some((_, row)) if row.recovery => cell.recovery.steps as f64 * 2.5 * scale,
        _ => 0.0,
    };
    prune + recovery + evals + 5.0
}

fn model_params(dir: &Path) -> Result<u64> {
    disp_io::hf_folder::parameter_count(dir)
}

/// Runs (or resumes) the whole table and writes the markdown report.
pub fn reproduce(settings: &TableSettings) -> Result<Vec<CellResult>> {
    // Every cell with its estimated seconds.
    let mut plan: Vec<(ModelSpec, String, f64, f64)> = Vec::new();
    for model in &settings.models {
        let params = model_params(&model.dir).map_err(|e| anyhow!("model {}: {e:#}", model.name))?;
        let cell = settings.cell_for(model);
        plan.push((model.clone(), "dense".into(), 0.0, estimate_seconds(&cell, params, None)));
        for (method, ratio, info) in settings.cells_of_a_model()? {
            let row = Row::parse(&method, &settings.registry)?;
            let seconds = estimate_seconds(&cell, params, Some((info, &row)));
            plan.push((model.clone(), method, ratio, seconds));
        }
    }
    // Each cell file is read once: for the estimate, and kept for the loop below to reuse.
    let reusable: Vec<Option<CellResult>> =
        plan.iter().map(|(m, method, r, _)| cached(&settings.cell_path(m, method, *r), &settings.cell_for(m), settings.relevant(method))).collect();
    let cached_count = reusable.iter().filter(|c| c.is_some()).count();
    // `+ 0.0`: an empty f64 sum is -0.0, which would print as "-0.0 h".
    let remaining: f64 = plan.iter().zip(&reusable).filter(|(_, c)| c.is_none()).map(|(cell, _)| cell.3).sum::<f64>() + 0.0;
    let total: f64 = plan.iter().map(|c| c.3).sum();
    println!(
        "reproduce-table: {} cells ({} cached), {} models, ratios {:?}, methods {}; estimated {:.1} h on this machine for the {} cells to compute ({:.1} h for all)",
        plan.len(),
        cached_count,
        settings.models.len(),
        settings.ratios,
        settings.methods.join(", "),
        remaining / 3600.0,
        plan.len() - cached_count,
        total / 3600.0
    );
    let mut results = Vec::new();
    for (index, ((model, method, ratio, _), reusable)) in plan.iter().zip(reusable).enumerate() {
        let result = match reusable {
            Some(result) => result,
            None => {
                let path = settings.cell_path(model, method, *ratio);
                println!("[{}/{}] {} {} {:.0}% ...", index + 1, plan.len(), model.name, method, ratio * 100.0);
                let result = match run_cell(settings, model, method, *ratio) {
                    Ok(result) => result,
                    // A method that cannot remove that much (wanda-sp-mlp cuts MLP channels only)
                    // leaves its cell empty instead of stopping the table.
                    Err(e) if format!("{e:#}").contains("cannot be reached by removing") => {
                        println!("    skipped: {method} cannot remove {:.0}% of {}", ratio * 100.0, model.name);
                        continue;
                    }
                    Err(e) => bail!("{} {method} {ratio}: {e:#}", model.name),
                };
                let json = serde_json::to_string_pretty(&result)?;
                disp_io::fsutil::write_atomic(&path, json.as_bytes())?;
                println!("    done in {:.0} s: {:?}", result.seconds, result.perplexity);
                result
            }
        };
        results.push(result);
        write_markdown(settings, &results)?;
    }
    Ok(results)
}

/// The report: per model, the paper's layout (methods × ratios, perplexity), then every cell.
pub fn markdown(settings: &TableSettings, results: &[CellResult]) -> String {
    let mut md = String::new();
    let cell = &settings.cell;
    writeln!(md, "# Reproduced comparison{}\n", if settings.quick { " (--quick)" } else { "" }).unwrap();
    writeln!(md, "Command: `{}`  ", settings.command).unwrap();
    let shown = |paths: &[PathBuf]| paths.iter().map(|p| shown_path(p)).collect::<Vec<_>>().join(", ");
    let shorter: Vec<String> = settings
        .models
        .iter()
        .filter_map(|m| {
            let seq_len = settings.cell_for(m).seq_len;
            (seq_len != cell.seq_len).then(|| format!("{} {seq_len}", m.name))
        })
        .collect();
    let seq_len = if shorter.is_empty() {
        cell.seq_len.to_string()
    } else {
        format!("{} ({}: the length they were trained at)", cell.seq_len, shorter.join(", "))
    };
    writeln!(
        md,
        "Search steps {}, learning rate {}, seed {}, sequence length {seq_len}, calibration: {}  ",
        cell.steps,
        cell.learning_rate,
        cell.seed,
        shown(&cell.calibration)
    )
    .unwrap();
    let questions = cell.mc_limit.map_or("all questions".to_string(), |n| format!("the first {n} questions of each"));
    writeln!(
        md,
        "Perplexity over the first {} windows of each held-out text; multiple choice on {} ({questions}).  ",
        cell.eval_windows,
        shown(&cell.tasks)
    )
    .unwrap();
    if let Some(line) = row_settings(settings) {
        writeln!(md, "{line}  ").unwrap();
    }
    writeln!(md, "{}\n", provenance(results)).unwrap();
    let chart = crate::table_plot::chart_path(settings);
    if let Some(name) = chart.file_name() {
        writeln!(md, "![perplexity against the fraction of parameters removed]({})\n", name.to_string_lossy()).unwrap();
    }
    for model in models_in_order(results) {
        let rows: Vec<&CellResult> = results.iter().filter(|r| r.model == model).collect();
        let texts: Vec<String> =
            rows.iter().flat_map(|r| r.perplexity.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for text in &texts {
            writeln!(md, "## {model}: perplexity on {text}\n").unwrap();
            let dense = rows.iter().find(|r| r.method == "dense").and_then(|r| r.perplexity.get(text));
            write!(md, "| method | 0 %").unwrap();
            for ratio in &settings.ratios {
                write!(md, " | {:.0} %", ratio * 100.0).unwrap();
            }
            writeln!(md, " |").unwrap();
            writeln!(md, "|---|---{}|", "|---".repeat(settings.ratios.len())).unwrap();
            for method in &settings.methods {
                write!(md, "| {method} | {}", dense.map_or("–".into(), |p| format!("{p:.2}"))).unwrap();
                for ratio in &settings.ratios {
                    let found = rows.iter().find(|r| r.method == *method && (r.target_ratio - ratio).abs() < 1e-9);
                    match found.and_then(|r| r.perplexity.get(text)) {
                        Some(p) => write!(md, " | {}", format_ppl(*p)).unwrap(),
                        None => write!(md, " | –").unwrap(),
                    }
                }
                writeln!(md, " |").unwrap();
            }
            writeln!(md).unwrap();
        }
    }
    writeln!(md, "{}", orderings(settings, results)).unwrap();
    writeln!(md, "{PAPER_CONTEXT}").unwrap();
    writeln!(md, "## Every cell\n").unwrap();
    writeln!(md, "| model | method | target | achieved (of total) | perplexity | accuracy (acc / acc_norm) | seconds |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|").unwrap();
    for r in results {
        let ppl = r.perplexity.iter().map(|(k, v)| format!("{k} {}", format_ppl(*v))).collect::<Vec<_>>().join(", ");
        let acc = r.accuracy.iter().map(|(k, (a, n))| format!("{k} {a:.3} / {n:.3}")).collect::<Vec<_>>().join(", ");
        writeln!(
            md,
            "| {} | {} | {:.0} % | {:.2} % | {ppl} | {acc} | {:.0} |",
            r.model,
            r.method,
            100.0 * r.target_ratio,
            100.0 * r.achieved_ratio,
            r.seconds
        )
        .unwrap();
    }
    md
}

/// What the `+kd` and `+recovery` rows of the table add to their method, when it has any.
fn row_settings(settings: &TableSettings) -> Option<String> {
    let rows: Vec<Row> = settings.methods.iter().filter_map(|m| Row::parse(m, &settings.registry).ok()).collect();
    let cell = &settings.cell;
    let mut parts = Vec::new();
    if rows.iter().any(|r| r.kd) {
        parts.push(format!(
            "`+kd`: the search's loss is the KL divergence from the dense model's next-token distribution (temperature {})",
            cell.kd_temperature
        ));
    }
    if rows.iter().any(|r| r.recovery) {
        let r = &cell.recovery;
        parts.push(format!(
            "`+recovery`: the pruned folder fine-tuned with LoRA (rank {}, every block linear), {} steps of one {}-token window ({} tokens) of the calibration text, loss {}{}, learning rate {}, merged; evaluated as that folder",
            r.rank,
            r.steps,
            cell.seq_len,
            crate::util::thousands((r.steps * cell.seq_len) as u64),
            r.loss,
            if r.distils() { " from the dense model" } else { "" },
            r.learning_rate
        ));
    }
    (!parts.is_empty()).then(|| format!("Rows {}.", parts.join("; ")))
}

/// The paper's published numbers, for context (Gao et al., NeurIPS 2024, LLaMA-2 7B).
const PAPER_CONTEXT: &str = "## For context: the paper's LLaMA-2 7B (WikiText-2, 4096-token windows)

| method | 0 % | 20 % | 30 % | 40 % | 50 % |
|---|---|---|---|---|---|
| dense | 5.12 | | | | |
| DISP-LLM | | 6.10 | 6.85 | 8.11 | 9.84 |
| SparseGPT 2:4 | | | | | 10.17 |
| Wanda 2:4 | | | | | 11.02 |

The models here are 50 (SmolLM2-135M: 134.5 M parameters against 6.74 B) to 2,900 (the tiny
models: 2.4–3.4 M) times smaller, calibrated and evaluated on public-domain books, so only
orderings carry over, not values. A 2:4 cell removes half of the block weights, which
is less than half of all parameters (see its achieved ratio below); the paper compares it at 50 %.
";

/// The pairs of rows the orderings compare: DISP against each baseline (the paper's claims),
/// then what distillation and recovery change.
const COMPARED: [(&str, &str); 9] = [
    ("disp", "uniform-magnitude"),
    ("disp", "uniform-wanda"),
    ("disp", "disp-direct"),
    ("disp", "wanda-sp-mlp"),
    ("disp+kd", "disp"),
    ("disp+recovery", "disp"),
    ("disp+recovery", "uniform-wanda+recovery"),
    ("disp+kd+recovery", "disp+recovery"),
    ("disp+kd+recovery", "uniform-wanda+recovery"),
];

/// Which of the paper's orderings hold in these results, per model and held-out text.
fn orderings(settings: &TableSettings, results: &[CellResult]) -> String {
    let mut text = String::from("## Which orderings reproduce\n\n");
    let ppl = |model: &str, method: &str, ratio: f64, heldout: &str| {
        results
            .iter()
            .find(|r| r.model == model && r.method == method && (r.target_ratio - ratio).abs() < 1e-9)
            .and_then(|r| r.perplexity.get(heldout).copied())
    };
    for model in models_in_order(results) {
        for (heldout, _) in &settings.cell.heldout {
            for (ours, rival) in COMPARED {
                let mut wins = Vec::new();
                let mut losses = Vec::new();
                for &ratio in &settings.ratios {
                    if let (Some(disp), Some(other)) = (ppl(model, ours, ratio, heldout), ppl(model, rival, ratio, heldout)) {
                        let label = format!("{:.0} %", ratio * 100.0);
                        if disp < other {
                            wins.push(label)
                        } else {
                            losses.push(label)
                        }
                    }
                }
                if wins.is_empty() && losses.is_empty() {
                    continue;
                }
                let verdict = if losses.is_empty() {
                    format!("{ours} is better than {rival} at every ratio ({})", wins.join(", "))
                } else if wins.is_empty() {
                    format!("{ours} is worse than {rival} at every ratio ({})", losses.join(", "))
                } else {
                    format!("{ours} is better than {rival} at {} and not at {}", wins.join(", "), losses.join(", "))
                };
                writeln!(text, "- {model}, {heldout}: {verdict}.").unwrap();
            }
            if let (Some(disp), Some(two_four)) = (ppl(model, "disp", 0.5, heldout), ppl(model, "wanda-2:4", 0.5, heldout)) {
                let word = if disp < two_four { "better" } else { "worse" };
                writeln!(text, "- {model}, {heldout}: disp at 50 % of total parameters is {word} than wanda-2:4 ({disp:.2} vs {two_four:.2}), which removes less.").unwrap();
            }
        }
    }
    text
}

fn format_ppl(p: f64) -> String {
    if p >= 1000.0 {
        format!("{p:.0}")
    } else {
        format!("{p:.2}")
    }
}

/// The models of `results`, in the order their first cell appears.
pub fn models_in_order(results: &[CellResult]) -> Vec<&str> {
    let mut models: Vec<&str> = Vec::new();
    for r in results {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    models
}

/// A path as the report shows it: relative to the working folder when inside it.
fn shown_path(path: &Path) -> String {
    let here = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&here).unwrap_or(path).display().to_string()
}

/// When and where the cells were computed: the range of finishing dates and every machine.
fn provenance(results: &[CellResult]) -> String {
    let dates: Vec<&str> = results.iter().filter_map(|r| r.finished_utc.as_deref()).collect();
    let mut machines: Vec<&str> = results.iter().filter_map(|r| r.machine.as_deref()).collect();
    machines.sort();
    machines.dedup();
    let (Some(first), Some(last)) = (dates.iter().min(), dates.iter().max()) else {
        return "Cells computed before dates and machines were recorded.".into();
    };
    let undated = results.len() - dates.len();
    format!(
        "Cells finished {first} – {last}{} on {}.",
        if undated > 0 { format!(" ({undated} undated)") } else { String::new() },
        machines.join("; ")
    )
}

fn write_markdown(settings: &TableSettings, results: &[CellResult]) -> Result<()> {
    if let Some(parent) = settings.out_markdown.parent() {
        std::fs::create_dir_all(parent)?;
    }
    disp_io::fsutil::write_atomic(&settings.out_markdown, markdown(settings, results).as_bytes())?;
    crate::table_plot::write_chart(settings, results, &crate::table_plot::chart_path(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(method: &str, ratio: f64, ppl: f64) -> CellResult {
        CellResult {
            model: "m".into(),
            method: method.into(),
            target_ratio: ratio,
            achieved_ratio: ratio,
            perplexity: BTreeMap::from([("text".to_string(), ppl)]),
            accuracy: BTreeMap::new(),
            seconds: 0.0,
            recovery_seconds: None,
            settings: settings().cell,
            finished_utc: None,
            machine: None,
        }
    }

    fn info(name: &str, searches: bool, makes_plan: bool) -> MethodInfo {
        MethodInfo { name: name.into(), searches, uses_calibration: true, uses_activation_statistics: false, makes_plan }
    }

    fn settings() -> TableSettings {
        TableSettings {
            models: vec![],
            ratios: vec![0.3, 0.5],
            methods: vec!["disp".into(), "uniform-magnitude".into(), "wanda-2:4".into()],
            registry: vec![info("disp", true, true), info("uniform-magnitude", false, true), info("wanda-2:4", false, false)],
            row_ratios: BTreeMap::new(),
            cell: CellSettings {
                steps: 1,
                learning_rate: 1e-3,
                seed: 0,
                seq_len: 8,
                calibration: vec![],
                calibration_windows: 1,
                eval_windows: 1,
                heldout: vec![("text".into(), PathBuf::from("t"))],
                tasks: vec![],
                mc_limit: None,
                kd_temperature: 1.0,
                recovery: RecoverySettings::default(),
            },
            cache: PathBuf::new(),
            out_markdown: PathBuf::new(),
            disp: PathBuf::new(),
            command: String::new(),
            quick: false,
            keep_models: false,
        }
    }

    #[test]
    fn orderings_name_the_ratios_where_disp_wins_and_loses() {
        let results = vec![
            cell("disp", 0.3, 10.0),
            cell("uniform-magnitude", 0.3, 20.0),
            cell("disp", 0.5, 30.0),
            cell("uniform-magnitude", 0.5, 25.0),
            cell("wanda-2:4", 0.5, 40.0),
        ];
        let text = orderings(&settings(), &results);
        assert!(text.contains("- m, text: disp is better than uniform-magnitude at 30 % and not at 50 %."), "{text}");
        assert!(text.contains("disp at 50 % of total parameters is better than wanda-2:4 (30.00 vs 40.00)"), "{text}");
        assert!(!text.contains("uniform-wanda"), "no line for a method without cells: {text}");
        let all_lost = orderings(&settings(), &[cell("disp", 0.3, 30.0), cell("uniform-magnitude", 0.3, 20.0)]);
        assert!(all_lost.contains("- m, text: disp is worse than uniform-magnitude at every ratio (30 %)."), "{all_lost}");
    }

    #[test]
    fn windows_are_never_longer_than_a_model_was_trained_at() {
        let mut settings = settings();
        let spec = |trained| ModelSpec { name: "m".into(), dir: PathBuf::new(), trained_seq_len: trained };
        assert_eq!(settings.cell_for(&spec(None)).seq_len, 8);
        assert_eq!(settings.cell_for(&spec(Some(4))).seq_len, 4);
        assert_eq!(settings.cell_for(&spec(Some(16))).seq_len, 8);
        settings.models = vec![spec(Some(4))];
        assert!(markdown(&settings, &[]).contains("sequence length 8 (m 4: the length they were trained at)"));
    }

    #[test]
    fn a_new_search_setting_recomputes_only_the_search_cells() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings();
        let base = settings.cell.clone();
        for method in ["disp", "uniform-magnitude"] {
            let path = dir.path().join(format!("{method}.json"));
            std::fs::write(&path, serde_json::to_string(&CellResult { method: method.into(), ..cell(method, 0.3, 1.0) }).unwrap()).unwrap();
            let relevant = settings.relevant(method);
            assert!(cached(&path, &base, relevant).is_some(), "{method}: same settings");
            let longer = CellSettings { steps: base.steps + 1, learning_rate: 1e-2, ..base.clone() };
            assert_eq!(cached(&path, &longer, relevant).is_some(), method == "uniform-magnitude", "{method}: other search settings");
            let other_text = CellSettings { eval_windows: base.eval_windows + 1, ..base.clone() };
            assert!(cached(&path, &other_text, relevant).is_none(), "{method}: other evaluation settings");
        }
    }

    #[test]
    fn distillation_and_recovery_settings_recompute_only_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings();
        let base = settings.cell.clone();
        let warmer = CellSettings { kd_temperature: 2.0, ..base.clone() };
        let longer = CellSettings { recovery: RecoverySettings { steps: 7, ..base.recovery.clone() }, ..base.clone() };
        for (row, kd_matters, recovery_matters) in
            [("disp", false, false), ("disp+kd", true, false), ("disp+recovery", true, true), ("uniform-magnitude+recovery", true, true)]
        {
            let path = dir.path().join(format!("{}.json", cell_stem(row, 0.3)));
            std::fs::write(&path, serde_json::to_string(&cell(row, 0.3, 1.0)).unwrap()).unwrap();
            let relevant = settings.relevant(row);
            assert!(cached(&path, &base, relevant).is_some(), "{row}: same settings");
            // The default recovery distils from the dense model, so its temperature matters too.
            assert_eq!(cached(&path, &warmer, relevant).is_none(), kd_matters, "{row}: other temperature");
            assert_eq!(cached(&path, &longer, relevant).is_none(), recovery_matters, "{row}: other recovery steps");
        }
        let lm_recovery = CellSettings { recovery: RecoverySettings { loss: "lm".into(), ..base.recovery.clone() }, ..base.clone() };
        let lm_settings = TableSettings { cell: lm_recovery.clone(), ..settings.clone() };
        let path = dir.path().join("lm.json");
        std::fs::write(&path, serde_json::to_string(&CellResult { settings: lm_recovery.clone(), ..cell("disp+recovery", 0.3, 1.0) }).unwrap())
            .unwrap();
        let warmer_lm = CellSettings { kd_temperature: 2.0, ..lm_recovery };
        assert!(cached(&path, &warmer_lm, lm_settings.relevant("disp+recovery")).is_some(), "LM recovery has no temperature");
    }

    #[test]
    fn rows_are_a_method_with_optional_distillation_and_recovery() {
        let registry = settings().registry;
        let row = |name: &str| Row::parse(name, &registry);
        assert_eq!(row("disp").unwrap(), Row { method: "disp".into(), kd: false, recovery: false });
        assert_eq!(row("disp+kd+recovery").unwrap(), Row { method: "disp".into(), kd: true, recovery: true });
        assert_eq!(row("uniform-magnitude+recovery").unwrap().before_recovery().as_deref(), Some("uniform-magnitude"));
        assert_eq!(row("disp+kd+recovery").unwrap().before_recovery().as_deref(), Some("disp+kd"));
        let error = |name: &str| format!("{:#}", row(name).unwrap_err());
        assert!(error("uniform-wanda").contains("unknown method 'uniform-wanda'"), "{}", error("uniform-wanda"));
        assert!(error("uniform-magnitude+kd").contains("does not search"), "{}", error("uniform-magnitude+kd"));
        assert!(error("wanda-2:4+recovery").contains("writes no index sets"), "{}", error("wanda-2:4+recovery"));
        assert!(error("disp+recovery+kd").contains("'+kd' is not a row suffix"), "{}", error("disp+recovery+kd"));
        assert!(error("disp+lora").contains("'+lora'"), "{}", error("disp+lora"));
        assert_eq!(cell_stem("disp+kd+recovery", 0.3), "disp-kd-recovery-30");
    }

    #[test]
    fn the_report_states_what_kd_and_recovery_rows_add() {
        let plain = settings();
        assert!(row_settings(&plain).is_none());
        let with_rows = TableSettings { methods: vec!["disp".into(), "disp+kd".into(), "disp+recovery".into()], ..settings() };
        let line = row_settings(&with_rows).unwrap();
        assert!(line.contains("`+kd`: the search's loss is the KL divergence") && line.contains("temperature 1"), "{line}");
        assert!(
            line.contains("rank 8")
                && line.contains("200 steps of one 8-token window (1,600 tokens)")
                && line.contains("loss kd from the dense model"),
            "{line}"
        );
        let md = markdown(&with_rows, &[cell("disp", 0.3, 10.0), cell("disp+recovery", 0.3, 5.0), cell("disp+kd", 0.3, 8.0)]);
        assert!(md.contains(&line), "{md}");
        assert!(md.contains("- m, text: disp+recovery is better than disp at every ratio (30 %)."), "{md}");
        assert!(md.contains("- m, text: disp+kd is better than disp at every ratio (30 %)."), "{md}");
        assert!(md.contains("\n| disp+recovery | – | 5.00 | – |"), "{md}");
    }

    /// The cells a committed report was made from (docs/data/*.cells.json), and the settings
    /// of the run that made it: its models, ratios and methods, in the driver's order.
    fn committed_cells(name: &str) -> (TableSettings, Vec<CellResult>) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("docs/data").join(name)).unwrap()).unwrap();
        let cells: Vec<CellResult> = serde_json::from_value(json["cells"].clone()).unwrap();
        let mut ratios: Vec<f64> = cells.iter().map(|c| c.target_ratio).filter(|&r| r > 0.0).collect();
        ratios.sort_by(f64::total_cmp);
        ratios.dedup();
        let models = models_in_order(&cells).iter().map(|m| ModelSpec { name: m.to_string(), dir: PathBuf::new(), trained_seq_len: None }).collect();
        // The driver writes cells method by method within a ratio, in the registry's order.
        let mut methods: Vec<String> = Vec::new();
        for cell in cells.iter().filter(|c| c.method != "dense") {
            if !methods.contains(&cell.method) {
                methods.push(cell.method.clone());
            }
        }
        // Reports with rows limited to some ratios record the rows as given (`methods`,
        // `row_ratios`): the cells' order alone would put a limited row after the others.
        if let Some(given) = json.get("methods") {
            methods = serde_json::from_value(given.clone()).unwrap();
        }
        let row_ratios = json.get("row_ratios").map(|r| serde_json::from_value(r.clone()).unwrap()).unwrap_or_default();
        let settings = TableSettings { models, ratios, methods, row_ratios, cell: cells[0].settings.clone(), ..settings() };
        (settings, cells)
    }

    /// A report from its first section on: the tables, orderings and the list of cells (the
    /// header above them says how the cells were obtained).
    fn sections(md: &str) -> &str {
        &md[md.find("\n## ").expect("a report has sections")..]
    }

    #[test]
    fn docs_tables_are_what_the_generator_writes_from_the_committed_cells() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (doc, cells) in [
            ("docs/results.md", "results.cells.json"),
            ("docs/results-baselines.md", "results-baselines.cells.json"),
            ("docs/results-tiny.md", "results-tiny.cells.json"),
            ("docs/results-selfgen.md", "results-selfgen.cells.json"),
            ("docs/results-recovery300.md", "results-recovery300.cells.json"),
        ] {
            let (settings, results) = committed_cells(cells);
            let written = std::fs::read_to_string(root.join(doc)).unwrap();
            let generated = markdown(&settings, &results);
            assert_eq!(sections(&written), sections(&generated), "{doc}: regenerate it from docs/data/{cells}");
        }
    }

    /// The README's SmolLM2 tables repeat docs/results.md with thousands separators.
    #[test]
    fn readme_tables_are_the_committed_cells() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let (settings, results) = committed_cells("results.cells.json");
        let method_of = |label: &str| match label {
            "DISP-LLM (hypernetwork)" => "disp",
            "DISP, KD search" => "disp+kd",
            "DISP + recovery" => "disp+recovery",
            "DISP, KD search + recovery" => "disp+kd+recovery",
            "uniform-wanda (Wanda scores, one width)" => "uniform-wanda",
            "uniform-wanda + recovery" => "uniform-wanda+recovery",
            "wanda-sp-mlp (Wanda-sp, MLP channels)" => "wanda-sp-mlp",
            l if l.starts_with("wanda-2:4") => "wanda-2:4",
            other => panic!("README row {other:?}"),
        };
        let readme_number = |p: f64| {
            let plain = format_ppl(p);
            if p < 1000.0 {
                return plain;
            }
            plain.parse::<u64>().map(crate::util::thousands).unwrap_or(plain)
        };
        for (heading, text) in [("\n*Persuasion*:\n\n", "persuasion"), ("\nKJV John:\n\n", "kjv-john")] {
            let at = readme.find(heading).unwrap_or_else(|| panic!("README has no {heading:?} table"));
            // The header row and the separator, then one row per method.
            let rows: Vec<&str> = readme[at + heading.len()..].lines().skip(2).take_while(|l| l.starts_with('|')).collect();
            assert_eq!(rows.len(), settings.methods.len(), "{text}");
            for row in rows {
                let cols: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
                let method = method_of(cols[0]);
                let dense = results.iter().find(|r| r.method == "dense").unwrap().perplexity[text];
                let expected: Vec<String> = std::iter::once(if method == "wanda-2:4" { String::new() } else { format!("{dense:.2}") })
                    .chain([0.1, 0.2, 0.3, 0.4, 0.5].iter().map(|&ratio| {
                        results
                            .iter()
                            .find(|r| r.method == method && (r.target_ratio - ratio).abs() < 1e-9)
                            .map_or(String::new(), |r| readme_number(r.perplexity[text]))
                    }))
                    .collect();
                assert_eq!(cols[1..], expected[..], "README {text}: {row}");
            }
        }
    }

    /// Every row of the README's chat-retention tables links the `disp eval chat --json` output
    /// it was read from (docs/data/chat-retention/), and shows that output's two agreements.
    #[test]
    fn readme_chat_retention_rows_are_their_committed_outputs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let link = "](docs/data/chat-retention/";
        let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with('|') && l.contains(link)).collect();
        assert!(rows.len() >= 5, "the README's chat-retention rows: {rows:?}");
        let percent = |v: &serde_json::Value| format!("{:.1} %", 100.0 * v.as_f64().expect("a fraction"));
        for row in rows {
            let at = row.find(link).unwrap() + 2;
            let file = &row[at..at + row[at..].find(')').unwrap()];
            let output: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join(file)).unwrap()).unwrap();
            let cols: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let shown = &cols[cols.len() - 3..cols.len() - 1];
            assert_eq!(shown, [percent(&output["first_sentence_agreement"]), percent(&output["token_agreement"])], "README: {row}");
            assert_eq!(output["prompt_file"], "tests/prompts/heldout.jsonl", "{file}");
        }
    }

    #[test]
    fn a_row_limited_to_some_ratios_has_cells_only_there() {
        let registry = settings().registry;
        let given: Vec<String> = ["disp", "uniform-magnitude@0.3", "wanda-2:4"].map(String::from).into();
        let (methods, row_ratios) = parse_rows(&given, &registry).unwrap();
        assert_eq!(methods, ["disp", "uniform-magnitude", "wanda-2:4"]);
        let limited = TableSettings { methods, row_ratios, ..settings() };
        let cells: Vec<(String, f64)> = limited.cells_of_a_model().unwrap().into_iter().map(|(row, ratio, _)| (row, ratio)).collect();
        let expected = [("disp", 0.3), ("uniform-magnitude", 0.3), ("disp", 0.5), ("wanda-2:4", 0.5)];
        assert_eq!(cells, expected.map(|(m, r)| (m.to_string(), r)));
        for (bad, message) in [
            ("disp@0.3/1.5", "'1.5' is not a ratio between 0 and 1"),
            ("disp@", "'' is not a ratio"),
            ("disp+kd+kd@0.3", "'+kd' is not a row suffix"),
        ] {
            let err = parse_rows(&[bad.to_string()], &registry).unwrap_err().to_string();
            assert!(err.contains(message), "{bad}: {err}");
        }
        let twice = parse_rows(&["disp".into(), "disp@0.3".into()], &registry).unwrap_err().to_string();
        assert!(twice.contains("the row disp is given twice"), "{twice}");
    }

    #[test]
    fn a_method_without_a_plan_is_only_a_cell_at_half() {
        let settings = settings();
        let at = |method: &str, ratio| settings.info(method).unwrap().applies_at(ratio);
        assert!(at("wanda-2:4", 0.5));
        assert!(!at("wanda-2:4", 0.3));
        assert!(at("disp", 0.3));
        assert!(settings.info("dense").is_none() && !settings.searches("dense"));
    }
}

//! One pruning run, whatever the method: the registry of methods (`disp prune --method`, the
//! table driver's `disp methods --json`) and the library entry point that checks a request,
//! tokenises the calibration text, runs the method, writes the plan and optionally exports the
//! pruned model. The CLI only parses flags into a [`PruneRequest`] and prints the outcome.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::tensor::Device;
use disp_core::params::RatioOf;
use disp_core::plan::PruningPlan;
use disp_export::{ExportFormat, ExportSummary};
use disp_models::TextTokenizer;
use serde::Serialize;

use crate::wanda::SparsityReport;
use crate::{GateSource, HyperNetShape, SearchConfig, StepReport};

/// The pruning methods, in the order the comparison table reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The hypernetwork search of DISP-LLM.
    Disp,
    /// DISP-LLM's ablation: the same search, learning the gate logits directly.
    DispDirect,
    /// Regular structural pruning: one embedding subset for all blocks, by weight magnitude.
    UniformMagnitude,
    /// Structured Wanda: |W|·‖X‖ scores on calibration data, uniform widths (the paper's
    /// "regular structural pruning" with Wanda scores).
    UniformWanda,
    /// FLAP's Wanda-sp restricted to MLP channels: per-block channel scores, uniform count.
    WandaSpMlp,
    /// Semi-structured Wanda: 2 of every 4 input weights zeroed in every block linear.
    Wanda24,
}

/// What a method is and needs, as `disp methods --json` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MethodInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Learns gates with the search (`--steps`, `--learning-rate`, checkpoints).
    pub searches: bool,
    /// Needs calibration text (`--data`).
    pub uses_calibration: bool,
    /// Scores activations on a sample of the calibration windows (`--calibration-windows`).
    pub uses_activation_statistics: bool,
    /// Produces index sets (a plan, `--ratio`, `--out`); otherwise it changes weights and
    /// needs `--export`.
    pub makes_plan: bool,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::Disp, Method::DispDirect, Method::UniformMagnitude, Method::UniformWanda, Method::WandaSpMlp, Method::Wanda24];

    pub fn name(self) -> &'static str {
        match self {
            Method::Disp => "disp",
            Method::DispDirect => "disp-direct",
            Method::UniformMagnitude => "uniform-magnitude",
            Method::UniformWanda => "uniform-wanda",
            Method::WandaSpMlp => "wanda-sp-mlp",
            Method::Wanda24 => "wanda-2:4",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn description(self) -> &'static str {
        match self {
            Method::Disp => "the hypernetwork search of DISP-LLM",
            Method::DispDirect => "DISP-LLM's ablation: the same search, learning the gate logits directly (no hypernetwork)",
            Method::UniformMagnitude => "regular structural pruning: one embedding subset for all blocks, by weight magnitude",
            Method::UniformWanda => {
                "regular structural pruning with Wanda scores: |W|·‖X‖ on calibration data, one embedding subset and one MLP width for all blocks"
            }
            Method::WandaSpMlp => {
                "FLAP's Wanda-sp restricted to MLP channels: each block keeps its top |W_down|·‖h‖ channels, the same count everywhere; heads and residual width whole"
            }
            Method::Wanda24 => "semi-structured Wanda: 2 of every 4 input weights zeroed in every block linear (no plan)",
        }
    }

    pub fn searches(self) -> bool {
        matches!(self, Method::Disp | Method::DispDirect)
    }

    pub fn uses_calibration(self) -> bool {
        self != Method::UniformMagnitude
    }

    pub fn uses_activation_statistics(self) -> bool {
        matches!(self, Method::UniformWanda | Method::WandaSpMlp | Method::Wanda24)
    }

    pub fn makes_plan(self) -> bool {
        self != Method::Wanda24
    }

    pub fn info(self) -> MethodInfo {
        MethodInfo {
            name: self.name(),
            description: self.description(),
            searches: self.searches(),
            uses_calibration: self.uses_calibration(),
            uses_activation_statistics: self.uses_activation_statistics(),
            makes_plan: self.makes_plan(),
        }
    }
}

/// Everything one `disp prune` run needs.
#[derive(Debug, Clone)]
pub struct PruneRequest {
    pub model_dir: PathBuf,
    pub method: Method,
    /// Fraction of `ratio_of` to remove; none for wanda-2:4, which always zeroes half.
    pub ratio: Option<f64>,
    pub ratio_of: RatioOf,
    /// Calibration text files.
    pub data: Vec<PathBuf>,
    /// Windows the activation statistics are computed on, evenly spaced over all windows.
    pub calibration_windows: usize,
    pub seq_len: usize,
    /// Search settings (steps, λ, learning rate, seed, batch, checkpoints); the target ratio,
    /// ratio convention and gate source are taken from the request.
    pub search: SearchConfig,
    /// Where to write the plan.
    pub plan_out: Option<PathBuf>,
    /// Also write the pruned model here.
    pub export: Option<(PathBuf, ExportFormat)>,
}

/// What a run produced.
#[derive(Debug)]
pub struct PruneOutcome {
    /// The plan (every method but wanda-2:4), already written to `plan_out`.
    pub plan: Option<PruningPlan>,
    /// wanda-2:4's zeroed weights.
    pub sparsity: Option<SparsityReport>,
    /// The written folder, with `export`, and the seconds writing it took.
    pub export: Option<(ExportSummary, f64)>,
    /// Fraction of all model parameters removed (plans) or zeroed (wanda-2:4).
    pub removed_fraction_of_total: f64,
}

impl PruneRequest {
    /// Checks what can be checked without loading anything, so a bad flag fails before the
    /// expensive part starts.
    pub fn check(&self) -> Result<()> {
        let method = self.method;
        if method.makes_plan() {
            let ratio = self.ratio.ok_or_else(|| anyhow!("--ratio is required for {}", method.name()))?;
            if !(ratio > 0.0 && ratio < 1.0) {
                bail!("--ratio must be strictly between 0 and 1, got {ratio}");
            }
            if self.plan_out.is_none() {
                bail!("--out PLAN.json is required for {}", method.name());
            }
        } else {
            if self.export.is_none() {
                bail!("{} produces zeroed weights, not index sets: use --export DIR", method.name());
            }
            if self.ratio.is_some() || self.plan_out.is_some() {
                bail!("{} zeroes half of the block weights and writes no plan: drop --ratio and --out", method.name());
            }
        }
        if method.searches() && self.search.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if !method.searches() && self.search.objective != crate::Objective::Lm {
            bail!("--loss {}: only the searches (disp, disp-direct) train against a loss; {} does not", self.search.objective, method.name());
        }
        if method.uses_activation_statistics() && self.calibration_windows == 0 {
            bail!("--calibration-windows must be at least 1");
        }
        if method.uses_calibration() && self.data.is_empty() {
            bail!("--data: {} needs at least one calibration text file", method.name());
        }
        Ok(())
    }
}

/// Runs `request` on `device`: loads the model, runs the method (for a search, calling
/// `on_estimate` with its memory estimate and backward mode before the first step, and
/// `on_step` after every update), writes the plan and, if asked, the exported folder.
pub fn prune(
    request: &PruneRequest,
    device: &Device,
    on_estimate: impl FnOnce(&crate::SearchMemory, crate::BackwardMode),
    on_step: impl FnMut(&StepReport),
) -> Result<PruneOutcome> {
    request.check()?;
    let mut model = disp_models::load_model(&request.model_dir, device)?;
    let shape = model.model_shape();
    let calibration = || -> Result<Vec<Vec<u32>>> {
        let tokenizer = TextTokenizer::load(&request.model_dir)?;
        calibration_windows(&tokenizer, &request.data, request.seq_len)
    };

    if request.method == Method::Wanda24 {
        let (folder, _) = request.export.as_ref().expect("checked: wanda-2:4 exports");
        let windows = evenly_spaced(calibration()?, request.calibration_windows);
        let report = crate::wanda::apply_wanda_2_4(model.as_mut(), &windows)?;
        let provenance = serde_json::json!({
            "method": request.method.name(),
            "zeroed_block_weights": report.zeroed,
            "block_weights": report.total,
            "calibration_tokens": report.calibration_tokens,
            "data": display_paths(&request.data),
        });
        let start = Instant::now();
        let summary = disp_export::export_modified_weights(&request.model_dir, model.as_ref(), provenance, folder)?;
        let export = Some((summary, start.elapsed().as_secs_f64()));
        let removed = report.zeroed as f64 / shape.dense_total_params() as f64;
        return Ok(PruneOutcome { plan: None, sparsity: Some(report), export, removed_fraction_of_total: removed });
    }

    let ratio = request.ratio.expect("checked: plan-making methods have a ratio");
    // Fails early, before any tokenising or training, on a ratio the model cannot reach.
    shape.kept_block_fraction(ratio, request.ratio_of)?;
    let mut plan = match request.method {
        Method::UniformMagnitude => crate::uniform::uniform_magnitude_plan(model.as_ref(), ratio, request.ratio_of)?,
        Method::UniformWanda | Method::WandaSpMlp => {
            let all = calibration()?;
            let available = all.len();
            let windows = evenly_spaced(all, request.calibration_windows);
            let mut plan = if request.method == Method::UniformWanda {
                crate::wanda::wanda_sp_plan(model.as_ref(), &windows, ratio, request.ratio_of)?
            } else {
                crate::wanda::wanda_sp_mlp_plan(model.as_ref(), &windows, ratio, request.ratio_of)?
            };
            plan.search["windows_available"] = available.into();
            plan
        }
        Method::Disp | Method::DispDirect => {
            // Before tokenising or training: the estimate, and a run that cannot fit refused.
            let source = if request.method == Method::DispDirect { GateSource::Direct } else { GateSource::HyperNetwork };
            let memory =
                crate::SearchMemory::estimate(model.as_ref(), request.search.batch_size, request.seq_len, source, HyperNetShape::of(&shape)?);
            let backward = memory
                .choose(request.search.backward, disp_core::memory::available_bytes())
                .map_err(|e| anyhow!("--batch-size {} --seq-len {}: {e:#}", request.search.batch_size, request.seq_len))?;
            on_estimate(&memory, backward);
            let windows = calibration()?;
            let cfg = SearchConfig { target_ratio: ratio, ratio_of: request.ratio_of, gate_source: source, backward, ..request.search.clone() };
            let mut plan = crate::search(model.as_ref(), &windows, &cfg, on_step)?;
            plan.search["seq_len"] = request.seq_len.into();
            plan.search["windows"] = windows.len().into();
            plan
        }
        Method::Wanda24 => unreachable!("handled above: no plan"),
    };
    if request.method.uses_calibration() {
        plan.search["data"] = display_paths(&request.data).into();
    }
    let plan_path = request.plan_out.as_ref().expect("checked: plan-making methods have --out");
    plan.save(plan_path)?;
    let export = match &request.export {
        Some((folder, format)) => {
            let start = Instant::now();
            Some((disp_export::export(&request.model_dir, &plan, *format, folder)?, start.elapsed().as_secs_f64()))
        }
        None => None,
    };
    let removed = shape.removed_ratio(&plan.widths(), RatioOf::Total);
    Ok(PruneOutcome { plan: Some(plan), sparsity: None, export, removed_fraction_of_total: removed })
}

fn display_paths(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// Tokenises each calibration file into windows of `seq_len` tokens.
pub fn calibration_windows(tokenizer: &TextTokenizer, files: &[PathBuf], seq_len: usize) -> Result<Vec<Vec<u32>>> {
    if files.is_empty() {
        bail!("--data: this method needs at least one calibration text file");
    }
    let mut windows = Vec::new();
    for file in files {
        let tokens = tokenizer.encode(&disp_eval::read_text(file)?)?;
        windows.extend(disp_eval::token_windows(&tokens, seq_len, None, file)?);
    }
    Ok(windows)
}

/// `count` windows spread evenly over `windows` (all of them if there are fewer), so a small
/// sample still covers every calibration file.
pub fn evenly_spaced(windows: Vec<Vec<u32>>, count: usize) -> Vec<Vec<u32>> {
    let total = windows.len();
    if count >= total {
        return windows;
    }
    windows.into_iter().enumerate().filter(|(i, _)| (i * count) % total < count).map(|(_, w)| w).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_windows_cover_the_whole_range() {
        let windows: Vec<Vec<u32>> = (0..10).map(|i| vec![i]).collect();
        let picked: Vec<u32> = evenly_spaced(windows.clone(), 4).into_iter().map(|w| w[0]).collect();
        assert_eq!(picked, vec![0, 3, 5, 8]);
        assert_eq!(evenly_spaced(windows.clone(), 10), windows);
        assert_eq!(evenly_spaced(windows.clone(), 50).len(), 10);
        assert_eq!(evenly_spaced(windows, 1), vec![vec![0]]);
    }

    #[test]
    fn method_names_round_trip_and_only_wanda_2_4_makes_no_plan() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
            assert_eq!(m.makes_plan(), m != Method::Wanda24, "{}", m.name());
        }
        assert_eq!(Method::from_name("wanda"), None);
        assert!(Method::Disp.searches() && Method::DispDirect.searches() && !Method::UniformWanda.searches());
        assert!(!Method::UniformMagnitude.uses_calibration());
    }

    fn request(method: Method) -> PruneRequest {
        PruneRequest {
            model_dir: "m".into(),
            method,
            ratio: Some(0.3),
            ratio_of: RatioOf::Total,
            data: vec!["a.txt".into()],
            calibration_windows: 8,
            seq_len: 16,
            search: SearchConfig { steps: 2, ..Default::default() },
            plan_out: Some("p.json".into()),
            export: None,
        }
    }

    #[test]
    fn requests_are_checked_before_anything_is_loaded() {
        request(Method::Disp).check().unwrap();
        let err = |r: PruneRequest| r.check().unwrap_err().to_string();
        assert!(err(PruneRequest { ratio: Some(1.0), ..request(Method::Disp) }).contains("strictly between 0 and 1"));
        assert!(err(PruneRequest { ratio: Some(-0.1), ..request(Method::Disp) }).contains("got -0.1"));
        assert!(err(PruneRequest { ratio: Some(f64::NAN), ..request(Method::Disp) }).contains("strictly between 0 and 1"));
        assert!(err(PruneRequest { ratio: None, ..request(Method::UniformWanda) }).contains("--ratio is required for uniform-wanda"));
        assert!(err(PruneRequest { plan_out: None, ..request(Method::Disp) }).contains("--out PLAN.json"));
        assert!(err(PruneRequest { search: SearchConfig { steps: 0, ..Default::default() }, ..request(Method::Disp) }).contains("--steps"));
        assert!(err(PruneRequest { calibration_windows: 0, ..request(Method::UniformWanda) }).contains("--calibration-windows"));
        assert!(err(PruneRequest { data: vec![], ..request(Method::Disp) }).contains("--data"));
        let kd = SearchConfig { objective: crate::Objective::Kd, ..request(Method::Disp).search };
        PruneRequest { search: kd.clone(), ..request(Method::DispDirect) }.check().unwrap();
        assert!(err(PruneRequest { search: kd, ..request(Method::UniformWanda) }).contains("--loss kd: only the searches"));
        PruneRequest { data: vec![], ..request(Method::UniformMagnitude) }.check().unwrap();
        assert!(err(request(Method::Wanda24)).contains("use --export DIR"));
        let sparse = PruneRequest { export: Some(("out".into(), ExportFormat::Pruned)), ..request(Method::Wanda24) };
        assert!(err(sparse.clone()).contains("drop --ratio and --out"));
        PruneRequest { ratio: None, plan_out: None, ..sparse }.check().unwrap();
    }
}

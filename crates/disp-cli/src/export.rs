//! `disp export`: a plan applied to a model folder, written as a folder of its own.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use disp_core::plan::PruningPlan;
use disp_export::{ExportFormat, ExportSummary};

#[derive(Args)]
pub struct ExportArgs {
    /// The dense Hugging Face model folder the plan was made for.
    #[arg(long)]
    model: PathBuf,
    /// Pruning plan from `disp prune`.
    #[arg(long)]
    plan: PathBuf,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// `pruned`: smaller tensors + index sets, run by disp. `dense-equivalent`: the same function
    /// as a stock checkpoint with zeros at the dropped positions, for HF transformers and others.
    #[arg(long, default_value = "pruned")]
    format: ExportFormat,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let plan = PruningPlan::load(&args.plan)?;
    // Problems of the plan are named after the plan file, before any output is started.
    disp_export::check_plan(&args.model, &plan).map_err(|e| anyhow::anyhow!("{}: {e:#}", args.plan.display()))?;
    export_plan(&args.model, &plan, args.format, &args.out)
}

pub fn export_plan(model: &Path, plan: &PruningPlan, format: ExportFormat, out: &Path) -> Result<()> {
    let start = std::time::Instant::now();
    let summary = disp_export::export(model, plan, format, out)?;
    print_export_summary(model, plan, out, &summary, start.elapsed().as_secs_f64());
    Ok(())
}

pub fn print_export_summary(model: &Path, plan: &PruningPlan, out: &Path, summary: &ExportSummary, seconds: f64) {
    println!(
        "exported {} ({}, {:.2}% of {} parameters removed) to {}: {} tensors, {} of {} values stored, model.safetensors {:.1} MB, {seconds:.1} s",
        model.display(),
        plan.method,
        100.0 * plan.achieved_ratio,
        plan.ratio_of.name(),
        out.display(),
        summary.tensors,
        summary.stored_params,
        summary.source_params,
        summary.weight_bytes as f64 / 1e6,
    );
}

//! `disp bench`: prefill and decode speed of a model, and of its pruned version side by side.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use disp_core::device::{select_device, DeviceChoice};
use disp_core::plan::PruningPlan;
use disp_eval::{measure_speed, SpeedSettings};
use disp_models::CausalLm;

use crate::Compute;

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder: dense, or a pruned folder from `disp export`.
    #[arg(long)]
    model: PathBuf,
    /// Also measure the model pruned by this plan (the dense model is the reference).
    #[arg(long, conflicts_with = "dense")]
    plan: Option<PathBuf>,
    /// For a pruned folder: the dense folder to compare with.
    #[arg(long)]
    dense: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed repetitions per model (medians are reported).
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Time this many search steps instead (hypernetwork, five-site gates, backward, AdamW; batch
    /// 1 of `--seq-len` random tokens, after one warm-up step) on the dense model.
    #[arg(long)]
    search_steps: Option<usize>,
    /// Window length of `--search-steps`.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Precision of the CPU forward's matrix products (see `eval ppl --compute`); the search's
    /// gated passes are always f32.
    #[arg(long, value_enum, default_value_t = Compute::F32, conflicts_with = "search_steps")]
    compute: Compute,
}

impl BenchArgs {
    /// Whether this run times search steps (rather than prefill and decode).
    pub fn searches(&self) -> bool {
        self.search_steps.is_some()
    }
}

pub fn bench(device: DeviceChoice, args: BenchArgs) -> Result<()> {
    let device = select_device(device)?;
    let model = disp_models::load_model(&args.model, &device)?;
    if let Some(steps) = args.search_steps {
        return search_steps(model.as_ref(), steps, args.seq_len, args.json);
    }
    let mut models: Vec<(String, Box<dyn CausalLm>)> = Vec::new();
    if let Some(dense) = &args.dense {
        models.push(("dense".into(), disp_models::load_model(dense, &device)?));
    }
    let label = if model.is_pruned() { "pruned" } else { "dense" };
    if let Some(plan_path) = &args.plan {
        let plan = PruningPlan::load(plan_path)?;
        let pruned = model.prune(&plan).map_err(|e| anyhow::anyhow!("{}: {e:#}", plan_path.display()))?;
        models.push((label.into(), model));
        models.push(("pruned".into(), pruned));
    } else {
        models.push((label.into(), model));
    }
    for (_, model) in &mut models {
        args.compute.apply(model.as_mut())?;
    }
    let settings = SpeedSettings { prompt_tokens: args.prompt_tokens, decode_tokens: args.decode_tokens, repetitions: args.repetitions };
    let borrowed: Vec<(&str, &dyn CausalLm)> = models.iter().map(|(l, m)| (l.as_str(), m.as_ref())).collect();
    let reports = measure_speed(&borrowed, &settings)?;
    let params: Vec<usize> = models.iter().map(|(_, m)| m.stored_linear_params()).collect();
    if args.json {
        let json = serde_json::json!({ "settings": settings, "compute": args.compute, "block_linear_params": params, "models": reports });
        println!("{json}");
        return Ok(());
    }
    println!(
        "prompt {} tokens, {} decoded tokens, median of {} repetitions (after one warm-up)",
        settings.prompt_tokens, settings.decode_tokens, settings.repetitions
    );
    println!("{:<8} {:>14} {:>16} {:>14} {:>16} {:>12}", "model", "prefill tok/s", "x first", "decode tok/s", "x first", "block params");
    let first = &reports[0];
    for (report, params) in reports.iter().zip(&params) {
        println!(
            "{:<8} {:>14.1} {:>16.2} {:>14.1} {:>16.2} {:>12}",
            report.label,
            report.prefill_tokens_per_second,
            report.prefill_tokens_per_second / first.prefill_tokens_per_second,
            report.decode_tokens_per_second,
            report.decode_tokens_per_second / first.decode_tokens_per_second.max(f64::MIN_POSITIVE),
            params
        );
    }
    Ok(())
}

/// `--search-steps`: medians of the step's parts.
fn search_steps(model: &dyn CausalLm, steps: usize, seq_len: usize, json: bool) -> Result<()> {
    crate::checks::seq_len(seq_len)?;
    let report = disp_train::step_timing::time_search_steps(model, seq_len, steps, 0)?;
    if json {
        println!("{}", serde_json::to_value(&report)?);
        return Ok(());
    }
    let m = &report.median;
    println!(
        "search step, batch 1 x {seq_len} tokens, median of {steps}: {:.3} s (forward {:.3}, backward {:.3}, optimizer {:.3}; min {:.3}, max {:.3})",
        m.total, m.forward, m.backward, m.optimizer, report.min_total, report.max_total
    );
    Ok(())
}

//! `disp finetune`: recovery fine-tuning of a pruned folder with LoRA adapters, merged and
//! written as a folder of its own.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use disp_core::device::{select_device, DeviceChoice};
use disp_export::ExportFormat;
use disp_train::{FinetuneConfig, FinetuneRequest, LoraTarget, Objective};

#[derive(Args)]
pub struct FinetuneArgs {
    /// A pruned folder (from `disp prune --export` or `disp export`).
    #[arg(long)]
    model: PathBuf,
    /// Training text files (plain text, e.g. a `disp generate --prompts` calibration file).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// The dense model the pruned one was cut from: the teacher of --loss kd / lm+kd.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Held-out text files scored after training (perplexity); a --data file that is also one of
    /// these is refused.
    #[arg(long, num_args = 1..)]
    eval: Vec<PathBuf>,
    /// Only the first N windows of each --eval file.
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Adapter updates.
    #[arg(long)]
    steps: usize,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA α (the update is scaled by α/r).
    #[arg(long, default_value_t = 16.0, allow_negative_numbers = true)]
    alpha: f64,
    /// Which block linears get adapters.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    targets: Vec<LoraTarget>,
    /// AdamW learning rate of the adapters (`--lr` also works).
    #[arg(long, alias = "lr", default_value_t = 5e-4, allow_negative_numbers = true)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// lm (next-token cross-entropy on --data), kd (KL from --teacher's distribution) or lm+kd.
    #[arg(long, default_value = "lm")]
    loss: Objective,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    kd_temperature: f64,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint file (adapters, optimizer, step).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from --checkpoint.
    #[arg(long)]
    resume: bool,
    /// `pruned`: the pruned folder's layout with the merged weights. `dense-equivalent`: a stock
    /// checkpoint with zeros at the dropped positions, for HF transformers and others.
    #[arg(long, default_value = "pruned")]
    format: ExportFormat,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn finetune(device: DeviceChoice, args: FinetuneArgs) -> Result<()> {
    crate::checks::seq_len(args.seq_len)?;
    crate::checks::resume(args.resume, args.checkpoint.as_deref())?;
    let request = FinetuneRequest {
        model_dir: args.model.clone(),
        teacher_dir: args.teacher.clone(),
        data: args.data.clone(),
        eval: args.eval.clone(),
        eval_windows: args.eval_windows,
        seq_len: args.seq_len,
        cfg: FinetuneConfig {
            steps: args.steps,
            rank: args.rank,
            alpha: args.alpha,
            targets: args.targets.clone(),
            learning_rate: args.learning_rate,
            weight_decay: args.weight_decay,
            batch_size: args.batch_size,
            seed: args.seed,
            objective: args.loss,
            kd_temperature: args.kd_temperature,
            checkpoint: args.checkpoint.clone(),
            checkpoint_every: args.checkpoint_every,
            resume: args.resume,
        },
        out: args.out.clone(),
        format: args.format,
    };
    request.check()?;
    let device = select_device(device)?;
    let bar = crate::progress_bar(args.steps as u64, "steps", args.json);
    let outcome = disp_train::finetune(&request, &device, |r| {
        bar.set_position(r.step as u64);
        let kd = r.kd_loss.map(|v| format!("  KD {v:.3}")).unwrap_or_default();
        bar.set_message(format!("CE {:.3}{kd}  {:.0} tokens/s", r.lm_loss, r.tokens_per_second));
    })?;
    bar.finish_and_clear();
    if args.json {
        let mut json = serde_json::to_value(&outcome).expect("outcomes serialise");
        json["out"] = args.out.display().to_string().into();
        println!("{json}");
        return Ok(());
    }
    println!(
        "fine-tuned {} adapter parameters for {} steps ({} tokens in {:.1} s, {:.0} tokens/s)",
        outcome.adapter_params,
        outcome.steps,
        outcome.tokens,
        outcome.train_seconds,
        outcome.tokens as f64 / outcome.train_seconds.max(1e-9)
    );
    if let Some(last) = &outcome.last {
        let kd = last.kd_loss.map(|v| format!(", KD {v:.4}")).unwrap_or_default();
        println!("last step: CE {:.4}{kd}", last.lm_loss);
    }
    for (file, ppl) in &outcome.eval {
        println!("perplexity {ppl:.4} on {file}");
    }
    println!("wrote {} ({:.1} MB)", args.out.display(), outcome.weight_bytes as f64 / 1e6);
    Ok(())
}

//! `disp`: the command-line face of DISP-LLM. A thin layer over the library crates: it parses
//! arguments, picks the device, and prints results; the work happens in `disp-models`,
//! `disp-eval`, `disp-train` and `disp-core`.

mod eval_mc;
mod bench;
mod checks;
mod export;
mod inspect;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use disp_core::device::{select_device, DeviceChoice};
use disp_core::params::{BlockWidths, RatioOf};
use disp_core::plan::PruningPlan;
use disp_eval::{GenerateOptions, PerplexityReport};
use disp_models::{CausalLm, TextTokenizer};

#[derive(Parser)]
#[command(name = "disp", version, about = "Dimension-independent structural pruning (DISP-LLM) for OPT, LLaMA and Phi checkpoints")]
struct Cli {
    /// Compute device: cpu (default), wgpu or cuda (the GPU ones need their cargo feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceChoice,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Learn per-block index sets (DISP-LLM) or build a baseline plan; writes a pruning plan.
    Prune(PruneArgs),
    /// Write a model pruned by a plan to a folder: smaller tensors plus index sets (default), or
    /// a dense-equivalent stock checkpoint any HF loader reads.
    Export(export::ExportArgs),
    /// Show what a plan, a pruned folder or a dense folder keeps: parameters, per-layer widths of
    /// S1..S5, which embedding positions the blocks read and write; optionally as a PNG figure.
    Inspect(inspect::InspectArgs),
    /// Prefill and decode tokens/s of a model, dense vs pruned, medians over repetitions.
    Bench(bench::BenchArgs),
    /// Convert a llama.cpp GGUF file into a Hugging Face folder.
    ConvertGguf {
        /// The .gguf file.
        input: PathBuf,
        /// Output folder (must not exist, or be empty).
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity over non-overlapping windows of a text file (the WikiText-2 protocol).
    Ppl(PplArgs),
    /// Zero-shot multiple-choice accuracy over JSONL task files (lm-evaluation-harness scoring).
    Mc(eval_mc::McArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Apply a pruning plan (from `disp prune`) before running.
    #[arg(long)]
    plan: Option<PathBuf>,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Method {
    /// The hypernetwork search of DISP-LLM.
    Disp,
    /// Regular structural pruning: one embedding subset for all blocks, by weight magnitude.
    UniformMagnitude,
    /// DISP-LLM's ablation: the same search, learning the gate logits directly (no hypernetwork).
    DispDirect,
    /// Structured Wanda: |W|·‖X‖ scores on calibration data, uniform width like uniform-magnitude.
    WandaSp,
    /// Semi-structured Wanda: 2 of every 4 input weights zeroed in every block linear (no plan).
    #[value(name = "wanda-2:4")]
    Wanda24,
}

impl Method {
    /// Methods that score activations on a sample of the calibration windows.
    fn uses_activation_statistics(self) -> bool {
        matches!(self, Method::WandaSp | Method::Wanda24)
    }
}

#[derive(Args)]
struct PruneArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Fraction of parameters to remove, strictly between 0 and 1 (wanda-2:4 always zeroes half
    /// of the block weights and takes none).
    #[arg(long, allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// What the ratio is a fraction of: total (the paper's convention) or blocks.
    #[arg(long, default_value = "total")]
    ratio_of: RatioOf,
    #[arg(long, value_enum, default_value_t = Method::Disp)]
    method: Method,
    /// Calibration text files (disp, disp-direct, wanda-sp and wanda-2:4 need them).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Calibration windows the activation statistics of wanda-sp / wanda-2:4 are computed on,
    /// evenly spaced over all windows of --data.
    #[arg(long, default_value_t = 128)]
    calibration_windows: usize,
    /// Hypernetwork updates.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Calibration windows per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Weight of the parameter regulariser.
    #[arg(long, default_value_t = 6.0, allow_negative_numbers = true)]
    lambda: f64,
    /// AdamW learning rate of the gate generator. The paper's 1e-3 needs several hundred steps
    /// before the gates follow the target; for a short search (~100 steps) 1e-2 gets there
    /// (docs/results-smollm2.md).
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint file for the search (hypernetwork, optimizer, step).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from --checkpoint.
    #[arg(long)]
    resume: bool,
    /// Where to write the plan (JSON); every method but wanda-2:4 makes one.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also export the pruned model to this folder (see `disp export`).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long, default_value = "pruned")]
    export_format: disp_export::ExportFormat,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this, in (0, 1].
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the ChatML user/assistant template.
    #[arg(long)]
    chat: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain on one line; text from a file may hold newlines.
            eprintln!("error: {}", disp_core::fsutil::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ConvertGguf { input, output } => {
            let start = std::time::Instant::now();
            let summary = disp_models::gguf::convert_gguf_to_hf(&input, &output)?;
            println!(
                "converted {} ({} tensors, {} parameters, {}) into {} in {:.1} s",
                input.display(),
                summary.tensors,
                summary.parameters,
                summary.architecture,
                output.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Eval(EvalCommand::Ppl(args)) => eval_ppl(cli.device, args),
        Command::Eval(EvalCommand::Mc(args)) => eval_mc::eval_mc(cli.device, args),
        Command::Generate(args) => generate(cli.device, args),
        Command::Prune(args) => prune(cli.device, args),
        Command::Export(args) => export::export(args),
        Command::Inspect(args) => inspect::inspect(cli.device, args),
        Command::Bench(args) => bench::bench(cli.device, args),
    }
}

/// Loads the model (and applies a plan) on the chosen device.
fn load(device: DeviceChoice, args: &ModelArgs) -> Result<Box<dyn CausalLm>> {
    let device = select_device(device)?;
    let model = disp_models::load_model(&args.model, &device)?;
    match &args.plan {
        None => Ok(model),
        Some(path) => {
            let plan = PruningPlan::load(path)?;
            model.prune(&plan).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read text", path.display()))?;
    if text.trim().is_empty() {
        anyhow::bail!("{}: empty text file", path.display());
    }
    Ok(text)
}

fn eval_ppl(device: DeviceChoice, args: PplArgs) -> Result<()> {
    checks::seq_len(args.seq_len)?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let text = read_text(&args.text)?;
    let tokens = tokenizer.encode(&text)?;
    let windows = disp_eval::token_windows(&tokens, args.seq_len, args.max_windows, &args.text)?;
    let model = load(device, &args.model)?;
    let bar = progress_bar(windows.len() as u64, "windows", args.json);
    let report = disp_eval::perplexity(model.as_ref(), &windows, tokens.len(), |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    print_ppl(&report, &args);
    Ok(())
}

fn print_ppl(report: &PerplexityReport, args: &PplArgs) {
    if args.json {
        println!("{}", report_json(report, &args.model, "text", &args.text));
    } else {
        println!(
            "perplexity {:.4}  ({} windows x {} tokens, {} tokens scored of {} in the file)  {:.1} tokens/s",
            report.perplexity, report.windows, report.seq_len, report.predicted_tokens, report.file_tokens, report.tokens_per_second
        );
    }
}

/// A report as one JSON object, with the model, the plan and the input file it was made from.
fn report_json(report: &impl serde::Serialize, model: &ModelArgs, input_key: &str, input: &Path) -> serde_json::Value {
    let mut json = serde_json::to_value(report).expect("reports serialise");
    json["model"] = model.model.display().to_string().into();
    json[input_key] = input.display().to_string().into();
    if let Some(plan) = &model.plan {
        json["plan"] = plan.display().to_string().into();
    }
    json
}

fn progress_bar(len: u64, unit: &str, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"))
            .expect("valid template"),
    );
    bar
}

fn generate(device: DeviceChoice, args: GenerateArgs) -> Result<()> {
    checks::generation(args.max_tokens, args.temperature, args.top_p)?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let prompt = if args.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", args.prompt)
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer.encode(&prompt)?;
    let model = load(device, &args.model)?;
    let stop_tokens = disp_models::config::RawConfig::read(&args.model.model)?.eos_token_ids();
    let opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens,
    };
    let out = disp_eval::generate(model.as_ref(), &ids, &opts)?;
    println!("{}", tokenizer.decode(&out.tokens)?);
    eprintln!(
        "prompt {} tokens in {:.2} s; {} new tokens at {:.1} tokens/s",
        ids.len(),
        out.prefill_seconds,
        out.tokens.len(),
        out.tokens.len().saturating_sub(1) as f64 / out.decode_seconds.max(1e-9)
    );
    Ok(())
}

/// Tokenises each calibration file into windows of `seq_len` tokens.
fn calibration_windows(tokenizer: &TextTokenizer, files: &[PathBuf], seq_len: usize) -> Result<Vec<Vec<u32>>> {
    if files.is_empty() {
        anyhow::bail!("--data: this method needs at least one calibration text file");
    }
    let mut windows = Vec::new();
    for file in files {
        let tokens = tokenizer.encode(&read_text(file)?)?;
        windows.extend(disp_eval::token_windows(&tokens, seq_len, None, file)?);
    }
    Ok(windows)
}

/// `count` windows spread evenly over `windows` (all of them if there are fewer), so a small
/// sample still covers every calibration file.
fn evenly_spaced(windows: Vec<Vec<u32>>, count: usize) -> Vec<Vec<u32>> {
    let total = windows.len();
    if count >= total {
        return windows;
    }
    windows.into_iter().enumerate().filter(|(i, _)| (i * count) % total < count).map(|(_, w)| w).collect()
}

/// `wanda-2:4` on the dense `model`: computes the activation norms on `windows`, zeroes 2 of
/// every 4 input weights of every block linear, and returns the sparse model. A plan cannot hold
/// zeroed weights, so the result has to be written as a model folder (exporter to be wired in).
fn prune_two_of_four(
    mut model: Box<dyn CausalLm>,
    windows: &[Vec<u32>],
) -> Result<(Box<dyn CausalLm>, disp_train::wanda::SparsityReport)> {
    let report = disp_train::wanda::apply_wanda_2_4(model.as_mut(), windows)?;
    Ok((model, report))
}

/// The plan-making methods need a ratio and a plan path; wanda-2:4 needs neither.
fn ratio_and_plan_path(args: &PruneArgs) -> Result<(f64, PathBuf)> {
    let ratio = args.ratio.ok_or_else(|| anyhow::anyhow!("--ratio is required for this method"))?;
    checks::ratio(ratio)?;
    let out = args.out.clone().ok_or_else(|| anyhow::anyhow!("--out PLAN.json is required for this method"))?;
    Ok((ratio, out))
}

fn prune(device: DeviceChoice, args: PruneArgs) -> Result<()> {
    if args.method == Method::Wanda24 && args.export.is_none() {
        anyhow::bail!("wanda-2:4 produces zeroed weights, not index sets: use --export DIR");
    }
    let (ratio, plan_path) = if args.method == Method::Wanda24 {
        if args.ratio.is_some() || args.out.is_some() {
            anyhow::bail!("wanda-2:4 zeroes half of the block weights and writes no plan: drop --ratio and --out");
        }
        (0.5, PathBuf::new())
    } else {
        ratio_and_plan_path(&args)?
    };
    if matches!(args.method, Method::Disp | Method::DispDirect) && args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    if args.method.uses_activation_statistics() && args.calibration_windows == 0 {
        anyhow::bail!("--calibration-windows must be at least 1");
    }
    checks::seq_len(args.seq_len)?;
    checks::resume(args.resume, args.checkpoint.as_deref())?;
    checks::export_folder(args.export.as_deref())?;
    let model = load(device, &ModelArgs { model: args.model.clone(), plan: None })?;
    if matches!(args.method, Method::Disp | Method::DispDirect) {
        disp_train::search::check_search_memory(model.as_ref(), args.batch_size, args.seq_len)
            .map_err(|e| anyhow::anyhow!("--batch-size {}: {e:#}", args.batch_size))?;
    }
    if args.method == Method::Wanda24 {
        let tokenizer = TextTokenizer::load(&args.model)?;
        let windows = evenly_spaced(calibration_windows(&tokenizer, &args.data, args.seq_len)?, args.calibration_windows);
        let (sparse, report) = prune_two_of_four(model, &windows)?;
        println!(
            "wanda-2:4: zeroed {} of {} block linear weights ({:.2}%) using {} calibration tokens",
            report.zeroed,
            report.total,
            100.0 * report.fraction,
            report.calibration_tokens
        );
        let folder = args.export.as_deref().expect("checked above");
        let provenance = serde_json::json!({
            "method": "wanda-2:4",
            "zeroed_block_weights": report.zeroed,
            "block_weights": report.total,
            "calibration_tokens": report.calibration_tokens,
            "data": args.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        let summary = disp_export::export_modified_weights(&args.model, sparse.as_ref(), provenance, folder)?;
        println!("wrote {} ({:.1} MB, zeros stored densely)", folder.display(), summary.weight_bytes as f64 / 1e6);
        return Ok(());
    }
    // Fails early, before any tokenising or training, on a ratio the model cannot reach.
    model.model_shape().kept_block_fraction(ratio, args.ratio_of)?;
    let plan = match args.method {
        Method::UniformMagnitude => disp_train::uniform::uniform_magnitude_plan(model.as_ref(), ratio, args.ratio_of)?,
        Method::Wanda24 => unreachable!("handled above: no plan"),
        Method::WandaSp => {
            let tokenizer = TextTokenizer::load(&args.model)?;
            let all = calibration_windows(&tokenizer, &args.data, args.seq_len)?;
            let available = all.len();
            let windows = evenly_spaced(all, args.calibration_windows);
            let mut plan = disp_train::wanda::wanda_sp_plan(model.as_ref(), &windows, ratio, args.ratio_of)?;
            plan.search["data"] = args.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().into();
            plan.search["windows_available"] = available.into();
            plan
        }
        Method::Disp | Method::DispDirect => {
            let tokenizer = TextTokenizer::load(&args.model)?;
            let windows = calibration_windows(&tokenizer, &args.data, args.seq_len)?;
            let cfg = disp_train::SearchConfig {
                target_ratio: ratio,
                ratio_of: args.ratio_of,
                steps: args.steps,
                lambda: args.lambda,
                learning_rate: args.learning_rate,
                seed: args.seed,
                batch_size: args.batch_size,
                checkpoint: args.checkpoint.clone(),
                checkpoint_every: args.checkpoint_every,
                resume: args.resume,
                gate_source: if args.method == Method::DispDirect {
                    disp_train::GateSource::Direct
                } else {
                    disp_train::GateSource::HyperNetwork
                },
                ..Default::default()
            };
            let bar = progress_bar(args.steps as u64, "steps", false);
            let plan = disp_train::search(model.as_ref(), &windows, &cfg, |report| {
                bar.set_position(report.step as u64);
                bar.set_message(format!(
                    "CE {:.3}  reg {:.3}  removed {:.1}%",
                    report.lm_loss,
                    report.regulariser,
                    100.0 * report.achieved_ratio
                ));
            })?;
            bar.finish_and_clear();
            let mut plan = plan;
            plan.search["seq_len"] = args.seq_len.into();
            plan.search["data"] = args.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().into();
            plan.search["windows"] = windows.len().into();
            plan
        }
    };
    plan.save(&plan_path)?;
    print_plan_summary(&plan);
    println!("wrote {}", plan_path.display());
    if let Some(folder) = &args.export {
        export::export_plan(&args.model, &plan, args.export_format, folder)?;
    }
    Ok(())
}

fn print_plan_summary(plan: &PruningPlan) {
    println!(
        "{}: removed {:.2}% of {} parameters (target {:.2}%): {} -> {}",
        plan.method,
        100.0 * plan.achieved_ratio,
        plan.ratio_of.name(),
        100.0 * plan.target_ratio,
        plan.dense_params,
        plan.pruned_params
    );
    println!("layer   |S1|  |S2|  |S3|  |S4|  |S5|");
    for (i, w) in plan.widths().iter().enumerate() {
        let BlockWidths { attn_in, attn_out, mlp_in, mlp_inter, mlp_out } = *w;
        println!("{i:>5} {attn_in:>6}{attn_out:>6}{mlp_in:>6}{mlp_inter:>6}{mlp_out:>6}");
    }
}

#[cfg(test)]
mod tests {
    use super::evenly_spaced;

    #[test]
    fn evenly_spaced_windows_cover_the_whole_range() {
        let windows: Vec<Vec<u32>> = (0..10).map(|i| vec![i]).collect();
        let picked: Vec<u32> = evenly_spaced(windows.clone(), 4).into_iter().map(|w| w[0]).collect();
        assert_eq!(picked, vec![0, 3, 5, 8]);
        assert_eq!(evenly_spaced(windows.clone(), 10), windows);
        assert_eq!(evenly_spaced(windows.clone(), 50).len(), 10);
        assert_eq!(evenly_spaced(windows, 1), vec![vec![0]]);
    }
}

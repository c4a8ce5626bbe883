//! `disp`: the command-line face of DISP-LLM. A thin layer over the library crates: it parses
//! arguments, picks the device, and prints results; the work happens in `disp-models`,
//! `disp-eval`, `disp-train` and `disp-core`.

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
}

#[derive(Args)]
struct PruneArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Fraction of parameters to remove, strictly between 0 and 1.
    #[arg(long)]
    ratio: f64,
    /// What the ratio is a fraction of: total (the paper's convention) or blocks.
    #[arg(long, default_value = "total")]
    ratio_of: RatioOf,
    #[arg(long, value_enum, default_value_t = Method::Disp)]
    method: Method,
    /// Calibration text files (the search needs them; baselines ignore them).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Hypernetwork updates.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Calibration windows per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Weight of the parameter regulariser.
    #[arg(long, default_value_t = 6.0)]
    lambda: f64,
    #[arg(long, default_value_t = 1e-3)]
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
    /// Where to write the plan (JSON).
    #[arg(long)]
    out: PathBuf,
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
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0.9)]
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
            // `{:#}` joins the context chain on one line.
            eprintln!("error: {e:#}");
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
        Command::Generate(args) => generate(cli.device, args),
        Command::Prune(args) => prune(cli.device, args),
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
        let mut json = serde_json::to_value(report).expect("report serialises");
        json["model"] = args.model.model.display().to_string().into();
        json["text"] = args.text.display().to_string().into();
        if let Some(plan) = &args.model.plan {
            json["plan"] = plan.display().to_string().into();
        }
        println!("{json}");
    } else {
        println!(
            "perplexity {:.4}  ({} windows x {} tokens, {} tokens scored of {} in the file)  {:.1} tokens/s",
            report.perplexity, report.windows, report.seq_len, report.predicted_tokens, report.file_tokens, report.tokens_per_second
        );
    }
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
        anyhow::bail!("--data: the search needs at least one calibration text file");
    }
    let mut windows = Vec::new();
    for file in files {
        let tokens = tokenizer.encode(&read_text(file)?)?;
        windows.extend(disp_eval::token_windows(&tokens, seq_len, None, file)?);
    }
    Ok(windows)
}

fn prune(device: DeviceChoice, args: PruneArgs) -> Result<()> {
    if !(args.ratio > 0.0 && args.ratio < 1.0) {
        anyhow::bail!("--ratio must be strictly between 0 and 1, got {}", args.ratio);
    }
    if args.method == Method::Disp && args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let model = load(device, &ModelArgs { model: args.model.clone(), plan: None })?;
    // Fails early, before any tokenising or training, on a ratio the model cannot reach.
    model.model_shape().kept_block_fraction(args.ratio, args.ratio_of)?;
    let plan = match args.method {
        Method::UniformMagnitude => disp_train::uniform::uniform_magnitude_plan(model.as_ref(), args.ratio, args.ratio_of)?,
        Method::Disp => {
            let tokenizer = TextTokenizer::load(&args.model)?;
            let windows = calibration_windows(&tokenizer, &args.data, args.seq_len)?;
            let cfg = disp_train::SearchConfig {
                target_ratio: args.ratio,
                ratio_of: args.ratio_of,
                steps: args.steps,
                lambda: args.lambda,
                learning_rate: args.learning_rate,
                seed: args.seed,
                batch_size: args.batch_size,
                checkpoint: args.checkpoint.clone(),
                checkpoint_every: args.checkpoint_every,
                resume: args.resume,
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
    plan.save(&args.out)?;
    print_plan_summary(&plan);
    println!("wrote {}", args.out.display());
    Ok(())
}

fn print_plan_summary(plan: &PruningPlan) {
    println!(
        "{}: removed {:.2}% of {} parameters (target {:.2}%): {} -> {}",
        plan.method,
        100.0 * plan.achieved_ratio,
        match plan.ratio_of {
            RatioOf::Total => "total",
            RatioOf::Blocks => "block",
        },
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

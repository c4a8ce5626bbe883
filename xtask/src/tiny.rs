//! `cargo xtask train-tiny`: trains a small LLaMA, OPT or Phi model from scratch on the project's
//! public-domain text under `data/` with `disp train-tiny` (the release `disp` binary: training
//! needs burn, which this crate does not build) and writes it under `models/tiny-<family>/`.
//!
//! The corpus is the Austen calibration novels plus, when `fetch-assets --extra` has fetched
//! them, the KJV (without John) and Shakespeare (without The Tempest); nothing under
//! `data/heldout/` is ever read for training. The held-out perplexity is reported on Persuasion.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

/// The held-out text `disp train-tiny` reports the perplexity on.
const HELDOUT: &str = "data/heldout/persuasion.txt";

#[derive(Clone, Copy, ValueEnum)]
pub enum FamilyArg {
    Llama,
    Opt,
    Phi,
}

impl FamilyArg {
    fn name(self) -> &'static str {
        match self {
            FamilyArg::Llama => "llama",
            FamilyArg::Opt => "opt",
            FamilyArg::Phi => "phi",
        }
    }
}

/// What `disp train-tiny` takes besides the corpus; unset options keep its defaults
/// (`disp train-tiny --help`).
#[derive(Args)]
pub struct TrainTinyArgs {
    /// Model family: llama (GQA, SwiGLU, tied head), opt (pre-LN, ReLU) or phi (partial rotary,
    /// gelu_new).
    #[arg(long, value_enum)]
    family: FamilyArg,
    /// Optimizer steps [disp's default: 800].
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the initial weights and of the window order.
    #[arg(long)]
    seed: Option<u64>,
    /// Output folder [default: models/tiny-<family>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Replace an existing non-empty output folder.
    #[arg(long)]
    force: bool,
    /// Tokenizer vocabulary (byte-level BPE trained on the corpus).
    #[arg(long)]
    vocab: Option<usize>,
    /// Training window length in tokens (also the held-out window length).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (linear warm-up, cosine decay to a tenth of it).
    #[arg(long)]
    lr: Option<f64>,
}

/// The training text: which files, in a fixed order, and what was left out.
#[derive(Debug, PartialEq)]
pub struct Corpus {
    /// Paths relative to the repository root.
    pub files: Vec<String>,
    /// Whether the optional KJV and Shakespeare corpora were found.
    pub has_extra: bool,
}

/// The training files under `root`: `data/calib/austen-*.txt` (sorted), then
/// `data/extra/kjv.txt` and `data/extra/shakespeare.txt` if present. Held-out files are never
/// included: fetch-assets writes them to `data/heldout/` only (John and The Tempest are cut out
/// of the extra corpora, Persuasion is not among the calibration novels).
pub fn find_corpus(root: &Path) -> Result<Corpus> {
    let calib = root.join("data/calib");
    let mut files: Vec<String> = std::fs::read_dir(&calib)
        .with_context(|| format!("{}: cannot read (run `cargo xtask fetch-assets` first)", calib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("austen-") && n.ends_with(".txt"))
        .map(|n| format!("data/calib/{n}"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no austen-*.txt (run `cargo xtask fetch-assets` first)", calib.display());
    }
    if let Some(f) = files.iter().find(|f| f.contains("persuasion")) {
        bail!("{f}: Persuasion is the held-out novel and must not be training text");
    }
    let extra = ["data/extra/kjv.txt", "data/extra/shakespeare.txt"];
    let present: Vec<&str> = extra.iter().copied().filter(|f| root.join(f).is_file()).collect();
    let has_extra = present.len() == extra.len();
    files.extend(present.into_iter().map(String::from));
    Ok(Corpus { files, has_extra })
}

/// The `disp train-tiny` arguments for `args` and the corpus found under `root`.
fn disp_arguments(root: &Path, args: &TrainTinyArgs, corpus: &Corpus) -> Vec<String> {
    let out = args.out.clone().unwrap_or_else(|| root.join(format!("models/tiny-{}", args.family.name())));
    let mut argv: Vec<String> = vec!["train-tiny".into(), "--family".into(), args.family.name().into(), "--data".into()];
    argv.extend(corpus.files.iter().cloned());
    argv.extend(["--heldout".into(), HELDOUT.into(), "--out".into(), out.display().to_string()]);
    let optional = [
        ("--steps", args.steps.map(|v| v.to_string())),
        ("--seed", args.seed.map(|v| v.to_string())),
        ("--vocab", args.vocab.map(|v| v.to_string())),
        ("--seq-len", args.seq_len.map(|v| v.to_string())),
        ("--batch-size", args.batch_size.map(|v| v.to_string())),
        ("--lr", args.lr.map(|v| v.to_string())),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            argv.extend([flag.to_string(), value]);
        }
    }
    if args.force {
        argv.push("--force".into());
    }
    argv
}

pub fn run(args: TrainTinyArgs) -> ExitCode {
    match train(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: train-tiny: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn train(args: &TrainTinyArgs) -> Result<()> {
    let root = crate::repo_root();
    let corpus = find_corpus(&root)?;
    if !corpus.has_extra {
        println!("[train-tiny] data/extra/kjv.txt or shakespeare.txt absent: training on what is there (`cargo xtask fetch-assets --extra` adds KJV and Shakespeare)");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--release", "--quiet", "-p", "disp-cli", "--"])
        .args(disp_arguments(&root, args, &corpus))
        .current_dir(&root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("disp train-tiny failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "text\n").unwrap();
    }

    #[test]
    fn corpus_is_calibration_austen_plus_extras_never_heldout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "data/calib/austen-emma.txt",
            "data/calib/austen-pride-and-prejudice.txt",
            "data/heldout/persuasion.txt",
            "data/heldout/kjv-john.txt",
            "data/calib/notes.md",
        ] {
            touch(root, f);
        }
        let c = find_corpus(root).unwrap();
        assert_eq!(
            c,
            Corpus { files: vec!["data/calib/austen-emma.txt".into(), "data/calib/austen-pride-and-prejudice.txt".into()], has_extra: false }
        );

        touch(root, "data/extra/kjv.txt");
        touch(root, "data/extra/shakespeare.txt");
        let c = find_corpus(root).unwrap();
        assert!(c.has_extra);
        assert_eq!(&c.files[2..], ["data/extra/kjv.txt", "data/extra/shakespeare.txt"]);
        assert!(c.files.iter().all(|f| !f.starts_with("data/heldout/")));

        touch(root, "data/calib/austen-persuasion.txt");
        assert!(find_corpus(root).unwrap_err().to_string().contains("held-out"));
    }

    #[test]
    fn missing_calibration_text_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_corpus(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cargo xtask fetch-assets"), "{err}");
    }

    #[test]
    fn disp_gets_the_corpus_the_heldout_text_and_only_the_options_given() {
        let corpus = Corpus { files: vec!["data/calib/austen-emma.txt".into()], has_extra: false };
        let mut args = TrainTinyArgs {
            family: FamilyArg::Opt,
            steps: None,
            seed: Some(3),
            out: None,
            force: true,
            vocab: None,
            seq_len: None,
            batch_size: None,
            lr: None,
        };
        let argv = disp_arguments(Path::new("/repo"), &args, &corpus);
        assert_eq!(
            argv,
            [
                "train-tiny",
                "--family",
                "opt",
                "--data",
                "data/calib/austen-emma.txt",
                "--heldout",
                HELDOUT,
                "--out",
                "/repo/models/tiny-opt",
                "--seed",
                "3",
                "--force"
            ]
        );
        args.out = Some(PathBuf::from("elsewhere"));
        args.force = false;
        assert_eq!(disp_arguments(Path::new("/repo"), &args, &corpus)[8], "elsewhere");
        assert!(!disp_arguments(Path::new("/repo"), &args, &corpus).contains(&"--force".to_string()));
    }
}

//! `disp train-tiny`: trains a small LLaMA, OPT or Phi model from scratch on text files and
//! writes it as an HF folder (`config.json`, `model.safetensors` in f32, `tokenizer.json`) that
//! `disp` and transformers load.
//!
//! A byte-level BPE is trained on the `--data` files first, then the model with
//! `disp_train::pretrain`; the perplexity on the `--heldout` file (which may not also be a
//! training file) is measured and stored in `config.json` under `disp_train_tiny`.
//! `cargo xtask train-tiny` calls this with the project's corpus (Austen, KJV, Shakespeare).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use disp_core::device::{select_device, DeviceChoice};
use disp_io::fmt::thousands;
use disp_io::fsutil::{temporary_sibling, StagedFolder};
use disp_models::bpe::{save_tokenizer, train_byte_level_bpe, END_OF_TEXT};
use disp_models::{Family, RawConfig, TextTokenizer};
use disp_train::pretrain::{hf_config, ModelSize, PretrainConfig, Pretrainer};
use serde_json::{json, Value};

/// Optimizer steps when `--steps` is not given: about 10 minutes per family on 2 cores in a
/// release build (0.7–0.9 s/step measured, see README.md).
pub const DEFAULT_STEPS: usize = 800;
/// How many windows of the held-out text the perplexity is reported on.
const HELDOUT_WINDOWS: usize = 16;
/// Progress lines every this many steps.
const LOG_EVERY: usize = 50;

#[derive(Clone, Copy, ValueEnum)]
pub enum FamilyArg {
    Llama,
    Opt,
    Phi,
}

impl FamilyArg {
    fn family(self) -> Family {
        match self {
            FamilyArg::Llama => Family::Llama,
            FamilyArg::Opt => Family::Opt,
            FamilyArg::Phi => Family::Phi,
        }
    }
}

#[derive(Args)]
pub struct TrainTinyArgs {
    /// Model family: llama (GQA, SwiGLU, tied head), opt (pre-LN, ReLU) or phi (partial rotary,
    /// gelu_new).
    #[arg(long, value_enum)]
    family: FamilyArg,
    /// Optimizer steps (batches of --batch-size windows of --seq-len tokens).
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: usize,
    /// Seed of the initial weights and of the window order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training text files (UTF-8), read in this order.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// The text the held-out perplexity is reported on; never trained on.
    #[arg(long)]
    heldout: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace an existing non-empty output folder.
    #[arg(long)]
    force: bool,
    /// Tokenizer vocabulary (byte-level BPE trained on the corpus).
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Training window length in tokens (also the held-out window length).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (linear warm-up, cosine decay to a tenth of it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
}

/// Pieces of `text` of about `target` bytes, cut after blank lines (paragraph ends) so that the
/// cuts fall where the tokenizer's pre-tokenizer splits anyway; they can be encoded in parallel.
pub fn paragraph_chunks(text: &str, target: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        if end < text.len() {
            end = match text[end..].find("\n\n") {
                Some(i) => end + i + 2,
                None => text.len(),
            };
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    chunks
}

pub fn run(device: DeviceChoice, args: TrainTinyArgs) -> Result<()> {
    train(&select_device(device)?, &args)
}

fn say(msg: &str) {
    println!("[train-tiny] {msg}");
}

fn train(device: &Device, args: &TrainTinyArgs) -> Result<()> {
    let start = Instant::now();
    let family = args.family.family();
    let out = &args.out;
    check_output(out, args.force)?;
    check_heldout_is_not_training(&args.heldout, &args.data)?;
    let corpus: Vec<String> = args.data.iter().map(|p| p.display().to_string()).collect();
    let texts: Vec<String> =
        args.data.iter().map(|f| std::fs::read_to_string(f).with_context(|| format!("{}: cannot read", f.display()))).collect::<Result<_>>()?;
    let bytes: usize = texts.iter().map(String::len).sum();
    say(&format!("corpus: {} files, {} bytes: {}", texts.len(), thousands(bytes as u64), corpus.join(", ")));

    let t = Instant::now();
    let tokenizer = train_byte_level_bpe(texts.iter().flat_map(|t| paragraph_chunks(t, 4096)), args.vocab)?;
    let special = tokenizer.token_to_id(END_OF_TEXT).expect("checked by training");
    say(&format!("byte-level BPE of {} tokens trained in {:.1}s", tokenizer.get_vocab_size(true), t.elapsed().as_secs_f64()));

    // One stream: every document starts with <|endoftext|>, cut into non-overlapping windows.
    let t = Instant::now();
    let mut stream: Vec<u32> = Vec::new();
    for text in &texts {
        stream.push(special);
        let encodings = tokenizer.encode_batch(paragraph_chunks(text, 1 << 16), false).map_err(|e| anyhow!("cannot tokenise the corpus: {e}"))?;
        stream.extend(encodings.iter().flat_map(|e| e.get_ids().iter().copied()));
    }
    let windows: Vec<Vec<u32>> = stream.chunks_exact(args.seq_len).map(<[u32]>::to_vec).collect();
    say(&format!(
        "{} tokens ({:.2} bytes/token) in {} windows of {} in {:.1}s",
        thousands(stream.len() as u64),
        bytes as f64 / stream.len() as f64,
        thousands(windows.len() as u64),
        args.seq_len,
        t.elapsed().as_secs_f64()
    ));

    let size = ModelSize { vocab: tokenizer.get_vocab_size(true), ..ModelSize::tiny(family) };
    let mut config = hf_config(family, &size, special)?;
    let raw = RawConfig { path: out.join("config.json"), json: config.clone() };
    let cfg = PretrainConfig { steps: args.steps, batch_size: args.batch_size, learning_rate: args.lr, seed: args.seed, ..Default::default() };
    let cfg = PretrainConfig { warmup_steps: cfg.warmup_steps.min(args.steps.div_ceil(10)), ..cfg };
    let mut trainer = Pretrainer::new(raw, windows, &cfg, device)?;
    let tokens_per_step = args.batch_size * args.seq_len;
    say(&format!(
        "{} {} parameters; {} steps of {} tokens = {:.2} epochs of the corpus",
        family.model_type(),
        thousands(trainer.parameter_count() as u64),
        args.steps,
        tokens_per_step,
        (args.steps * tokens_per_step) as f64 / stream.len() as f64
    ));

    let t = Instant::now();
    let mut curve: Vec<(usize, f64)> = Vec::new();
    let (mut interval_loss, mut interval_steps, mut interval_secs) = (0.0, 0, 0.0);
    let (mut interval_forward, mut interval_backward) = (0.0, 0.0);
    let mut first_loss = None;
    while trainer.steps_done() < args.steps {
        let r = trainer.step()?;
        first_loss.get_or_insert(r.loss);
        interval_loss += r.loss;
        interval_steps += 1;
        interval_secs += r.seconds;
        interval_forward += r.forward_seconds;
        interval_backward += r.backward_seconds;
        if r.step % LOG_EVERY == 0 || r.step == args.steps {
            let mean = interval_loss / interval_steps as f64;
            curve.push((r.step, mean));
            let eta = t.elapsed().as_secs_f64() / r.step as f64 * (args.steps - r.step) as f64;
            say(&format!(
                "step {:>5}/{}  loss {mean:.4}  lr {:.2e}  grad-norm {:.2}  {:.0} tokens/s  {:.2} s/step (forward {:.2}, backward {:.2})  eta {eta:.0}s",
                r.step,
                args.steps,
                r.learning_rate,
                r.grad_norm,
                (interval_steps * r.tokens) as f64 / interval_secs,
                interval_secs / interval_steps as f64,
                interval_forward / interval_steps as f64,
                interval_backward / interval_steps as f64,
            ));
            (interval_loss, interval_steps, interval_secs) = (0.0, 0, 0.0);
            (interval_forward, interval_backward) = (0.0, 0.0);
        }
    }
    let train_secs = t.elapsed().as_secs_f64();
    let final_loss = curve.last().map(|c| c.1).expect("at least one step");

    // Held-out perplexity of the trained model, on windows as long as the training ones.
    let heldout_path = &args.heldout;
    let heldout_name = heldout_path.display().to_string();
    let heldout_text = std::fs::read_to_string(heldout_path).with_context(|| format!("{heldout_name}: cannot read"))?;
    let heldout_tokens = tokenizer.encode(heldout_text.as_str(), false).map_err(|e| anyhow!("{heldout_name}: cannot tokenise: {e}"))?;
    let heldout_windows = disp_eval::perplexity::token_windows(heldout_tokens.get_ids(), args.seq_len, Some(HELDOUT_WINDOWS), heldout_path)?;
    let model = trainer.model()?;
    let report = disp_eval::perplexity::perplexity(model.as_ref(), &heldout_windows, heldout_tokens.len(), |_| {})?;
    let last_interval = args.steps - curve.iter().rev().nth(1).map_or(0, |c| c.0);
    say(&format!(
        "trained in {train_secs:.0}s; final training loss {final_loss:.4} (mean of the last {last_interval} steps); held-out perplexity on {heldout_name} ({} windows of {}): {:.2}",
        report.windows,
        report.seq_len,
        report.perplexity
    ));

    config["disp_train_tiny"] = json!({
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "settings": cfg,
        "corpus": corpus,
        "corpus_tokens": stream.len(),
        "tokens_seen": args.steps * tokens_per_step,
        "parameters": trainer.parameter_count(),
        "tokenizer": {"kind": "byte-level BPE", "vocab_size": size.vocab, "special_token": END_OF_TEXT},
        "first_training_loss": first_loss,
        "final_training_loss": final_loss,
        "training_loss_curve": curve.iter().map(|(s, l)| json!([s, l])).collect::<Vec<_>>(),
        "heldout": {
            "file": heldout_name,
            "windows": report.windows,
            "seq_len": report.seq_len,
            "mean_nll": report.mean_nll,
            "perplexity": report.perplexity,
        },
    });
    write_folder(device, args, &trainer, &config, &tokenizer, size.max_positions, &heldout_windows[0])?;
    say(&format!("wrote {} in {:.0}s total", out.display(), start.elapsed().as_secs_f64()));
    Ok(())
}

/// Refuses a held-out file that is also training text (the same file under any path).
fn check_heldout_is_not_training(heldout: &Path, data: &[PathBuf]) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).with_context(|| format!("{}: cannot read", p.display()));
    let heldout_file = canonical(heldout)?;
    for file in data {
        if canonical(file)? == heldout_file {
            bail!("{}: is the --heldout text and must not be training text", file.display());
        }
    }
    Ok(())
}

/// Refuses an existing non-empty output unless `force`; done before any work.
fn check_output(out: &Path, force: bool) -> Result<()> {
    let non_empty = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => bail!("{}: cannot read: {e}", out.display()),
    };
    if non_empty && !force {
        bail!("{}: already exists and is not empty (--force replaces it)", out.display());
    }
    Ok(())
}

/// Writes the folder atomically, after checking what was written: the model reloads to the
/// same logits on `probe` and the tokenizer loads back. With `--force`, an existing folder is
/// replaced only once the new one is complete.
fn write_folder(
    device: &Device,
    args: &TrainTinyArgs,
    trainer: &Pretrainer,
    config: &Value,
    tokenizer: &tokenizers::Tokenizer,
    max_positions: usize,
    probe: &[u32],
) -> Result<()> {
    let (out, force) = (args.out.as_path(), args.force);
    let replaced = if force && out.exists() {
        let aside = temporary_sibling(out);
        std::fs::rename(out, &aside).with_context(|| format!("{}: cannot move the old folder aside", out.display()))?;
        Some(aside)
    } else {
        None
    };
    let result = (|| -> Result<()> {
        let staging = StagedFolder::new(out)?;
        trainer.write_hf_files(staging.path(), config)?;
        save_tokenizer(tokenizer, staging.path(), max_positions)?;
        let loaded = TextTokenizer::load(staging.path())?;
        let sample = "Anne Elliot walked to Kellynch, and the Admiral said: \"Ay, ay!\"\n";
        if loaded.decode(&loaded.encode(sample)?)? != sample {
            bail!("the written tokenizer.json does not round-trip text");
        }
        let reloaded = disp_models::load_model(staging.path(), device)?;
        let in_memory = trainer.model()?;
        if window_logits(reloaded.as_ref(), probe) != window_logits(in_memory.as_ref(), probe) {
            bail!("the written model.safetensors computes other logits than the trained model");
        }
        staging.publish()
    })();
    match (result, replaced) {
        (Ok(()), Some(aside)) => std::fs::remove_dir_all(&aside).with_context(|| format!("{}: cannot remove the replaced folder", aside.display())),
        (Ok(()), None) => Ok(()),
        (Err(e), Some(aside)) => {
            // Put the old folder back: a failed run leaves things as they were.
            let _ = std::fs::rename(&aside, out);
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

fn window_logits(model: &dyn disp_models::CausalLm, window: &[u32]) -> Vec<u32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, window.len()]), model.device());
    let logits = model.forward(tokens, None, None).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits");
    logits.iter().map(|x| x.to_bits()).collect()
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
    fn the_heldout_text_is_never_training_text() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "calib/a.txt");
        touch(root, "heldout/p.txt");
        let heldout = root.join("heldout/p.txt");
        check_heldout_is_not_training(&heldout, &[root.join("calib/a.txt")]).unwrap();
        let err = check_heldout_is_not_training(&heldout, &[root.join("calib/a.txt"), root.join("calib/../heldout/p.txt")]).unwrap_err();
        assert!(err.to_string().contains("must not be training text"), "{err}");
    }

    #[test]
    fn chunks_cover_the_text_and_end_at_paragraphs() {
        let text = "one two\n\nthree four five\n\nsix\nseven\n\neight";
        let chunks = paragraph_chunks(text, 5);
        assert_eq!(chunks.concat(), text);
        assert_eq!(chunks, ["one two\n\n", "three four five\n\n", "six\nseven\n\n", "eight"]);
        assert_eq!(paragraph_chunks("", 5), Vec::<&str>::new());
    }

    #[test]
    fn a_non_empty_output_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny");
        check_output(&out, false).unwrap();
        touch(&out, "config.json");
        assert!(check_output(&out, false).unwrap_err().to_string().contains("--force"));
        check_output(&out, true).unwrap();
    }
}

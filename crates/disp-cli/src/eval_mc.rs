//! `disp eval mc`: zero-shot multiple-choice accuracy over JSONL task files (lm-evaluation-harness
//! scoring; see `disp_eval::multiple_choice`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use disp_core::device::DeviceChoice;
use disp_eval::multiple_choice::{evaluate_multiple_choice, load_tasks, McExample, McReport};
use disp_models::TextTokenizer;

use crate::{load, progress_bar, ModelArgs};

#[derive(Args)]
pub struct McArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL task files, one {"context", "choices", "gold"} object per line; each task is named
    /// after its file stem.
    #[arg(long, num_args = 1.., required = true)]
    tasks: Vec<PathBuf>,
    /// Only the first N examples of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object per task instead of text.
    #[arg(long)]
    json: bool,
}

pub fn eval_mc(device: DeviceChoice, args: McArgs) -> Result<()> {
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    // Every task file is read and checked before the model loads: a bad file costs no load time.
    let tasks = args
        .tasks
        .iter()
        .map(|path| {
            let mut examples = load_tasks(path)?;
            examples.truncate(args.limit.unwrap_or(usize::MAX));
            Ok((path.as_path(), examples))
        })
        .collect::<Result<Vec<(&Path, Vec<McExample>)>>>()?;
    let tokenizer = TextTokenizer::load(&args.model.model)?;
    let model = load(device, &args.model)?;
    for (path, examples) in tasks {
        let task = path.file_stem().map_or_else(|| path.display().to_string(), |stem| stem.to_string_lossy().into_owned());
        let bar = progress_bar(examples.len() as u64, "examples", args.json);
        bar.set_message(task.clone());
        let report = evaluate_multiple_choice(model.as_ref(), &tokenizer, &task, &examples, |done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        print_report(&report, path, &args);
    }
    Ok(())
}

fn print_report(report: &McReport, path: &Path, args: &McArgs) {
    if args.json {
        println!("{}", crate::report_json(report, &args.model, "file", path));
    } else {
        println!(
            "{}  acc {:.4} ± {:.4}  acc_norm {:.4} ± {:.4}  ({} examples, {:.1} s)",
            report.task, report.acc, report.acc_stderr, report.acc_norm, report.acc_norm_stderr, report.examples, report.seconds
        );
    }
}

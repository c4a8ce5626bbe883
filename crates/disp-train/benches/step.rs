//! Median time of one DISP hypernetwork step (batch 1) on a model folder.
//!
//! `cargo bench -p disp-train -- [MODEL_DIR] [SEQ_LEN] [STEPS]`
//! (defaults: models/smollm2-135m-instruct at the workspace root, 512, 5).

use std::path::PathBuf;

use burn::tensor::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = args.first().map(PathBuf::from).unwrap_or_else(|| root.join("models/smollm2-135m-instruct"));
    let seq_len: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    if !dir.join("config.json").exists() {
        eprintln!("{}: no model there; skipping the step benchmark", dir.display());
        return Ok(());
    }
    let model = disp_models::load_model(&dir, &Device::flex())?;
    let report = disp_train::time_search_steps(model.as_ref(), seq_len, steps, 0)?;
    println!(
        "{}: hypernetwork step, batch 1, seq_len {seq_len}: median {:.3} s (forward {:.3}, backward {:.3}, optimizer {:.3}) over {steps} steps; min {:.3} max {:.3}",
        dir.display(),
        report.median.total,
        report.median.forward,
        report.median.backward,
        report.median.optimizer,
        report.min_total,
        report.max_total
    );
    Ok(())
}

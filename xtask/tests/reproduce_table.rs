//! `cargo xtask reproduce-table --quick` on tiny random fixture models: the report has the
//! paper's layout, every achieved ratio is within ±0.5 pt of its target (wanda-2:4's is exactly
//! half the block matrices), every cell's numbers are what `disp eval` prints for its plan, and a
//! rerun reuses the cached cells.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `disp` binary `cargo test --workspace` has built next to this test (disp-cli's own
/// integration tests need it). Built here only when missing: a separate `cargo build -p
/// disp-cli` unifies features differently and would rebuild burn.
fn disp_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let profile_dir = if cfg!(debug_assertions) { "debug" } else { "release" };
    let binary = target.join(profile_dir).join("disp");
    if !binary.is_file() {
        let profile = if cfg!(debug_assertions) { "dev" } else { "release" };
        let status = Command::new(env!("CARGO")).args(["build", "-q", "--profile", profile, "-p", "disp-cli"]).current_dir(root()).status().unwrap();
        assert!(status.success(), "cannot build disp-cli");
    }
    binary
}

/// A fixture model with the byte-level tokenizer its 256-entry vocabulary fits.
fn model_with_tokenizer(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(root().join("tests/fixtures").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    std::fs::copy(root().join("tests/fixtures/byte_tokenizer.json"), out.join("tokenizer.json")).unwrap();
    out
}

/// (parameters of the blocks' weight matrices, all parameters) of a safetensors file.
fn parameter_counts(path: &Path) -> (u64, u64) {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let (mut blocks, mut total) = (0, 0);
    for (name, info) in header.as_object().unwrap() {
        let Some(shape) = info["shape"].as_array() else { continue };
        let count: u64 = shape.iter().map(|d| d.as_u64().unwrap()).product();
        total += count;
        if name.contains(".layers.") && shape.len() == 2 {
            blocks += count;
        }
    }
    (blocks, total)
}

fn text(dir: &Path, name: &str, seed: usize) -> PathBuf {
    let words = ["the", "river", "ran", "past", "a", "quiet", "house", "and", "she", "said", "nothing", "of", "it"];
    let text: String = (0..2500).map(|i| words[(i * 7 + seed * 3 + i / 5) % words.len()]).collect::<Vec<_>>().join(" ");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn quick_table_on_tiny_models_has_the_layout_and_hits_every_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_with_tokenizer(tmp.path(), "llama_gqa_tied");
    let phi = model_with_tokenizer(tmp.path(), "phi");
    let calib = text(tmp.path(), "calib.txt", 1);
    let heldout = text(tmp.path(), "heldout.txt", 2);
    let task = tmp.path().join("task.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| serde_json::json!({"context": format!("the river {i}"), "choices": [" ran past", " a house"], "gold": i % 2}).to_string())
        .collect();
    std::fs::write(&task, lines.join("\n")).unwrap();
    let cache = tmp.path().join("cache");
    let report = tmp.path().join("results.md");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["reproduce-table", "--quick", "--seq-len", "32", "--steps", "3", "--eval-windows", "2"])
            .args(["--models", &format!("llama={},phi={}", llama.display(), phi.display())])
            .args(["--calibration", calib.to_str().unwrap()])
            .args(["--heldout", &format!("heldout={}", heldout.display())])
            .args(["--tasks", task.to_str().unwrap()])
            .args(["--disp", disp_binary().to_str().unwrap()])
            .args(["--cache", cache.to_str().unwrap(), "--out", report.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}\n{}", String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&first.stderr));
    let md = std::fs::read_to_string(&report).unwrap();
    for model in ["llama", "phi"] {
        assert!(md.contains(&format!("## {model}: perplexity on heldout")), "{md}");
    }
    assert!(md.contains("| method | 0 % | 30 % | 50 % |"), "{md}");
    assert!(md.contains("## Which orderings reproduce") && md.contains("- llama, heldout: disp is better than"), "{md}");
    assert!(md.contains("DISP-LLM | | 6.10 | 6.85 | 8.11 | 9.84"), "the paper's numbers for context");
    for method in ["disp", "disp-direct", "uniform-magnitude", "uniform-wanda", "wanda-sp-mlp", "wanda-2:4"] {
        assert!(md.contains(&format!("\n| {method} | ")), "row {method} missing: {md}");
    }
    assert!(md.contains(" on ") && md.contains("logical cores"), "when and where the cells ran: {md}");
    // The chart beside the report and linked from it: a PNG with one panel per model (two rows)
    // and held-out text (one column).
    assert!(md.contains("](results.png)"), "{md}");
    let png = std::fs::read(tmp.path().join("results.png")).expect("results.png beside the report");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (width, height) = (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert!(width >= 700 && height >= 2 * 400, "one panel per model and text: {width}×{height}");

    // Every cached cell: the achieved ratio within ±0.5 pt of its target (wanda-2:4: exactly
    // half of the block matrices over all parameters, counted here from the checkpoint), and
    // perplexity and accuracy exactly what `disp eval` prints for the cell's own plan.
    let mut cells = 0;
    for (model, dir) in [("llama", &llama), ("phi", &phi)] {
        let (block_matrices, total) = parameter_counts(&dir.join("model.safetensors"));
        for entry in std::fs::read_dir(cache.join(model)).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().ends_with(".json") || path.to_string_lossy().ends_with(".plan.json") {
                continue;
            }
            let cell: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let (method, target, achieved) =
                (cell["method"].as_str().unwrap(), cell["target_ratio"].as_f64().unwrap(), cell["achieved_ratio"].as_f64().unwrap());
            let plan = path.with_extension("plan.json");
            match method {
                "dense" => assert_eq!(achieved, 0.0),
                "wanda-2:4" => {
                    let expected = block_matrices as f64 / 2.0 / total as f64;
                    assert!((achieved - expected).abs() < 1e-12, "{path:?}: {achieved} vs half the block matrices, {expected}");
                }
                _ => {
                    assert!((achieved - target).abs() <= 0.005, "{path:?}: {method} {achieved} vs {target}");
                    assert!(plan.is_file(), "{path:?}: the plan is cached beside the cell");
                }
            }
            if method != "wanda-2:4" {
                let mut model_args = vec!["--model".to_string(), dir.display().to_string()];
                if method != "dense" {
                    model_args.extend(["--plan".to_string(), plan.display().to_string()]);
                }
                let eval = |args: &[&str]| -> Vec<serde_json::Value> {
                    let out = Command::new(disp_binary()).args(["eval"]).args(args).args(&model_args).arg("--json").output().unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
                };
                let ppl = eval(&["ppl", "--text", heldout.to_str().unwrap(), "--seq-len", "32", "--max-windows", "2"]);
                assert_eq!(cell["perplexity"]["heldout"], ppl[0]["perplexity"], "{path:?}");
                let mc = eval(&["mc", "--tasks", task.to_str().unwrap()]);
                assert_eq!(cell["accuracy"]["task"][0], mc[0]["acc"], "{path:?}");
                assert_eq!(cell["accuracy"]["task"][1], mc[0]["acc_norm"], "{path:?}");
            }
            cells += 1;
        }
    }
    // dense + 5 methods × 2 ratios + wanda-2:4 once, per model, but for one: tiny phi's
    // embeddings are so large a share that MLP channels alone cannot remove 50 % of it.
    assert_eq!(cells, 2 * (1 + 5 * 2 + 1) - 1);
    assert!(String::from_utf8_lossy(&first.stdout).contains("skipped: wanda-sp-mlp cannot remove 50% of phi"));

    let second = run();
    assert!(second.status.success());
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("(23 cached)"), "{stdout}");
    assert!(!stdout.contains("done in"), "nothing recomputed: {stdout}");
}

/// `+kd` and `+recovery` rows: the KD search records its loss in its plan, a recovery row
/// fine-tunes the plan of the row it names (reused from the cache, not searched again), and its
/// perplexity is what export + `disp finetune` + `disp eval` give by hand with the same settings.
#[test]
fn distillation_and_recovery_rows_are_the_commands_they_stand_for() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_with_tokenizer(tmp.path(), "llama_gqa_tied");
    let calib = text(tmp.path(), "calib.txt", 1);
    let heldout = text(tmp.path(), "heldout.txt", 2);
    let task = tmp.path().join("task.jsonl");
    std::fs::write(&task, serde_json::json!({"context": "the river", "choices": [" ran past", " a house"], "gold": 0}).to_string()).unwrap();
    let cache = tmp.path().join("cache");
    let report = tmp.path().join("results.md");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["reproduce-table", "--seq-len", "32", "--steps", "3", "--eval-windows", "2", "--ratios", "0.3"])
        .args(["--tasks", task.to_str().unwrap()])
        .args(["--methods", "disp,disp+kd,disp+recovery,uniform-magnitude+recovery", "--recovery-steps", "2", "--recovery-learning-rate", "0.01"])
        .args(["--models", &format!("llama={}", llama.display())])
        .args(["--calibration", calib.to_str().unwrap()])
        .args(["--heldout", &format!("heldout={}", heldout.display())])
        .args(["--disp", disp_binary().to_str().unwrap()])
        .args(["--cache", cache.to_str().unwrap(), "--out", report.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("the plan of disp (cached)"), "disp+recovery reuses the disp plan: {stdout}");
    let cell = |stem: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(cache.join("llama").join(stem)).unwrap()).unwrap() };
    let (disp, kd, recovered) = (cell("disp-30.json"), cell("disp-kd-30.json"), cell("disp-recovery-30.json"));
    assert_eq!(recovered["achieved_ratio"], disp["achieved_ratio"]);
    assert!(recovered["recovery_seconds"].as_f64().unwrap() > 0.0);
    assert_ne!(recovered["perplexity"]["heldout"], disp["perplexity"]["heldout"], "the recovered folder is what was evaluated");
    let kd_plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cache.join("llama/disp-kd-30.plan.json")).unwrap()).unwrap();
    assert_eq!(kd_plan["search"]["loss"], "kd", "{}", kd_plan["search"]);
    assert!(kd["perplexity"]["heldout"].as_f64().unwrap().is_finite());
    // uniform-magnitude+recovery has no cached plan to reuse: it prunes, then fine-tunes.
    assert!(cache.join("llama/uniform-magnitude-recovery-30.plan.json").is_file());
    assert!(!cache.join("llama/disp-recovery-30.recovered").exists(), "the fine-tuned copy is removed after evaluation");
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("`+recovery`: the pruned folder fine-tuned with LoRA (rank 8"), "{md}");
    assert!(md.contains("\n| disp+recovery | "), "{md}");

    // By hand: export the disp plan, fine-tune it with the settings the cell records, evaluate.
    let run = |args: &[&str]| {
        let out = Command::new(disp_binary()).args(args).output().unwrap();
        assert!(out.status.success(), "disp {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (pruned, tuned) = (tmp.path().join("pruned"), tmp.path().join("tuned"));
    let plan = cache.join("llama/disp-30.plan.json");
    run(&["export", "--model", llama.to_str().unwrap(), "--plan", plan.to_str().unwrap(), "--out", pruned.to_str().unwrap()]);
    let settings = &recovered["settings"];
    let s = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
    let steps = s(&settings["recovery"]["steps"]);
    let (rank, lr, loss) = (s(&settings["recovery"]["rank"]), s(&settings["recovery"]["learning_rate"]), s(&settings["recovery"]["loss"]));
    run(&[
        "finetune",
        "--model",
        pruned.to_str().unwrap(),
        "--teacher",
        llama.to_str().unwrap(),
        "--data",
        calib.to_str().unwrap(),
        "--steps",
        &steps,
        "--rank",
        &rank,
        "--learning-rate",
        &lr,
        "--loss",
        &loss,
        "--seq-len",
        "32",
        "--out",
        tuned.to_str().unwrap(),
    ]);
    let eval = run(&[
        "eval",
        "ppl",
        "--model",
        tuned.to_str().unwrap(),
        "--text",
        heldout.to_str().unwrap(),
        "--seq-len",
        "32",
        "--max-windows",
        "2",
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(recovered["perplexity"]["heldout"], eval["perplexity"]);
}

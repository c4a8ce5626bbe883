//! The families on the shared decoder stack (Qwen2, Qwen3, Mistral) through the `disp` binary:
//! a search, its pruned export, and perplexity of the plan, the export and the dense-equivalent
//! export, which must agree.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The fixture `name` with the fixtures' byte-level tokenizer, in `root/model`.
fn model_with_tokenizer(name: &str, root: &Path) -> PathBuf {
    let dir = root.join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::copy(fixtures().join("byte_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

/// Runs `disp`, asserting success; returns stdout.
fn disp_ok(context: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_disp")).args(args).output().expect("runs");
    assert!(out.status.success(), "{context}: disp {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn qwen2_qwen3_and_mistral_prune_export_and_evaluate() {
    for (name, model_type) in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mistral", "mistral")] {
        let tmp = tempfile::tempdir().unwrap();
        let model = model_with_tokenizer(name, tmp.path());
        let text = tmp.path().join("text.txt");
        let sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
        std::fs::write(&text, sentence.repeat(25)).unwrap();
        let (plan, exported, dense) = (tmp.path().join("plan.json"), tmp.path().join("pruned"), tmp.path().join("dense"));
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let (model_s, text_s, plan_s) = (path(&model), path(&text), path(&plan));
        disp_ok(
            name,
            &[
                "prune",
                "--model",
                &model_s,
                "--ratio",
                "0.2",
                "--ratio-of",
                "blocks",
                "--data",
                &text_s,
                "--steps",
                "3",
                "--seq-len",
                "32",
                "--out",
                &plan_s,
                "--export",
                &path(&exported),
            ],
        );
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
        assert_eq!(json["model"]["model_type"], model_type, "{name}");
        let achieved = json["achieved_ratio"].as_f64().unwrap();
        assert!((achieved - 0.2).abs() <= 0.005, "{name}: removed {achieved} of the blocks, target 0.2");
        disp_ok(name, &["export", "--model", &model_s, "--plan", &plan_s, "--out", &path(&dense), "--format", "dense-equivalent"]);

        let ppl = |args: &[&str]| -> f64 {
            let mut all = vec!["eval", "ppl", "--text", &text_s, "--seq-len", "32", "--json"];
            all.extend_from_slice(args);
            let out = disp_ok(name, &all);
            serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["perplexity"].as_f64().unwrap()
        };
        let in_memory = ppl(&["--model", &model_s, "--plan", &plan_s]);
        assert_eq!(in_memory, ppl(&["--model", &path(&exported)]), "{name}: the pruned export is the same function");
        let via_zeros = ppl(&["--model", &path(&dense)]);
        assert!((via_zeros - in_memory).abs() <= 1e-4 * in_memory, "{name}: dense-equivalent {via_zeros} vs {in_memory}");
        assert_ne!(in_memory, ppl(&["--model", &model_s]), "{name}: the plan changed nothing");
    }
}

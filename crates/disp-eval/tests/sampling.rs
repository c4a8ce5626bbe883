//! Temperature and top-p sampling against the distribution transformers samples from (its
//! temperature and top-p warpers on the same logits, tests/fixtures/make_eval_reference.py).

#[path = "../../disp-models/tests/common/mod.rs"]
mod common;

use burn::tensor::Device;
use common::{fixture, reference};
use disp_eval::{generate, sample_token, GenerateOptions};

struct Setting {
    temperature: f64,
    top_p: f64,
    probs: Vec<f64>,
}

/// The reference row's last-position logits, its ids, and transformers' distributions.
fn reference_distributions() -> (Vec<f32>, Vec<u32>, Vec<Setting>) {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("eval_reference/sampling.json")).unwrap()).unwrap();
    let dir = fixture(json["fixture"].as_str().unwrap());
    let (shape, logits) = reference(&dir, "logits");
    let (seq, vocab) = (shape[1], shape[2]);
    assert_eq!(json["row"], 0);
    assert_eq!(json["position"].as_u64().unwrap() as usize, seq - 1);
    let last = logits[(seq - 1) * vocab..seq * vocab].to_vec();
    let (_, ids) = reference(&dir, "input_ids");
    let prompt = ids[..seq].iter().map(|&v| v as u32).collect();
    let settings = json["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Setting {
            temperature: s["temperature"].as_f64().unwrap(),
            top_p: s["top_p"].as_f64().unwrap(),
            probs: s["probs"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect(),
        })
        .collect();
    (last, prompt, settings)
}

/// Evenly spaced draws u = (k + ½) / N: each token owns an interval of [0, 1) as long as its
/// probability, so it is picked N·p ± 1 times, and never when transformers gives it 0.
#[test]
fn sample_token_follows_transformers_distribution_exactly() {
    let (logits, _, settings) = reference_distributions();
    const DRAWS: usize = 20_000;
    for s in &settings {
        let mut counts = vec![0usize; logits.len()];
        for k in 0..DRAWS {
            counts[sample_token(&logits, s.temperature, s.top_p, (k as f64 + 0.5) / DRAWS as f64) as usize] += 1;
        }
        for (token, (&count, &p)) in counts.iter().zip(&s.probs).enumerate() {
            let expected = p * DRAWS as f64;
            if p == 0.0 {
                assert_eq!(count, 0, "T {} top-p {}: token {token} is outside transformers' nucleus", s.temperature, s.top_p);
            }
            assert!(
                (count as f64 - expected).abs() <= 1.01,
                "T {} top-p {}: token {token} drawn {count} times, expected {expected:.2}",
                s.temperature,
                s.top_p
            );
        }
    }
}

/// `generate` with its seeded generator: one new token per seed, 2,000 seeds, against the same
/// distribution with a 5σ binomial bound per token (fixed seeds: the outcome never changes).
#[test]
fn seeded_generation_samples_the_reference_distribution() {
    let (logits, prompt, settings) = reference_distributions();
    let model = disp_models::load_model(&fixture("llama_mha_untied"), &Device::flex()).unwrap();
    let greedy = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b }) as u32;
    const SEEDS: u64 = 2_000;
    let setting = settings.iter().find(|s| s.temperature == 0.7 && s.top_p == 0.9).unwrap();
    let options = |temperature: f64, seed: u64| GenerateOptions { max_new_tokens: 1, temperature, top_p: setting.top_p, seed, stop_tokens: vec![] };
    let mut counts = vec![0u64; logits.len()];
    for seed in 0..SEEDS {
        let token = generate(model.as_ref(), &prompt, &options(setting.temperature, seed)).unwrap().tokens[0];
        counts[token as usize] += 1;
    }
    let n = SEEDS as f64;
    for (token, (&count, &p)) in counts.iter().zip(&setting.probs).enumerate() {
        if p == 0.0 {
            assert_eq!(count, 0, "token {token} is outside the nucleus");
        }
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!((count as f64 - n * p).abs() <= 5.0 * sigma + 1.0, "token {token}: {count} of {SEEDS}, p {p:.4}");
    }
    assert!(counts.iter().filter(|&&c| c > 0).count() > 20, "spread over the nucleus: {counts:?}");
    // Temperature 0 is greedy whatever the seed.
    for seed in [0, 1, 99] {
        assert_eq!(generate(model.as_ref(), &prompt, &options(0.0, seed)).unwrap().tokens, [greedy]);
    }
}

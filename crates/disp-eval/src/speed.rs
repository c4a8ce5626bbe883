//! Inference speed the way users feel it: prefill (one forward pass over a prompt, filling the KV
//! cache) and decode (one token at a time against the cache), as tokens per second. Models are
//! measured in interleaved repetitions, so a disturbance (another process, frequency changes)
//! hits all of them alike, and reported as medians.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::{Int, Tensor, TensorData};
use disp_models::CausalLm;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpeedSettings {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Timed repetitions per model (after one untimed warm-up).
    pub repetitions: usize,
}

/// Timings of one model.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedReport {
    pub label: String,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Every repetition, in seconds.
    pub prefill_seconds: Vec<f64>,
    pub decode_seconds: Vec<f64>,
}

/// Median of a non-empty sample.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

/// Deterministic token ids spread over the vocabulary (the speed does not depend on them).
fn prompt_ids(count: usize, vocab: usize) -> Vec<i64> {
    (0..count as u64).map(|i| ((i.wrapping_mul(2_654_435_761) + 17) % vocab as u64) as i64).collect()
}

/// One prefill + decode run; returns (prefill seconds, decode seconds).
fn run_once(model: &dyn CausalLm, settings: &SpeedSettings) -> (f64, f64) {
    let device = model.device();
    let vocab = model.vocab_size();
    let mut cache = model.new_cache();
    let ids = prompt_ids(settings.prompt_tokens, vocab);
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, settings.prompt_tokens]), device);
    let start = Instant::now();
    // Reading the logits back waits for the computation, as a real caller would.
    let mut next = argmax(model.forward_last(input, Some(&mut cache)));
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..settings.decode_tokens {
        let input = Tensor::<2, Int>::from_data(TensorData::new(vec![next as i64], [1, 1]), device);
        next = argmax(model.forward_last(input, Some(&mut cache)));
    }
    (prefill, start.elapsed().as_secs_f64())
}

fn argmax(logits: Tensor<2>) -> u32 {
    let values = logits.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits");
    crate::generate::greedy(&values)
}

/// Measures each model `settings.repetitions` times, interleaved.
pub fn measure_speed(models: &[(&str, &dyn CausalLm)], settings: &SpeedSettings) -> Result<Vec<SpeedReport>> {
    if settings.repetitions == 0 || settings.prompt_tokens == 0 {
        bail!("repetitions and prompt tokens must be at least 1");
    }
    for (label, model) in models {
        if settings.prompt_tokens + settings.decode_tokens > model.max_positions() {
            bail!("{label}: prompt plus decode tokens exceed the model's {} positions", model.max_positions());
        }
        run_once(*model, settings); // warm-up: allocator, thread pool, kernel selection
    }
    let mut samples = vec![(Vec::new(), Vec::new()); models.len()];
    for _ in 0..settings.repetitions {
        for ((_, model), (prefill, decode)) in models.iter().zip(samples.iter_mut()) {
            let (p, d) = run_once(*model, settings);
            prefill.push(p);
            decode.push(d);
        }
    }
    Ok(models
        .iter()
        .zip(samples)
        .map(|((label, _), (prefill, decode))| SpeedReport {
            label: label.to_string(),
            prefill_tokens_per_second: settings.prompt_tokens as f64 / median(&prefill),
            decode_tokens_per_second: if settings.decode_tokens == 0 { 0.0 } else { settings.decode_tokens as f64 / median(&decode) },
            prefill_seconds: prefill,
            decode_seconds: decode,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn prompt_ids_stay_in_the_vocabulary() {
        let ids = prompt_ids(1000, 37);
        assert!(ids.iter().all(|&i| (0..37).contains(&i)));
        assert!(ids.iter().collect::<std::collections::HashSet<_>>().len() > 30, "spread over the vocabulary");
    }
}

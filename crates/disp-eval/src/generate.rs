//! Autoregressive generation with a KV cache: greedy at temperature 0, otherwise temperature and
//! nucleus (top-p) sampling from a seeded generator.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use disp_io::rng::SplitMix64;
use disp_models::CausalLm;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these ids.
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// The greedy choice: the id of the largest logit (the first one on ties).
pub(crate) fn greedy(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

/// Picks the next token from last-position logits.
fn pick(logits: Vec<f32>, opts: &GenerateOptions, rng: &mut SplitMix64) -> u32 {
    if opts.temperature <= 0.0 {
        return greedy(&logits);
    }
    sample_token(&logits, opts.temperature, opts.top_p, rng.unit())
}

/// The token that `uniform` (in [0, 1)) selects from the softmax of `logits / temperature`
/// truncated to its nucleus, the smallest set of most likely tokens whose mass reaches `top_p`
/// (transformers' temperature then top-p warpers); `temperature` must be positive.
pub fn sample_token(logits: &[f32], temperature: f64, top_p: f64, uniform: f64) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &v)| (i, ((v as f64 - max) / temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Smallest prefix whose mass reaches top_p.
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        mass += p.1;
        if mass >= top_p {
            keep = i + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let norm: f64 = kept.iter().map(|p| p.1).sum();
    let mut draw = uniform * norm;
    for &(i, p) in kept {
        draw -= p;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    kept.last().map(|p| p.0 as u32).unwrap_or(0)
}

/// Continues `prompt` by up to `max_new_tokens` tokens.
pub fn generate(model: &dyn CausalLm, prompt: &[u32], opts: &GenerateOptions) -> anyhow::Result<Generation> {
    if prompt.is_empty() {
        anyhow::bail!("empty prompt");
    }
    if prompt.len() + opts.max_new_tokens > model.max_positions() {
        anyhow::bail!("prompt plus max-tokens exceeds the model's {} positions", model.max_positions());
    }
    let device = model.device();
    let mut cache = model.new_cache();
    let mut rng = SplitMix64::new(opts.seed);
    let vocab = model.vocab_size();
    let last_logits =
        |logits: Tensor<2>| -> Vec<f32> { logits.reshape([vocab]).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits") };
    let start = Instant::now();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), device);
    let mut next = pick(last_logits(model.forward_last(input, Some(&mut cache))), opts, &mut rng);
    let prefill_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut tokens = Vec::new();
    loop {
        tokens.push(next);
        if tokens.len() >= opts.max_new_tokens || opts.stop_tokens.contains(&next) {
            break;
        }
        let input = Tensor::<2, Int>::from_data(TensorData::new(vec![next as i64], [1, 1]), device);
        next = pick(last_logits(model.forward_last(input, Some(&mut cache))), opts, &mut rng);
    }
    Ok(Generation { tokens, prefill_seconds, decode_seconds: start.elapsed().as_secs_f64() })
}

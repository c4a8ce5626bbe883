//! Timing of one hypernetwork step (forward through the masked model, backward to the gates and
//! the hypernetwork, AdamW update) on random token windows, for `cargo bench -p disp-train`.

use anyhow::Result;
use disp_core::params::RatioOf;
use disp_models::CausalLm;
use serde::Serialize;

use crate::rng::Purpose;
use crate::search::{Searcher, StepTimes};
use crate::SearchConfig;

/// Medians over the timed steps (the first, warm-up step is not counted).
#[derive(Debug, Clone, Serialize)]
pub struct StepTimingReport {
    pub seq_len: usize,
    pub batch_size: usize,
    /// Timed steps.
    pub steps: usize,
    pub median: StepTimes,
    pub min_total: f64,
    pub max_total: f64,
    /// Every timed step's total, in order.
    pub totals: Vec<f64>,
}

/// Times `steps` hypernetwork steps (after one warm-up step) of batch 1 and `seq_len` random
/// tokens on `model`.
pub fn time_search_steps(model: &dyn CausalLm, seq_len: usize, steps: usize, seed: u64) -> Result<StepTimingReport> {
    anyhow::ensure!(steps >= 1, "benchmark needs at least one timed step");
    let mut rng = crate::rng::stream(seed, Purpose::Bench, 0);
    let vocab = model.vocab_size();
    let windows: Vec<Vec<u32>> = (0..=steps).map(|_| (0..seq_len).map(|_| rng.below(vocab) as u32).collect()).collect();
    let cfg = SearchConfig {
        target_ratio: 0.3,
        ratio_of: RatioOf::Blocks,
        steps: steps + 1,
        seed,
        batch_size: 1,
        checkpoint: None,
        ..SearchConfig::default()
    };
    let mut searcher = Searcher::new(model, &windows, &cfg)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..=steps {
        let (report, t) = searcher.step_timed()?;
        tracing::info!(
            step = i,
            total = t.total,
            forward = t.forward,
            backward = t.backward,
            optimizer = t.optimizer,
            lm_loss = report.lm_loss,
            "bench step"
        );
        if i > 0 {
            times.push(t);
        }
    }
    let median = |f: fn(&StepTimes) -> f64| {
        let mut v: Vec<f64> = times.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let totals: Vec<f64> = times.iter().map(|t| t.total).collect();
    Ok(StepTimingReport {
        seq_len,
        batch_size: 1,
        steps,
        median: StepTimes {
            forward: median(|t| t.forward),
            backward: median(|t| t.backward),
            optimizer: median(|t| t.optimizer),
            total: median(|t| t.total),
        },
        min_total: totals.iter().copied().fold(f64::INFINITY, f64::min),
        max_total: totals.iter().copied().fold(0.0, f64::max),
        totals,
    })
}

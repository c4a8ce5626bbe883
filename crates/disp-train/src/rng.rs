//! The per-purpose streams of the project's generator (`disp_io::rng::SplitMix64`) the search
//! draws from.
//!
//! Every random quantity of the search is a pure function of the seed, a purpose tag and an
//! index (the step, the epoch), so a run resumed from a checkpoint draws exactly what the
//! uninterrupted run would have drawn, without having to store generator state.

pub use disp_io::rng::{mix64, SplitMix64};

/// What a stream is used for; part of its seed so that streams never overlap by accident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// The hypernetwork's fixed inputs.
    Inputs = 1,
    /// The hypernetwork's initial weights.
    Init = 2,
    /// The order of the calibration windows in one epoch.
    Shuffle = 3,
    /// The logistic (Gumbel-difference) noise of one step.
    Noise = 4,
    /// Anything a benchmark needs (random token windows).
    Bench = 5,
    /// The initial weights of a model trained from scratch (`pretrain`), one stream per tensor.
    PretrainInit = 6,
    /// The order of the training windows in one epoch of `pretrain`.
    PretrainShuffle = 7,
    /// The initial `A` factor of one LoRA adapter (one stream per adapter).
    LoraInit = 8,
    /// The order of the training windows in one epoch of recovery fine-tuning.
    FinetuneShuffle = 9,
}

/// Batches that walk through `count` windows in a seeded random order, reshuffled every epoch:
/// the same step always gets the same windows, so runs are reproducible and resumable.
#[derive(Debug, Clone)]
pub struct ShuffledBatches {
    count: usize,
    seed: u64,
    purpose: Purpose,
    /// The epoch `order` belongs to.
    epoch: Option<usize>,
    order: Vec<usize>,
}

impl ShuffledBatches {
    pub fn new(count: usize, seed: u64, purpose: Purpose) -> Self {
        Self { count, seed, purpose, epoch: None, order: Vec::new() }
    }

    /// The window indices of (1-based) step `step`.
    pub fn batch(&mut self, step: usize, batch_size: usize) -> Vec<usize> {
        (0..batch_size)
            .map(|j| {
                let k = (step - 1) * batch_size + j;
                let epoch = k / self.count;
                if self.epoch != Some(epoch) {
                    self.order = (0..self.count).collect();
                    stream(self.seed, self.purpose, epoch as u64).shuffle(&mut self.order);
                    self.epoch = Some(epoch);
                }
                self.order[k % self.count]
            })
            .collect()
    }
}

/// The stream for `purpose` and `index` (a step or an epoch) under `seed`.
pub fn stream(seed: u64, purpose: Purpose, index: u64) -> SplitMix64 {
    SplitMix64::new(mix64(seed ^ mix64((purpose as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix64(index))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| stream(7, Purpose::Noise, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let b = stream(7, Purpose::Noise, 4).next_u64();
        let c = stream(7, Purpose::Shuffle, 3).next_u64();
        let d = stream(8, Purpose::Noise, 3).next_u64();
        assert!(a[0] != b && a[0] != c && a[0] != d && b != c);
    }
}

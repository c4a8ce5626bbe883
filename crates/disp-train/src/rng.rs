//! A tiny deterministic random number generator (SplitMix64) and the per-purpose streams the
//! search draws from.
//!
//! Every random quantity of the search is a pure function of the seed, a purpose tag and an
//! index (the step, the epoch), so a run resumed from a checkpoint draws exactly what the
//! uninterrupted run would have drawn, without having to store generator state.

/// SplitMix64 (Steele, Lea and Flood 2014): 64 bits of state, passes BigCrush, trivially
/// seekable by re-seeding.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

/// The SplitMix64 output function, also used to derive independent seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

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
                    SplitMix64::stream(self.seed, self.purpose, epoch as u64).shuffle(&mut self.order);
                    self.epoch = Some(epoch);
                }
                self.order[k % self.count]
            })
            .collect()
    }
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The stream for `purpose` and `index` (a step or an epoch) under `seed`.
    pub fn stream(seed: u64, purpose: Purpose, index: u64) -> Self {
        Self::new(mix64(seed ^ mix64((purpose as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix64(index))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in the open interval (0, 1): never exactly 0 or 1, so logs stay finite.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [-bound, bound).
    pub fn symmetric(&mut self, bound: f64) -> f64 {
        (2.0 * self.uniform() - 1.0) * bound
    }

    /// Standard normal (Box–Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Logistic noise log(u) − log(1 − u): the difference of two Gumbel samples, which is what
    /// a Gumbel-sigmoid adds to a logit.
    pub fn logistic(&mut self) -> f64 {
        let u = self.uniform();
        u.ln() - (1.0 - u).ln()
    }

    /// Uniform integer in [0, n) (Lemire's multiply-shift; the bias is below 2⁻³² for the n
    /// used here).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| SplitMix64::stream(7, Purpose::Noise, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let b = SplitMix64::stream(7, Purpose::Noise, 4).next_u64();
        let c = SplitMix64::stream(7, Purpose::Shuffle, 3).next_u64();
        let d = SplitMix64::stream(8, Purpose::Noise, 3).next_u64();
        assert!(a[0] != b && a[0] != c && a[0] != d && b != c);
    }

    #[test]
    fn uniform_is_open_and_moments_are_right() {
        let mut r = SplitMix64::new(1);
        let n = 200_000;
        let (mut sum, mut sq, mut logistic) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            let u = r.uniform();
            assert!(u > 0.0 && u < 1.0);
            let z = r.normal();
            sum += z;
            sq += z * z;
            logistic += r.logistic();
        }
        let n = n as f64;
        assert!((sum / n).abs() < 0.01, "normal mean {}", sum / n);
        assert!((sq / n - 1.0).abs() < 0.02, "normal variance {}", sq / n);
        assert!((logistic / n).abs() < 0.03, "logistic mean {}", logistic / n);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..100).collect();
        SplitMix64::new(3).shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}

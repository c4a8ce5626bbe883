//! bf16 matrix products for the opt-in `--compute bf16` inference path on the CPU.
//!
//! f32 gemm on a 2-core Zen 4 tops out at ≈ 194 GFLOP/s (its 512-bit FMAs run as two 256-bit
//! halves), and the host forward already runs at ≈ 90 % of that. AVX512_BF16's `vdpbf16ps`
//! multiplies pairs of bf16 values and adds both products to an f32 lane: twice the products per
//! instruction, at half the bytes per weight. A linear's weight is packed once into panels of 16
//! output columns, each holding, per pair of inputs (2k, 2k+1), the 16 columns' two weights side
//! by side in one 32-bit word, so one 64-byte load feeds one instruction; the activations are
//! rounded to bf16 once per product (round to nearest even) and each of their pairs is broadcast.
//! Accumulation is f32 throughout, as in PyTorch's bf16 linears on the CPU.
//!
//! [`PackedBf16::product`] runs on every x86-64 and aarch64 machine: the `vdpbf16ps` kernel where
//! the CPU has AVX512_BF16 ([`fast_kernel_available`]), else a portable loop with the same
//! roundings (slow; the CLI refuses `--compute bf16` there rather than be slower than f32).

use std::ops::Range;

use rayon::prelude::*;

/// Output columns per panel: one 512-bit register of f32 results.
const PANEL: usize = 16;
/// Rows of one register tile.
const TILE_ROWS: usize = 6;
/// Panels of one register tile: 6 × 4 accumulators, 4 weight registers and the broadcast fill
/// 29 of the 32 registers.
const TILE_PANELS: usize = 4;
/// Rows per task of a many-row product: a task reuses one tile's weight panels (in L2) across
/// them.
const TASK_ROWS: usize = 16 * TILE_ROWS;

/// Whether this CPU runs the `vdpbf16ps` kernel.
pub fn fast_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Two bf16 values in one word, `lo` in the low half (the order `vdpbf16ps` pairs them in).
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(half::bf16::from_f32(lo).to_bits()) | (u32::from(half::bf16::from_f32(hi).to_bits()) << 16)
}

/// The two bf16 values of a word, as f32.
fn unpair(word: u32) -> (f32, f32) {
    (f32::from_bits(word << 16), f32::from_bits(word & 0xffff_0000))
}

/// A linear's weight `[inputs, outputs]` rounded to bf16 and packed in panels of 16 columns.
#[derive(Debug)]
pub struct PackedBf16 {
    inputs: usize,
    outputs: usize,
    /// `ceil(inputs / 2)`: an odd last input is paired with a zero.
    pairs: usize,
    /// Word `[panel][pair][column]` holds weights (2·pair, panel·16 + column) and (2·pair + 1, …);
    /// columns past `outputs` and the odd input's partner are zeros.
    words: Vec<u32>,
}

impl PackedBf16 {
    /// Packs `w` given as (values, row stride, column stride) of an `[inputs, outputs]` matrix.
    pub fn pack(inputs: usize, outputs: usize, w: (&[f32], usize, usize)) -> Self {
        let (values, row, col) = w;
        let pairs = inputs.div_ceil(2);
        let panels = outputs.div_ceil(PANEL);
        let at = |k: usize, n: usize| if k < inputs && n < outputs { values[k * row + n * col] } else { 0.0 };
        let mut words = vec![0u32; panels * pairs * PANEL];
        words.par_chunks_mut(pairs * PANEL).enumerate().for_each(|(panel, block)| {
            for (p, words) in block.chunks_exact_mut(PANEL).enumerate() {
                for (c, word) in words.iter_mut().enumerate() {
                    let n = panel * PANEL + c;
                    *word = pair(at(2 * p, n), at(2 * p + 1, n));
                }
            }
        });
        Self { inputs, outputs, pairs, words }
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The bytes [`Self::pack`] holds for a weight `[inputs, outputs]`.
    pub fn bytes_for(inputs: usize, outputs: usize) -> usize {
        outputs.next_multiple_of(PANEL) * inputs.div_ceil(2) * 4
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }

    /// `x·W` `[rows, outputs]` of activations rounded by [`Bf16Rows::of`], on the rayon pool.
    pub fn product(&self, x: &Bf16Rows) -> Vec<f32> {
        let (rows, outputs) = (x.rows, self.outputs);
        let mut out = vec![0f32; rows * outputs];
        if rows == 0 || outputs == 0 {
            return out;
        }
        let threads = rayon::current_num_threads();
        // A few rows (decoding) read every weight once per product: the panels are split evenly
        // across the threads. Many rows: tasks of TASK_ROWS rows × one tile of columns,
        // tile-major, so that a thread's run of tasks reuses one tile's weights from its cache.
        let (columns_per_task, rows_per_task) =
            if rows <= TILE_ROWS { (outputs.div_ceil(PANEL).div_ceil(threads) * PANEL, rows) } else { (PANEL * TILE_PANELS, TASK_ROWS) };
        let row_tasks = rows.div_ceil(rows_per_task);
        let dst = SharedOut(out.as_mut_ptr());
        (0..outputs.div_ceil(columns_per_task) * row_tasks).into_par_iter().for_each(|task| {
            let (first_column, first_row) = ((task / row_tasks) * columns_per_task, (task % row_tasks) * rows_per_task);
            let (columns, n_rows) = (columns_per_task.min(outputs - first_column), rows_per_task.min(rows - first_row));
            // SAFETY: tasks write disjoint (row range × column range) blocks of `out`, which
            // outlives the loop; `product_block` writes only inside its block.
            unsafe { self.product_block(x, first_row, n_rows, first_column, columns, dst.at(first_row * outputs + first_column), outputs) };
        });
        out
    }

    /// `dst[r, c] = Σ_k x[rows.start + r, k] · W[k, columns.start + c]` over the block `rows` ×
    /// `columns`, `dst` row-major with row stride `dst_row`, on the calling thread (for tasks of a
    /// parallel loop). `columns.start` must be a multiple of 16 (a panel's first column).
    pub fn product_into(&self, x: &Bf16Rows, rows: Range<usize>, columns: Range<usize>, dst: &mut [f32], dst_row: usize) {
        let (first_row, first_column) = (rows.start, columns.start);
        let (rows, columns) = (rows.len(), columns.len());
        if rows == 0 || columns == 0 {
            return;
        }
        assert!(dst.len() >= (rows - 1) * dst_row + columns && columns <= dst_row && first_column.is_multiple_of(PANEL));
        // SAFETY: the assert bounds every element the block writes.
        unsafe { self.product_block(x, first_row, rows, first_column, columns, dst.as_mut_ptr(), dst_row) }
    }

    /// # Safety
    /// `dst` must be valid for writes of `rows` rows of `columns` values at stride `dst_row`, and
    /// no other thread may touch them meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product_block(&self, x: &Bf16Rows, first_row: usize, rows: usize, first_column: usize, columns: usize, dst: *mut f32, dst_row: usize) {
        assert!(x.pairs == self.pairs && first_row + rows <= x.rows && first_column.is_multiple_of(PANEL) && first_column + columns <= self.outputs);
        for tile_column in (0..columns).step_by(PANEL * TILE_PANELS) {
            let n = (PANEL * TILE_PANELS).min(columns - tile_column);
            let panel = (first_column + tile_column) / PANEL;
            let weights = &self.words[panel * self.pairs * PANEL..];
            for tile_row in (0..rows).step_by(TILE_ROWS) {
                let m = TILE_ROWS.min(rows - tile_row);
                let a = &x.words[(first_row + tile_row) * x.pairs..];
                // SAFETY: (tile_row, tile_column) + (m, n) lies inside the caller's block.
                let c = unsafe { dst.add(tile_row * dst_row + tile_column) };
                unsafe { tile(a, x.pairs, weights, self.pairs * PANEL, self.pairs, m, n, c, dst_row) };
            }
        }
    }
}

/// The activations of a product rounded to bf16, two per word (row-major `[rows, pairs]`).
pub struct Bf16Rows {
    rows: usize,
    pairs: usize,
    words: Vec<u32>,
}

impl Bf16Rows {
    /// `x` row-major `[rows, inputs]`, each value rounded to the nearest bf16 (ties to even).
    pub fn of(x: &[f32], rows: usize, inputs: usize) -> Self {
        assert_eq!(x.len(), rows * inputs);
        let pairs = inputs.div_ceil(2);
        let mut words = vec![0u32; rows * pairs];
        if inputs > 0 {
            words.par_chunks_mut(pairs).zip(x.par_chunks(inputs)).for_each(|(words, row)| round_row(row, words));
        }
        Self { rows, pairs, words }
    }
}

fn round_row(row: &[f32], words: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if fast_kernel_available() {
        // SAFETY: the CPU has AVX512_BF16 (checked).
        return unsafe { x86::round_row(row, words) };
    }
    for (p, word) in words.iter_mut().enumerate() {
        *word = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

/// `out` as a pointer the tasks of one product share (each writes its own block).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: see `PackedBf16::product`: the blocks the tasks write are disjoint.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the product's `out`.
        unsafe { self.0.add(offset) }
    }
}

/// One register tile: `c[m, n] = a[m rows] · w[panels]` over all pairs; `m ≤ 6`, `n ≤ 64`.
///
/// # Safety
/// `c` must be valid for `m` rows of `n` values at stride `c_row`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(a: &[u32], a_row: usize, w: &[u32], w_panel: usize, pairs: usize, m: usize, n: usize, c: *mut f32, c_row: usize) {
    assert!(a.len() >= (m - 1) * a_row + pairs && w.len() >= (n.div_ceil(PANEL) - 1) * w_panel + pairs * PANEL);
    #[cfg(target_arch = "x86_64")]
    if fast_kernel_available() {
        // SAFETY: the CPU has the instructions; the assert bounds the reads, the caller the writes.
        return unsafe { x86::tile_dispatch(a.as_ptr(), a_row, w.as_ptr(), w_panel, pairs, m, n, c, c_row) };
    }
    for r in 0..m {
        for col in 0..n {
            let (panel, lane) = (col / PANEL, col % PANEL);
            let mut sum = 0f32;
            for p in 0..pairs {
                let (x0, x1) = unpair(a[r * a_row + p]);
                let (w0, w1) = unpair(w[panel * w_panel + p * PANEL + lane]);
                sum += x0 * w0 + x1 * w1;
            }
            // SAFETY: (r, col) is inside the tile the caller vouches for.
            unsafe { *c.add(r * c_row + col) = sum };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PANEL, TILE_ROWS};

    /// Rounds `row` to bf16 pairs, 32 values per instruction (ties to even, like `half`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], words: &mut [u32]) {
        let full = row.len() / 32;
        for i in 0..full {
            // SAFETY: 32 values from 32·i and 16 words from 16·i are in bounds (full ≤ len/32).
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(row.as_ptr().add(32 * i + 16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(words.as_mut_ptr().add(16 * i) as *mut _, packed);
            }
        }
        for (p, word) in words.iter_mut().enumerate().skip(16 * full) {
            *word = super::pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
        }
    }

    /// Calls the tile kernel for `m` rows and `ceil(n / 16)` panels.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile_dispatch(
        a: *const u32,
        a_row: usize,
        w: *const u32,
        w_panel: usize,
        pairs: usize,
        m: usize,
        n: usize,
        c: *mut f32,
        c_row: usize,
    ) {
        macro_rules! rows {
            ($p:literal) => {
                match m {
                    1 => unsafe { tile::<1, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                    2 => unsafe { tile::<2, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                    3 => unsafe { tile::<3, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                    4 => unsafe { tile::<4, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                    5 => unsafe { tile::<5, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                    _ => unsafe { tile::<TILE_ROWS, $p>(a, a_row, w, w_panel, pairs, n, c, c_row) },
                }
            };
        }
        // The widest arm is TILE_PANELS (4) panels.
        match n.div_ceil(PANEL) {
            1 => rows!(1),
            2 => rows!(2),
            3 => rows!(3),
            _ => rows!(4),
        }
    }

    /// `R` rows × `P` panels of accumulators in registers over every pair of inputs; the last
    /// panel stores only the columns below `n`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize, const P: usize>(
        a: *const u32,
        a_row: usize,
        w: *const u32,
        w_panel: usize,
        pairs: usize,
        n: usize,
        c: *mut f32,
        c_row: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for p in 0..pairs {
            // SAFETY (this loop): the caller's assert bounds pair p of R rows and P panels.
            let mut b = [_mm512_setzero_si512(); P];
            for (j, b) in b.iter_mut().enumerate() {
                *b = unsafe { _mm512_loadu_si512(w.add(j * w_panel + p * PANEL) as *const _) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(unsafe { *a.add(r * a_row + p) } as i32);
                for (acc, b) in acc.iter_mut().zip(&b) {
                    // SAFETY: same-size reinterpretations of 512-bit registers.
                    *acc =
                        unsafe { _mm512_dpbf16_ps(*acc, std::mem::transmute::<__m512i, __m512bh>(x), std::mem::transmute::<__m512i, __m512bh>(*b)) };
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                let valid = n.saturating_sub(j * PANEL).min(PANEL);
                if valid > 0 {
                    let mask: __mmask16 = if valid == PANEL { 0xffff } else { (1u16 << valid) - 1 };
                    // SAFETY: the caller vouches for m rows of n values from c.
                    unsafe { _mm512_mask_storeu_ps(c.add(r * c_row + j * PANEL), mask, *acc) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    /// Products of bf16-rounded values summed in f64: what the kernels compute up to the order
    /// of f32 additions.
    fn reference(x: &[f32], rows: usize, w: &[f32], inputs: usize, outputs: usize) -> Vec<f64> {
        (0..rows * outputs)
            .map(|i| {
                let (r, n) = (i / outputs, i % outputs);
                (0..inputs).map(|k| bf16(x[r * inputs + k]) * bf16(w[k * outputs + n])).sum()
            })
            .collect()
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 17.0).collect()
    }

    /// Odd inputs (an unpaired last one), outputs that end inside a panel and a tile, row counts
    /// of one (decoding), of a partial tile and of several tasks, on one and on three threads:
    /// every product equals the bf16 reference within f32 rounding.
    #[test]
    fn bf16_products_equal_the_rounded_reference_for_ragged_shapes() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool");
        for &(rows, inputs, outputs) in &[(1, 7, 5), (1, 130, 200), (5, 33, 70), (7, 64, 64), (200, 97, 131), (13, 2, 1)] {
            let x = values(rows * inputs, 1);
            let w = values(inputs * outputs, 2);
            let packed = PackedBf16::pack(inputs, outputs, (&w, outputs, 1));
            let expected = reference(&x, rows, &w, inputs, outputs);
            let magnitude = |i: usize| {
                let (r, n) = (i / outputs, i % outputs);
                (0..inputs).map(|k| (bf16(x[r * inputs + k]) * bf16(w[k * outputs + n])).abs()).sum::<f64>()
            };
            let rounded = Bf16Rows::of(&x, rows, inputs);
            for got in [packed.product(&rounded), pool.install(|| packed.product(&rounded))] {
                assert_eq!(got.len(), rows * outputs);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!((*g as f64 - e).abs() <= 1e-5 * magnitude(i) + 1e-6, "({rows}, {inputs}, {outputs}) at {i}: {g} vs {e}");
                }
            }
        }
    }

    /// A transposed weight (strides 1, inputs) packs to the same words as its row-major copy, and
    /// a block of rows and columns written into a wider buffer equals that part of the product.
    #[test]
    fn transposed_packing_and_blocks_into_a_wider_buffer_agree_with_the_whole_product() {
        let (rows, inputs, outputs) = (9, 40, 100);
        let w = values(inputs * outputs, 3);
        let transposed: Vec<f32> = (0..outputs * inputs).map(|i| w[(i % inputs) * outputs + i / inputs]).collect();
        let a = PackedBf16::pack(inputs, outputs, (&w, outputs, 1));
        let b = PackedBf16::pack(inputs, outputs, (&transposed, 1, inputs));
        assert_eq!(a.words, b.words);
        let x = values(rows * inputs, 4);
        let rounded = Bf16Rows::of(&x, rows, inputs);
        let whole = a.product(&rounded);
        let (first_row, n_rows, first_column, columns) = (2, 5, 32, 60);
        let mut block = vec![f32::NAN; n_rows * 70];
        a.product_into(&rounded, first_row..first_row + n_rows, first_column..first_column + columns, &mut block, 70);
        for r in 0..n_rows {
            for c in 0..columns {
                assert_eq!(block[r * 70 + c], whole[(first_row + r) * outputs + first_column + c], "row {r} column {c}");
            }
            assert!(block[r * 70 + columns..r * 70 + 70].iter().all(|v| v.is_nan()), "nothing written past the block");
        }
    }

    /// The activations' rounding (32 at a time where AVX512_BF16 runs it) gives `half`'s bits,
    /// ties to even included (subnormals aside: the instruction flushes them to zero).
    #[test]
    fn activations_round_to_nearest_even_like_half() {
        let mut x: Vec<f32> = values(75, 5);
        x.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -0.0, f32::MAX]);
        let rows = Bf16Rows::of(&x, 1, x.len());
        for (p, word) in rows.words.iter().enumerate() {
            let (lo, hi) = unpair(*word);
            assert_eq!(lo.to_bits(), half::bf16::from_f32(x[2 * p]).to_f32().to_bits(), "value {}", 2 * p);
            let partner = x.get(2 * p + 1).map_or(0.0, |&v| half::bf16::from_f32(v).to_f32());
            assert_eq!(hi.to_bits(), partner.to_bits(), "value {}", 2 * p + 1);
        }
    }
}

//! f32 matrix products on Intel AMX at f32 accuracy ("bf16×3"), as a measurement.
//!
//! AMX multiplies bf16 tiles into f32 accumulators (one 16×16×32 tile product per 16 cycles, 3.1–3.7
//! TFLOP/s per core of this VM with no loads), but a bf16 holds only 8 significant bits. Each f32
//! operand is split into three bf16 terms, x = x₀ + x₁ + x₂ (each the round-to-nearest bf16 of
//! what the previous ones left, 24 or more significant bits together), and a product sums the
//! six cross terms down to order 2⁻¹⁶ relative (a₀b₀, a₀b₁, a₁b₀, a₀b₂, a₁b₁, a₂b₀); the three
//! dropped ones are below 2⁻²⁴, the rounding of the f32 sum itself. On paper six tile products
//! per 32-deep step still beat the f32 FMAs they replace ≈ 2.5×; `main` measures whether they do
//! once the tiles are loaded from cache and the operands packed.
//!
//! Operands are packed into tiles of 16 rows × 32 bf16 (lhs, per call) and the VNNI pair layout
//! (rhs, per call or once: [`PackedRhs`]), zero-padded to whole tiles. Each output block of
//! 32 × 32 lives in four accumulator tiles; two lhs and two rhs tiles are loaded per term (the
//! eight tile registers). Every output element sums its terms in the same order whatever the
//! number of threads.

use rayon::prelude::*;
use std::sync::OnceLock;

/// bf16 values per tile row (64 bytes), and the k depth of one tile product.
const DEPTH: usize = 32;
/// Rows of a tile (lhs rows, rhs k-pairs, output rows).
const TILE_ROWS: usize = 16;
/// Output columns of a tile (16 f32 = 64 bytes).
const TILE_COLS: usize = 16;
/// bf16 values of one tile.
const TILE_LEN: usize = TILE_ROWS * DEPTH;
/// The bf16 terms each f32 is split into.
const TERMS: usize = 3;
/// Rows (columns) of the output block one kernel call computes: two tiles each way.
const BLOCK: usize = 2 * TILE_ROWS;

/// Whether this process may run AMX tile products (CPU support and, on Linux, the kernel's
/// permission for the tile state, which is requested on the first call).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks for a permission; it touches no memory.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Round-to-nearest-even bf16 of `x` (as its 16 bits); NaN stays a quiet NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` as three bf16 terms, largest first.
#[inline(always)]
fn split(x: f32) -> [u16; TERMS] {
    let first = to_bf16(x);
    let rest = x - from_bf16(first);
    let second = to_bf16(rest);
    let third = to_bf16(rest - from_bf16(second));
    [first, second, third]
}

/// A matrix operand: element (r, c) at `values[r·row + c·col]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub values: &'a [f32],
    pub row: usize,
    pub col: usize,
}

/// Packed operand tiles: per 16-row (lhs) or 16-column (rhs) block, per 32-deep step of k, the
/// three terms' tiles, blocks padded to an even count (the kernel takes them in pairs).
struct Tiles {
    values: Vec<u16>,
    steps: usize,
}

impl Tiles {
    /// `blocks` blocks for a depth of `k`, each filled by `pack(block index, its tiles)`.
    fn new(blocks: usize, k: usize, parallel: bool, pack: impl Fn((usize, &mut [u16])) + Sync) -> Self {
        let steps = k.div_ceil(DEPTH);
        let per_block = steps * TERMS * TILE_LEN;
        let mut values = vec![0u16; blocks.div_ceil(2) * 2 * per_block];
        if per_block > 0 {
            if parallel {
                values.par_chunks_mut(per_block).enumerate().for_each(&pack);
            } else {
                values.chunks_mut(per_block).enumerate().for_each(pack);
            }
        }
        Self { values, steps }
    }

    fn block(&self, index: usize) -> &[u16] {
        let per_block = self.steps * TERMS * TILE_LEN;
        &self.values[index * per_block..][..per_block]
    }
}

/// The right-hand operand `[k, n]` packed once, in the VNNI layout (tile row `p` holds k = 2p,
/// 2p+1 interleaved per column).
pub struct PackedRhs {
    tiles: Tiles,
    k: usize,
    n: usize,
}

impl PackedRhs {
    pub fn new(k: usize, n: usize, rhs: Strided, parallel: bool) -> Self {
        let tiles = Tiles::new(n.div_ceil(TILE_COLS), k, parallel, |(block, tiles)| {
            let first_column = block * TILE_COLS;
            for (step, step_tiles) in tiles.chunks_mut(TERMS * TILE_LEN).enumerate() {
                for depth in 0..DEPTH.min(k - step * DEPTH) {
                    let kk = step * DEPTH + depth;
                    let (pair, half) = (depth / 2, depth % 2);
                    for c in 0..TILE_COLS.min(n.saturating_sub(first_column)) {
                        let terms = split(rhs.values[kk * rhs.row + (first_column + c) * rhs.col]);
                        for (term, &value) in terms.iter().enumerate() {
                            step_tiles[term * TILE_LEN + pair * DEPTH + c * 2 + half] = value;
                        }
                    }
                }
            }
        });
        Self { tiles, k, n }
    }
}

/// The left-hand operand `[m, k]` packed per call: row-major tiles.
fn pack_lhs(m: usize, k: usize, lhs: Strided, parallel: bool) -> Tiles {
    Tiles::new(m.div_ceil(TILE_ROWS), k, parallel, |(block, tiles)| {
        let first_row = block * TILE_ROWS;
        for r in 0..TILE_ROWS.min(m.saturating_sub(first_row)) {
            let row = &lhs.values[(first_row + r) * lhs.row..];
            for kk in 0..k {
                let (step, depth) = (kk / DEPTH, kk % DEPTH);
                let terms = split(row[kk * lhs.col]);
                let step_tiles = &mut tiles[step * TERMS * TILE_LEN..];
                for (term, &value) in terms.iter().enumerate() {
                    step_tiles[term * TILE_LEN + r * DEPTH + depth] = value;
                }
            }
        }
    })
}

/// The AMX tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    column_bytes: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut column_bytes = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        column_bytes[t] = 64;
        rows[t] = 16;
        t += 1;
    }
    TileConfig { palette: 1, start_row: 0, reserved: [0; 14], column_bytes, rows }
};

/// Steps of k per pass over the row blocks: the two rhs column blocks of one pass (2 × 4 steps ×
/// 3 KB) stay in L1 while the lhs blocks stream from L2. `STEPS_PER_PASS=N` (N ≥ 1) overrides;
/// more steps per pass load and store the accumulators less often.
fn steps_per_pass() -> usize {
    static STEPS: OnceLock<usize> = OnceLock::new();
    *STEPS.get_or_init(|| std::env::var("STEPS_PER_PASS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(4))
}

/// Loads two tiles (`$t0` from `$p0`, `$t1` from `$p1`, `$offset` bytes in, 64-byte rows).
macro_rules! load {
    ($t0:literal, $t1:literal, $p0:literal, $p1:literal, $offset:literal) => {
        concat!("tileloadd ", $t0, ", [", $p0, " + {s}*1 + ", $offset, "]\n", "tileloadd ", $t1, ", [", $p1, " + {s}*1 + ", $offset, "]\n")
    };
}

/// The four accumulators (tmm0..3) += the loaded lhs tiles (tmm4, tmm5) × rhs tiles (tmm6, tmm7).
macro_rules! four_products {
    () => {
        concat!("tdpbf16ps tmm0, tmm4, tmm6\n", "tdpbf16ps tmm1, tmm4, tmm7\n", "tdpbf16ps tmm2, tmm5, tmm6\n", "tdpbf16ps tmm3, tmm5, tmm7\n")
    };
}

/// Adds the six term products of `steps` of two lhs row blocks and two rhs column blocks to the
/// 32 × 32 f32 block at `c` (row stride `c_row` floats; tile (i, j) at `c + 16·i·c_row + 16·j`),
/// which is read first when `load`, else taken as zero.
///
/// # Safety
/// AMX must be [`available`] and the tile configuration loaded on this thread; the four slices
/// hold the steps; `c` addresses 32 rows of 32 writable floats at stride `c_row`.
unsafe fn block_product(lhs: [&[u16]; 2], rhs: [&[u16]; 2], steps: std::ops::Range<usize>, c: *mut f32, c_row: usize, load: bool) {
    use std::arch::asm;
    let c_stride = c_row * 4;
    let (c0, c2) = (c, c.add(TILE_ROWS * c_row));
    if load {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c0} + {s}*1 + 64]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c2} + {s}*1 + 64]",
            c0 = in(reg) c0, c2 = in(reg) c2, s = in(reg) c_stride, options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
    }
    let stride = 64usize;
    let single = single_term();
    for step in steps {
        let offset = step * TERMS * TILE_LEN;
        let (a0, a1) = (lhs[0][offset..].as_ptr(), lhs[1][offset..].as_ptr());
        let (b0, b1) = (rhs[0][offset..].as_ptr(), rhs[1][offset..].as_ptr());
        if single {
            asm!(
                load!("tmm4", "tmm5", "{a0}", "{a1}", 0),
                load!("tmm6", "tmm7", "{b0}", "{b1}", 0),
                four_products!(),
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) stride,
                options(nostack, readonly),
            );
            continue;
        }
        // Terms are 1024 bytes apart. Order: a0·b0, a0·b1, a0·b2, a1·b1, a1·b0, a2·b0 (each lhs
        // tile loaded once: they come from L2, the rhs ones from L1).
        asm!(
            load!("tmm4", "tmm5", "{a0}", "{a1}", 0),
            load!("tmm6", "tmm7", "{b0}", "{b1}", 0),
            four_products!(),
            load!("tmm6", "tmm7", "{b0}", "{b1}", 1024),
            four_products!(),
            load!("tmm6", "tmm7", "{b0}", "{b1}", 2048),
            four_products!(),
            load!("tmm4", "tmm5", "{a0}", "{a1}", 1024),
            load!("tmm6", "tmm7", "{b0}", "{b1}", 1024),
            four_products!(),
            load!("tmm6", "tmm7", "{b0}", "{b1}", 0),
            four_products!(),
            load!("tmm4", "tmm5", "{a0}", "{a1}", 2048),
            four_products!(),
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) stride,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c0} + {s}*1 + 64], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c2} + {s}*1 + 64], tmm3",
        c0 = in(reg) c0, c2 = in(reg) c2, s = in(reg) c_stride, options(nostack),
    );
}

/// Raw output pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct Output(*mut f32);
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// The element `offset` floats in (a method, so that closures capture the whole `Output`,
    /// which is `Sync`, rather than its raw pointer).
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs`, `dst` row-major with row stride `dst_row`, on up to
/// `threads` threads (1: the calling thread only). AMX must be [`available`].
pub fn gemm_packed(m: usize, dst: &mut [f32], dst_row: usize, accumulate: bool, lhs: Strided, rhs: &PackedRhs, threads: usize) {
    let (k, n) = (rhs.k, rhs.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(available(), "AMX products need AMX");
    assert!(dst.len() >= (m - 1) * dst_row + n);
    if k > 0 {
        assert!(lhs.values.len() > (m - 1) * lhs.row + (k - 1) * lhs.col);
    }
    let parallel = threads > 1;
    let lhs = pack_lhs(m, k, lhs, parallel);
    let steps = lhs.steps;
    let (row_pairs, column_pairs) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    // Tasks: column pairs, each split into groups of row pairs when there are too few of them.
    let wanted = if parallel { 4 * threads } else { 1 };
    let row_groups = wanted.div_ceil(column_pairs).clamp(1, row_pairs);
    let pairs_per_group = row_pairs.div_ceil(row_groups);
    let row_groups = row_pairs.div_ceil(pairs_per_group);
    let output = Output(dst.as_mut_ptr());
    let run = |task: usize| {
        let (column_pair, group) = (task / row_groups, task % row_groups);
        let pairs = group * pairs_per_group..((group + 1) * pairs_per_group).min(row_pairs);
        let first_column = column_pair * BLOCK;
        let columns = BLOCK.min(n - first_column);
        // Partial blocks (the last rows or columns) accumulate in a scratch of whole blocks.
        let mut scratch: Vec<f32> = Vec::new();
        let partial = |pair: usize| columns < BLOCK || BLOCK > m - pair * BLOCK;
        let scratch_slot = |pair: usize| (pair - pairs.start) * BLOCK * BLOCK;
        if pairs.clone().any(partial) {
            scratch = vec![0f32; pairs.len() * BLOCK * BLOCK];
            for pair in pairs.clone().filter(|&p| partial(p) && accumulate) {
                for r in 0..BLOCK.min(m - pair * BLOCK) {
                    // SAFETY: inside `dst` (asserted); this task alone touches the block.
                    let row = unsafe { std::slice::from_raw_parts(output.at((pair * BLOCK + r) * dst_row + first_column), columns) };
                    scratch[scratch_slot(pair) + r * BLOCK..][..columns].copy_from_slice(row);
                }
            }
        }
        // SAFETY: `available()` holds; the configuration is a valid palette-1 one.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        let b = [rhs.tiles.block(2 * column_pair), rhs.tiles.block(2 * column_pair + 1)];
        let per_pass = steps_per_pass();
        let mut first = 0;
        while first < steps.max(1) {
            let pass = first..(first + per_pass).min(steps);
            for pair in pairs.clone() {
                let a = [lhs.block(2 * pair), lhs.block(2 * pair + 1)];
                let (c, c_row, load) = if partial(pair) {
                    (scratch[scratch_slot(pair)..].as_mut_ptr(), BLOCK, true)
                } else {
                    // SAFETY: a whole block inside `dst`.
                    (unsafe { output.at(pair * BLOCK * dst_row + first_column) }, dst_row, accumulate || first > 0)
                };
                // SAFETY: the blocks hold every step; `c` addresses a whole writable block.
                unsafe { block_product(a, b, pass.clone(), c, c_row, load) };
            }
            first += per_pass;
        }
        for pair in pairs.clone().filter(|&p| partial(p)) {
            for r in 0..BLOCK.min(m - pair * BLOCK) {
                // SAFETY: as above.
                let row = unsafe { std::slice::from_raw_parts_mut(output.at((pair * BLOCK + r) * dst_row + first_column), columns) };
                row.copy_from_slice(&scratch[scratch_slot(pair) + r * BLOCK..][..columns]);
            }
        }
    };
    let tasks = column_pairs * row_groups;
    if parallel && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// [`gemm_packed`] with the right-hand operand packed for this call only.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], dst_row: usize, accumulate: bool, lhs: Strided, rhs: Strided, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(rhs.values.len() > (k - 1) * rhs.row + (n - 1) * rhs.col);
    }
    let packed = PackedRhs::new(k, n, rhs, threads > 1);
    gemm_packed(m, dst, dst_row, accumulate, lhs, &packed, threads);
}

/// `SINGLE_TERM=1`: only the a₀·b₀ product (plain bf16 numerics), to see the tile rate the
/// split costs; the packing still makes all three terms.
fn single_term() -> bool {
    static SINGLE: OnceLock<bool> = OnceLock::new();
    *SINGLE.get_or_init(|| std::env::var("SINGLE_TERM").is_ok())
}

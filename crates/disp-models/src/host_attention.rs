//! Causal grouped-query attention computed on host memory, for the CPU inference path.
//!
//! burn-flex's attention op evaluates `exp` for every score, masked ones included, with a
//! scalar libm call; at SmolLM2's sizes that is two thirds of a layer's prefill time once the
//! block linears are pruned. This kernel computes only the causal (lower-left) part, in blocks of
//! query rows: one gemm for the scores of a block against the keys it may see, a vectorised
//! softmax, one gemm for the values. Each (query head, block of rows) is a task. Same math as
//! the op (scale 1/√hd, max-subtracted softmax); results agree to float rounding.

use rayon::prelude::*;

/// Query rows per block: small enough that a block's scores stay in cache, large enough for gemm.
const ROWS_PER_BLOCK: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    /// Query positions (`start..start + queries`).
    pub queries: usize,
    /// Key positions (`0..keys`, keys = start + queries).
    pub keys: usize,
    pub head_dim: usize,
    /// Sliding window: query position `p` sees keys `p - window + 1 ..= p` only.
    pub window: Option<usize>,
}

/// `q` `[heads, queries, hd]`, `k`/`v` `[kv_heads, keys, hd]` (row-major, one batch row);
/// returns `[queries, heads·hd]`. Query i (absolute position keys − queries + i) attends to keys
/// 0..=that position (the last `window` of them with a window); query head h uses KV head
/// h / (heads / kv_heads).
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { heads, kv_heads, queries, keys, head_dim, window } = shape;
    assert_eq!(q.len(), heads * queries * head_dim);
    assert_eq!(k.len(), kv_heads * keys * head_dim);
    assert_eq!(v.len(), k.len());
    assert!(keys >= queries && heads.is_multiple_of(kv_heads));
    let start = keys - queries;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let strides = Strides { head_dim, q_row: head_dim, kv_row: head_dim };
    let span = Span { start, queries, window };
    let blocks = each_head_block(heads, queries, |h, first| {
        let kv = h / group;
        let q = &q[h * queries * head_dim..(h + 1) * queries * head_dim];
        let k = &k[kv * keys * head_dim..(kv + 1) * keys * head_dim];
        let v = &v[kv * keys * head_dim..(kv + 1) * keys * head_dim];
        head_block(q, k, v, span, strides, scale, first)
    });
    interleave(&blocks, heads, queries, head_dim)
}

/// `f(head, first query row)` for every head and block of `ROWS_PER_BLOCK` query rows, as
/// parallel tasks (SmolLM2's 9 heads on 2 threads left one idle for a ninth of the time when
/// whole heads were the tasks); returns the blocks head by head, in row order. Each task is a
/// wide-vector build (the softmax's loops; its products are `gemm` calls, which choose their own).
fn each_head_block(heads: usize, queries: usize, f: impl Fn(usize, usize) -> Vec<f32> + Sync) -> Vec<Vec<f32>> {
    let per_head = queries.div_ceil(ROWS_PER_BLOCK);
    (0..heads * per_head)
        .into_par_iter()
        .map(|task| {
            disp_core::fastmath::with_wide_vectors(
                #[inline(always)]
                || f(task / per_head, task % per_head * ROWS_PER_BLOCK),
            )
        })
        .collect()
}

/// Blocks of per-head outputs (head by head, each head's blocks of `ROWS_PER_BLOCK` rows in
/// order, `[rows, hd]` each) interleaved into `[queries, heads·hd]`.
fn interleave(blocks: &[Vec<f32>], heads: usize, queries: usize, head_dim: usize) -> Vec<f32> {
    let per_head = queries.div_ceil(ROWS_PER_BLOCK);
    let mut out = vec![0f32; queries * heads * head_dim];
    for (task, values) in blocks.iter().enumerate() {
        let (h, first) = (task / per_head, task % per_head * ROWS_PER_BLOCK);
        for (i, row) in values.chunks_exact(head_dim).enumerate() {
            let at = (first + i) * heads * head_dim + h * head_dim;
            out[at..at + head_dim].copy_from_slice(row);
        }
    }
    out
}

/// [`causal_attention`] on row-major activations as the linears produce them: `q`
/// `[queries, heads·hd]`, `k`/`v` `[keys, kv_heads·hd]`; returns `[queries, heads·hd]`. Each head
/// reads its columns in place (gemm strides), so no head-major copies are made.
pub fn causal_attention_rows(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { heads, kv_heads, queries, keys, head_dim, window } = shape;
    assert_eq!(q.len(), heads * queries * head_dim);
    assert_eq!(k.len(), kv_heads * keys * head_dim);
    assert_eq!(v.len(), k.len());
    assert!(keys >= queries && heads.is_multiple_of(kv_heads));
    let (start, group) = (keys - queries, heads / kv_heads);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let strides = Strides { head_dim, q_row: heads * head_dim, kv_row: kv_heads * head_dim };
    let span = Span { start, queries, window };
    let blocks = each_head_block(heads, queries, |h, first| {
        let kv = h / group;
        head_block(&q[h * head_dim..], &k[kv * head_dim..], &v[kv * head_dim..], span, strides, scale, first)
    });
    interleave(&blocks, heads, queries, head_dim)
}

/// Where one head's rows sit: `head_dim` values per row, rows `q_row` (queries) and `kv_row`
/// (keys, values) apart.
#[derive(Debug, Clone, Copy)]
struct Strides {
    head_dim: usize,
    q_row: usize,
    kv_row: usize,
}

/// Which positions one call covers: queries `start..start + queries`, each over the keys up to
/// its own position.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    queries: usize,
    window: Option<usize>,
}

impl Span {
    /// The first key the query at absolute position `position` sees.
    fn first_key(&self, position: usize) -> usize {
        self.window.map_or(0, |w| (position + 1).saturating_sub(w))
    }
}

/// One block of one head's query rows, `first..first + ROWS_PER_BLOCK` (fewer at the end):
/// `[rows, hd]` of outputs; row `i` of the head's q (k, v) starts at `i·q_row` (`i·kv_row`).
#[inline(always)]
fn head_block(q: &[f32], k: &[f32], v: &[f32], span: Span, strides: Strides, scale: f32, first: usize) -> Vec<f32> {
    let Span { start, queries, .. } = span;
    let Strides { head_dim, q_row, kv_row } = strides;
    let rows = ROWS_PER_BLOCK.min(queries - first);
    let mut out = vec![0f32; rows * head_dim];
    // The block's queries see keys lowest..end: its last query the keys up to `end`, its first
    // the keys from `lowest` (0 without a window); the rest is masked below.
    let lowest = span.first_key(start + first);
    let end = start + first + rows;
    let visible = end - lowest;
    let mut block_scores = vec![0f32; rows * visible];
    let (k, v) = (&k[lowest * kv_row..], &v[lowest * kv_row..]);
    // scores[rows, visible] = scale · Q[first..first+rows] · K[lowest..end]ᵀ
    // SAFETY: every pointer/stride pair describes a slice of the stated size above.
    unsafe {
        gemm::gemm(
            rows,
            visible,
            head_dim,
            block_scores.as_mut_ptr(),
            1,
            visible as isize,
            false,
            q[first * q_row..].as_ptr(),
            1,
            q_row as isize,
            k.as_ptr(),
            kv_row as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (r, row) in block_scores.chunks_exact_mut(visible).enumerate() {
        let position = start + first + r;
        let (past, row) = row.split_at_mut(span.first_key(position) - lowest);
        past.fill(0.0);
        let (seen, future) = row.split_at_mut(position + 1 - span.first_key(position));
        let max = disp_core::fastmath::max(seen);
        let inverse = (1.0 / disp_core::fastmath::exp_in_place_sum(seen, 1.0, max)) as f32;
        seen.iter_mut().for_each(|s| *s *= inverse);
        future.fill(0.0);
    }
    // out = P · V[lowest..end]
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            rows,
            head_dim,
            visible,
            out.as_mut_ptr(),
            1,
            head_dim as isize,
            false,
            block_scores.as_ptr(),
            1,
            visible as isize,
            v.as_ptr(),
            1,
            kv_row as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64: softmax over the visible keys of scaled dot products.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let start = s.keys - s.queries;
        let mut out = vec![0f32; s.queries * s.heads * s.head_dim];
        for h in 0..s.heads {
            let kv = h / (s.heads / s.kv_heads);
            for i in 0..s.queries {
                let qi = &q[(h * s.queries + i) * s.head_dim..][..s.head_dim];
                let visible = start + i + 1;
                let first = s.window.map_or(0, |w| visible.saturating_sub(w));
                let logits: Vec<f64> = (first..visible)
                    .map(|j| {
                        let kj = &k[(kv * s.keys + j) * s.head_dim..][..s.head_dim];
                        qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (s.head_dim as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..s.head_dim {
                    let value: f64 = (first..visible).map(|j| weights[j - first] * v[(kv * s.keys + j) * s.head_dim + d] as f64).sum();
                    out[i * s.heads * s.head_dim + h * s.head_dim + d] = (value / total) as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 20_000) as f32 / 5_000.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_with_grouped_heads_blocks_a_cache_offset_and_windows() {
        let cases = [
            (6, 2, 150, 150, 16, None),
            (4, 4, 1, 37, 8, None),
            (3, 1, 70, 100, 32, None),
            (2, 1, 64, 64, 8, None),
            // Windows shorter than a block of rows, longer than one, and past a cache offset.
            (6, 2, 150, 150, 16, Some(5)),
            (4, 2, 130, 130, 8, Some(90)),
            (3, 1, 70, 100, 32, Some(40)),
            (4, 4, 1, 37, 8, Some(7)),
        ];
        for (heads, kv_heads, queries, keys, head_dim, window) in cases {
            let shape = AttentionShape { heads, kv_heads, queries, keys, head_dim, window };
            let q = values(heads * queries * head_dim, 1);
            let k = values(kv_heads * keys * head_dim, 2);
            let v = values(kv_heads * keys * head_dim, 3);
            let ours = causal_attention(&q, &k, &v, shape);
            let exact = reference(&q, &k, &v, shape);
            let worst = ours.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-5, "{shape:?}: max difference {worst}");
            // The same call on row-major `[positions, heads·hd]` inputs.
            let rows = |x: &[f32], count: usize, len: usize| -> Vec<f32> {
                (0..len).flat_map(|i| (0..count).flat_map(move |h| x[(h * len + i) * head_dim..][..head_dim].to_vec())).collect()
            };
            let by_rows = causal_attention_rows(&rows(&q, heads, queries), &rows(&k, kv_heads, keys), &rows(&v, kv_heads, keys), shape);
            assert_eq!(by_rows, ours, "{shape:?}: row-major layout");
        }
    }
}

//! The decoder blocks computed on host memory, for inference on the plain CPU device.
//!
//! burn-flex runs one operation at a time, each into a freshly allocated tensor: a block's
//! forward is ~30 passes over its activations plus the kernel's page clearing of every new
//! buffer, and the element-wise ops (norms, rotary, SiLU·up) cost as much as a third of the
//! matrix products. Here the residual stream stays one `Vec<f32>` `[B·T, d]` through all
//! blocks: norms, the rotary embedding, the activation and the residual adds are single loops,
//! the linears are one `gemm` call each straight on the stored weights (borrowed from burn's
//! buffer when it is f32, converted per matrix otherwise; a single row, as in decoding, is split
//! by columns across the threads, q/k/v and gate/up as one product each, see
//! [`crate::host_search::linears_of_one_input`]), and attention reads q/k/v in
//! place ([`crate::host_attention::causal_attention_rows`]). The head's logits (the last
//! position of a prompt, each decoding step) are one such product too ([`covers_head`]).
//!
//! Covered: dense and pruned blocks of every wiring (pre-norm, OPT post-norm, Phi parallel),
//! RMSNorm and LayerNorm, biases, SiLU / ReLU / tanh-GELU, full and partial rotary, q/k norms,
//! sliding windows, batches, and a prompt that fills an empty KV cache. Not covered (the generic
//! burn path runs instead): gates (the search, which needs autodiff), a KV cache of burn tensors
//! that already holds positions (batch > 1 decoding; batch 1 continues its host rows), the exact
//! erf GELU, and every device but the plain CPU one.

use std::cell::Cell;

use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_core::selection::Site;
use rayon::prelude::*;

use crate::decoder::{Block, BlockNorms, DecoderLm, Norm};
use crate::host_attention::{causal_attention_rows, AttentionShape};
use crate::host_search::{linear, linears_of_one_input, with_activation, HostNorm};
use crate::layers::{Activation, KvCache};
use disp_core::fastmath;

thread_local! {
    static HOST_PATH: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with the host paths (this forward and [`crate::host_search`]'s backward) switched off
/// on this thread: the model then computes with the generic burn operations and autodiff (the
/// reference the host paths are tested against).
pub fn with_generic_path<R>(f: impl FnOnce() -> R) -> R {
    let before = HOST_PATH.with(|c| c.replace(false));
    let out = f();
    HOST_PATH.with(|c| c.set(before));
    out
}

/// Whether the host paths are switched on for this thread (see [`with_generic_path`]).
pub(crate) fn enabled() -> bool {
    HOST_PATH.with(Cell::get)
}

/// Runs `f` on a rayon worker thread (inline when already on one). Called from outside the pool,
/// every parallel loop is handed to the pool while the calling thread sleeps, and that thread is
/// woken again at the loop's end; on a worker a loop splits in place (the worker runs its share,
/// the other one steals the rest). Used where the loops are many and short: a decode step of
/// SmolLM2 runs about 210 (A/B on SmolLM2: decode +7 to +16 %, search step +2 %; a 512-token
/// prefill was 6 % slower and eval 1 %, so those stay on the calling thread).
/// Call it after the [`enabled`] check: that switch is per thread, and `f` runs on another.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Whether [`blocks`] computes this forward pass: plain CPU device, no gates, only activations it
/// implements, and either a cache of host rows to continue (decoding) or a prompt of more than
/// one token into no cache or an empty one.
pub(crate) fn covers(model: &DecoderLm, gated: bool, seq: usize, start: usize, host_cache: bool) -> bool {
    enabled()
        && !gated
        && (host_cache || (seq > 1 && start == 0))
        && model.spec.activation != Activation::Gelu
        && !model.device.is_autodiff()
        && model.device == Device::flex()
        && !has_tracked_weights(model)
}

/// Whether [`crate::host_search::head_logits`] computes the head on `hidden`: plain CPU device,
/// nothing tracked by autodiff (fine-tuning's hidden states are), f32 activations.
pub(crate) fn covers_head(model: &DecoderLm, hidden: &Tensor<3>) -> bool {
    enabled()
        && model.device == Device::flex()
        && !hidden.device().is_autodiff()
        && !model.ends.head.weight.device().is_autodiff()
        && hidden.dtype() == burn::tensor::DType::F32
}

/// Whether a block linear holds a weight on the autodiff device (fine-tuning puts W + A·B there):
/// the host path would read its values and drop the adapters' gradient.
fn has_tracked_weights(model: &DecoderLm) -> bool {
    (0..model.blocks.len()).any(|i| {
        let l = crate::CausalLm::block_linears(model, i);
        let tracked = l.all().any(|linear| linear.weight.device().is_autodiff());
        tracked
    })
}

fn indices(kept: &Tensor<1, Int>) -> Vec<usize> {
    kept.clone().into_data().convert::<i64>().try_into_vec::<i64>().expect("i64 indices").into_iter().map(|i| i as usize).collect()
}

/// Normalises every `width`-long row of `x` in place, as [`Norm::forward`] does.
fn norm(norm: &Norm, x: &mut [f32], width: usize) {
    HostNorm::of(norm).normalize_rows(x, width);
}

/// Elements per rayon task of the element-wise loops: enough to amortise a task.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// What every block of one host forward (or search) pass shares.
pub(crate) struct Pass<'a> {
    pub model: &'a DecoderLm,
    pub batch: usize,
    pub seq: usize,
    /// cos / sin of this pass's positions (start..start+seq; rotary models).
    pub rope_tables: Option<(Vec<f32>, Vec<f32>)>,
}

impl Pass<'_> {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Attention over this pass's own positions (no cache) in block `block`.
    pub fn self_attention(&self, block: &Block) -> AttentionShape {
        let spec = &self.model.spec;
        let window = block.window.filter(|&w| w < self.seq);
        AttentionShape { heads: spec.heads, kv_heads: spec.kv_heads, queries: self.seq, keys: self.seq, head_dim: spec.head_dim, window }
    }
}

/// How a block reads and writes its index sets on the host: every position, or the kept ones.
struct HostSelector {
    kept: Option<[Vec<usize>; 5]>,
}

impl HostSelector {
    /// The input of a sub-block from the full-width `x` `[rows, d]`.
    fn read<'x>(&self, site: Site, x: &'x [f32], width: usize) -> std::borrow::Cow<'x, [f32]> {
        match &self.kept {
            None => x.into(),
            Some(kept) => {
                let kept = &kept[site.index()];
                x.chunks_exact(width).flat_map(|row| kept.iter().map(move |&i| row[i])).collect::<Vec<f32>>().into()
            }
        }
    }

    /// Adds a sub-block's output into the residual `x` `[rows, d]`.
    fn write(&self, site: Site, x: &mut [f32], out: &[f32], width: usize) {
        match &self.kept {
            None => x.par_chunks_mut(ELEMENTS_PER_TASK).zip(out.par_chunks(ELEMENTS_PER_TASK)).for_each(|(x, out)| {
                fastmath::with_wide_vectors(
                    #[inline(always)]
                    || x.iter_mut().zip(out).for_each(|(x, o)| *x += o),
                )
            }),
            Some(kept) => {
                let kept = &kept[site.index()];
                x.par_chunks_mut(width).zip(out.par_chunks(kept.len())).for_each(|(row, out)| {
                    kept.iter().zip(out).for_each(|(&i, o)| row[i] += o);
                });
            }
        }
    }
}

fn block(b: &Block, layer: usize, x: &mut [f32], pass: &Pass, cache: Option<&mut KvCache>) {
    let d = pass.model.spec.shape.hidden;
    let sel = HostSelector { kept: b.kept.as_ref().map(|k| Site::ALL.map(|site| indices(k.get(site)))) };
    match &b.norms {
        BlockNorms::Pre { attn, mlp } => {
            let mut h = x.to_vec();
            norm(attn, &mut h, d);
            let out = attention(b, layer, &sel.read(Site::AttnIn, &h, d), pass, cache);
            sel.write(Site::AttnOut, x, &out, d);
            h.copy_from_slice(x);
            norm(mlp, &mut h, d);
            let out = self::mlp(b, &sel.read(Site::MlpIn, &h, d), pass);
            sel.write(Site::MlpOut, x, &out, d);
        }
        BlockNorms::Post { attn, mlp } => {
            let out = attention(b, layer, &sel.read(Site::AttnIn, x, d), pass, cache);
            sel.write(Site::AttnOut, x, &out, d);
            norm(attn, x, d);
            let out = self::mlp(b, &sel.read(Site::MlpIn, x, d), pass);
            sel.write(Site::MlpOut, x, &out, d);
            norm(mlp, x, d);
        }
        BlockNorms::Parallel(n) => {
            let mut h = x.to_vec();
            norm(n, &mut h, d);
            let attn_out = attention(b, layer, &sel.read(Site::AttnIn, &h, d), pass, cache);
            let mlp_out = self::mlp(b, &sel.read(Site::MlpIn, &h, d), pass);
            sel.write(Site::AttnOut, x, &attn_out, d);
            sel.write(Site::MlpOut, x, &mlp_out, d);
        }
    }
}

/// q/k/v → q/k norms → rotary → (cache) → causal attention → output projection, all on
/// row-major `[rows, heads·hd]` values.
fn attention(b: &Block, layer: usize, input: &[f32], pass: &Pass, cache: Option<&mut KvCache>) -> Vec<f32> {
    let spec = &pass.model.spec;
    let (heads, kv_heads, hd, rows) = (spec.heads, spec.kv_heads, spec.head_dim, pass.rows());
    let [q, k, v] = &b.attn_inputs;
    let [mut q, mut k, v] = linears_of_one_input([q, k, v], input, rows);
    if let Some([q_norm, k_norm]) = &b.qk_norms {
        norm(q_norm, &mut q, hd);
        norm(k_norm, &mut k, hd);
    }
    if let (Some(rope), Some(tables)) = (&spec.rope, &pass.rope_tables) {
        let seq = pass.seq;
        rope.rotate_rows(&mut q, heads, tables, |row| row % seq);
        rope.rotate_rows(&mut k, kv_heads, tables, |row| row % seq);
    }
    let mut cache = cache;
    if pass.batch == 1 {
        if let Some(host) = cache.as_deref_mut().and_then(|c| c.host_rows(kv_heads, hd, &pass.model.device)) {
            // Batch 1 into host rows: append in place, then attend over every cached position.
            let (keys, values) = &mut host.layers[layer];
            keys.extend_from_slice(&k);
            values.extend_from_slice(&v);
            let positions = keys.len() / (kv_heads * hd);
            let shape =
                AttentionShape { heads, kv_heads, queries: pass.seq, keys: positions, head_dim: hd, window: b.window.filter(|&w| w < positions) };
            return linear(&b.attn_output, &causal_attention_rows(&q, keys, values, shape), rows);
        }
    }
    if let Some(cache) = cache {
        let device = &pass.model.device;
        let head_major = |x: &[f32]| -> Tensor<4> {
            let values: Vec<f32> = (0..pass.batch)
                .flat_map(|bt| {
                    (0..kv_heads)
                        .flat_map(move |h| (0..pass.seq).flat_map(move |t| x[((bt * pass.seq + t) * kv_heads + h) * hd..][..hd].iter().copied()))
                })
                .collect();
            Tensor::from_data(TensorData::new(values, [pass.batch, kv_heads, pass.seq, hd]), device)
        };
        cache.append(layer, head_major(&k), head_major(&v));
    }
    let shape = pass.self_attention(b);
    let (q_len, kv_len) = (pass.seq * heads * hd, pass.seq * kv_heads * hd);
    let mut context = Vec::with_capacity(rows * heads * hd);
    for bt in 0..pass.batch {
        let (qs, ks) = (bt * q_len..(bt + 1) * q_len, bt * kv_len..(bt + 1) * kv_len);
        context.extend(causal_attention_rows(&q[qs], &k[ks.clone()], &v[ks], shape));
    }
    linear(&b.attn_output, &context, rows)
}

fn mlp(b: &Block, input: &[f32], pass: &Pass) -> Vec<f32> {
    let (activation, rows) = (pass.model.spec.activation, pass.rows());
    let inter = match b.mlp_inputs.as_slice() {
        [gate, up] => {
            let [mut g, u] = linears_of_one_input([gate, up], input, rows);
            with_activation!(activation, act => g.par_chunks_mut(ELEMENTS_PER_TASK).zip(u.par_chunks(ELEMENTS_PER_TASK)).for_each(|(g, u)| {
                fastmath::with_wide_vectors(#[inline(always)] || g.iter_mut().zip(u).for_each(|(g, u)| *g = act(*g).0 * u))
            }));
            g
        }
        [fc1] => {
            let mut h = linear(fc1, input, rows);
            with_activation!(activation, act => h.par_chunks_mut(ELEMENTS_PER_TASK).for_each(|h| {
                fastmath::with_wide_vectors(#[inline(always)] || h.iter_mut().for_each(|h| *h = act(*h).0))
            }));
            h
        }
        _ => unreachable!("blocks are loaded with one or two MLP inputs"),
    };
    linear(&b.mlp_output, &inter, rows)
}

/// Every block of `model` on the embedded tokens `x` `[B, T, d]` at positions `start..`,
/// appending to `cache` if given (host rows for batch 1, tensors otherwise); returns the
/// residual stream after the last block.
pub(crate) fn blocks(model: &DecoderLm, x: Tensor<3>, start: usize, mut cache: Option<&mut KvCache>) -> Tensor<3> {
    let [batch, seq, width] = x.dims();
    let mut values = x.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 activations");
    let pass = Pass { model, batch, seq, rope_tables: model.spec.rope.as_ref().map(|rope| rope.half_tables(start, seq)) };
    let mut every_block = || {
        for (layer, b) in model.blocks.iter().enumerate() {
            block(b, layer, &mut values, &pass, cache.as_deref_mut());
        }
    };
    if batch * seq == 1 {
        on_pool(every_block);
    } else {
        every_block();
    }
    Tensor::from_data(TensorData::new(values, [batch, seq, width]), &model.device)
}

/// Σ next-token NLL of `tokens` (`batch` rows, positions from 0) without storing the logits:
/// the host blocks, the final norm, then the head and the log-softmax in blocks of rows. `None`
/// where [`covers`] says no.
pub(crate) fn summed_nll(model: &DecoderLm, tokens: &[u32], batch: usize) -> Option<f64> {
    let seq = tokens.len() / batch.max(1);
    if batch == 0 || seq < 2 || tokens.len() != batch * seq || !covers(model, false, seq, 0, false) {
        return None;
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &model.device);
    let hidden = model.ends.finish(blocks(model, model.ends.embed(ids, 0), 0, None));
    let hidden = hidden.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 activations");
    Some(crate::host_search::summed_head_nll(&model.ends.head, &hidden, tokens, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use burn::tensor::DType;

    #[test]
    fn a_half_precision_weight_gives_the_f32_product_of_the_same_values() {
        let device = Device::flex();
        let (rows, inputs, outputs) = (3, 5, 4);
        // Values exact in bf16, so both products see the same weights.
        let w: Vec<f32> = (0..inputs * outputs).map(|i| (i as f32 - 7.0) / 8.0).collect();
        let x: Vec<f32> = (0..rows * inputs).map(|i| (i as f32 * 0.37).sin()).collect();
        let f32_weight = Tensor::<2>::from_data(TensorData::new(w.clone(), [inputs, outputs]), &device);
        let bias = Some(Tensor::<1>::from_data(TensorData::new(vec![0.5f32, -1.0, 0.25, 2.0], [outputs]), &device));
        let full = Linear::new(f32_weight.clone(), bias.clone());
        let half = Linear::new(f32_weight.cast(DType::BF16), bias);
        let expected: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let (x, w) = (&x, &w);
                (0..outputs).map(move |o| (0..inputs).map(|i| x[r * inputs + i] * w[i * outputs + o]).sum::<f32>() + [0.5, -1.0, 0.25, 2.0][o])
            })
            .collect();
        for layer in [&full, &half] {
            let out = linear(layer, &x, rows);
            let worst = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "max difference {worst}");
        }
    }
}

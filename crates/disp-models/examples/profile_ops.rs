use std::time::Instant;
use burn::tensor::{Device, Distribution, Tensor};
use disp_models::layers::{causal_attention, Rope, RmsNorm};

fn time<F: FnMut() -> f32>(name: &str, mut f: F) {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(v);
    }
    println!("{name}: {:.2} ms", best * 1e3);
}

fn main() {
    let dev = Device::flex();
    let x = Tensor::<2>::random([512, 576], Distribution::Normal(0., 1.), &dev);
    let w = Tensor::<2>::random([576, 1536], Distribution::Normal(0., 1.), &dev);
    time("matmul 512x576x1536", || x.clone().matmul(w.clone()).sum().into_scalar::<f32>());
    let e = Tensor::<2>::random([49152, 576], Distribution::Normal(0., 1.), &dev);
    let et = e.clone().transpose();
    time("lm_head transposed view", || x.clone().matmul(et.clone()).sum().into_scalar::<f32>());
    let data = e.clone().transpose().into_data();
    let ec = Tensor::<2>::from_data(data, &dev);
    time("lm_head from_data(transpose)", || x.clone().matmul(ec.clone()).sum().into_scalar::<f32>());
    let q = Tensor::<4>::random([1, 9, 512, 64], Distribution::Normal(0., 1.), &dev);
    let k = Tensor::<4>::random([1, 3, 512, 64], Distribution::Normal(0., 1.), &dev);
    let v = Tensor::<4>::random([1, 3, 512, 64], Distribution::Normal(0., 1.), &dev);
    time("attention gqa", || causal_attention(q.clone(), k.clone(), v.clone(), 0).sum().into_scalar::<f32>());
    let qq = q.clone().reshape([1, 3, 3 * 512, 64]);
    time("  qk^T only", || qq.clone().matmul(k.clone().swap_dims(2, 3)).sum().into_scalar::<f32>());
    let s = Tensor::<4>::random([1, 3, 1536, 512], Distribution::Normal(0., 1.), &dev);
    time("  softmax", || burn::tensor::activation::softmax(s.clone(), 3).sum().into_scalar::<f32>());
    time("  att@v", || s.clone().matmul(v.clone()).sum().into_scalar::<f32>());
    let h = Tensor::<3>::random([1, 512, 576], Distribution::Normal(0., 1.), &dev);
    let norm = RmsNorm { weight: Tensor::ones([576], &dev), eps: 1e-5 };
    time("rmsnorm", || norm.forward(h.clone()).sum().into_scalar::<f32>());
    let rope = Rope::new(1e5, 64, 64, None);
    time("rope q", || rope.apply(q.clone(), 0).sum().into_scalar::<f32>());
    time("sum only", || q.clone().sum().into_scalar::<f32>());
    let hs = h.clone().swap_dims(1, 2);
    time("swap+reshape", || hs.clone().reshape([1, 576 * 512]).sum().into_scalar::<f32>());
    let logits = Tensor::<2>::random([511, 49152], Distribution::Normal(0., 1.), &dev);
    time("log_softmax vocab", || burn::tensor::activation::log_softmax(logits.clone(), 1).sum().into_scalar::<f32>());
}

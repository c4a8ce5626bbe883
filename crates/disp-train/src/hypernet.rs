//! The hypernetwork that produces one logit per prunable position.
//!
//! Fixed random inputs — one sequence position per gate vector, i.e. per (layer, site) pair,
//! ordered layer-major (layer 0: S1..S5, layer 1: S1..S5, ...) — run through a bidirectional
//! GRU, a LayerNorm and a GELU; then every gate vector has its own bias-free linear map from the
//! GRU feature of its position to the vector's width (d for S1, S2, S3, S5; d_ff for S4).
//!
//! The 5·L linear maps are stored stacked per site (`heads[site]` is `[L, 2·hidden, width]`) and
//! applied with one batched matmul per site: mathematically the same as 5·L separate `Linear`
//! layers, with five tensor operations instead of 5·L.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{BiGru, BiGruConfig, LayerNorm, LayerNormConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor, TensorData};
use disp_core::params::ModelShape;

use crate::rng::{Purpose, SplitMix64};

/// Width of each fixed input vector.
pub const INPUT_WIDTH: usize = 32;
/// GRU hidden size per direction.
pub const GRU_HIDDEN: usize = 64;

/// Sizes of the hypernetwork for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HyperNetShape {
    pub layers: usize,
    /// Gate-vector width per site (S1..S5); the same for every layer.
    pub widths: [usize; 5],
}

impl HyperNetShape {
    /// The hypernetwork shape for a model; every block must have the same site widths.
    pub fn of(shape: &ModelShape) -> anyhow::Result<Self> {
        let Some(first) = shape.blocks.first() else { anyhow::bail!("the model has no transformer blocks to prune") };
        let widths = first.site_widths();
        if let Some(l) = shape.blocks.iter().position(|b| b.site_widths() != widths) {
            anyhow::bail!("block {l} has different widths from block 0; the hypernetwork needs uniform blocks");
        }
        Ok(Self { layers: shape.blocks.len(), widths })
    }

    /// Number of gate vectors (GRU sequence length).
    pub fn positions(&self) -> usize {
        5 * self.layers
    }

    /// Total number of gate entries (prunable positions).
    pub fn gate_entries(&self) -> usize {
        self.layers * self.widths.iter().sum::<usize>()
    }
}

/// The DISP-LLM hypernetwork (trainable part only; the fixed inputs live outside, see
/// [`fixed_inputs`]).
#[derive(Module, Debug)]
pub struct HyperNet {
    pub gru: BiGru,
    pub norm: LayerNorm,
    /// One bias-free linear map per gate vector, stacked per site: `heads[s]` is
    /// `[layers, 2·GRU_HIDDEN, width_s]`.
    pub heads: Vec<Param<Tensor<3>>>,
}

impl HyperNet {
    /// A hypernetwork whose weights are drawn from `seed` (PyTorch's default ranges:
    /// U(±1/√hidden) for the GRU, U(±1/√fan_in) for the heads, LayerNorm at identity), so the
    /// same seed gives the same network on any device and independently of burn's global RNG.
    pub fn new(shape: HyperNetShape, seed: u64, device: &Device) -> Self {
        let feature = 2 * GRU_HIDDEN;
        let net = Self {
            gru: BiGruConfig::new(INPUT_WIDTH, GRU_HIDDEN, true).init(device),
            norm: LayerNormConfig::new(feature).init(device),
            heads: shape.widths.iter().map(|&w| Param::from_tensor(Tensor::zeros([shape.layers, feature, w], device))).collect(),
        };
        net.map(&mut SeededInit { rng: crate::rng::stream(seed, Purpose::Init, 0), path: Vec::new() })
    }

    /// Logits per site, `[layers, width_s]`, for the fixed `inputs` `[1, 5·layers, INPUT_WIDTH]`.
    pub fn forward(&self, inputs: Tensor<3>) -> [Tensor<2>; 5] {
        let (h, _) = self.gru.forward(inputs, None);
        let h = gelu(self.norm.forward(h));
        let [_, positions, feature] = h.dims();
        let layers = positions / 5;
        let h = h.reshape([layers, 5, feature]);
        std::array::from_fn(|s| {
            let head = self.heads[s].val();
            let width = head.dims()[2];
            h.clone().narrow(1, s, 1).matmul(head).reshape([layers, width])
        })
    }
}

/// The hypernetwork's fixed inputs `[1, 5·layers, INPUT_WIDTH]`, standard normal, drawn from
/// `seed`; they are not trained.
pub fn fixed_inputs(shape: HyperNetShape, seed: u64, device: &Device) -> Tensor<3> {
    let mut rng = crate::rng::stream(seed, Purpose::Inputs, 0);
    let n = shape.positions() * INPUT_WIDTH;
    let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_data(TensorData::new(values, [1, shape.positions(), INPUT_WIDTH]), device)
}

/// Replaces every parameter with seeded uniform values (the norm stays at gamma = 1, beta = 0).
struct SeededInit {
    rng: SplitMix64,
    path: Vec<String>,
}

impl ModuleMapper for SeededInit {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let bound = match self.path.first().map(String::as_str) {
            Some("gru") => 1.0 / (GRU_HIDDEN as f64).sqrt(),
            Some("heads") => 1.0 / ((2 * GRU_HIDDEN) as f64).sqrt(),
            _ => return param,
        };
        let rng = &mut self.rng;
        param.map(|tensor| {
            let shape = tensor.shape();
            let values: Vec<f32> = (0..shape.num_elements()).map(|_| rng.symmetric(bound) as f32).collect();
            let device = tensor.device();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
            fresh.set_require_grad(device.is_autodiff())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::ModuleVisitor;

    struct Values(Vec<(String, Vec<f32>)>, Vec<String>);
    impl ModuleVisitor for Values {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.1.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.1.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let v = param.val().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            self.0.push((self.1.join("."), v));
        }
    }

    fn values(net: &HyperNet) -> Vec<(String, Vec<f32>)> {
        let mut v = Values(Vec::new(), Vec::new());
        net.visit(&mut v);
        v.0
    }

    #[test]
    fn weights_come_from_the_seed() {
        let device = Device::flex().autodiff();
        let shape = HyperNetShape { layers: 3, widths: [8, 8, 8, 16, 8] };
        let a = values(&HyperNet::new(shape, 5, &device));
        let b = values(&HyperNet::new(shape, 5, &device));
        let c = values(&HyperNet::new(shape, 6, &device));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // 2 directions × 3 gates × (input + hidden linear, each weight + bias), norm gamma/beta, 5 heads.
        assert_eq!(a.len(), 2 * 3 * 4 + 2 + 5);
        for (path, v) in &a {
            if path.starts_with("norm") {
                continue;
            }
            let bound = if path.starts_with("heads") { 1.0 / 128f32.sqrt() } else { 1.0 / 8.0 };
            assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|&x| x != 0.0), "{path}");
        }
        let heads: Vec<_> = a.iter().filter(|(p, _)| p.starts_with("heads")).collect();
        assert_eq!(heads.len(), 5);
        assert_eq!(heads[3].1.len(), 3 * 128 * 16);
    }

    #[test]
    fn forward_gives_one_logit_per_position() {
        let device = Device::flex().autodiff();
        let shape = HyperNetShape { layers: 2, widths: [4, 4, 4, 12, 4] };
        let net = HyperNet::new(shape, 1, &device);
        let out = net.forward(fixed_inputs(shape, 1, &device));
        for (s, t) in out.iter().enumerate() {
            assert_eq!(t.dims(), [2, shape.widths[s]]);
        }
    }
}

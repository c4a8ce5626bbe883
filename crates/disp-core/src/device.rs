//! Run-time choice of the compute device. burn 0.22 picks the backend through [`Device`]; the
//! GPU backends are cargo features so that the default build stays CPU-only and offline.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// burn's `flex` backend with AVX-512 kernels where the CPU has them.
    #[default]
    Cpu,
    /// Any GPU through wgpu (Vulkan/Metal/DX12); needs the `wgpu` cargo feature.
    Wgpu,
    /// NVIDIA GPU through CUDA; needs the `cuda` cargo feature.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Self::Cpu),
            "wgpu" | "gpu" | "vulkan" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("unknown device '{other}' (expected cpu, wgpu or cuda)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Whether this build can create the device at all.
pub fn is_compiled_in(choice: DeviceChoice) -> bool {
    match choice {
        DeviceChoice::Cpu => true,
        DeviceChoice::Wgpu => cfg!(feature = "wgpu"),
        DeviceChoice::Cuda => cfg!(feature = "cuda"),
    }
}

/// Creates the device, or explains which cargo feature the build lacks.
pub fn select_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::flex()),
        DeviceChoice::Wgpu => wgpu_device(),
        DeviceChoice::Cuda => cuda_device(),
    }
}

/// The environment variable that moves the device-generic integration tests (HF reference
/// logits, masked = pruned, cached decoding, a search step) to another backend, e.g.
/// `DISP_TEST_DEVICE=wgpu cargo test --features disp-cli/wgpu --test hf_reference`.
pub const TEST_DEVICE_VAR: &str = "DISP_TEST_DEVICE";

/// The device named by [`TEST_DEVICE_VAR`] (the CPU when unset) and whether it is a GPU backend,
/// whose kernels round differently and so get looser tolerances. A name this build cannot run is
/// an error, so that a CI job asking for wgpu never silently tests the CPU.
pub fn test_device() -> anyhow::Result<(Device, DeviceChoice)> {
    let choice = match std::env::var(TEST_DEVICE_VAR) {
        Ok(name) if !name.is_empty() => name.parse::<DeviceChoice>().map_err(|e| anyhow::anyhow!("{TEST_DEVICE_VAR}: {e}"))?,
        _ => DeviceChoice::Cpu,
    };
    Ok((select_device(choice)?, choice))
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> anyhow::Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> anyhow::Result<Device> {
    anyhow::bail!(
        "device 'wgpu' is not compiled into this build: rebuild with `--features wgpu` \
         (e.g. `cargo run --release -p disp-cli --features wgpu -- ...`)"
    )
}

#[cfg(feature = "cuda")]
fn cuda_device() -> anyhow::Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> anyhow::Result<Device> {
    anyhow::bail!(
        "device 'cuda' is not compiled into this build: rebuild with `--features cuda` \
         (burn 0.22's CUDA build downloads an LLVM bundle, so it needs network access)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_unknown() {
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("wgpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Wgpu);
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("unknown device 'tpu'"), "{err}");
    }

    /// Every device: compiled in, it computes a small matrix product correctly; compiled out,
    /// it is an error that names the missing feature.
    #[test]
    fn each_device_works_or_names_its_missing_feature() {
        use burn::tensor::{Tensor, TensorData};
        for choice in [DeviceChoice::Cpu, DeviceChoice::Wgpu, DeviceChoice::Cuda] {
            if is_compiled_in(choice) {
                let device = select_device(choice).unwrap_or_else(|e| panic!("{choice}: {e:#}"));
                let a = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), &device);
                let b = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.5, -1.0, 2.0, 0.0, 1.0], [3, 2]), &device);
                let product = a.matmul(b).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                assert_eq!(product, [-1.0, 7.5, -1.0, 18.0], "{choice}");
            } else {
                let err = select_device(choice).unwrap_err().to_string();
                assert!(err.starts_with(&format!("device '{choice}' is not compiled into this build")), "{err}");
                assert!(err.contains(&format!("--features {choice}")), "{err}");
            }
        }
        assert!(is_compiled_in(DeviceChoice::Cpu));
    }
}

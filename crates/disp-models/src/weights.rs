//! Reading Hugging Face safetensors checkpoints (single file or sharded with an index) into f32
//! tensors, with errors that name the file, the tensor and the problem.
//!
//! burn-import no longer reads safetensors (it is ONNX-only in burn 0.22); we read the files
//! with the `safetensors` crate over a memory map, which also lets us check shapes ourselves and
//! cut or transpose weights while loading.
//!
//! A checkpoint can also live in memory ([`Checkpoint::from_tensors`]: flat tensors with their
//! HF shapes, e.g. the parameters of a model being trained, which stay differentiable through
//! the loaders), or only record what a loader reads ([`Checkpoint::probe`]), which lists the
//! tensors a family needs for a config without a second table of names.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};
use disp_core::selection::IndexTensors;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::CheckpointCapacity;
use crate::pruned_folder::PrunedLayout;

/// The weight files of one checkpoint folder.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    location: HashMap<String, usize>,
    /// Set for a pruned folder: block linears are stored cut to these index sets.
    layout: Option<PrunedLayout>,
    /// Set for a checkpoint that is not a folder of files (`files` and `location` are then empty).
    memory: Option<MemorySource>,
}

/// The tensors of a checkpoint that does not come from files.
enum MemorySource {
    /// Flat tensors with their HF shapes.
    Tensors(HashMap<String, (Vec<usize>, Tensor<1>)>),
    /// No tensors: every read answers zeros and is recorded as (name, HF shape).
    Probe(Mutex<Vec<(String, Vec<usize>)>>),
}

/// Name used in messages about an in-memory checkpoint, where a file path would be.
const IN_MEMORY: &str = "in-memory checkpoint";
/// Name used in messages about a probing checkpoint.
const PROBE: &str = "probing checkpoint";

/// One stored tensor, undecoded.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let shard_paths = disp_io::hf_folder::weight_files(dir)?;
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for path in shard_paths {
            let file = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the map is read-only; a file changed by another process underneath us is
            // outside what any loader can guard against.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| anyhow!("{}: corrupt or truncated safetensors file: {e}", path.display()))?;
            for name in tensors.names() {
                location.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Self { files, location, layout: None, memory: None })
    }

    /// A checkpoint over tensors in memory: name -> (HF shape, flat values). Reads return
    /// `flat.reshape(shape)` (matrices `reshape([out, in]).transpose()`) without copying, so a
    /// model loaded from it on `device.autodiff()` is differentiable in these tensors.
    pub fn from_tensors(tensors: HashMap<String, (Vec<usize>, Tensor<1>)>) -> Result<Self> {
        for (name, (shape, flat)) in &tensors {
            let needed: usize = shape.iter().product();
            if flat.dims()[0] != needed {
                bail!("{IN_MEMORY}: tensor '{name}' holds {} values, its shape {shape:?} needs {needed}", flat.dims()[0]);
            }
        }
        Ok(Self { files: Vec::new(), location: HashMap::new(), layout: None, memory: Some(MemorySource::Tensors(tensors)) })
    }

    /// A checkpoint that holds every tensor a loader asks for (zeros of the requested shape) and
    /// records each request; after loading a model with it, [`Self::probed`] lists exactly the
    /// tensors that family reads for that config.
    pub fn probe() -> Self {
        Self { files: Vec::new(), location: HashMap::new(), layout: None, memory: Some(MemorySource::Probe(Mutex::new(Vec::new()))) }
    }

    /// The (name, HF shape) of every tensor read so far from a [`Self::probe`] checkpoint, in
    /// the order first read; empty for other checkpoints.
    pub fn probed(&self) -> Vec<(String, Vec<usize>)> {
        let Some(MemorySource::Probe(reads)) = &self.memory else { return Vec::new() };
        let reads = reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen = std::collections::HashSet::new();
        reads.iter().filter(|(name, _)| seen.insert(name.clone())).cloned().collect()
    }

    /// Marks the checkpoint as a pruned folder: loaders then expect block linears cut to
    /// `layout`'s index sets.
    pub fn set_pruned_layout(&mut self, layout: PrunedLayout) {
        self.layout = Some(layout);
    }

    /// The kept positions of block `layer` when this is a pruned folder.
    pub fn kept_indices(&self, layer: usize, device: &Device) -> Option<IndexTensors> {
        let kept = self.layout.as_ref()?.layers.get(layer)?;
        Some(IndexTensors::new(kept, device))
    }

    /// The shape `name` is stored with, given the shape of the dense tensor.
    fn stored_shape(&self, name: &str, dense_shape: &[usize]) -> Vec<usize> {
        match &self.layout {
            Some(layout) => layout.stored_shape(name, dense_shape),
            None => dense_shape.to_vec(),
        }
    }

    /// [`Self::stored_shape`] as an array of the dense shape's rank.
    fn stored_rank<const D: usize>(&self, name: &str, dense_shape: &[usize]) -> Result<[usize; D]> {
        self.stored_shape(name, dense_shape)
            .try_into()
            .map_err(|_| anyhow!("{}: tensor '{name}' is stored with another rank than {D}", self.describe()))
    }

    /// The stored bytes of a tensor, for copying it without decoding.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (path, map) = self.file_of(name)?;
        // Validated when opened; parsed again here (cheap: the header only) to borrow the data.
        let tensors = SafeTensors::deserialize(map).map_err(|e| anyhow!("{}: corrupt or truncated safetensors file: {e}", path.display()))?;
        let view = tensors.tensor(name).map_err(|e| anyhow!("{}: tensor '{name}': {e}", path.display()))?;
        Ok(RawTensor { dtype: view.dtype(), shape: view.shape().to_vec(), bytes: view.data() })
    }

    /// Fails, naming the file and the tensor, when a float tensor holds NaN or ±Inf: such a
    /// weight would silently poison every output.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        let raw = self.raw(name)?;
        match first_non_finite(raw.dtype, raw.bytes) {
            Some((at, value)) => {
                bail!("{}: tensor '{name}' holds {value} at flat index {at}; weights must be finite", self.file_of(name)?.0.display())
            }
            None => Ok(()),
        }
    }

    /// Reads an integer tensor (I64 or I32) as i64, checking its shape.
    pub fn read_i64(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let (path, _) = self.file_of(name)?;
        let raw = self.raw(name)?;
        if raw.shape != shape {
            bail!("{}: tensor '{name}' has shape {:?}, expected {:?}", path.display(), raw.shape, shape);
        }
        Ok(match raw.dtype {
            Dtype::I64 => raw.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(le_bytes(b))).collect(),
            Dtype::I32 => raw.bytes.chunks_exact(4).map(|b| i64::from(i32::from_le_bytes(le_bytes(b)))).collect(),
            other => bail!("{}: tensor '{name}' has dtype {other:?}, expected I64 or I32", path.display()),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.memory {
            Some(MemorySource::Tensors(tensors)) => tensors.contains_key(name),
            Some(MemorySource::Probe(_)) => true,
            None => self.location.contains_key(name),
        }
    }

    /// What this checkpoint can hold, for [`crate::RawConfig::validate`].
    pub fn capacity(&self) -> CheckpointCapacity {
        if self.memory.is_some() {
            return CheckpointCapacity::Memory;
        }
        let bytes = self.files.iter().map(|(_, map)| map.len() as u64).sum();
        CheckpointCapacity::Files { bytes, tensors: self.location.len(), pruned: self.layout.is_some() }
    }

    /// The weight files, in the order they were opened.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// The stored tensor names (none for a probe, which holds whatever is asked for).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let in_memory = match &self.memory {
            Some(MemorySource::Tensors(tensors)) => Some(tensors.keys()),
            _ => None,
        };
        self.location.keys().chain(in_memory.into_iter().flatten()).map(String::as_str)
    }

    fn file_of(&self, name: &str) -> Result<&(PathBuf, Mmap)> {
        if self.memory.is_some() && self.contains(name) {
            bail!("{}: tensor '{name}' has no stored bytes", self.describe());
        }
        let idx = self.location.get(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.describe()))?;
        self.files.get(*idx).ok_or_else(|| anyhow!("{}: tensor '{name}' has no file", self.describe()))
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(MemorySource::Tensors(tensors)) = &self.memory {
            return tensors.get(name).map(|(shape, _)| shape.clone()).ok_or_else(|| anyhow!("{IN_MEMORY}: missing tensor '{name}'"));
        }
        Ok(self.raw(name)?.shape)
    }

    /// Reads a tensor as f32 values, checking its stored shape (`shape` exactly, or cut to the
    /// index sets of a pruned folder).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(memory) = &self.memory {
            // Read where the tensor lives: no device to move it to.
            let device = match memory {
                MemorySource::Tensors(tensors) => tensors.get(name).map(|(_, flat)| flat.device()).unwrap_or_default(),
                MemorySource::Probe(_) => Device::default(),
            };
            let flat = self.memory_tensor(memory, name, shape, &device)?;
            return flat.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow!("{}: tensor '{name}': {e:?}", self.describe()));
        }
        self.read_stored(name, shape, DType::F32, None)?.try_into_vec::<f32>().map_err(|e| anyhow!("{}: tensor '{name}': {e:?}", self.describe()))
    }

    /// A tensor on the device as f32, shape checked (norms, biases: small tensors computed with).
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        if let Some(memory) = &self.memory {
            let stored: [usize; D] = self.stored_rank(name, &shape)?;
            return Ok(self.memory_tensor(memory, name, &shape, device)?.reshape(stored));
        }
        let _: [usize; D] = self.stored_rank(name, &shape)?;
        let data = self.read_stored(name, &shape, DType::F32, None)?;
        Ok(Tensor::<D>::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(DType::F32)))
    }

    /// A tensor on the device at its stored precision (see [`weight_dtype`]), shape checked: for
    /// the large matrices (embeddings), which are cast where they are used.
    pub fn tensor_stored<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        if self.memory.is_some() {
            return self.tensor(name, shape, device);
        }
        let _: [usize; D] = self.stored_rank(name, &shape)?;
        let dtype = weight_dtype(self.raw(name)?.dtype, device);
        let data = self.read_stored(name, &shape, dtype, None)?;
        Ok(Tensor::<D>::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(dtype)))
    }

    /// An HF `[out, in]` matrix, transposed to the `[in, out]` layout our matmuls use, at its
    /// stored precision (see [`weight_dtype`]; [`crate::layers::Linear::forward`] casts it to the
    /// activations' dtype). In a pruned folder `inputs`/`outputs` are the dense widths; the result
    /// has the stored (cut) ones. The transposition happens while the mapped bytes are decoded:
    /// each matrix is copied once.
    pub fn matrix_in_out(&self, name: &str, inputs: usize, outputs: usize, device: &Device) -> Result<Tensor<2>> {
        if let Some(memory) = &self.memory {
            let flat = self.memory_tensor(memory, name, &[outputs, inputs], device)?;
            let [outputs, inputs]: [usize; 2] = self.stored_rank(name, &[outputs, inputs])?;
            return Ok(flat.reshape([outputs, inputs]).transpose());
        }
        let [rows, cols]: [usize; 2] = self.stored_rank(name, &[outputs, inputs])?;
        let dtype = weight_dtype(self.raw(name)?.dtype, device);
        let data = self.read_stored(name, &[outputs, inputs], dtype, Some((rows, cols)))?;
        Ok(Tensor::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(dtype)))
    }

    /// Decodes the stored tensor `name` (shape checked against `shape`, or its cut in a pruned
    /// folder) into `dtype`, which is F32 or the stored float dtype, transposing a `[rows, cols]`
    /// matrix on the way when asked; refuses non-finite values. The mapped pages are then handed
    /// back to the kernel, so that the file does not stay resident beside the copy.
    fn read_stored(&self, name: &str, shape: &[usize], dtype: DType, transpose: Option<(usize, usize)>) -> Result<TensorData> {
        let (path, map) = self.file_of(name)?;
        let view = self.raw(name)?;
        let expected = self.stored_shape(name, shape);
        if view.shape != expected {
            let why = if expected != shape { " (cut to the index sets in config.json)" } else { "" };
            bail!("{}: tensor '{name}' has shape {:?}, expected {:?}{why}", path.display(), view.shape, expected);
        }
        if let Some((at, value)) = first_non_finite(view.dtype, view.bytes) {
            bail!("{}: tensor '{name}' holds {value} at flat index {at}; weights must be finite", path.display());
        }
        let out_shape = match transpose {
            Some((rows, cols)) => vec![cols, rows],
            None => expected.clone(),
        };
        let bytes = view.bytes;
        let data = match (view.dtype, dtype) {
            (Dtype::F32, DType::F32) => TensorData::new(gather(bytes, transpose, |b: [u8; 4]| f32::from_le_bytes(b)), out_shape),
            (Dtype::BF16, DType::F32) => TensorData::new(gather(bytes, transpose, |b: [u8; 2]| half::bf16::from_le_bytes(b).to_f32()), out_shape),
            (Dtype::F16, DType::F32) => TensorData::new(gather(bytes, transpose, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32()), out_shape),
            (Dtype::BF16, DType::BF16) => TensorData::new(gather(bytes, transpose, half::bf16::from_le_bytes), out_shape),
            (Dtype::F16, DType::F16) => TensorData::new(gather(bytes, transpose, half::f16::from_le_bytes), out_shape),
            (stored, _) => bail!("{}: tensor '{name}' has unsupported dtype {stored:?} (expected F32, F16 or BF16)", path.display()),
        };
        release_pages(map, bytes);
        Ok(data)
    }

    /// The flat tensor for `name` from a checkpoint in memory, checked against the stored shape
    /// expected for the dense `shape` (a probe records the read and answers zeros).
    fn memory_tensor(&self, memory: &MemorySource, name: &str, shape: &[usize], device: &Device) -> Result<Tensor<1>> {
        let expected = self.stored_shape(name, shape);
        match memory {
            MemorySource::Probe(reads) => {
                reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((name.to_string(), shape.to_vec()));
                Ok(Tensor::zeros([expected.iter().product::<usize>()], device))
            }
            MemorySource::Tensors(tensors) => {
                let (stored, flat) = tensors.get(name).ok_or_else(|| anyhow!("{IN_MEMORY}: missing tensor '{name}'"))?;
                if *stored != expected {
                    let why = if expected != shape { " (cut to the index sets in config.json)" } else { "" };
                    bail!("{IN_MEMORY}: tensor '{name}' has shape {stored:?}, expected {expected:?}{why}");
                }
                // Device equality ignores autodiff: tensors on `device.autodiff()` stay as they are.
                Ok(if flat.device() == *device { flat.clone() } else { flat.clone().to_device(device) })
            }
        }
    }

    /// The first file's path (or what the checkpoint is, when not files), for messages.
    pub fn describe(&self) -> String {
        match &self.memory {
            Some(MemorySource::Tensors(_)) => IN_MEMORY.to_string(),
            Some(MemorySource::Probe(_)) => PROBE.to_string(),
            None => self.files.first().map(|(p, _)| p.display().to_string()).unwrap_or_default(),
        }
    }
}

/// The little-endian bytes of a chunk of exactly `N` (what `chunks_exact(N)` yields).
fn le_bytes<const N: usize>(chunk: &[u8]) -> [u8; N] {
    let mut bytes = [0u8; N];
    bytes.copy_from_slice(chunk);
    bytes
}

/// The dtype a stored float matrix keeps on `device`: its own (F32, F16, BF16) where the
/// device computes with it, else F32 (e.g. bf16 on a Vulkan device that only stores it).
pub fn weight_dtype(stored: Dtype, device: &Device) -> DType {
    let dtype = match stored {
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        _ => DType::F32,
    };
    if dtype == DType::F32 || device.supports_dtype(dtype) {
        dtype
    } else {
        DType::F32
    }
}

/// The first NaN or ±Inf of a float tensor's bytes (flat index, value), read from the bit
/// patterns without decoding the tensor; `None` for finite or non-float tensors.
fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, f32)> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(le_bytes(b))).enumerate().find(|(_, v)| !v.is_finite()),
        // An all-ones exponent is Inf or NaN.
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes(le_bytes(b)))
            .position(|bits| bits & 0x7f80 == 0x7f80)
            .and_then(|at| bytes.get(2 * at..2 * at + 2).map(|b| (at, half::bf16::from_le_bytes(le_bytes(b)).to_f32()))),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes(le_bytes(b)))
            .position(|bits| bits & 0x7c00 == 0x7c00)
            .and_then(|at| bytes.get(2 * at..2 * at + 2).map(|b| (at, half::f16::from_le_bytes(le_bytes(b)).to_f32()))),
        _ => None,
    }
}

/// Decodes little-endian elements of `N` bytes, transposing a row-major `[rows, cols]` to
/// `[cols, rows]` when asked (blocked for cache locality), in one pass into one allocation.
// `bytes` holds `rows * cols` elements (shape-checked by the caller); indexes stay below that.
#[allow(clippy::indexing_slicing)]
fn gather<const N: usize, T: Copy + Default>(bytes: &[u8], transpose: Option<(usize, usize)>, decode: impl Fn([u8; N]) -> T) -> Vec<T> {
    let element = |i: usize| decode(le_bytes(&bytes[i * N..(i + 1) * N]));
    let count = bytes.len() / N;
    let Some((rows, cols)) = transpose else { return (0..count).map(element).collect() };
    const TILE: usize = 32;
    assert_eq!(count, rows * cols, "transpose of {rows}x{cols} values");
    let mut out = vec![T::default(); count];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = element(r * cols + c);
                }
            }
        }
    }
    out
}

/// Hands the pages of `bytes` (a range of `map`) back to the kernel once they are decoded:
/// touched pages of a file map count in the process's resident memory, so without this a loaded
/// model would be resident twice. The file stays in the page cache; a later read faults it in.
fn release_pages(map: &Mmap, bytes: &[u8]) {
    #[cfg(unix)]
    {
        let offset = (bytes.as_ptr() as usize).wrapping_sub(map.as_ptr() as usize);
        if offset <= map.len() && bytes.len() <= map.len() - offset {
            // SAFETY: the map is private and read-only, so MADV_DONTNEED only drops clean pages,
            // which read back unchanged from the file; no reference into them outlives this call's
            // callers' decode (they hold owned copies).
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len()) };
        }
    }
}

/// Row-major `[rows, cols]` to `[cols, rows]`, blocked for cache locality. `values` must hold
/// `rows * cols` values (callers pass what a shape-checked read returned).
// Indexes below `rows * cols`, asserted; not file contents.
#[allow(clippy::indexing_slicing)]
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(values.len(), rows * cols, "transpose of {rows}x{cols} values");
    let mut out = vec![0f32; values.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    #[test]
    fn transpose_moves_every_element() {
        let v: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let t = super::transpose(&v, 35, 70);
        for r in 0..35 {
            for c in 0..70 {
                assert_eq!(t[c * 35 + r], v[r * 70 + c]);
            }
        }
    }
}

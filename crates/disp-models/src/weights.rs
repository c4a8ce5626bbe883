//! Reading Hugging Face safetensors checkpoints (single file or sharded with an index) into f32
//! tensors, with errors that name the file, the tensor and the problem.
//!
//! burn-import no longer reads safetensors (it is ONNX-only in burn 0.22); we read the files
//! with the `safetensors` crate over a memory map, which also lets us check shapes ourselves and
//! cut or transpose weights while loading.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// The weight files of one checkpoint folder.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            read_shard_list(&index)?.into_iter().map(|f| dir.join(f)).collect()
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for path in shard_paths {
            let file = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the map is read-only; a file changed by another process underneath us is
            // outside what any loader can guard against.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let tensors = SafeTensors::deserialize(&map)
                .map_err(|e| anyhow!("{}: corrupt or truncated safetensors file: {e}", path.display()))?;
            for name in tensors.names() {
                location.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Self { files, location })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    fn file_of(&self, name: &str) -> Result<&(PathBuf, Mmap)> {
        let idx = self.location.get(name).ok_or_else(|| {
            let shown = self.files.first().map(|(p, _)| p.display().to_string()).unwrap_or_default();
            anyhow!("{shown}: missing tensor '{name}'")
        })?;
        Ok(&self.files[*idx])
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (_, map) = self.file_of(name)?;
        let tensors = SafeTensors::deserialize(map).expect("validated when opened");
        Ok(tensors.tensor(name).expect("listed when opened").shape().to_vec())
    }

    /// Reads a tensor as f32 values, checking its shape.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (path, map) = self.file_of(name)?;
        let tensors = SafeTensors::deserialize(map).expect("validated when opened");
        let view = tensors.tensor(name).expect("listed when opened");
        if view.shape() != shape {
            bail!("{}: tensor '{name}' has shape {:?}, expected {:?}", path.display(), view.shape(), shape);
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => bail!("{}: tensor '{name}' has unsupported dtype {other:?} (expected F32, F16 or BF16)", path.display()),
        };
        Ok(values)
    }

    /// A tensor on the device, shape checked.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        let values = self.read_f32(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// An HF `[out, in]` matrix, transposed to the `[in, out]` layout our matmuls use.
    pub fn matrix_in_out(&self, name: &str, inputs: usize, outputs: usize, device: &Device) -> Result<Tensor<2>> {
        let values = self.read_f32(name, &[outputs, inputs])?;
        Ok(Tensor::from_data(TensorData::new(transpose(&values, outputs, inputs), [inputs, outputs]), device))
    }

    /// The first file's path, for messages.
    pub fn describe(&self) -> String {
        self.files.first().map(|(p, _)| p.display().to_string()).unwrap_or_default()
    }
}

fn read_shard_list(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no 'weight_map' object", index.display()))?;
    let mut shards = BTreeMap::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| anyhow!("{}: 'weight_map' values must be file names", index.display()))?;
        shards.insert(file.to_string(), ());
    }
    Ok(shards.into_keys().collect())
}

/// Row-major `[rows, cols]` to `[cols, rows]`, blocked for cache locality.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
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

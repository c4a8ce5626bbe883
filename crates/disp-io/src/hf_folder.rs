//! Hugging Face folders on disk: which safetensors files hold the weights and the tensor shapes
//! their headers declare (read without loading any tensor data), and the one writer of
//! `config.json` and `model.safetensors` that the GGUF converter, the exporter and the tiny-model
//! trainer share.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The weight files of `dir`: `model.safetensors`, or the shards named in
/// `model.safetensors.index.json` (sorted, each once).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        bail!("{}: no {SINGLE_FILE} or {SHARD_INDEX}", dir.display());
    }
    Ok(shard_names(&index)?.into_iter().map(|name| dir.join(name)).collect())
}

/// The distinct file names the `weight_map` of a shard index points to, sorted.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", index.display()))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| anyhow!("{}: no 'weight_map' object", index.display()))?;
    let mut shards = BTreeSet::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| anyhow!("{}: 'weight_map' values must be file names", index.display()))?;
        // A shard is a file beside the index, never a path elsewhere.
        if file.is_empty() || Path::new(file).components().count() != 1 || file == ".." {
            bail!("{}: 'weight_map' names '{file}', which is not a file name beside the index", index.display());
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        bail!("{}: 'weight_map' is empty", index.display());
    }
    Ok(shards.into_iter().collect())
}

/// Every tensor's (name, shape) as the headers of `dir`'s weight files declare them.
pub fn tensor_shapes(dir: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut shapes = Vec::new();
    for path in weight_files(dir)? {
        let file = std::fs::File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the map is read-only and dropped before returning; a file changed underneath
        // would at worst give a wrong header, which the parser rejects or reports.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let (_, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| anyhow!("{}: corrupt or truncated safetensors header: {e}", path.display()))?;
        for (name, info) in metadata.tensors() {
            shapes.push((name, info.shape.clone()));
        }
    }
    shapes.sort();
    Ok(shapes)
}

/// The number of values all weight files of `dir` hold (I64 index tensors included).
pub fn parameter_count(dir: &Path) -> Result<u64> {
    Ok(tensor_shapes(dir)?.iter().map(|(_, shape)| shape.iter().product::<usize>() as u64).sum())
}

/// Writes `value` as pretty JSON with a final newline (how transformers writes `config.json`).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `tensors` as `dir/model.safetensors` with the `format: pt` metadata transformers
/// expects; returns the file's size in bytes.
pub fn write_weights<V: safetensors::View>(dir: &Path, tensors: Vec<(String, V)>) -> Result<u64> {
    let path = dir.join(SINGLE_FILE);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), &path).map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    Ok(std::fs::metadata(&path).with_context(|| format!("{}: cannot stat", path.display()))?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_index_names_files_beside_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(SHARD_INDEX);
        std::fs::write(&index, r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#).unwrap();
        assert_eq!(shard_names(&index).unwrap(), ["m-1.safetensors", "m-2.safetensors"]);
        std::fs::write(&index, r#"{"weight_map": {"a": "../secret.safetensors"}}"#).unwrap();
        let err = shard_names(&index).unwrap_err().to_string();
        assert!(err.contains("not a file name beside the index"), "{err}");
        std::fs::write(&index, r#"{"weight_map": {}}"#).unwrap();
        assert!(shard_names(&index).unwrap_err().to_string().contains("empty"));
        assert!(weight_files(&dir.path().join("nowhere")).unwrap_err().to_string().contains("no model.safetensors"));
    }

    #[test]
    fn shapes_come_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0u8; 4 * 6];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data).unwrap();
        let bytes = write_weights(dir.path(), vec![("w".to_string(), view)]).unwrap();
        assert_eq!(bytes, std::fs::metadata(dir.path().join(SINGLE_FILE)).unwrap().len());
        assert_eq!(tensor_shapes(dir.path()).unwrap(), [("w".to_string(), vec![2, 3])]);
        assert_eq!(parameter_count(dir.path()).unwrap(), 6);
    }
}

//! A small GGUF writer, mainly for tests that need tiny model files.
//!
//! ```no_run
//! use disp_io::gguf::{writer::GgufWriter, GgmlType};
//! let mut w = GgufWriter::new();
//! w.metadata("general.architecture", "llama");
//! // ne is innermost first: 64 columns (inputs), 32 rows (outputs).
//! w.tensor_f32("blk.0.attn_q.weight", &[64, 32], GgmlType::Q4_1, &vec![0.5; 64 * 32]).unwrap();
//! w.write(std::path::Path::new("tiny.gguf")).unwrap();
//! ```
use std::path::Path;

use anyhow::{ensure, Context, Result};

use super::format::{GgmlType, MetadataArray, MetadataValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::quant;

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    ne: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory: metadata in insertion order, then tensors in insertion order.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// A GGUF v3 file with the default alignment of 32.
    pub fn new() -> Self {
        Self { version: 3, alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the version field (2 and 3 share one layout; other values make invalid files).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Uses a non-default alignment and records it as `general.alignment` (u32).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        assert!(alignment.is_power_of_two(), "GGUF alignment must be a power of two");
        self.alignment = alignment.into();
        self.metadata(ALIGNMENT_KEY, alignment)
    }

    /// Adds a metadata entry, replacing an earlier one with the same key.
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<MetadataValue>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Removes a metadata entry if present.
    pub fn remove_metadata(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// Adds a tensor from already encoded bytes. `ne` is innermost first (ggml order). Nothing
    /// is checked, so tests can build inconsistent files on purpose.
    pub fn tensor_raw(&mut self, name: impl Into<String>, ne: &[u64], ggml_type: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push(PendingTensor { name: name.into(), ne: ne.to_vec(), ggml_type, data });
        self
    }

    /// Adds a tensor from f32 values (row-major, innermost dimension `ne[0]` fastest), encoded
    /// as `ggml_type` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1) the way llama.cpp's reference
    /// quantisers do it.
    pub fn tensor_f32(&mut self, name: impl Into<String>, ne: &[u64], ggml_type: GgmlType, values: &[f32]) -> Result<&mut Self> {
        let name = name.into();
        let elements: u64 = ne.iter().product();
        ensure!(elements == values.len() as u64, "tensor {name}: ne {ne:?} holds {elements} values but {} were given", values.len());
        if let Some(per_block) = ggml_type.block_elements() {
            ensure!(ne.first().is_some_and(|n| n % per_block == 0), "tensor {name}: rows of {ggml_type} must be a multiple of {per_block} values");
        }
        let data = quant::quantize(ggml_type, values).with_context(|| format!("tensor {name}"))?;
        Ok(self.tensor_raw(name, ne, ggml_type, data))
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        let data_start = (out.len() as u64).next_multiple_of(self.alignment);
        for (t, offset) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + offset) as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()).with_context(|| format!("{}: cannot write", path.display()))
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.push(*v as u8),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => write_string(out, s),
        MetadataValue::Array(a) => write_array(out, a),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

fn write_array(out: &mut Vec<u8>, array: &MetadataArray) {
    out.extend_from_slice(&(array.element_type() as u32).to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    macro_rules! each_le {
        ($items:expr) => {
            for v in $items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
    }
    match array {
        MetadataArray::U8(v) => out.extend_from_slice(v),
        MetadataArray::I8(v) => out.extend(v.iter().map(|&b| b as u8)),
        MetadataArray::U16(v) => each_le!(v),
        MetadataArray::I16(v) => each_le!(v),
        MetadataArray::U32(v) => each_le!(v),
        MetadataArray::I32(v) => each_le!(v),
        MetadataArray::F32(v) => each_le!(v),
        MetadataArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        MetadataArray::String(v) => v.iter().for_each(|s| write_string(out, s)),
        MetadataArray::Array(v) => v.iter().for_each(|a| write_array(out, a)),
        MetadataArray::U64(v) => each_le!(v),
        MetadataArray::I64(v) => each_le!(v),
        MetadataArray::F64(v) => each_le!(v),
    }
}

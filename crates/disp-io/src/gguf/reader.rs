//! GGUF v2/v3 (little endian) reader over a memory map. Every offset and size is checked
//! against the file length before use, so a damaged file gives an error, never a panic.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;

use super::format::{value_type_name, GgmlType, MetadataArray, MetadataValue, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};

/// Nested arrays deeper than this are rejected (guards the recursive parser).
const MAX_ARRAY_NESTING: usize = 8;

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first (ggml's `ne`): `[cols, rows]` for a matrix.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset inside the data section.
    pub offset: u64,
    /// Absolute byte range of the tensor's data in the file.
    pub file_range: std::ops::Range<u64>,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The shape outermost first, as PyTorch/safetensors write it.
    pub fn shape_outermost_first(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file, memory mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. Errors are one line that starts with the path.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_unprefixed(path).map_err(|e| anyhow!("{}: {}", path.display(), crate::fsutil::one_line(&format!("{e:#}"))))
    }

    /// Like [`Self::open`] but the error does not name the file (the caller adds it).
    pub(crate) fn open_unprefixed(path: &Path) -> Result<Self> {
        let file = File::open(path).context("cannot open")?;
        let meta = file.metadata().context("cannot stat")?;
        ensure!(meta.is_file(), "not a regular file");
        // SAFETY: the map is read-only; like every mmap reader we assume nobody truncates or
        // rewrites the file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.context("cannot memory-map")?;
        let parsed = parse(&mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata_index: parsed.metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect(),
            metadata: parsed.metadata,
            tensors: parsed.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        let &i = self.metadata_index.get(key)?;
        self.metadata.get(i).map(|(_, value)| value)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (its range was validated when the file was opened; a range from
    /// another file gives no bytes, which every decoder refuses as the wrong size).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.file_range.start).unwrap_or(usize::MAX)..usize::try_from(info.file_range.end).unwrap_or(0);
        self.mmap.get(range).unwrap_or_default()
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
}

/// Reads little-endian values; `context` names what is being read for truncation errors.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    context: String,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let start = self.pos as u64;
        let end = start.checked_add(n).filter(|&end| end <= self.bytes.len() as u64);
        let Some(end) = end else {
            bail!("truncated: {} needs bytes {}..{} but the file has {}", self.context, start, start.saturating_add(n), self.bytes.len());
        };
        let (start, end) = (start as usize, end as usize);
        self.pos = end;
        self.bytes.get(start..end).ok_or_else(|| anyhow!("{}: bytes {start}..{end} out of range", self.context))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N as u64)?;
        bytes.try_into().map_err(|_| anyhow!("{}: expected {N} bytes, got {}", self.context, bytes.len()))
    }

    fn u8(&mut self) -> Result<u8> {
        let [byte] = self.array::<1>()?;
        Ok(byte)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn remaining(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let start = self.pos;
        let raw = self.take(len)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bail!("{}: string at byte {} is not valid UTF-8 ({e})", self.context, start),
        }
    }

    fn bool(&mut self) -> Result<bool> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => bail!("{}: bool at byte {at} has value {other}", self.context),
        }
    }

    fn value_type(&mut self) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| anyhow!("{}: unknown metadata value type {id} at byte {at}", self.context))
    }

    fn value(&mut self, value_type: ValueType, depth: usize) -> Result<MetadataValue> {
        Ok(match value_type {
            ValueType::U8 => MetadataValue::U8(self.u8()?),
            ValueType::I8 => MetadataValue::I8(self.u8()? as i8),
            ValueType::U16 => MetadataValue::U16(self.u16()?),
            ValueType::I16 => MetadataValue::I16(self.u16()? as i16),
            ValueType::U32 => MetadataValue::U32(self.u32()?),
            ValueType::I32 => MetadataValue::I32(self.u32()? as i32),
            ValueType::F32 => MetadataValue::F32(f32::from_bits(self.u32()?)),
            ValueType::Bool => MetadataValue::Bool(self.bool()?),
            ValueType::String => MetadataValue::String(self.string()?),
            ValueType::Array => MetadataValue::Array(self.array_value(depth)?),
            ValueType::U64 => MetadataValue::U64(self.u64()?),
            ValueType::I64 => MetadataValue::I64(self.u64()? as i64),
            ValueType::F64 => MetadataValue::F64(f64::from_bits(self.u64()?)),
        })
    }

    fn array_value(&mut self, depth: usize) -> Result<MetadataArray> {
        ensure!(depth < MAX_ARRAY_NESTING, "{}: arrays nested more than {MAX_ARRAY_NESTING} deep", self.context);
        let element_type = self.value_type()?;
        let count = self.u64()?;
        // Reject a count the rest of the file cannot possibly hold before allocating for it.
        let min_bytes = count.saturating_mul(element_type.min_encoded_size());
        if min_bytes > self.remaining() {
            bail!(
                "truncated: {} is an array of {count} {} values needing at least bytes {}..{} \
                 but the file has {}",
                self.context,
                value_type_name(element_type),
                self.pos,
                (self.pos as u64).saturating_add(min_bytes),
                self.bytes.len()
            );
        }
        let n = count as usize;
        macro_rules! collect {
            ($variant:ident, $read:expr) => {{
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push($read);
                }
                MetadataArray::$variant(items)
            }};
        }
        Ok(match element_type {
            ValueType::U8 => MetadataArray::U8(self.take(count)?.to_vec()),
            ValueType::I8 => MetadataArray::I8(self.take(count)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => collect!(U16, self.u16()?),
            ValueType::I16 => collect!(I16, self.u16()? as i16),
            ValueType::U32 => collect!(U32, self.u32()?),
            ValueType::I32 => collect!(I32, self.u32()? as i32),
            ValueType::F32 => collect!(F32, f32::from_bits(self.u32()?)),
            ValueType::Bool => collect!(Bool, self.bool()?),
            ValueType::String => collect!(String, self.string()?),
            ValueType::Array => collect!(Array, self.array_value(depth + 1)?),
            ValueType::U64 => collect!(U64, self.u64()?),
            ValueType::I64 => collect!(I64, self.u64()? as i64),
            ValueType::F64 => collect!(F64, f64::from_bits(self.u64()?)),
        })
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut cur = Cursor { bytes, pos: 0, context: "the GGUF header".to_string() };
    if bytes.len() < 4 {
        bail!("truncated: the GGUF magic needs bytes 0..4 but the file has {}", bytes.len());
    }
    let magic = cur.array::<4>()?;
    if magic != GGUF_MAGIC {
        let [a, b, c, d] = magic;
        bail!("not a GGUF file: bad magic {a:02x} {b:02x} {c:02x} {d:02x} (expected 'GGUF' = 47 47 55 46)");
    }
    let version = cur.u32()?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (only versions 2 and 3)"),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            bail!("big-endian GGUF files are not supported (version field reads {v:#x})")
        }
        v => bail!("unsupported GGUF version {v} (only versions 2 and 3)"),
    }
    let tensor_count = cur.u64()?;
    let kv_count = cur.u64()?;

    let mut metadata: Vec<(String, MetadataValue)> = Vec::new();
    let mut seen_keys: HashMap<String, ()> = HashMap::new();
    for i in 0..kv_count {
        cur.context = format!("metadata entry #{i} of {kv_count}");
        let key = cur.string()?;
        cur.context = format!("metadata value '{key}'");
        let value_type = cur.value_type()?;
        let value = cur.value(value_type, 0)?;
        if seen_keys.insert(key.clone(), ()).is_some() {
            bail!("duplicate metadata key '{key}'");
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, value)) => {
            let a = value.as_u64().ok_or_else(|| anyhow!("{ALIGNMENT_KEY} must be an integer, found {}", value.type_description()))?;
            ensure!(a > 0 && a.is_power_of_two(), "{ALIGNMENT_KEY} = {a} is not a power of two");
            a
        }
    };

    let mut tensors = Vec::new();
    let mut seen_names: HashMap<String, ()> = HashMap::new();
    for i in 0..tensor_count {
        cur.context = format!("tensor info #{i} of {tensor_count}");
        let name = cur.string()?;
        cur.context = format!("tensor info '{name}'");
        let n_dims = cur.u32()?;
        ensure!((1..=MAX_DIMS as u32).contains(&n_dims), "tensor {name} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})");
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(cur.u64()?);
        }
        let ggml_type = GgmlType(cur.u32()?);
        let offset = cur.u64()?;
        if seen_names.insert(name.clone(), ()).is_some() {
            bail!("duplicate tensor name '{name}'");
        }
        tensors.push(TensorInfo { name, ne, ggml_type, offset, file_range: 0..0 });
    }

    let header_end = cur.pos as u64;
    let data_offset = header_end.next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    for t in &mut tensors {
        let elements =
            t.ne.iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| anyhow!("tensor {} has dimensions {:?} whose product overflows", t.name, t.ne))?;
        let per_block = t.ggml_type.block_elements().ok_or_else(|| anyhow!("tensor {} has unknown GGUF type {}", t.name, t.ggml_type.0))?;
        let row = t.ne.first().copied().unwrap_or(0);
        ensure!(
            row % per_block == 0,
            "tensor {} of type {} has {row} values per row, not a multiple of its block size {per_block}",
            t.name,
            t.ggml_type
        );
        let size = t.ggml_type.bytes_for(elements).ok_or_else(|| anyhow!("tensor {} has dimensions {:?} whose byte size overflows", t.name, t.ne))?;
        ensure!(t.offset % alignment == 0, "tensor {} has offset {} which is not a multiple of the alignment {alignment}", t.name, t.offset);
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.file_range = start..end,
            _ => bail!(
                "truncated: tensor {} needs bytes {}..{} but the file has {file_len}",
                t.name,
                data_offset.saturating_add(t.offset),
                data_offset.saturating_add(t.offset).saturating_add(size)
            ),
        }
    }

    Ok(Parsed { version, alignment, data_offset, metadata, tensors })
}

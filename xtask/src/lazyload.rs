//! R lazy-load databases (`Rdata.rdx` + `Rdata.rdb`, as installed for a package's `data/`).
//!
//! The `.rdx` file is a compressed serialization of
//! `list(variables = list(name = c(offset, length), ...), references = ..., compressed = ...)`;
//! each `.rdb` entry at `offset` is `length` bytes: a 4-byte big-endian uncompressed size followed
//! by a zlib stream of the serialized object (for `compressed = TRUE`).

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::{GzDecoder, ZlibDecoder};

use crate::rds::{self, RObject, RValue};

/// Where an object lives in the `.rdb` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug)]
pub struct Index {
    pub variables: BTreeMap<String, Entry>,
}

/// Decompresses gzip or zlib data, or returns the input if it is neither.
pub fn decompress_any(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match bytes {
        [0x1f, 0x8b, ..] => {
            GzDecoder::new(bytes).read_to_end(&mut out).context("gzip stream")?;
        }
        [b0, b1, ..] if b0 & 0x0f == 8 && (u16::from(*b0) << 8 | u16::from(*b1)) % 31 == 0 => {
            ZlibDecoder::new(bytes).read_to_end(&mut out).context("zlib stream")?;
        }
        _ => out.extend_from_slice(bytes),
    }
    Ok(out)
}

/// Parses the `.rdx` index (compressed or not).
pub fn read_index(rdx: &[u8]) -> Result<Index> {
    let raw = decompress_any(rdx)?;
    let obj = rds::unserialize(&raw).context("unserializing the index")?;
    let vars = obj.get("variables").ok_or_else(|| anyhow!("index has no `variables` element"))?;
    match obj.get("compressed").map(|c| &c.value) {
        Some(RValue::Lgl(v)) | Some(RValue::Int(v)) if v.first() == Some(&1) => {}
        Some(other) => bail!("unsupported lazy-load compression {other:?} (only zlib, TRUE/1)"),
        None => bail!("index has no `compressed` element"),
    }
    let names = vars.names().ok_or_else(|| anyhow!("index `variables` has no names"))?;
    let RValue::List(items) = &vars.value else {
        bail!("index `variables` is a {}, not a list", vars.type_name());
    };
    ensure!(names.len() == items.len(), "index `variables` names/values length mismatch");
    let mut variables = BTreeMap::new();
    for (name, item) in names.into_iter().zip(items) {
        let pair: Vec<f64> = match &item.value {
            RValue::Int(v) => v.iter().map(|&x| x as f64).collect(),
            RValue::Real(v) => v.clone(),
            _ => bail!("index entry `{name}` is a {}, not c(offset, length)", item.type_name()),
        };
        ensure!(pair.len() == 2 && pair.iter().all(|&x| x >= 0.0 && x.fract() == 0.0), "index entry `{name}` is not c(offset, length): {pair:?}");
        variables.insert(name, Entry { offset: pair[0] as u64, length: pair[1] as u64 });
    }
    Ok(Index { variables })
}

/// Reads and unserializes one object from the `.rdb` bytes.
pub fn read_object(rdb: &[u8], entry: Entry) -> Result<RObject> {
    let start = entry.offset as usize;
    let end = start
        .checked_add(entry.length as usize)
        .filter(|&e| e <= rdb.len())
        .ok_or_else(|| anyhow!("entry [{}, +{}] is beyond the end of the .rdb ({} bytes)", entry.offset, entry.length, rdb.len()))?;
    let chunk = &rdb[start..end];
    ensure!(chunk.len() > 4, "entry at {} is only {} bytes", entry.offset, chunk.len());
    let expected = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
    let mut raw = Vec::with_capacity(expected);
    ZlibDecoder::new(&chunk[4..]).read_to_end(&mut raw).with_context(|| format!("zlib stream of the entry at {}", entry.offset))?;
    ensure!(raw.len() == expected, "entry at {} inflates to {} bytes, header says {expected}", entry.offset, raw.len());
    rds::unserialize(&raw).with_context(|| format!("unserializing the entry at {}", entry.offset))
}

/// Reads a character vector object; NA elements are returned as `None`.
pub fn read_strings(rdb: &[u8], index: &Index, name: &str) -> Result<Vec<Option<String>>> {
    let entry = *index.variables.get(name).ok_or_else(|| anyhow!("object `{name}` is not in the index"))?;
    let obj = read_object(rdb, entry).with_context(|| format!("object `{name}`"))?;
    match obj.value {
        RValue::Str(v) => Ok(v),
        _ => bail!("object `{name}` is a {}, not a character vector", obj.type_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rds::tests::{lazyload_index_bytes, W};
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn zlib(b: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn rdb_entry(obj: &[u8]) -> Vec<u8> {
        let mut v = (obj.len() as u32).to_be_bytes().to_vec();
        v.extend(zlib(obj));
        v
    }

    /// Builds a two-object database and reads it back.
    #[test]
    fn round_trip_database() {
        let mut a = W::header_v3();
        a.strsxp(&["Chapter 1", "", "Emma Woodhouse, handsome, clever, and rich"], false);
        let mut b = W::header_v3();
        b.strsxp(&["Persuasion"], false);
        let ea = rdb_entry(&a.0);
        let eb = rdb_entry(&b.0);
        let mut rdb = ea.clone();
        rdb.extend(&eb);
        let rdx = gzip(&lazyload_index_bytes(&[("emma", 0, ea.len() as i32), ("persuasion", ea.len() as i32, eb.len() as i32)], 1));
        let index = read_index(&rdx).unwrap();
        assert_eq!(index.variables.len(), 2);
        let emma = read_strings(&rdb, &index, "emma").unwrap();
        assert_eq!(emma[1].as_deref(), Some(""));
        assert_eq!(emma.len(), 3);
        let p = read_strings(&rdb, &index, "persuasion").unwrap();
        assert_eq!(p, vec![Some("Persuasion".to_string())]);
        let e = read_strings(&rdb, &index, "sanditon").unwrap_err().to_string();
        assert!(e.contains("not in the index"), "{e}");
    }

    #[test]
    fn index_may_be_zlib_or_plain() {
        let plain = lazyload_index_bytes(&[("x", 0, 5)], 1);
        assert_eq!(read_index(&plain).unwrap().variables["x"], Entry { offset: 0, length: 5 });
        assert_eq!(read_index(&zlib(&plain)).unwrap().variables["x"].length, 5);
    }

    #[test]
    fn other_compression_is_rejected() {
        let rdx = lazyload_index_bytes(&[("x", 0, 5)], 0);
        let e = read_index(&rdx).unwrap_err().to_string();
        assert!(e.contains("compression"), "{e}");
    }

    #[test]
    fn bad_entries_are_errors() {
        let mut a = W::header_v3();
        a.strsxp(&["abc"], false);
        let mut ent = rdb_entry(&a.0);
        let len = ent.len() as u64;
        let e = read_object(&ent, Entry { offset: 0, length: len + 1 }).unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");
        ent[3] ^= 1; // wrong uncompressed size
        let e = read_object(&ent, Entry { offset: 0, length: len }).unwrap_err();
        assert!(e.to_string().contains("header says"), "{e}");
    }
}

//! A small reader for R's serialization format (the XDR flavour written by `serialize()`,
//! `saveRDS()` and the lazy-load databases of installed packages).
//!
//! Only what data packages need is supported: NULL, symbols (and references to them), pairlists
//! with tags and attributes, character vectors (with the CHARSXP encoding flags and NA),
//! logical, integer and double vectors, generic vectors (lists), and the compact-sequence and
//! wrapper ALTREP classes R >= 3.5 may write. Anything else (environments, closures, bytecode,
//! ...) is reported as unsupported, naming the type code and the byte offset.
//!
//! Layout reminders (see R's `src/main/serialize.c` for the authoritative description):
//! - header: `X\n`, then big-endian i32s: format version (2 or 3), writer R version, minimal
//!   reader R version; version 3 adds the native encoding as (i32 length, bytes).
//! - every item starts with an i32 of flags: bits 0..8 the type, bit 8 "is object", bit 9 "has
//!   attributes", bit 10 "has tag", bits 12.. the "levels" (for CHARSXP: encoding flags). For a
//!   REFSXP the reference index is stored in bits 8.. (0 means "read it from the next i32").
//! - vector lengths are an i32; -1 announces a long length stored as two i32s (upper, lower).
//!   For a CHARSXP, length -1 is NA_STRING.
//! - vectors store their attributes (a pairlist) after the data; pairlist cells store
//!   attributes, tag, CAR and then the CDR (usually the next cell).

use anyhow::{anyhow, bail, ensure, Result};

// SEXP type codes.
const SYMSXP: u32 = 1;
const LISTSXP: u32 = 2;
const CHARSXP: u32 = 9;
const LGLSXP: u32 = 10;
const INTSXP: u32 = 13;
const REALSXP: u32 = 14;
const STRSXP: u32 = 16;
const VECSXP: u32 = 19;
const EXPRSXP: u32 = 20;
// Pseudo-types used only by the serializer.
const ALTREP_SXP: u32 = 238;
const NILVALUE_SXP: u32 = 254;
const REFSXP: u32 = 255;

// Flag bits.
const IS_OBJECT: u32 = 1 << 8;
const HAS_ATTR: u32 = 1 << 9;
const HAS_TAG: u32 = 1 << 10;

// CHARSXP "levels" (encoding) bits.
const BYTES_MASK: u32 = 1 << 1;
const LATIN1_MASK: u32 = 1 << 2;
const UTF8_MASK: u32 = 1 << 3;
const ASCII_MASK: u32 = 1 << 6;

/// R's NA for integer and logical vectors.
#[allow(dead_code)] // matched by callers that look at vectors
pub const NA_INTEGER: i32 = i32::MIN;

const MAX_DEPTH: usize = 256;

/// A deserialized R object: a value plus its attributes (name, value), in stored order.
#[derive(Debug, Clone, PartialEq)]
pub struct RObject {
    pub value: RValue,
    pub attributes: Vec<(String, RObject)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RValue {
    Null,
    Symbol(String),
    /// A bare CHARSXP (only seen inside character vectors and symbols); `None` is NA.
    Char(Option<String>),
    /// Character vector; `None` is NA_character_.
    Str(Vec<Option<String>>),
    /// Logical vector: 0, 1 or [`NA_INTEGER`].
    Lgl(Vec<i32>),
    /// Integer vector; NA is [`NA_INTEGER`].
    Int(Vec<i32>),
    Real(Vec<f64>),
    /// Generic vector (`list()`), also used for expression vectors.
    List(Vec<RObject>),
    /// Pairlist cells as (tag, value).
    Pairlist(Vec<(Option<String>, RObject)>),
}

impl RObject {
    fn plain(value: RValue) -> Self {
        RObject { value, attributes: Vec::new() }
    }

    pub fn attr(&self, name: &str) -> Option<&RObject> {
        self.attributes.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The `names` attribute as strings (NA names become "").
    pub fn names(&self) -> Option<Vec<String>> {
        match &self.attr("names")?.value {
            RValue::Str(v) => Some(v.iter().map(|s| s.clone().unwrap_or_default()).collect()),
            _ => None,
        }
    }

    /// Element of a named list (or tagged pairlist) by name.
    pub fn get(&self, name: &str) -> Option<&RObject> {
        match &self.value {
            RValue::List(items) => {
                let names = self.names()?;
                names.iter().position(|n| n == name).and_then(|i| items.get(i))
            }
            RValue::Pairlist(cells) => cells.iter().find(|(t, _)| t.as_deref() == Some(name)).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.value {
            RValue::Null => "NULL",
            RValue::Symbol(_) => "symbol",
            RValue::Char(_) => "CHARSXP",
            RValue::Str(_) => "character",
            RValue::Lgl(_) => "logical",
            RValue::Int(_) => "integer",
            RValue::Real(_) => "double",
            RValue::List(_) => "list",
            RValue::Pairlist(_) => "pairlist",
        }
    }
}

/// Header information of a serialization.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: i32,
    pub writer_version: i32,
    pub min_reader_version: i32,
    /// Native encoding of the writer (format version 3 only).
    pub native_encoding: Option<String>,
}

/// Unserializes one object from an uncompressed XDR serialization (starting with `X\n`).
pub fn unserialize(bytes: &[u8]) -> Result<RObject> {
    unserialize_with_header(bytes).map(|(_, o)| o)
}

pub fn unserialize_with_header(bytes: &[u8]) -> Result<(Header, RObject)> {
    let mut r = Reader { buf: bytes, pos: 0, refs: Vec::new(), native_utf8: None, depth: 0 };
    let header = r.header()?;
    let obj = r.item()?;
    Ok((header, obj))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Reference table (only symbols are ever added: we support no environments).
    refs: Vec<String>,
    /// Whether the writer's native encoding is UTF-8 (None: not stated, format version 2).
    native_utf8: Option<bool>,
    depth: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| anyhow!("R data truncated: need {n} bytes at offset {} of {}", self.pos, self.buf.len()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn double(&mut self) -> Result<f64> {
        let b = self.take(8)?;
        Ok(f64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn header(&mut self) -> Result<Header> {
        let magic = self.take(2)?;
        match magic {
            b"X\n" => {}
            b"A\n" => bail!("R ASCII serialization is not supported (only XDR 'X\\n')"),
            b"B\n" => bail!("R native-binary serialization is not supported (only XDR 'X\\n')"),
            [0x1f, 0x8b] => bail!("R data is still gzip-compressed (decompress it first)"),
            _ => bail!("not an R serialization: starts with {:02x?}", magic),
        }
        let version = self.int()?;
        ensure!(version == 2 || version == 3, "unsupported R serialization version {version} (2 or 3 expected)");
        let writer_version = self.int()?;
        let min_reader_version = self.int()?;
        let native_encoding = if version == 3 {
            let n = self.int()?;
            ensure!((0..=64).contains(&n), "bad native-encoding length {n} in R header");
            let enc = String::from_utf8_lossy(self.take(n as usize)?).into_owned();
            let up = enc.to_ascii_uppercase();
            self.native_utf8 = Some(up == "UTF-8" || up == "UTF8");
            Some(enc)
        } else {
            None
        };
        Ok(Header { version, writer_version, min_reader_version, native_encoding })
    }

    /// Reads a length (with the long-vector escape) and checks it against the bytes left, given
    /// at least `min_elem_bytes` per element.
    fn length(&mut self, min_elem_bytes: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.int()?;
        let len: u64 = if n == -1 {
            let upper = self.int()? as u32 as u64;
            let lower = self.int()? as u32 as u64;
            (upper << 32) | lower
        } else {
            ensure!(n >= 0, "negative vector length {n} at offset {at}");
            n as u64
        };
        let left = (self.buf.len() - self.pos) as u64;
        ensure!(len.saturating_mul(min_elem_bytes as u64) <= left, "vector length {len} at offset {at} exceeds the {left} bytes left");
        Ok(len as usize)
    }

    fn item(&mut self) -> Result<RObject> {
        let flags = self.int()? as u32;
        self.item_with_flags(flags)
    }

    fn item_with_flags(&mut self, flags: u32) -> Result<RObject> {
        self.depth += 1;
        ensure!(self.depth <= MAX_DEPTH, "R data nested deeper than {MAX_DEPTH} levels");
        let r = self.item_inner(flags);
        self.depth -= 1;
        r
    }

    fn item_inner(&mut self, flags: u32) -> Result<RObject> {
        let at = self.pos - 4;
        let ty = flags & 0xff;
        let levels = flags >> 12;
        let has_attr = flags & HAS_ATTR != 0;
        let _is_object = flags & IS_OBJECT != 0;
        let value = match ty {
            NILVALUE_SXP => return Ok(RObject::plain(RValue::Null)),
            REFSXP => {
                let mut idx = (flags >> 8) as usize;
                if idx == 0 {
                    idx = self.int()? as usize;
                }
                let name = idx.checked_sub(1).and_then(|i| self.refs.get(i)).ok_or_else(|| anyhow!("bad R reference index {idx} at offset {at}"))?;
                return Ok(RObject::plain(RValue::Symbol(name.clone())));
            }
            SYMSXP => {
                let name = match self.item()?.value {
                    RValue::Char(Some(s)) => s,
                    other => bail!("symbol at offset {at} has no name (got {other:?})"),
                };
                self.refs.push(name.clone());
                return Ok(RObject::plain(RValue::Symbol(name)));
            }
            LISTSXP => return self.pairlist(flags),
            CHARSXP => {
                let n = self.int()?;
                if n == -1 {
                    RValue::Char(None)
                } else {
                    ensure!(n >= 0, "bad CHARSXP length {n} at offset {at}");
                    let bytes = self.take(n as usize)?;
                    RValue::Char(Some(self.decode_chars(bytes, levels, at)?))
                }
            }
            LGLSXP | INTSXP => {
                let n = self.length(4)?;
                let v = (0..n).map(|_| self.int()).collect::<Result<Vec<_>>>()?;
                if ty == LGLSXP {
                    RValue::Lgl(v)
                } else {
                    RValue::Int(v)
                }
            }
            REALSXP => {
                let n = self.length(8)?;
                RValue::Real((0..n).map(|_| self.double()).collect::<Result<Vec<_>>>()?)
            }
            STRSXP => {
                let n = self.length(4)?;
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    match self.item()?.value {
                        RValue::Char(s) => v.push(s),
                        other => bail!(
                            "element {i} of the character vector at offset {at} is not a \
                             CHARSXP ({other:?})"
                        ),
                    }
                }
                RValue::Str(v)
            }
            VECSXP | EXPRSXP => {
                let n = self.length(4)?;
                RValue::List((0..n).map(|_| self.item()).collect::<Result<Vec<_>>>()?)
            }
            ALTREP_SXP => return self.altrep(at),
            _ => bail!("unsupported R object type {ty} at offset {at}"),
        };
        let attributes = if has_attr { self.attributes(at)? } else { Vec::new() };
        Ok(RObject { value, attributes })
    }

    /// Reads a pairlist whose first cell's flags are `flags`. The first cell's attributes are
    /// the pairlist's attributes; the cells are read iteratively (pairlists can be long).
    fn pairlist(&mut self, mut flags: u32) -> Result<RObject> {
        let at = self.pos - 4;
        let mut cells = Vec::new();
        let mut attributes = Vec::new();
        loop {
            if flags & HAS_ATTR != 0 {
                let a = self.attributes(self.pos)?;
                if cells.is_empty() {
                    attributes = a;
                }
            }
            let tag = if flags & HAS_TAG != 0 {
                match self.item()?.value {
                    RValue::Symbol(s) => Some(s),
                    RValue::Null => None,
                    other => bail!("pairlist tag at offset {at} is not a symbol ({other:?})"),
                }
            } else {
                None
            };
            let car = self.item()?;
            cells.push((tag, car));
            let next = self.int()? as u32;
            match next & 0xff {
                LISTSXP => flags = next,
                NILVALUE_SXP => break,
                other => bail!("pairlist at offset {at} ends in type {other}, not NULL"),
            }
        }
        Ok(RObject { value: RValue::Pairlist(cells), attributes })
    }

    /// An attribute pairlist, as (name, value).
    fn attributes(&mut self, owner_at: usize) -> Result<Vec<(String, RObject)>> {
        let obj = self.item()?;
        match obj.value {
            RValue::Pairlist(cells) => {
                cells.into_iter().map(|(t, v)| t.map(|t| (t, v)).ok_or_else(|| anyhow!("untagged attribute of the object at {owner_at}"))).collect()
            }
            RValue::Null => Ok(Vec::new()),
            _ => bail!("attributes of the object at offset {owner_at} are not a pairlist"),
        }
    }

    fn decode_chars(&self, bytes: &[u8], levels: u32, at: usize) -> Result<String> {
        let latin1 = || bytes.iter().map(|&b| b as char).collect::<String>();
        if levels & LATIN1_MASK != 0 {
            return Ok(latin1());
        }
        if levels & (UTF8_MASK | ASCII_MASK) != 0 || self.native_utf8 == Some(true) {
            return String::from_utf8(bytes.to_vec()).map_err(|e| anyhow!("invalid UTF-8 in the string at offset {at}: {e}"));
        }
        if levels & BYTES_MASK != 0 {
            bail!("the string at offset {at} is marked as raw bytes");
        }
        // Native encoding unknown (format 2) or not UTF-8: accept UTF-8, else assume Latin-1.
        Ok(String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| latin1()))
    }

    /// ALTREP objects: (class info pairlist, state, attributes). Only the compact sequences
    /// and the wrapper classes are expanded.
    fn altrep(&mut self, at: usize) -> Result<RObject> {
        let info = self.item()?;
        let state = self.item()?;
        let attr = self.item()?;
        let class = match &info.value {
            RValue::Pairlist(cells) => match cells.first().map(|(_, v)| &v.value) {
                Some(RValue::Symbol(s)) => s.clone(),
                _ => bail!("ALTREP object at offset {at} has no class symbol"),
            },
            _ => bail!("ALTREP object at offset {at} has no class information"),
        };
        let value = match class.as_str() {
            "compact_intseq" | "compact_realseq" => {
                let (n, start, step) = match &state.value {
                    RValue::Real(v) if v.len() == 3 => (v[0], v[1], v[2]),
                    RValue::Int(v) if v.len() == 3 => (v[0] as f64, v[1] as f64, v[2] as f64),
                    _ => bail!("bad {class} state at offset {at}"),
                };
                ensure!(n >= 0.0 && n <= (self.buf.len() as f64) * 1024.0, "implausible {class} length {n} at offset {at}");
                let n = n as usize;
                if class == "compact_intseq" {
                    RValue::Int((0..n).map(|i| (start + step * i as f64) as i32).collect())
                } else {
                    RValue::Real((0..n).map(|i| start + step * i as f64).collect())
                }
            }
            c if c.starts_with("wrap_") => match state.value {
                RValue::List(mut v) if !v.is_empty() => v.swap_remove(0).value,
                _ => bail!("bad {class} state at offset {at}"),
            },
            _ => bail!("unsupported ALTREP class {class} at offset {at}"),
        };
        let attributes = match attr.value {
            RValue::Pairlist(cells) => cells.into_iter().map(|(t, v)| (t.unwrap_or_default(), v)).collect(),
            _ => Vec::new(),
        };
        Ok(RObject { value, attributes })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Hand assembly of XDR serializations for the tests.
    #[derive(Default)]
    pub(crate) struct W(pub Vec<u8>);

    impl W {
        pub fn header_v3() -> W {
            let mut w = W(b"X\n".to_vec());
            w.int(3).int(0x0004_0201).int(0x0003_0500).int(5);
            w.0.extend_from_slice(b"UTF-8");
            w
        }
        pub fn header_v2() -> W {
            let mut w = W(b"X\n".to_vec());
            w.int(2).int(0x0003_0601).int(0x0002_0300);
            w
        }
        pub fn int(&mut self, v: i32) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn flags(&mut self, ty: u32, levels: u32, attr: bool, tag: bool) -> &mut Self {
            let f = ty | (levels << 12) | if attr { HAS_ATTR } else { 0 } | if tag { HAS_TAG } else { 0 };
            self.int(f as i32)
        }
        pub fn nil(&mut self) -> &mut Self {
            self.int(NILVALUE_SXP as i32)
        }
        pub fn charsxp(&mut self, levels: u32, bytes: &[u8]) -> &mut Self {
            self.flags(CHARSXP, levels, false, false).int(bytes.len() as i32);
            self.0.extend_from_slice(bytes);
            self
        }
        pub fn na_string(&mut self) -> &mut Self {
            self.flags(CHARSXP, 0, false, false).int(-1)
        }
        pub fn sym(&mut self, name: &str) -> &mut Self {
            self.flags(SYMSXP, 0, false, false).charsxp(ASCII_MASK, name.as_bytes())
        }
        pub fn reference(&mut self, idx: u32) -> &mut Self {
            self.int((REFSXP | (idx << 8)) as i32)
        }
        pub fn strsxp(&mut self, items: &[&str], attr: bool) -> &mut Self {
            self.flags(STRSXP, 0, attr, false).int(items.len() as i32);
            for s in items {
                let lv = if s.is_ascii() { ASCII_MASK } else { UTF8_MASK };
                self.charsxp(lv, s.as_bytes());
            }
            self
        }
        pub fn intsxp(&mut self, v: &[i32], attr: bool) -> &mut Self {
            self.flags(INTSXP, 0, attr, false).int(v.len() as i32);
            for &x in v {
                self.int(x);
            }
            self
        }
        pub fn realsxp(&mut self, v: &[f64]) -> &mut Self {
            self.flags(REALSXP, 0, false, false).int(v.len() as i32);
            for &x in v {
                self.0.extend_from_slice(&x.to_be_bytes());
            }
            self
        }
        pub fn lglsxp(&mut self, v: &[i32]) -> &mut Self {
            self.flags(LGLSXP, 0, false, false).int(v.len() as i32);
            for &x in v {
                self.int(x);
            }
            self
        }
        pub fn vecsxp(&mut self, n: usize, attr: bool) -> &mut Self {
            self.flags(VECSXP, 0, attr, false).int(n as i32)
        }
        /// Start of a tagged pairlist cell; the caller writes the tag, the CAR, then the next
        /// cell or `nil()`.
        pub fn cons_tagged(&mut self) -> &mut Self {
            self.flags(LISTSXP, 0, false, true)
        }
    }

    #[test]
    fn null_and_header() {
        let mut w = W::header_v3();
        w.nil();
        let (h, o) = unserialize_with_header(&w.0).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.native_encoding.as_deref(), Some("UTF-8"));
        assert_eq!(h.writer_version, 0x0004_0201);
        assert_eq!(o.value, RValue::Null);

        let mut w = W::header_v2();
        w.nil();
        let (h, _) = unserialize_with_header(&w.0).unwrap();
        assert_eq!((h.version, h.native_encoding), (2, None));
    }

    #[test]
    fn rejects_other_formats() {
        for (bytes, needle) in [
            (&b"A\n3\n"[..], "ASCII"),
            (&b"B\n\0\0"[..], "native-binary"),
            (&[0x1f, 0x8b, 8, 0][..], "gzip"),
            (&b"RDX3\n"[..], "not an R serialization"),
        ] {
            let e = unserialize(bytes).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut w = W(b"X\n".to_vec());
        w.int(4).int(0).int(0);
        let e = unserialize(&w.0).unwrap_err().to_string();
        assert!(e.contains("version 4"), "{e}");
    }

    #[test]
    fn character_vector_with_na_empty_and_encodings() {
        let mut w = W::header_v3();
        w.flags(STRSXP, 0, false, false).int(6);
        w.charsxp(ASCII_MASK, b"It is a truth universally acknowledged");
        w.charsxp(0, b""); // blank line
        w.na_string();
        w.charsxp(UTF8_MASK, "caf\u{e9}".as_bytes());
        w.charsxp(LATIN1_MASK, b"na\xefve"); // Latin-1 i-diaeresis
        w.charsxp(0, "d\u{e9}j\u{e0}".as_bytes()); // native = UTF-8 per header
        let o = unserialize(&w.0).unwrap();
        assert_eq!(
            o.value,
            RValue::Str(vec![
                Some("It is a truth universally acknowledged".into()),
                Some(String::new()),
                None,
                Some("caf\u{e9}".into()),
                Some("na\u{ef}ve".into()),
                Some("d\u{e9}j\u{e0}".into()),
            ])
        );
        assert!(o.attributes.is_empty());
    }

    #[test]
    fn native_encoding_unknown_falls_back_to_latin1() {
        let mut w = W::header_v2();
        w.flags(STRSXP, 0, false, false).int(2);
        w.charsxp(0, b"plain");
        w.charsxp(0, b"\xe9t\xe9");
        let o = unserialize(&w.0).unwrap();
        assert_eq!(o.value, RValue::Str(vec![Some("plain".into()), Some("\u{e9}t\u{e9}".into())]));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut w = W::header_v3();
        w.flags(STRSXP, 0, false, false).int(1);
        w.charsxp(UTF8_MASK, b"\xff\xfe");
        let e = unserialize(&w.0).unwrap_err().to_string();
        assert!(e.contains("invalid UTF-8"), "{e}");
    }

    #[test]
    fn numeric_vectors() {
        let mut w = W::header_v3();
        w.vecsxp(3, false);
        w.intsxp(&[0, 392_107, NA_INTEGER, -5], false);
        w.realsxp(&[1.5, -0.25, f64::INFINITY]);
        w.lglsxp(&[1, 0, NA_INTEGER]);
        let o = unserialize(&w.0).unwrap();
        let RValue::List(items) = o.value else { panic!("not a list") };
        assert_eq!(items[0].value, RValue::Int(vec![0, 392_107, NA_INTEGER, -5]));
        assert_eq!(items[1].value, RValue::Real(vec![1.5, -0.25, f64::INFINITY]));
        assert_eq!(items[2].value, RValue::Lgl(vec![1, 0, NA_INTEGER]));
    }

    #[test]
    fn long_length_escape() {
        let mut w = W::header_v3();
        w.flags(INTSXP, 0, false, false).int(-1).int(0).int(2).int(7).int(8);
        assert_eq!(unserialize(&w.0).unwrap().value, RValue::Int(vec![7, 8]));
    }

    /// The shape of a lazy-load index: list(variables = list(a = c(0L, 10L), b = c(10L, 20L)),
    /// references = list(), compressed = TRUE), where the `names` symbol is written once and
    /// then referenced (REFSXP 1).
    pub(crate) fn lazyload_index_bytes(vars: &[(&str, i32, i32)], compressed: i32) -> Vec<u8> {
        let mut w = W::header_v3();
        w.vecsxp(3, true);
        // variables
        w.vecsxp(vars.len(), true);
        for &(_, off, len) in vars {
            w.intsxp(&[off, len], false);
        }
        w.cons_tagged().sym("names");
        let names: Vec<&str> = vars.iter().map(|v| v.0).collect();
        w.strsxp(&names, false).nil();
        // references: an empty named list
        w.vecsxp(0, true).cons_tagged().reference(1).strsxp(&[], false).nil();
        // compressed
        w.lglsxp(&[compressed]);
        // attributes of the outer list
        w.cons_tagged().reference(1).strsxp(&["variables", "references", "compressed"], false);
        w.nil();
        w.0
    }

    #[test]
    fn named_lists_attributes_and_references() {
        let bytes = lazyload_index_bytes(&[("emma", 0, 392_107), ("persuasion", 392_107, 180_000)], 1);
        let o = unserialize(&bytes).unwrap();
        assert_eq!(o.names().unwrap(), ["variables", "references", "compressed"]);
        let vars = o.get("variables").unwrap();
        assert_eq!(vars.names().unwrap(), ["emma", "persuasion"]);
        assert_eq!(vars.get("persuasion").unwrap().value, RValue::Int(vec![392_107, 180_000]));
        assert_eq!(o.get("compressed").unwrap().value, RValue::Lgl(vec![1]));
        let refs = o.get("references").unwrap();
        assert_eq!(refs.value, RValue::List(vec![]));
        assert_eq!(refs.names().unwrap(), Vec::<String>::new());
        assert!(o.get("missing").is_none());
    }

    #[test]
    fn pairlist_with_tags_attributes_and_untagged_cells() {
        let mut w = W::header_v3();
        // pairlist(x = 1L, 2.5, y = "a") with attribute foo = TRUE on the first cell
        w.flags(LISTSXP, 0, true, true);
        w.cons_tagged().sym("foo").lglsxp(&[1]).nil(); // attributes
        w.sym("x").intsxp(&[1], false);
        w.flags(LISTSXP, 0, false, false).realsxp(&[2.5]);
        w.cons_tagged().sym("y").strsxp(&["a"], false);
        w.nil();
        let o = unserialize(&w.0).unwrap();
        assert_eq!(o.attr("foo").unwrap().value, RValue::Lgl(vec![1]));
        let RValue::Pairlist(cells) = &o.value else { panic!("not a pairlist") };
        assert_eq!(cells.len(), 3);
        assert_eq!(cells[0].0.as_deref(), Some("x"));
        assert_eq!(cells[1].0, None);
        assert_eq!(cells[1].1.value, RValue::Real(vec![2.5]));
        assert_eq!(o.get("y").unwrap().value, RValue::Str(vec![Some("a".into())]));
    }

    #[test]
    fn reference_index_in_following_int() {
        let mut w = W::header_v3();
        w.vecsxp(2, false).sym("s").int(REFSXP as i32).int(1);
        let o = unserialize(&w.0).unwrap();
        let RValue::List(items) = o.value else { panic!() };
        assert_eq!(items[1].value, RValue::Symbol("s".into()));
    }

    #[test]
    fn bad_reference_is_an_error() {
        let mut w = W::header_v3();
        w.reference(3);
        let e = unserialize(&w.0).unwrap_err().to_string();
        assert!(e.contains("reference index 3"), "{e}");
    }

    #[test]
    fn compact_intseq_altrep() {
        let mut w = W::header_v3();
        w.int(ALTREP_SXP as i32);
        // info: pairlist(compact_intseq, base, 13L)
        w.flags(LISTSXP, 0, false, false).sym("compact_intseq");
        w.flags(LISTSXP, 0, false, false).sym("base");
        w.flags(LISTSXP, 0, false, false).intsxp(&[13], false).nil();
        w.realsxp(&[4.0, 10.0, 1.0]); // state: n, start, step
        w.nil(); // attributes
        assert_eq!(unserialize(&w.0).unwrap().value, RValue::Int(vec![10, 11, 12, 13]));
    }

    #[test]
    fn unsupported_type_and_truncation_are_errors() {
        let mut w = W::header_v3();
        w.int(4); // ENVSXP
        let e = unserialize(&w.0).unwrap_err().to_string();
        assert!(e.contains("unsupported R object type 4"), "{e}");

        let mut w = W::header_v3();
        w.strsxp(&["abcdef"], false);
        let n = w.0.len();
        let e = unserialize(&w.0[..n - 2]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let mut w = W::header_v3();
        w.flags(INTSXP, 0, false, false).int(1_000_000);
        let e = unserialize(&w.0).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }
}

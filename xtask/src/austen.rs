//! Jane Austen's six novels from Debian's `r-cran-janeaustenr` (an R data package), read from its
//! lazy-load database without R. Five novels are calibration text; Persuasion is held out.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::debs::{deb_version, extract_deb, fetch_deb};
use crate::lazyload;
use crate::stamp::{self, rel, Stamp, Status};
use crate::util::{fresh_dir, remove_any, secs, thousands, write_atomic};
use crate::Ctx;

const TAG: &str = "austen";
const PACKAGE: &str = "r-cran-janeaustenr";
const DB: &str = "usr/lib/R/site-library/janeaustenr/data/Rdata";
/// Bump when the output files change for the same package.
const KEY: &str = "deb:r-cran-janeaustenr; lines joined with LF plus a final LF; revision 1";

/// R object, output path, file size given in `shared/notes/assets.md` ("lines joined with \n";
/// measured, it equals the joined lines plus the final newline, i.e. exactly our file size).
pub const NOVELS: [(&str, &str, u64); 6] = [
    ("emma", "data/calib/austen-emma.txt", 883_028),
    ("mansfieldpark", "data/calib/austen-mansfield-park.txt", 883_280),
    ("northangerabbey", "data/calib/austen-northanger-abbey.txt", 433_411),
    ("prideprejudice", "data/calib/austen-pride-and-prejudice.txt", 684_768),
    ("sensesensibility", "data/calib/austen-sense-and-sensibility.txt", 673_688),
    ("persuasion", "data/heldout/persuasion.txt", 466_854),
];

pub fn stamp_path(ctx: &Ctx) -> PathBuf {
    ctx.root.join("data/.stamps/austen.json")
}

/// Lines joined with "\n", plus a final newline; NA lines become empty (and are counted).
pub fn render(lines: &[Option<String>]) -> (String, usize) {
    let mut out = String::with_capacity(lines.iter().map(|l| l.as_ref().map_or(0, |s| s.len()) + 1).sum());
    let mut na = 0;
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match l {
            Some(s) => out.push_str(s),
            None => na += 1,
        }
    }
    out.push('\n');
    (out, na)
}

pub fn fetch(ctx: &mut Ctx) -> Result<()> {
    let sp = stamp_path(ctx);
    if !ctx.force {
        match stamp::check(&ctx.root, &sp, KEY) {
            Status::Done(s) => {
                ctx.say(TAG, &format!("up to date: {} files verified against {}", s.files.len(), rel(&ctx.root, &sp)));
                for f in &s.files {
                    ctx.outputs.push((f.path.clone(), f.bytes, role(&f.path)));
                }
                return Ok(());
            }
            Status::Todo(why) => ctx.say(TAG, &format!("building: {why}")),
        }
    }
    let deb = fetch_deb(ctx, TAG, PACKAGE)?;
    let scratch = ctx.root.join("data/.cache/.partial-janeaustenr");
    fresh_dir(&scratch)?;
    let t = Instant::now();
    extract_deb(ctx, &deb, &scratch)?;
    let rdx_path = scratch.join(format!("{DB}.rdx"));
    let rdb_path = scratch.join(format!("{DB}.rdb"));
    let rdx = fs::read(&rdx_path).with_context(|| format!("{} has no {DB}.rdx", rel(&ctx.root, &deb)))?;
    let rdb = fs::read(&rdb_path).with_context(|| format!("{} has no {DB}.rdb", rel(&ctx.root, &deb)))?;
    let index = lazyload::read_index(&rdx).context("janeaustenr Rdata.rdx")?;
    let objects: Vec<&str> = index.variables.keys().map(String::as_str).collect();
    ctx.act(TAG, &format!("unpacked {} in {}; Rdata.rdx lists {}", rel(&ctx.root, &deb), secs(t), objects.join(", ")));

    let t = Instant::now();
    let mut written = Vec::new();
    let mut report = Vec::new();
    for (obj, out, expected) in NOVELS {
        let lines = lazyload::read_strings(&rdb, &index, obj).context("janeaustenr Rdata.rdb")?;
        let (text, na) = render(&lines);
        let path = ctx.root.join(out);
        write_atomic(&path, text.as_bytes())?;
        let check =
            if text.len() as u64 == expected { "= assets.md".to_string() } else { format!("assets.md says {}: differs", thousands(expected)) };
        let na_note = if na > 0 { format!(", {na} NA lines written empty") } else { String::new() };
        report.push(format!("  {out}: {} lines, {} bytes ({check}){na_note}", thousands(lines.len() as u64), thousands(text.len() as u64),));
        written.push(path);
    }
    ctx.act(TAG, &format!("wrote {} novels in {}:", written.len(), secs(t)));
    for r in report {
        println!("{r}");
    }
    remove_any(&scratch)?;

    let mut st = Stamp::new(&ctx.root, TAG, KEY, &written)?;
    st.info = serde_json::json!({
        "package": PACKAGE,
        "version": deb_version(&deb),
        "deb": rel(&ctx.root, &deb),
        "calibration": NOVELS.iter().filter(|n| n.1.starts_with("data/calib/")).map(|n| n.1).collect::<Vec<_>>(),
        "heldout": NOVELS.iter().filter(|n| n.1.starts_with("data/heldout/")).map(|n| n.1).collect::<Vec<_>>(),
    });
    st.write(&sp)?;
    for f in &st.files {
        ctx.outputs.push((f.path.clone(), f.bytes, role(&f.path)));
    }
    Ok(())
}

/// Role of a data file from its folder.
pub fn role(path: &str) -> String {
    if path.starts_with("data/calib/") {
        "calibration".into()
    } else if path.starts_with("data/heldout/") {
        "held-out".into()
    } else if path.starts_with("data/extra/") {
        "extra (training)".into()
    } else {
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_lines() {
        let lines = vec![Some("CHAPTER I".to_string()), Some(String::new()), None, Some("Emma".into())];
        let (text, na) = render(&lines);
        assert_eq!(text, "CHAPTER I\n\n\nEmma\n");
        assert_eq!(na, 1);
        assert_eq!(render(&[]).0, "\n");
    }

    #[test]
    fn persuasion_is_never_calibration() {
        for (obj, out, _) in NOVELS {
            assert_eq!(obj == "persuasion", out.starts_with("data/heldout/"), "{obj}");
            assert!(out.starts_with("data/calib/") || out.starts_with("data/heldout/"));
        }
    }
}

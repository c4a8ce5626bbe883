//! "Already done" detection.
//!
//! A step that completes writes a stamp (JSON) listing what it produced: each file's path
//! (relative to the repository root), size and sha256, plus a `key` naming the recipe (source
//! package, version, output format revision). A later run treats the step as done only if the
//! stamp exists, has the same key, and every listed file still exists with the same size and
//! hash; anything else (no stamp, unreadable stamp, other key, missing or changed file) means
//! the step runs again.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{sha256_file, write_atomic};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the repository root, with `/` separators.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    pub step: String,
    pub key: String,
    pub files: Vec<FileRecord>,
    /// Free-form facts for people (source file names, timings, ...); not checked.
    #[serde(default)]
    pub info: serde_json::Value,
}

#[derive(Debug, PartialEq)]
pub enum Status {
    /// Present and verified.
    Done(Stamp),
    /// Needs (re)doing, with the reason.
    Todo(String),
}

impl Stamp {
    /// Records `files` (absolute, or relative to the current directory) relative to `root`.
    pub fn new(root: &Path, step: &str, key: &str, files: &[PathBuf]) -> Result<Stamp> {
        let files = files
            .iter()
            .map(|p| {
                let (bytes, sha256) = sha256_file(p)?;
                Ok(FileRecord { path: rel(root, p), bytes, sha256 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stamp { step: step.to_string(), key: key.to_string(), files, info: serde_json::Value::Null })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut s = serde_json::to_string_pretty(self).expect("stamp serializes");
        s.push('\n');
        write_atomic(path, s.as_bytes()).with_context(|| format!("writing stamp {}", path.display()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Whether the step stamped at `stamp_path` is done with recipe `key`, verifying its files.
pub fn check(root: &Path, stamp_path: &Path, key: &str) -> Status {
    let text = match fs::read_to_string(stamp_path) {
        Ok(t) => t,
        Err(_) => return Status::Todo(format!("no stamp {}", rel(root, stamp_path))),
    };
    let stamp: Stamp = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => return Status::Todo(format!("unreadable stamp {}: {e}", rel(root, stamp_path))),
    };
    if stamp.key != key {
        return Status::Todo(format!("recipe changed (stamp has `{}`, now `{key}`)", stamp.key));
    }
    if stamp.files.is_empty() {
        return Status::Todo("stamp lists no files".into());
    }
    for f in &stamp.files {
        let p = root.join(&f.path);
        let len = match fs::metadata(&p) {
            Ok(m) if m.is_file() => m.len(),
            _ => return Status::Todo(format!("{} is missing", f.path)),
        };
        if len != f.bytes {
            return Status::Todo(format!("{} has {len} bytes, stamp says {}", f.path, f.bytes));
        }
        match sha256_file(&p) {
            Ok((_, h)) if h == f.sha256 => {}
            Ok(_) => return Status::Todo(format!("{} changed (sha256 differs)", f.path)),
            Err(e) => return Status::Todo(format!("{}: {e:#}", f.path)),
        }
    }
    Status::Done(stamp)
}

/// `path` relative to `root` (or as given if outside it), with `/` separators.
pub fn rel(root: &Path, path: &Path) -> String {
    let p = path.strip_prefix(root).unwrap_or(path);
    p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_path_buf();
        let a = root.join("data/calib/a.txt");
        let b = root.join("data/heldout/b.txt");
        write_atomic(&a, b"alpha\n").unwrap();
        write_atomic(&b, b"beta\n").unwrap();
        (d, root, vec![a, b])
    }

    fn todo_reason(s: Status) -> String {
        match s {
            Status::Todo(r) => r,
            Status::Done(_) => panic!("expected Todo"),
        }
    }

    #[test]
    fn done_when_stamp_and_files_match() {
        let (_d, root, files) = setup();
        let sp = root.join("data/.stamps/t.json");
        let st = Stamp::new(&root, "t", "k1", &files).unwrap();
        assert_eq!(st.files[0].path, "data/calib/a.txt");
        assert_eq!(st.total_bytes(), 11);
        st.write(&sp).unwrap();
        match check(&root, &sp, "k1") {
            Status::Done(s) => assert_eq!(s, st),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn todo_without_stamp_or_with_bad_stamp() {
        let (_d, root, _files) = setup();
        let sp = root.join("data/.stamps/t.json");
        assert!(todo_reason(check(&root, &sp, "k1")).contains("no stamp"));
        write_atomic(&sp, b"{ not json").unwrap();
        assert!(todo_reason(check(&root, &sp, "k1")).contains("unreadable"));
        Stamp::new(&root, "t", "k1", &[]).unwrap().write(&sp).unwrap();
        assert!(todo_reason(check(&root, &sp, "k1")).contains("no files"));
    }

    #[test]
    fn todo_when_recipe_changes() {
        let (_d, root, files) = setup();
        let sp = root.join("s.json");
        Stamp::new(&root, "t", "k1", &files).unwrap().write(&sp).unwrap();
        assert!(todo_reason(check(&root, &sp, "k2")).contains("recipe changed"));
    }

    #[test]
    fn todo_when_a_file_is_missing_resized_or_edited() {
        let (_d, root, files) = setup();
        let sp = root.join("s.json");
        Stamp::new(&root, "t", "k", &files).unwrap().write(&sp).unwrap();

        fs::write(&files[1], b"beta!\n").unwrap();
        assert!(todo_reason(check(&root, &sp, "k")).contains("has 6 bytes"));
        fs::write(&files[1], b"BETA\n").unwrap(); // same size, other content
        assert!(todo_reason(check(&root, &sp, "k")).contains("changed"));
        fs::remove_file(&files[0]).unwrap();
        assert!(todo_reason(check(&root, &sp, "k")).contains("a.txt is missing"));
    }
}

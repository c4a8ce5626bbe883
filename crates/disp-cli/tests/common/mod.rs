//! Helpers the `disp` binary's test files share: fixture paths, model copies with the fixtures'
//! byte-level tokenizer, text files, and running the binary.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A copy of a fixture model with the fixtures' byte-level tokenizer (256 ids, one per byte,
/// `tests/fixtures/byte_tokenizer.json`), in a fresh temporary folder.
pub fn model_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::copy(fixture("byte_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    (tmp, dir)
}

/// `dir/text.txt`: the first `bytes` characters of Austen's opening sentence, repeated.
pub fn text_file(dir: &Path, bytes: usize) -> PathBuf {
    let sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    let text: String = sentence.chars().cycle().take(bytes).collect();
    let path = dir.join("text.txt");
    std::fs::write(&path, text).unwrap();
    path
}

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn disp(args: &[&str]) -> Outcome {
    disp_with_env(args, &[])
}

/// [`disp`] with extra environment variables (the test hooks).
pub fn disp_with_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_disp")).args(args).envs(env.iter().copied()).output().expect("runs");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Fails unless the command failed with exactly one error line containing every `needle`.
pub fn assert_one_line_error(out: &Outcome, needles: &[&str]) {
    assert_ne!(out.code, 0, "expected failure, got success: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {:?}", out.stderr);
    for needle in needles {
        assert!(lines[0].contains(needle), "error {:?} does not mention {needle:?}", lines[0]);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

//! `disp-fuzz` feeds mutated files to `disp`'s readers — safetensors, GGUF (reader and
//! converter), pruning plans, pruned-folder manifests, `config.json` and `tokenizer.json` — and
//! counts what happens to each input: accepted, refused with an error, or a panic. Inputs are
//! seeded mutations of a corpus built from the test fixtures ([`targets`]), so every run is
//! reproducible and any input can be regenerated from its number ([`mutate`]).
//!
//! A run is split between a parent and worker processes (the same binary): a worker reports each
//! input's outcome on stdout before taking the next, so when one aborts (the binary's allocator
//! refuses any allocation past a bound, which aborts the process instead of exhausting the
//! machine) the parent knows which input did it, saves it, and starts a new worker after it. A
//! worker also stops when its peak RSS passes a bound. A short run is part of `cargo test`
//! (`tests/short_run.rs`); longer ones are `cargo run --release -p disp-fuzz -- --minutes 10`.

pub mod mutate;
pub mod targets;

use std::io::{BufRead, BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use mutate::{anchors_after_names, mutate, Rng};
pub use targets::{Harness, Target};

/// Input number `index` of a run with `seed`: which seed it mutates, and its bytes.
pub fn make_input(harness: &Harness, anchors: &[Vec<usize>], seed: u64, index: u64) -> (usize, Vec<u8>) {
    let mut rng = Rng::new(seed, index);
    let which = rng.below(harness.seeds.len());
    let input = mutate(&mut rng, &harness.seeds[which], &harness.seeds, harness.target.is_json(), &anchors[which]);
    (which, input)
}

fn anchors_of(harness: &Harness) -> Vec<Vec<usize>> {
    harness.seeds.iter().map(|s| if harness.target.is_json() { Vec::new() } else { anchors_after_names(s) }).collect()
}

/// Peak resident memory of this process in KiB (`VmHWM`), where the platform says.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// The worker: runs inputs `from..from + count`, writing `case I` before each and then `ok I`,
/// `error I [multiline MESSAGE]` or `panic I MESSAGE`; `rss I KIB` (and stop) when the peak RSS passes
/// `rss_limit_kib`; `peak KIB` at the end.
pub fn run_worker(target: Target, seed: u64, from: u64, count: u64, rss_limit_kib: u64, out: &mut impl Write) -> Result<()> {
    let harness = Harness::new(target)?;
    let anchors = anchors_of(&harness);
    // Panics are counted and reported by the parent; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    for index in from..from + count {
        writeln!(out, "case {index}")?;
        out.flush()?;
        let (which, input) = make_input(&harness, &anchors, seed, index);
        match catch_unwind(AssertUnwindSafe(|| harness.run(which, &input))) {
            Ok(Ok(())) => writeln!(out, "ok {index}")?,
            Ok(Err(e)) => {
                let message = format!("{e:#}");
                if message.contains('\n') {
                    writeln!(out, "error {index} multiline {}", message.replace('\n', "\\n"))?
                } else {
                    writeln!(out, "error {index}")?
                }
            }
            Err(payload) => writeln!(out, "panic {index} {}", panic_message(payload.as_ref()).replace('\n', " "))?,
        }
        if let Some(rss) = peak_rss_kib().filter(|&rss| rss > rss_limit_kib) {
            writeln!(out, "rss {index} {rss}")?;
            break;
        }
    }
    writeln!(out, "peak {}", peak_rss_kib().unwrap_or(0))?;
    out.flush()?;
    Ok(())
}

/// How long a run goes on.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Inputs(u64),
    Time(Duration),
}

/// The outcome counts of one target's run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    pub ok: u64,
    pub errors: u64,
    /// Errors whose message spans more than one line.
    pub multiline_errors: u64,
    pub panics: u64,
    /// Workers that died (an allocation past the bound, a stack overflow, a signal).
    pub aborts: u64,
    /// Inputs after which the peak RSS passed the bound.
    pub rss_exceeded: u64,
    pub max_rss_mib: f64,
    pub seconds: f64,
    /// One line per failure: what happened and where the input was saved.
    pub failures: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.panics + self.aborts + self.rss_exceeded > 0
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "target": self.target, "inputs": self.inputs, "ok": self.ok, "errors": self.errors,
            "multiline_errors": self.multiline_errors, "panics": self.panics, "aborts": self.aborts,
            "rss_exceeded": self.rss_exceeded, "max_rss_mib": (self.max_rss_mib * 10.0).round() / 10.0,
            "seconds": (self.seconds * 10.0).round() / 10.0, "failures": self.failures,
        })
    }
}

/// Inputs a worker takes before the parent starts a fresh one (keeps per-worker state bounded).
const CHUNK: u64 = 1000;

/// Runs `target` through workers started from `exe` (this binary) until `budget` is spent.
/// Failing inputs are written to `failures` as `TARGET-SEED-INDEX.bin`.
pub fn fuzz(exe: &Path, target: Target, seed: u64, budget: Budget, rss_limit_mib: u64, failures: &Path) -> Result<Report> {
    let start = Instant::now();
    let mut report = Report { target: target.name().into(), ..Default::default() };
    let mut next = 0u64;
    loop {
        let count = match budget {
            Budget::Inputs(total) if next >= total => break,
            Budget::Inputs(total) => CHUNK.min(total - next),
            Budget::Time(limit) if start.elapsed() >= limit => break,
            Budget::Time(_) => CHUNK,
        };
        let mut child = Command::new(exe)
            .args(["--worker", "--target", target.name(), "--seed", &seed.to_string()])
            .args(["--from", &next.to_string(), "--count", &count.to_string(), "--rss-limit-mib", &rss_limit_mib.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the worker {}", exe.display()))?;
        let stdout = child.stdout.take().context("worker has no stdout")?;
        let mut current = None;
        let mut finished = false;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let mut words = line.splitn(3, ' ');
            let (kind, index) = (words.next().unwrap_or(""), words.next().and_then(|w| w.parse::<u64>().ok()));
            match (kind, index) {
                ("case", Some(i)) => current = Some(i),
                ("ok", Some(_)) => report.ok += 1,
                ("error", Some(_)) => {
                    report.errors += 1;
                    if let Some(message) = words.next().and_then(|rest| rest.strip_prefix("multiline ")) {
                        report.multiline_errors += 1;
                        report.failures.push(format!("error of more than one line: {message}"));
                    }
                }
                ("panic", Some(i)) => {
                    report.panics += 1;
                    let saved = save_input(exe, target, seed, i, failures);
                    report.failures.push(format!("panic on input {i} ({saved}): {}", words.next().unwrap_or("")));
                }
                ("rss", Some(i)) => {
                    report.rss_exceeded += 1;
                    let saved = save_input(exe, target, seed, i, failures);
                    report.failures.push(format!("peak RSS {} KiB after input {i} ({saved})", words.next().unwrap_or("?")));
                }
                ("peak", Some(kib)) => {
                    report.max_rss_mib = report.max_rss_mib.max(kib as f64 / 1024.0);
                    finished = true;
                }
                _ => {}
            }
            if matches!(kind, "ok" | "error" | "panic") {
                report.inputs += 1;
            }
        }
        let status = child.wait()?;
        match (finished && status.success(), current) {
            (true, Some(last)) => next = last + 1,
            (true, None) => bail!("{}: the worker ran no input", target.name()),
            (false, last) => {
                let at = last.unwrap_or(next);
                report.aborts += 1;
                report.inputs += 1;
                let saved = save_input(exe, target, seed, at, failures);
                report.failures.push(format!("worker died ({status}) on input {at} ({saved})"));
                next = at + 1;
            }
        }
        if report.failures.len() > 20 {
            break;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Writes input `index` to the failures folder (regenerated from its number); describes where.
fn save_input(_exe: &Path, target: Target, seed: u64, index: u64, failures: &Path) -> String {
    let saved = (|| -> Result<PathBuf> {
        let harness = Harness::new(target)?;
        let anchors = anchors_of(&harness);
        let (_, input) = make_input(&harness, &anchors, seed, index);
        std::fs::create_dir_all(failures)?;
        let path = failures.join(format!("{}-{seed}-{index}.bin", target.name()));
        std::fs::write(&path, input)?;
        Ok(path)
    })();
    match saved {
        Ok(path) => format!("saved as {}", path.display()),
        Err(e) => format!("not saved: {e:#}"),
    }
}

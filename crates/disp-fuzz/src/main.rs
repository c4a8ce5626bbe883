//! `disp-fuzz`: seeded mutation fuzzing of disp's readers. See the crate documentation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use disp_fuzz::{fuzz, run_worker, Budget, Target};

/// The system allocator with a bound: an allocation past 1 GiB, or one that would take the live
/// total past 4 GiB, is refused, which aborts the worker. No reader may reserve that much for the
/// tiny fixtures, so such a request is what a header lying about its sizes causes; the parent sees
/// the abort and names the input.
struct Bounded;

static LIVE: AtomicUsize = AtomicUsize::new(0);
const SINGLE_LIMIT: usize = 1 << 30;
const LIVE_LIMIT: usize = 4 << 30;

impl Bounded {
    fn admits(size: usize) -> bool {
        size <= SINGLE_LIMIT && LIVE.load(Ordering::Relaxed).saturating_add(size) <= LIVE_LIMIT
    }
}

// SAFETY: every call is forwarded to `System` with the caller's layout; refusing returns null,
// which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admits(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admits(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !Self::admits(new_size - layout.size()) || new_size > SINGLE_LIMIT {
            return std::ptr::null_mut();
        }
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

#[derive(Parser)]
#[command(name = "disp-fuzz", about = "Seeded mutation fuzzing of disp's readers; fails on any panic, abort or RSS past the bound")]
struct Args {
    /// The reader to fuzz; all of them, one after the other, when absent.
    #[arg(long, value_enum)]
    target: Option<Target>,
    /// Inputs per target (the default when --minutes is not given: 1000).
    #[arg(long)]
    inputs: Option<u64>,
    /// Minutes per target instead of a number of inputs.
    #[arg(long)]
    minutes: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Peak RSS a worker may reach.
    #[arg(long, default_value_t = 2048)]
    rss_limit_mib: u64,
    /// Where failing inputs are saved.
    #[arg(long, default_value = "target/fuzz-failures")]
    failures: PathBuf,
    /// Print one JSON object per target.
    #[arg(long)]
    json: bool,
    #[arg(long, hide = true)]
    worker: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    from: u64,
    #[arg(long, hide = true, default_value_t = 0)]
    count: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.worker {
        let Some(target) = args.target else {
            eprintln!("error: a worker needs --target");
            return ExitCode::FAILURE;
        };
        let stdout = std::io::stdout();
        return match run_worker(target, args.seed, args.from, args.count, args.rss_limit_mib * 1024, &mut stdout.lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let budget = match (args.minutes, args.inputs) {
        (Some(minutes), _) => Budget::Time(Duration::from_secs_f64(minutes * 60.0)),
        (None, inputs) => Budget::Inputs(inputs.unwrap_or(1000)),
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let targets = args.target.map(|t| vec![t]).unwrap_or_else(|| Target::ALL.to_vec());
    let mut failed = false;
    for target in targets {
        match fuzz(&exe, target, args.seed, budget, args.rss_limit_mib, &args.failures) {
            Ok(report) => {
                failed |= report.failed();
                if args.json {
                    println!("{}", report.to_json());
                } else {
                    println!(
                        "{:<16} {:>8} inputs {:>8} ok {:>8} errors {:>4} panics {:>4} aborts {:>4} over RSS  max RSS {:.0} MiB  {:.0} s",
                        report.target,
                        report.inputs,
                        report.ok,
                        report.errors,
                        report.panics,
                        report.aborts,
                        report.rss_exceeded,
                        report.max_rss_mib,
                        report.seconds
                    );
                    for failure in &report.failures {
                        println!("    {failure}");
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {}: {e:#}", target.name());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

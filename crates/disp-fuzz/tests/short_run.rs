//! The seeded short fuzz run of `cargo test`: a few hundred mutated inputs per reader, each
//! accepted or refused with an error, none panicking, aborting or passing the memory bound.

#[test]
fn every_reader_survives_its_seeded_mutations() {
    let failures = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disp-fuzz"))
        .args(["--inputs", "450", "--seed", "12", "--json", "--failures"])
        .arg(failures.path())
        .output()
        .expect("disp-fuzz runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reports: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), 7, "one report per target:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for r in &reports {
        let count = |key: &str| r[key].as_u64().unwrap();
        assert_eq!((count("panics"), count("aborts"), count("rss_exceeded")), (0, 0, 0), "{r}");
        assert_eq!(count("multiline_errors"), 0, "every error is one line: {r}");
        assert_eq!(count("inputs"), 450, "{r}");
        assert_eq!(count("ok") + count("errors"), 450, "{r}");
        // Mutations that only ever break the file, or never do, would test nothing.
        assert!(count("ok") > 0 && count("errors") > 0, "{r}");
    }
    assert!(out.status.success(), "{stdout}");
}

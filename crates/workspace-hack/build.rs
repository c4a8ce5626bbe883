// Empty: cargo resolves `[build-dependencies]` (the host side of the unification in
// Cargo.toml) only for a package with a build script.
fn main() {}

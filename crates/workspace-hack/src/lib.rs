//! Feature unification for CI's two builds; no code.
//!
//! CI builds the workspace twice: the README's `cargo test --workspace` (CPU), then the
//! device-generic tests with `--features disp-cli/wgpu`. The wgpu stack turns on features of
//! crates both builds share (`proc-macro2/span-locations`, `serde/rc`, `crossbeam-epoch/default`,
//! …). A crate compiled with other features is another artifact, and so is everything above
//! it. In a cold rehearsal on 2026-12-03, without this crate the wgpu stage recompiled 90 crates
//! of the CPU build besides burn's and cubecl's (gemm, rayon, serde, syn among them). With it,
//! it recompiled burn's and cubecl's crates and five that the wgpu build also needs on the host
//! (regex, nom, indexmap). Depending on those crates here with the wgpu build's features makes
//! both builds resolve them alike, so the second build reuses them. Nothing depends on this
//! crate; being a workspace member is enough, since `--workspace` unifies features over all
//! members.
//!
//! `xtask` does not depend on this crate, on purpose. Tried 2026-12-03 (cold, 2 cores): with it
//! and the features the other members add to the crates xtask shares, the test build after
//! `cargo xtask fetch-assets` reused all of xtask's crates and took 9 min 43 s instead of
//! 13 min 41 s, but xtask's own build grew from 4 min 14 s to 6 min 01 s (cubecl-common, uuid,
//! derive_more, … for nothing), and that build is also the first step of the README's main
//! command. Next step: a second, smaller hack crate for xtask that lists only the crates xtask
//! shares (not measured).
//!
//! The list in `Cargo.toml` must follow the lock file (re-derive it with `cargo tree -e
//! features` after a burn or cubecl upgrade); a stale entry costs build time, never correctness.

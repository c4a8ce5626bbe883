//! `disp-io` holds what `disp` reads and writes that needs no tensors, so that tools which only
//! fetch, convert or report (the `xtask` binary, the table driver) build without burn: writing
//! files and folders atomically ([`fsutil`]), the project's one seeded random number generator
//! ([`rng`]), the weight files and tensor shapes of a Hugging Face folder ([`hf_folder`]), and
//! GGUF import ([`gguf`]: a validating reader, dequantisation, conversion into an HF folder, and
//! a small writer for test files), number formatting for reports ([`fmt`]), and LLaMA-shaped checkpoints with seeded random weights for measuring at scale ([`make_model`], `disp make-model`). `disp-core` and `disp-models` re-export these modules.

pub mod fmt;
pub mod fsutil;
pub mod gguf;
pub mod hf_folder;
pub mod make_model;
pub mod rng;

//! `disp-eval` measures models the way pruning papers do: perplexity over non-overlapping windows
//! of a tokenised text (the WikiText-2 protocol), text generation with a KV cache, and speed
//! benchmarks. It works on any [`disp_models::CausalLm`], dense, masked or pruned.

pub mod generate;
pub mod host_nll;
pub mod perplexity;

pub use generate::{generate, GenerateOptions, Generation};
pub use perplexity::{perplexity, token_windows, PerplexityReport};

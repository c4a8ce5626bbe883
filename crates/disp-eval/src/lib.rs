//! `disp-eval` measures models the way pruning papers do: perplexity over non-overlapping windows
//! of a tokenised text (the WikiText-2 protocol), text generation with a KV cache, and speed
//! benchmarks, zero-shot multiple-choice accuracy (lm-evaluation-harness style), and chat
//! retention against a reference model (plus self-generated calibration text). It works
//! on any [`disp_models::CausalLm`], dense, masked or pruned.

pub mod chat_retention;
pub mod generate;
pub mod host_nll;
pub mod multiple_choice;
pub mod perplexity;
pub mod speed;

pub use generate::{generate, sample_token, GenerateOptions, Generation};
pub use multiple_choice::{evaluate_multiple_choice, load_tasks, McExample, McReport};
pub use perplexity::{perplexity, read_text, token_windows, PerplexityReport};
pub use speed::{measure_speed, SpeedReport, SpeedSettings};

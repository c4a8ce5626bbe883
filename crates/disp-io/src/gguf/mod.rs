//! GGUF import: a validating GGUF v2/v3 reader, dequantisation of F32/F16/BF16/Q8_0/Q4_0/Q4_1,
//! conversion of llama-architecture files into a Hugging Face `LlamaForCausalLM` folder, and a
//! small writer for making test files.
mod convert;
pub mod format;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod writer;

pub use convert::{convert_gguf_to_hf, ConvertSummary};
pub use format::{GgmlType, MetadataArray, MetadataValue, ValueType};
pub use reader::{GgufFile, TensorInfo};

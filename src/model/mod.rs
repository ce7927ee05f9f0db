//! The language model: the decoder, its tokenizer, sampling, presets for the size sweep, and
//! loading Hugging Face checkpoint directories (`hf`).

pub mod decode;
mod gemm_isa;
pub mod hf;
pub mod isa;
pub mod kernels;
pub mod llama;
pub mod presets;
pub mod sample;
pub mod small_gemm;
pub mod tokenizer;

pub use llama::{Capture, ForwardOut, KvCache, Llama, LlamaConfig};
pub use sample::{generate, Sample, SampleConfig};
pub use tokenizer::{EosChoice, Tok};

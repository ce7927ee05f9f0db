//! The language model: the decoder, its tokenizer, sampling, presets for the size sweep,
//! loading Hugging Face checkpoint directories (`hf`) and GGUF files (`gguf`), and fetching
//! a pretrained model for offline use (`fetch`).

pub mod chat;
pub mod decode;
pub mod fetch;
mod gemm_isa;
pub mod gguf;
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

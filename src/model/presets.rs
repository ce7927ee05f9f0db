//! Size presets for the scale sweep, from ~0.2M to ~86M parameters (at a 512-token
//! vocabulary). Shapes follow the usual Llama proportions: head dim 32-64, SwiGLU width
//! about 8/3 of the hidden size rounded to a multiple of 16.

use super::llama::LlamaConfig;

/// (name, hidden, layers, heads, kv heads, intermediate)
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("nano", 64, 2, 2, 2, 176),
    ("micro", 96, 3, 3, 3, 256),
    ("tiny", 128, 4, 4, 4, 352),
    ("small", 256, 4, 4, 4, 688),
    ("medium", 320, 5, 5, 5, 864),
    ("base", 384, 6, 6, 6, 1024),
    ("large", 512, 8, 8, 8, 1376),
    ("xl", 768, 12, 12, 12, 2048),
];

pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// The config of a named preset for a given vocabulary and context length.
pub fn preset(name: &str, vocab_size: usize, max_positions: usize) -> Option<LlamaConfig> {
    let &(_, d, l, h, kv, f) = PRESETS.iter().find(|p| p.0 == name)?;
    Some(LlamaConfig {
        vocab_size,
        hidden_size: d,
        intermediate_size: f,
        num_hidden_layers: l,
        num_attention_heads: h,
        num_key_value_heads: Some(kv),
        max_position_embeddings: max_positions,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: None,
    })
}

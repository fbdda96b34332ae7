//! bpe_rs: a byte-level BPE tokenizer (training and encoding) with no dependencies beyond std.
//!
//! - `pretok`: the GPT-4-style split pattern, implemented by hand over generated Unicode tables.
//! - `train`: parallel chunk counting and an incremental, heap-driven merge loop.
//! - `tokenizer`: tiktoken-compatible encoding/decoding and the tiktoken ranks file format.
//! - `ffi`: the C ABI that maturin's cffi bindings expose to Python (no panic crosses it).

pub mod ffi;
pub mod hash;
pub mod pretok;
pub mod tokenizer;
pub mod train;
mod unicode_tables;

pub use unicode_tables::UNICODE_VERSION;

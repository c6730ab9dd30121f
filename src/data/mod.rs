//! Text corpus → token ids → seeded random windows.

pub mod char_tokenizer;
pub mod loader;

pub use char_tokenizer::CharTokenizer;
pub use loader::{Batch, Corpus, WindowSampler};

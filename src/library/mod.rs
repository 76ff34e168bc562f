//! The LoRA library: an index of a collection of LoRA files, and how alike they are.

pub mod similarity;

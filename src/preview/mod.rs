//! The preview sampler (`loratool preview`): everything needed to render an image the way A1111
//! would for the same seed: the noise source, and the prompt's text side (A1111's syntax, CLIP's
//! tokenizer and A1111's chunking).

pub mod noise;
pub mod prompt;
pub mod tokenizer;

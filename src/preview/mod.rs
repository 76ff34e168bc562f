//! The preview sampler (`loratool preview`): everything needed to render an image the way A1111
//! would for the same seed.
//!
//! - [`weights`]: the checkpoint's tensors by component, f32, LoRAs applied through the patch plan.
//! - [`clip`]: the CLIP text encoder (clip skip, replaceable token embeddings).
//! - [`noise`]: torch-compatible CPU noise.

pub mod clip;
pub mod noise;
pub mod weights;

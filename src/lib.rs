//! loratool: inspect, merge, convert, extract and resize Stable Diffusion LoRA files.
//!
//! The library is layered so that each concern has one home:
//! - [`tensors`]: reading (safetensors, legacy pickle) and writing tensor files, dtypes, hashes.
//! - [`adapter`]: any LoRA file format parsed into one [`adapter::Adapter`] model, and the delta math.
//! - [`family`]: base-model families (SD1, SD2, SDXL, SD3, Flux), what a model file holds (read from
//!   its keys), and every key-name map (LDM ⇄ diffusers, kohya names, block weights).
//! - [`linalg`]: matrix products, factor-space and randomized SVD, the fused merge kernel.
//! - [`hub`]: downloads from Civitai and Hugging Face (one engine), and lookups by hash.
//! - [`library`]: a collection of LoRA files: the index, and similarity between LoRAs.
//! - [`ops`]: whole operations — inspect, merge, convert, extract, resize, meta — and the patch plan that
//!   merge and the preview sampler share.
//! - [`preview`]: the preview sampler: weights with LoRAs at load, text encoder, VAE, noise,
//!   samplers, infotext and PNG output.
//!
//! Nothing below `cli` knows about clap or terminal output.

pub mod adapter;
pub mod error;
pub mod family;
pub mod hub;
pub mod library;
pub mod linalg;
pub mod ops;
pub mod preview;
pub mod tensors;

pub use error::{Error, Result};

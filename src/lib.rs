//! loratool: inspect, merge, convert, extract and resize Stable Diffusion LoRA files.
//!
//! The library is layered so that each concern has one home:
//! - [`tensors`]: reading (safetensors, legacy pickle) and writing tensor files, dtypes, hashes.
//! - [`adapter`]: any LoRA file format parsed into one [`adapter::Adapter`] model, and the delta math.
//! - [`family`]: base-model families (SD1, SD2, SDXL, SD3, Flux) and their detection.
//! - [`linalg`]: dense f32 matrix products used by the delta math (faer underneath).
//! - [`ops`]: whole operations (inspect today; merge, convert, extract, resize next) over the above.
//!
//! Nothing below `cli` knows about clap or terminal output.

pub mod adapter;
pub mod error;
pub mod family;
pub mod linalg;
pub mod ops;
pub mod tensors;

pub use error::{Error, Result};

//! The preview sampler (`loratool preview`): everything needed to render an image the way A1111
//! would for the same seed. For now only the noise source lives here.

pub mod noise;
pub mod sampling;

//! The preview sampler (`loratool preview`): everything needed to render an image the way A1111
//! would for the same seed. For now the noise source and the output side: A1111's infotext, PNG
//! files that carry it, and the labelled contact sheet of `--grid`.

pub mod contact_sheet;
pub mod infotext;
pub mod label_font;
pub mod noise;
pub mod png;

//! The parts of a Stable Diffusion model a LoRA patches, named as diffusers names its pipeline
//! components.

use serde::Serialize;

/// The model part a LoRA module patches (a diffusers pipeline component).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    Transformer,
    TextEncoder,
    // Spelled as diffusers names the folders (and as docs/INSPECT_JSON.md documents them).
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
    #[serde(rename = "text_encoder_3")]
    TextEncoder3,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Transformer => "transformer",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::TextEncoder3 => "text_encoder_3",
        }
    }

    pub fn is_text_encoder(self) -> bool {
        matches!(
            self,
            Component::TextEncoder | Component::TextEncoder2 | Component::TextEncoder3
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialised_as_named() {
        for c in [
            Component::Unet,
            Component::Transformer,
            Component::TextEncoder,
            Component::TextEncoder2,
            Component::TextEncoder3,
        ] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
    }
}

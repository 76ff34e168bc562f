//! kohya's module names (`lora_unet_…`, `lora_te1_…`, `lora_transformer_…`): the one place that
//! says how kohya sd-scripts, LyCORIS and the UIs that read their files spell a module of each
//! family. Names are built from dotted module paths; the reverse direction is a lookup table
//! built from the same rule, so nothing ever splits a name on `_`.

use super::module_names::{text_encoder_paths, unet_paths};
use super::unet_names::diffusers_to_ldm;
use super::{BaseModel, Component};
use crate::adapter::{AdapterModule, Format};
use std::collections::HashMap;

/// kohya module-name prefixes and the component each names. A `lora_unet_` module whose path
/// starts at a DiT block is a transformer module (kohya's Flux networks name them so).
pub const KOHYA_PREFIXES: &[(&str, Component)] = &[
    ("lora_unet_", Component::Unet),
    ("lora_transformer_", Component::Transformer),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te3_", Component::TextEncoder3),
    ("lora_te_", Component::TextEncoder),
];

/// Top-level names of BFL Flux checkpoints: kohya names their modules `lora_unet_…`.
const BFL_ROOTS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
];

/// A dotted path in kohya's flat spelling.
pub fn flat(path: &str) -> String {
    path.replace('.', "_")
}

/// Every prefix a module of `component` may carry in a file, the one kohya writes first.
pub fn prefixes_for(component: Component) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = KOHYA_PREFIXES
        .iter()
        .filter(|(_, c)| *c == component)
        .map(|(p, _)| *p)
        .collect();
    if component == Component::Transformer {
        out.push("lora_unet_");
    }
    out
}

/// The kohya name of the module at `path` (a dotted diffusers UNet path, HF CLIP path, or BFL /
/// diffusers transformer path) of `component` in a model of `family`:
/// - UNets: SD1/SD2 by their diffusers paths, SDXL by their LDM paths (kohya's own choice);
/// - text encoders: `lora_te_` for the one CLIP of SD1/SD2, `lora_te1_`/`lora_te2_`/`lora_te3_`
///   for the encoders of SDXL and SD3;
/// - transformers: BFL paths under `lora_unet_` (kohya's Flux networks), diffusers paths under
///   `lora_transformer_` (OneTrainer's spelling, read by ComfyUI).
pub fn kohya_name(component: Component, path: &str, family: BaseModel) -> String {
    match component {
        Component::Unet => {
            let path = if family == BaseModel::Sdxl {
                // SDXL's up blocks 0 and 1 carry attentions, block 2 does not.
                diffusers_to_ldm(path, |i| i < 2).unwrap_or_else(|| path.to_string())
            } else {
                path.to_string()
            };
            format!("lora_unet_{}", flat(&path))
        }
        Component::Transformer => {
            let bfl = BFL_ROOTS.iter().any(|r| {
                path.strip_prefix(r)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            });
            let prefix = if bfl {
                "lora_unet_"
            } else {
                "lora_transformer_"
            };
            format!("{prefix}{}", flat(path))
        }
        Component::TextEncoder => {
            let one_encoder =
                matches!(family, BaseModel::Sd1 | BaseModel::Sd2 | BaseModel::Unknown);
            let prefix = if one_encoder { "lora_te_" } else { "lora_te1_" };
            format!("{prefix}{}", flat(path))
        }
        Component::TextEncoder2 => format!("lora_te2_{}", flat(path)),
        Component::TextEncoder3 => format!("lora_te3_{}", flat(path)),
    }
}

/// The kohya name of an adapter module of any dialect: a kohya module keeps its own name.
pub fn module_kohya_name(m: &AdapterModule, family: BaseModel) -> String {
    match m.format {
        Format::Kohya => m.name.clone(),
        Format::Peft | Format::DiffusersOld => kohya_name(m.component, &m.path, family),
    }
}

/// kohya module name → (component, dotted path) for every module an SD1/SD2/SDXL UNet or CLIP
/// text encoder can have, under every spelling a file of `family` may use: the name kohya writes
/// ([`kohya_name`]), both the diffusers and the LDM spelling of UNet modules, and every
/// text-encoder prefix.
pub fn kohya_to_dotted(family: BaseModel) -> HashMap<String, (Component, String)> {
    let mut map = HashMap::new();
    for p in unet_paths() {
        map.insert(
            format!("lora_unet_{}", flat(&p)),
            (Component::Unet, p.clone()),
        );
        // The LDM spelling: kohya's own for SDXL, and what some trainers write for SD1/SD2.
        let has_attentions = |i: usize| {
            if family == BaseModel::Sdxl {
                i < 2
            } else {
                i > 0
            }
        };
        if let Some(ldm) = diffusers_to_ldm(&p, has_attentions) {
            map.entry(format!("lora_unet_{}", flat(&ldm)))
                .or_insert((Component::Unet, p.clone()));
        }
    }
    for p in text_encoder_paths() {
        for (prefix, c) in KOHYA_PREFIXES {
            if c.is_text_encoder() {
                map.insert(format!("{prefix}{}", flat(&p)), (*c, p.clone()));
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_family() {
        let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(
            kohya_name(Component::Unet, q, BaseModel::Sd1),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            kohya_name(Component::Unet, q, BaseModel::Sdxl),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        );
        let fc = "text_model.encoder.layers.0.mlp.fc1";
        assert_eq!(
            kohya_name(Component::TextEncoder, fc, BaseModel::Sd2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1"
        );
        assert_eq!(
            kohya_name(Component::TextEncoder, fc, BaseModel::Sdxl),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1"
        );
        assert_eq!(
            kohya_name(
                Component::Transformer,
                "double_blocks.0.img_attn.qkv",
                BaseModel::Flux
            ),
            "lora_unet_double_blocks_0_img_attn_qkv"
        );
        assert_eq!(
            kohya_name(
                Component::Transformer,
                "single_transformer_blocks.0.proj_mlp",
                BaseModel::Flux
            ),
            "lora_transformer_single_transformer_blocks_0_proj_mlp"
        );
        // The lookup table inverts the rule for every family.
        for family in [BaseModel::Sd1, BaseModel::Sd2, BaseModel::Sdxl] {
            let map = kohya_to_dotted(family);
            for p in unet_paths() {
                let name = kohya_name(Component::Unet, &p, family);
                assert_eq!(map[&name], (Component::Unet, p.clone()), "{name}");
            }
            let name = kohya_name(Component::TextEncoder, fc, family);
            assert_eq!(map[&name], (Component::TextEncoder, fc.to_string()));
        }
    }
}

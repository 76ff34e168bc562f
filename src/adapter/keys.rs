//! Tensor-key dialects: which module a key belongs to and what role the tensor plays.
//!
//! kohya-style keys are `<module>.<suffix>` where the module name (`lora_unet_…`, `lora_te1_…`)
//! contains no dot. diffusers/peft keys are dotted module paths followed by a known suffix. The
//! module name is always the key minus its tensor suffix, exactly as written in the file; nothing
//! is ever derived by splitting names on `_`.

use super::Format;
use crate::family::kohya_names::KOHYA_PREFIXES;
use crate::family::Component;

/// What one tensor is inside its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Down,
    Up,
    Mid,
    Alpha,
    DoraScale,
    UpBias,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    Ia3Weight,
    Ia3OnInput,
    Diff,
    DiffBias,
    NormWeight,
    NormBias,
    OftBlocks,
    OftRescale,
    GloraA1,
    GloraA2,
    GloraB1,
    GloraB2,
}

impl Role {
    pub const ALL: [Role; 31] = [
        Role::Down,
        Role::Up,
        Role::Mid,
        Role::Alpha,
        Role::DoraScale,
        Role::UpBias,
        Role::HadaW1A,
        Role::HadaW1B,
        Role::HadaW2A,
        Role::HadaW2B,
        Role::HadaT1,
        Role::HadaT2,
        Role::LokrW1,
        Role::LokrW1A,
        Role::LokrW1B,
        Role::LokrW2,
        Role::LokrW2A,
        Role::LokrW2B,
        Role::LokrT2,
        Role::Ia3Weight,
        Role::Ia3OnInput,
        Role::Diff,
        Role::DiffBias,
        Role::NormWeight,
        Role::NormBias,
        Role::OftBlocks,
        Role::OftRescale,
        Role::GloraA1,
        Role::GloraA2,
        Role::GloraB1,
        Role::GloraB2,
    ];

    /// The suffix (after the module name and a dot) kohya sd-scripts and LyCORIS give a tensor
    /// of this role: what loratool writes, and what it reads in kohya-named files.
    pub fn kohya_suffix(self) -> &'static str {
        match self {
            Role::Down => "lora_down.weight",
            Role::Up => "lora_up.weight",
            Role::Mid => "lora_mid.weight",
            Role::Alpha => "alpha",
            Role::DoraScale => "dora_scale",
            Role::UpBias => "lora_up.bias",
            Role::HadaW1A => "hada_w1_a",
            Role::HadaW1B => "hada_w1_b",
            Role::HadaW2A => "hada_w2_a",
            Role::HadaW2B => "hada_w2_b",
            Role::HadaT1 => "hada_t1",
            Role::HadaT2 => "hada_t2",
            Role::LokrW1 => "lokr_w1",
            Role::LokrW1A => "lokr_w1_a",
            Role::LokrW1B => "lokr_w1_b",
            Role::LokrW2 => "lokr_w2",
            Role::LokrW2A => "lokr_w2_a",
            Role::LokrW2B => "lokr_w2_b",
            Role::LokrT2 => "lokr_t2",
            Role::Ia3Weight => "weight",
            Role::Ia3OnInput => "on_input",
            Role::Diff => "diff",
            Role::DiffBias => "diff_b",
            Role::NormWeight => "w_norm",
            Role::NormBias => "b_norm",
            Role::OftBlocks => "oft_blocks",
            Role::OftRescale => "rescale",
            Role::GloraA1 => "a1.weight",
            Role::GloraA2 => "a2.weight",
            Role::GloraB1 => "b1.weight",
            Role::GloraB2 => "b2.weight",
        }
    }

    /// The role of a kohya-named key's suffix: kohya's own, or peft's factor names, which some
    /// trainers write under kohya module names.
    fn from_kohya_suffix(suffix: &str) -> Option<Role> {
        match suffix {
            "lora_A.weight" => Some(Role::Down),
            "lora_B.weight" => Some(Role::Up),
            _ => Role::ALL.into_iter().find(|r| r.kohya_suffix() == suffix),
        }
    }
}

/// Suffixes of dotted (diffusers/peft) keys, longest first so `.lora_B.bias` beats `.bias`-like
/// partial matches. The bool marks the old diffusers dialects.
const DOTTED_SUFFIXES: &[(&str, Role, bool)] = &[
    (".lora_magnitude_vector.weight", Role::DoraScale, false),
    (".lora_magnitude_vector", Role::DoraScale, false),
    (".lora_A.weight", Role::Down, false),
    (".lora_B.weight", Role::Up, false),
    (".lora_B.bias", Role::UpBias, false),
    (".lora_down.weight", Role::Down, false),
    (".lora_up.weight", Role::Up, false),
    (".lora.down.weight", Role::Down, true),
    (".lora.up.weight", Role::Up, true),
    (".alpha", Role::Alpha, false),
];

/// Component prefixes of dotted keys, as diffusers' `save_lora_weights` packs them.
const DOTTED_PREFIXES: &[(&str, Option<Component>)] = &[
    ("unet.", Some(Component::Unet)),
    ("text_encoder.", Some(Component::TextEncoder)),
    ("text_encoder_2.", Some(Component::TextEncoder2)),
    ("text_encoder_3.", Some(Component::TextEncoder3)),
    ("transformer.", Some(Component::Transformer)),
    ("diffusion_model.", None),
    ("base_model.model.", None),
];

/// Top-level names of DiT models (Flux BFL layout, SD3 MMDiT): a `lora_unet_` module whose path
/// starts with one of these adapts a transformer, not a UNet.
const DIT_ROOTS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "joint_blocks",
    "final_layer",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "x_embedder",
    "context_embedder",
    "t_embedder",
    "y_embedder",
    "transformer_blocks",
    "single_transformer_blocks",
    "proj_out",
    "norm_out",
];

/// A classified key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub format: Format,
    pub component: Component,
    /// The key minus its tensor suffix, as written in the file.
    pub module: String,
    /// The module path inside its component (kohya: underscore form; dotted: dotted form with
    /// attention-processor wrappers removed).
    pub path: String,
    pub role: Role,
}

/// Classifies one tensor key, or `None` if it is not an adapter tensor.
pub fn classify(key: &str) -> Option<KeyInfo> {
    if let Some(info) = classify_kohya(key) {
        return Some(info);
    }
    classify_dotted(key)
}

fn classify_kohya(key: &str) -> Option<KeyInfo> {
    let (module, suffix) = key.split_once('.')?;
    let (prefix, component) = KOHYA_PREFIXES.iter().find(|(p, _)| module.starts_with(p))?;
    let role = Role::from_kohya_suffix(suffix)?;
    let path = &module[prefix.len()..];
    let component = if *component == Component::Unet && is_dit_path(path, '_') {
        Component::Transformer
    } else {
        *component
    };
    Some(KeyInfo {
        format: Format::Kohya,
        component,
        module: module.to_string(),
        path: path.to_string(),
        role,
    })
}

fn is_dit_path(path: &str, sep: char) -> bool {
    DIT_ROOTS.iter().any(|root| {
        path.strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(sep))
    })
}

fn classify_dotted(key: &str) -> Option<KeyInfo> {
    let (suffix, role, mut old) = DOTTED_SUFFIXES
        .iter()
        .find(|(s, _, _)| key.ends_with(s))
        .copied()
        .or_else(|| attn_processor_suffix(key))?;
    let module = &key[..key.len() - suffix.len()];
    if module.is_empty() {
        return None;
    }
    let (rest, component) = match DOTTED_PREFIXES.iter().find(|(p, _)| module.starts_with(p)) {
        Some((p, c)) => (&module[p.len()..], *c),
        None => (module, None),
    };
    let component = component.unwrap_or_else(|| guess_component(rest));
    // Old attention-processor names wrap the target: `attn1.processor.to_q_lora` → `attn1.to_q`.
    let mut path = rest.replace(".processor.", ".");
    if let Some(stripped) = path.strip_suffix("_lora") {
        path = stripped.to_string();
        old = true;
        // The processor's `to_out_lora` patches the attention's `to_out.0` linear.
        if path.ends_with(".to_out") && !component.is_text_encoder() {
            path.push_str(".0");
        }
    }
    if let Some(stripped) = path.strip_suffix(".lora_linear_layer") {
        path = stripped.to_string();
    }
    // The old text-encoder processor names (`self_attn.to_q_lora`) map to q_proj etc.
    if component.is_text_encoder() {
        for (from, to) in [
            ("self_attn.to_q", "self_attn.q_proj"),
            ("self_attn.to_k", "self_attn.k_proj"),
            ("self_attn.to_v", "self_attn.v_proj"),
            ("self_attn.to_out", "self_attn.out_proj"),
        ] {
            if let Some(stem) = path.strip_suffix(from) {
                path = format!("{stem}{to}");
            }
        }
    }
    Some(KeyInfo {
        format: if old {
            Format::DiffusersOld
        } else {
            Format::Peft
        },
        component,
        module: module.to_string(),
        path,
        role,
    })
}

/// `…to_q_lora.down.weight` / `…to_out_lora.up.weight` (old attention processors) and
/// `…fc1.lora_linear_layer.down.weight` (old text-encoder patches): the wrapper stays part of the
/// module name, as diffusers named the module.
fn attn_processor_suffix(key: &str) -> Option<(&'static str, Role, bool)> {
    for (suffix, role) in [(".down.weight", Role::Down), (".up.weight", Role::Up)] {
        if let Some(stem) = key.strip_suffix(suffix) {
            if stem.ends_with("_lora") || stem.ends_with(".lora_linear_layer") {
                return Some((suffix, role, true));
            }
        }
    }
    None
}

/// Component of an unprefixed dotted path, from its top-level name.
fn guess_component(path: &str) -> Component {
    if path.starts_with("text_model.") {
        Component::TextEncoder
    } else if is_dit_path(path, '.') {
        Component::Transformer
    } else {
        Component::Unet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: &str) -> (Format, Component, String, String, Role) {
        let k = classify(key).unwrap_or_else(|| panic!("{key} unclassified"));
        (k.format, k.component, k.module, k.path, k.role)
    }

    #[test]
    fn kohya_keys() {
        let (f, comp, m, p, r) =
            c("lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight");
        assert_eq!(
            (f, comp, r),
            (Format::Kohya, Component::TextEncoder2, Role::Down)
        );
        assert_eq!(m, "lora_te2_text_model_encoder_layers_0_self_attn_k_proj");
        assert_eq!(p, "text_model_encoder_layers_0_self_attn_k_proj");
        assert_eq!(
            c("lora_unet_double_blocks_0_img_attn_qkv.alpha").1,
            Component::Transformer
        );
        assert_eq!(
            c("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.hada_w1_a").1,
            Component::Unet
        );
        assert_eq!(
            c("lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1").4,
            Role::LokrW1
        );
        assert!(classify("lora_unet_x.something_else").is_none());
        assert!(classify("model.diffusion_model.input_blocks.0.0.weight").is_none());
    }

    #[test]
    fn dotted_keys() {
        let (f, comp, m, p, r) =
            c("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight");
        assert_eq!((f, comp, r), (Format::Peft, Component::Unet, Role::Down));
        assert_eq!(
            m,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            p,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        let (f, _, m, p, r) =
            c("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight");
        assert_eq!((f, r), (Format::DiffusersOld, Role::Up));
        assert!(m.ends_with("processor.to_q_lora"));
        assert_eq!(
            p,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        let (f, comp, _, p, _) =
            c("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight");
        assert_eq!((f, comp), (Format::DiffusersOld, Component::TextEncoder));
        assert_eq!(p, "text_model.encoder.layers.0.mlp.fc1");
        let (_, _, _, p, _) =
            c("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight");
        assert_eq!(p, "text_model.encoder.layers.0.self_attn.q_proj");
        assert_eq!(
            c("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight").1,
            Component::Transformer
        );
        assert_eq!(
            c("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight").1,
            Component::Transformer
        );
        assert_eq!(
            c("unet.mid_block.attentions.0.proj_in.lora_magnitude_vector").4,
            Role::DoraScale
        );
    }
}

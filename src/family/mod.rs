//! Base-model families and their detection.
//!
//! Two independent witnesses: the training metadata (`ss_base_model_version`,
//! `modelspec.architecture`, `ss_v2`) and the adapter's keys and shapes (cross-attention K/V input
//! width, text-encoder widths, text-encoder prefixes, UNet naming and transformer depth, DiT block
//! names). Width-based and name-based key evidence is decisive and wins over metadata; weaker
//! structural hints (linear vs conv `proj_in`) only decide when metadata is silent. Disagreements
//! are reported, never hidden.

pub mod block_weight;
pub mod checkpoint;
mod component;
pub mod fp8;
pub mod kohya_names;
pub mod layout;
pub mod module_names;
pub mod parts;
pub mod unet_names;
pub mod vae_names;

use crate::adapter::AdapterModule;
pub use component::Component;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseModel {
    Sd1,
    Sd2,
    Sdxl,
    Sd3,
    Flux,
    Unknown,
}

impl BaseModel {
    /// What kohya writes for a LoRA of this family: `ss_base_model_version`,
    /// `modelspec.architecture` and `modelspec.resolution`. `None` for an unknown family.
    pub fn kohya_lora_metadata(self) -> Option<(&'static str, &'static str, &'static str)> {
        Some(match self {
            BaseModel::Sd1 => ("sd_v1", "stable-diffusion-v1/lora", "512x512"),
            BaseModel::Sd2 => ("sd_v2", "stable-diffusion-v2-512/lora", "512x512"),
            BaseModel::Sdxl => (
                "sdxl_base_v1-0",
                "stable-diffusion-xl-v1-base/lora",
                "1024x1024",
            ),
            BaseModel::Sd3 => ("sd3", "stable-diffusion-3-medium/lora", "1024x1024"),
            BaseModel::Flux => ("flux1", "flux-1-dev/lora", "1024x1024"),
            BaseModel::Unknown => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd1",
            BaseModel::Sd2 => "sd2",
            BaseModel::Sdxl => "sdxl",
            BaseModel::Sd3 => "sd3",
            BaseModel::Flux => "flux",
            BaseModel::Unknown => "unknown",
        }
    }
}

/// How much a key-based finding can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// Real model widths or names only one family has.
    Decisive,
    /// Structure that usually tells families apart (tiny or unusual files may mislead it).
    Hint,
}

#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub base_model: BaseModel,
    pub from_metadata: Option<BaseModel>,
    pub from_keys: Option<BaseModel>,
    pub key_evidence: Option<Evidence>,
    /// Why the keys say what they say, for humans.
    pub key_reason: Option<String>,
}

impl Detection {
    pub fn conflict(&self) -> bool {
        matches!((self.from_metadata, self.from_keys), (Some(a), Some(b)) if a != b)
    }
}

/// The family the training metadata names, if any.
pub fn from_metadata(meta: &BTreeMap<String, String>) -> Option<BaseModel> {
    if let Some(v) = meta.get("ss_base_model_version") {
        let v = v.to_ascii_lowercase();
        let found = if v.starts_with("sd_v1") {
            Some(BaseModel::Sd1)
        } else if v.starts_with("sd_v2") {
            Some(BaseModel::Sd2)
        } else if v.starts_with("sdxl") {
            Some(BaseModel::Sdxl)
        } else if v.starts_with("sd3") {
            Some(BaseModel::Sd3)
        } else if v.starts_with("flux") {
            Some(BaseModel::Flux)
        } else {
            None
        };
        if found.is_some() {
            return found;
        }
    }
    if let Some(arch) = meta.get("modelspec.architecture") {
        let a = arch.to_ascii_lowercase();
        for (prefix, fam) in [
            ("stable-diffusion-v1", BaseModel::Sd1),
            ("stable-diffusion-v2", BaseModel::Sd2),
            ("stable-diffusion-xl", BaseModel::Sdxl),
            ("stable-diffusion-3", BaseModel::Sd3),
            ("flux-1", BaseModel::Flux),
        ] {
            if a.starts_with(prefix) {
                return Some(fam);
            }
        }
    }
    match meta.get("ss_v2").map(String::as_str) {
        Some("True") | Some("true") => Some(BaseModel::Sd2),
        _ => None,
    }
}

fn ends_with_any(path: &str, names: &[&str]) -> bool {
    names.iter().any(|n| {
        path.strip_suffix(n)
            .is_some_and(|stem| stem.ends_with('_') || stem.ends_with('.'))
    })
}

/// Index of the transformer block inside an SD attention module, if the path has one.
fn transformer_block_index(path: &str) -> Option<usize> {
    let sep = if path.contains('.') { '.' } else { '_' };
    let marker = format!("transformer_blocks{sep}");
    let at = path.find(&marker)?;
    // DiT paths start with transformer_blocks; SD UNets nest them inside attentions.
    if at == 0 {
        return None;
    }
    path[at + marker.len()..].split(sep).next()?.parse().ok()
}

/// The family the adapter's keys and shapes point to.
pub fn from_modules(modules: &[AdapterModule]) -> Option<(BaseModel, Evidence, String)> {
    use BaseModel::*;
    use Evidence::*;
    let has = |c: Component| modules.iter().any(|m| m.component == c);
    let in_width = |m: &AdapterModule| m.shape.get(1).copied();

    // DiT transformers.
    let dit: Vec<&AdapterModule> = modules
        .iter()
        .filter(|m| m.component == Component::Transformer)
        .collect();
    if !dit.is_empty() {
        let starts = |p: &str| dit.iter().any(|m| m.path.starts_with(p));
        if starts("double_blocks") || starts("single_blocks") || starts("single_transformer_blocks")
        {
            return Some((Flux, Decisive, "Flux double/single stream blocks".into()));
        }
        if starts("joint_blocks") {
            return Some((Sd3, Decisive, "SD3 MMDiT joint blocks".into()));
        }
        let attn_width = dit
            .iter()
            .filter(|m| ends_with_any(&m.path, &["to_q", "to_k", "to_v"]))
            .find_map(|m| in_width(m));
        return match attn_width {
            Some(3072) => Some((Flux, Decisive, "transformer width 3072".into())),
            Some(w @ (1536 | 2432)) => Some((Sd3, Decisive, format!("transformer width {w}"))),
            _ => None,
        };
    }

    // UNet families: cross-attention K/V input width is the text-embedding width.
    let cross = modules
        .iter()
        .filter(|m| m.component == Component::Unet)
        .filter(|m| {
            ends_with_any(
                &m.path,
                &["attn2_to_k", "attn2_to_v", "attn2.to_k", "attn2.to_v"],
            )
        })
        .find_map(&in_width);
    match cross {
        Some(768) => return Some((Sd1, Decisive, "cross-attention width 768".into())),
        Some(1024) => return Some((Sd2, Decisive, "cross-attention width 1024".into())),
        Some(w @ (2048 | 1280)) => {
            return Some((Sdxl, Decisive, format!("cross-attention width {w}")))
        }
        _ => {}
    }
    if has(Component::TextEncoder2) && has(Component::TextEncoder3) {
        return Some((Sd3, Decisive, "three text encoders".into()));
    }
    if has(Component::TextEncoder2) {
        return Some((Sdxl, Decisive, "two text encoders (te1/te2)".into()));
    }
    let te_width = modules
        .iter()
        .filter(|m| m.component == Component::TextEncoder)
        .filter(|m| ends_with_any(&m.path, &["q_proj", "k_proj", "v_proj"]))
        .find_map(in_width);
    let unet: Vec<&AdapterModule> = modules
        .iter()
        .filter(|m| m.component == Component::Unet)
        .collect();
    let kohya_ldm_names = unet.iter().any(|m| {
        m.path.starts_with("input_blocks")
            || m.path.starts_with("output_blocks")
            || m.path.starts_with("middle_block")
    });
    if kohya_ldm_names {
        // kohya names SD1/SD2 UNets by diffusers paths and SDXL UNets by LDM paths.
        return Some((Sdxl, Decisive, "UNet named in SDXL's LDM layout".into()));
    }
    if unet
        .iter()
        .any(|m| transformer_block_index(&m.path).is_some_and(|i| i >= 2))
    {
        return Some((
            Sdxl,
            Decisive,
            "attention with more than two transformer blocks".into(),
        ));
    }
    match te_width {
        Some(1024) => return Some((Sd2, Decisive, "text-encoder width 1024".into())),
        Some(768) if unet.is_empty() => {
            return Some((Sd1, Hint, "text-encoder width 768 (CLIP-L)".into()))
        }
        _ => {}
    }
    // SD2 (and SDXL, excluded above) use linear proj_in/proj_out; SD1 uses 1×1 convs. Only
    // modules whose factors keep the weight's dimensions tell the two apart.
    let proj = unet
        .iter()
        .find(|m| ends_with_any(&m.path, &["proj_in", "proj_out"]) && m.shape_is_exact);
    if let Some(p) = proj {
        return Some(if p.shape.len() == 2 {
            (Sd2, Hint, "linear proj_in/proj_out".into())
        } else {
            (Sd1, Hint, "1×1 conv proj_in/proj_out".into())
        });
    }
    if !unet.is_empty() {
        return Some((
            Sd1,
            Hint,
            "diffusers-named UNet without SDXL structure".into(),
        ));
    }
    None
}

/// Combines both witnesses.
pub fn detect(meta: &BTreeMap<String, String>, modules: &[AdapterModule]) -> Detection {
    let from_metadata = from_metadata(meta);
    let keys = from_modules(modules);
    let base_model = match (&keys, from_metadata) {
        (Some((fam, Evidence::Decisive, _)), _) => *fam,
        (_, Some(meta)) => meta,
        (Some((fam, Evidence::Hint, _)), None) => *fam,
        (None, None) => BaseModel::Unknown,
    };
    Detection {
        base_model,
        from_metadata,
        from_keys: keys.as_ref().map(|k| k.0),
        key_evidence: keys.as_ref().map(|k| k.1),
        key_reason: keys.map(|k| k.2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names() {
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(
            from_metadata(&m("ss_base_model_version", "sdxl_base_v1-0")),
            Some(BaseModel::Sdxl)
        );
        assert_eq!(
            from_metadata(&m("ss_base_model_version", "sd_v2_v")),
            Some(BaseModel::Sd2)
        );
        assert_eq!(
            from_metadata(&m("modelspec.architecture", "flux-1-dev/lora")),
            Some(BaseModel::Flux)
        );
        assert_eq!(from_metadata(&m("ss_v2", "True")), Some(BaseModel::Sd2));
        assert_eq!(from_metadata(&m("ss_v2", "False")), None);
    }

    #[test]
    fn transformer_block_index_parses_both_dialects() {
        assert_eq!(
            transformer_block_index("input_blocks_4_1_transformer_blocks_3_attn1_to_q"),
            Some(3)
        );
        assert_eq!(
            transformer_block_index("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some(0)
        );
        assert_eq!(
            transformer_block_index("transformer_blocks.5.attn.to_q"),
            None
        );
    }
}

//! The `__metadata__` kohya sd-scripts writes into a LoRA it produces, for the fields A1111,
//! ComfyUI, Civitai and kohya's own tools read: the one place loratool's writers (extract, resize,
//! LoRA+LoRA merge, convert) build them.

use crate::family::BaseModel;
use crate::tensors::writer::{sshs_model_hash, TensorSpec};
use std::collections::BTreeMap;

/// Network fields of a LoRA loratool writes.
#[derive(Debug, Clone, Default)]
pub struct NetworkShape {
    /// Ranks of the low-rank modules (any order).
    pub ranks: Vec<usize>,
    /// Rank of the k×k convolution modules, when there are any.
    pub conv_rank: Option<usize>,
    /// A rank chosen per module (`--dynamic`): `ss_network_dim` is "Dynamic" whatever the ranks.
    pub dynamic: bool,
}

impl NetworkShape {
    /// kohya's `ss_network_dim`: the common rank, or "Dynamic" when modules differ.
    pub fn dim(&self) -> Option<String> {
        let mut ranks = self.ranks.clone();
        ranks.sort_unstable();
        ranks.dedup();
        match ranks.as_slice() {
            _ if self.dynamic => Some("Dynamic".into()),
            [] => None,
            [r] => Some(r.to_string()),
            _ => Some("Dynamic".into()),
        }
    }
}

/// Sets the family fields kohya writes (`ss_base_model_version`, `ss_v2`,
/// `modelspec.architecture`, `modelspec.resolution`, `modelspec.sai_model_spec`), keeping any the
/// file already has: they describe the training, which a conversion does not change.
pub fn set_family(meta: &mut BTreeMap<String, String>, family: BaseModel) {
    if let Some((version, arch, resolution)) = family.kohya_lora_metadata() {
        meta.entry("ss_base_model_version".into())
            .or_insert(version.into());
        let v2 = if family == BaseModel::Sd2 {
            "True"
        } else {
            "False"
        };
        meta.entry("ss_v2".into()).or_insert(v2.into());
        meta.entry("modelspec.architecture".into())
            .or_insert(arch.into());
        meta.entry("modelspec.resolution".into())
            .or_insert(resolution.into());
    }
    meta.entry("modelspec.sai_model_spec".into())
        .or_insert("1.0.1".into());
}

/// Sets the network fields for the modules actually written: `ss_network_module`,
/// `ss_network_dim` = `ss_network_alpha` (loratool's factors carry their scale, alpha = rank), and
/// `ss_network_args` with the conv rank when k×k convolutions are kept low-rank.
pub fn set_network(meta: &mut BTreeMap<String, String>, shape: &NetworkShape) {
    // A file that keeps LyCORIS modules (a converted LoHa) keeps LyCORIS's network module.
    meta.entry("ss_network_module".into())
        .or_insert("networks.lora".into());
    if let Some(dim) = shape.dim() {
        meta.insert("ss_network_dim".into(), dim.clone());
        meta.insert("ss_network_alpha".into(), dim);
    }
    if let Some(c) = shape.conv_rank {
        meta.insert(
            "ss_network_args".into(),
            serde_json::json!({"conv_dim": c.to_string(), "conv_alpha": c.to_string()}).to_string(),
        );
    }
}

/// The last step before writing: kohya's `sshs_model_hash` of exactly these tensor bytes, and no
/// field that described other tensors (`sshs_legacy_hash`, peft's `lora_adapter_metadata`).
pub fn seal(meta: &mut BTreeMap<String, String>, tensors: &[(TensorSpec, Vec<u8>)]) {
    seal_with_hash(meta, sshs_model_hash(tensors));
}

/// [`seal`] for tensors that are not in memory: `data_sha256` is the sha256 (hex) of their bytes
/// in write order.
pub fn seal_with_hash(meta: &mut BTreeMap<String, String>, data_sha256: String) {
    meta.remove("sshs_legacy_hash");
    meta.remove("lora_adapter_metadata");
    meta.insert("sshs_model_hash".into(), data_sha256);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims() {
        let s = |ranks: Vec<usize>, dynamic| NetworkShape {
            ranks,
            conv_rank: None,
            dynamic,
        };
        assert_eq!(s(vec![4, 4], false).dim().as_deref(), Some("4"));
        assert_eq!(s(vec![4, 8], false).dim().as_deref(), Some("Dynamic"));
        assert_eq!(s(vec![4], true).dim().as_deref(), Some("Dynamic"));
        assert_eq!(s(vec![], false).dim(), None);
        let mut meta = BTreeMap::from([("ss_base_model_version".into(), "sd_v1".into())]);
        set_family(&mut meta, BaseModel::Sdxl);
        assert_eq!(meta["ss_base_model_version"], "sd_v1", "kept");
        assert_eq!(
            meta["modelspec.architecture"],
            "stable-diffusion-xl-v1-base/lora"
        );
    }
}

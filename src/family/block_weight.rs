//! The LoRA Block Weight (LBW) convention of hako-mikan's sd-webui-lora-block-weight: one multiplier
//! per UNet block (SD1/SD2/SDXL) or per transformer block (Flux), written as `lbw=1,0,0,…` or a
//! preset name (`lbw=OUTALL`). docs/BLOCK_WEIGHTS.md has the tables and where peers disagree.
//!
//! A module's block comes from its LDM path (`input_blocks.N` → INnn, `middle_block` → M00,
//! `output_blocks.N` → OUTnn; every text encoder → BASE) or its BFL path (`double_blocks.N` → Dnn,
//! `single_blocks.N` → Snn, the `*_in` embedders → IN, `final_layer` → OUT; CLIP and T5 apart).
//! kohya names are resolved through [`kohya_to_dotted`] and diffusers paths through
//! [`diffusers_to_ldm`], so no name is ever split on `_` to find where dots were.
//!
//! As in the extension, a short list (17 for SD1/SD2, 12 for SDXL) is spread over the full layout
//! (26 / 20) with **0** for the blocks it does not name, and a module outside every block
//! (`time_embed`, `label_emb`, `out.`) keeps its weight: multiplier 1.

use super::kohya_names::kohya_to_dotted;
use super::unet_names::diffusers_to_ldm;
use super::{BaseModel, Component};
use crate::adapter::AdapterModule;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// One block of the convention, named as the extension names it ([`Block::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Block {
    /// Every SD1/SD2/SDXL text encoder (`BASE`).
    Base,
    /// LDM `input_blocks.N` (`IN00`…`IN11`; SDXL has `IN00`…`IN08`).
    In(u8),
    /// LDM `middle_block` (`M00`; the extension's tables print it as MID).
    Mid,
    /// LDM `output_blocks.N` (`OUT00`…`OUT11`; SDXL has `OUT00`…`OUT08`).
    Out(u8),
    /// Flux's CLIP-L text encoder (`CLIP`).
    Clip,
    /// Flux's T5-XXL text encoder (`T5`).
    T5,
    /// Flux's input embedders `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in` (`IN`).
    Embedders,
    /// Flux `double_blocks.N` (`D00`…`D18`).
    Double(u8),
    /// Flux `single_blocks.N` (`S00`…`S37`).
    Single(u8),
    /// Flux `final_layer` (`OUT`).
    Final,
}

impl Block {
    /// The extension's block id (`BASE`, `IN04`, `M00`, `OUT11`, `CLIP`, `T5`, `IN`, `D00`, `S37`,
    /// `OUT`).
    pub fn id(self) -> String {
        match self {
            Block::Base => "BASE".into(),
            Block::In(n) => format!("IN{n:02}"),
            Block::Mid => "M00".into(),
            Block::Out(n) => format!("OUT{n:02}"),
            Block::Clip => "CLIP".into(),
            Block::T5 => "T5".into(),
            Block::Embedders => "IN".into(),
            Block::Double(n) => format!("D{n:02}"),
            Block::Single(n) => format!("S{n:02}"),
            Block::Final => "OUT".into(),
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// The full layout of a family, in the order its full weight list is written: 26 blocks for
/// SD1/SD2 (BLOCKID26), 20 for SDXL (BLOCKID20), 61 for Flux (BLOCKIDFLUX).
fn full_layout(family: BaseModel) -> Option<Vec<Block>> {
    let unet = |n: u8| {
        let mut v = vec![Block::Base];
        v.extend((0..n).map(Block::In));
        v.push(Block::Mid);
        v.extend((0..n).map(Block::Out));
        v
    };
    match family {
        BaseModel::Sd1 | BaseModel::Sd2 => Some(unet(12)),
        BaseModel::Sdxl => Some(unet(9)),
        BaseModel::Flux => {
            let mut v = vec![Block::Clip, Block::T5, Block::Embedders];
            v.extend((0..19).map(Block::Double));
            v.extend((0..38).map(Block::Single));
            v.push(Block::Final);
            Some(v)
        }
        BaseModel::Sd3 | BaseModel::Unknown => None,
    }
}

/// The short layout, the blocks a plain attention-only LoRA has: 17 for SD1/SD2 (BLOCKID17), 12 for
/// SDXL (BLOCKID12). Flux has one form only.
fn short_layout(family: BaseModel) -> Option<Vec<Block>> {
    let mut v = vec![Block::Base];
    match family {
        BaseModel::Sd1 | BaseModel::Sd2 => {
            v.extend([1, 2, 4, 5, 7, 8].map(Block::In));
            v.push(Block::Mid);
            v.extend((3..12).map(Block::Out));
        }
        BaseModel::Sdxl => {
            v.extend([4, 5, 7, 8].map(Block::In));
            v.push(Block::Mid);
            v.extend((0..6).map(Block::Out));
        }
        _ => return None,
    }
    Some(v)
}

/// Weight counts a family takes, short form first.
fn counts(family: BaseModel) -> Vec<usize> {
    [short_layout(family), full_layout(family)]
        .into_iter()
        .flatten()
        .map(|l| l.len())
        .collect()
}

const SD: &[BaseModel] = &[BaseModel::Sd1, BaseModel::Sd2];
const SDXL: &[BaseModel] = &[BaseModel::Sdxl];
const FLUX: &[BaseModel] = &[BaseModel::Flux];
const EVERY: &[BaseModel] = &[
    BaseModel::Sd1,
    BaseModel::Sd2,
    BaseModel::Sdxl,
    BaseModel::Flux,
];

enum PresetValues {
    /// The same weight for every block of the family's short form.
    Constant(f32),
    /// Weights written in the family's short form, as in the extension's preset file.
    Listed(&'static str),
}

/// The presets: the extension's default list (DEF_WEIGHT_PRESET) for SD1/SD2 and Flux, and, since
/// the extension ships none for SDXL, Inspire-Pack's `SDXL-*` presets under their plain names.
/// NONE, ALL and ALL0.5 are constants, so they exist in every family's short form.
const PRESETS: &[(&str, &[BaseModel], PresetValues)] = {
    use PresetValues::*;
    &[
        ("NONE", EVERY, Constant(0.0)),
        ("ALL", EVERY, Constant(1.0)),
        ("INS", SD, Listed("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0")),
        ("IND", SD, Listed("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0")),
        ("INALL", SD, Listed("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0")),
        ("MIDD", SD, Listed("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0")),
        ("OUTD", SD, Listed("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0")),
        ("OUTS", SD, Listed("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1")),
        ("OUTALL", SD, Listed("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")),
        ("INALL", SDXL, Listed("1,1,1,1,1,0,0,0,0,0,0,0")),
        ("MIDALL", SDXL, Listed("1,0,0,0,0,1,0,0,0,0,0,0")),
        ("OUTALL", SDXL, Listed("1,0,0,0,0,0,1,1,1,1,1,1")),
        ("ALL0.5", EVERY, Constant(0.5)),
        ("FLUXALL", FLUX, Constant(1.0)),
    ]
};

/// Names of the presets a family has, in table order.
fn preset_names(family: BaseModel) -> Vec<&'static str> {
    PRESETS
        .iter()
        .filter(|(_, fams, _)| fams.contains(&family))
        .map(|(name, _, _)| *name)
        .collect()
}

/// Every preset name once, in table order.
fn all_preset_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Vec::new();
    for (name, _, _) in PRESETS {
        if !names.contains(name) {
            names.push(name);
        }
    }
    names
}

/// A parsed `lbw=` value, before the family is known.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockWeightSpec {
    /// A preset name, in the table's spelling.
    Preset(String),
    /// Weights in one of the list forms (12, 17, 20, 26 or 61 values).
    Values(Vec<f32>),
}

fn render(values: &[f32]) -> String {
    values
        .iter()
        .map(f32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a list item that is not a number was refused, for the ones peers give a meaning to.
fn special_value(item: &str) -> Option<&'static str> {
    match item {
        "R" | "r" | "U" | "u" => Some(
            "is a random weight, drawn anew for every image (the extension's R and U); a merge needs numbers",
        ),
        "A" | "a" | "B" | "b" => Some(
            "is an Inspire-Pack placeholder for the node's A/B inputs; a merge needs numbers",
        ),
        _ if item.starts_with('X') => Some(
            "is a dynamic weight taken from the prompt (the extension's X); a merge needs numbers",
        ),
        _ => None,
    }
}

impl BlockWeightSpec {
    /// Parses the text after `lbw=`: a preset name (any case) or comma-separated numbers. The
    /// extension's per-image values (R, U, X…) and Inspire-Pack's A/B placeholders are refused: a
    /// merge writes one weight, so it needs numbers.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |why: String| Error::Invalid(format!("lbw={text}: {why}"));
        if text.is_empty() {
            return Err(bad(
                "empty; give a preset name or comma-separated weights".into()
            ));
        }
        if !text.contains(',') && text.parse::<f32>().is_err() {
            if let Some(why) = special_value(text) {
                return Err(bad(format!("'{text}' {why}")));
            }
            return match all_preset_names()
                .into_iter()
                .find(|n| n.eq_ignore_ascii_case(text))
            {
                Some(name) => Ok(BlockWeightSpec::Preset(name.to_string())),
                None => Err(bad(format!(
                    "unknown preset; known: {}",
                    all_preset_names().join(", ")
                ))),
            };
        }
        let mut values = Vec::new();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            let n = i + 1;
            if item.is_empty() {
                return Err(bad(format!("weight {n} is empty")));
            }
            if let Some(why) = special_value(item) {
                return Err(bad(format!("weight {n} ('{item}') {why}")));
            }
            match item.parse::<f32>() {
                Ok(v) if v.is_finite() => values.push(v),
                Ok(_) => return Err(bad(format!("weight {n} ('{item}') is not finite"))),
                Err(_) => return Err(bad(format!("weight {n} ('{item}') is not a number"))),
            }
        }
        if ![12, 17, 20, 26, 61].contains(&values.len()) {
            return Err(bad(format!(
                "{} weight{}; the forms are 17 or 26 (sd1/sd2), 12 or 20 (sdxl), 61 (flux), or a preset ({})",
                values.len(),
                if values.len() == 1 { "" } else { "s" },
                all_preset_names().join(", ")
            )));
        }
        Ok(BlockWeightSpec::Values(values))
    }

    /// The per-block weights for one family. A list of the wrong length for the family, or a
    /// preset the family does not have, is an error; nothing is padded or cut.
    pub fn resolve(&self, family: BaseModel) -> Result<BlockWeights> {
        // Presets are written in the short form, or the only form where there is no short one.
        let Some(preset_form) = short_layout(family).or_else(|| full_layout(family)) else {
            return Err(Error::Invalid(format!(
                "lbw={self}: {} LoRAs have no block-weight layout (the convention covers sd1, sd2, sdxl and flux)",
                family.name()
            )));
        };
        match self {
            BlockWeightSpec::Values(values) => BlockWeights::from_values(family, values),
            BlockWeightSpec::Preset(name) => {
                let found = PRESETS
                    .iter()
                    .find(|(n, fams, _)| n == name && fams.contains(&family));
                let Some((_, _, values)) = found else {
                    return Err(Error::Invalid(format!(
                        "lbw={name}: no such {} preset; {} presets: {} (or give {} weights)",
                        family.name(),
                        family.name(),
                        preset_names(family).join(", "),
                        counts_text(family)
                    )));
                };
                let values = match values {
                    PresetValues::Constant(w) => vec![*w; preset_form.len()],
                    PresetValues::Listed(text) => match BlockWeightSpec::parse(text)? {
                        BlockWeightSpec::Values(v) => v,
                        BlockWeightSpec::Preset(_) => unreachable!("presets are lists"),
                    },
                };
                BlockWeights::from_values(family, &values)
            }
        }
    }
}

fn counts_text(family: BaseModel) -> String {
    counts(family)
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

impl FromStr for BlockWeightSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BlockWeightSpec::parse(s)
    }
}

impl fmt::Display for BlockWeightSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockWeightSpec::Preset(name) => f.write_str(name),
            BlockWeightSpec::Values(v) => f.write_str(&render(v)),
        }
    }
}

/// Per-block multipliers for one family, over the family's full layout.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights {
    family: BaseModel,
    weights: Vec<(Block, f32)>,
}

impl BlockWeights {
    /// Weights given in the family's short or full form. The short form's unnamed blocks get 0,
    /// as the extension's `to26` gives them.
    pub fn from_values(family: BaseModel, values: &[f32]) -> Result<BlockWeights> {
        let (Some(full), short) = (full_layout(family), short_layout(family)) else {
            return Err(Error::Invalid(format!(
                "lbw={}: {} LoRAs have no block-weight layout (the convention covers sd1, sd2, sdxl and flux)",
                render(values),
                family.name()
            )));
        };
        let given = if values.len() == full.len() {
            full.clone()
        } else {
            match short {
                Some(short) if values.len() == short.len() => short,
                _ => {
                    return Err(Error::Invalid(format!(
                        "lbw={}: {} weights; {} takes {} (or a preset: {})",
                        render(values),
                        values.len(),
                        family.name(),
                        counts_text(family),
                        preset_names(family).join(", ")
                    )))
                }
            }
        };
        let named: HashMap<Block, f32> = given.into_iter().zip(values.iter().copied()).collect();
        let weights = full
            .into_iter()
            .map(|b| (b, named.get(&b).copied().unwrap_or(0.0)))
            .collect();
        Ok(BlockWeights { family, weights })
    }

    pub fn family(&self) -> BaseModel {
        self.family
    }

    /// Every block of the family's full layout with its weight, in list order.
    pub fn blocks(&self) -> &[(Block, f32)] {
        &self.weights
    }

    /// The weight of one block; `None` for a block the family does not have.
    pub fn get(&self, block: Block) -> Option<f32> {
        self.weights
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, w)| *w)
    }

    /// The multiplier for one adapter module: its block's weight, or 1 for a module outside every
    /// block (`time_embed`, `label_emb`, `out.`), which the extension leaves untouched.
    pub fn weight_for(&self, module: &AdapterModule) -> f32 {
        self.weight_for_path(module.component, &module.path)
    }

    /// Same from a component and a module path: kohya's underscore form (after `lora_unet_` /
    /// `lora_te…_`), or a dotted diffusers, LDM or BFL path.
    pub fn weight_for_path(&self, component: Component, path: &str) -> f32 {
        block_of(self.family, component, path)
            .and_then(|b| self.get(b))
            .unwrap_or(1.0)
    }
}

impl fmt::Display for BlockWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(b, w)| format!("{b}={w}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// kohya module name → (component, dotted diffusers path), built once per naming (only SDXL's
/// differs).
fn kohya_names(family: BaseModel) -> &'static HashMap<String, (Component, String)> {
    static SD: OnceLock<HashMap<String, (Component, String)>> = OnceLock::new();
    static SDXL: OnceLock<HashMap<String, (Component, String)>> = OnceLock::new();
    if family == BaseModel::Sdxl {
        SDXL.get_or_init(|| kohya_to_dotted(BaseModel::Sdxl))
    } else {
        SD.get_or_init(|| kohya_to_dotted(BaseModel::Sd1))
    }
}

/// A UNet module's dotted LDM path, from a kohya underscore path, a diffusers path or an LDM path.
fn unet_ldm_path(family: BaseModel, path: &str) -> Option<String> {
    let kohya = if path.contains('.') {
        None
    } else {
        kohya_names(family)
            .get(&format!("lora_unet_{path}"))
            .map(|(_, dotted)| dotted.as_str())
    };
    let dotted = kohya.unwrap_or(path);
    let is_ldm = ["input_blocks.", "middle_block.", "output_blocks."]
        .iter()
        .any(|p| dotted.starts_with(p));
    if is_ldm {
        return Some(dotted.to_string());
    }
    // Only an upsampler's sub-index depends on whether its up block has attentions, never the
    // output block it lands in, so any answer does here.
    diffusers_to_ldm(dotted, |_| true)
}

/// The block of an LDM UNet path; `None` outside the three block lists.
fn ldm_block(ldm: &str) -> Option<Block> {
    let index = |rest: &str| rest.split('.').next()?.parse::<u8>().ok();
    if let Some(rest) = ldm.strip_prefix("input_blocks.") {
        index(rest).map(Block::In)
    } else if ldm.starts_with("middle_block.") {
        Some(Block::Mid)
    } else if let Some(rest) = ldm.strip_prefix("output_blocks.") {
        index(rest).map(Block::Out)
    } else {
        None
    }
}

/// A block constructor taking the block's index.
type Numbered = fn(u8) -> Block;

/// Flux top-level modules and their block: BFL names (kohya writes them with `_`), then the
/// diffusers names of the same modules. Numbered roots take the block index that follows.
const FLUX_ROOTS: &[(&str, Numbered)] = &[
    ("double_blocks", Block::Double),
    ("single_blocks", Block::Single),
    ("single_transformer_blocks", Block::Single),
    ("transformer_blocks", Block::Double),
];
const FLUX_UNNUMBERED: &[(&str, Block)] = &[
    ("img_in", Block::Embedders),
    ("txt_in", Block::Embedders),
    ("time_in", Block::Embedders),
    ("vector_in", Block::Embedders),
    ("guidance_in", Block::Embedders),
    ("final_layer", Block::Final),
    ("x_embedder", Block::Embedders),
    ("context_embedder", Block::Embedders),
    ("time_text_embed", Block::Embedders),
    ("norm_out", Block::Final),
    ("proj_out", Block::Final),
];

fn flux_block(component: Component, path: &str) -> Option<Block> {
    match component {
        Component::TextEncoder => return Some(Block::Clip),
        // diffusers names T5 text_encoder_2, kohya lora_te3.
        Component::TextEncoder2 | Component::TextEncoder3 => return Some(Block::T5),
        Component::Unet | Component::Transformer => {}
    }
    let sep = if path.contains('.') { '.' } else { '_' };
    let below = |root: &str| -> Option<&str> {
        let rest = path.strip_prefix(root)?;
        if rest.is_empty() {
            Some(rest)
        } else {
            rest.strip_prefix(sep)
        }
    };
    for (root, block) in FLUX_ROOTS {
        if let Some(rest) = below(root) {
            let n = rest.split(sep).next()?.parse::<u8>().ok()?;
            return Some(block(n));
        }
    }
    FLUX_UNNUMBERED
        .iter()
        .find(|(root, _)| below(root).is_some())
        .map(|(_, b)| *b)
}

/// The block a module belongs to, `None` for one outside every block (SD `time_embed`,
/// `label_emb`, `out.`; an unknown name; SD3 and unknown families, which have no layout).
pub fn block_of(family: BaseModel, component: Component, path: &str) -> Option<Block> {
    let block = match family {
        BaseModel::Sd1 | BaseModel::Sd2 | BaseModel::Sdxl => {
            if component.is_text_encoder() {
                Some(Block::Base)
            } else if component == Component::Unet {
                ldm_block(&unet_ldm_path(family, path)?)
            } else {
                None
            }
        }
        BaseModel::Flux => flux_block(component, path),
        BaseModel::Sd3 | BaseModel::Unknown => None,
    }?;
    // A block number the family does not have (SDXL input_blocks.9, Flux double_blocks.19) is no
    // block of it.
    full_layout(family)?.contains(&block).then_some(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Adapter;
    use BaseModel::*;
    use Block::*;

    fn values(spec: &str, family: BaseModel) -> Vec<f32> {
        BlockWeightSpec::parse(spec)
            .unwrap()
            .resolve(family)
            .unwrap()
            .blocks()
            .iter()
            .map(|(_, w)| *w)
            .collect()
    }

    fn err(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn layouts_have_the_extensions_ids() {
        let ids = |l: Vec<Block>| l.iter().map(|b| b.id()).collect::<Vec<_>>().join(",");
        assert_eq!(
            ids(short_layout(Sd1).unwrap()),
            "BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11"
        );
        assert_eq!(
            ids(full_layout(Sd2).unwrap()),
            "BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,IN09,IN10,IN11,M00,\
             OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11"
        );
        assert_eq!(
            ids(short_layout(Sdxl).unwrap()),
            "BASE,IN04,IN05,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05"
        );
        assert_eq!(
            ids(full_layout(Sdxl).unwrap()),
            "BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,M00,\
             OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08"
        );
        let flux = full_layout(Flux).unwrap();
        assert_eq!(flux.len(), 61);
        assert_eq!(ids(flux[..4].to_vec()), "CLIP,T5,IN,D00");
        assert_eq!(ids(flux[21..23].to_vec()), "D18,S00");
        assert_eq!(ids(flux[59..].to_vec()), "S37,OUT");
        assert!(short_layout(Flux).is_none());
    }

    #[test]
    fn sd1_kohya_and_peft_names() {
        let cases = [
            (
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                In(1),
            ),
            ("down_blocks_0_attentions_1_proj_in", In(2)),
            ("down_blocks_0_downsamplers_0_conv", In(3)),
            ("down_blocks_1_resnets_1_conv2", In(5)),
            (
                "down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2",
                In(8),
            ),
            ("down_blocks_3_resnets_1_time_emb_proj", In(11)),
            (
                "mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                Mid,
            ),
            ("mid_block_resnets_1_conv1", Mid),
            ("up_blocks_0_resnets_2_conv1", Out(2)),
            ("up_blocks_0_upsamplers_0_conv", Out(2)),
            (
                "up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
                Out(3),
            ),
            ("up_blocks_1_upsamplers_0_conv", Out(5)),
            (
                "up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v",
                Out(11),
            ),
            ("conv_in", In(0)),
        ];
        for (kohya, block) in cases {
            for fam in [Sd1, Sd2] {
                assert_eq!(
                    block_of(fam, Component::Unet, kohya),
                    Some(block),
                    "{kohya}"
                );
            }
            let dotted = kohya_names(Sd1)[&format!("lora_unet_{kohya}")].1.clone();
            assert_eq!(
                block_of(Sd1, Component::Unet, &dotted),
                Some(block),
                "{dotted}"
            );
        }
        assert_eq!(
            block_of(
                Sd1,
                Component::Unet,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
            ),
            Some(In(1))
        );
        // kohya SD1 names in the LDM spelling, and dotted LDM paths.
        assert_eq!(
            block_of(Sd1, Component::Unet, "input_blocks_7_1_proj_out"),
            Some(In(7))
        );
        assert_eq!(
            block_of(Sd1, Component::Unet, "output_blocks.11.1.proj_out"),
            Some(Out(11))
        );
        // Outside every block: left at 1 by the extension.
        for path in [
            "time_embedding_linear_1",
            "time_embedding.linear_2",
            "conv_out",
            "conv_norm_out",
            "time_embed.0",
            "out.2",
            "not_a_module",
        ] {
            assert_eq!(block_of(Sd1, Component::Unet, path), None, "{path}");
        }
    }

    #[test]
    fn sdxl_kohya_ldm_and_peft_names() {
        let kohya = [
            ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", In(4)),
            ("input_blocks_8_1_transformer_blocks_9_ff_net_2", In(8)),
            ("input_blocks_6_0_op", In(6)),
            ("input_blocks_1_0_in_layers_2", In(1)),
            ("middle_block_1_transformer_blocks_0_attn2_to_v", Mid),
            ("middle_block_2_emb_layers_1", Mid),
            ("output_blocks_0_1_transformer_blocks_9_ff_net_2", Out(0)),
            ("output_blocks_5_1_transformer_blocks_1_attn2_to_q", Out(5)),
            ("output_blocks_5_2_conv", Out(5)),
            ("output_blocks_8_0_skip_connection", Out(8)),
            // LyCORIS writes SDXL names in the diffusers spelling.
            (
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                In(4),
            ),
            ("up_blocks_2_resnets_2_conv1", Out(8)),
        ];
        for (path, block) in kohya {
            assert_eq!(block_of(Sdxl, Component::Unet, path), Some(block), "{path}");
        }
        let peft = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                In(4),
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
                In(8),
            ),
            ("down_blocks.0.downsamplers.0.conv", In(3)),
            (
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
                Mid,
            ),
            ("up_blocks.0.attentions.0.proj_in", Out(0)),
            (
                "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_v",
                Out(5),
            ),
            ("up_blocks.1.upsamplers.0.conv", Out(5)),
        ];
        for (path, block) in peft {
            assert_eq!(block_of(Sdxl, Component::Unet, path), Some(block), "{path}");
        }
        for path in [
            "time_embed_0",
            "label_emb_0_0",
            "out_2",
            "add_embedding.linear_1",
            "conv_in",
        ] {
            let want = (path == "conv_in").then_some(In(0));
            assert_eq!(block_of(Sdxl, Component::Unet, path), want, "{path}");
        }
        // SDXL has no input_blocks.9.
        assert_eq!(
            block_of(Sdxl, Component::Unet, "input_blocks.9.1.proj_in"),
            None
        );
    }

    #[test]
    fn text_encoders_are_base() {
        for (fam, component, path) in [
            (
                Sd1,
                Component::TextEncoder,
                "text_model_encoder_layers_0_mlp_fc1",
            ),
            (
                Sd2,
                Component::TextEncoder,
                "text_model.encoder.layers.22.self_attn.q_proj",
            ),
            (
                Sdxl,
                Component::TextEncoder,
                "text_model_encoder_layers_0_self_attn_k_proj",
            ),
            (
                Sdxl,
                Component::TextEncoder2,
                "text_model_encoder_layers_31_mlp_fc2",
            ),
        ] {
            assert_eq!(block_of(fam, component, path), Some(Base), "{path}");
        }
    }

    #[test]
    fn flux_kohya_diffusers_and_bfl_names() {
        let t = Component::Transformer;
        let cases = [
            ("double_blocks_0_img_attn_qkv", Double(0)),
            ("double_blocks_18_txt_mlp_2", Double(18)),
            ("single_blocks_37_linear1", Single(37)),
            ("single_blocks_0_modulation_lin", Single(0)),
            ("img_in", Embedders),
            ("txt_in", Embedders),
            ("time_in_in_layer", Embedders),
            ("vector_in_out_layer", Embedders),
            ("guidance_in_in_layer", Embedders),
            ("final_layer_linear", Final),
            ("final_layer_adaLN_modulation_1", Final),
            ("transformer_blocks.0.attn.to_q", Double(0)),
            ("transformer_blocks.18.ff_context.net.2", Double(18)),
            ("single_transformer_blocks.3.proj_mlp", Single(3)),
            ("x_embedder", Embedders),
            ("context_embedder", Embedders),
            ("time_text_embed.timestep_embedder.linear_1", Embedders),
            ("time_text_embed.guidance_embedder.linear_2", Embedders),
            ("norm_out.linear", Final),
            ("proj_out", Final),
            ("double_blocks.0.img_attn.qkv", Double(0)),
            ("single_blocks.3.linear2", Single(3)),
            ("final_layer.adaLN_modulation.1", Final),
            // kohya spelling of diffusers names (lora_transformer_…).
            ("single_transformer_blocks_3_proj_mlp", Single(3)),
            ("transformer_blocks_2_attn_to_q", Double(2)),
        ];
        for (path, block) in cases {
            assert_eq!(block_of(Flux, t, path), Some(block), "{path}");
        }
        assert_eq!(block_of(Flux, t, "double_blocks_19_img_attn_qkv"), None);
        assert_eq!(block_of(Flux, t, "single_blocks.38.linear1"), None);
        assert_eq!(block_of(Flux, t, "pe_embedder"), None);
        assert_eq!(
            block_of(
                Flux,
                Component::TextEncoder,
                "text_model_encoder_layers_0_mlp_fc1"
            ),
            Some(Clip)
        );
        for c in [Component::TextEncoder2, Component::TextEncoder3] {
            assert_eq!(
                block_of(Flux, c, "encoder_block_0_layer_0_SelfAttention_q"),
                Some(T5)
            );
        }
        assert_eq!(block_of(Sd3, t, "joint_blocks_0_x_block_attn_qkv"), None);
    }

    #[test]
    fn sd_presets_are_the_extensions() {
        let want = [
            ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
            ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
            ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
            ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
            ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
            ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
            ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
            ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
            ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
            (
                "ALL0.5",
                "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
            ),
        ];
        assert_eq!(
            preset_names(Sd1),
            want.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
        for (name, list) in want {
            for fam in [Sd1, Sd2] {
                assert_eq!(values(name, fam), values(list, fam), "{name}");
            }
        }
    }

    #[test]
    fn sdxl_and_flux_presets() {
        assert_eq!(
            preset_names(Sdxl),
            ["NONE", "ALL", "INALL", "MIDALL", "OUTALL", "ALL0.5"]
        );
        assert_eq!(
            values("OUTALL", Sdxl),
            values("1,0,0,0,0,0,1,1,1,1,1,1", Sdxl)
        );
        assert_eq!(
            values("INALL", Sdxl),
            values("1,1,1,1,1,0,0,0,0,0,0,0", Sdxl)
        );
        assert_eq!(
            values("MIDALL", Sdxl),
            values("1,0,0,0,0,1,0,0,0,0,0,0", Sdxl)
        );
        assert_eq!(values("ALL", Sdxl), values(&["1"; 12].join(","), Sdxl));
        assert_eq!(preset_names(Flux), ["NONE", "ALL", "ALL0.5", "FLUXALL"]);
        assert_eq!(values("FLUXALL", Flux), vec![1.0; 61]);
        assert_eq!(values("ALL0.5", Flux), vec![0.5; 61]);
        // Any case; the spec keeps the table's spelling.
        assert_eq!(
            BlockWeightSpec::parse("outall").unwrap(),
            BlockWeightSpec::Preset("OUTALL".into())
        );
        assert_eq!(
            BlockWeightSpec::parse(" all0.5 ").unwrap().to_string(),
            "ALL0.5"
        );
    }

    #[test]
    fn short_forms_spread_with_zeros() {
        let w = BlockWeightSpec::parse("1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17")
            .unwrap()
            .resolve(Sd1)
            .unwrap();
        assert_eq!(w.blocks().len(), 26);
        let short = short_layout(Sd1).unwrap();
        for (i, b) in short.iter().enumerate() {
            assert_eq!(w.get(*b), Some(i as f32 + 1.0), "{b}");
        }
        for b in [
            In(0),
            In(3),
            In(6),
            In(9),
            In(10),
            In(11),
            Out(0),
            Out(1),
            Out(2),
        ] {
            assert_eq!(w.get(b), Some(0.0), "{b}");
        }
        // ALL in its 17-value form leaves a LoCon's downsampler at 0, as the extension does.
        let all = BlockWeightSpec::parse("ALL").unwrap().resolve(Sd1).unwrap();
        assert_eq!(
            all.weight_for_path(Component::Unet, "down_blocks_0_downsamplers_0_conv"),
            0.0
        );
        assert_eq!(
            all.weight_for_path(Component::Unet, "down_blocks_0_resnets_0_conv1"),
            1.0
        );

        let w = BlockWeightSpec::parse("1,2,3,4,5,6,7,8,9,10,11,12")
            .unwrap()
            .resolve(Sdxl)
            .unwrap();
        assert_eq!(w.blocks().len(), 20);
        let got: Vec<f32> = w.blocks().iter().map(|(_, v)| *v).collect();
        assert_eq!(
            got,
            [1., 0., 0., 0., 0., 2., 3., 0., 4., 5., 6., 7., 8., 9., 10., 11., 12., 0., 0., 0.]
        );
        // Full forms are taken as written.
        let full: Vec<f32> = (0..26).map(|i| i as f32).collect();
        let w = BlockWeights::from_values(Sd2, &full).unwrap();
        assert_eq!(w.get(Out(11)), Some(25.0));
        assert_eq!(w.get(Mid), Some(13.0));
        assert_eq!(w.to_string().split(',').nth(13), Some("M00=13"));
    }

    #[test]
    fn weights_by_path() {
        let w = BlockWeightSpec::parse("2,0,0,0,0,0,0,3,0,0,0,0,0,0,0,0,5")
            .unwrap()
            .resolve(Sd1)
            .unwrap();
        let te = Component::TextEncoder;
        assert_eq!(
            w.weight_for_path(te, "text_model_encoder_layers_0_mlp_fc1"),
            2.0
        );
        assert_eq!(
            w.weight_for_path(Component::Unet, "mid_block.resnets.0.conv1"),
            3.0
        );
        assert_eq!(
            w.weight_for_path(
                Component::Unet,
                "up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"
            ),
            5.0
        );
        assert_eq!(
            w.weight_for_path(Component::Unet, "down_blocks_0_attentions_0_proj_in"),
            0.0
        );
        assert_eq!(
            w.weight_for_path(Component::Unet, "time_embedding_linear_1"),
            1.0
        );

        let mut flux = vec![0.0; 61];
        flux[0] = 7.0; // CLIP
        flux[1] = 8.0; // T5
        flux[2] = 9.0; // IN
        flux[3 + 5] = 4.0; // D05
        flux[22 + 37] = 6.0; // S37
        flux[60] = 3.0; // OUT
        let w = BlockWeights::from_values(Flux, &flux).unwrap();
        let t = Component::Transformer;
        assert_eq!(w.weight_for_path(t, "double_blocks_5_img_mod_lin"), 4.0);
        assert_eq!(
            w.weight_for_path(t, "single_transformer_blocks.37.proj_out"),
            6.0
        );
        assert_eq!(w.weight_for_path(t, "img_in"), 9.0);
        assert_eq!(w.weight_for_path(t, "norm_out.linear"), 3.0);
        assert_eq!(w.weight_for_path(Component::TextEncoder, "x"), 7.0);
        assert_eq!(w.weight_for_path(Component::TextEncoder3, "x"), 8.0);
        assert_eq!(w.weight_for_path(t, "double_blocks_4_img_mod_lin"), 0.0);
    }

    #[test]
    fn parse_errors() {
        let msg = |text: &str| err(BlockWeightSpec::parse(text));
        assert!(msg("").contains("empty"), "{}", msg(""));
        assert!(msg("  ").contains("empty"));
        let m = msg("1,0,1");
        assert!(
            m.starts_with("lbw=1,0,1: 3 weights; the forms are 17 or 26"),
            "{m}"
        );
        assert!(
            msg("1").starts_with("lbw=1: 1 weight; the forms"),
            "{}",
            msg("1")
        );
        let m = msg("OUTSIDE");
        assert!(
            m.starts_with("lbw=OUTSIDE: unknown preset; known: NONE, ALL, INS"),
            "{m}"
        );
        assert!(m.contains("FLUXALL"), "{m}");
        for special in ["R", "U", "r", "X", "X+0.5"] {
            assert!(msg(special).contains("a merge needs numbers"), "{special}");
        }
        let m = msg("1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R");
        assert!(m.contains("weight 9 ('R') is a random weight"), "{m}");
        let m = msg("X,1,1,1,1,1,1,1,1,1,1,1,X,X,X,X,X");
        assert!(m.contains("weight 1 ('X') is a dynamic weight"), "{m}");
        let m = msg("A,B,B,B,B,B,B,B,B,B,B,B,A,A,A,A,A");
        assert!(m.contains("Inspire-Pack placeholder"), "{m}");
        let m = msg("1,1,,1,1,1,1,1,1,1,1,1,1,1,1,1,1");
        assert!(m.contains("weight 3 is empty"), "{m}");
        let m = msg("1,1,1,one,1,1,1,1,1,1,1,1,1,1,1,1,1");
        assert!(m.contains("weight 4 ('one') is not a number"), "{m}");
        let m = msg("1,1,1,1,inf,1,1,1,1,1,1,1,1,1,1,1,1");
        assert!(m.contains("weight 5 ('inf') is not finite"), "{m}");
        assert!(msg("1,1,1,1,1,1,1,1,1,1,1,NaN").contains("not finite"));
        // Spaces around items and negative or fractional weights are fine.
        let spec = BlockWeightSpec::parse(" 1, -0.5 ,0,0,0,0,0,0,0,0,0,.25 ").unwrap();
        assert_eq!(spec.to_string(), "1,-0.5,0,0,0,0,0,0,0,0,0,0.25");
    }

    #[test]
    fn resolve_errors() {
        let msg = |text: &str, fam| err(BlockWeightSpec::parse(text).unwrap().resolve(fam));
        let sd17 = "1,0,0,0,1,1,1,0,0,0,1,1,1,1,1,1,1";
        let m = msg(sd17, Sdxl);
        assert!(
            m.starts_with(&format!(
                "lbw={sd17}: 17 weights; sdxl takes 12 or 20 (or a preset: NONE, ALL, INALL"
            )),
            "{m}"
        );
        let m = msg("1,0,0,0,0,0,1,1,1,1,1,1", Sd1);
        assert!(m.contains("12 weights; sd1 takes 17 or 26"), "{m}");
        let m = msg(&["1"; 26].join(","), Flux);
        assert!(m.contains("26 weights; flux takes 61"), "{m}");
        let m = msg(&["1"; 61].join(","), Sd2);
        assert!(m.contains("61 weights; sd2 takes 17 or 26"), "{m}");
        let m = msg("INS", Sdxl);
        assert_eq!(
            m,
            "lbw=INS: no such sdxl preset; sdxl presets: NONE, ALL, INALL, MIDALL, OUTALL, ALL0.5 \
             (or give 12 or 20 weights)"
        );
        assert!(msg("FLUXALL", Sd1).contains("no such sd1 preset"));
        assert!(msg("MIDALL", Sd1).contains("no such sd1 preset"));
        for fam in [Sd3, Unknown] {
            let m = msg("ALL", fam);
            assert!(m.contains("have no block-weight layout"), "{m}");
            assert!(msg(sd17, fam).contains("have no block-weight layout"));
        }
    }

    #[test]
    fn every_fixture_module_gets_a_block() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/loras");
        let files = [
            ("sd1_kohya_lora", Sd1),
            ("sd1_peft", Sd1),
            ("sd1_locon", Sd1),
            ("sd1_loha", Sd1),
            ("sd1_diffusers_old", Sd1),
            ("sd2_kohya_lora", Sd2),
            ("sdxl_kohya_lora", Sdxl),
            ("sdxl_peft", Sdxl),
            ("sdxl_loha", Sdxl),
            ("flux_kohya", Flux),
            ("flux_peft", Flux),
            ("real_sd1_kohya", Sd1),
            ("real_sd2_kohya", Sd2),
            ("real_sdxl_kohya", Sdxl),
            ("real_flux_kohya", Flux),
            ("real_flux_peft", Flux),
        ];
        // The UNet modules the extension places in no block (it leaves them at 1).
        let outside = |p: &str| {
            [
                "time_embedding",
                "time_embed",
                "label_emb",
                "add_embedding",
                "conv_out",
                "conv_norm_out",
                "out_",
                "out.",
            ]
            .iter()
            .any(|r| p.starts_with(r))
        };
        for (name, family) in files {
            let adapter = Adapter::open(&dir.join(format!("{name}.safetensors"))).unwrap();
            let detected = crate::family::detect(adapter.file.metadata(), &adapter.modules);
            assert_eq!(detected.base_model, family, "{name}");
            let all = BlockWeightSpec::parse("NONE")
                .unwrap()
                .resolve(family)
                .unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for m in &adapter.modules {
                match block_of(family, m.component, &m.path) {
                    Some(b) => {
                        seen.insert(b);
                        assert_eq!(all.weight_for(m), 0.0, "{name}: {}", m.name);
                    }
                    None => {
                        assert!(outside(&m.path), "{name}: {} has no block", m.name);
                        assert_eq!(all.weight_for(m), 1.0, "{name}: {}", m.name);
                    }
                }
            }
            assert!(seen.len() > 1, "{name}: {seen:?}");
        }
    }
}

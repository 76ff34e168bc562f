//! VAE module paths in the two layouts of SD1/SD2/SDXL's AutoencoderKL: LDM (`decoder.up.3.block.0`,
//! `decoder.mid.attn_1.q`, what single-file checkpoints and A1111's VAE files use) and diffusers
//! (`decoder.up_blocks.0.resnets.0`, `decoder.mid_block.attentions.0.to_q`, what pipeline folders
//! and diffusers VAE files use).
//!
//! LDM numbers the decoder's levels from the lowest resolution up (`up.0` is the last applied),
//! diffusers in the order they run, so the level count is needed to map `up` indices. The mid
//! block's attention is four 1×1 convolutions in LDM and four linear layers in diffusers (same
//! values, `[c, c, 1, 1]` against `[c, c]`); diffusers files written before 0.14 call them
//! `query`/`key`/`value`/`proj_attn` (the ft-MSE VAE on the Hub still does).

/// Resnet sub-layer names, LDM → diffusers (the rest are the same).
fn resnet_part(name: &str) -> &str {
    match name {
        "nin_shortcut" => "conv_shortcut",
        other => other,
    }
}

/// The mid attention's layers, LDM → diffusers (current, then pre-0.14 names).
const ATTENTION_PARTS: &[(&str, &str, &str)] = &[
    ("norm", "group_norm", "group_norm"),
    ("q", "to_q", "query"),
    ("k", "to_k", "key"),
    ("v", "to_v", "value"),
    ("proj_out", "to_out.0", "proj_attn"),
];

/// The diffusers module paths an LDM VAE module path (without `first_stage_model.` and without
/// the `.weight`/`.bias` leaf) may have, current names first; `levels` is the number of
/// resolution levels (`decoder.up_blocks` count, 4 for every SD VAE). Empty when `path` is not a
/// VAE module.
pub fn ldm_to_diffusers(path: &str, levels: usize) -> Vec<String> {
    let Some((side, rest)) = path.split_once('.') else {
        return match path {
            "quant_conv" | "post_quant_conv" => vec![path.to_string()],
            _ => Vec::new(),
        };
    };
    if side != "encoder" && side != "decoder" {
        return Vec::new();
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let mapped: Vec<String> = match parts.as_slice() {
        ["conv_in"] | ["conv_out"] => vec![rest.to_string()],
        ["norm_out"] => vec!["conv_norm_out".into()],
        ["mid", block, tail @ ..] if block.starts_with("block_") => {
            let Some(i) = block["block_".len()..]
                .parse::<usize>()
                .ok()
                .and_then(|i| i.checked_sub(1))
            else {
                return Vec::new();
            };
            match tail {
                [name] => vec![format!("mid_block.resnets.{i}.{}", resnet_part(name))],
                _ => return Vec::new(),
            }
        }
        ["mid", "attn_1", layer] => match ATTENTION_PARTS.iter().find(|(l, ..)| l == layer) {
            Some((_, current, legacy)) if current == legacy => {
                vec![format!("mid_block.attentions.0.{current}")]
            }
            Some((_, current, legacy)) => vec![
                format!("mid_block.attentions.0.{current}"),
                format!("mid_block.attentions.0.{legacy}"),
            ],
            None => return Vec::new(),
        },
        [level, i, kind, tail @ ..]
            if matches!((side, *level), ("encoder", "down") | ("decoder", "up")) =>
        {
            let Some(i) = i.parse::<usize>().ok().filter(|&i| i < levels) else {
                return Vec::new();
            };
            let (blocks, index) = match side {
                "encoder" => ("down_blocks", i),
                _ => ("up_blocks", levels - 1 - i),
            };
            match (*kind, tail) {
                ("block", [j]) => vec![format!("{blocks}.{index}.resnets.{j}")],
                ("block", [j, name]) => vec![format!(
                    "{blocks}.{index}.resnets.{j}.{}",
                    resnet_part(name)
                )],
                ("downsample", ["conv"]) => vec![format!("{blocks}.{index}.downsamplers.0.conv")],
                ("upsample", ["conv"]) => vec![format!("{blocks}.{index}.upsamplers.0.conv")],
                _ => return Vec::new(),
            }
        }
        _ => return Vec::new(),
    };
    mapped.into_iter().map(|m| format!("{side}.{m}")).collect()
}

/// Whether an LDM VAE module path is one of the mid attention's 1×1 convolutions, which
/// diffusers stores as `[c, c]` linear weights.
pub fn is_attention_conv(path: &str) -> bool {
    ["q", "k", "v", "proj_out"].iter().any(|l| {
        path.strip_suffix(l)
            .is_some_and(|p| p.ends_with("mid.attn_1."))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_levels_are_reversed_and_attention_has_two_namings() {
        assert_eq!(
            ldm_to_diffusers("decoder.up.3.block.0.conv1", 4),
            ["decoder.up_blocks.0.resnets.0.conv1"]
        );
        assert_eq!(
            ldm_to_diffusers("decoder.up.0.upsample.conv", 4),
            ["decoder.up_blocks.3.upsamplers.0.conv"]
        );
        assert_eq!(
            ldm_to_diffusers("encoder.down.1.block.0.nin_shortcut", 4),
            ["encoder.down_blocks.1.resnets.0.conv_shortcut"]
        );
        assert_eq!(
            ldm_to_diffusers("decoder.mid.attn_1.proj_out", 4),
            [
                "decoder.mid_block.attentions.0.to_out.0",
                "decoder.mid_block.attentions.0.proj_attn"
            ]
        );
        assert_eq!(
            ldm_to_diffusers("decoder.mid.block_2.norm1", 4),
            ["decoder.mid_block.resnets.1.norm1"]
        );
        assert!(ldm_to_diffusers("decoder.up.4.block.0", 4).is_empty());
        assert!(ldm_to_diffusers("decoder.down.0.block.0", 4).is_empty());
        assert!(ldm_to_diffusers("decoder.mid.block_0.conv1", 4).is_empty());
        assert!(ldm_to_diffusers("decoder.side.0.block.0", 4).is_empty());
        assert!(is_attention_conv("decoder.mid.attn_1.q"));
        assert!(!is_attention_conv("decoder.mid.attn_1.norm"));
    }
}

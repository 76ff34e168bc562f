//! UNet module paths in the two layouts of SD1/SD2/SDXL: LDM/CompVis (`input_blocks.4.1…`, what
//! single-file checkpoints and kohya's SDXL LoRAs use) and diffusers (`down_blocks.1.attentions.0…`,
//! what diffusers folders, peft files and kohya's SD1/SD2 LoRAs use).
//!
//! The mapping is the same for every SD family: each down block has two resnets (+ attentions) and
//! a downsampler, each up block three resnets (+ attentions) and an upsampler. Only the index of an
//! up block's upsampler inside its LDM output block depends on whether that block has attentions,
//! which the caller tells from the checkpoint's own keys.

/// Resnet sub-layer names, LDM → diffusers.
const RESNET_PARTS: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

/// Top-level names, LDM → diffusers.
const TOP_LEVEL: &[(&str, &str)] = &[
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
];

fn split_index(path: &str) -> Option<(usize, &str)> {
    let (n, rest) = path.split_once('.').unwrap_or((path, ""));
    Some((n.parse().ok()?, rest))
}

fn resnet_to_diffusers(rest: &str) -> Option<String> {
    for (ldm, diff) in RESNET_PARTS {
        if let Some(tail) = rest.strip_prefix(ldm) {
            if tail.is_empty() || tail.starts_with('.') {
                return Some(format!("{diff}{tail}"));
            }
        }
    }
    None
}

fn resnet_to_ldm(rest: &str) -> Option<String> {
    for (ldm, diff) in RESNET_PARTS {
        if let Some(tail) = rest.strip_prefix(diff) {
            if tail.is_empty() || tail.starts_with('.') {
                return Some(format!("{ldm}{tail}"));
            }
        }
    }
    None
}

fn join(a: String, rest: &str) -> String {
    if rest.is_empty() {
        a
    } else {
        format!("{a}.{rest}")
    }
}

/// LDM UNet path (below `model.diffusion_model.`) → diffusers UNet path.
pub fn ldm_to_diffusers(path: &str) -> Option<String> {
    for (ldm, diff) in TOP_LEVEL {
        if let Some(tail) = path.strip_prefix(ldm) {
            if tail.is_empty() || tail.starts_with('.') {
                return Some(format!("{diff}{tail}"));
            }
        }
    }
    if let Some(rest) = path.strip_prefix("input_blocks.") {
        let (n, rest) = split_index(rest)?;
        let (i, j) = ((n - 1) / 3, (n - 1) % 3);
        let (sub, rest) = split_index(rest)?;
        return match (j, sub) {
            (2, 0) => rest
                .strip_prefix("op")
                .map(|t| format!("down_blocks.{i}.downsamplers.0.conv{t}")),
            (_, 0) => Some(format!(
                "down_blocks.{i}.resnets.{j}.{}",
                resnet_to_diffusers(rest)?
            )),
            (_, 1) => Some(join(format!("down_blocks.{i}.attentions.{j}"), rest)),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("middle_block.") {
        let (n, rest) = split_index(rest)?;
        return match n {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                n / 2,
                resnet_to_diffusers(rest)?
            )),
            1 => Some(join("mid_block.attentions.0".to_string(), rest)),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("output_blocks.") {
        let (n, rest) = split_index(rest)?;
        let (i, j) = (n / 3, n % 3);
        let (sub, rest) = split_index(rest)?;
        // Only a level's last block (j = 2) ends in an upsampler.
        if sub > 0 && j == 2 {
            if let Some(t) = rest.strip_prefix("conv") {
                if t.is_empty() || t.starts_with('.') {
                    return Some(format!("up_blocks.{i}.upsamplers.0.conv{t}"));
                }
            }
        }
        return match sub {
            0 => Some(format!(
                "up_blocks.{i}.resnets.{j}.{}",
                resnet_to_diffusers(rest)?
            )),
            1 => Some(join(format!("up_blocks.{i}.attentions.{j}"), rest)),
            _ => None,
        };
    }
    None
}

/// diffusers UNet path → LDM path. `up_block_has_attentions(i)` says whether diffusers up block i
/// has attention layers (it moves the upsampler from sub-index 1 to 2).
pub fn diffusers_to_ldm(
    path: &str,
    up_block_has_attentions: impl Fn(usize) -> bool,
) -> Option<String> {
    for (ldm, diff) in TOP_LEVEL {
        if let Some(tail) = path.strip_prefix(diff) {
            if tail.is_empty() || tail.starts_with('.') {
                return Some(format!("{ldm}{tail}"));
            }
        }
    }
    let block = |rest: &str| -> Option<(usize, String, usize, String)> {
        let (i, rest) = split_index(rest)?;
        let (kind, rest) = rest.split_once('.')?;
        let (j, rest) = split_index(rest)?;
        Some((i, kind.to_string(), j, rest.to_string()))
    };
    if let Some(rest) = path.strip_prefix("down_blocks.") {
        let (i, kind, j, rest) = block(rest)?;
        let n = 3 * i + j + 1;
        return match kind.as_str() {
            "resnets" => Some(format!("input_blocks.{n}.0.{}", resnet_to_ldm(&rest)?)),
            "attentions" => Some(join(format!("input_blocks.{n}.1"), &rest)),
            "downsamplers" => rest
                .strip_prefix("conv")
                .map(|t| format!("input_blocks.{}.0.op{t}", 3 * (i + 1))),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("mid_block.") {
        let (kind, rest) = rest.split_once('.')?;
        let (j, rest) = split_index(rest)?;
        return match kind {
            "resnets" => Some(format!("middle_block.{}.{}", 2 * j, resnet_to_ldm(rest)?)),
            "attentions" => Some(join("middle_block.1".to_string(), rest)),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("up_blocks.") {
        let (i, kind, j, rest) = block(rest)?;
        return match kind.as_str() {
            "resnets" => Some(format!(
                "output_blocks.{}.0.{}",
                3 * i + j,
                resnet_to_ldm(&rest)?
            )),
            "attentions" => Some(join(format!("output_blocks.{}.1", 3 * i + j), &rest)),
            "upsamplers" => {
                let sub = if up_block_has_attentions(i) { 2 } else { 1 };
                rest.strip_prefix("conv")
                    .map(|t| format!("output_blocks.{}.{sub}.conv{t}", 3 * i + 2))
            }
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pairs_both_ways() {
        let pairs = [
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "input_blocks.1.0.in_layers.2",
                "down_blocks.0.resnets.0.conv1",
            ),
            ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
            (
                "input_blocks.5.0.skip_connection",
                "down_blocks.1.resnets.1.conv_shortcut",
            ),
            (
                "middle_block.2.emb_layers.1",
                "mid_block.resnets.1.time_emb_proj",
            ),
            ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
            ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
            ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
            (
                "output_blocks.4.1.proj_out",
                "up_blocks.1.attentions.1.proj_out",
            ),
            ("out.2", "conv_out"),
            ("label_emb.0.2", "add_embedding.linear_2"),
        ];
        // Upsamplers end a level (its third block); a first block has none.
        assert_ne!(
            ldm_to_diffusers("output_blocks.0.1.conv").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv")
        );
        for (ldm, diff) in pairs {
            assert_eq!(ldm_to_diffusers(ldm).as_deref(), Some(diff), "{ldm}");
            assert_eq!(
                diffusers_to_ldm(diff, |i| i > 0).as_deref(),
                Some(ldm),
                "{diff}"
            );
        }
    }
}

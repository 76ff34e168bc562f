//! The module paths every SD1/SD2/SDXL UNet and CLIP text encoder can have, enumerated from the
//! families' block structure (a superset: 4 down/up blocks, up to 10 transformer blocks per
//! attention, 32 text-encoder layers). `kohya_names::kohya_to_dotted` names them, so converting a kohya
//! name to a dotted path is a lookup instead of a guess where underscores were dots.

fn transformer_modules(prefix: &str, out: &mut Vec<String>) {
    for p in ["norm", "proj_in", "proj_out"] {
        out.push(format!("{prefix}.{p}"));
    }
    for t in 0..10 {
        let b = format!("{prefix}.transformer_blocks.{t}");
        for a in ["attn1", "attn2"] {
            for l in ["to_q", "to_k", "to_v", "to_out.0"] {
                out.push(format!("{b}.{a}.{l}"));
            }
        }
        for l in ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] {
            out.push(format!("{b}.{l}"));
        }
    }
}

fn resnet_modules(prefix: &str, out: &mut Vec<String>) {
    for l in [
        "norm1",
        "conv1",
        "time_emb_proj",
        "norm2",
        "conv2",
        "conv_shortcut",
    ] {
        out.push(format!("{prefix}.{l}"));
    }
}

/// Every diffusers UNet module path of the SD families.
pub fn unet_paths() -> Vec<String> {
    let mut out: Vec<String> = [
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..4 {
        for j in 0..2 {
            resnet_modules(&format!("down_blocks.{i}.resnets.{j}"), &mut out);
            transformer_modules(&format!("down_blocks.{i}.attentions.{j}"), &mut out);
        }
        out.push(format!("down_blocks.{i}.downsamplers.0.conv"));
        for j in 0..3 {
            resnet_modules(&format!("up_blocks.{i}.resnets.{j}"), &mut out);
            transformer_modules(&format!("up_blocks.{i}.attentions.{j}"), &mut out);
        }
        out.push(format!("up_blocks.{i}.upsamplers.0.conv"));
    }
    for j in 0..2 {
        resnet_modules(&format!("mid_block.resnets.{j}"), &mut out);
    }
    transformer_modules("mid_block.attentions.0", &mut out);
    out
}

/// Every HF CLIP text-encoder module path (CLIP-L, OpenCLIP-H/G as HF names).
pub fn text_encoder_paths() -> Vec<String> {
    let mut out = vec!["text_model.final_layer_norm".to_string()];
    for n in 0..32 {
        let l = format!("text_model.encoder.layers.{n}");
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
            "layer_norm1",
            "layer_norm2",
        ] {
            out.push(format!("{l}.{p}"));
        }
    }
    out
}

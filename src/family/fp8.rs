//! Which tensors of a checkpoint an fp8 (`float8_e4m3fn`) file stores as fp8: the weight matrices
//! of the denoiser's repeated blocks, and nothing else (docs/DECISIONS.md, "fp8 output").
//!
//! That is what fp8 checkpoints of the trainers and converters keep in fp8 (musubi-tuner and
//! kohya's fp8 loaders target `double_blocks`/`single_blocks` and leave norms, embedders and the
//! final layer alone), and what ComfyUI needs to take its fp8 path: it picks a diffusion model's
//! weight dtype as the dtype holding the most elements among the denoiser's tensors
//! (`comfy.utils.weight_dtype`), and the block matrices are nearly all of them. Norms and scales,
//! biases, the input embedders and time/guidance/vector embeddings, the final layer, the text
//! encoders and the VAE keep their dtype.

use super::layout::{Layout, LDM_DENOISER};
use super::Component;
use crate::tensors::TensorInfo;

/// Prefixes of the denoiser's repeated blocks, in every layout loratool reads (after
/// `model.diffusion_model.` in single files): BFL Flux, SD3 MMDiT, the LDM UNet (`input_blocks.N`
/// from N = 1 on, see [`ldm_input_block`]), the diffusers UNet and the diffusers transformers.
const BLOCKS: &[&str] = &[
    "double_blocks.",
    "single_blocks.",
    "joint_blocks.",
    "middle_block.",
    "output_blocks.",
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "transformer_blocks.",
    "single_transformer_blocks.",
];

/// True when an fp8 output stores `info` as fp8: a float weight (`….weight`) with at least two
/// dimensions (linear layers, convolutions) inside one of the denoiser's blocks. Everything else
/// keeps its dtype.
pub fn stored_as_fp8(layout: Layout, info: &TensorInfo) -> bool {
    let name = match layout {
        // BFL/MMDiT files without a prefix keep their blocks at the top level; text encoders and
        // the VAE of a single file have prefixes that name no block.
        Layout::SingleFile => info.name.strip_prefix(LDM_DENOISER).unwrap_or(&info.name),
        Layout::DiffusersComponent(Component::Unet | Component::Transformer) => &info.name,
        Layout::DiffusersComponent(_) => return false,
    };
    let in_block = BLOCKS.iter().any(|b| name.starts_with(b)) || ldm_input_block(name);
    in_block && name.ends_with(".weight") && info.shape.len() >= 2 && info.dtype.is_float()
}

/// `input_blocks.N.…` with N ≥ 1: `input_blocks.0` is the UNet's input convolution (its stem),
/// which stays like the other embedders.
fn ldm_input_block(name: &str) -> bool {
    name.strip_prefix("input_blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::Dtype;

    fn info(name: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn block_matrices_only() {
        let single = Layout::SingleFile;
        let yes = [
            "double_blocks.3.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight",
            "double_blocks.0.img_mod.lin.weight",
            "model.diffusion_model.double_blocks.0.txt_mlp.2.weight",
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            "model.diffusion_model.middle_block.0.in_layers.2.weight",
            "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        ];
        for n in yes {
            assert!(stored_as_fp8(single, &info(n, &[8, 8])), "{n}");
        }
        let no = [
            ("double_blocks.0.img_attn.norm.query_norm.scale", vec![8]),
            ("double_blocks.0.img_attn.qkv.bias", vec![24]),
            ("img_in.weight", vec![8, 8]),
            ("txt_in.weight", vec![8, 8]),
            ("time_in.in_layer.weight", vec![8, 256]),
            ("vector_in.in_layer.weight", vec![8, 8]),
            ("guidance_in.out_layer.weight", vec![8, 8]),
            ("final_layer.linear.weight", vec![8, 8]),
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                vec![8, 4, 3, 3],
            ),
            ("model.diffusion_model.time_embed.0.weight", vec![32, 8]),
            ("model.diffusion_model.out.2.weight", vec![4, 8, 3, 3]),
            ("model.diffusion_model.label_emb.0.0.weight", vec![8, 8]),
            (
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                vec![8],
            ),
            (
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                vec![8, 8],
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                vec![24, 8],
            ),
            (
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                vec![8, 8, 3, 3],
            ),
        ];
        for (n, shape) in no {
            assert!(!stored_as_fp8(single, &info(n, &shape)), "{n}");
        }
        let unet = Layout::DiffusersComponent(Component::Unet);
        assert!(stored_as_fp8(
            unet,
            &info("down_blocks.0.attentions.0.proj_in.weight", &[8, 8])
        ));
        assert!(!stored_as_fp8(unet, &info("conv_in.weight", &[8, 4, 3, 3])));
        let te = Layout::DiffusersComponent(Component::TextEncoder);
        assert!(!stored_as_fp8(
            te,
            &info("text_model.encoder.layers.0.mlp.fc1.weight", &[8, 8])
        ));
        let position_ids = TensorInfo {
            dtype: Dtype::I64,
            ..info("model.diffusion_model.middle_block.0.ids.weight", &[1, 77])
        };
        assert!(!stored_as_fp8(single, &position_ids));
    }
}

//! The preview sampler (`loratool preview`): everything needed to render an image the way A1111
//! would for the same seed.
//!
//! - [`weights`]: the checkpoint's tensors by component, f32, LoRAs applied through the patch plan.
//! - [`clip`]: the CLIP text encoder (clip skip, emphasis, replaceable token embeddings);
//!   [`embeddings`]: textual-inversion files.
//! - [`layers`], [`unet`], [`vae`]: convolutions, norms, ResNet blocks, attention; the UNet and
//!   the VAE decoder. [`kernels`]: the layers' own f32 CPU kernels (conv, attention, norms).
//! - [`prompt`], [`tokenizer`]: A1111's prompt syntax, CLIP's BPE and A1111's chunking.
//! - [`sdxl`]: SDXL's conditioning (both text encoders, the pooled embedding, size embeddings).
//! - [`noise`]: torch-compatible CPU noise; [`sampling`]: A1111's samplers and schedules.
//! - [`render`]: one txt2img render (sampler → UNet with CFG → VAE → pixels); [`txt2img`]: the
//!   whole `preview` from arguments (prompt tags, LoRAs at load, configs) to image and infotext.
//! - [`infotext`], [`png`], [`contact_sheet`] (with [`label_font`]): the output side: A1111's
//!   infotext, PNG files that carry it, and the labelled contact sheet of `--grid`.

pub mod clip;
pub mod contact_sheet;
pub mod embeddings;
pub mod infotext;
pub mod kernels;
pub mod label_font;
pub mod layers;
pub mod noise;
pub mod png;
pub mod prompt;
pub mod render;
pub mod sampling;
pub mod sdxl;
pub mod tokenizer;
pub mod txt2img;
pub mod unet;
pub mod vae;
pub mod weights;

/// The files under `dirs` (recursively, links followed, as A1111 lists its model folders) whose
/// extension is one of `extensions`.
pub(crate) fn files_under(
    dirs: &[std::path::PathBuf],
    extensions: &[&str],
) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for dir in dirs {
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(true)
            .into_iter()
            .flatten()
        {
            let p = entry.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            if entry.file_type().is_file() && extensions.contains(&ext) {
                found.push(p.to_path_buf());
            }
        }
    }
    found
}

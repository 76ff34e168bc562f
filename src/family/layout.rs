//! What a model file holds and how it names it, decided from its tensors: the key prefixes and
//! shapes only a given layout has. Folder and file names never decide (a diffusers UNet saved as
//! `sd15_unet.safetensors` in a download folder is still a diffusers UNet). The one place a name
//! counts is inside a diffusers pipeline folder, whose component folders (`unet/`,
//! `text_encoder_2/`, …, listed in its `model_index.json`) are that format's own structure; even
//! there each weight file's content must agree with its folder.

use super::checkpoint::{checkpoint_family, is_sdxl_refiner, Prediction, Variant};
use super::{BaseModel, Component};
use crate::tensors::{TensorFile, TensorInfo};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// How a file that holds model weights names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One file with every component under LDM/SGM prefixes (`model.diffusion_model.`,
    /// `cond_stage_model.`, `conditioner.embedders.N.`, `first_stage_model.`: A1111, ComfyUI,
    /// Civitai), or a BFL Flux / MMDiT file whose blocks sit at the top level.
    SingleFile,
    /// One diffusers component file: its keys have no component prefix.
    DiffusersComponent(Component),
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::SingleFile => "single_file",
            Layout::DiffusersComponent(Component::Unet) => "diffusers_unet",
            Layout::DiffusersComponent(Component::Transformer) => "diffusers_transformer",
            Layout::DiffusersComponent(Component::TextEncoder) => "diffusers_text_encoder",
            Layout::DiffusersComponent(Component::TextEncoder2) => "diffusers_text_encoder_2",
            Layout::DiffusersComponent(Component::TextEncoder3) => "diffusers_text_encoder_3",
        }
    }

    /// The one component a diffusers component file holds.
    pub fn component(self) -> Option<Component> {
        match self {
            Layout::DiffusersComponent(c) => Some(c),
            Layout::SingleFile => None,
        }
    }
}

/// What a tensor file that is not an adapter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Weights a LoRA patches: a whole checkpoint or one of its denoiser / text-encoder parts.
    Model(Layout),
    /// A VAE alone (LDM `encoder.down.N` or diffusers `encoder.down_blocks.N` naming).
    Vae,
    /// A textual-inversion embedding (`emb_params`, `string_to_param`, SDXL `clip_l`/`clip_g`).
    Embedding,
}

impl Content {
    /// What a user calls it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Content::Model(Layout::SingleFile) => "a model checkpoint",
            Content::Model(Layout::DiffusersComponent(Component::Unet)) => "a diffusers UNet",
            Content::Model(Layout::DiffusersComponent(Component::Transformer)) => {
                "a diffusers transformer"
            }
            Content::Model(Layout::DiffusersComponent(_)) => "a text encoder",
            Content::Vae => "a VAE",
            Content::Embedding => "a textual-inversion embedding",
        }
    }
}

/// Key prefixes of the LDM/SGM single-file layout, by what they hold.
pub const LDM_DENOISER: &str = "model.diffusion_model.";
pub const LDM_TEXT_ENCODERS: &[&str] = &["cond_stage_model.", "conditioner.embedders."];
pub const LDM_VAE: &str = "first_stage_model.";

/// Decides what a tensor file holds from its keys and shapes; `None` when it is none of the
/// model files loratool knows.
pub fn detect(tensors: &[TensorInfo]) -> Option<Content> {
    let has = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let key = |k: &str| tensors.iter().find(|t| t.name == k);

    let ldm_model = has(LDM_DENOISER) || LDM_TEXT_ENCODERS.iter().any(|p| has(p));
    if ldm_model {
        return Some(Content::Model(Layout::SingleFile));
    }
    if has(LDM_VAE) {
        return Some(Content::Vae);
    }
    // BFL Flux and MMDiT files keep their blocks at the top level.
    if (has("double_blocks.") && has("single_blocks.")) || has("joint_blocks.") {
        return Some(Content::Model(Layout::SingleFile));
    }
    let embedding = tensors.len() <= 4
        && tensors.iter().any(|t| {
            t.name == "emb_params"
                || t.name.starts_with("string_to_param")
                || t.name == "clip_l"
                || t.name == "clip_g"
        });
    if embedding {
        return Some(Content::Embedding);
    }
    if key("conv_in.weight").is_some() && has("down_blocks.") && has("time_embedding.") {
        return Some(Content::Model(Layout::DiffusersComponent(Component::Unet)));
    }
    let dit_blocks = has("transformer_blocks.") || has("single_transformer_blocks.");
    let dit_inputs = has("x_embedder.") || has("pos_embed.") || has("context_embedder.");
    if dit_blocks && dit_inputs {
        return Some(Content::Model(Layout::DiffusersComponent(
            Component::Transformer,
        )));
    }
    if has("text_model.encoder.layers.") {
        return Some(Content::Model(Layout::DiffusersComponent(clip_component(
            tensors,
        ))));
    }
    if has("encoder.block.") && (has("shared.") || has("encoder.final_layer_norm.")) {
        // T5 (SD3's third text encoder; Flux pipelines call it text_encoder_2).
        return Some(Content::Model(Layout::DiffusersComponent(
            Component::TextEncoder3,
        )));
    }
    let vae = (has("encoder.down.") || has("encoder.down_blocks."))
        && (has("decoder.up.") || has("decoder.up_blocks."));
    if vae {
        return Some(Content::Vae);
    }
    None
}

/// Which text encoder a standalone HF CLIP file is: one with a text projection is SDXL's second
/// encoder (OpenCLIP bigG), unless it has CLIP-L's width (SD3 gives CLIP-L a projection too).
fn clip_component(tensors: &[TensorInfo]) -> Component {
    let projection = tensors.iter().any(|t| t.name == "text_projection.weight");
    let width = tensors
        .iter()
        .find(|t| t.name == "text_model.final_layer_norm.weight")
        .and_then(|t| t.shape.first().copied());
    if projection && width != Some(768) {
        Component::TextEncoder2
    } else {
        Component::TextEncoder
    }
}

/// The component folders of a diffusers pipeline that LoRAs patch, with the component each holds;
/// every other file of a pipeline (VAE, scheduler, tokenizers, configs) is carried over as it is.
pub const PIPELINE_COMPONENTS: &[(&str, Component)] = &[
    ("unet", Component::Unet),
    ("transformer", Component::Transformer),
    ("text_encoder", Component::TextEncoder),
    ("text_encoder_2", Component::TextEncoder2),
    ("text_encoder_3", Component::TextEncoder3),
];

/// One weight file of a checkpoint.
pub struct CheckpointFile {
    /// Path relative to the checkpoint's root (empty for a single file).
    pub relative: PathBuf,
    pub layout: Layout,
    pub file: TensorFile,
}

/// A checkpoint as loratool reads it: one file, or the patchable weight files of a diffusers
/// pipeline folder.
pub struct Checkpoint {
    pub root: PathBuf,
    pub pipeline: bool,
    pub files: Vec<CheckpointFile>,
}

impl Checkpoint {
    /// Opens a checkpoint file or pipeline folder, refusing files that are not model weights
    /// with a message that says what they are.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if path.is_dir() {
            return Self::open_pipeline(path);
        }
        let file = TensorFile::open(path)?;
        let layout = model_layout(&file)?;
        Ok(Checkpoint::single(path, layout, file))
    }

    /// A checkpoint of one file already opened, whose layout is known.
    pub fn single(path: &Path, layout: Layout, file: TensorFile) -> Checkpoint {
        Checkpoint {
            root: path.to_path_buf(),
            pipeline: false,
            files: vec![CheckpointFile {
                relative: PathBuf::new(),
                layout,
                file,
            }],
        }
    }

    fn open_pipeline(root: &Path) -> Result<Checkpoint> {
        let mut files = Vec::new();
        for (folder, component) in PIPELINE_COMPONENTS {
            let Ok(entries) = std::fs::read_dir(root.join(folder)) else {
                continue;
            };
            let mut weights: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            weights.sort();
            for path in weights {
                let file = TensorFile::open(&path)?;
                let found = model_layout(&file)?;
                let fits = match found.component() {
                    Some(c) => {
                        c == *component || c.is_text_encoder() && component.is_text_encoder()
                    }
                    None => false,
                };
                if !fits {
                    return Err(Error::bad_file(
                        &path,
                        format!(
                            "holds {} but sits in the pipeline's {folder}/ folder",
                            Content::Model(found).describe()
                        ),
                    ));
                }
                let relative = Path::new(folder).join(path.file_name().expect("a file"));
                files.push(CheckpointFile {
                    relative,
                    // Which text encoder a CLIP file is, the pipeline says.
                    layout: Layout::DiffusersComponent(*component),
                    file,
                });
            }
        }
        if files.is_empty() {
            return Err(Error::bad_file(
                root,
                "not a diffusers pipeline folder: no unet/, transformer/ or text_encoder*/ safetensors files",
            ));
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            pipeline: true,
            files,
        })
    }

    /// The family, from the first file that tells.
    pub fn family(&self) -> BaseModel {
        self.files
            .iter()
            .map(|f| checkpoint_family(f.file.tensors(), f.layout))
            .find(|f| *f != BaseModel::Unknown)
            .unwrap_or(BaseModel::Unknown)
    }

    /// The family as curators name it, given `family` (from `family()`, or the metadata where the
    /// keys do not tell) and the prediction target the files declare.
    pub fn variant(&self, family: BaseModel, prediction: Option<Prediction>) -> Variant {
        let refiner = self
            .files
            .iter()
            .any(|f| is_sdxl_refiner(f.file.tensors(), f.layout));
        Variant::of(family, refiner, prediction)
    }
}

/// The folder of a diffusers pipeline that holds its VAE.
pub const PIPELINE_VAE: &str = "vae";

/// The VAE weight files of a pipeline folder (`vae/*.safetensors`), relative path and file; an
/// error when one holds something else.
pub fn pipeline_vae(root: &Path) -> Result<Vec<(PathBuf, TensorFile)>> {
    let Ok(entries) = std::fs::read_dir(root.join(PIPELINE_VAE)) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let file = TensorFile::open(&path)?;
            if detect(file.tensors()) != Some(Content::Vae) {
                return Err(Error::bad_file(
                    &path,
                    format!("sits in the pipeline's {PIPELINE_VAE}/ folder but holds no VAE"),
                ));
            }
            let relative = Path::new(PIPELINE_VAE).join(path.file_name().expect("a file"));
            Ok((relative, file))
        })
        .collect()
}

/// How a VAE file names its weights: `ldm` (`encoder.down.N`, with or without the
/// `first_stage_model.` prefix) or `diffusers` (`encoder.down_blocks.N`).
pub fn vae_naming(tensors: &[TensorInfo]) -> &'static str {
    if tensors.iter().any(|t| {
        t.name.starts_with("encoder.down_blocks.") || t.name.starts_with("decoder.up_blocks.")
    }) {
        "diffusers"
    } else {
        "ldm"
    }
}

/// A textual-inversion embedding's family and vector count: SDXL files carry `clip_l` and
/// `clip_g`; SD1/SD2 ones one table whose width is the text encoder's (768 / 1024).
pub fn embedding_facts(tensors: &[TensorInfo]) -> (BaseModel, Option<usize>) {
    let vectors = tensors
        .iter()
        .find(|t| t.shape.len() == 2)
        .map(|t| t.shape[0]);
    let named = |n: &str| tensors.iter().any(|t| t.name == n);
    let family = if named("clip_l") && named("clip_g") {
        BaseModel::Sdxl
    } else {
        match tensors.iter().find_map(|t| t.shape.last().copied()) {
            Some(768) => BaseModel::Sd1,
            Some(1024) => BaseModel::Sd2,
            _ => BaseModel::Unknown,
        }
    };
    (family, vectors)
}

/// The layout of a file that must hold model weights, or an error naming what it holds instead.
fn model_layout(file: &TensorFile) -> Result<Layout> {
    match detect(file.tensors()) {
        Some(Content::Model(layout)) => Ok(layout),
        Some(other) => Err(Error::bad_file(
            file.path(),
            format!(
                "not a model checkpoint: this is {}, which LoRAs do not patch",
                other.describe()
            ),
        )),
        None if file
            .tensors()
            .first()
            .is_some_and(|t| crate::adapter::keys::classify(&t.name).is_some()) =>
        {
            Err(Error::bad_file(
                file.path(),
                "not a model checkpoint: this is a LoRA",
            ))
        }
        None => Err(Error::bad_file(
            file.path(),
            "not a model checkpoint: no UNet, transformer or text-encoder weights found",
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tensors::Dtype;

    /// Tensor infos of the given keys and shapes (f16).
    pub(crate) fn infos(keys: &[(&str, &[usize])]) -> Vec<TensorInfo> {
        keys.iter()
            .map(|(k, s)| TensorInfo {
                name: k.to_string(),
                dtype: Dtype::F16,
                shape: s.to_vec(),
            })
            .collect()
    }

    #[test]
    fn layouts_from_keys() {
        let d = |keys: &[(&str, &[usize])]| detect(&infos(keys));
        assert_eq!(
            d(&[("model.diffusion_model.input_blocks.0.0.weight", &[4])]),
            Some(Content::Model(Layout::SingleFile))
        );
        assert_eq!(
            d(&[("first_stage_model.decoder.conv_in.weight", &[4])]),
            Some(Content::Vae)
        );
        assert_eq!(
            d(&[
                ("double_blocks.0.img_attn.qkv.weight", &[4]),
                ("single_blocks.0.linear1.weight", &[4])
            ]),
            Some(Content::Model(Layout::SingleFile))
        );
        assert_eq!(
            d(&[
                ("conv_in.weight", &[4]),
                ("down_blocks.0.resnets.0.conv1.weight", &[4]),
                ("time_embedding.linear_1.weight", &[4])
            ]),
            Some(Content::Model(Layout::DiffusersComponent(Component::Unet)))
        );
        assert_eq!(
            d(&[
                ("x_embedder.weight", &[4]),
                ("transformer_blocks.0.attn.to_q.weight", &[4])
            ]),
            Some(Content::Model(Layout::DiffusersComponent(
                Component::Transformer
            )))
        );
        let clip = |projection: bool, width: usize| {
            let mut keys: Vec<(&str, &[usize])> = vec![
                ("text_model.encoder.layers.0.mlp.fc1.weight", &[4]),
                (
                    "text_model.final_layer_norm.weight",
                    std::slice::from_ref(&width),
                ),
            ];
            if projection {
                keys.push(("text_projection.weight", &[4]));
            }
            d(&keys).unwrap()
        };
        assert_eq!(
            clip(false, 768),
            Content::Model(Layout::DiffusersComponent(Component::TextEncoder))
        );
        assert_eq!(
            clip(true, 1280),
            Content::Model(Layout::DiffusersComponent(Component::TextEncoder2))
        );
        assert_eq!(
            clip(true, 768),
            Content::Model(Layout::DiffusersComponent(Component::TextEncoder))
        );
        assert_eq!(
            d(&[
                ("encoder.down_blocks.0.resnets.0.conv1.weight", &[4]),
                ("decoder.up_blocks.0.resnets.0.conv1.weight", &[4])
            ]),
            Some(Content::Vae)
        );
        assert_eq!(
            d(&[
                ("encoder.down.0.block.0.conv1.weight", &[4]),
                ("decoder.up.0.block.0.conv1.weight", &[4])
            ]),
            Some(Content::Vae)
        );
        assert_eq!(d(&[("emb_params", &[2, 768])]), Some(Content::Embedding));
        assert_eq!(
            d(&[("clip_l", &[2, 768]), ("clip_g", &[2, 1280])]),
            Some(Content::Embedding)
        );
        assert_eq!(d(&[("something.else", &[4])]), None);
    }
}

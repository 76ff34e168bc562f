//! The sampler's weights: a checkpoint's tensors by component and the component's own names (HF
//! CLIP, diffusers UNet/VAE), decoded to f32 with every LoRA applied at load time through the
//! same patch plan `merge` uses — never a second copy of the key maps or the delta code.

use crate::family::checkpoint::{
    openclip_tensor_to_hf, OPENCLIP_TEXT_PROJECTION, SD2_OPENCLIP, SDXL_CLIP_L, SDXL_OPENCLIP,
};
use crate::family::layout::{Checkpoint, Layout};
use crate::family::Component;
use crate::ops::patch_plan::PatchPlan;
use crate::tensors::TensorFile;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

/// What a component's modules are called inside the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The CLIP text encoder, HF CLIP names (`text_model.…`): SD1's and SDXL's CLIP-L, or SD2's
    /// OpenCLIP-H, whose single-file OpenCLIP names (fused q/k/v included) the family's map
    /// translates.
    ClipTextEncoder,
    /// SDXL's second text encoder (OpenCLIP-bigG), HF CLIP names with `text_projection.weight`:
    /// a pipeline's `text_encoder_2/`, or an SGM file's OpenCLIP names through the family's map.
    ClipTextEncoder2,
    /// The VAE, LDM names (`decoder.up.N.block.M…`, `post_quant_conv`); single-file checkpoints.
    Vae,
    /// The denoising UNet, LDM names (`input_blocks.N.M…`); a pipeline folder's diffusers names
    /// are mapped by the family's one UNet key map.
    Unet,
}

impl Part {
    /// The diffusers component file that holds this part in a pipeline folder.
    fn component(self) -> Option<Component> {
        match self {
            Part::ClipTextEncoder => Some(Component::TextEncoder),
            Part::ClipTextEncoder2 => Some(Component::TextEncoder2),
            // A pipeline folder's VAE is not one of its patchable components.
            Part::Vae => None,
            Part::Unet => Some(Component::Unet),
        }
    }

    /// The prefixes of this part's names in a single-file (LDM/A1111/SGM) checkpoint, when they
    /// are the part's own names (OpenCLIP towers are mapped instead).
    fn single_file_prefixes(self) -> &'static [&'static str] {
        match self {
            Part::ClipTextEncoder => &["cond_stage_model.transformer.", SDXL_CLIP_L],
            Part::ClipTextEncoder2 => &[],
            Part::Vae => &[crate::family::layout::LDM_VAE],
            Part::Unet => &["model.diffusion_model."],
        }
    }

    /// The name in a diffusers component file (`file`), if it has one: the UNet's LDM path is
    /// mapped and must map back to itself. An upsampler's sub-index in LDM (1 or 2) depends on
    /// whether the level attends, which only the file can tell, so the LDM → diffusers direction
    /// alone accepts both.
    fn diffusers_name(self, name: &str, file: &crate::tensors::TensorFile) -> Option<String> {
        use crate::family::unet_names::{diffusers_to_ldm, ldm_to_diffusers};
        match self {
            Part::Unet => {
                let (path, leaf) = name.rsplit_once('.')?;
                let mapped = ldm_to_diffusers(path)?;
                let has_attentions = |i: usize| {
                    file.get(&format!("up_blocks.{i}.attentions.0.norm.weight"))
                        .is_some()
                };
                (diffusers_to_ldm(&mapped, has_attentions)? == path)
                    .then(|| format!("{mapped}.{leaf}"))
            }
            _ => Some(name.to_string()),
        }
    }
}

/// Where the models run and in which dtype (`--device`, `--dtype`). Weights are decoded and
/// patched in f32 on the CPU, then converted and moved; every model moves its inputs here.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

impl Placement {
    /// `--device`: `cpu`, `cuda[:N]` or `metal[:N]`. A GPU this build was not compiled for is a
    /// one-line error saying which cargo feature adds it.
    pub fn device(spec: &str) -> Result<Device> {
        let (kind, index) = match spec.split_once(':') {
            Some((k, i)) => (
                k,
                i.parse::<usize>().map_err(|_| {
                    Error::Invalid(format!("--device {spec}: '{i}' is not a device number"))
                })?,
            ),
            None => (spec, 0),
        };
        let (made, feature) = match kind {
            "cpu" if index == 0 => return Ok(Device::Cpu),
            "cuda" => (Device::new_cuda(index), "cuda"),
            "metal" => (Device::new_metal(index), "metal"),
            _ => {
                return Err(Error::Invalid(format!(
                    "--device {spec}: not a device (cpu, cuda[:N], metal[:N])"
                )))
            }
        };
        made.map_err(|e| match e {
            candle_core::Error::NotCompiledWithCudaSupport
            | candle_core::Error::NotCompiledWithMetalSupport => Error::Invalid(format!(
                "--device {spec}: this loratool was built without {kind} support (cargo build --release --features {feature})"
            )),
            other => Error::Invalid(format!(
                "--device {spec}: {}",
                other.to_string().lines().next().unwrap_or_default()
            )),
        })
    }

    /// `t` on this device in this dtype (no copy when it already is).
    pub fn place(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.dtype)?.to_device(&self.device)
    }
}

/// Where a part's tensor sits: the checkpoint file, the key, the rows of that tensor when it
/// is fused with others (OpenCLIP's `attn.in_proj_weight` holds q, k and v), and whether it is
/// stored transposed (OpenCLIP's `text_projection`).
#[derive(Clone)]
struct Located {
    file: usize,
    key: String,
    rows: Option<Range<usize>>,
    transposed: bool,
}

/// How a model holds a tensor it took from [`Weights`]: as stored, or transposed once (linear
/// layers, so that every call is a plain matmul).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    AsStored,
    Transposed,
}

/// A tensor a loaded model holds, remembered so that [`Weights::repatch`] can rewrite it in place
/// (the model's copy shares its storage).
struct Kept {
    part: Part,
    name: String,
    form: Form,
    tensor: Tensor,
}

/// What [`Weights::repatch`] did.
pub struct Repatched<'c> {
    /// How many tensors were rebuilt.
    pub rebuilt: usize,
    /// The plan it replaced.
    pub previous: PatchPlan<'c>,
}

/// Weights for the sampler's modules, LoRAs applied.
pub struct Weights<'c> {
    plan: PatchPlan<'c>,
    placement: Placement,
    /// The tensors handed out since [`Weights::keep_for_repatch`]; `None` when not keeping (a
    /// single render drops each model after its stage, and these would keep it alive).
    kept: Option<Mutex<Vec<Kept>>>,
    /// An external VAE (`--vae`, or a pipeline folder's `vae/`) that replaces the checkpoint's.
    vae: Option<(TensorFile, VaeNames)>,
    /// A single file's OpenCLIP text encoders (SD2's, SDXL's second) by part and HF CLIP name,
    /// through the family's map.
    openclip: HashMap<(Part, String), Located>,
}

/// How an external VAE file names its tensors.
#[derive(Debug, Clone, Copy)]
enum VaeNames {
    /// LDM names, with or without the `first_stage_model.` prefix.
    Ldm { prefix: &'static str },
    /// diffusers names (`decoder.up_blocks.…`), mapped by the family's VAE key map; `levels`
    /// is the decoder's `up_blocks` count.
    Diffusers { levels: usize },
}

impl<'c> Weights<'c> {
    pub fn new(plan: PatchPlan<'c>) -> Weights<'c> {
        let mut openclip = HashMap::new();
        for (i, cf) in plan.checkpoint.files.iter().enumerate() {
            if cf.layout != Layout::SingleFile {
                continue;
            }
            for t in cf.file.tensors() {
                let found = [
                    (SD2_OPENCLIP, Part::ClipTextEncoder),
                    (SDXL_OPENCLIP, Part::ClipTextEncoder2),
                ]
                .into_iter()
                .find_map(|(prefix, part)| Some((t.name.strip_prefix(prefix)?, part)));
                let Some((name, part)) = found else {
                    continue;
                };
                let rows = t.shape.first().copied().unwrap_or(0);
                let mut mapped: Vec<(String, Option<Range<usize>>, bool)> =
                    openclip_tensor_to_hf(name, rows)
                        .into_iter()
                        .map(|(hf, rows)| (hf, rows, false))
                        .collect();
                if name == OPENCLIP_TEXT_PROJECTION.0 {
                    mapped.push((OPENCLIP_TEXT_PROJECTION.1.to_string(), None, true));
                }
                for (hf, rows, transposed) in mapped {
                    openclip.entry((part, hf)).or_insert(Located {
                        file: i,
                        key: t.name.clone(),
                        rows,
                        transposed,
                    });
                }
            }
        }
        Weights {
            plan,
            placement: Placement::default(),
            kept: None,
            vae: None,
            openclip,
        }
    }

    /// Models built from these weights run on `placement`'s device and dtype.
    pub fn with_placement(mut self, placement: Placement) -> Weights<'c> {
        self.placement = placement;
        self
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Where `part` runs: the placement, except that the VAE always runs in f32. SDXL's VAE
    /// overflows in f16 (A1111 then reverts it to f32: "Automatically revert VAE to 32-bit
    /// floats"), its weights are small, and on the CPU the f32 path is the tiled kernels, where
    /// f16 goes through candle's whole-image im2col (SDXL at 1024²: the render's peak memory).
    pub fn placement_of(&self, part: Part) -> Placement {
        match part {
            Part::Vae => Placement {
                device: self.placement.device.clone(),
                dtype: DType::F32,
            },
            _ => self.placement.clone(),
        }
    }

    /// Whether the text encoder is a single file's OpenCLIP (SD2's full 24-layer tower, which LDM
    /// and A1111 run to its penultimate layer).
    pub fn text_encoder_is_openclip(&self) -> bool {
        self.openclip
            .keys()
            .any(|(p, _)| *p == Part::ClipTextEncoder)
    }

    /// Takes the VAE from `path` instead of the checkpoint, as A1111's VAE setting does: a file
    /// with LDM names (A1111's VAE files, with or without `first_stage_model.`) or diffusers
    /// names (a pipeline's `vae/diffusion_pytorch_model.safetensors`, current or pre-0.14).
    pub fn with_vae(mut self, path: &Path) -> Result<Weights<'c>> {
        let file = TensorFile::open(path)?;
        let names = match crate::family::layout::vae_naming(file.tensors()) {
            "diffusers" => VaeNames::Diffusers {
                levels: (0..)
                    .take_while(|i| {
                        file.tensors()
                            .iter()
                            .any(|t| t.name.starts_with(&format!("decoder.up_blocks.{i}.")))
                    })
                    .count(),
            },
            _ => VaeNames::Ldm {
                prefix: match file.get("first_stage_model.decoder.conv_in.weight") {
                    Some(_) => crate::family::layout::LDM_VAE,
                    None => "",
                },
            },
        };
        self.vae = Some((file, names));
        if !self.has(Part::Vae, "decoder.conv_in.weight") {
            return Err(Error::bad_file(path, "not a VAE (no decoder.conv_in)"));
        }
        Ok(self)
    }

    /// A diffusers pipeline folder's own VAE (`vae/*.safetensors`), which is not one of the
    /// checkpoint's patchable components; single files keep theirs.
    pub fn with_pipeline_vae(self) -> Result<Weights<'c>> {
        let root = &self.plan.checkpoint.root;
        if !root.is_dir() {
            return Ok(self);
        }
        match crate::family::layout::pipeline_vae(root)?.first() {
            Some((relative, _)) => {
                let path = root.join(relative);
                self.with_vae(&path)
            }
            None => Ok(self),
        }
    }

    /// The LoRA patches these weights apply.
    pub fn plan(&self) -> &PatchPlan<'c> {
        &self.plan
    }

    pub fn checkpoint(&self) -> &'c Checkpoint {
        self.plan.checkpoint
    }

    /// The checkpoint file, key (and rows of a fused tensor) holding `name` of `part`, if any.
    fn locate(&self, part: Part, name: &str) -> Option<Located> {
        let found = self
            .plan
            .checkpoint
            .files
            .iter()
            .enumerate()
            .find_map(|(i, cf)| {
                let key = match cf.layout {
                    Layout::SingleFile => part
                        .single_file_prefixes()
                        .iter()
                        .map(|p| format!("{p}{name}"))
                        .find(|k| cf.file.get(k).is_some())?,
                    Layout::DiffusersComponent(c) if Some(c) == part.component() => {
                        part.diffusers_name(name, &cf.file)?
                    }
                    Layout::DiffusersComponent(_) => return None,
                };
                cf.file.get(&key).is_some().then_some(Located {
                    file: i,
                    key,
                    rows: None,
                    transposed: false,
                })
            });
        found.or_else(|| self.openclip.get(&(part, name.to_string())).cloned())
    }

    /// Whether the checkpoint has `name` of `part`.
    pub fn has(&self, part: Part, name: &str) -> bool {
        match self.external_vae(part, name) {
            Some((file, key)) => file.get(&key).is_some(),
            None => self.locate(part, name).is_some(),
        }
    }

    /// The shape of `name` of `part`, without reading it.
    pub fn shape(&self, part: Part, name: &str) -> Option<Vec<usize>> {
        if let Some((file, key)) = self.external_vae(part, name) {
            return file
                .get(&key)
                .map(|t| self.ldm_vae_shape(name, t.shape.clone()));
        }
        let at = self.locate(part, name)?;
        let mut shape = self.plan.checkpoint.files[at.file]
            .file
            .get(&at.key)
            .map(|t| t.shape.clone())?;
        if let Some(rows) = &at.rows {
            shape[0] = rows.len();
        }
        if at.transposed {
            shape.reverse();
        }
        Some(shape)
    }

    /// The external VAE's file and key for `name` (LDM), when one replaces the checkpoint's. A
    /// name the map does not know, or that the file lacks, gives a key the file does not have.
    fn external_vae(&self, part: Part, name: &str) -> Option<(&TensorFile, String)> {
        let (file, names) = self.vae.as_ref().filter(|_| part == Part::Vae)?;
        let key = match *names {
            VaeNames::Ldm { prefix } => format!("{prefix}{name}"),
            VaeNames::Diffusers { levels } => {
                let (path, leaf) = name.rsplit_once('.').unwrap_or((name, ""));
                let candidates: Vec<String> =
                    crate::family::vae_names::ldm_to_diffusers(path, levels)
                        .into_iter()
                        .map(|m| format!("{m}.{leaf}"))
                        .collect();
                candidates
                    .iter()
                    .find(|k| file.get(k).is_some())
                    .or(candidates.first())
                    .cloned()
                    .unwrap_or_else(|| name.to_string())
            }
        };
        Some((file, key))
    }

    /// diffusers stores the VAE's mid attention as linear `[c, c]` weights where LDM has 1×1
    /// convolutions: the LDM shape of `name` given the stored one.
    fn ldm_vae_shape(&self, name: &str, mut shape: Vec<usize>) -> Vec<usize> {
        let diffusers = matches!(self.vae, Some((_, VaeNames::Diffusers { .. })));
        let path = name.strip_suffix(".weight");
        if diffusers
            && shape.len() == 2
            && path.is_some_and(crate::family::vae_names::is_attention_conv)
        {
            shape.extend([1, 1]);
        }
        shape
    }

    /// Models built from now on can be re-patched in place by [`Weights::repatch`]: every tensor
    /// handed out is remembered (the models hold the same storage, so this costs no memory while
    /// they live).
    pub fn keep_for_repatch(&mut self) {
        self.kept = Some(Mutex::new(Vec::new()));
    }

    /// Forgets the remembered tensors: models dropped after this free their memory.
    pub fn stop_keeping(&mut self) {
        self.kept = None;
    }

    /// Replaces the LoRAs (the plan, built for the same checkpoint) and rewrites in place every
    /// remembered tensor that the old or the new plan patches, so the models built since
    /// [`Weights::keep_for_repatch`] compute with the new LoRAs without reloading anything
    /// else.
    pub fn repatch(&mut self, plan: PatchPlan<'c>) -> Result<Repatched<'c>> {
        if !std::ptr::eq(plan.checkpoint, self.plan.checkpoint) {
            return Err(Error::Invalid(
                "re-patching weights with a plan for another checkpoint".into(),
            ));
        }
        let old = std::mem::replace(&mut self.plan, plan);
        let Some(kept) = &self.kept else {
            return Ok(Repatched {
                rebuilt: 0,
                previous: old,
            });
        };
        let kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<&Kept> = kept
            .iter()
            .filter(|k| self.external_vae(k.part, &k.name).is_none()) // never patched
            .filter(|k| {
                self.locate(k.part, &k.name).is_some_and(|at| {
                    let patched = |p: &PatchPlan| p.files[at.file].contains_key(&at.key);
                    patched(&old) || patched(&self.plan)
                })
            })
            .collect();
        // Tensors in parallel: a rebuild is mostly fresh pages and copies, which one thread
        // cannot saturate.
        use rayon::prelude::*;
        stale.par_iter().try_for_each(|k| {
            let fresh = self.read(k.part, &k.name, k.form)?;
            k.tensor
                .slice_set(&fresh, 0, 0)
                .map_err(|e| candle_error(&k.name, e))
        })?;
        let rebuilt = stale.len();
        Ok(Repatched {
            rebuilt,
            previous: old,
        })
    }

    /// `name` of `part` in f32 with every LoRA patch applied (then in the placement's dtype, on
    /// its device).
    pub fn get(&self, part: Part, name: &str) -> Result<Tensor> {
        self.get_as(part, name, Form::AsStored)
    }

    /// [`Weights::get`] transposed (a 2-D weight), contiguous.
    pub fn get_transposed(&self, part: Part, name: &str) -> Result<Tensor> {
        self.get_as(part, name, Form::Transposed)
    }

    fn get_as(&self, part: Part, name: &str, form: Form) -> Result<Tensor> {
        let t = self.read(part, name, form)?;
        if let Some(kept) = &self.kept {
            kept.lock().unwrap_or_else(|e| e.into_inner()).push(Kept {
                part,
                name: name.to_string(),
                form,
                tensor: t.clone(),
            });
        }
        Ok(t)
    }

    fn read(&self, part: Part, name: &str, form: Form) -> Result<Tensor> {
        let t = self.read_f32(part, name)?;
        let t = match form {
            Form::AsStored => Ok(t),
            Form::Transposed => t.t().and_then(|t| t.contiguous()),
        };
        t.and_then(|t| self.placement_of(part).place(&t))
            .map_err(|e| candle_error(name, e))
    }

    /// `name` of `part` in f32 on the CPU with every LoRA patch applied.
    fn read_f32(&self, part: Part, name: &str) -> Result<Tensor> {
        if let Some((file, key)) = self.external_vae(part, name) {
            let t = file.read_f32(&key)?;
            file.release_tensor(&key);
            let shape = self.ldm_vae_shape(name, t.shape);
            return Tensor::from_vec(t.data, shape, &Device::Cpu)
                .map_err(|e| candle_error(&key, e));
        }
        let at = self.locate(part, name).ok_or_else(|| {
            Error::bad_tensor(
                &self.plan.checkpoint.root,
                name,
                format!("missing from the checkpoint ({part:?})"),
            )
        })?;
        let cf = &self.plan.checkpoint.files[at.file];
        let patches = self.plan.files[at.file]
            .get(&at.key)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // A slice of a fused tensor (OpenCLIP's q, k, v, read in that order) leaves its pages
        // mapped for the next slice; the last one releases them.
        let last_slice = match &at.rows {
            Some(rows) => cf
                .file
                .get(&at.key)
                .is_some_and(|t| t.shape.first() == Some(&rows.end)),
            None => true,
        };
        let t = match at.rows {
            Some(rows) => self.plan.apply_rows(&cf.file, &at.key, rows, patches)?,
            None => self.plan.apply(&cf.file, &at.key, patches)?,
        };
        // The f32 copy is what the model keeps: the mapped pages it came from would only add
        // to the resident set (a 2 GB f16 checkpoint on top of its 4 GB f32 weights).
        if last_slice {
            cf.file.release_tensor(&at.key);
        }
        Tensor::from_vec(t.data, t.shape, &Device::Cpu)
            .and_then(|t| match at.transposed {
                true => t.t()?.contiguous(),
                false => Ok(t),
            })
            .map_err(|e| candle_error(&at.key, e))
    }
}

/// A candle error while building a module, naming what was being built.
pub fn candle_error(what: &str, e: candle_core::Error) -> Error {
    // candle appends a backtrace to its message when RUST_BACKTRACE is set: one line is kept.
    let message = e.to_string();
    Error::Invalid(format!(
        "{what}: {}",
        message.lines().next().unwrap_or_default()
    ))
}

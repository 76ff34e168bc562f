//! Every LoRA file format parsed into one model: an [`Adapter`] is a list of [`AdapterModule`]s,
//! each naming the tensors it owns, its kind, rank, alpha and effective scale. The delta math for
//! every kind lives in [`delta`]; a new adapter kind touches this folder only.

pub mod delta;
pub mod keys;
pub mod kohya_metadata;
mod peft_config;

use crate::family::Component;
use crate::tensors::{Dtype, Tensor, TensorFile, TensorSource};
use crate::{Error, Result};
use keys::{classify, Role};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

pub use peft_config::PeftConfig;

/// The key dialect of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `lora_unet_…` / `lora_te…_` module names (kohya sd-scripts, LyCORIS, most trainers).
    Kohya,
    /// Dotted diffusers/peft paths with `lora_A` / `lora_B` (diffusers ≥ 0.24, peft).
    Peft,
    /// Older diffusers dialects: attention processors (`to_q_lora.down`), `lora_linear_layer`.
    DiffusersOld,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Kohya => "kohya",
            Format::Peft => "peft",
            Format::DiffusersOld => "diffusers_old",
        }
    }
}

/// What a module computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// `up · down` (LoRA, LoCon, with optional Tucker `mid`).
    Lora,
    /// LyCORIS LoHa: Hadamard product of two low-rank products.
    Loha,
    /// LyCORIS LoKr: Kronecker product of two (possibly low-rank) factors.
    Lokr,
    /// (IA)³: multiplies rows (or input columns) of the weight.
    Ia3,
    /// A stored full delta (`diff`).
    Full,
    /// Additive norm-layer weights (`w_norm`, `b_norm`).
    Norm,
    /// Diagonal orthogonal finetuning (`oft_blocks`, 3-D).
    Oft,
    /// Butterfly OFT (`oft_blocks`, 4-D).
    Boft,
    /// GLoRA (`a1`, `a2`, `b1`, `b2`).
    Glora,
}

impl ModuleKind {
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Lora => "lora",
            ModuleKind::Loha => "loha",
            ModuleKind::Lokr => "lokr",
            ModuleKind::Ia3 => "ia3",
            ModuleKind::Full => "full",
            ModuleKind::Norm => "norm",
            ModuleKind::Oft => "oft",
            ModuleKind::Boft => "boft",
            ModuleKind::Glora => "glora",
        }
    }
}

/// One adapted module of the base model.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// Name as in the file, without the tensor suffix.
    pub name: String,
    pub component: Component,
    /// Path of the target inside its component (see [`keys::KeyInfo::path`]).
    pub path: String,
    pub format: Format,
    pub kind: ModuleKind,
    /// Tensor key of each role this module has.
    pub tensors: BTreeMap<Role, String>,
    /// Rank of the low-rank factors; `None` when the module has none (full LoKr, IA3, diff, …).
    pub rank: Option<usize>,
    /// Alpha as stored (tensor or peft config); `None` when the file has none for this module.
    pub alpha: Option<f32>,
    /// The factor the delta is multiplied by (alpha/rank, alpha/√rank for rsLoRA, 1 without alpha).
    pub scale: f32,
    /// DoRA magnitude present (`dora_scale` or `lora_magnitude_vector`).
    pub dora: bool,
    /// Shape of the weight the module changes, as far as the factors tell (conv LoHa/LoKr with
    /// flattened factors give `[out, in·kh·kw]`).
    pub shape: Vec<usize>,
    /// Whether `shape` has the weight's own dimensions, so that 4-D means a convolution and 2-D a
    /// linear layer. False where the factors cannot tell: LoHa and low-rank LoKr factors are 2-D
    /// for a 1×1 conv and a linear layer alike; IA3, OFT/BOFT and GLoRA give no kernel dims.
    pub shape_is_exact: bool,
    /// Storage dtype of the module's main factor.
    pub dtype: Dtype,
}

impl AdapterModule {
    pub fn tensor(&self, role: Role) -> Option<&str> {
        self.tensors.get(&role).map(String::as_str)
    }

    /// The module's plain low-rank factors, when its delta is `scale · up · down`: a LoRA or
    /// LoCon without a Tucker core. A DoRA module has them too, with its magnitude applied on top
    /// (callers that cannot apply it check [`AdapterModule::dora`]).
    pub fn plain_factors(&self) -> Option<PlainFactors<'_>> {
        if self.kind != ModuleKind::Lora || self.tensor(Role::Mid).is_some() {
            return None;
        }
        Some(PlainFactors {
            up: self.tensor(Role::Up)?,
            down: self.tensor(Role::Down)?,
            rank: self.rank?,
        })
    }

    /// True for convolution kernels larger than 1×1 (what makes a LoRA a LoCon).
    pub fn is_spatial_conv(&self) -> bool {
        self.shape.len() == 4 && self.shape[2] * self.shape[3] > 1
            || self.tensors.contains_key(&Role::Mid)
            || self.tensors.contains_key(&Role::HadaT1)
            || self.tensors.contains_key(&Role::LokrT2)
    }
}

/// Every tensor of one module, each read from its file and decoded once, for passes that look at
/// the same values more than once (`inspect --norms`: the NaN/Inf check and the norm). The delta
/// math reads from it as from the file; a key that is not the module's is an error.
pub struct ModuleTensors<'a> {
    path: &'a Path,
    tensors: BTreeMap<&'a str, Tensor>,
}

impl<'a> ModuleTensors<'a> {
    /// Reads each of `m`'s tensors from `source`, once.
    pub fn read(m: &'a AdapterModule, source: &'a dyn TensorSource) -> Result<ModuleTensors<'a>> {
        let tensors = m
            .tensors
            .values()
            .map(|k| Ok((k.as_str(), source.read_f32(k)?)))
            .collect::<Result<_>>()?;
        Ok(ModuleTensors {
            path: source.path(),
            tensors,
        })
    }

    /// True when any of the module's tensors holds NaN or Inf.
    pub fn has_non_finite(&self) -> bool {
        self.tensors.values().any(Tensor::has_non_finite)
    }
}

impl TensorSource for ModuleTensors<'_> {
    fn path(&self) -> &Path {
        self.path
    }

    fn read_f32(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::bad_tensor(self.path, name, "not a tensor of this module"))
    }
}

/// Tensor keys of a module's plain low-rank factors (see [`AdapterModule::plain_factors`]).
#[derive(Debug, Clone, Copy)]
pub struct PlainFactors<'a> {
    /// `[out, rank]` (`[out, rank, 1, 1]` for convolutions).
    pub up: &'a str,
    /// `[rank, in(, kh, kw)]`.
    pub down: &'a str,
    pub rank: usize,
}

/// kohya factor shapes for a LoRA of `rank` on a weight of `target` shape: `up` is
/// `[out, rank]` (`[out, rank, 1, 1]` for convolutions), `down` is `[rank, in(, kh, kw)]`.
pub fn lora_factor_shapes(target: &[usize], rank: usize) -> (Vec<usize>, Vec<usize>) {
    let mut down = vec![rank];
    down.extend_from_slice(&target[1..]);
    let up = if target.len() == 4 {
        vec![target[0], rank, 1, 1]
    } else {
        vec![target[0], rank]
    };
    (up, down)
}

/// A parsed adapter file.
pub struct Adapter {
    pub file: TensorFile,
    /// The dialect of most modules (files mixing dialects report the majority).
    pub format: Format,
    pub modules: Vec<AdapterModule>,
    /// Tensor keys that belong to no module (embeddings bundled with the LoRA, stray keys).
    pub unrecognized: Vec<String>,
    /// Non-fatal problems met while parsing (a module missing a factor, …).
    pub warnings: Vec<String>,
    /// The peft/diffusers LoraConfig found in the file's metadata or beside it, if any.
    pub peft_config: Option<PeftConfig>,
}

impl Adapter {
    /// Parses an opened tensor file as an adapter.
    pub fn from_file(file: TensorFile) -> Result<Adapter> {
        let peft_config = PeftConfig::find(&file)?;
        // Group keys by module, keeping file order of first appearance.
        let mut order: Vec<String> = Vec::new();
        let mut groups: BTreeMap<String, (keys::KeyInfo, BTreeMap<Role, String>)> = BTreeMap::new();
        let mut unrecognized = Vec::new();
        let mut warnings = Vec::new();
        for t in file.tensors() {
            let Some(info) = classify(&t.name) else {
                unrecognized.push(t.name.clone());
                continue;
            };
            let entry = groups.entry(info.module.clone()).or_insert_with(|| {
                order.push(info.module.clone());
                (info.clone(), BTreeMap::new())
            });
            if info.format == Format::DiffusersOld {
                entry.0.format = Format::DiffusersOld;
            }
            if entry.1.insert(info.role, t.name.clone()).is_some() {
                return Err(Error::NotAnAdapter {
                    path: file.path().to_path_buf(),
                    reason: format!("module '{}' has two tensors for the same role", info.module),
                });
            }
        }
        let mut modules = Vec::with_capacity(order.len());
        for name in order {
            let (info, tensors) = groups.remove(&name).expect("grouped");
            match build_module(&file, info, tensors, peft_config.as_ref()) {
                Ok(Some(m)) => modules.push(m),
                Ok(None) => {}
                Err(ModuleProblem::Skip(reason)) => {
                    warnings.push(format!("module '{name}' skipped: {reason}"))
                }
                Err(ModuleProblem::Fatal(e)) => return Err(e),
            }
        }
        if modules.is_empty() {
            let looks_like_checkpoint = unrecognized.iter().any(|k| {
                k.starts_with("model.diffusion_model.")
                    || k.starts_with("double_blocks.")
                    || k.starts_with("cond_stage_model.")
                    || k.starts_with("conditioner.")
            });
            let reason = if looks_like_checkpoint {
                "not a LoRA: this is a model checkpoint (no adapter tensors found)".to_string()
            } else if let Some(w) = warnings.first() {
                format!("no usable adapter modules ({w})")
            } else {
                format!(
                    "not a LoRA: none of its {} tensors is an adapter tensor{}",
                    file.tensors().len(),
                    unrecognized
                        .first()
                        .map(|k| format!(" (first: '{k}')"))
                        .unwrap_or_default()
                )
            };
            return Err(Error::NotAnAdapter {
                path: file.path().to_path_buf(),
                reason,
            });
        }
        let format = majority(modules.iter().map(|m| m.format)).unwrap_or(Format::Kohya);
        Ok(Adapter {
            file,
            format,
            modules,
            unrecognized,
            warnings,
            peft_config,
        })
    }

    pub fn open(path: &std::path::Path) -> Result<Adapter> {
        Adapter::from_file(TensorFile::open(path)?)
    }

    /// Refuses an adapter whose module tensors hold NaN or Inf (a training run that diverged):
    /// merged or re-factorized, they would silently turn every weight they touch into NaN. Names
    /// the first such tensor in module order. Reads every module tensor once; callers read the
    /// factors again when they use them, since keeping them decoded would hold twice the file's
    /// size in memory, and the mapped pages are released as the check goes.
    pub fn check_finite(&self) -> Result<()> {
        use rayon::prelude::*;
        // In chunks of modules, the mapping released after each: a read maps the file's pages in
        // large folios (2 MiB on ext4), so releasing each tensor alone left most of the file
        // resident (an SDXL LoRA's 255 MB were the peak of a whole SDXL merge).
        for chunk in self.modules.chunks(64) {
            let first = chunk
                .par_iter()
                .flat_map_iter(|m| m.tensors.values())
                .map(|key| -> Result<Option<&String>> {
                    let t = self.file.read_f32(key)?;
                    Ok(t.has_non_finite().then_some(key))
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .next();
            self.file.release_pages();
            if let Some(key) = first {
                return Err(Error::bad_tensor(
                    self.file.path(),
                    key.as_str(),
                    "contains NaN or Inf values (a diverged training run?); refusing to use it",
                ));
            }
        }
        Ok(())
    }
}

fn majority<T: PartialEq + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for it in items {
        match counts.iter_mut().find(|(k, _)| *k == it) {
            Some((_, n)) => *n += 1,
            None => counts.push((it, 1)),
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k)
}

enum ModuleProblem {
    /// The module cannot be used; report and go on.
    Skip(String),
    /// The file is unreadable.
    Fatal(Error),
}

impl From<Error> for ModuleProblem {
    fn from(e: Error) -> Self {
        ModuleProblem::Fatal(e)
    }
}

fn build_module(
    file: &TensorFile,
    info: keys::KeyInfo,
    tensors: BTreeMap<Role, String>,
    peft: Option<&PeftConfig>,
) -> std::result::Result<Option<AdapterModule>, ModuleProblem> {
    let shape_of = |role: Role| -> Option<&[usize]> {
        tensors
            .get(&role)
            .and_then(|k| file.get(k))
            .map(|t| t.shape.as_slice())
    };
    let has = |role: Role| tensors.contains_key(&role);
    let skip = |reason: String| Err(ModuleProblem::Skip(reason));

    let kind = if has(Role::Down) || has(Role::Up) {
        ModuleKind::Lora
    } else if has(Role::HadaW1A) || has(Role::HadaW1B) {
        ModuleKind::Loha
    } else if [Role::LokrW1, Role::LokrW1A, Role::LokrW2, Role::LokrW2A]
        .iter()
        .any(|r| has(*r))
    {
        ModuleKind::Lokr
    } else if has(Role::OftBlocks) {
        if shape_of(Role::OftBlocks).is_some_and(|s| s.len() == 4) {
            ModuleKind::Boft
        } else {
            ModuleKind::Oft
        }
    } else if has(Role::Diff) {
        ModuleKind::Full
    } else if has(Role::NormWeight) || has(Role::NormBias) {
        ModuleKind::Norm
    } else if has(Role::GloraA1) {
        ModuleKind::Glora
    } else if has(Role::Ia3Weight) {
        ModuleKind::Ia3
    } else if has(Role::Alpha) && tensors.len() == 1 {
        return skip("it has an alpha but no weights".into());
    } else {
        return skip("no known combination of tensors".into());
    };

    let need = |role: Role, what: &str| -> std::result::Result<Vec<usize>, ModuleProblem> {
        shape_of(role)
            .map(|s| s.to_vec())
            .ok_or_else(|| ModuleProblem::Skip(format!("{what} is missing")))
    };
    // Factor shapes come from the file: check their ranks (number of dims) before indexing them,
    // and refuse empty tensors, whose dimensions could be anything.
    let need_nd =
        |role: Role, what: &str, min: usize| -> std::result::Result<Vec<usize>, ModuleProblem> {
            let s = need(role, what)?;
            if s.len() < min {
                return Err(ModuleProblem::Skip(format!(
                    "{what} has shape {s:?}, expected at least {min} dimensions"
                )));
            }
            Ok(s)
        };
    let opt_nd = |role: Role,
                  what: &str,
                  min: usize|
     -> std::result::Result<Option<Vec<usize>>, ModuleProblem> {
        if has(role) {
            need_nd(role, what, min).map(Some)
        } else {
            Ok(None)
        }
    };
    for (role, key) in &tensors {
        if matches!(role, Role::Alpha | Role::Ia3OnInput) {
            continue;
        }
        if file.get(key).is_some_and(|t| t.numel() == 0) {
            return skip(format!("tensor '{key}' is empty"));
        }
    }
    let overflow = || ModuleProblem::Skip("factor dimensions overflow".into());
    let main_role;
    // Kinds whose factors keep a convolution's kernel dimensions; LoHa and LoKr only do so with a
    // Tucker core or a full (unfactored) LoKr w2.
    let shape_is_exact = match kind {
        ModuleKind::Lora | ModuleKind::Full | ModuleKind::Norm => true,
        ModuleKind::Loha => has(Role::HadaT1),
        ModuleKind::Lokr => has(Role::LokrW2) || has(Role::LokrT2),
        ModuleKind::Ia3 | ModuleKind::Oft | ModuleKind::Boft | ModuleKind::Glora => false,
    };
    let (rank, shape): (Option<usize>, Vec<usize>) = match kind {
        ModuleKind::Lora => {
            main_role = Role::Down;
            let down = need(Role::Down, "the down (lora_A) factor")?;
            let up = need(Role::Up, "the up (lora_B) factor")?;
            if down.len() < 2 || up.len() < 2 {
                return skip(format!("factor shapes {down:?} / {up:?} are not matrices"));
            }
            let r = down[0];
            if up[1] != r {
                return skip(format!(
                    "up factor has rank {} but down factor has rank {r}",
                    up[1]
                ));
            }
            let mut shape = vec![up[0], down[1]];
            if let Some(mid) = opt_nd(Role::Mid, "lora_mid", 2)? {
                shape.extend_from_slice(&mid[2..]);
            } else {
                shape.extend_from_slice(&down[2..]);
            }
            (Some(r), shape)
        }
        ModuleKind::Loha => {
            main_role = Role::HadaW1A;
            let w1a = need_nd(Role::HadaW1A, "hada_w1_a", 2)?;
            let w1b = need_nd(Role::HadaW1B, "hada_w1_b", 2)?;
            need_nd(Role::HadaW2A, "hada_w2_a", 2)?;
            need_nd(Role::HadaW2B, "hada_w2_b", 2)?;
            let r = w1b[0];
            if let Some(t1) = opt_nd(Role::HadaT1, "hada_t1", 2)? {
                // Tucker: w_a [r, out], w_b [r, in], t [r, r, kh, kw].
                let mut s = vec![w1a[1], w1b[1]];
                s.extend_from_slice(&t1[2..]);
                (Some(r), s)
            } else {
                let cols = w1b[1..]
                    .iter()
                    .try_fold(1usize, |a, d| a.checked_mul(*d))
                    .ok_or_else(overflow)?;
                (Some(r), vec![w1a[0], cols])
            }
        }
        ModuleKind::Lokr => {
            main_role = if has(Role::LokrW1) {
                Role::LokrW1
            } else {
                Role::LokrW1A
            };
            let (a, c) = if let Some(w1) = opt_nd(Role::LokrW1, "lokr_w1", 2)? {
                (w1[0], w1[1])
            } else {
                let w1a = need_nd(Role::LokrW1A, "lokr_w1_a", 2)?;
                let w1b = need_nd(Role::LokrW1B, "lokr_w1_b", 2)?;
                (w1a[0], w1b[1])
            };
            let (b, rest): (usize, Vec<usize>) =
                if let Some(w2) = opt_nd(Role::LokrW2, "lokr_w2", 2)? {
                    (w2[0], w2[1..].to_vec())
                } else {
                    let w2a = need_nd(Role::LokrW2A, "lokr_w2_a", 2)?;
                    let w2b = need_nd(Role::LokrW2B, "lokr_w2_b", 2)?;
                    if let Some(t2) = opt_nd(Role::LokrT2, "lokr_t2", 2)? {
                        let mut rest = vec![w2b[1]];
                        rest.extend_from_slice(&t2[2..]);
                        (w2a[1], rest)
                    } else {
                        (w2a[0], vec![w2b[1]])
                    }
                };
            let rank = shape_of(Role::LokrW1B)
                .or_else(|| shape_of(Role::LokrW2B))
                .and_then(|s| s.first().copied());
            let mut shape = vec![
                a.checked_mul(b).ok_or_else(overflow)?,
                c.checked_mul(rest[0]).ok_or_else(overflow)?,
            ];
            shape.extend_from_slice(&rest[1..]);
            (rank, shape)
        }
        ModuleKind::Full => {
            main_role = Role::Diff;
            (None, need(Role::Diff, "diff")?)
        }
        ModuleKind::Norm => {
            main_role = if has(Role::NormWeight) {
                Role::NormWeight
            } else {
                Role::NormBias
            };
            (None, need(main_role, "w_norm")?)
        }
        ModuleKind::Ia3 => {
            main_role = Role::Ia3Weight;
            (None, need(Role::Ia3Weight, "weight")?)
        }
        ModuleKind::Oft | ModuleKind::Boft => {
            main_role = Role::OftBlocks;
            let b = need_nd(Role::OftBlocks, "oft_blocks", 3)?;
            // Output rows = blocks × block size (the last two dims are square blocks).
            let n = b.len();
            (
                None,
                vec![b[n - 3].checked_mul(b[n - 1]).ok_or_else(overflow)?],
            )
        }
        ModuleKind::Glora => {
            main_role = Role::GloraA1;
            let a2 = need_nd(Role::GloraA2, "a2.weight", 2)?;
            let b1 = need_nd(Role::GloraB1, "b1.weight", 2)?;
            need_nd(Role::GloraB2, "b2.weight", 2)?;
            (Some(a2[0]), vec![b1[0], a2[1]])
        }
    };
    if shape.contains(&0) || rank == Some(0) {
        return skip(format!("empty factor (shape {shape:?}, rank {rank:?})"));
    }

    let mut alpha = match tensors.get(&Role::Alpha) {
        Some(k) => Some(file.read_scalar(k)?),
        None => None,
    };
    let mut rslora = false;
    if alpha.is_none() && info.format != Format::Kohya {
        if let Some(cfg) = peft {
            if let Some(a) = cfg.alpha_for(info.component, &info.path) {
                alpha = Some(a);
            }
            rslora = cfg.use_rslora(info.component);
        }
    }
    let scale = delta::scale_for(kind, rank, alpha, rslora, &tensors);
    let dtype = tensors
        .get(&main_role)
        .and_then(|k| file.get(k))
        .map(|t| t.dtype)
        .unwrap_or(Dtype::F32);
    Ok(Some(AdapterModule {
        dora: tensors.contains_key(&Role::DoraScale),
        name: info.module,
        component: info.component,
        path: info.path,
        format: info.format,
        kind,
        tensors,
        rank,
        alpha,
        scale,
        shape,
        shape_is_exact,
        dtype,
    }))
}

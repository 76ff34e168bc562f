//! `loratool merge --base`: bake weighted LoRAs into a checkpoint, streaming.
//!
//! Everything that can fail is checked before the output file is created: every LoRA parses, its
//! family fits the checkpoint (unless forced), every matched module's shape fits its target, and
//! with `strict` every module matches. Then the output header is computed from the base and tensors
//! are produced in the base's order: untouched tensors are copied byte for byte, touched ones are
//! decoded to f32, patched by each LoRA in command-line order, and encoded once. Work is done in
//! windows of bounded size, in parallel inside a window, so peak memory does not grow with the
//! checkpoint.

use crate::adapter::keys::Role;
use crate::adapter::{delta, Adapter, AdapterModule, Component, ModuleKind};
use crate::family::checkpoint::{checkpoint_family, KeyMap, Layout, Target};
use crate::family::{self, BaseModel};
use crate::tensors::hash::hash_file;
use crate::tensors::writer::{SafetensorsWriter, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor, TensorFile};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `--lora PATH[:W]` or `--lora PATH:TE_W:UNET_W` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub path: PathBuf,
    /// Multiplier for text-encoder modules.
    pub text_encoder: f32,
    /// Multiplier for UNet / transformer modules.
    pub unet: f32,
}

impl LoraWeight {
    /// Parses `PATH`, `PATH:W` or `PATH:TE_W:UNET_W` (A1111's order). Weights are split off at the
    /// last `:` whose suffix parses as a number, so paths containing `:` keep working.
    pub fn parse(arg: &str) -> Result<LoraWeight> {
        let number =
            |s: &str| -> Option<f32> { s.trim().parse::<f32>().ok().filter(|v| v.is_finite()) };
        let mut weights = Vec::new();
        let mut path = arg;
        while weights.len() < 2 {
            match path.rsplit_once(':') {
                Some((head, tail)) if !head.is_empty() => match number(tail) {
                    Some(w) => {
                        weights.insert(0, w);
                        path = head;
                    }
                    None => break,
                },
                _ => break,
            }
        }
        if path.is_empty() || path.starts_with(':') {
            return Err(Error::Invalid(format!("--lora '{arg}': no file name")));
        }
        // A trailing ':something' that is not a number and not part of an existing path is a typo.
        if weights.is_empty() {
            if let Some((head, tail)) = arg.rsplit_once(':') {
                if !Path::new(arg).exists() && Path::new(head).exists() {
                    return Err(Error::Invalid(format!(
                        "--lora '{arg}': weight '{tail}' is not a number"
                    )));
                }
            }
        }
        let (te, unet) = match weights.as_slice() {
            [] => (1.0, 1.0),
            [w] => (*w, *w),
            [te, unet] => (*te, *unet),
            _ => unreachable!("at most two weights"),
        };
        Ok(LoraWeight {
            path: PathBuf::from(path),
            text_encoder: te,
            unet,
        })
    }

    fn multiplier(&self, component: Component) -> f32 {
        if component.is_text_encoder() {
            self.text_encoder
        } else {
            self.unet
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Output dtype for float tensors; the base's dtype when `None`.
    pub dtype: Option<Dtype>,
    /// Unmatched LoRA modules are an error (checked before writing).
    pub strict: bool,
    /// Overwrite an existing output; accept a LoRA of another family.
    pub force: bool,
    /// Bytes of f32 working memory per parallel window.
    pub window_bytes: usize,
}

/// What a merge did, for the summary line and the output metadata.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub base_family: Option<BaseModel>,
    /// Per LoRA: (path, matched modules, unmatched module names).
    pub loras: Vec<(PathBuf, usize, Vec<String>)>,
    pub tensors_changed: usize,
    pub tensors_total: usize,
    pub output_bytes: u64,
}

/// One module of one LoRA applied to one tensor (or a row slice of it).
struct Patch {
    lora: usize,
    module: usize,
    rows: Option<std::ops::Range<usize>>,
    multiplier: f32,
    bias: bool,
}

/// The layout of a base checkpoint file: a diffusers component when it sits in a folder named
/// like one, otherwise a single file.
pub fn layout_of(path: &Path) -> Layout {
    let folder = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match folder.as_str() {
        "unet" => Layout::DiffusersComponent(Component::Unet),
        "transformer" => Layout::DiffusersComponent(Component::Transformer),
        "text_encoder" => Layout::DiffusersComponent(Component::TextEncoder),
        "text_encoder_2" => Layout::DiffusersComponent(Component::TextEncoder2),
        "text_encoder_3" => Layout::DiffusersComponent(Component::TextEncoder3),
        _ => Layout::SingleFile,
    }
}

fn component_of(layout: Layout) -> Option<Component> {
    match layout {
        Layout::DiffusersComponent(c) => Some(c),
        Layout::SingleFile => None,
    }
}

/// Component folders of a diffusers pipeline that LoRAs patch; every other file is copied.
pub(crate) const PIPELINE_COMPONENTS: &[(&str, Component)] = &[
    ("unet", Component::Unet),
    ("transformer", Component::Transformer),
    ("text_encoder", Component::TextEncoder),
    ("text_encoder_2", Component::TextEncoder2),
    ("text_encoder_3", Component::TextEncoder3),
];

/// One checkpoint file to patch, with its matched patches.
struct FilePlan {
    source: PathBuf,
    /// Path relative to the output root (empty for a single-file merge).
    relative: PathBuf,
    base: TensorFile,
    patches: BTreeMap<String, Vec<Patch>>,
}

/// Bakes `loras` into the checkpoint at `base_path` (a file, or a diffusers pipeline folder, in
/// which case `out` is a folder with the same structure).
pub fn merge_into_checkpoint(
    base_path: &Path,
    loras: &[LoraWeight],
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let adapters: Vec<Adapter> = loras
        .iter()
        .map(|l| Adapter::open(&l.path))
        .collect::<Result<_>>()?;

    // The files to patch: the base itself, or each weight file of a pipeline's component folders.
    let mut files: Vec<(PathBuf, PathBuf, Layout)> = Vec::new();
    let pipeline = base_path.is_dir();
    if pipeline {
        for (folder, component) in PIPELINE_COMPONENTS {
            let dir = base_path.join(folder);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut weights: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            weights.sort();
            for w in weights {
                let rel = Path::new(folder).join(w.file_name().expect("file"));
                files.push((w, rel, Layout::DiffusersComponent(*component)));
            }
        }
        if files.is_empty() {
            return Err(Error::bad_file(
                base_path,
                "not a diffusers pipeline folder: no unet/, transformer/ or text_encoder*/ safetensors files",
            ));
        }
    } else {
        files.push((
            base_path.to_path_buf(),
            PathBuf::new(),
            layout_of(base_path),
        ));
    }

    // Match every module, check families and shapes, before anything is written.
    let mut plans = Vec::new();
    let mut matched: Vec<Vec<bool>> = adapters
        .iter()
        .map(|a| vec![false; a.modules.len()])
        .collect();
    let opened: Vec<(PathBuf, PathBuf, Layout, TensorFile)> = files
        .into_iter()
        .map(|(s, r, l)| TensorFile::open(&s).map(|f| (s, r, l, f)))
        .collect::<Result<_>>()?;
    let base_family = opened
        .iter()
        .map(|(_, _, l, f)| checkpoint_family(f.tensors(), *l))
        .find(|f| *f != BaseModel::Unknown)
        .unwrap_or(BaseModel::Unknown);
    for (adapter, lw) in adapters.iter().zip(loras) {
        let fam = family::detect(adapter.file.metadata(), &adapter.modules).base_model;
        if fam != BaseModel::Unknown
            && base_family != BaseModel::Unknown
            && fam != base_family
            && !opts.force
        {
            return Err(Error::Invalid(format!(
                "{}: this is a {} LoRA but {} is a {} checkpoint (use --force to merge anyway)",
                lw.path.display(),
                fam.name(),
                base_path.display(),
                base_family.name()
            )));
        }
    }
    for (source, relative, layout, base) in opened {
        let keymap = KeyMap::build(base.tensors(), layout);
        if keymap.is_empty() || crate::adapter::keys::classify(&base.tensors()[0].name).is_some() {
            return Err(Error::bad_file(
                &source,
                "not a model checkpoint: no UNet, transformer or text-encoder weights found",
            ));
        }
        let mut patches: BTreeMap<String, Vec<Patch>> = BTreeMap::new();
        for (li, (adapter, lw)) in adapters.iter().zip(loras).enumerate() {
            for (mi, m) in adapter.modules.iter().enumerate() {
                if let Some(c) = component_of(layout) {
                    if m.component != c {
                        continue;
                    }
                }
                let Some(target) = keymap.lookup(m) else {
                    continue;
                };
                check_fits(&base, target, m, &lw.path)?;
                matched[li][mi] = true;
                let multiplier = lw.multiplier(m.component);
                patches
                    .entry(target.weight.clone())
                    .or_default()
                    .push(Patch {
                        lora: li,
                        module: mi,
                        rows: target.rows.clone(),
                        multiplier,
                        bias: false,
                    });
                let has_bias_delta =
                    m.tensor(Role::DiffBias).is_some() || m.tensor(Role::NormBias).is_some();
                if has_bias_delta {
                    let Some(bias) = &target.bias else {
                        return Err(Error::Invalid(format!(
                            "{}: module '{}' changes a bias, but '{}' has none in {}",
                            lw.path.display(),
                            m.name,
                            target.weight,
                            source.display()
                        )));
                    };
                    patches.entry(bias.clone()).or_default().push(Patch {
                        lora: li,
                        module: mi,
                        rows: target.rows.clone(),
                        multiplier,
                        bias: true,
                    });
                }
            }
        }
        plans.push(FilePlan {
            source,
            relative,
            base,
            patches,
        });
    }

    let mut report = MergeReport {
        base_family: Some(base_family),
        ..Default::default()
    };
    for (li, (adapter, lw)) in adapters.iter().zip(loras).enumerate() {
        let unmatched: Vec<String> = adapter
            .modules
            .iter()
            .zip(&matched[li])
            .filter(|(_, hit)| !**hit)
            .map(|(m, _)| m.name.clone())
            .collect();
        let hits = adapter.modules.len() - unmatched.len();
        if hits == 0 {
            return Err(Error::Invalid(format!(
                "{}: none of its {} modules matched anything in {}; nothing was written",
                lw.path.display(),
                adapter.modules.len(),
                base_path.display()
            )));
        }
        if opts.strict && !unmatched.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: {} of {} LoRA modules matched nothing in {} (first: {}); nothing was written",
                lw.path.display(),
                unmatched.len(),
                adapter.modules.len(),
                base_path.display(),
                unmatched
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        report.loras.push((lw.path.clone(), hits, unmatched));
    }

    let mut inputs = vec![base_path.to_path_buf()];
    inputs.extend(loras.iter().map(|l| l.path.clone()));
    let write_opts = WriteOptions {
        force: opts.force,
        inputs,
    };
    let record = merge_record(loras, &adapters)?;
    if pipeline {
        let staging = StagingDir::create(out, &write_opts)?;
        copy_tree(base_path, staging.path(), &plans)?;
        for plan in &plans {
            let target = staging.path().join(&plan.relative);
            let s = write_merged(
                plan,
                &target,
                &record,
                &adapters,
                opts,
                &WriteOptions::default(),
            )?;
            report.output_bytes += s.0;
            report.tensors_changed += s.1;
            report.tensors_total += plan.base.tensors().len();
        }
        staging.commit()?;
    } else {
        let plan = &plans[0];
        let s = write_merged(plan, out, &record, &adapters, opts, &write_opts)?;
        report.output_bytes = s.0;
        report.tensors_changed = s.1;
        report.tensors_total = plan.base.tensors().len();
    }
    Ok(report)
}

/// Streams one patched file: returns (bytes written, tensors changed).
fn write_merged(
    plan: &FilePlan,
    out: &Path,
    record: &str,
    adapters: &[Adapter],
    opts: &MergeOptions,
    write_opts: &WriteOptions,
) -> Result<(u64, usize)> {
    let base = &plan.base;
    let specs: Vec<TensorSpec> = base
        .tensors()
        .iter()
        .map(|t| TensorSpec::cast_from(t, opts.dtype))
        .collect();
    let mut metadata = base.metadata().clone();
    metadata.insert("loratool.merged_loras".into(), record.to_string());
    let mut writer = SafetensorsWriter::create(out, &metadata, specs.clone(), write_opts)?;
    let window = opts.window_bytes.max(64 << 20);
    let infos = base.tensors();
    let mut start = 0;
    while start < infos.len() {
        // A window: consecutive tensors whose f32 working size fits the budget (at least one).
        let mut end = start;
        let mut bytes = 0usize;
        while end < infos.len() {
            let touched =
                plan.patches.contains_key(&infos[end].name) || specs[end].dtype != infos[end].dtype;
            let cost = if touched { infos[end].numel() * 8 } else { 0 };
            if end > start && bytes + cost > window {
                break;
            }
            bytes += cost;
            end += 1;
        }
        let produced: Vec<Option<Vec<u8>>> = (start..end)
            .into_par_iter()
            .map(|i| {
                produce(
                    base,
                    i,
                    &specs[i],
                    plan.patches.get(&infos[i].name),
                    adapters,
                )
            })
            .collect::<Result<_>>()?;
        for (i, bytes) in (start..end).zip(produced) {
            match bytes {
                Some(b) => writer.write_tensor(&infos[i].name, &b)?,
                None => {
                    let raw = base.raw_bytes(&infos[i].name)?;
                    writer.write_tensor(&infos[i].name, &raw)?;
                }
            }
        }
        base.release_tensor_pages(start, end - 1);
        start = end;
    }
    let summary = writer.finish()?;
    Ok((summary.bytes, plan.patches.len()))
}

/// A folder output assembled beside its target and renamed into place only when complete.
struct StagingDir {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
}

impl StagingDir {
    fn create(target: &Path, opts: &WriteOptions) -> Result<StagingDir> {
        crate::tensors::writer::check_output_path(
            target,
            &WriteOptions {
                force: false,
                ..opts.clone()
            },
        )
        .or_else(|e| {
            if opts.force && target.is_dir() {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let temp = parent.join(format!(".{name}.loratool-{}.tmp", std::process::id()));
        std::fs::create_dir(&temp).map_err(|e| Error::io(target, e))?;
        Ok(StagingDir {
            target: target.to_path_buf(),
            temp,
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.temp
    }

    fn commit(mut self) -> Result<()> {
        if self.target.is_dir() {
            std::fs::remove_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

/// Copies every file of a pipeline folder except the weight files that will be rewritten.
fn copy_tree(from: &Path, to: &Path, plans: &[FilePlan]) -> Result<()> {
    let rewritten: Vec<&Path> = plans.iter().map(|p| p.source.as_path()).collect();
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            copy_tree(&src, &dst, plans)?;
        } else if !rewritten.contains(&src.as_path()) {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

/// The new bytes of tensor `i`, or `None` when it is copied unchanged.
fn produce(
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: Option<&Vec<Patch>>,
    adapters: &[Adapter],
) -> Result<Option<Vec<u8>>> {
    let info = &base.tensors()[i];
    if patches.is_none() && spec.dtype == info.dtype {
        return Ok(None);
    }
    let mut w = base.read_f32(&info.name)?;
    for p in patches.into_iter().flatten() {
        let adapter = &adapters[p.lora];
        let m = &adapter.modules[p.module];
        apply_patch(&mut w, p, m, adapter)?;
    }
    let bytes = spec.dtype.encode_f32(&w.data).ok_or_else(|| {
        Error::bad_tensor(
            base.path(),
            &info.name,
            format!("cannot store as {}", spec.dtype),
        )
    })?;
    Ok(Some(bytes))
}

fn apply_patch(w: &mut Tensor, p: &Patch, m: &AdapterModule, adapter: &Adapter) -> Result<()> {
    let file = &adapter.file;
    let cols = w.cols();
    let rows = p.rows.clone().unwrap_or(0..w.rows());
    let slice_shape = {
        let mut s = w.shape.clone();
        if !s.is_empty() {
            s[0] = rows.len();
        }
        s
    };
    let range = rows.start * cols..rows.end * cols;
    if p.bias {
        let d = delta::bias_delta(m, file)?
            .ok_or_else(|| Error::Invalid(format!("module '{}' has no bias delta", m.name)))?;
        if d.numel() != range.len() {
            return Err(Error::Invalid(format!(
                "{}: bias delta of '{}' has {} values, the bias {}",
                file.path().display(),
                m.name,
                d.numel(),
                range.len()
            )));
        }
        for (x, dx) in w.data[range].iter_mut().zip(&d.data) {
            *x += p.multiplier * dx;
        }
        return Ok(());
    }
    // Kinds that only add to the weight are applied in place, without copying the weight.
    let additive = matches!(
        m.kind,
        ModuleKind::Lora
            | ModuleKind::Loha
            | ModuleKind::Lokr
            | ModuleKind::Full
            | ModuleKind::Norm
    ) && !m.dora;
    if additive {
        let d = delta::delta(m, file)?;
        if d.numel() != range.len() {
            return Err(Error::Invalid(format!(
                "module '{}' of {} has shape {:?}, which does not fit the weight's shape {:?}",
                m.name,
                file.path().display(),
                d.shape,
                slice_shape
            )));
        }
        for (x, dx) in w.data[range].iter_mut().zip(&d.data) {
            *x += p.multiplier * dx;
        }
        return Ok(());
    }
    let slice = Tensor::new(slice_shape, w.data[range.clone()].to_vec());
    let merged = delta::apply(m, file, &slice, p.multiplier)?;
    w.data[range].copy_from_slice(&merged.data);
    Ok(())
}

/// Refuses a module whose delta cannot land on its target.
fn check_fits(base: &TensorFile, target: &Target, m: &AdapterModule, lora: &Path) -> Result<()> {
    let info = base
        .get(&target.weight)
        .expect("key map only names tensors of the checkpoint");
    let rows = target
        .rows
        .as_ref()
        .map(|r| r.len())
        .unwrap_or(info.shape[0]);
    let per_row = info.numel() / info.shape[0].max(1);
    let numel = rows * per_row;
    let fits = match m.kind {
        ModuleKind::Ia3 => {
            let n: usize = m.shape.iter().product();
            n == rows || info.shape.get(1) == Some(&n)
        }
        ModuleKind::Oft | ModuleKind::Boft => m.shape[0] == rows,
        _ => m.shape.iter().product::<usize>() == numel,
    };
    if !fits {
        let mut target_shape = info.shape.clone();
        target_shape[0] = rows;
        return Err(Error::Invalid(format!(
            "{}: module '{}' has shape {:?}, which does not fit '{}' {:?} in {}",
            lora.display(),
            m.name,
            m.shape,
            target.weight,
            target_shape,
            base.path().display()
        )));
    }
    Ok(())
}

/// What was merged (file names, weights, AutoV3 hashes), recorded in the output's metadata
/// under `loratool.merged_loras`.
fn merge_record(loras: &[LoraWeight], adapters: &[Adapter]) -> Result<String> {
    let mut record = Vec::new();
    for (lw, a) in loras.iter().zip(adapters) {
        let autov3 = match a.file.as_safetensors() {
            Some(s) => hash_file(&lw.path, Some(s.data_start()))?.autov3,
            None => None,
        };
        record.push(serde_json::json!({
            "file": lw.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "text_encoder_weight": lw.text_encoder,
            "unet_weight": lw.unet,
            "autov3": autov3,
        }));
    }
    Ok(serde_json::to_string(&record).expect("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_weights_parse_like_a1111() {
        let p = |s: &str| LoraWeight::parse(s).unwrap();
        assert_eq!(
            p("a.safetensors"),
            LoraWeight {
                path: "a.safetensors".into(),
                text_encoder: 1.0,
                unet: 1.0
            }
        );
        assert_eq!(p("a.safetensors:0.7").unet, 0.7);
        assert_eq!(p("a.safetensors:-0.5").text_encoder, -0.5);
        let both = p("a.safetensors:0.2:0.9");
        assert_eq!((both.text_encoder, both.unet), (0.2, 0.9));
        // Colons inside the path stay in the path.
        let c = p("C:/loras/x.safetensors:0.5");
        assert_eq!(c.path, PathBuf::from("C:/loras/x.safetensors"));
        assert_eq!(c.unet, 0.5);
        assert_eq!(
            p("dir:with:colons/x.safetensors").path,
            PathBuf::from("dir:with:colons/x.safetensors")
        );
        assert!(LoraWeight::parse(":0.5").is_err());
    }
}

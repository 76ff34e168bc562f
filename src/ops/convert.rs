//! `loratool convert`: LoRA files between the kohya and peft/diffusers dialects with ΔW kept
//! identical, and legacy pickles (`.ckpt`/`.pt`/`.bin`, LoRAs or checkpoints) to safetensors.

use crate::adapter::keys::Role;
use crate::adapter::kohya_metadata::{self, NetworkShape};
use crate::adapter::{Adapter, AdapterModule, Format, ModuleKind};
use crate::family;
use crate::family::kohya_names::{kohya_to_dotted, module_kohya_name};
use crate::family::Component;
use crate::tensors::placed::{PlacedWriter, Windows};
use crate::tensors::writer::{write_all, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor, TensorFile};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    /// `lora_unet_…` / `lora_te…_` names, `.lora_down/.lora_up/.alpha` (A1111, ComfyUI, kohya).
    Kohya,
    /// diffusers `save_lora_weights` layout: `unet.…lora_A.weight` + `lora_adapter_metadata`.
    Peft,
}

#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub dtype: Option<Dtype>,
    pub force: bool,
}

/// Rewrites a tensor file as safetensors: every tensor kept (float tensors optionally cast),
/// streamed like a merge ([`PlacedWriter`]): windows of about 32 MB of input, tensors in parallel,
/// a cast tensor re-encoded in chunks written as they are made, unchanged ones copied in the
/// kernel, the input's mapped pages released after each window. This is how pickles become
/// safetensors.
pub fn convert_container(input: &Path, out: &Path, opts: &ConvertOptions) -> Result<usize> {
    let file = TensorFile::open(input)?;
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec::cast_from(t, opts.dtype))
        .collect();
    let write_opts = WriteOptions {
        force: opts.force,
        inputs: vec![input.to_path_buf()],
    };
    let count = specs.len();
    let windows = Windows::new(
        file.tensors()
            .iter()
            .map(|t| t.numel() * t.dtype.size().unwrap_or(1))
            .collect(),
        32 << 20,
    );
    let mut w = PlacedWriter::create(out, file.metadata(), specs, &write_opts)?;
    for (start, end) in windows {
        (start..end)
            .into_par_iter()
            .try_for_each(|i| write_converted_tensor(&file, &w, i))?;
        file.release_tensor_pages(start, end - 1);
        w.written_up_to(end);
    }
    w.finish()?;
    Ok(count)
}

/// Tensor `i` of `file` into `w`: copied when its dtype stays, else decoded and encoded in
/// chunks of 256 Ki elements, each written at once.
fn write_converted_tensor(file: &TensorFile, w: &PlacedWriter, i: usize) -> Result<()> {
    let (t, spec) = (&file.tensors()[i], &w.specs()[i]);
    if spec.dtype == t.dtype {
        return match file.as_safetensors().and_then(|s| s.tensor_location(i)) {
            Some((src, offset, len)) => w.copy_tensor(i, src, offset, len),
            None => w.write_at(i, 0, &file.raw_bytes(&t.name)?),
        };
    }
    let raw = file.raw_bytes(&t.name)?;
    let (in_size, out_size) = (
        t.dtype.size().expect("a float dtype"),
        spec.dtype.size().expect("a float dtype"),
    );
    const CHUNK: usize = 1 << 18;
    raw.par_chunks(CHUNK * in_size)
        .enumerate()
        .try_for_each(|(c, src)| {
            let bytes = t
                .dtype
                .decode_f32(src)
                .and_then(|v| spec.dtype.encode_f32(&v))
                .ok_or_else(|| {
                    Error::bad_tensor(
                        file.path(),
                        &t.name,
                        format!("cannot store {} as {}", t.dtype, spec.dtype),
                    )
                })?;
            w.write_at(i, c * CHUNK * out_size, &bytes)
        })
}

/// Converts a LoRA file to another dialect. The delta of every module is unchanged: alpha is
/// rewritten so that the target's scale rule (alpha/rank; rsLoRA and peft configs folded in)
/// gives the source's effective scale.
pub fn convert_adapter(
    input: &Path,
    out: &Path,
    to: TargetFormat,
    opts: &ConvertOptions,
) -> Result<usize> {
    let write_opts = WriteOptions::checked(out, opts.force, vec![input.to_path_buf()])?;
    let adapter = Adapter::open(input)?;
    write_converted(&adapter, out, to, opts.dtype, &write_opts)
}

/// Writes a parsed adapter in another dialect (see [`convert_adapter`]); float tensors are stored
/// as `dtype` when given.
pub(crate) fn write_converted(
    adapter: &Adapter,
    out: &Path,
    to: TargetFormat,
    dtype: Option<Dtype>,
    write_opts: &WriteOptions,
) -> Result<usize> {
    let input = adapter.file.path();
    let fam = family::detect(adapter.file.metadata(), &adapter.modules).base_model;
    let file = &adapter.file;
    let dtype_of = |d: Dtype| match dtype {
        Some(o) if d.is_float() => o,
        _ => d,
    };
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let mut push =
        |name: String, t: &Tensor, dtype: Dtype| tensors.push(TensorSpec::encode(name, t, dtype));
    let mut meta = adapter.file.metadata().clone();
    match to {
        TargetFormat::Kohya => {
            for m in &adapter.modules {
                let name = module_kohya_name(m, fam);
                for (role, key) in &m.tensors {
                    if *role == Role::Alpha {
                        continue;
                    }
                    let t = file.read_f32(key)?;
                    let t = if *role == Role::DoraScale && m.format != Format::Kohya {
                        // peft's magnitude is [out]; LyCORIS stores [out, 1(, 1, 1)].
                        let mut shape = vec![t.numel(), 1];
                        shape.extend(std::iter::repeat_n(1, m.shape.len().saturating_sub(2)));
                        t.reshaped(shape)
                    } else {
                        t
                    };
                    let dtype = dtype_of(file.get(key).expect("tensor").dtype);
                    push(format!("{name}.{}", role.kohya_suffix()), &t, dtype);
                }
                if let Some(alpha) = kohya_alpha(m) {
                    push(
                        format!("{name}.alpha"),
                        &Tensor::new(vec![], vec![alpha]),
                        dtype_of(m.dtype),
                    );
                }
            }
            kohya_metadata::set_family(&mut meta, fam);
            kohya_metadata::set_network(&mut meta, &NetworkShape::default());
            kohya_metadata::seal(&mut meta, &tensors);
        }
        TargetFormat::Peft => {
            let names = kohya_to_dotted(fam);
            let mut config: BTreeMap<Component, Vec<(String, usize, f32)>> = BTreeMap::new();
            for m in &adapter.modules {
                let factors = m.plain_factors().filter(|_| !m.dora);
                let Some(factors) = factors else {
                    return Err(Error::Invalid(format!(
                        "{}: module '{}' is {}; the peft format only holds plain LoRA modules (convert to kohya instead)",
                        input.display(),
                        m.name,
                        if m.dora { "DoRA".into() } else if m.kind == ModuleKind::Lora { "a Tucker LoCon".to_string() } else { m.kind.name().to_string() }
                    )));
                };
                let (component, path) = match m.format {
                    Format::Kohya => names.get(&m.name).cloned().ok_or_else(|| {
                        Error::Invalid(format!(
                            "{}: module '{}' is not a module of a known {} model, so its diffusers name is unknown",
                            input.display(),
                            m.name,
                            fam.name()
                        ))
                    })?,
                    _ => (m.component, m.path.clone()),
                };
                let r = factors.rank;
                let prefix = format!("{}.{path}", component.name());
                let down = file.read_f32(factors.down)?;
                let up = file.read_f32(factors.up)?;
                push(format!("{prefix}.lora_A.weight"), &down, dtype_of(m.dtype));
                push(format!("{prefix}.lora_B.weight"), &up, dtype_of(m.dtype));
                config
                    .entry(component)
                    .or_default()
                    .push((path, r, m.scale * r as f32));
            }
            meta.retain(|k, _| k.starts_with("ss_") || k.starts_with("modelspec."));
            kohya_metadata::seal(&mut meta, &tensors);
            meta.insert("format".into(), "pt".into());
            meta.insert("lora_adapter_metadata".into(), peft_metadata(&config));
        }
    }
    write_all(out, &meta, &tensors, write_opts)?;
    Ok(adapter.modules.len())
}

/// The alpha that gives a module its effective scale under kohya's alpha/rank rule.
fn kohya_alpha(m: &AdapterModule) -> Option<f32> {
    match (m.kind, m.rank) {
        (ModuleKind::Lora | ModuleKind::Loha | ModuleKind::Glora, Some(r)) => {
            Some(m.scale * r as f32)
        }
        (ModuleKind::Lokr, Some(r))
            if m.tensor(Role::LokrW1).is_none() || m.tensor(Role::LokrW2).is_none() =>
        {
            Some(m.scale * r as f32)
        }
        _ => m.alpha,
    }
}

/// diffusers' `lora_adapter_metadata`: one LoraConfig per component, keys prefixed by component;
/// the most common rank/alpha are `r`/`lora_alpha`, the rest go to `rank_pattern`/`alpha_pattern`.
fn peft_metadata(config: &BTreeMap<Component, Vec<(String, usize, f32)>>) -> String {
    fn most_common<T: PartialEq + Copy>(v: impl Iterator<Item = T>) -> Option<T> {
        let mut counts: Vec<(T, usize)> = Vec::new();
        for x in v {
            match counts.iter_mut().find(|(k, _)| *k == x) {
                Some((_, n)) => *n += 1,
                None => counts.push((x, 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k)
    }
    let mut obj = serde_json::Map::new();
    for (component, modules) in config {
        let c = component.name();
        let r = most_common(modules.iter().map(|m| m.1)).unwrap_or(1);
        let alpha = most_common(modules.iter().map(|m| m.2)).unwrap_or(r as f32);
        let rank_pattern: serde_json::Map<String, serde_json::Value> = modules
            .iter()
            .filter(|m| m.1 != r)
            .map(|m| (m.0.clone(), m.1.into()))
            .collect();
        let alpha_pattern: serde_json::Map<String, serde_json::Value> = modules
            .iter()
            .filter(|m| m.2 != alpha)
            .map(|m| (m.0.clone(), (m.2 as f64).into()))
            .collect();
        let mut targets: Vec<&str> = modules.iter().map(|m| m.0.as_str()).collect();
        targets.sort();
        targets.dedup();
        obj.insert(format!("{c}.r"), r.into());
        obj.insert(format!("{c}.lora_alpha"), (alpha as f64).into());
        obj.insert(format!("{c}.rank_pattern"), rank_pattern.into());
        obj.insert(format!("{c}.alpha_pattern"), alpha_pattern.into());
        obj.insert(format!("{c}.target_modules"), targets.into());
        obj.insert(format!("{c}.use_rslora"), false.into());
        obj.insert(format!("{c}.use_dora"), false.into());
    }
    serde_json::to_string(&obj).expect("json")
}

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
use crate::linalg::low_rank_add::{self, PackedDown, Term};
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::autov3;
use crate::tensors::staging::{copy_tree, StagingDir};
use crate::tensors::writer::{SafetensorsWriter, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor, TensorFile};
use crate::{linalg, Error, Result};
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
    /// Told the output's data bytes up front, then each tensor's bytes as it is written.
    pub progress: ProgressSink,
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
    for a in &adapters {
        a.check_finite()?;
    }
    let record = spawn_merge_record(loras, &adapters);
    for a in &adapters {
        a.file.release_pages(); // parsing and the finiteness check touched the whole file
    }

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
    let record = record.join().expect("hashing thread does not panic")?;
    opts.progress.start(
        plans
            .iter()
            .flat_map(|p| p.base.tensors())
            .map(|t| TensorSpec::cast_from(t, opts.dtype).byte_len() as u64)
            .sum(),
    );
    if pipeline {
        let staging = StagingDir::create(out, &write_opts)?;
        let rewritten: Vec<&Path> = plans.iter().map(|p| p.source.as_path()).collect();
        copy_tree(base_path, staging.path(), &rewritten)?;
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

/// How one output tensor is produced.
enum Production<'a> {
    /// Untouched and stored as in the base: its bytes are copied (inside the kernel when it can).
    Copy,
    /// Decoded in cache-sized row blocks, each plain LoRA patch added as `up·down` on the block,
    /// and encoded: no full-size f32 copy or dense delta ever exists. Also the path of a tensor
    /// that is only cast to another dtype (no patches).
    Blocks(Vec<&'a Patch>),
    /// Every other case (DoRA, OFT, IA3, LoHa, LoKr, Tucker cores, biases): the whole tensor in
    /// f32 through [`delta::apply`].
    Whole(&'a [Patch]),
}

/// f32 elements per row block of [`Production::Blocks`] (1 MiB): large enough for the
/// matrix-product kernel to run near its peak, small enough to stay in a core's cache
/// (measured in docs/BENCHMARKS.md: 2^16 and 2^20 were slower).
const BLOCK_ELEMS: usize = 1 << 18;

thread_local! {
    /// Each worker thread's f32 row-block buffer, reused for every block it computes.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// True for a patch the row-block path can apply: a plain low-rank LoRA/LoCon without a Tucker
/// core or DoRA magnitude.
fn is_plain_low_rank(p: &Patch, adapters: &[Adapter]) -> bool {
    let m = &adapters[p.lora].modules[p.module];
    !p.bias
        && m.kind == ModuleKind::Lora
        && !m.dora
        && m.tensor(Role::Mid).is_none()
        && m.tensor(Role::Up).is_some()
        && m.tensor(Role::Down).is_some()
}

fn production<'a>(
    info: &crate::tensors::TensorInfo,
    spec: &TensorSpec,
    patches: Option<&'a Vec<Patch>>,
    adapters: &[Adapter],
) -> Production<'a> {
    let floats = info.dtype.is_float() && spec.dtype.is_float();
    match patches {
        None if spec.dtype == info.dtype => Production::Copy,
        None if floats => Production::Blocks(Vec::new()),
        Some(ps) if floats && ps.iter().all(|p| is_plain_low_rank(p, adapters)) => {
            Production::Blocks(ps.iter().collect())
        }
        Some(ps) => Production::Whole(ps),
        None => Production::Whole(&[]),
    }
}

/// Bytes of working memory a tensor takes while its window is computed (mapped input pages plus
/// the encoded output; the whole-tensor path adds an f32 copy and a delta).
fn working_bytes(p: &Production, info: &crate::tensors::TensorInfo, spec: &TensorSpec) -> usize {
    let stored = info.numel() * info.dtype.size().unwrap_or(1);
    match p {
        Production::Copy => 0,
        Production::Blocks(_) => stored + spec.byte_len(),
        Production::Whole(_) => stored + spec.byte_len() + info.numel() * 8,
    }
}

/// A computed window on its way to the writer thread: per tensor, its bytes or `None` (copied).
type Batch = Vec<(usize, Option<Vec<u8>>)>;

/// Streams one patched file: returns (bytes written, tensors changed).
///
/// Windows of consecutive tensors, bounded by [`MergeOptions::window_bytes`], are computed in
/// parallel while a writer thread writes the previous window, so computation, the copy into the
/// page cache and (through the writer's early writeback) the disk writes overlap.
fn write_merged(
    plan: &FilePlan,
    out: &Path,
    record: &str,
    adapters: &[Adapter],
    opts: &MergeOptions,
    write_opts: &WriteOptions,
) -> Result<(u64, usize)> {
    let base = &plan.base;
    let infos = base.tensors();
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| TensorSpec::cast_from(t, opts.dtype))
        .collect();
    let productions: Vec<Production> = infos
        .iter()
        .zip(&specs)
        .map(|(info, spec)| production(info, spec, plan.patches.get(&info.name), adapters))
        .collect();
    let mut metadata = base.metadata().clone();
    metadata.insert("loratool.merged_loras".into(), record.to_string());
    let writer = SafetensorsWriter::create(out, &metadata, specs.clone(), write_opts)?;
    let window = opts.window_bytes.max(1);

    let (written, computed) = std::thread::scope(|scope| {
        // One window in the channel, one being written, one being computed.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
        let (progress, specs) = (&opts.progress, &specs);
        let writer_thread = scope.spawn(move || -> Result<SafetensorsWriter> {
            let mut writer = writer;
            for batch in rx {
                for (i, bytes) in batch {
                    let name = &infos[i].name;
                    match (
                        bytes,
                        base.as_safetensors().and_then(|s| s.tensor_location(i)),
                    ) {
                        (Some(b), _) => {
                            writer.write_tensor(name, &b)?;
                        }
                        (None, Some((file, offset, len))) => {
                            writer.copy_tensor(name, file, offset, len)?
                        }
                        (None, None) => writer.write_tensor(name, &base.raw_bytes(name)?)?,
                    }
                    progress.advance(specs[i].byte_len() as u64);
                }
            }
            Ok(writer)
        });
        let computed = (|| -> Result<()> {
            let mut start = 0;
            while start < infos.len() {
                // A window: consecutive tensors whose working memory fits the budget (at least one).
                let mut end = start;
                let mut bytes = 0usize;
                while end < infos.len() {
                    let cost = working_bytes(&productions[end], &infos[end], &specs[end]);
                    if end > start && bytes + cost > window {
                        break;
                    }
                    bytes += cost;
                    end += 1;
                }
                let batch: Batch = (start..end)
                    .into_par_iter()
                    .map(|i| {
                        let bytes = match &productions[i] {
                            Production::Copy => None,
                            Production::Blocks(ps) => {
                                Some(produce_blocks(base, i, &specs[i], ps, adapters)?)
                            }
                            Production::Whole(ps) => {
                                Some(produce_whole(base, i, &specs[i], ps, adapters)?)
                            }
                        };
                        Ok((i, bytes))
                    })
                    .collect::<Result<_>>()?;
                // The window's input pages are done with; the writer copies untouched tensors
                // by file offset, not through the mapping.
                base.release_tensor_pages(start, end - 1);
                for a in adapters {
                    a.file.release_pages();
                }
                if tx.send(batch).is_err() {
                    break; // the writer failed; its error is reported below
                }
                start = end;
            }
            Ok(())
        })();
        drop(tx);
        let written = writer_thread.join().expect("writer thread does not panic");
        (written, computed)
    });
    let writer = written?;
    computed?;
    let summary = writer.finish()?;
    Ok((summary.bytes, plan.patches.len()))
}

/// One plain LoRA patch ready for row blocks, in the form the block code uses.
struct LowRankPatch {
    /// `up` rows of the covered range, `[rows.len(), rank]`; already multiplied by the patch's
    /// scale (user multiplier × the module's scale) when `down` is packed for the fused kernel.
    up: Vec<f32>,
    down: Factors,
    rank: usize,
    rows: std::ops::Range<usize>,
}

enum Factors {
    /// For [`low_rank_add::add_low_rank`] (the scale is inside `up`).
    Packed(PackedDown),
    /// `down` as `[rank, cols]` row-major and the scale, for decode → [`linalg::add_matmul`] →
    /// encode.
    Plain { down: Vec<f32>, alpha: f32 },
}

fn low_rank_patch(
    p: &Patch,
    adapters: &[Adapter],
    rows: usize,
    cols: usize,
    fused: bool,
) -> Result<LowRankPatch> {
    let adapter = &adapters[p.lora];
    let m = &adapter.modules[p.module];
    let file = &adapter.file;
    let up_key = m.tensor(Role::Up).expect("checked by is_plain_low_rank");
    let down_key = m.tensor(Role::Down).expect("checked by is_plain_low_rank");
    let up = file.read_f32(up_key)?;
    let down = file.read_f32(down_key)?;
    let range = p.rows.clone().unwrap_or(0..rows);
    let rank = up.numel() / range.len().max(1);
    if up.numel() != range.len() * rank || down.numel() != rank * cols {
        return Err(Error::bad_tensor(
            file.path(),
            &m.name,
            format!(
                "factors {:?} and {:?} do not give the {} × {} rows this module patches",
                up.shape,
                down.shape,
                range.len(),
                cols
            ),
        ));
    }
    let alpha = p.multiplier * m.scale;
    let (up, down) = if fused {
        let scaled = up.data.iter().map(|u| u * alpha).collect();
        (
            scaled,
            Factors::Packed(PackedDown::new(&down.data, rank, cols)),
        )
    } else {
        (
            up.data,
            Factors::Plain {
                down: down.data,
                alpha,
            },
        )
    };
    Ok(LowRankPatch {
        up,
        down,
        rank,
        rows: range,
    })
}

/// The new bytes of tensor `i` through row blocks (see [`Production::Blocks`]).
fn produce_blocks(
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: &[&Patch],
    adapters: &[Adapter],
) -> Result<Vec<u8>> {
    let info = &base.tensors()[i];
    let fused = low_rank_add::supported(info.dtype, spec.dtype);
    produce_blocks_with(base, i, spec, patches, adapters, fused)
}

/// [`produce_blocks`] through the fused kernel or (`fused` false) through faer.
fn produce_blocks_with(
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: &[&Patch],
    adapters: &[Adapter],
    fused: bool,
) -> Result<Vec<u8>> {
    let info = &base.tensors()[i];
    let rows = info.shape.first().copied().unwrap_or(1).max(1);
    let cols = info.numel() / rows;
    let patches: Vec<LowRankPatch> = patches
        .iter()
        .map(|p| low_rank_patch(p, adapters, rows, cols, fused))
        .collect::<Result<_>>()?;
    let input = base.raw_bytes(&info.name)?;
    let in_size = info.dtype.size().expect("float dtype");
    let out_size = spec.dtype.size().expect("float dtype");
    let n = spec.byte_len();
    let block_rows = (BLOCK_ELEMS / cols.max(1)).max(1);
    let block_bytes = (block_rows * cols * out_size).max(1);
    let source = |b: usize, len: usize| {
        let r0 = b * block_rows;
        let r1 = r0 + len / out_size / cols.max(1);
        (&input[r0 * cols * in_size..r1 * cols * in_size], r0..r1)
    };
    if !fused {
        let mut output = vec![0u8; n];
        output
            .par_chunks_mut(block_bytes)
            .enumerate()
            .for_each(|(b, out)| {
                let (src, rows) = source(b, out.len());
                faer_block(src, info.dtype, out, spec.dtype, rows, cols, &patches);
            });
        return Ok(output);
    }
    // Left uninitialised: zeroing gigabytes of output buffers only to overwrite them cost 3.6–5 %
    // of a merge's CPU time (docs/BENCHMARKS.md, "The faer route it replaced").
    let mut output = Vec::with_capacity(n);
    output.spare_capacity_mut()[..n]
        .par_chunks_mut(block_bytes)
        .enumerate()
        .for_each(|(b, out)| {
            let (src, rows) = source(b, out.len());
            fused_block(src, info.dtype, out, spec.dtype, rows, cols, &patches);
        });
    // SAFETY: fused_block writes every byte of every chunk, and the chunks cover 0..n.
    unsafe { output.set_len(n) };
    Ok(output)
}

/// Rows `block` of a tensor through the fused kernel: the block is cut where the set of patches
/// covering a row changes (row slices of fused q/k/v), and each piece gets its own terms.
fn fused_block(
    src: &[u8],
    in_dtype: Dtype,
    out: &mut [std::mem::MaybeUninit<u8>],
    out_dtype: Dtype,
    block: std::ops::Range<usize>,
    cols: usize,
    patches: &[LowRankPatch],
) {
    let (in_size, out_size) = (in_dtype.size().unwrap(), out_dtype.size().unwrap());
    let mut cuts: Vec<usize> = patches
        .iter()
        .flat_map(|p| [p.rows.start, p.rows.end])
        .filter(|r| block.contains(r))
        .chain([block.start, block.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    for piece in cuts.windows(2) {
        let (a, e) = (piece[0], piece[1]);
        let terms: Vec<Term> = patches
            .iter()
            .filter(|p| p.rows.start <= a && e <= p.rows.end)
            .map(|p| Term {
                up: &p.up[(a - p.rows.start) * p.rank..(e - p.rows.start) * p.rank],
                down: match &p.down {
                    Factors::Packed(d) => d,
                    Factors::Plain { .. } => unreachable!("fused blocks pack their factors"),
                },
            })
            .collect();
        let (i0, i1) = ((a - block.start) * cols, (e - block.start) * cols);
        let src = &src[i0 * in_size..i1 * in_size];
        let dst = &mut out[i0 * out_size..i1 * out_size];
        if terms.is_empty() {
            // Untouched rows keep their exact bits (no `+ 0.0`, which would turn -0 into +0).
            convert_rows(src, in_dtype, dst, out_dtype);
        } else {
            low_rank_add::add_low_rank(src, in_dtype, dst, out_dtype, cols, &terms);
        }
    }
}

/// Rows of a tensor decoded into a per-thread f32 buffer, patched by faer products, encoded.
fn faer_block(
    src: &[u8],
    in_dtype: Dtype,
    out: &mut [u8],
    out_dtype: Dtype,
    block: std::ops::Range<usize>,
    cols: usize,
    patches: &[LowRankPatch],
) {
    BLOCK.with_borrow_mut(|scratch| {
        let n = block.len() * cols;
        if scratch.len() < n {
            scratch.resize(n, 0.0);
        }
        let values = &mut scratch[..n];
        in_dtype.decode_into(src, values).expect("float dtype");
        for p in patches {
            let (a, e) = (block.start.max(p.rows.start), block.end.min(p.rows.end));
            if a >= e {
                continue;
            }
            let Factors::Plain { down, alpha } = &p.down else {
                unreachable!("faer blocks keep plain factors")
            };
            let up = &p.up[(a - p.rows.start) * p.rank..(e - p.rows.start) * p.rank];
            let dst = &mut values[(a - block.start) * cols..(e - block.start) * cols];
            linalg::add_matmul(dst, up, e - a, p.rank, down, cols, *alpha);
        }
        out_dtype.encode_into(values, out).expect("float dtype");
    })
}

/// Stored values re-encoded as another float type (bytes copied when the type is the same).
fn convert_rows(
    src: &[u8],
    in_dtype: Dtype,
    dst: &mut [std::mem::MaybeUninit<u8>],
    out_dtype: Dtype,
) {
    if in_dtype == out_dtype {
        dst.write_copy_of_slice(src);
        return;
    }
    let n = dst.len() / out_dtype.size().expect("float dtype");
    let mut values = vec![0f32; n];
    in_dtype.decode_into(src, &mut values).expect("float dtype");
    let encoded = out_dtype.encode_f32(&values).expect("float dtype");
    dst.write_copy_of_slice(&encoded);
}

/// The new bytes of tensor `i` through one f32 copy of the whole tensor (see
/// [`Production::Whole`]).
fn produce_whole(
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: &[Patch],
    adapters: &[Adapter],
) -> Result<Vec<u8>> {
    let info = &base.tensors()[i];
    let mut w = base.read_f32(&info.name)?;
    for p in patches {
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
    Ok(bytes)
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
/// under `loratool.merged_loras`. Hashing reads every LoRA once, so it runs on its own thread
/// while the checkpoint is matched (see [`merge_into_checkpoint`]).
fn spawn_merge_record(
    loras: &[LoraWeight],
    adapters: &[Adapter],
) -> std::thread::JoinHandle<Result<String>> {
    let jobs: Vec<(LoraWeight, Option<u64>)> = loras
        .iter()
        .zip(adapters)
        .map(|(lw, a)| (lw.clone(), a.file.as_safetensors().map(|s| s.data_start())))
        .collect();
    std::thread::spawn(move || {
        let mut record = Vec::new();
        for (lw, data_start) in jobs {
            let autov3 = match data_start {
                Some(start) => Some(autov3(&lw.path, start)?),
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::writer::build_header;

    /// A safetensors image of f32 values stored as `dtype`.
    fn safetensors(tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(n, d, s, _)| TensorSpec {
                name: n.to_string(),
                dtype: *d,
                shape: s.clone(),
            })
            .collect();
        let header = build_header(&BTreeMap::new(), &specs);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        for (_, d, _, v) in tensors {
            bytes.extend(d.encode_f32(v).unwrap());
        }
        bytes
    }

    fn pseudo_random(n: usize, seed: u32, amplitude: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * amplitude
            })
            .collect()
    }

    /// The row-block path (several blocks per tensor, patches on row slices that start and end
    /// inside blocks, two LoRAs on the same rows) gives the whole-tensor path's result, for f16
    /// and bf16 storage and a cast to f32.
    #[test]
    fn row_blocks_match_the_whole_tensor_path() {
        let (rows, cols, rank) = (900, 700, 4); // 630,000 elements: 3 blocks of 374 rows
        let base_vals = pseudo_random(rows * cols, 1, 0.1);
        let slices = [100..500, 0..rows, 374..375];
        let mut lora_tensors = Vec::new();
        for (k, r) in slices.iter().enumerate() {
            let name = format!("lora_unet_m{k}");
            lora_tensors.push((
                format!("{name}.lora_up.weight"),
                vec![r.len(), rank],
                pseudo_random(r.len() * rank, 10 + k as u32, 0.5),
            ));
            lora_tensors.push((
                format!("{name}.lora_down.weight"),
                vec![rank, cols],
                pseudo_random(rank * cols, 20 + k as u32, 0.5),
            ));
            lora_tensors.push((format!("{name}.alpha"), vec![], vec![2.0]));
        }
        let lora_bytes = safetensors(
            &lora_tensors
                .iter()
                .map(|(n, s, v)| (n.as_str(), Dtype::F32, s.clone(), v.clone()))
                .collect::<Vec<_>>(),
        );
        let adapter = Adapter::from_file(
            TensorFile::from_safetensors_bytes(Path::new("lora"), lora_bytes).unwrap(),
        )
        .unwrap();
        let adapters = [adapter];
        let module = |k: usize| {
            adapters[0]
                .modules
                .iter()
                .position(|m| m.name == format!("lora_unet_m{k}"))
                .unwrap()
        };
        let patches: Vec<Patch> = slices
            .iter()
            .enumerate()
            .map(|(k, r)| Patch {
                lora: 0,
                module: module(k),
                rows: (r.len() != rows).then(|| r.clone()),
                multiplier: [0.8, -0.5, 1.3][k],
                bias: false,
            })
            .collect();
        assert!(patches.iter().all(|p| is_plain_low_rank(p, &adapters)));
        for (stored, out) in [
            (Dtype::F16, Dtype::F16),
            (Dtype::BF16, Dtype::BF16),
            (Dtype::F16, Dtype::F32),
        ] {
            let base = TensorFile::from_safetensors_bytes(
                Path::new("base"),
                safetensors(&[("w", stored, vec![rows, cols], base_vals.clone())]),
            )
            .unwrap();
            let spec = TensorSpec {
                name: "w".into(),
                dtype: out,
                shape: vec![rows, cols],
            };
            let refs: Vec<&Patch> = patches.iter().collect();
            let whole = produce_whole(&base, 0, &spec, &patches, &adapters).unwrap();
            let w = out.decode_f32(&whole).unwrap();
            let kernels = if low_rank_add::supported(stored, out) {
                vec![true, false]
            } else {
                vec![false]
            };
            for fused in kernels {
                let blocks = produce_blocks_with(&base, 0, &spec, &refs, &adapters, fused).unwrap();
                let b = out.decode_f32(&blocks).unwrap();
                // Both round once from f32 sums that differ only in summation order.
                let ulp = if out == Dtype::BF16 {
                    1.0 / 128.0
                } else {
                    1.0 / 1024.0
                };
                let worst = b
                    .iter()
                    .zip(&w)
                    .map(|(x, y)| (x - y).abs() / (y.abs().max(1e-3) * ulp))
                    .fold(0f32, f32::max);
                assert!(worst <= 1.01, "{stored}->{out} fused={fused}: {worst} ulp");
                let changed = b.iter().zip(&base_vals).filter(|(x, y)| x != y).count();
                assert!(
                    changed > rows * cols / 2,
                    "{stored}->{out} fused={fused}: patches were applied"
                );
            }
        }
    }

    /// Rows outside a patch's row slice keep their exact bytes (-0.0 included) on both kernels.
    #[test]
    fn rows_outside_a_slice_keep_their_bytes() {
        let (rows, cols, rank) = (5, 20, 2);
        let mut base_vals = pseudo_random(rows * cols, 3, 0.1);
        base_vals[3 * cols + 1] = -0.0;
        let lora = safetensors(&[
            (
                "lora_unet_q.lora_up.weight",
                Dtype::F32,
                vec![2, rank],
                pseudo_random(2 * rank, 4, 0.5),
            ),
            (
                "lora_unet_q.lora_down.weight",
                Dtype::F32,
                vec![rank, cols],
                pseudo_random(rank * cols, 5, 0.5),
            ),
        ]);
        let adapters = [Adapter::from_file(
            TensorFile::from_safetensors_bytes(Path::new("lora"), lora).unwrap(),
        )
        .unwrap()];
        let patch = Patch {
            lora: 0,
            module: 0,
            rows: Some(0..2),
            multiplier: 1.0,
            bias: false,
        };
        let base = TensorFile::from_safetensors_bytes(
            Path::new("base"),
            safetensors(&[("w", Dtype::F16, vec![rows, cols], base_vals)]),
        )
        .unwrap();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F16,
            shape: vec![rows, cols],
        };
        let stored = base.raw_bytes("w").unwrap();
        for fused in [true, false] {
            if fused && !low_rank_add::supported(Dtype::F16, Dtype::F16) {
                continue;
            }
            let out = produce_blocks_with(&base, 0, &spec, &[&patch], &adapters, fused).unwrap();
            assert_eq!(out[2 * cols * 2..], stored[2 * cols * 2..], "fused={fused}");
            assert_ne!(out[..2 * cols * 2], stored[..2 * cols * 2], "fused={fused}");
        }
    }

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

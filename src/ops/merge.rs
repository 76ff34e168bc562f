//! `loratool merge --base`: bake weighted LoRAs into a checkpoint, streaming.
//!
//! Everything that can fail is checked before the output file is created: every LoRA parses, its
//! family fits the checkpoint (unless forced), every matched module's shape fits its target, and
//! with `strict` every module matches. Then the output header is computed from the base and tensors
//! are produced in the base's order: untouched tensors are copied byte for byte, touched ones are
//! decoded to f32, patched by each LoRA in command-line order, and encoded once. Work is done in
//! windows of bounded size, in parallel inside a window, so peak memory does not grow with the
//! checkpoint.

use crate::family::layout::{Checkpoint, Layout};
use crate::family::{fp8, BaseModel};
use crate::linalg::low_rank_add::{self, PackedDown, Term};
use crate::ops::patch_plan::{patched_rows, LoraWeight, Patch, PatchPlan, PlanOptions};
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::autov3;
use crate::tensors::placed::{PlacedWriter, Windows};
use crate::tensors::staging::{copy_tree, StagingDir};
use crate::tensors::writer::{check_output_folder, check_output_path, TensorSpec, WriteOptions};
use crate::tensors::{fp8_params, Dtype, TensorFile, TensorInfo};
use crate::{linalg, Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Output dtype for float tensors; the base's dtype when `None`. An fp8 type is stored only
    /// where [`fp8::stored_as_fp8`] says (the denoiser's block matrices).
    pub dtype: Option<Dtype>,
    /// Unmatched LoRA modules, and LoRAs whose metadata and keys disagree on the family, are
    /// errors (checked before writing).
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

/// Bakes `loras` into the checkpoint at `base_path` (a file, or a diffusers pipeline folder, in
/// which case `out` is a folder with the same structure).
pub fn merge_into_checkpoint(
    base_path: &Path,
    loras: &[LoraWeight],
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let mut inputs = vec![base_path.to_path_buf()];
    inputs.extend(loras.iter().map(|l| l.path.clone()));
    let write_opts = WriteOptions {
        force: opts.force,
        inputs,
    };
    // The output path is checked before any work; the final step checks again.
    if base_path.is_dir() {
        check_output_folder(out, &write_opts)?;
    } else {
        check_output_path(out, &write_opts)?;
    }
    let record = spawn_merge_record(loras);
    let checkpoint = Checkpoint::open(base_path)?;
    let plan = PatchPlan::build(
        &checkpoint,
        loras,
        &PlanOptions {
            strict: opts.strict,
            any_family: opts.force,
        },
    )?;
    let mut report = MergeReport {
        base_family: Some(plan.family),
        loras: plan
            .matches
            .iter()
            .map(|m| (m.path.clone(), m.matched, m.unmatched.clone()))
            .collect(),
        ..Default::default()
    };
    let record = record.join().expect("hashing thread does not panic")?;
    opts.progress.start(
        checkpoint
            .files
            .iter()
            .flat_map(|f| f.file.tensors().iter().map(|t| (f.layout, t)))
            .map(|(layout, t)| output_spec(t, layout, opts.dtype).byte_len() as u64)
            .sum(),
    );
    if checkpoint.pipeline {
        let staging = StagingDir::create(out, &write_opts)?;
        let rewritten: Vec<&Path> = checkpoint.files.iter().map(|f| f.file.path()).collect();
        copy_tree(base_path, staging.path(), &rewritten)?;
        for (i, cf) in checkpoint.files.iter().enumerate() {
            let target = staging.path().join(&cf.relative);
            let s = write_merged(&plan, i, &target, &record, opts, &WriteOptions::default())?;
            report.output_bytes += s.0;
            report.tensors_changed += s.1;
            report.tensors_total += cf.file.tensors().len();
        }
        staging.commit()?;
    } else {
        let s = write_merged(&plan, 0, out, &record, opts, &write_opts)?;
        report.output_bytes = s.0;
        report.tensors_changed = s.1;
        report.tensors_total = checkpoint.files[0].file.tensors().len();
    }
    Ok(report)
}

/// The output spec of a base tensor: `dtype` for every float tensor, except that an fp8 type goes
/// only to the tensors [`fp8::stored_as_fp8`] names (the denoiser's block matrices); the others
/// keep their dtype.
fn output_spec(info: &TensorInfo, layout: Layout, dtype: Option<Dtype>) -> TensorSpec {
    let cast = dtype.filter(|d| fp8_params(*d).is_none() || fp8::stored_as_fp8(layout, info));
    TensorSpec::cast_from(info, cast)
}

/// How one output tensor is produced.
enum Production<'a> {
    /// Untouched and stored as in the base: its bytes are copied (inside the kernel when it can).
    Copy,
    /// Decoded in cache-sized row blocks, each plain LoRA patch added as `up·down` on the block,
    /// and encoded: no full-size f32 copy or dense delta ever exists. Also the path of a tensor
    /// that is only cast to another dtype (no patches).
    Blocks(Vec<&'a Patch>),
    /// Every other case (DoRA, OFT, IA3, LoHa, LoKr, Tucker cores, biases): the tensor in f32
    /// through [`delta::apply`] — only the patched rows of a fused q/k/v weight.
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

fn production<'a>(
    info: &TensorInfo,
    spec: &TensorSpec,
    patches: Option<&'a Vec<Patch>>,
    plan: &PatchPlan,
) -> Production<'a> {
    let floats = info.dtype.is_float() && spec.dtype.is_float();
    match patches {
        None if spec.dtype == info.dtype => Production::Copy,
        None if floats => Production::Blocks(Vec::new()),
        Some(ps) if floats && ps.iter().all(|p| plan.is_plain_low_rank(p)) => {
            Production::Blocks(ps.iter().collect())
        }
        Some(ps) => Production::Whole(ps),
        None => Production::Whole(&[]),
    }
}

/// Bytes of working memory a tensor takes while its window is computed: its mapped input pages
/// (row blocks are written as they are computed); the whole-tensor path adds the encoded output,
/// an f32 copy and a delta.
fn working_bytes(p: &Production, info: &TensorInfo, spec: &TensorSpec) -> usize {
    let stored = info.numel() * info.dtype.size().unwrap_or(1);
    match p {
        Production::Copy => 0,
        Production::Blocks(_) => stored,
        Production::Whole(_) => stored + spec.byte_len() + info.numel() * 8,
    }
}

/// Writes one patched file: returns (bytes written, tensors changed).
///
/// Windows of consecutive tensors, bounded by [`MergeOptions::window_bytes`] of input, are done
/// in parallel: untouched tensors are copied in the kernel, patched ones computed in row blocks,
/// each block written to its place in the file as soon as it is computed, while it is still in
/// the core's cache ([`PlacedWriter`]). The input pages of a finished window are released and its
/// disk writes started (early writeback), so memory stays flat and the disk works alongside.
fn write_merged(
    plan: &PatchPlan,
    file: usize,
    out: &Path,
    record: &str,
    opts: &MergeOptions,
    write_opts: &WriteOptions,
) -> Result<(u64, usize)> {
    let base = &plan.checkpoint.files[file].file;
    let patches = &plan.files[file];
    let infos = base.tensors();
    let layout = plan.checkpoint.files[file].layout;
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| output_spec(t, layout, opts.dtype))
        .collect();
    let productions: Vec<Production> = infos
        .iter()
        .zip(&specs)
        .map(|(info, spec)| production(info, spec, patches.get(&info.name), plan))
        .collect();
    let windows = Windows::new(
        productions
            .iter()
            .zip(infos.iter().zip(&specs))
            .map(|(p, (info, spec))| working_bytes(p, info, spec))
            .collect(),
        opts.window_bytes,
    );
    let mut metadata = base.metadata().clone();
    metadata.insert("loratool.merged_loras".into(), record.to_string());
    let mut writer = PlacedWriter::create(out, &metadata, specs, write_opts)?;
    for (start, end) in windows {
        let w = &writer;
        (start..end)
            .into_par_iter()
            .try_for_each(|i| -> Result<()> {
                let spec = &w.specs()[i];
                match &productions[i] {
                    Production::Copy => {
                        match base.as_safetensors().and_then(|s| s.tensor_location(i)) {
                            Some((file, offset, len)) => w.copy_tensor(i, file, offset, len),
                            None => w.write_at(i, 0, &base.raw_bytes(&infos[i].name)?),
                        }
                    }
                    Production::Blocks(ps) => {
                        let fused = low_rank_add::supported(infos[i].dtype, spec.dtype);
                        let job = BlockJob::new(plan, base, i, spec.dtype, ps, fused)?;
                        (0..job.blocks()).into_par_iter().try_for_each(|b| {
                            OUT_BLOCK.with_borrow_mut(|buf| {
                                let out = job.fill_buffer(b, buf);
                                w.write_at(i, b * job.block_bytes, out)
                            })
                        })
                    }
                    Production::Whole(ps) => {
                        w.write_at(i, 0, &produce_whole(plan, base, i, spec, ps)?)
                    }
                }
            })?;
        // The window's input pages are done with (untouched tensors are copied by file offset,
        // not through the mapping).
        base.release_tensor_pages(start, end - 1);
        for a in &plan.adapters {
            a.file.release_pages();
        }
        writer.written_up_to(end);
        let bytes: usize = writer.specs()[start..end]
            .iter()
            .map(|s| s.byte_len())
            .sum();
        opts.progress.advance(bytes as u64);
    }
    Ok((writer.finish()?, patches.len()))
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
    plan: &PatchPlan,
    p: &Patch,
    rows: usize,
    cols: usize,
    fused: bool,
) -> Result<LowRankPatch> {
    let (adapter, m) = plan.module(p);
    let file = &adapter.file;
    let factors = m.plain_factors().expect("checked by is_plain_low_rank");
    let up = file.read_f32(factors.up)?;
    let down = file.read_f32(factors.down)?;
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

/// Tensor `i` through row blocks (see [`Production::Blocks`]), in memory: the fused kernel, or
/// (`fused` false) decode → faer → encode. The tests compare it with the whole-tensor path.
#[cfg(test)]
fn produce_blocks_with(
    plan: &PatchPlan,
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: &[&Patch],
    fused: bool,
) -> Result<Vec<u8>> {
    let n = spec.byte_len();
    // Left uninitialised: zeroing gigabytes of output buffers only to overwrite them cost 3.6–5 %
    // of a merge's CPU time (docs/BENCHMARKS.md, "The faer route it replaced").
    let mut output = Vec::with_capacity(n);
    BlockJob::new(plan, base, i, spec.dtype, patches, fused)?
        .fill_all(&mut output.spare_capacity_mut()[..n]);
    // SAFETY: fill_all wrote every byte of 0..n.
    unsafe { output.set_len(n) };
    Ok(output)
}

thread_local! {
    /// Each worker thread's encoded output block, written to the file right after it is filled.
    static OUT_BLOCK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tensor `i` of `base` with plain low-rank patches added, encoded as `out_dtype`, cut into row
/// blocks of about [`BLOCK_ELEMS`] elements that can be computed independently.
struct BlockJob<'a> {
    patches: Vec<LowRankPatch>,
    input: std::borrow::Cow<'a, [u8]>,
    in_dtype: Dtype,
    out_dtype: Dtype,
    rows: usize,
    cols: usize,
    block_rows: usize,
    /// Output bytes of a full block (the last one may be shorter).
    block_bytes: usize,
    fused: bool,
}

impl<'a> BlockJob<'a> {
    fn new(
        plan: &PatchPlan,
        base: &'a TensorFile,
        i: usize,
        out_dtype: Dtype,
        patches: &[&Patch],
        fused: bool,
    ) -> Result<BlockJob<'a>> {
        let info = &base.tensors()[i];
        let rows = info.shape.first().copied().unwrap_or(1).max(1);
        let cols = info.numel() / rows;
        let patches = patches
            .iter()
            .map(|p| low_rank_patch(plan, p, rows, cols, fused))
            .collect::<Result<_>>()?;
        let block_rows = (BLOCK_ELEMS / cols.max(1)).max(1);
        let out_size = out_dtype.size().expect("float dtype");
        Ok(BlockJob {
            patches,
            input: base.raw_bytes(&info.name)?,
            in_dtype: info.dtype,
            out_dtype,
            rows,
            cols,
            block_rows,
            block_bytes: (block_rows * cols * out_size).max(1),
            fused,
        })
    }

    fn blocks(&self) -> usize {
        self.rows.div_ceil(self.block_rows)
    }

    /// Block `b` encoded into `out`, exactly its size, every byte of which is written.
    fn fill(&self, b: usize, out: &mut [std::mem::MaybeUninit<u8>]) {
        let (in_size, out_size) = (
            self.in_dtype.size().unwrap(),
            self.out_dtype.size().unwrap(),
        );
        let cols = self.cols.max(1);
        let r0 = b * self.block_rows;
        let rows = r0..r0 + out.len() / out_size / cols;
        let src = &self.input[rows.start * cols * in_size..rows.end * cols * in_size];
        let (in_dtype, out_dtype, patches) = (self.in_dtype, self.out_dtype, &self.patches);
        if self.fused {
            fused_block(src, in_dtype, out, out_dtype, rows, cols, patches);
            return;
        }
        out.fill(std::mem::MaybeUninit::new(0));
        // SAFETY: every byte of `out` was just initialised.
        let out = unsafe { &mut *(out as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
        faer_block(src, in_dtype, out, out_dtype, rows, cols, patches);
    }

    /// Every block into `output` (the whole tensor's size), in parallel.
    fn fill_all(&self, output: &mut [std::mem::MaybeUninit<u8>]) {
        let out_size = self.out_dtype.size().expect("float dtype");
        assert_eq!(
            output.len(),
            self.rows * self.cols * out_size,
            "output size"
        );
        output
            .par_chunks_mut(self.block_bytes)
            .enumerate()
            .for_each(|(b, out)| self.fill(b, out));
    }

    /// Block `b` encoded into `buf` (grown as needed, reused across calls); returns its bytes.
    fn fill_buffer<'b>(&self, b: usize, buf: &'b mut Vec<u8>) -> &'b [u8] {
        let out_size = self.out_dtype.size().expect("float dtype");
        let total = self.rows * self.cols * out_size;
        let len = self.block_bytes.min(total - b * self.block_bytes);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let out = &mut buf[..len];
        // SAFETY: initialised bytes seen as possibly uninitialised: `fill` only writes to them.
        self.fill(b, unsafe {
            &mut *(out as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
        });
        out
    }
}

/// `name` of `base` decoded to f32 with `patches` added by the row-block kernels a merge uses
/// (one pass, parallel, no dense delta) — `None` when that path does not apply: a patch that is
/// not plain low rank ([`PatchPlan::is_plain_low_rank`]), a tensor that is not floats, or none.
pub(crate) fn patched_f32_blocks(
    plan: &PatchPlan,
    base: &TensorFile,
    name: &str,
    patches: &[Patch],
) -> Option<Result<crate::tensors::Tensor>> {
    if patches.is_empty()
        || !patches.iter().all(|p| plan.is_plain_low_rank(p))
        || cfg!(target_endian = "big")
    {
        return None;
    }
    let i = base.index_of(name).ok()?;
    let info = &base.tensors()[i];
    if !info.dtype.is_float() {
        return None;
    }
    let n = info.numel();
    let fused = low_rank_add::supported(info.dtype, Dtype::F32);
    let refs: Vec<&Patch> = patches.iter().collect();
    let mut values: Vec<f32> = Vec::with_capacity(n);
    // SAFETY: the spare capacity of `n` f32s viewed as its 4n bytes; f32 has no invalid bit
    // patterns and the encoding is little-endian, the machine's order (checked above).
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
            n * 4,
        )
    };
    Some(
        BlockJob::new(plan, base, i, Dtype::F32, &refs, fused).map(|job| {
            job.fill_all(bytes);
            // SAFETY: fill_all wrote all 4n bytes.
            unsafe { values.set_len(n) };
            crate::tensors::Tensor {
                shape: info.shape.clone(),
                data: values,
            }
        }),
    )
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
    dst.write_copy_of_slice(&recoded(src, in_dtype, out_dtype).expect("float dtypes"));
}

/// Stored values as `out_dtype`: the very bytes when the type is the same (-0.0 and NaN payloads
/// included), else decoded and rounded once. `None` when either type is not a float type.
fn recoded(src: &[u8], in_dtype: Dtype, out_dtype: Dtype) -> Option<std::borrow::Cow<'_, [u8]>> {
    if in_dtype == out_dtype {
        return Some(std::borrow::Cow::Borrowed(src));
    }
    let values = in_dtype.decode_f32(src)?;
    out_dtype.encode_f32(&values).map(std::borrow::Cow::Owned)
}

/// The new bytes of tensor `i` through f32 (see [`Production::Whole`]). When the patches cover row
/// slices only (q/k/v of a fused OpenCLIP `in_proj_weight`, Flux `qkv`/`linear1`), only those rows
/// are decoded and patched; the others keep their stored bytes (re-encoded when cast).
fn produce_whole(
    plan: &PatchPlan,
    base: &TensorFile,
    i: usize,
    spec: &TensorSpec,
    patches: &[Patch],
) -> Result<Vec<u8>> {
    let info = &base.tensors()[i];
    let cannot_store = || {
        Error::bad_tensor(
            base.path(),
            &info.name,
            format!("cannot store {} as {}", info.dtype, spec.dtype),
        )
    };
    let Some(patched) = patched_rows(patches) else {
        let w = plan.apply_dense(base, &info.name, patches)?;
        return spec.dtype.encode_f32(&w.data).ok_or_else(cannot_store);
    };
    let rows = info.shape.first().copied().unwrap_or(1);
    let row_bytes = info.numel() / rows.max(1) * info.dtype.size().ok_or_else(cannot_store)?;
    let stored = base.raw_bytes(&info.name)?;
    let mut out = Vec::with_capacity(spec.byte_len());
    let mut next = 0; // first row not yet written
    for r in patched.iter().cloned().chain(std::iter::once(rows..rows)) {
        let untouched = &stored[next * row_bytes..r.start * row_bytes];
        out.extend_from_slice(
            &recoded(untouched, info.dtype, spec.dtype).ok_or_else(cannot_store)?,
        );
        if r.is_empty() {
            break;
        }
        let w = plan.apply_rows(base, &info.name, r.clone(), patches)?;
        out.extend(spec.dtype.encode_f32(&w.data).ok_or_else(cannot_store)?);
        next = r.end;
    }
    Ok(out)
}

/// What was merged (file names, weights, AutoV3 hashes), recorded in the output's metadata
/// under `loratool.merged_loras`. Hashing reads every LoRA once, so it runs on its own thread
/// while the checkpoint is matched (see [`merge_into_checkpoint`]).
fn spawn_merge_record(loras: &[LoraWeight]) -> std::thread::JoinHandle<Result<String>> {
    let loras = loras.to_vec();
    std::thread::spawn(move || {
        let mut record = Vec::new();
        for lw in loras {
            let file = TensorFile::open(&lw.path)?;
            let autov3 = match file.as_safetensors().map(|s| s.data_start()) {
                Some(start) => Some(autov3(&lw.path, start)?),
                None => None,
            };
            record.push(serde_json::json!({
                "file": lw.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "text_encoder_weight": lw.text_encoder,
                "unet_weight": lw.unet,
                "lbw": lw.block_weights.as_ref().map(|b| b.to_string()),
                "autov3": autov3,
            }));
        }
        Ok(serde_json::to_string(&record).expect("json"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Adapter;
    use crate::family::layout::Layout;
    use crate::tensors::writer::build_header;
    use std::collections::BTreeMap;

    /// A one-file checkpoint around `base`.
    fn checkpoint(base: TensorFile) -> Checkpoint {
        Checkpoint::single(Path::new("base"), Layout::SingleFile, base)
    }

    /// A plan whose patches are given by hand (all on tensor "w").
    fn plan<'c>(ck: &'c Checkpoint, adapters: Vec<Adapter>, patches: &[Patch]) -> PatchPlan<'c> {
        PatchPlan {
            checkpoint: ck,
            family: BaseModel::Unknown,
            loras: vec![],
            adapters,
            files: vec![BTreeMap::from([("w".to_string(), patches.to_vec())])],
            matches: vec![],
        }
    }

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
        let lora_adapter = || {
            Adapter::from_file(
                TensorFile::from_safetensors_bytes(Path::new("lora"), lora_bytes.clone()).unwrap(),
            )
            .unwrap()
        };
        let first = lora_adapter();
        let module = |k: usize| {
            first
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
        for (stored, out) in [
            (Dtype::F16, Dtype::F16),
            (Dtype::BF16, Dtype::BF16),
            (Dtype::F16, Dtype::F32),
        ] {
            let untouched = pseudo_random(15, 3, 1.0);
            let ck = checkpoint(
                TensorFile::from_safetensors_bytes(
                    Path::new("base"),
                    safetensors(&[
                        ("w", stored, vec![rows, cols], base_vals.clone()),
                        ("u", stored, vec![3, 5], untouched.clone()),
                    ]),
                )
                .unwrap(),
            );
            let plan = plan(&ck, vec![lora_adapter()], &patches);
            assert!(patches.iter().all(|p| plan.is_plain_low_rank(p)));
            let base = &ck.files[0].file;
            let spec = TensorSpec {
                name: "w".into(),
                dtype: out,
                shape: vec![rows, cols],
            };
            let refs: Vec<&Patch> = patches.iter().collect();
            let whole = produce_whole(&plan, base, 0, &spec, &patches).unwrap();
            let w = out.decode_f32(&whole).unwrap();
            let kernels = if low_rank_add::supported(stored, out) {
                vec![true, false]
            } else {
                vec![false]
            };
            for fused in kernels {
                let blocks = produce_blocks_with(&plan, base, 0, &spec, &refs, fused).unwrap();
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
            // The merge writes each block to its place in the file as it is computed: the same
            // bytes as the blocks computed in memory; the untouched tensor is copied or cast.
            let dir = tempfile::tempdir().unwrap();
            let merged = dir.path().join("m.safetensors");
            let opts = MergeOptions {
                dtype: Some(out),
                window_bytes: 1 << 16,
                ..Default::default()
            };
            write_merged(&plan, 0, &merged, "rec", &opts, &WriteOptions::default()).unwrap();
            let m = crate::tensors::SafetensorsFile::open(&merged).unwrap();
            let fused = low_rank_add::supported(stored, out);
            let blocks = produce_blocks_with(&plan, base, 0, &spec, &refs, fused).unwrap();
            assert_eq!(m.tensors()[0].name, "w");
            assert!(m.tensor_bytes(0) == blocks.as_slice(), "{stored}->{out}");
            let u = out.decode_f32(m.tensor_bytes(1)).unwrap();
            let expected = out.encode_f32(
                &stored
                    .decode_f32(&stored.encode_f32(&untouched).unwrap())
                    .unwrap(),
            );
            assert_eq!(out.encode_f32(&u), expected, "{stored}->{out}: untouched");
            assert_eq!(m.metadata()["loratool.merged_loras"], "rec");
            // PatchPlan::apply (the sampler's f32 load) takes the block path for plain LoRAs.
            let fast = plan.apply(base, "w", &patches).unwrap();
            let dense = plan.apply_dense(base, "w", &patches).unwrap();
            assert_eq!(fast.shape, dense.shape);
            let scale = dense.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = fast
                .data
                .iter()
                .zip(&dense.data)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
            assert!(
                worst < 1e-6,
                "{stored}: apply differs from apply_dense by {worst}"
            );
            assert!(patched_f32_blocks(&plan, base, "w", &patches).is_some());
        }
    }

    /// The whole-tensor path on a row slice (a LoHa on q of a fused weight) decodes and patches
    /// only those rows: the others keep their stored bytes (-0.0 included), or are rounded once
    /// when cast, and the patched rows are what the whole tensor in f32 gives.
    #[test]
    fn whole_path_patches_only_the_rows_of_its_slices() {
        let (rows, cols, rank) = (6, 10, 2);
        let mut base_vals = pseudo_random(rows * cols, 7, 0.1);
        base_vals[2 * cols + 3] = -0.0;
        base_vals[5 * cols] = -0.0;
        let hada = |suffix: &str, shape: Vec<usize>, seed: u32| {
            let n = shape.iter().product();
            (
                format!("lora_unet_q.{suffix}"),
                Dtype::F32,
                shape,
                pseudo_random(n, seed, 0.5),
            )
        };
        let t = [
            hada("hada_w1_a", vec![2, rank], 11),
            hada("hada_w1_b", vec![rank, cols], 12),
            hada("hada_w2_a", vec![2, rank], 13),
            hada("hada_w2_b", vec![rank, cols], 14),
        ];
        let lora: Vec<(&str, Dtype, Vec<usize>, Vec<f32>)> = t
            .iter()
            .map(|(n, d, s, v)| (n.as_str(), *d, s.clone(), v.clone()))
            .collect();
        let adapters = vec![Adapter::from_file(
            TensorFile::from_safetensors_bytes(Path::new("lora"), safetensors(&lora)).unwrap(),
        )
        .unwrap()];
        let patch = Patch {
            lora: 0,
            module: 0,
            rows: Some(3..5),
            multiplier: 0.8,
            bias: false,
        };
        // A signalling NaN with a payload in an untouched row: decoding and encoding again would
        // quieten it (0x7F81 → 0x7FC1), so it keeps its bits only if its row is never decoded.
        let mut bytes = safetensors(&[("w", Dtype::BF16, vec![rows, cols], base_vals)]);
        let data = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let at = data + 2 * (cols + 4);
        bytes[at..at + 2].copy_from_slice(&0x7F81u16.to_le_bytes());
        let ck = checkpoint(TensorFile::from_safetensors_bytes(Path::new("base"), bytes).unwrap());
        let plan = plan(&ck, adapters, std::slice::from_ref(&patch));
        assert!(!plan.is_plain_low_rank(&patch));
        let base = &ck.files[0].file;
        let whole = plan.apply(base, "w", std::slice::from_ref(&patch)).unwrap();
        let stored = base.raw_bytes("w").unwrap();
        for out_dtype in [Dtype::BF16, Dtype::F32] {
            let spec = TensorSpec {
                name: "w".into(),
                dtype: out_dtype,
                shape: vec![rows, cols],
            };
            let out = produce_whole(&plan, base, 0, &spec, std::slice::from_ref(&patch)).unwrap();
            let row = cols * out_dtype.size().unwrap();
            let expected = out_dtype.encode_f32(&whole.data).unwrap();
            assert_eq!(
                out[3 * row..5 * row],
                expected[3 * row..5 * row],
                "{out_dtype}"
            );
            assert_ne!(
                out[3 * row..5 * row],
                expected_untouched(&stored, out_dtype)[3 * row..5 * row]
            );
            for r in [0..3, 5..6] {
                let range = r.start * row..r.end * row;
                assert_eq!(
                    out[range.clone()],
                    expected_untouched(&stored, out_dtype)[range],
                    "{out_dtype} rows {r:?}"
                );
            }
            if out_dtype == Dtype::BF16 {
                assert_eq!(out[2 * (cols + 4)..2 * (cols + 5)], 0x7F81u16.to_le_bytes());
            }
            let back = out_dtype.decode_f32(&out).unwrap();
            assert!(back[2 * cols + 3].is_sign_negative() && back[2 * cols + 3] == 0.0);
            assert!(back[5 * cols].is_sign_negative() && back[5 * cols] == 0.0);
        }
    }

    /// Stored bf16 bytes as `dtype`: the same bytes, or each value rounded once.
    fn expected_untouched(stored: &[u8], dtype: Dtype) -> Vec<u8> {
        if dtype == Dtype::BF16 {
            return stored.to_vec();
        }
        dtype
            .encode_f32(&Dtype::BF16.decode_f32(stored).unwrap())
            .unwrap()
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
        let adapters = vec![Adapter::from_file(
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
        let ck = checkpoint(
            TensorFile::from_safetensors_bytes(
                Path::new("base"),
                safetensors(&[("w", Dtype::F16, vec![rows, cols], base_vals)]),
            )
            .unwrap(),
        );
        let plan = plan(&ck, adapters, std::slice::from_ref(&patch));
        let base = &ck.files[0].file;
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
            let out = produce_blocks_with(&plan, base, 0, &spec, &[&patch], fused).unwrap();
            assert_eq!(out[2 * cols * 2..], stored[2 * cols * 2..], "fused={fused}");
            assert_ne!(out[..2 * cols * 2], stored[..2 * cols * 2], "fused={fused}");
        }
    }
}

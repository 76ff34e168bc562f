//! Streaming, atomic safetensors output.
//!
//! The header is computed first from the tensor specs, then tensors are written one at a time in
//! header order, so no command ever holds a whole output in memory. Data goes to an
//! [`OutputFile`]: unnamed (or a hidden temp) in the output's folder until it is complete and
//! fsynced, then linked into place without replacing anything unless forced. On any error, a
//! signal, or if the writer is dropped unfinished, nothing appears at the target.

use super::{Dtype, OutputFile, SafetensorsFile, Tensor, TensorInfo};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// What one output tensor will be: written in this order, with exactly `numel × dtype` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// An input tensor's spec for an output that stores floats as `cast` (when given); non-float
    /// tensors keep their dtype.
    pub fn cast_from(info: &TensorInfo, cast: Option<Dtype>) -> TensorSpec {
        TensorSpec {
            name: info.name.clone(),
            dtype: match cast {
                Some(d) if info.dtype.is_float() => d,
                _ => info.dtype,
            },
            shape: info.shape.clone(),
        }
    }

    /// A computed tensor encoded as `dtype` (f32 when `dtype` is not a float type): spec and bytes.
    pub fn encode(name: String, t: &Tensor, dtype: Dtype) -> (TensorSpec, Vec<u8>) {
        let dtype = if dtype.is_float() { dtype } else { Dtype::F32 };
        let bytes = dtype.encode_f32(&t.data).expect("float dtypes encode");
        (
            TensorSpec {
                name,
                dtype,
                shape: t.shape.clone(),
            },
            bytes,
        )
    }

    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size().unwrap_or(1)
    }
}

/// Safety rules for the output path.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Replace an existing output file (never an input file).
    pub force: bool,
    /// Files the command reads; the output may never be one of them.
    pub inputs: Vec<PathBuf>,
}

/// Result of a completed write.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub path: PathBuf,
    pub bytes: u64,
    /// sha256 of the data section (kohya's `sshs_model_hash`, A1111's addnet hash, Civitai AutoV3),
    /// when the writer was asked to compute it.
    pub data_sha256: Option<String>,
}

pub struct SafetensorsWriter {
    target: PathBuf,
    out: Option<BufWriter<OutputFile>>,
    specs: Vec<TensorSpec>,
    next: usize,
    written: u64,
    /// sha256 of the data section, only when asked for (it costs a pass over every byte).
    data_hash: Option<Sha256>,
    /// Early writeback: see [`Writeback`].
    writeback: Writeback,
}

/// Starts the disk writes of a large output while it is still being produced, instead of leaving
/// gigabytes of dirty pages for the final fsync: every [`Writeback::STEP`] bytes the new range is
/// handed to the kernel (`sync_file_range`, asynchronous), and the range before it is waited for.
/// Disk time then overlaps computation, and dirty memory stays bounded by two steps.
#[derive(Default)]
pub(super) struct Writeback {
    /// End of the range last handed to the kernel.
    started: u64,
    /// Start of that range (everything before it has been waited for).
    previous: u64,
}

impl Writeback {
    const STEP: u64 = 64 << 20;

    /// The file is complete up to `written`: once a step's worth is new, start its writeback and
    /// wait for the range before it.
    pub(super) fn advance(&mut self, file: &File, written: u64) {
        if written < self.started + Self::STEP {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = file.as_raw_fd();
            // SAFETY: plain syscalls on an open descriptor; they only schedule or wait for
            // writeback. Failures are ignored: the final fsync still makes the file durable.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.started as i64,
                    (written - self.started) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
                libc::sync_file_range(
                    fd,
                    self.previous as i64,
                    (self.started - self.previous) as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        self.previous = self.started;
        self.started = written;
    }
}

impl WriteOptions {
    /// The options of a command that reads `inputs` and writes `target`, after checking that
    /// `target` may be written (see [`check_output_path`]) — before any work is done.
    pub fn checked(target: &Path, force: bool, inputs: Vec<PathBuf>) -> Result<WriteOptions> {
        let opts = WriteOptions { force, inputs };
        check_output_path(target, &opts)?;
        Ok(opts)
    }
}

/// Checks that `target` may be written: its folder exists, it is not an input, it is not a
/// folder, and it does not exist unless `force`. Shared by every command that writes a file.
pub fn check_output_path(target: &Path, opts: &WriteOptions) -> Result<()> {
    check_output(target, opts, false)
}

/// [`check_output_path`] for a folder output (a diffusers pipeline): `target` may not be a file.
pub(crate) fn check_output_folder(target: &Path, opts: &WriteOptions) -> Result<()> {
    check_output(target, opts, true)
}

fn check_output(target: &Path, opts: &WriteOptions, folder: bool) -> Result<()> {
    let parent = parent_dir(target);
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: output folder '{}' does not exist",
            target.display(),
            parent.display()
        )));
    }
    for input in &opts.inputs {
        if same_file(target, input) {
            return Err(Error::Invalid(format!(
                "{}: refusing to write over an input file",
                target.display()
            )));
        }
    }
    // Said before "exists": --force would not help.
    match (target.is_dir(), folder) {
        (true, false) => {
            return Err(Error::Invalid(format!(
                "{}: is a folder, not a file",
                target.display()
            )))
        }
        (false, true) if target.exists() => {
            return Err(Error::Invalid(format!(
                "{}: is a file, not a folder",
                target.display()
            )))
        }
        _ => {}
    }
    if target.exists() && !opts.force {
        return Err(Error::OutputExists {
            path: target.to_path_buf(),
            appeared: false,
        });
    }
    Ok(())
}

pub(crate) fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// True when both paths name the same existing file (hard links and symlinks included).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) if x == y => return true,
        _ => {}
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// The safetensors header for `specs`: `__metadata__` first, tensors in write order, padded with
/// spaces to a multiple of 8 so the data section stays aligned.
pub fn build_header(metadata: &BTreeMap<String, String>, specs: &[TensorSpec]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap(),
        );
    }
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.byte_len();
        map.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&map).expect("header serializes");
    pad_header(&mut header);
    header
}

/// Pads a header with spaces to a multiple of 8 bytes, so the data section stays aligned.
pub(crate) fn pad_header(header: &mut Vec<u8>) {
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
}

impl SafetensorsWriter {
    pub fn create(
        target: &Path,
        metadata: &BTreeMap<String, String>,
        specs: Vec<TensorSpec>,
        opts: &WriteOptions,
    ) -> Result<SafetensorsWriter> {
        let mut seen = std::collections::HashSet::new();
        for s in &specs {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::Invalid(format!(
                    "{}: two output tensors named '{}'",
                    target.display(),
                    s.name
                )));
            }
            if !s.dtype.is_numeric() {
                return Err(Error::Invalid(format!(
                    "{}: cannot write tensor '{}' of dtype {}",
                    target.display(),
                    s.name,
                    s.dtype
                )));
            }
        }
        let header = build_header(metadata, &specs);
        Self::start(target, &header, specs, opts)
    }

    /// Opens the output and writes the length-prefixed `header` (padded JSON).
    fn start(
        target: &Path,
        header: &[u8],
        specs: Vec<TensorSpec>,
        opts: &WriteOptions,
    ) -> Result<SafetensorsWriter> {
        let file = OutputFile::create(target, opts)?;
        let mut writer = SafetensorsWriter {
            target: target.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            specs,
            next: 0,
            written: 0,
            data_hash: None,
            writeback: Writeback::default(),
        };
        writer.put(&(header.len() as u64).to_le_bytes())?;
        writer.put(header)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer is open");
        out.write_all(bytes)
            .map_err(|e| Error::io(&self.target, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Also hash the data section while writing (see [`WriteSummary::data_sha256`]).
    pub fn with_data_hash(mut self) -> Self {
        self.data_hash = Some(Sha256::new());
        self
    }

    /// The spec of the next tensor to write, if any remain.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Writes the next tensor's bytes (stored dtype, little-endian). Tensors must come in spec order.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.expect_next(name, bytes.len())?;
        if let Some(h) = self.data_hash.as_mut() {
            h.update(bytes);
        }
        self.put(bytes)?;
        self.next += 1;
        self.start_writeback()
    }

    /// Writes the next tensor by copying `len` bytes at `offset` of `src` inside the kernel
    /// (`copy_file_range` where available): untouched tensors of a large checkpoint never pass
    /// through this process's memory. Falls back to reading and writing.
    pub fn copy_tensor(&mut self, name: &str, src: &File, offset: u64, len: usize) -> Result<()> {
        self.expect_next(name, len)?;
        self.copy_bytes(src, offset, len)?;
        self.next += 1;
        self.start_writeback()
    }

    /// Appends `len` bytes at `offset` of `src`: in the kernel unless the data is being hashed
    /// or the kernel declines, else through a buffer.
    fn copy_bytes(&mut self, src: &File, offset: u64, len: usize) -> Result<()> {
        let mut copied = 0usize;
        if self.data_hash.is_none() {
            let out = self.out.as_mut().expect("writer is open");
            out.flush().map_err(|e| Error::io(&self.target, e))?;
            copied = kernel_copy(src, offset, out.get_ref().file(), self.written, len)
                .map_err(|e| Error::io(&self.target, e))?;
            self.written += copied as u64;
        }
        let mut buf = vec![0u8; (len - copied).min(8 << 20)];
        while copied < len {
            let n = (len - copied).min(buf.len());
            read_exact_at(src, &mut buf[..n], offset + copied as u64)
                .map_err(|e| Error::io(&self.target, e))?;
            if let Some(h) = self.data_hash.as_mut() {
                h.update(&buf[..n]);
            }
            self.put(&buf[..n])?;
            copied += n;
        }
        Ok(())
    }

    /// Checks that tensor `name` of `len` bytes is the one the header promised next.
    fn expect_next(&self, name: &str, len: usize) -> Result<()> {
        match self.specs.get(self.next) {
            Some(spec) if spec.name == name && spec.byte_len() == len => Ok(()),
            Some(spec) => Err(Error::Invalid(format!(
                "{}: expected tensor '{}' of {} bytes next, got '{name}' of {len} bytes",
                self.target.display(),
                spec.name,
                spec.byte_len(),
            ))),
            None => Err(Error::Invalid(format!(
                "{}: tensor '{name}' written after the last one",
                self.target.display()
            ))),
        }
    }

    fn start_writeback(&mut self) -> Result<()> {
        if self.written < self.writeback.started + Writeback::STEP {
            return Ok(());
        }
        let out = self.out.as_mut().expect("writer is open");
        out.flush().map_err(|e| Error::io(&self.target, e))?;
        self.writeback.advance(out.get_ref().file(), self.written);
        Ok(())
    }

    /// Flushes the file and puts it in place ([`OutputFile::commit`]: fsynced first, never over an
    /// output that appeared meanwhile unless forced).
    pub fn finish(mut self) -> Result<WriteSummary> {
        if self.next != self.specs.len() {
            return Err(Error::Invalid(format!(
                "{}: only {} of {} tensors were written",
                self.target.display(),
                self.next,
                self.specs.len()
            )));
        }
        let out = self.out.take().expect("writer is open");
        out.into_inner()
            .map_err(|e| Error::io(&self.target, e.into_error()))?
            .commit()?;
        let hash = self.data_hash.take().map(|h| hex(&h.finalize()));
        Ok(WriteSummary {
            path: self.target.clone(),
            bytes: self.written,
            data_sha256: hash,
        })
    }
}

/// Copies `len` bytes from `src` at `offset` to `dst` at `at` inside the kernel; returns how many
/// were copied before the kernel declined (0 where `copy_file_range` is unsupported, e.g. across
/// filesystems on older kernels), the caller copies the rest itself.
#[cfg(target_os = "linux")]
pub(super) fn kernel_copy(
    src: &File,
    offset: u64,
    dst: &File,
    at: u64,
    len: usize,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < len {
        let mut off_in = (offset + done as u64) as libc::loff_t;
        let mut off_out = (at + done as u64) as libc::loff_t;
        // SAFETY: both descriptors are open for the duration of the call; the offsets are passed
        // by pointer, so neither file position moves.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len - done,
                0,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => break,
                _ => return Err(err),
            }
        }
        if n == 0 {
            break; // source shorter than expected: let the read path report it
        }
        done += n as usize;
    }
    // copy_file_range writes at explicit offsets: move the file position past the copied bytes.
    use std::io::Seek;
    (&*dst).seek(std::io::SeekFrom::Start(at + done as u64))?;
    Ok(done)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn kernel_copy(_: &File, _: u64, _: &File, _: u64, _: usize) -> std::io::Result<usize> {
    Ok(0)
}

#[cfg(unix)]
pub(super) fn read_exact_at(src: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(src, buf, offset)
}

#[cfg(not(unix))]
pub(super) fn read_exact_at(src: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek};
    let mut f = src;
    f.seek(std::io::SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// kohya's `sshs_model_hash` of an in-memory output: sha256 of its data section, i.e. of these
/// tensors' bytes in write order (independent of the header, so it can go into the metadata).
pub fn sshs_model_hash(tensors: &[(TensorSpec, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (_, b) in tensors {
        h.update(b);
    }
    hex(&h.finalize())
}

/// Writes `source` again with `metadata` as its `__metadata__` and nothing else changed: the
/// header is the source's own with only the metadata replaced
/// ([`SafetensorsFile::header_with_metadata`]), and the data section is copied unchanged inside
/// the kernel (with early writeback), so a metadata edit of a multi-GB checkpoint costs one copy
/// and no pass through memory, and its data-section hashes (addnet, AutoV3) stay the same. When
/// `target` is `source` itself (an in-place edit, `opts.force`), the new file keeps its
/// permissions.
pub fn write_with_metadata(
    target: &Path,
    source: &SafetensorsFile,
    metadata: &BTreeMap<String, String>,
    opts: &WriteOptions,
) -> Result<WriteSummary> {
    let header = source.header_with_metadata(metadata)?;
    let mut w = SafetensorsWriter::start(target, &header, Vec::new(), opts)?;
    if same_file(target, source.path()) {
        let mode = fs::metadata(source.path())
            .map_err(|e| Error::io(source.path(), e))?
            .permissions();
        let out = w.out.as_ref().expect("writer is open").get_ref();
        out.file()
            .set_permissions(mode)
            .map_err(|e| Error::io(target, e))?;
    }
    let start = source.data_start();
    let data = &source.bytes()[start as usize..];
    match source.file() {
        Some(file) => {
            let mut done = 0usize;
            while done < data.len() {
                let n = (data.len() - done).min(Writeback::STEP as usize);
                w.copy_bytes(file, start + done as u64, n)?;
                w.start_writeback()?;
                done += n;
            }
        }
        None => w.put(data)?,
    }
    w.finish()
}

/// Writes whole in-memory tensors (small outputs such as LoRA files) through the streaming writer.
pub fn write_all(
    target: &Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[(TensorSpec, Vec<u8>)],
    opts: &WriteOptions,
) -> Result<WriteSummary> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = SafetensorsWriter::create(target, metadata, specs, opts)?.with_data_hash();
    for (s, bytes) in tensors {
        w.write_tensor(&s.name, bytes)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn writes_a_file_the_reader_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        let meta = BTreeMap::from([("ss_network_dim".to_string(), "4".to_string())]);
        let data = Dtype::F32.encode_f32(&[1.0, 2.0]).unwrap();
        let s = write_all(
            &out,
            &meta,
            &[(spec("w", 2), data)],
            &WriteOptions::default(),
        )
        .unwrap();
        // The 112-byte test vector of shared/reference/fetch_apis.md §2.6, byte for byte.
        let bytes = fs::read(&out).unwrap();
        assert_eq!(bytes.len(), 112);
        assert_eq!(
            s.data_sha256.as_deref(),
            Some("b9c80b5adeca450753a16950c3cc655d271f7bef7a485bc83f112b72fef21d37")
        );
        let f = SafetensorsFile::open(&out).unwrap();
        assert_eq!(f.metadata()["ss_network_dim"], "4");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }

    /// Tensors written from memory, copied from another file in the kernel, and copied through the
    /// read fallback (when hashing) all give the same bytes and the same data hash.
    #[test]
    fn parts_and_file_copies_give_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.bin");
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&src_path, [b"junk".as_slice(), &payload].concat()).unwrap();
        let src = File::open(&src_path).unwrap();
        let specs = || {
            vec![
                TensorSpec {
                    name: "a".into(),
                    dtype: Dtype::U8,
                    shape: vec![payload.len()],
                },
                spec("b", 2),
            ]
        };
        let b = Dtype::F32.encode_f32(&[1.0, -2.0]).unwrap();
        let mut outputs = Vec::new();
        for (k, how) in ["whole", "copy", "copy_hashed"].iter().enumerate() {
            let out = dir.path().join(format!("o{k}.safetensors"));
            let mut w = SafetensorsWriter::create(
                &out,
                &BTreeMap::new(),
                specs(),
                &WriteOptions::default(),
            )
            .unwrap();
            match *how {
                "whole" => w.write_tensor("a", &payload).unwrap(),
                "copy" => w.copy_tensor("a", &src, 4, payload.len()).unwrap(),
                _ => {
                    w = w.with_data_hash();
                    w.copy_tensor("a", &src, 4, payload.len()).unwrap()
                }
            }
            // A tensor of the wrong length is refused.
            assert!(w.write_tensor("b", &b[4..]).is_err());
            w.write_tensor("b", &b).unwrap();
            let summary = w.finish().unwrap();
            if *how == "copy_hashed" {
                let mut h = Sha256::new();
                h.update(&payload);
                h.update(&b);
                assert_eq!(summary.data_sha256.unwrap(), hex(&h.finalize()));
            }
            outputs.push(fs::read(&out).unwrap());
        }
        assert!(outputs.iter().all(|o| o == &outputs[0]));
        let f = SafetensorsFile::open(&dir.path().join("o1.safetensors")).unwrap();
        assert_eq!(f.tensor_bytes(0), payload.as_slice());
    }

    /// A file held in memory is written out the same way as one copied in the kernel.
    #[test]
    fn metadata_rewrite_keeps_the_data_section() {
        let dir = tempfile::tempdir().unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let data = Dtype::F32.encode_f32(&[1.0, -2.0, 3.0]).unwrap();
        let src = dir.path().join("src.safetensors");
        write_all(
            &src,
            &meta,
            &[(spec("w", 3), data.clone())],
            &WriteOptions::default(),
        )
        .unwrap();
        let new = BTreeMap::from([("other".to_string(), "x".repeat(13))]);
        let mut outputs = Vec::new();
        for (i, source) in [
            SafetensorsFile::open(&src).unwrap(),
            SafetensorsFile::from_bytes(&src, fs::read(&src).unwrap()).unwrap(),
        ]
        .iter()
        .enumerate()
        {
            let out = dir.path().join(format!("o{i}.safetensors"));
            write_with_metadata(&out, source, &new, &WriteOptions::default()).unwrap();
            let f = SafetensorsFile::open(&out).unwrap();
            assert_eq!(f.metadata(), &new);
            assert_eq!(f.tensor_bytes(0), data.as_slice());
            assert_eq!(f.header_len() % 8, 0);
            outputs.push(fs::read(&out).unwrap());
        }
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        {
            let mut w = SafetensorsWriter::create(
                &out,
                &BTreeMap::new(),
                vec![spec("a", 1), spec("b", 1)],
                &WriteOptions::default(),
            )
            .unwrap();
            w.write_tensor("a", &[0; 4]).unwrap();
            assert!(w.write_tensor("c", &[0; 4]).is_err());
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_inputs_existing_outputs_and_missing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        fs::write(&input, b"x").unwrap();
        let opts = WriteOptions {
            force: true,
            inputs: vec![input.clone()],
        };
        let e = check_output_path(&input, &opts).unwrap_err().to_string();
        assert!(e.contains("refusing to write over an input file"), "{e}");
        let e = check_output_path(&input, &WriteOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        let missing = dir.path().join("nope/out.safetensors");
        let e = check_output_path(&missing, &WriteOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("output folder"), "{e}");
        assert_eq!(fs::read(&input).unwrap(), b"x");
        // A folder is named as such at once: --force would not help.
        let e = check_output_path(dir.path(), &WriteOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is a folder, not a file"), "{e}");
    }
}

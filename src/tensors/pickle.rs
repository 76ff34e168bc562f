//! Legacy PyTorch files (`.ckpt`, `.pt`, `.bin`) read without executing any code.
//!
//! `torch.save` writes a Python pickle that describes the object tree, with tensor data kept
//! outside the pickle: in `<prefix>/data/<key>` entries of a zip archive (torch >= 1.6), or, in the
//! legacy format, as `<u64 numel><bytes>` records after a few small pickles. Loading such a file
//! with Python's unpickler runs whatever callables the pickle names, so this module has its own
//! small pickle machine that only *builds data*: dicts, lists, tuples, scalars, strings, storage
//! references and tensor descriptors. A `GLOBAL` outside a short allow-list (tensor-rebuild names,
//! plus the numpy and pytorch_lightning names A1111 also accepts, kept as inert values) refuses the
//! whole file the moment it is read, and nothing is ever called. Every protocol (0 to 5) is read.
//!
//! Everything is validated on open (storage sizes, every tensor's extent inside its storage), so
//! `tensor_bytes` can only fail on I/O of a deflated entry.
//!
//! Resource bounds: the machine is iterative (no recursion), every value it creates comes from one
//! opcode so memory is linear in the pickle size, containers live in an arena (dropping them never
//! recurses), strings are length-checked against the remaining input before allocation, and the
//! final walk over nested dicts is depth-limited and visits each dict once.

use super::{Dtype, TensorInfo};
use crate::{Error, Result};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The number a legacy (non-zip) torch file's first pickle holds.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The protocol version a legacy torch file's second pickle holds.
const LEGACY_PROTOCOL: i128 = 1001;
/// How deep nested dictionaries may go when flattening tensor names.
const MAX_NESTING: usize = 64;
/// How every refusal of a hostile global starts.
const REFUSING: &str = "refusing to load pickle";
/// The most arguments any allowed call or persistent id takes.
const MAX_ARGS: usize = 8;
/// torch's own limit on tensor dimensions.
const MAX_DIMS: usize = 64;
/// Deflate cannot expand data by more than about 1032x; anything claiming more is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1100;
/// How much of a file the sniff for protocol-0/1 pickles reads, and how many of its opcodes
/// must run cleanly (unless the pickle stops or names a refused global first).
const SNIFF_BYTES: usize = 4096;
const SNIFF_OPCODES: usize = 8;

/// An opened, fully validated torch.save file.
pub struct PickleFile {
    path: PathBuf,
    tensors: Vec<TensorInfo>,
    /// Where each tensor's elements sit, parallel to `tensors`.
    layouts: Vec<Layout>,
    storages: Vec<StorageData>,
    map: Option<Mmap>,
}

/// A tensor view into a storage: offset and strides in elements of the tensor's dtype.
#[derive(Debug, Clone)]
struct Layout {
    storage: usize,
    offset: usize,
    stride: Vec<usize>,
}

/// Where a storage's bytes are.
#[derive(Debug, Clone)]
enum StorageData {
    /// A byte range of the mapped file (zip STORED entries, legacy records).
    Mapped { start: usize, len: usize },
    /// A compressed zip entry, inflated on request.
    Deflated { entry: usize, len: usize },
}

impl StorageData {
    fn len(&self) -> usize {
        match self {
            StorageData::Mapped { len, .. } | StorageData::Deflated { len, .. } => *len,
        }
    }
}

impl PickleFile {
    /// True when the file looks like a torch.save output: a zip archive, a pickle stream that
    /// starts with PROTO (protocol 2 and later), or one of protocol 0 or 1, which have no header
    /// at all (see [`looks_like_unversioned_pickle`]).
    pub fn sniff(path: &Path) -> Result<bool> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        f.take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        Ok(head.len() >= 2
            && (head.starts_with(b"PK") || head[0] == 0x80 || looks_like_unversioned_pickle(&head)))
    }

    pub fn open(path: &Path) -> Result<PickleFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::bad_file(path, "file is empty"));
        }
        // SAFETY: the map is read-only; loratool never writes to its inputs. A file truncated by
        // another process while mapped is the one hazard mmap brings, as with every mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let parsed = parse_file(&map).map_err(|reason| Error::bad_file(path, reason))?;
        Ok(PickleFile {
            path: path.to_path_buf(),
            tensors: parsed.tensors,
            layouts: parsed.layouts,
            storages: parsed.storages,
            map: Some(map),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets go of every mapped page (a streaming reader is done with what it read so far; later
    /// reads fault pages in again from the file, with identical contents).
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Some(m) = &self.map {
            // SAFETY: a read-only shared file mapping; dropping its pages only makes later reads
            // fault them in again from the file.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Contiguous row-major little-endian bytes of a tensor in its stored dtype. Borrowed from the
    /// mapped file when the tensor is a contiguous view of an uncompressed storage.
    pub fn tensor_bytes(&self, index: usize) -> Result<Cow<'_, [u8]>> {
        let (Some(info), Some(layout)) = (self.tensors.get(index), self.layouts.get(index)) else {
            return Err(Error::bad_file(
                &self.path,
                format!("tensor index {index} is out of range"),
            ));
        };
        let bad = |reason: String| Error::bad_tensor(&self.path, &info.name, reason);
        let map: &[u8] = self.map.as_deref().unwrap_or(&[]);
        let storage: Cow<'_, [u8]> = match self.storages.get(layout.storage) {
            Some(StorageData::Mapped { start, len }) => Cow::Borrowed(
                start
                    .checked_add(*len)
                    .and_then(|end| map.get(*start..end))
                    .ok_or_else(|| bad("storage lies outside the file".into()))?,
            ),
            Some(StorageData::Deflated { entry, len }) => {
                Cow::Owned(inflate_entry(map, *entry, *len).map_err(bad)?)
            }
            None => return Err(bad("storage index out of range".into())),
        };
        let elem = info
            .dtype
            .size()
            .ok_or_else(|| bad(format!("dtype {} has no byte size", info.dtype)))?;
        gather(&storage, elem, &info.shape, &layout.stride, layout.offset)
            .map(|range_or_vec| match range_or_vec {
                Gathered::Range(start, end) => match storage {
                    Cow::Borrowed(s) => Cow::Borrowed(s.get(start..end).unwrap_or(&[])),
                    Cow::Owned(v) => Cow::Owned(v.get(start..end).unwrap_or(&[]).to_vec()),
                },
                Gathered::Copied(v) => Cow::Owned(v),
            })
            .map_err(bad)
    }
}

/// Protocol 0 and 1 pickles start with an ordinary opcode (`(`, `}`, `c`, `L`...), so one byte
/// proves nothing; the restricted machine runs the first opcodes of `head` instead. A pickle that
/// stops, names a refused global, or runs [`SNIFF_OPCODES`] opcodes without error counts: random
/// bytes fail within a few opcodes. Only consulted after the safetensors sniff has said no.
fn looks_like_unversioned_pickle(head: &[u8]) -> bool {
    const STARTS: &[u8] = b"(}])cLINSVFGJKMTUX";
    if !head.first().is_some_and(|b| STARTS.contains(b)) {
        return false;
    }
    let mut m = Machine::new(head, true);
    m.max_ops = Some(SNIFF_OPCODES);
    match m.run() {
        Ok(_) => true,
        Err(e) => m.ops_exhausted || e.starts_with(REFUSING),
    }
}

/// Reads one deflated zip entry of the mapped file, which must inflate to exactly `len` bytes.
fn inflate_entry(map: &[u8], entry: usize, len: usize) -> Result<Vec<u8>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(map))
        .map_err(|e| format!("zip archive cannot be read: {e}"))?;
    let file = zip
        .by_index(entry)
        .map_err(|e| format!("zip entry cannot be read: {e}"))?;
    let mut out = Vec::with_capacity(len.min(map.len()));
    file.take(len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("compressed storage cannot be inflated: {e}"))?;
    if out.len() != len {
        return Err(format!(
            "compressed storage inflates to {} bytes, but its entry declares {len}",
            out.len()
        ));
    }
    Ok(out)
}

/// Result of laying a view out row-major: either a byte range of the storage (contiguous view) or
/// freshly gathered bytes.
enum Gathered {
    Range(usize, usize),
    Copied(Vec<u8>),
}

/// The byte range `[offset, offset + numel)` of a contiguous view, or the gathered bytes of a
/// strided one. The extent was validated on open; every access is still checked here.
fn gather(
    storage: &[u8],
    elem: usize,
    shape: &[usize],
    stride: &[usize],
    offset: usize,
) -> Result<Gathered, String> {
    let overflow = || "tensor extent overflows".to_string();
    let outside = || "tensor extent runs past its storage".to_string();
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    if numel == 0 {
        return Ok(Gathered::Copied(Vec::new()));
    }
    if is_contiguous(shape, stride) {
        let start = offset.checked_mul(elem).ok_or_else(overflow)?;
        let end = numel
            .checked_mul(elem)
            .and_then(|n| n.checked_add(start))
            .ok_or_else(overflow)?;
        if end > storage.len() {
            return Err(outside());
        }
        return Ok(Gathered::Range(start, end));
    }
    // Copy runs of the innermost dimension (one element long unless its stride is 1).
    let (inner_len, inner_stride) = match (shape.last(), stride.last()) {
        (Some(&n), Some(&s)) => (n, s),
        _ => (1, 1),
    };
    let run = if inner_stride == 1 { inner_len } else { 1 };
    let outer_dims = shape.len().saturating_sub(1);
    let mut out = Vec::with_capacity(numel.checked_mul(elem).ok_or_else(overflow)?);
    let mut index = vec![0usize; outer_dims];
    loop {
        let mut base = offset;
        for (i, s) in index.iter().zip(stride) {
            base = i
                .checked_mul(*s)
                .and_then(|v| v.checked_add(base))
                .ok_or_else(overflow)?;
        }
        let mut j = 0;
        while j < inner_len {
            let at = j
                .checked_mul(inner_stride)
                .and_then(|v| v.checked_add(base))
                .and_then(|v| v.checked_mul(elem))
                .ok_or_else(overflow)?;
            let bytes = run.checked_mul(elem).ok_or_else(overflow)?;
            let chunk = at
                .checked_add(bytes)
                .and_then(|end| storage.get(at..end))
                .ok_or_else(outside)?;
            out.extend_from_slice(chunk);
            j += run;
        }
        // Advance the odometer over the outer dimensions.
        let mut d = outer_dims;
        loop {
            if d == 0 {
                return Ok(Gathered::Copied(out));
            }
            d -= 1;
            let (Some(i), Some(&n)) = (index.get_mut(d), shape.get(d)) else {
                return Err(overflow());
            };
            *i += 1;
            if *i < n {
                break;
            }
            *i = 0;
        }
    }
}

/// Row-major contiguity; dimensions of size 1 may carry any stride.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = match expected.checked_mul(n) {
            Some(e) => e,
            None => return false,
        };
    }
    true
}

struct Parsed {
    tensors: Vec<TensorInfo>,
    layouts: Vec<Layout>,
    storages: Vec<StorageData>,
}

fn parse_file(map: &[u8]) -> Result<Parsed, String> {
    match map.first() {
        Some(b'P') if map.starts_with(b"PK") => parse_zip(map),
        Some(_) => parse_legacy(map),
        None => Err("not a PyTorch file: neither a zip archive nor a pickle stream".into()),
    }
}

/// torch >= 1.6: a zip archive with `<prefix>/data.pkl` and `<prefix>/data/<key>` entries.
fn parse_zip(map: &[u8]) -> Result<Parsed, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(map))
        .map_err(|e| format!("not a readable zip archive (truncated or corrupt?): {e}"))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter(|n| {
            n.strip_suffix("data.pkl").is_some_and(|prefix| {
                prefix.is_empty()
                    || (prefix.ends_with('/') && prefix.matches('/').count() == 1 && prefix != "/")
            })
        })
        .map(str::to_string)
        .collect();
    let pkl_name = match pickles.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err("zip archive has no data.pkl entry, so it is not a torch.save file".into())
        }
        [a, b, ..] => return Err(format!("zip archive has several pickles ('{a}', '{b}')")),
    };
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();

    if let Some(i) = zip.index_for_name(&format!("{prefix}byteorder")) {
        let order = read_small_entry(&mut zip, map, i, 64)?;
        match order.trim_ascii() {
            b"little" => {}
            b"big" => {
                return Err("big-endian tensor data (byteorder 'big') is not supported".into())
            }
            other => {
                return Err(format!(
                    "unknown byteorder '{}'",
                    String::from_utf8_lossy(other).escape_debug()
                ))
            }
        }
    }

    let pkl_index = zip
        .index_for_name(&pkl_name)
        .ok_or_else(|| format!("zip entry '{pkl_name}' cannot be found"))?;
    let limit = (map.len() as u64).saturating_mul(MAX_DEFLATE_RATIO);
    let pickle = read_small_entry(&mut zip, map, pkl_index, limit)?;

    let mut machine = Machine::new(&pickle, true);
    let top = machine.run().map_err(|e| where_(&pkl_name, e))?;

    // Locate every referenced storage and check its size against the pickle's declaration.
    let mut storages = Vec::with_capacity(machine.storages.len());
    for s in &machine.storages {
        let name = format!("{prefix}data/{}", s.key);
        let expected = s.byte_len()?;
        let i = zip.index_for_name(&name).ok_or_else(|| {
            format!(
                "storage '{}' is missing from the archive (no entry '{name}')",
                s.key
            )
        })?;
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| format!("zip entry '{name}' cannot be read: {e}"))?;
        if entry.size() != expected as u64 {
            return Err(format!(
                "storage '{}' holds {} bytes, but the pickle declares {} elements ({expected} bytes)",
                s.key,
                entry.size(),
                s.numel
            ));
        }
        let data = match entry.compression() {
            zip::CompressionMethod::Stored => {
                let start = usize::try_from(entry.data_start())
                    .map_err(|_| format!("zip entry '{name}' lies outside the file"))?;
                if entry.compressed_size() != entry.size()
                    || start
                        .checked_add(expected)
                        .is_none_or(|end| end > map.len())
                {
                    return Err(format!(
                        "zip entry '{name}' lies outside the file (truncated?)"
                    ));
                }
                StorageData::Mapped {
                    start,
                    len: expected,
                }
            }
            zip::CompressionMethod::Deflated => {
                if entry.size() > entry.compressed_size().saturating_mul(MAX_DEFLATE_RATIO) + 1024 {
                    return Err(format!(
                        "zip entry '{name}' claims an impossible compression ratio"
                    ));
                }
                StorageData::Deflated {
                    entry: i,
                    len: expected,
                }
            }
            other => {
                return Err(format!(
                    "zip entry '{name}' uses unsupported compression {other}"
                ))
            }
        };
        storages.push(data);
    }
    finish(&machine, &top, storages, map.len())
}

/// Reads a whole zip entry that is expected to be modest (the pickle, the byteorder marker).
fn read_small_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    map: &[u8],
    index: usize,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let entry = zip
        .by_index(index)
        .map_err(|e| format!("zip entry #{index} cannot be read: {e}"))?;
    let name = entry.name().to_string();
    let declared = entry.size();
    if declared > limit || declared > (map.len() as u64).saturating_mul(MAX_DEFLATE_RATIO) {
        return Err(format!(
            "zip entry '{name}' is implausibly large ({declared} bytes)"
        ));
    }
    let mut out = Vec::with_capacity(usize::try_from(declared).unwrap_or(0).min(map.len()));
    entry
        .take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("zip entry '{name}' cannot be read (truncated or corrupt?): {e}"))?;
    if out.len() as u64 != declared {
        return Err(format!(
            "zip entry '{name}' holds {} bytes, but its header declares {declared}",
            out.len()
        ));
    }
    Ok(out)
}

/// torch < 1.6 (`_use_new_zipfile_serialization=False`): magic pickle, protocol pickle, sys_info
/// pickle, main pickle, storage-key list pickle, then one `<u64 numel><bytes>` record per key.
/// The pickles may be of any protocol (`pickle_protocol=0` and `1` give ones without PROTO).
fn parse_legacy(map: &[u8]) -> Result<Parsed, String> {
    let mut pos = 0usize;
    let (_, magic) = next_pickle(map, &mut pos, "first", false)?;
    if !matches!(magic, Value::Int(LEGACY_MAGIC)) {
        return Err(
            "a pickle, but not a torch.save file: it does not start with torch's magic number"
                .into(),
        );
    }
    let (_, proto) = next_pickle(map, &mut pos, "protocol", false)?;
    match proto {
        Value::Int(LEGACY_PROTOCOL) => {}
        Value::Int(v) => return Err(format!("unsupported legacy torch protocol version {v}")),
        other => {
            return Err(format!(
                "legacy torch protocol version is a {}, not an integer",
                other.kind()
            ))
        }
    }
    let (sys_m, sys_info) = next_pickle(map, &mut pos, "sys_info", false)?;
    if let Value::Dict(id) = sys_info {
        for (k, v) in sys_m.dict(id).unwrap_or(&[]) {
            if matches!(k, Value::Str(s) if &**s == "little_endian")
                && matches!(v, Value::Bool(false))
            {
                return Err("big-endian tensor data (little_endian=False) is not supported".into());
            }
        }
    }
    let (machine, top) = next_pickle(map, &mut pos, "main", true)?;
    let (keys_m, keys) = next_pickle(map, &mut pos, "storage key list", false)?;
    let key_list: Vec<&str> = match keys {
        Value::List(id) | Value::Tuple(id) => keys_m
            .seq(id)
            .unwrap_or(&[])
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(&**s),
                other => Err(format!("storage key is a {}, not a string", other.kind())),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "storage key list is a {}, not a list",
                other.kind()
            ))
        }
    };
    let mut data: Vec<Option<StorageData>> = vec![None; machine.storages.len()];
    for key in key_list {
        let &si = machine.by_key.get(key).ok_or_else(|| {
            format!("storage '{key}' has data in the file but no tensor refers to it")
        })?;
        let s = machine
            .storages
            .get(si)
            .ok_or_else(|| format!("storage '{key}' is out of range"))?;
        let header = pos
            .checked_add(8)
            .and_then(|end| map.get(pos..end))
            .ok_or_else(|| format!("file is truncated: storage '{key}' has no size record"))?;
        let mut numel = [0u8; 8];
        numel.copy_from_slice(header);
        let numel = u64::from_le_bytes(numel);
        if numel != s.numel as u64 {
            return Err(format!(
                "storage '{key}' holds {numel} elements, but the pickle declares {}",
                s.numel
            ));
        }
        let len = s.byte_len()?;
        let start = pos + 8;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| {
                format!("file is truncated: storage '{key}' needs {len} bytes at offset {start}")
            })?;
        if let Some(slot) = data.get_mut(si) {
            if slot.is_some() {
                return Err(format!("storage '{key}' is stored twice"));
            }
            *slot = Some(StorageData::Mapped { start, len });
        }
        pos = end;
    }
    let storages = data
        .into_iter()
        .zip(&machine.storages)
        .map(|(d, s)| d.ok_or_else(|| format!("storage '{}' has no data in the file", s.key)))
        .collect::<Result<Vec<_>, _>>()?;
    finish(&machine, &top, storages, map.len())
}

/// Prefixes a machine error with the pickle it came from; refusals stay as they are so they
/// always read `<path>: refusing to load pickle: ...`.
fn where_(what: &str, e: String) -> String {
    if e.starts_with(REFUSING) {
        e
    } else {
        format!("{what}: {e}")
    }
}

/// Runs the pickle that starts at `*pos` and moves `*pos` just past its STOP.
fn next_pickle<'m>(
    map: &'m [u8],
    pos: &mut usize,
    what: &str,
    storages: bool,
) -> Result<(Machine<'m>, Value), String> {
    let rest = map.get(*pos..).unwrap_or(&[]);
    let mut m = Machine::new(rest, storages);
    let v = m.run().map_err(|e| where_(&format!("{what} pickle"), e))?;
    *pos += m.pos;
    Ok((m, v))
}

/// Flattens the object tree into named tensors and validates each extent against its storage.
fn finish(
    machine: &Machine<'_>,
    top: &Value,
    storages: Vec<StorageData>,
    file_len: usize,
) -> Result<Parsed, String> {
    let Value::Dict(top_id) = top else {
        return Err(format!(
            "the pickle holds a {}, not a dictionary of tensors",
            top.kind()
        ));
    };
    let top_entries = machine.dict(*top_id).unwrap_or(&[]);
    let root = top_entries
        .iter()
        .rev()
        .find_map(|(k, v)| match (k, v) {
            (Value::Str(s), Value::Dict(id)) if &**s == "state_dict" => Some(*id),
            _ => None,
        })
        .unwrap_or(*top_id);

    let mut named: Vec<(String, usize)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut visited = HashSet::new();
    // Depth-first walk with an explicit stack of (dict, next entry, name prefix), so names come
    // out in the order the pickle lists them and deep nesting cannot exhaust the call stack.
    visited.insert(root);
    // Nested prefixes repeat in every name below them; bound the total so a small pickle
    // cannot expand into gigabytes of names.
    let mut name_bytes = 0usize;
    let max_name_bytes = (64 << 20) + 4 * file_len;
    let mut work: Vec<(usize, usize, String)> = vec![(root, 0, String::new())];
    while let Some((id, at, prefix)) = work.last_mut() {
        let Some((k, v)) = machine.dict(*id).and_then(|d| d.get(*at)) else {
            work.pop();
            continue;
        };
        *at += 1;
        let key = match k {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        let name = format!("{prefix}{key}");
        name_bytes = name_bytes.saturating_add(name.len());
        if name_bytes > max_name_bytes {
            return Err(
                "tensor names are implausibly long in total (nested keys repeated?)".into(),
            );
        }
        match v {
            Value::Tensor(t) => match index.get(&name) {
                // A repeated key replaces the earlier value in place, as in a Python dict.
                Some(&pos) => {
                    if let Some(slot) = named.get_mut(pos) {
                        slot.1 = *t;
                    }
                }
                None => {
                    index.insert(name.clone(), named.len());
                    named.push((name, *t));
                }
            },
            Value::Dict(child) => {
                if !visited.insert(*child) {
                    return Err(format!(
                        "dictionary '{name}' appears more than once in the object tree"
                    ));
                }
                if work.len() >= MAX_NESTING {
                    return Err(format!(
                        "dictionaries are nested more than {MAX_NESTING} deep"
                    ));
                }
                work.push((*child, 0, format!("{name}.")));
            }
            _ => {}
        }
    }

    let mut tensors = Vec::with_capacity(named.len());
    let mut layouts = Vec::with_capacity(named.len());
    for (name, t) in named {
        let desc = machine
            .tensors
            .get(t)
            .ok_or_else(|| format!("tensor '{name}': descriptor out of range"))?;
        let storage_len = storages
            .get(desc.storage)
            .map(StorageData::len)
            .ok_or_else(|| format!("tensor '{name}': storage out of range"))?;
        check_extent(desc, storage_len).map_err(|e| format!("tensor '{name}': {e}"))?;
        tensors.push(TensorInfo {
            name,
            dtype: desc.dtype,
            shape: desc.shape.clone(),
        });
        layouts.push(Layout {
            storage: desc.storage,
            offset: desc.offset,
            stride: desc.stride.clone(),
        });
    }
    Ok(Parsed {
        tensors,
        layouts,
        storages,
    })
}

/// Checks that every element a view can address lies inside its storage.
fn check_extent(desc: &TensorDesc, storage_len: usize) -> Result<(), String> {
    let elem = desc
        .dtype
        .size()
        .ok_or_else(|| format!("dtype {} is not byte-addressable", desc.dtype))?;
    let overflow = || "shape, stride or offset overflows".to_string();
    let numel = desc
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    let end_elems = if numel == 0 {
        desc.offset
    } else {
        let mut last = desc.offset;
        for (&n, &s) in desc.shape.iter().zip(&desc.stride) {
            last = n
                .saturating_sub(1)
                .checked_mul(s)
                .and_then(|v| v.checked_add(last))
                .ok_or_else(overflow)?;
        }
        last.checked_add(1).ok_or_else(overflow)?
    };
    let end = end_elems.checked_mul(elem).ok_or_else(overflow)?;
    let bytes = numel.checked_mul(elem).ok_or_else(overflow)?;
    if end <= storage_len && bytes > storage_len {
        // Only stride-0 (expanded) or overlapping views address more elements than they span;
        // laying one out would allocate more than the file holds, so they are refused.
        return Err(format!(
            "view of {bytes} bytes is larger than its {storage_len}-byte storage (expanded or overlapping strides are not supported)"
        ));
    }
    if end > storage_len {
        return Err(format!(
            "extent runs past its storage (needs {end} bytes: offset {}, shape {:?}, stride {:?}; storage holds {storage_len})",
            desc.offset, desc.shape, desc.stride
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The restricted pickle machine.
// ---------------------------------------------------------------------------------------------

/// Callables and classes a torch checkpoint may name. Nothing here is ever run: each one only
/// tells the machine what data to build.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    /// `torch.FloatStorage` and friends: a typed storage class.
    TypedStorage(Dtype),
    /// `torch.storage.UntypedStorage`: a byte storage (used with `_rebuild_tensor_v3`).
    UntypedStorage,
    /// `torch.float16` and friends.
    DtypeObject(Dtype),
    /// `_codecs.encode`, which protocol-2 pickles use to spell `bytes` objects.
    CodecsEncode,
    /// `torch._utils._rebuild_device_tensor_from_numpy` (accepted by name, as A1111 does; its
    /// tensors hold numpy arrays, which are not read).
    RebuildDeviceTensorFromNumpy,
    /// Checkpoint data that is no tensor: the rest of A1111's allow-list. Materialised as inert
    /// values; what their constructors would have built is never needed for tensor data.
    Inert(InertGlobal),
}

/// The non-tensor globals A1111's `RestrictedUnpickler.find_class` (modules/safe.py) accepts,
/// which original SD 1.x checkpoints carry beside the state dict (pytorch_lightning callback
/// state, numpy scores). Nothing of theirs is imported or called.
#[derive(Debug, Clone, Copy, PartialEq)]
enum InertGlobal {
    /// `numpy.core.multiarray.scalar`: a numpy scalar from (dtype, bytes).
    NumpyScalar,
    /// `numpy.core.multiarray._reconstruct`: an empty ndarray, filled by BUILD.
    NumpyReconstruct,
    /// `numpy.dtype`.
    NumpyDtype,
    /// `numpy.ndarray`, the class handed to `_reconstruct`.
    NumpyNdarray,
    /// `__builtin__.set` (protocol-2 pickles spell a set as `set(list)`).
    Set,
    /// `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.
    ModelCheckpoint,
    /// The module `pytorch_lightning.callbacks.model_checkpoint` itself.
    ModelCheckpointModule,
    /// `torch.nn.modules.container.ParameterDict`.
    ParameterDict,
}

impl InertGlobal {
    /// Whether calling it (REDUCE, NEWOBJ) stands for building a value; a module or the ndarray
    /// class on its own is never called by the pickles that carry them.
    fn builds_value(self) -> bool {
        !matches!(
            self,
            InertGlobal::NumpyNdarray | InertGlobal::ModelCheckpointModule
        )
    }
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    let storage = |n: &str| -> Option<Dtype> {
        Some(match n {
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "DoubleStorage" => Dtype::F64,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            "Float8_e4m3fnStorage" => Dtype::F8E4M3,
            "Float8_e5m2Storage" => Dtype::F8E5M2,
            _ => return None,
        })
    };
    let dtype = |n: &str| -> Option<Dtype> {
        Some(match n {
            "float32" | "float" => Dtype::F32,
            "float16" | "half" => Dtype::F16,
            "bfloat16" => Dtype::BF16,
            "float64" | "double" => Dtype::F64,
            "int64" | "long" => Dtype::I64,
            "int32" | "int" => Dtype::I32,
            "int16" | "short" => Dtype::I16,
            "int8" => Dtype::I8,
            "uint8" => Dtype::U8,
            "bool" => Dtype::Bool,
            "float8_e4m3fn" => Dtype::F8E4M3,
            "float8_e5m2" => Dtype::F8E5M2,
            "float8_e4m3fnuz" => Dtype::from_safetensors_name("F8_E4M3FNUZ")?,
            "float8_e5m2fnuz" => Dtype::from_safetensors_name("F8_E5M2FNUZ")?,
            "uint16" => Dtype::from_safetensors_name("U16")?,
            "uint32" => Dtype::from_safetensors_name("U32")?,
            "uint64" => Dtype::from_safetensors_name("U64")?,
            _ => return None,
        })
    };
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch" | "torch.storage", "UntypedStorage") => Global::UntypedStorage,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch._utils", "_rebuild_device_tensor_from_numpy") => {
            Global::RebuildDeviceTensorFromNumpy
        }
        ("numpy.core.multiarray", "scalar") => Global::Inert(InertGlobal::NumpyScalar),
        ("numpy.core.multiarray", "_reconstruct") => Global::Inert(InertGlobal::NumpyReconstruct),
        ("numpy", "dtype") => Global::Inert(InertGlobal::NumpyDtype),
        ("numpy", "ndarray") => Global::Inert(InertGlobal::NumpyNdarray),
        ("__builtin__", "set") => Global::Inert(InertGlobal::Set),
        ("torch.nn.modules.container", "ParameterDict") => {
            Global::Inert(InertGlobal::ParameterDict)
        }
        ("pytorch_lightning.callbacks", "model_checkpoint") => {
            Global::Inert(InertGlobal::ModelCheckpointModule)
        }
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => {
            Global::Inert(InertGlobal::ModelCheckpoint)
        }
        ("torch", n) => match storage(n) {
            Some(d) => Global::TypedStorage(d),
            None => Global::DtypeObject(dtype(n)?),
        },
        _ => return None,
    })
}

/// A value on the machine's stack. Containers live in the machine's arena and are referred to
/// by index, so values are cheap to copy (BINGET) and never nest in memory.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    /// An integer wider than 128 bits; only ever skipped.
    BigInt,
    // Floats and bytes are carried (a checkpoint may hold them) but never inspected.
    Float(#[allow(dead_code)] f64),
    Str(Rc<str>),
    Bytes(#[allow(dead_code)] Rc<[u8]>),
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Global),
    /// Index into `Machine::storages`.
    Storage(usize),
    /// Index into `Machine::tensors`.
    Tensor(usize),
    /// An object built by an inert global (a numpy scalar, a callback's state); never inspected.
    Inert(InertGlobal),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes object",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Inert(_) => "object",
        }
    }
}

enum Obj {
    Seq(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// How a storage's elements are typed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StorageKind {
    Typed(Dtype),
    Untyped,
}

#[derive(Debug, Clone)]
struct StorageRef {
    key: String,
    kind: StorageKind,
    numel: usize,
}

impl StorageRef {
    fn byte_len(&self) -> Result<usize, String> {
        let elem = match self.kind {
            StorageKind::Untyped => 1,
            StorageKind::Typed(d) => d.size().ok_or_else(|| {
                format!("storage '{}': dtype {d} is not byte-addressable", self.key)
            })?,
        };
        self.numel
            .checked_mul(elem)
            .ok_or_else(|| format!("storage '{}': size overflows", self.key))
    }
}

#[derive(Debug, Clone)]
struct TensorDesc {
    storage: usize,
    dtype: Dtype,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

type PResult<T> = std::result::Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Start of the opcode being executed, for error messages.
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    /// Whether BINPERSID (storage references) may appear.
    allow_storages: bool,
    storages: Vec<StorageRef>,
    by_key: HashMap<String, usize>,
    tensors: Vec<TensorDesc>,
    /// The most opcodes to run (the sniff), and whether they all ran.
    max_ops: Option<usize>,
    ops_started: usize,
    ops_exhausted: bool,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], allow_storages: bool) -> Self {
        Machine {
            data,
            pos: 0,
            op_at: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            allow_storages,
            storages: Vec::new(),
            by_key: HashMap::new(),
            tensors: Vec::new(),
            max_ops: None,
            ops_started: 0,
            ops_exhausted: false,
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("malformed pickle at byte {}: {msg}", self.op_at)
    }

    // --- input ---

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let data = self.data;
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
            .ok_or_else(|| self.err(format!("truncated (needs {n} more bytes)")))?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> PResult<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }

    /// A `\n`-terminated line (text opcodes), without the newline.
    fn line(&mut self) -> PResult<&'a [u8]> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("truncated (unterminated line)"))?;
        let line = self.take(n)?;
        self.pos += 1;
        Ok(line)
    }

    fn line_str(&mut self) -> PResult<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.err("text argument is not UTF-8"))
    }

    fn utf8(&mut self, n: usize) -> PResult<Value> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.err("string is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    /// Python 2 `str` payloads (BINSTRING): UTF-8 when valid, else Latin-1.
    fn py2_str(&mut self, n: usize) -> PResult<Value> {
        let bytes = self.take(n)?;
        Ok(py2_text(bytes))
    }

    // --- stack ---

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> PResult<&Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(self.err("MARK above the stack top"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn new_obj(&mut self, o: Obj) -> usize {
        self.objs.push(o);
        self.objs.len() - 1
    }

    fn seq(&self, id: usize) -> Option<&[Value]> {
        match self.objs.get(id) {
            Some(Obj::Seq(v)) => Some(v),
            _ => None,
        }
    }

    fn dict(&self, id: usize) -> Option<&[(Value, Value)]> {
        match self.objs.get(id) {
            Some(Obj::Dict(v)) => Some(v),
            _ => None,
        }
    }

    /// The items of a short tuple (call arguments, persistent ids); longer ones are refused
    /// before anything is copied, so a huge memoized tuple cannot be copied over and over.
    fn tuple_items(&self, v: &Value) -> PResult<Vec<Value>> {
        match v {
            Value::Tuple(id) => {
                let items = self.seq(*id).unwrap_or(&[]);
                if items.len() > MAX_ARGS {
                    return Err(self.err(format!(
                        "tuple of {} items where at most {MAX_ARGS} are expected",
                        items.len()
                    )));
                }
                Ok(items.to_vec())
            }
            other => Err(self.err(format!("expected a tuple, found a {}", other.kind()))),
        }
    }

    fn setitems(&mut self, items: Vec<Value>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let target = self.top()?.clone();
        let Value::Dict(id) = target else {
            return Err(self.err(format!("SETITEM on a {}", target.kind())));
        };
        let Some(Obj::Dict(d)) = self.objs.get_mut(id) else {
            return Err(self.err("SETITEM on a missing dict"));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn appends(&mut self, items: Vec<Value>) -> PResult<()> {
        let target = self.top()?.clone();
        let (Value::List(id) | Value::Tuple(id)) = target else {
            return Err(self.err(format!("APPEND on a {}", target.kind())));
        };
        if matches!(target, Value::Tuple(_)) {
            return Err(self.err("APPEND on a tuple"));
        }
        let Some(Obj::Seq(l)) = self.objs.get_mut(id) else {
            return Err(self.err("APPEND on a missing list"));
        };
        l.extend(items);
        Ok(())
    }

    fn memo_get(&self, key: u32) -> PResult<Value> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> PResult<Value> {
        resolve_global(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                format!(
                    "{REFUSING}: it references '{}.{}', which is not on loratool's allow-list",
                    module.escape_debug(),
                    name.escape_debug()
                )
            })
    }

    // --- the main loop ---

    /// Runs until STOP and returns the pickled object; `self.pos` is then just past STOP.
    fn run(&mut self) -> PResult<Value> {
        loop {
            self.op_at = self.pos;
            if self.max_ops.is_some_and(|n| self.ops_started >= n) {
                self.ops_exhausted = true;
                return Err(self.err("opcode limit reached"));
            }
            self.ops_started += 1;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint; the framed opcodes follow inline.
                    let n = self.len_u64()?;
                    if n > self.data.len().saturating_sub(self.pos) {
                        return Err(self.err("frame runs past the end of the data"));
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    let v = self.long(n)?;
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    let v = self.long(n)?;
                    self.push(v);
                }
                b'I' => {
                    let line = self.line_str()?;
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().map_err(|_| self.err("bad INT"))?),
                    };
                    self.push(v);
                }
                b'L' => {
                    let line = self.line_str()?;
                    let s = line.trim().trim_end_matches('L');
                    let v = match s.parse::<i128>() {
                        Ok(v) => Value::Int(v),
                        Err(_)
                            if !s.is_empty()
                                && s.bytes().all(|b| b.is_ascii_digit() || b == b'-') =>
                        {
                            Value::BigInt
                        }
                        Err(_) => return Err(self.err("bad LONG")),
                    };
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                b'F' => {
                    let line = self.line_str()?;
                    let v = line.trim().parse().map_err(|_| self.err("bad FLOAT"))?;
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                b'V' => {
                    let line = self.line()?;
                    let s = raw_unicode_escape(line).ok_or_else(|| self.err("bad UNICODE"))?;
                    self.push(Value::Str(Rc::from(s)));
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n =
                        usize::try_from(n).map_err(|_| self.err("negative BINSTRING length"))?;
                    let v = self.py2_str(n)?;
                    self.push(v);
                }
                b'U' => {
                    let n = usize::from(self.u8()?);
                    let v = self.py2_str(n)?;
                    self.push(v);
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => usize::from(self.u8()?),
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(bytes)));
                }
                b'}' => {
                    let id = self.new_obj(Obj::Dict(Vec::new()));
                    self.push(Value::Dict(id));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let id = self.new_obj(Obj::Dict(Vec::new()));
                    self.push(Value::Dict(id));
                    self.setitems(items)?;
                }
                b']' | 0x8f => {
                    let id = self.new_obj(Obj::Seq(Vec::new()));
                    self.push(Value::List(id));
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let id = self.new_obj(Obj::Seq(items));
                    self.push(Value::List(id));
                }
                b')' => {
                    let id = self.new_obj(Obj::Seq(Vec::new()));
                    self.push(Value::Tuple(id));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let id = self.new_obj(Obj::Seq(items));
                    self.push(Value::Tuple(id));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let id = self.new_obj(Obj::Seq(items));
                    self.push(Value::Tuple(id));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.setitems(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.setitems(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.appends(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.appends(items)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let line = self.line_str()?;
                    let k = line.trim().parse().map_err(|_| self.err("bad PUT"))?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err("memo full"))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    let v = self.memo_get(k.into())?;
                    self.push(v);
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.push(v);
                }
                b'g' => {
                    let line = self.line_str()?;
                    let k = line.trim().parse().map_err(|_| self.err("bad GET"))?;
                    let v = self.memo_get(k)?;
                    self.push(v);
                }
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                b'i' => {
                    // INST instantiates a class: never acceptable, but name it like GLOBAL does.
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.global(module, name)?;
                    return Err(self.err(format!("INST of '{module}.{name}' is not supported")));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(&func, &args)?;
                    self.push(v);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Value::Global(Global::OrderedDict) => {
                            let id = self.new_obj(Obj::Dict(Vec::new()));
                            self.push(Value::Dict(id));
                        }
                        Value::Global(Global::Inert(inert)) if inert.builds_value() => {
                            self.push(Value::Inert(inert));
                        }
                        other => {
                            return Err(self
                                .err(format!("NEWOBJ of a {} is not supported", describe(&other))))
                        }
                    }
                }
                b'b' => {
                    // BUILD sets object state (OrderedDict `_metadata`, tensor attributes, an
                    // inert object's fields); the state carries no tensor data, so it is dropped.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(target, Value::Dict(_) | Value::Tensor(_) | Value::Inert(_)) {
                        return Err(self.err(format!("BUILD on a {}", describe(target))));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v);
                }
                b'P' => {
                    let line = self.line()?;
                    let pid = self.text_persistent_id(line)?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v);
                }
                b'S' => {
                    let line = self.line()?;
                    let bytes = string_literal(line).ok_or_else(|| {
                        self.err("STRING argument is not a quoted string literal")
                    })?;
                    self.push(py2_text(&bytes));
                }
                other => {
                    return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}")));
                }
            }
        }
    }

    fn long(&mut self, n: usize) -> PResult<Value> {
        let bytes = self.take(n)?;
        if n > 16 {
            return Ok(Value::BigInt);
        }
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(bytes);
        }
        Ok(Value::Int(i128::from_le_bytes(buf)))
    }

    /// Protocol 0 writes a persistent id as `str()` of torch's tuple, e.g.
    /// `('storage', <class 'torch.HalfStorage'>, '0', 'cpu', 4)` (torch.load itself cannot read
    /// it back). Parsed into the tuple BINPERSID would carry: plain quoted strings (no escapes),
    /// integers, `None`, and classes, which go through the same allow-list as GLOBAL.
    fn text_persistent_id(&mut self, line: &[u8]) -> PResult<Value> {
        let bad = |m: &Self| m.err("text persistent id is not a tuple torch writes");
        let text = std::str::from_utf8(line).map_err(|_| bad(self))?;
        let inner = text
            .trim()
            .strip_prefix('(')
            .and_then(|t| t.strip_suffix(')'))
            .ok_or_else(|| bad(self))?;
        let mut items = Vec::new();
        let mut rest = inner.trim_start();
        while !rest.is_empty() {
            if items.len() >= MAX_ARGS {
                return Err(bad(self));
            }
            let (item, after) = if let Some(r) = rest.strip_prefix("<class '") {
                let end = r.find("'>").ok_or_else(|| bad(self))?;
                let (module, name) = r[..end].rsplit_once('.').ok_or_else(|| bad(self))?;
                (self.global(module, name)?, &r[end + 2..])
            } else if let Some(q) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
                let r = &rest[1..];
                let end = r.find(q).ok_or_else(|| bad(self))?;
                if r[..end].contains('\\') {
                    return Err(bad(self));
                }
                (Value::Str(Rc::from(&r[..end])), &r[end + 1..])
            } else if let Some(r) = rest.strip_prefix("None") {
                (Value::None, r)
            } else {
                let end = rest
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(rest.len());
                let v: i128 = rest[..end].parse().map_err(|_| bad(self))?;
                (Value::Int(v), &rest[end..])
            };
            items.push(item);
            let after = after.trim_start();
            rest = match after.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if after.is_empty() => after,
                None => return Err(bad(self)),
            };
        }
        let id = self.new_obj(Obj::Seq(items));
        Ok(Value::Tuple(id))
    }

    fn persistent_load(&mut self, pid: &Value) -> PResult<Value> {
        if !self.allow_storages {
            return Err(self.err("persistent id outside the main pickle"));
        }
        let items = self.tuple_items(pid)?;
        match items.first() {
            Some(Value::Str(s)) if &**s == "storage" => {}
            Some(Value::Str(s)) => {
                return Err(self.err(format!("unsupported persistent id '{}'", s.escape_debug())))
            }
            _ => return Err(self.err("persistent id is not a ('storage', ...) tuple")),
        }
        let (kind, key, numel) = match items.as_slice() {
            [_, kind, Value::Str(key), _location, numel] => (kind, key, numel),
            [_, kind, Value::Str(key), _location, numel, view] => {
                if !matches!(view, Value::None) {
                    return Err(self.err("storage views (view_metadata) are not supported"));
                }
                (kind, key, numel)
            }
            _ => return Err(self.err("storage persistent id has the wrong shape")),
        };
        let kind = match kind {
            Value::Global(Global::TypedStorage(d) | Global::DtypeObject(d)) => {
                StorageKind::Typed(*d)
            }
            Value::Global(Global::UntypedStorage) => StorageKind::Untyped,
            other => {
                return Err(self.err(format!(
                    "storage type is a {}, not a torch storage class",
                    describe(other)
                )))
            }
        };
        let numel = as_usize(numel).ok_or_else(|| self.err("storage size is not a valid count"))?;
        // Storages are counted by the file; a count larger than the whole input cannot be real.
        if let Some(&i) = self.by_key.get(&**key) {
            let same = self
                .storages
                .get(i)
                .is_some_and(|s| s.kind == kind && s.numel == numel);
            if !same {
                return Err(self.err(format!(
                    "storage '{}' is declared twice with different types or sizes",
                    key.escape_debug()
                )));
            }
            return Ok(Value::Storage(i));
        }
        let r = StorageRef {
            key: key.to_string(),
            kind,
            numel,
        };
        r.byte_len().map_err(|e| self.err(e))?;
        self.by_key.insert(r.key.clone(), self.storages.len());
        self.storages.push(r);
        Ok(Value::Storage(self.storages.len() - 1))
    }

    fn reduce(&mut self, func: &Value, args: &Value) -> PResult<Value> {
        let Value::Global(g) = func else {
            return Err(self.err(format!(
                "REDUCE calls a {}, which is not callable",
                func.kind()
            )));
        };
        let args = self.tuple_items(args)?;
        match g {
            Global::OrderedDict => {
                // torch always writes `OrderedDict()` and fills it with SETITEMS; building from an
                // item list would copy it on every call, so that form is refused.
                if !args.is_empty() {
                    return Err(self.err("OrderedDict built from an item list is not supported"));
                }
                let id = self.new_obj(Obj::Dict(Vec::new()));
                Ok(Value::Dict(id))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let (min, max) = match g {
                    Global::RebuildTensor => (4, 4),
                    Global::RebuildTensorV2 => (6, 7),
                    _ => (7, 8),
                };
                if args.len() < min || args.len() > max {
                    return Err(self.err(format!(
                        "tensor rebuild takes {min} to {max} arguments, found {}",
                        args.len()
                    )));
                }
                self.rebuild_tensor(&args, *g == Global::RebuildTensorV3)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() >= 3 => Ok(t.clone()),
                _ => Err(self.err("parameter rebuild without a tensor")),
            },
            Global::CodecsEncode => match args.as_slice() {
                [Value::Str(s), Value::Str(enc)] | [Value::Str(s), Value::Str(enc), _] => {
                    let bytes: Vec<u8> = match &**enc {
                        "latin1" | "latin-1" | "iso-8859-1" => s
                            .chars()
                            .map(|c| u8::try_from(u32::from(c)).ok())
                            .collect::<Option<_>>()
                            .ok_or_else(|| self.err("character outside Latin-1"))?,
                        "utf-8" | "utf8" => s.as_bytes().to_vec(),
                        other => {
                            return Err(self.err(format!(
                                "_codecs.encode with unsupported encoding '{}'",
                                other.escape_debug()
                            )))
                        }
                    };
                    Ok(Value::Bytes(Rc::from(bytes)))
                }
                _ => Err(self.err("_codecs.encode needs (string, encoding)")),
            },
            Global::RebuildDeviceTensorFromNumpy => Err(self.err(
                "tensors rebuilt from numpy arrays (_rebuild_device_tensor_from_numpy) are not supported",
            )),
            Global::Inert(inert) if inert.builds_value() => Ok(Value::Inert(*inert)),
            Global::TypedStorage(_)
            | Global::UntypedStorage
            | Global::DtypeObject(_)
            | Global::Inert(_) => {
                Err(self.err(format!("REDUCE on {} is not supported", describe(func))))
            }
        }
    }

    fn rebuild_tensor(&mut self, args: &[Value], v3: bool) -> PResult<Value> {
        let [storage, offset, size, stride, ..] = args else {
            return Err(self.err("tensor rebuild needs storage, offset, size and stride"));
        };
        let Value::Storage(si) = storage else {
            return Err(self.err(format!(
                "tensor rebuild from a {}, not a storage",
                storage.kind()
            )));
        };
        let kind = self
            .storages
            .get(*si)
            .map(|s| s.kind)
            .ok_or_else(|| self.err("storage out of range"))?;
        let dtype = if v3 {
            match args.get(6) {
                Some(Value::Global(Global::DtypeObject(d))) => *d,
                _ => return Err(self.err("_rebuild_tensor_v3 without a dtype")),
            }
        } else {
            match kind {
                StorageKind::Typed(d) => d,
                StorageKind::Untyped => {
                    return Err(self.err("tensor rebuilt from an untyped storage without a dtype"))
                }
            }
        };
        if v3 && kind != StorageKind::Untyped && kind != StorageKind::Typed(dtype) {
            return Err(self.err("tensor dtype differs from its typed storage"));
        }
        let offset =
            as_usize(offset).ok_or_else(|| self.err("storage offset is not a valid count"))?;
        let shape = self.usize_tuple(size, "size")?;
        let stride = self.usize_tuple(stride, "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "tensor has {} dimensions but {} strides",
                shape.len(),
                stride.len()
            )));
        }
        self.tensors.push(TensorDesc {
            storage: *si,
            dtype,
            offset,
            shape,
            stride,
        });
        Ok(Value::Tensor(self.tensors.len() - 1))
    }

    fn usize_tuple(&self, v: &Value, what: &str) -> PResult<Vec<usize>> {
        let items = match v {
            Value::Tuple(id) | Value::List(id) => self.seq(*id).unwrap_or(&[]),
            other => return Err(self.err(format!("tensor {what} is a {}", other.kind()))),
        };
        if items.len() > MAX_DIMS {
            return Err(self.err(format!("tensor {what} has more than {MAX_DIMS} dimensions")));
        }
        items
            .iter()
            .map(|x| {
                as_usize(x).ok_or_else(|| {
                    self.err(format!(
                        "tensor {what} holds a negative or non-integer value"
                    ))
                })
            })
            .collect()
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Global(g) => format!("{g:?}"),
        Value::Inert(g) => format!("{g:?} object"),
        other => other.kind().to_string(),
    }
}

/// Python 2 `str` bytes as text: UTF-8 when valid, else Latin-1.
fn py2_text(bytes: &[u8]) -> Value {
    let s: String = match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    Value::Str(Rc::from(s))
}

/// The argument of protocol 0's STRING opcode: a quoted Python 2 `str` literal, unescaped as
/// Python's `codecs.escape_decode` does (`\\`, `\'`, `\n`, `\xHH`, octal, ...; an unknown escape
/// keeps its backslash).
fn string_literal(line: &[u8]) -> Option<Vec<u8>> {
    let (&first, rest) = line.split_first()?;
    let (&last, body) = rest.split_last()?;
    if first != last || !matches!(first, b'\'' | b'"') {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let &e = body.get(i)?;
        i += 1;
        match e {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(e),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match body.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let hex = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            other => out.extend_from_slice(&[b'\\', other]),
        }
    }
    Some(out)
}

/// Decodes Python's raw-unicode-escape (`\uXXXX` and `\UXXXXXXXX`; other bytes are Latin-1).
fn raw_unicode_escape(bytes: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let digits = match (b, bytes.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if digits == 0 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 2..i + 2 + digits)?;
        let code = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        out.push(char::from_u32(code)?);
        i += 2 + digits;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pickle and returns the machine and its result (or the error).
    fn run(bytes: &[u8]) -> (Machine<'_>, PResult<Value>) {
        let mut m = Machine::new(bytes, true);
        let r = m.run();
        (m, r)
    }

    fn short_str(s: &str) -> Vec<u8> {
        let mut v = vec![0x8c, s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn scalars_and_ints() {
        // LONG1 with 0xff -> -1; BININT -2; BININT2 513; BINFLOAT 1.5
        let mut p = vec![0x80, 2, b'(', 0x8a, 1, 0xff, b'J'];
        p.extend_from_slice(&(-2i32).to_le_bytes());
        p.extend_from_slice(&[b'M', 1, 2, b'G']);
        p.extend_from_slice(&1.5f64.to_be_bytes());
        p.extend_from_slice(&[b'N', 0x88, b't', b'.']);
        let (m, r) = run(&p);
        let Value::Tuple(id) = r.unwrap() else {
            panic!("not a tuple")
        };
        let items = m.seq(id).unwrap();
        assert!(matches!(items[0], Value::Int(-1)));
        assert!(matches!(items[1], Value::Int(-2)));
        assert!(matches!(items[2], Value::Int(513)));
        assert!(matches!(items[3], Value::Float(f) if f == 1.5));
        assert!(matches!(items[4], Value::None));
        assert!(matches!(items[5], Value::Bool(true)));
    }

    #[test]
    fn dict_memo_and_shared_mutation() {
        // d = {}; memo[0] = d; d['a'] = [1]; result = (d, memo[0]) — both the same dict.
        let mut p = vec![0x80, 4, b'}', 0x94];
        p.extend(short_str("a"));
        p.extend_from_slice(&[b']', b'K', 1, b'a', b's', b'h', 0, 0x86, b'.']);
        let (m, r) = run(&p);
        let Value::Tuple(id) = r.unwrap() else {
            panic!()
        };
        let items = m.seq(id).unwrap();
        let (Value::Dict(a), Value::Dict(b)) = (&items[0], &items[1]) else {
            panic!()
        };
        assert_eq!(a, b);
        assert_eq!(m.dict(*a).unwrap().len(), 1);
    }

    #[test]
    fn disallowed_global_is_refused_when_read() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let (_, r) = run(p);
        assert_eq!(
            r.unwrap_err(),
            "refusing to load pickle: it references 'os.system', which is not on loratool's allow-list"
        );
        let mut p = vec![0x80, 4];
        p.extend(short_str("builtins"));
        p.extend(short_str("eval"));
        p.push(0x93);
        let (_, r) = run(&p);
        assert!(r.unwrap_err().contains("'builtins.eval'"));
    }

    #[test]
    fn storage_and_tensor_rebuild() {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p.extend(short_str("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(short_str("0"));
        p.extend(short_str("cpu"));
        p.extend_from_slice(&[
            b'K', 6, b't', b'Q', b'K', 1, b'K', 2, b'K', 2, 0x86, b'K', 1, b'K', 2, 0x86,
        ]);
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR}b.");
        let (m, r) = run(&p);
        let Value::Tensor(t) = r.unwrap() else {
            panic!()
        };
        let d = &m.tensors[t];
        assert_eq!(
            (d.dtype, d.offset, d.shape.clone(), d.stride.clone()),
            (Dtype::F32, 1, vec![2, 2], vec![1, 2])
        );
        assert_eq!(m.storages[0].numel, 6);
        assert!(check_extent(d, 20).is_ok());
        assert!(check_extent(d, 19)
            .unwrap_err()
            .contains("runs past its storage"));
    }

    #[test]
    fn malformed_inputs_error_without_panicking() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x80",
            b"\x80\x02",
            b"\x80\x02.",
            b"\x80\x02(u.",
            b"\x80\x02h\x05.",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x02(N0.",
            b"\x80\x02K\x01K\x02s.",
            b"\x80\x02K\x01)R.",
            b"\x80\x02\xff",
            b"\x80\x06.",
            b"\x80\x02NQ.",
            b"\x80\x02K\x00b.",
        ];
        for c in cases {
            let (_, r) = run(c);
            assert!(r.is_err(), "{c:?} should fail");
        }
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        // 200k nested TUPLE1s: no recursion in the machine or in dropping the arena.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 200_000));
        p.push(b'.');
        let (m, r) = run(&p);
        assert!(matches!(r, Ok(Value::Tuple(_))));
        drop(m);
    }

    #[test]
    fn gather_transposed_view() {
        // storage [0,1,2,3,4,5] as u8; view shape [3,2] stride [1,3] = transpose of [[0,1,2],[3,4,5]]
        let s = [0u8, 1, 2, 3, 4, 5];
        let Gathered::Copied(v) = gather(&s, 1, &[3, 2], &[1, 3], 0).unwrap() else {
            panic!()
        };
        assert_eq!(v, vec![0, 3, 1, 4, 2, 5]);
        let Gathered::Range(a, b) = gather(&s, 1, &[2, 2], &[2, 1], 1).unwrap() else {
            panic!()
        };
        assert_eq!((a, b), (1, 5));
        let Gathered::Range(a, b) = gather(&s, 1, &[], &[], 5).unwrap() else {
            panic!()
        };
        assert_eq!((a, b), (5, 6));
        assert!(gather(&s, 1, &[3, 2], &[1, 4], 0).is_err());
    }

    #[test]
    fn cyclic_and_shared_dicts_are_refused() {
        // d = {}; d['me'] = d
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        p.extend(short_str("me"));
        p.extend_from_slice(&[b'h', 0, b's', b'.']);
        let (m, r) = run(&p);
        let top = r.unwrap();
        let e = finish(&m, &top, Vec::new(), p.len()).err().unwrap();
        assert!(e.contains("appears more than once"), "{e}");
    }

    #[test]
    fn expanded_views_and_item_list_ordereddicts_are_refused() {
        let d = TensorDesc {
            storage: 0,
            dtype: Dtype::F32,
            offset: 0,
            shape: vec![1_000_000],
            stride: vec![0],
        };
        assert!(check_extent(&d, 4)
            .unwrap_err()
            .contains("expanded or overlapping"));
        let p = b"\x80\x02ccollections\nOrderedDict\n]\x85R.";
        let (_, r) = run(p);
        assert!(r.unwrap_err().contains("item list"));
    }

    #[test]
    fn a1111_globals_are_inert_data_and_the_list_is_exact() {
        // {'s': set([1]), 'x': numpy scalar(dtype('f8') + BUILD, b'...'), 'cb': ModelCheckpoint
        // instance (NEWOBJ + BUILD), 'm': the module, 'k': {ModelCheckpoint: 1}} at protocol 2.
        let mut p = b"\x80\x02}(".to_vec();
        p.extend(short_str("s"));
        p.extend_from_slice(b"c__builtin__\nset\n]K\x01a\x85R");
        p.extend(short_str("x"));
        p.extend_from_slice(b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n");
        p.extend(short_str("f8"));
        p.extend_from_slice(b"\x89\x88\x87R(K\x03tbc_codecs\nencode\n");
        p.extend(short_str("\u{0}\u{0}"));
        p.extend(short_str("latin1"));
        p.extend_from_slice(b"\x86R\x86R");
        p.extend(short_str("cb"));
        p.extend_from_slice(
            b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)\x81}b",
        );
        p.extend(short_str("m"));
        p.extend_from_slice(b"cpytorch_lightning.callbacks\nmodel_checkpoint\n");
        p.extend(short_str("k"));
        p.extend_from_slice(
            b"}cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\nK\x01su.",
        );
        let (m, r) = run(&p);
        let Value::Dict(id) = r.unwrap() else {
            panic!()
        };
        let d = m.dict(id).unwrap();
        assert_eq!(d.len(), 5);
        assert!(matches!(d[0].1, Value::Inert(InertGlobal::Set)));
        assert!(matches!(d[1].1, Value::Inert(InertGlobal::NumpyScalar)));
        assert!(matches!(d[2].1, Value::Inert(InertGlobal::ModelCheckpoint)));
        assert!(matches!(
            d[3].1,
            Value::Global(Global::Inert(InertGlobal::ModelCheckpointModule))
        ));
        // Near misses of A1111's names stay refused: numpy 2's module, Python 3's builtins,
        // other Lightning callbacks, tensor-subclass rebuilds A1111 does not list.
        for (module, name) in [
            ("numpy._core.multiarray", "scalar"),
            ("builtins", "set"),
            (
                "pytorch_lightning.callbacks.early_stopping",
                "EarlyStopping",
            ),
            ("pytorch_lightning.callbacks", "ModelCheckpoint"),
            ("torch._tensor", "_rebuild_from_type_v2"),
            ("numpy", "load"),
        ] {
            assert!(resolve_global(module, name).is_none(), "{module}.{name}");
        }
        // A module is not callable, and neither is a global that names one.
        let (_, r) = run(b"\x80\x02cpytorch_lightning.callbacks\nmodel_checkpoint\n)R.");
        assert!(r.unwrap_err().contains("not supported"));
    }

    #[test]
    fn protocol_0_strings_and_text_persistent_ids() {
        assert_eq!(
            string_literal(b"'a\\'b\\x41\\101\\n\\q'").unwrap(),
            b"a'bAA\n\\q"
        );
        assert_eq!(string_literal(b"\"it's\"").unwrap(), b"it's");
        for bad in [&b"'abc"[..], b"abc", b"'", b"'\\x4'", b"'a\""] {
            assert!(string_literal(bad).is_none(), "{bad:?}");
        }
        let mut m = Machine::new(b"", true);
        let pid = m
            .text_persistent_id(b"('storage', <class 'torch.HalfStorage'>, '0', 'cpu', 4)")
            .unwrap();
        let Value::Storage(s) = m.persistent_load(&pid).unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.storages[s].numel, m.storages[s].kind),
            (4, StorageKind::Typed(Dtype::F16))
        );
        let e = m
            .text_persistent_id(b"('storage', <class 'os.system'>, '0', 'cpu', 4)")
            .unwrap_err();
        assert!(e.starts_with(REFUSING), "{e}");
        for bad in [
            &b"storage"[..],
            b"('storage', <class 'torch.HalfStorage', '0')",
            b"('a\\'b')",
            b"(1 2)",
            b"(1,,2)",
        ] {
            assert!(m.text_persistent_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unversioned_pickle_sniff() {
        assert!(looks_like_unversioned_pickle(
            b"L119547037146038801333356L\n."
        ));
        assert!(looks_like_unversioned_pickle(
            b"(dp0\nVa\np1\nI1\nsVb\np2\nI2\ns."
        ));
        assert!(looks_like_unversioned_pickle(b"cos\nsystem\n(S'ls'\ntR."));
        // Eight clean opcodes count even when the window ends inside the pickle.
        assert!(looks_like_unversioned_pickle(
            b"(I1\nI2\nI3\nI4\nI5\nI6\nI7\nI8\nI9\n"
        ));
        for not in [
            &b"{\"a\": 1}"[..],
            b"L12",
            b"(\xff\xff",
            b"X\xff\xff\xff\xff",
            b"hello",
        ] {
            assert!(!looks_like_unversioned_pickle(not), "{not:?}");
        }
    }

    #[test]
    fn unicode_escape() {
        assert_eq!(raw_unicode_escape(b"a\\u00e9\\U0001F600").unwrap(), "aé😀");
        assert!(raw_unicode_escape(b"\\u12").is_none());
    }
}

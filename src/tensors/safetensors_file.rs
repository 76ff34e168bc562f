//! Validated, memory-mapped safetensors reading.
//!
//! Validate first, then trust: the whole header is checked (length against the file size, JSON
//! object, unique names, known dtypes, sizes matching shapes, offsets inside the data section and
//! neither overlapping nor leaving gaps) before any tensor view is handed out. The `safetensors`
//! crate parses the header; the checks it lacks (duplicate names, errors that name the offending
//! tensor) are done here first.

use super::{Dtype, TensorInfo};
use crate::{Error, Result};
use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The crate's own limit on header size; a larger header is refused before it is read.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// The bytes of a file: mapped from disk, or owned (in-memory data, fuzzing, tests).
enum Buffer {
    /// The mapping and the open file (kept for in-kernel copies of whole tensors).
    Mapped(Mmap, File),
    Owned(Vec<u8>),
}

/// An opened, fully validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    buffer: Buffer,
    header_len: u64,
    tensors: Vec<TensorInfo>,
    /// Byte range of each tensor inside the data section, parallel to `tensors`.
    ranges: Vec<(usize, usize)>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::bad_file(path, "file is empty"));
        }
        // SAFETY: the map is read-only; loratool never writes to its inputs. A file truncated by
        // another process while mapped is the one hazard mmap brings, as with every mmap reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_buffer(path, Buffer::Mapped(mmap, file))
    }

    /// Validates an in-memory safetensors image; `label` names it in errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_buffer(label, Buffer::Owned(bytes))
    }

    fn from_buffer(path: &Path, buffer: Buffer) -> Result<Self> {
        let bytes: &[u8] = match &buffer {
            Buffer::Mapped(m, _) => m,
            Buffer::Owned(v) => v,
        };
        let parsed = parse(bytes).map_err(|reason| Error::bad_file(path, reason))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            buffer,
            header_len: parsed.header_len,
            tensors: parsed.tensors,
            ranges: parsed.ranges,
            metadata: parsed.metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in the order their data is laid out in the file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Length of the JSON header (the `N` of the 8+N prefix).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Offset of the first data byte in the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// Offset of the first data byte of the safetensors file at `path`, from its length prefix
    /// alone (nothing else is read or checked): for callers that hash a file they inspected
    /// separately. `None` when the file is shorter than the prefix.
    pub fn data_start_of(path: &Path) -> std::io::Result<Option<u64>> {
        use std::io::Read;
        let mut prefix = [0u8; 8];
        match std::fs::File::open(path)?.read_exact(&mut prefix) {
            Ok(()) => Ok(Some(8 + u64::from_le_bytes(prefix))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// This file's header with `__metadata__` replaced by `metadata` and nothing else changed:
    /// every tensor entry is kept with its dtype, shape and data offsets, in the header's own
    /// order (so the data section can be copied unchanged after it), kept metadata keys stay in
    /// their order and new ones follow. An empty `metadata` drops `__metadata__`; a new one goes
    /// first, where the writer puts it. Padded with spaces to a multiple of 8, as safetensors does.
    pub fn header_with_metadata(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        use serde_json::{Map, Value};
        let start = 8;
        let text = &self.bytes()[start..start + self.header_len as usize];
        // Validated on open; parsed again here keeping the key order (serde_json's preserve_order).
        let entries: Map<String, Value> = serde_json::from_slice(text)
            .map_err(|e| Error::bad_file(&self.path, format!("header is not valid JSON: {e}")))?;
        let mut meta = Map::new();
        if let Some(Value::Object(old)) = entries.get("__metadata__") {
            for key in old.keys() {
                if let Some(v) = metadata.get(key) {
                    meta.insert(key.clone(), Value::String(v.clone()));
                }
            }
        }
        for (k, v) in metadata {
            if !meta.contains_key(k) {
                meta.insert(k.clone(), Value::String(v.clone()));
            }
        }
        let mut meta = (!meta.is_empty()).then_some(Value::Object(meta));
        let mut header = Map::new();
        if !entries.contains_key("__metadata__") {
            if let Some(m) = meta.take() {
                header.insert("__metadata__".into(), m);
            }
        }
        for (k, v) in entries {
            if k == "__metadata__" {
                if let Some(m) = meta.take() {
                    header.insert(k, m);
                }
            } else {
                header.insert(k, v);
            }
        }
        let mut bytes = serde_json::to_vec(&header).expect("header serializes");
        super::writer::pad_header(&mut bytes);
        if bytes.len() as u64 > MAX_HEADER_LEN {
            return Err(Error::Invalid(format!(
                "{}: the new header would be {} bytes, more than the 100 MB safetensors allows",
                self.path.display(),
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// The open file, for files read from disk (in-kernel copies of its data section).
    pub fn file(&self) -> Option<&File> {
        match &self.buffer {
            Buffer::Mapped(_, f) => Some(f),
            Buffer::Owned(_) => None,
        }
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        match &self.buffer {
            Buffer::Mapped(m, _) => m,
            Buffer::Owned(v) => v,
        }
    }

    /// Drops this process's mapped pages (the page cache keeps them). Streaming commands call this
    /// after each window so that reading a large input does not grow the resident set.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Buffer::Mapped(m, _) = &self.buffer {
            // SAFETY: the mapping is a read-only shared file mapping; dropping its pages only
            // makes later reads fault them in again from the file, with identical contents.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Drops the mapped pages of tensors `first..=last` (in data order) — the part of the file a
    /// streaming window has finished with — without touching the rest of the mapping.
    pub fn release_tensor_pages(&self, first: usize, last: usize) {
        #[cfg(unix)]
        if let (Buffer::Mapped(m, _), Some(a), Some(b)) =
            (&self.buffer, self.ranges.get(first), self.ranges.get(last))
        {
            let page = 4096;
            let start = (self.data_start() as usize + a.0) / page * page;
            let end = (self.data_start() as usize + b.1).min(m.len());
            if end > start {
                // SAFETY: as in `release_pages`.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    /// The open file and the byte range (offset, length) of the tensor at `index` in it, for
    /// files read from disk.
    pub fn tensor_location(&self, index: usize) -> Option<(&File, u64, usize)> {
        let (s, e) = self.ranges[index];
        match &self.buffer {
            Buffer::Mapped(_, f) => Some((f, self.data_start() + s as u64, e - s)),
            Buffer::Owned(_) => None,
        }
    }

    /// The stored bytes of a small tensor (at most 4 KiB: alphas, scales, biases of LoRA files)
    /// read from the file instead of its mapping; `None` for larger tensors, in-memory files, or
    /// if the read fails (then the mapping serves it). Touching a mapping maps the file's pages
    /// in large folios (2 MiB on ext4), so reading an SDXL LoRA's 1,052 alphas through it made
    /// the whole 255 MB file resident, the peak of an entire SDXL merge.
    pub fn small_tensor_read(&self, index: usize) -> Option<Vec<u8>> {
        let (s, e) = self.ranges[index];
        match &self.buffer {
            #[cfg(unix)]
            Buffer::Mapped(_, f) if e - s <= 4096 => {
                let mut bytes = vec![0u8; e - s];
                std::os::unix::fs::FileExt::read_exact_at(
                    f,
                    &mut bytes,
                    self.data_start() + s as u64,
                )
                .ok()?;
                Some(bytes)
            }
            _ => None,
        }
    }

    /// The stored bytes of the tensor at `index` of [`Self::tensors`].
    pub fn tensor_bytes(&self, index: usize) -> &[u8] {
        let (s, e) = self.ranges[index];
        let start = self.data_start() as usize;
        &self.bytes()[start + s..start + e]
    }
}

struct Parsed {
    header_len: u64,
    tensors: Vec<TensorInfo>,
    ranges: Vec<(usize, usize)>,
    metadata: BTreeMap<String, String>,
}

/// Checks a whole safetensors buffer and returns its table of contents, or the reason it is bad.
///
/// Fast path: the `safetensors` crate parses and validates the header (dtypes, sizes, contiguous
/// offsets, data length) and a key-only scan adds the duplicate-name check it lacks. Only when
/// something is wrong does the slower diagnostic parse run, to name the offending tensor.
fn parse(buf: &[u8]) -> std::result::Result<Parsed, String> {
    fast_parse(buf).ok_or(()).or_else(|_| parse_diagnostic(buf))
}

/// One typed pass over the header with the crate's `TensorInfo` deserializer (dtype names,
/// shapes, offsets), plus the checks: unique names, known dtypes, sizes matching shapes,
/// contiguous offsets covering exactly the data section. `None` on any problem.
fn fast_parse(buf: &[u8]) -> Option<Parsed> {
    struct Entries(
        Option<BTreeMap<String, String>>,
        Vec<(String, safetensors::tensor::TensorInfo)>,
    );
    struct EntryVisitor;
    impl<'de> Visitor<'de> for EntryVisitor {
        type Value = Entries;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Entries, A::Error> {
            let mut meta = None;
            let mut tensors = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == "__metadata__" {
                    if meta.is_some() {
                        return Err(serde::de::Error::custom("duplicate __metadata__"));
                    }
                    meta = Some(map.next_value()?);
                } else {
                    tensors.push((key, map.next_value()?));
                }
            }
            Ok(Entries(meta, tensors))
        }
    }
    let header_len = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    if header_len > MAX_HEADER_LEN || header_len > (buf.len() as u64).saturating_sub(8) {
        return None;
    }
    let text = std::str::from_utf8(&buf[8..8 + header_len as usize]).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let Entries(meta, entries) = de.deserialize_map(EntryVisitor).ok()?;
    de.end().ok()?;
    let data_len = buf.len() - 8 - header_len as usize;
    let mut infos: Vec<(TensorInfo, (usize, usize))> = Vec::with_capacity(entries.len());
    for (name, info) in entries {
        let dtype = Dtype::from_safetensors_name(&format!("{:?}", info.dtype))?;
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))?
            .checked_mul(info.dtype.bitsize())?;
        let (s, e) = info.data_offsets;
        if !bits.is_multiple_of(8) || e < s || e - s != bits / 8 || e > data_len {
            return None;
        }
        infos.push((
            TensorInfo {
                name,
                dtype,
                shape: info.shape,
            },
            (s, e),
        ));
    }
    infos.sort_by_key(|(_, r)| *r);
    let mut expected = 0;
    for (_, (s, e)) in &infos {
        if *s != expected {
            return None;
        }
        expected = *e;
    }
    if expected != data_len {
        return None;
    }
    let mut names: Vec<&str> = infos.iter().map(|(t, _)| t.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let (tensors, ranges) = infos.into_iter().unzip();
    Some(Parsed {
        header_len,
        tensors,
        ranges,
        metadata: meta.unwrap_or_default(),
    })
}

/// The full, slow validation that names what is wrong.
fn parse_diagnostic(buf: &[u8]) -> std::result::Result<Parsed, String> {
    if buf.len() < 8 {
        return Err(format!(
            "not a safetensors file: {} bytes is shorter than the 8-byte header length",
            buf.len()
        ));
    }
    let header_len = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let file_len = buf.len() as u64;
    if header_len > file_len - 8 {
        return Err(format!(
            "not a safetensors file (or truncated): header length {header_len} runs past the end of the file ({file_len} bytes)"
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format!(
            "safetensors header of {header_len} bytes is larger than the 100 MB limit"
        ));
    }
    let header = &buf[8..8 + header_len as usize];
    let text = std::str::from_utf8(header)
        .map_err(|_| "not a safetensors file: header is not UTF-8 text".to_string())?;
    if !text.trim_start().starts_with('{') {
        return Err("not a safetensors file: header is not a JSON object".into());
    }
    let entries = HeaderEntries::parse(text)?;
    let data_len = (file_len - 8 - header_len) as usize;

    let mut metadata = BTreeMap::new();
    let mut infos: Vec<(TensorInfo, (usize, usize))> = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            let map = value
                .as_object()
                .ok_or("__metadata__ is not a JSON object")?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("__metadata__ value of '{k}' is not a string"))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        infos.push(check_entry(&name, &value, data_len)?);
    }

    infos.sort_by_key(|(_, r)| *r);
    let mut expected = 0usize;
    for (i, (info, (s, e))) in infos.iter().enumerate() {
        if *s < expected {
            let prev = &infos[i - 1].0.name;
            return Err(format!("tensors '{prev}' and '{}' overlap", info.name));
        }
        if *s > expected {
            return Err(format!(
                "tensor '{}' starts at data offset {s}, leaving a gap after offset {expected}",
                info.name
            ));
        }
        expected = *e;
    }
    if expected != data_len {
        return Err(format!(
            "data section has {data_len} bytes but the tensors cover {expected} (truncated or trailing bytes)"
        ));
    }

    // The crate's own parser must agree with everything checked above.
    safetensors::SafeTensors::read_metadata(buf)
        .map_err(|e| format!("invalid safetensors header: {e}"))?;

    let (tensors, ranges) = infos.into_iter().unzip();
    Ok(Parsed {
        header_len,
        tensors,
        ranges,
        metadata,
    })
}

fn check_entry(
    name: &str,
    value: &serde_json::Value,
    data_len: usize,
) -> std::result::Result<(TensorInfo, (usize, usize)), String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("tensor '{name}': entry is not a JSON object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| format!("tensor '{name}': missing dtype"))?;
    let dtype = Dtype::from_safetensors_name(dtype_name)
        .ok_or_else(|| format!("tensor '{name}': unknown dtype '{dtype_name}'"))?;
    let shape = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("tensor '{name}': missing shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("tensor '{name}': shape is not a list of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
        .ok_or_else(|| format!("tensor '{name}': data_offsets is not a pair of integers"))?;
    let (start, end) = offsets;
    if end < start {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] end before they start"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] run past the end of the data section ({data_len} bytes)"
        ));
    }
    let bits_per = match dtype.size() {
        Some(b) => b * 8,
        None => match dtype_name {
            "F4" => 4,
            _ => 6,
        },
    };
    let bytes = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .and_then(|n| n.checked_mul(bits_per))
        .filter(|bits| bits % 8 == 0)
        .map(|bits| bits / 8)
        .ok_or_else(|| {
            format!("tensor '{name}': shape {shape:?} is too large or not byte-sized")
        })?;
    if bytes != end - start {
        return Err(format!(
            "tensor '{name}': shape {shape:?} of {dtype_name} needs {bytes} bytes but data_offsets span {}",
            end - start
        ));
    }
    Ok((
        TensorInfo {
            name: name.to_string(),
            dtype,
            shape,
        },
        offsets,
    ))
}

/// The header's top-level entries in file order, with duplicate names refused (serde's maps
/// silently keep the last duplicate, which would let two tensors hide behind one name).
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl HeaderEntries {
    fn parse(text: &str) -> std::result::Result<Vec<(String, serde_json::Value)>, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        let entries = de
            .deserialize_map(EntriesVisitor)
            .map_err(|e| format!("header is not valid JSON: {e}"))?;
        // Trailing spaces are the format's padding; anything else after the object is not.
        de.end()
            .map_err(|_| "header has data after its JSON object".to_string())?;
        let mut seen = std::collections::HashSet::with_capacity(entries.0.len());
        for (name, _) in &entries.0 {
            if !seen.insert(name.as_str()) {
                return Err(format!("header names tensor '{name}' twice"));
            }
        }
        Ok(entries.0)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = HeaderEntries;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            out.push((k, v));
        }
        Ok(HeaderEntries(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn accepts_valid_file_and_reads_metadata() {
        let buf = file(
            r#"{"__metadata__":{"k":"v"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0u8; 12],
        );
        let p = parse(&buf).unwrap();
        assert_eq!(p.tensors[0].name, "a");
        assert_eq!(p.tensors[1].name, "b");
        assert_eq!(p.metadata["k"], "v");
    }

    #[test]
    fn refuses_each_kind_of_damage_with_a_named_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "shorter than the 8-byte header length"),
            (
                {
                    let mut b = 1000u64.to_le_bytes().to_vec();
                    b.extend_from_slice(b"{}");
                    b
                },
                "runs past the end of the file",
            ),
            (file("[1,2]", &[]), "not a JSON object"),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "names tensor 'a' twice",
            ),
            (
                file(
                    r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "unknown dtype 'Q4'",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "overlap",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &[0; 8],
                ),
                "run past the end of the data section",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "needs 12 bytes but data_offsets span 8",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 8],
                ),
                "tensors cover 4",
            ),
        ];
        for (buf, want) in cases {
            let err = parse(&buf).err().expect("must be refused");
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}

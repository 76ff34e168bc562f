//! Tensor files: reading safetensors and legacy PyTorch pickles through one validated view,
//! dtype conversion, content hashes, and the streaming atomic writer with the outputs under it
//! (files, staging folders) and their cleanup on errors, signals and the next run.

mod dtype;
pub mod hash;
mod output_file;
pub mod pickle;
pub mod placed;
mod safetensors_file;
pub(crate) mod staging;
mod tensor;
mod unfinished;
pub mod writer;

pub use dtype::{fp8_params, Dtype, Fp8Params};
pub use output_file::OutputFile;
pub use pickle::PickleFile;
pub use placed::PlacedWriter;
pub use safetensors_file::SafetensorsFile;
pub use tensor::Tensor;
pub use unfinished::clean_up_on_signals;
/// Removes the hidden temps that killed loratool processes left in a folder.
pub(crate) use unfinished::remove_stale as remove_stale_temps;
pub use writer::{SafetensorsWriter, TensorSpec, WriteOptions};

use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// True when the file starts like a safetensors file: a header length that fits the file,
/// followed by `{`. Checked before the pickle sniff, because a header length's first byte can
/// equal the pickle PROTO opcode (0x80).
fn looks_like_safetensors(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 9];
    if f.read_exact(&mut head).is_err() {
        return Ok(false);
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    Ok(head[8] == b'{' && n <= len.saturating_sub(8))
}

/// Name, type and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The on-disk container of a tensor file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Container {
    Safetensors,
    /// PyTorch `torch.save` output (zip archive or legacy tar-less pickle), read without running code.
    Pickle,
}

impl Container {
    /// Which reader a file goes to, from its first bytes (not its extension): a pickle when it
    /// does not start like safetensors and starts like a zip archive or a pickle; otherwise
    /// safetensors, whose reader then validates it (or says what is wrong).
    pub fn sniff(path: &Path) -> Result<Container> {
        Ok(
            if !looks_like_safetensors(path)? && PickleFile::sniff(path)? {
                Container::Pickle
            } else {
                Container::Safetensors
            },
        )
    }
}

enum Inner {
    Safetensors(SafetensorsFile),
    Pickle(PickleFile),
}

/// Any tensor file loratool reads, validated on open. Tensor data is only touched on request.
pub struct TensorFile {
    inner: Inner,
    index: HashMap<String, usize>,
    empty_metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Opens a tensor file, choosing the reader by content (not by extension): zip archives and
    /// raw pickles go to the safe pickle reader, everything else must be safetensors.
    pub fn open(path: &Path) -> Result<TensorFile> {
        let inner = match Container::sniff(path)? {
            Container::Pickle => Inner::Pickle(PickleFile::open(path)?),
            Container::Safetensors => Inner::Safetensors(SafetensorsFile::open(path)?),
        };
        Ok(Self::with_inner(inner))
    }

    /// A safetensors image held in memory (tests, fuzzing, data received over the network).
    pub fn from_safetensors_bytes(label: &Path, bytes: Vec<u8>) -> Result<TensorFile> {
        Ok(Self::with_inner(Inner::Safetensors(
            SafetensorsFile::from_bytes(label, bytes)?,
        )))
    }

    fn with_inner(inner: Inner) -> TensorFile {
        let infos = match &inner {
            Inner::Safetensors(f) => f.tensors(),
            Inner::Pickle(f) => f.tensors(),
        };
        let index = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        TensorFile {
            inner,
            index,
            empty_metadata: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        match &self.inner {
            Inner::Safetensors(f) => f.path(),
            Inner::Pickle(f) => f.path(),
        }
    }

    pub fn container(&self) -> Container {
        match &self.inner {
            Inner::Safetensors(_) => Container::Safetensors,
            Inner::Pickle(_) => Container::Pickle,
        }
    }

    /// The safetensors view, when the file is one (hashes and byte-level work need it).
    pub fn as_safetensors(&self) -> Option<&SafetensorsFile> {
        match &self.inner {
            Inner::Safetensors(f) => Some(f),
            Inner::Pickle(_) => None,
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        match &self.inner {
            Inner::Safetensors(f) => f.tensors(),
            Inner::Pickle(f) => f.tensors(),
        }
    }

    /// String metadata (`__metadata__`); pickles have none.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        match &self.inner {
            Inner::Safetensors(f) => f.metadata(),
            Inner::Pickle(_) => &self.empty_metadata,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors()[i])
    }

    pub(crate) fn index_of(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| Error::bad_tensor(self.path(), name, "no such tensor in the file"))
    }

    /// Lets go of mapped input pages after a streaming window.
    pub fn release_pages(&self) {
        match &self.inner {
            Inner::Safetensors(f) => f.release_pages(),
            Inner::Pickle(f) => f.release_pages(),
        }
    }

    /// Lets go of the mapped pages of tensors `first..=last` (indices of [`Self::tensors`]); all
    /// mapped pages of a pickle, whose tensors need not lie in order.
    pub fn release_tensor_pages(&self, first: usize, last: usize) {
        match &self.inner {
            Inner::Safetensors(f) => f.release_tensor_pages(first, last),
            Inner::Pickle(f) => f.release_pages(),
        }
    }

    /// Lets go of the mapped pages of one tensor, once a streaming reader is done with it.
    pub fn release_tensor(&self, name: &str) {
        if let Some(&i) = self.index.get(name) {
            self.release_tensor_pages(i, i);
        }
    }

    /// Raw little-endian, row-major bytes of a tensor in its stored dtype.
    pub fn raw_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let i = self.index_of(name)?;
        match &self.inner {
            Inner::Safetensors(f) => Ok(match f.small_tensor_read(i) {
                Some(bytes) => Cow::Owned(bytes),
                None => Cow::Borrowed(f.tensor_bytes(i)),
            }),
            Inner::Pickle(f) => f.tensor_bytes(i),
        }
    }

    /// A tensor converted to f32 for math.
    pub fn read_f32(&self, name: &str) -> Result<Tensor> {
        let info = &self.tensors()[self.index_of(name)?];
        let data = self.decode(name, info.dtype, &self.raw_bytes(name)?)?;
        Ok(Tensor::new(info.shape.clone(), data))
    }

    /// Stored bytes of tensor `name` as f32, or the error naming the file and the dtype.
    fn decode(&self, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
        dtype.decode_f32(bytes).ok_or_else(|| {
            Error::bad_tensor(
                self.path(),
                name,
                format!("dtype {dtype} cannot be converted to f32"),
            )
        })
    }

    /// Rows `rows` of a tensor (along its first dimension) converted to f32, decoding only those
    /// rows' bytes: a q/k/v slice of a fused projection costs a third of the whole.
    pub fn read_f32_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let info = &self.tensors()[self.index_of(name)?];
        let size = info.dtype.size();
        let total = info.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total || size.is_none() {
            return Err(Error::bad_tensor(
                self.path(),
                name,
                format!("cannot read rows {rows:?} of shape {:?}", info.shape),
            ));
        }
        let row_bytes = info.numel() / total.max(1) * size.unwrap_or(0);
        let bytes = self.raw_bytes(name)?;
        let data = self.decode(
            name,
            info.dtype,
            &bytes[rows.start * row_bytes..rows.end * row_bytes],
        )?;
        let mut shape = info.shape.clone();
        shape[0] = rows.len();
        Ok(Tensor::new(shape, data))
    }

    /// A scalar tensor (alpha, on_input, ...) as f32; any element count other than one is refused.
    pub fn read_scalar(&self, name: &str) -> Result<f32> {
        TensorSource::read_scalar(self, name)
    }
}

/// Where math reads named tensors from: a tensor file, or tensors already decoded (so that one
/// pass over a module can hand the same values to several checks without reading them again).
pub trait TensorSource {
    /// The file the tensors come from, for error messages.
    fn path(&self) -> &Path;

    /// A tensor converted to f32.
    fn read_f32(&self, name: &str) -> Result<Tensor>;

    /// A scalar tensor as f32; any element count other than one is refused.
    fn read_scalar(&self, name: &str) -> Result<f32> {
        let t = self.read_f32(name)?;
        match t.data.as_slice() {
            [v] => Ok(*v),
            _ => Err(Error::bad_tensor(
                self.path(),
                name,
                format!("expected a scalar, found shape {:?}", t.shape),
            )),
        }
    }
}

impl TensorSource for TensorFile {
    fn path(&self) -> &Path {
        TensorFile::path(self)
    }

    fn read_f32(&self, name: &str) -> Result<Tensor> {
        TensorFile::read_f32(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{build_header, TensorSpec};
    use super::*;

    #[test]
    fn row_reads_decode_only_the_rows_asked_for() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F16,
            shape: vec![4, 3],
        };
        let header = build_header(&Default::default(), std::slice::from_ref(&spec));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend(Dtype::F16.encode_f32(&values).unwrap());
        let file = TensorFile::from_safetensors_bytes(Path::new("t.safetensors"), bytes).unwrap();
        let rows = file.read_f32_rows("w", 1..3).unwrap();
        assert_eq!(rows.shape, vec![2, 3]);
        assert_eq!(rows.data, values[3..9]);
        let err = file.read_f32_rows("w", 3..5).unwrap_err().to_string();
        assert!(
            err.contains("t.safetensors") && err.contains("rows 3..5"),
            "{err}"
        );
    }
}

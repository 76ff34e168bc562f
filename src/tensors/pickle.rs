//! Legacy PyTorch files (`.ckpt`, `.pt`, `.bin`) read without executing any code.
//! (Placeholder: being written; see PickleFile API.)

use super::TensorInfo;
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

pub struct PickleFile {
    path: PathBuf,
    tensors: Vec<TensorInfo>,
}

impl PickleFile {
    /// True when the file looks like a torch.save output (zip archive or raw pickle stream).
    pub fn sniff(path: &Path) -> Result<bool> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        Ok(n >= 2 && (magic[..2] == *b"PK" || magic[0] == 0x80))
    }

    pub fn open(path: &Path) -> Result<PickleFile> {
        Err(Error::bad_file(path, "PyTorch pickle files are not supported yet"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_bytes(&self, index: usize) -> Result<Cow<'_, [u8]>> {
        Err(Error::bad_tensor(
            &self.path,
            &self.tensors[index].name,
            "not supported yet",
        ))
    }
}

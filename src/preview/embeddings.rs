//! Textual-inversion embeddings from A1111's `embeddings/` folders: `.safetensors` with
//! `emb_params`, and `.pt`/`.bin` pickles with `string_to_param` (read by the project's safe
//! pickle reader). Found by file stem in the prompt; their vectors replace the name's tokens.

use crate::tensors::TensorFile;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Embedding {
    /// The file stem: what a prompt writes to use it.
    pub name: String,
    pub path: PathBuf,
    /// `[vectors][width]`.
    pub vectors: Vec<Vec<f32>>,
}

impl Embedding {
    pub fn width(&self) -> usize {
        self.vectors.first().map_or(0, Vec::len)
    }
}

/// The vector table of one embedding file: `emb_params`, or the one tensor under
/// `string_to_param` (A1111's `*` key), or a file's only 2-D tensor.
pub fn load(path: &Path) -> Result<Embedding> {
    let file = TensorFile::open(path)?;
    let names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
    let pick = names
        .iter()
        .find(|n| *n == "emb_params")
        .or_else(|| names.iter().find(|n| n.contains("string_to_param")))
        .or_else(|| {
            let two_d: Vec<&String> = names
                .iter()
                .filter(|n| file.get(n).is_some_and(|t| t.shape.len() == 2))
                .collect();
            (two_d.len() == 1).then(|| two_d[0])
        })
        .ok_or_else(|| {
            Error::bad_file(
                path,
                "not a textual-inversion embedding (no emb_params or string_to_param)",
            )
        })?;
    let t = file.read_f32(pick)?;
    let (rows, width) = match t.shape.as_slice() {
        [w] => (1, *w),
        [n, w] => (*n, *w),
        other => {
            return Err(Error::bad_file(
                path,
                format!("embedding '{pick}' has shape {other:?}, not [vectors, width]"),
            ))
        }
    };
    Ok(Embedding {
        name: path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        path: path.to_path_buf(),
        vectors: (0..rows)
            .map(|r| t.data[r * width..(r + 1) * width].to_vec())
            .collect(),
    })
}

/// Every embedding in `dirs` (recursively) whose width is the text encoder's; others (another
/// family's, unreadable files) are skipped, as A1111 skips them, and reported in the second list.
pub fn load_dirs(dirs: &[PathBuf], width: usize) -> (Vec<Embedding>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for p in super::files_under(dirs, &["safetensors", "pt", "bin"]) {
        match load(&p) {
            Ok(e) if e.width() == width => found.push(e),
            Ok(e) => skipped.push(format!(
                "{}: vectors of width {}, the text encoder's are {width}",
                p.display(),
                e.width()
            )),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, skipped)
}

//! Textual-inversion embeddings from A1111's `embeddings/` folders: `.safetensors` with
//! `emb_params`, and `.pt`/`.bin` pickles with `string_to_param` (read by the project's safe
//! pickle reader), and SDXL's `.safetensors` with `clip_l` and `clip_g` (one table per text
//! encoder). Found by file stem in the prompt; their vectors replace the name's tokens.

use super::tokenizer::TextualInversion;
use crate::tensors::TensorFile;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Embedding {
    /// The file stem: what a prompt writes to use it.
    pub name: String,
    pub path: PathBuf,
    /// `[vectors][width]`; an SDXL embedding's `clip_l` table.
    pub vectors: Vec<Vec<f32>>,
    /// An SDXL embedding's `clip_g` table (the second, OpenCLIP-G text encoder), the same number
    /// of vectors.
    pub vectors_g: Option<Vec<Vec<f32>>>,
}

impl Embedding {
    /// What A1111 compares with the model's expected width to decide whether an embedding
    /// fits: one table's width, or both of an SDXL embedding's added (768 + 1280).
    pub fn width(&self) -> usize {
        let width = |t: &Vec<Vec<f32>>| t.first().map_or(0, Vec::len);
        width(&self.vectors) + self.vectors_g.as_ref().map_or(0, width)
    }

    /// What the tokenizer needs of it: the name it answers to and how many token slots it fills.
    pub fn inversion(&self) -> TextualInversion {
        TextualInversion {
            name: self.name.clone(),
            vectors: self.vectors.len(),
        }
    }
}

/// The rows of a `[vectors, width]` (or `[width]`) tensor `name` of `file`.
fn read_table(file: &TensorFile, path: &Path, name: &str) -> Result<Vec<Vec<f32>>> {
    let t = file.read_f32(name)?;
    let (rows, width) = match t.shape.as_slice() {
        [w] => (1, *w),
        [n, w] => (*n, *w),
        other => {
            return Err(Error::bad_file(
                path,
                format!("embedding '{name}' has shape {other:?}, not [vectors, width]"),
            ))
        }
    };
    Ok((0..rows)
        .map(|r| t.data[r * width..(r + 1) * width].to_vec())
        .collect())
}

/// The vector table(s) of one embedding file: `emb_params`, or the one tensor under
/// `string_to_param` (A1111's `*` key), or SDXL's `clip_l` + `clip_g`, or a file's only 2-D tensor.
pub fn load(path: &Path) -> Result<Embedding> {
    let file = TensorFile::open(path)?;
    let name = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if file.get("clip_l").is_some() && file.get("clip_g").is_some() {
        let vectors = read_table(&file, path, "clip_l")?;
        let vectors_g = read_table(&file, path, "clip_g")?;
        if vectors.len() != vectors_g.len() {
            return Err(Error::bad_file(
                path,
                format!(
                    "clip_l has {} vectors and clip_g {}; an SDXL embedding has as many of each",
                    vectors.len(),
                    vectors_g.len()
                ),
            ));
        }
        return Ok(Embedding {
            name,
            path: path.to_path_buf(),
            vectors,
            vectors_g: Some(vectors_g),
        });
    }
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
                "not a textual-inversion embedding (no emb_params, string_to_param or clip_l/clip_g)",
            )
        })?;
    Ok(Embedding {
        name,
        path: path.to_path_buf(),
        vectors: read_table(&file, path, pick)?,
        vectors_g: None,
    })
}

/// An embedding file left out, by stem (what a prompt would write) and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// Every embedding in `dirs` (recursively) whose width is the text encoder's; others (another
/// family's, unreadable files) are skipped, as A1111 skips them, and reported in the second list.
pub fn load_dirs(dirs: &[PathBuf], width: usize) -> (Vec<Embedding>, Vec<Skipped>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for p in super::files_under(dirs, &["safetensors", "pt", "bin"]) {
        let skip = |reason: String| Skipped {
            name: p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            reason,
        };
        match load(&p) {
            Ok(e) if e.width() == width => found.push(e),
            Ok(e) if e.vectors_g.is_some() => skipped.push(skip(format!(
                "{}: an SDXL embedding (clip_l + clip_g); the model is not SDXL",
                p.display()
            ))),
            Ok(e) => skipped.push(skip(format!(
                "{}: vectors of width {}, the text encoder's are {width}",
                p.display(),
                e.width()
            ))),
            Err(e) => skipped.push(skip(e.to_string())),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, skipped)
}

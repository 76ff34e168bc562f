//! The library's error type. Every variant that concerns a file names it, so the command layer can
//! print one line that tells the user which file is wrong and how.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid tensor file (safetensors or a safe PyTorch pickle).
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A tensor exists but cannot be used the way it was asked for.
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The file is a readable tensor file, but not an adapter this tool understands.
    #[error("{path}: {reason}")]
    NotAnAdapter { path: PathBuf, reason: String },
    /// The output path exists (checked before the work, or created by someone else while the
    /// output was being written: `appeared`).
    #[error("{}: already exists{}", path.display(), if *appeared { " (it appeared while this output was being written)" } else { "" })]
    OutputExists { path: PathBuf, appeared: bool },
    /// A LoRA made for another model family than what it is combined with; `other` says what
    /// that is ("x.safetensors is a sdxl checkpoint", "the other inputs are sdxl").
    #[error("{lora}: this is a {lora_family} LoRA but {other}")]
    FamilyMismatch {
        lora: PathBuf,
        lora_family: &'static str,
        other: String,
    },
    /// A LoRA whose metadata names one family and whose keys another (`--strict` refuses it).
    #[error("{lora}: its metadata says {metadata} but its keys say {keys}")]
    FamilyConflict {
        lora: PathBuf,
        metadata: &'static str,
        keys: &'static str,
    },
    /// No module of a LoRA has a target in the checkpoint.
    #[error("{lora}: none of its {modules} modules matched anything in {base}")]
    NothingMatched {
        lora: PathBuf,
        modules: usize,
        base: PathBuf,
    },
    /// Some modules of a LoRA have no target in the checkpoint (an error with `--strict`).
    #[error("{lora}: {} of {modules} LoRA modules matched nothing in {base} (first: {})", unmatched.len(), unmatched.iter().take(3).cloned().collect::<Vec<_>>().join(", "))]
    Unmatched {
        lora: PathBuf,
        modules: usize,
        unmatched: Vec<String>,
        base: PathBuf,
    },
    /// A request that cannot be carried out (bad arguments, refused overwrite, ...).
    #[error("{0}")]
    Invalid(String),
    /// A download or a Civitai/Hugging Face lookup that failed; `item` is what was asked for.
    #[error("{item}: {problem}")]
    Fetch {
        item: String,
        problem: crate::hub::Problem,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub fn bad_tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadTensor {
            path: path.into(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

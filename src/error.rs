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
    /// A request that cannot be carried out (bad arguments, refused overwrite, ...).
    #[error("{0}")]
    Invalid(String),
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

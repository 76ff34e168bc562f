//! Content sniffing and the restricted PyTorch pickle reader (zip `torch.save` archives and
//! legacy raw pickles) on arbitrary file contents, through `TensorFile::open`.
//! Must return Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loratool::tensors::TensorFile;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One scratch file per fuzzer process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("loratool-fuzz-pickle-{}.pt", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let Ok(file) = TensorFile::open(path) else {
        return;
    };
    for info in file.tensors() {
        let _ = file.raw_bytes(&info.name);
    }
});

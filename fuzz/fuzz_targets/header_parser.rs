//! Safetensors header validation and tensor access on arbitrary bytes.
//! Must return Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loratool::tensors::TensorFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TensorFile::from_safetensors_bytes(Path::new("fuzz.safetensors"), data.to_vec())
    else {
        return;
    };
    let _ = file.metadata();
    for info in file.tensors() {
        let _ = file.raw_bytes(&info.name);
        if info.dtype.is_numeric() {
            let _ = file.read_f32(&info.name);
        }
    }
});

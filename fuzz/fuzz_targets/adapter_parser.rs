//! Adapter parsing (key dialects, module kinds, shapes, alpha, peft config) and the delta math
//! on arbitrary safetensors bytes. Must return Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loratool::adapter::{delta, Adapter};
use loratool::tensors::TensorFile;
use std::path::Path;

/// Larger inputs are skipped so one case cannot ask for huge Kronecker/Tucker products.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(file) = TensorFile::from_safetensors_bytes(Path::new("fuzz.safetensors"), data.to_vec())
    else {
        return;
    };
    let Ok(adapter) = Adapter::from_file(file) else {
        return;
    };
    for m in &adapter.modules {
        let _ = delta::delta_norm(m, &adapter.file);
        let _ = delta::delta(m, &adapter.file);
    }
});

//! Shared helpers for the integration tests: the fixture manifest written by fixtures/generate.py.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Manifest entries of adapter files (the malicious pickle has no network).
pub fn adapter_entries() -> Vec<serde_json::Value> {
    manifest()["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| !f["network"].is_null())
        .cloned()
        .collect()
}

pub fn loratool() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
}

/// A copy of the SD1 kohya fixture whose first text-encoder `up` factor holds one NaN.
pub fn write_lora_with_a_nan(path: &std::path::Path) {
    use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
    use loratool::tensors::TensorFile;
    let src = TensorFile::open(&fixtures().join("loras/sd1_kohya_lora.safetensors")).unwrap();
    let poisoned = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight";
    let tensors: Vec<(TensorSpec, Vec<u8>)> = src
        .tensors()
        .iter()
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            };
            let mut values = src.read_f32(&t.name).unwrap().data;
            if t.name == poisoned {
                values[1] = f32::NAN;
            }
            (spec, t.dtype.encode_f32(&values).unwrap())
        })
        .collect();
    assert!(tensors.iter().any(|(s, _)| s.name == poisoned));
    write_all(path, src.metadata(), &tensors, &WriteOptions::default()).unwrap();
}

/// Records what an operation reports through its `progress` option: the totals announced and the
/// sum of the amounts advanced.
#[derive(Default)]
pub struct Counted {
    pub starts: std::sync::Mutex<Vec<u64>>,
    pub done: std::sync::atomic::AtomicU64,
}

impl loratool::ops::progress::Progress for Counted {
    fn start(&self, total: u64) {
        self.starts.lock().unwrap().push(total);
    }
    fn advance(&self, done: u64) {
        self.done
            .fetch_add(done, std::sync::atomic::Ordering::Relaxed);
    }
}

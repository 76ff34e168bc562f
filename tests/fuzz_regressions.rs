//! Inputs that once panicked the adapter parser (fuzz/regressions, see docs/FUZZING.md) and the
//! fuzz seeds: every one must parse or be refused, and every parsed module's math must return,
//! never panic.

use loratool::adapter::{delta, Adapter};
use loratool::tensors::TensorFile;
use std::path::{Path, PathBuf};

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn regression_inputs_never_panic() {
    let inputs: Vec<PathBuf> = files("fuzz/regressions", "bin")
        .into_iter()
        .chain(files("fuzz/seeds", "safetensors"))
        .collect();
    assert!(inputs.len() >= 6);
    let mut refused = 0;
    for path in &inputs {
        let bytes = std::fs::read(path).unwrap();
        let Ok(file) = TensorFile::from_safetensors_bytes(path, bytes) else {
            refused += 1;
            continue;
        };
        match Adapter::from_file(file) {
            Ok(adapter) => {
                for m in &adapter.modules {
                    let _ = delta::delta_norm(m, &adapter.file);
                    let _ = delta::delta(m, &adapter.file);
                }
            }
            Err(e) => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the regression inputs are malformed and must be refused or skipped"
    );
}

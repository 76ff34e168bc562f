//! A checkpoint pickled like the original SD 1.x releases (pytorch_lightning callback state,
//! numpy scalars; fixtures/generate_legacy_ckpt.py) through inspect, merge and convert.

mod common;

use common::{fixtures, loratool};
use loratool::tensors::TensorFile;

fn ckpt() -> std::path::PathBuf {
    fixtures().join("legacy/sd1_ldm_lightning.ckpt")
}

#[test]
fn inspect_names_it_a_checkpoint() {
    let out = loratool()
        .args(["inspect", "--json"])
        .arg(ckpt())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &json[0];
    assert_eq!(r["kind"], "checkpoint");
    assert_eq!(r["container"], "pickle");
    assert_eq!(r["family"], "sd1");
    assert_eq!(r["has_vae"], true);
    let params: u64 = TensorFile::open(&ckpt())
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.numel() as u64)
        .sum();
    assert_eq!(r["parameters"], params);
}

#[test]
fn converts_to_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = loratool()
        .arg("convert")
        .arg(ckpt())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let src = TensorFile::open(&ckpt()).unwrap();
    let got = TensorFile::open(&out).unwrap();
    assert_eq!(got.tensors(), src.tensors());
    for t in src.tensors() {
        assert_eq!(
            got.raw_bytes(&t.name).unwrap(),
            src.raw_bytes(&t.name).unwrap()
        );
    }
}

/// Merging into the pickle gives, tensor for tensor, the bytes of the same merge into
/// models/sd1_ldm.safetensors (whose tensors the pickle holds a subset of).
#[test]
fn merges_like_the_safetensors_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let lora = format!(
        "{}:0.7",
        fixtures().join("loras/sd1_loha.safetensors").display()
    );
    let merge = |base: &std::path::Path, out: &std::path::Path| {
        let o = loratool()
            .args(["merge", "--strict", "--base"])
            .arg(base)
            .args(["--lora", &lora, "-o"])
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    merge(&ckpt(), &a);
    merge(&fixtures().join("models/sd1_ldm.safetensors"), &b);
    let (a, b, base) = (
        TensorFile::open(&a).unwrap(),
        TensorFile::open(&b).unwrap(),
        TensorFile::open(&ckpt()).unwrap(),
    );
    assert_eq!(a.tensors(), base.tensors());
    let mut changed = 0;
    for t in a.tensors() {
        let bytes = a.raw_bytes(&t.name).unwrap();
        assert_eq!(bytes, b.raw_bytes(&t.name).unwrap(), "{}", t.name);
        changed += usize::from(bytes != base.raw_bytes(&t.name).unwrap());
    }
    assert_eq!(changed, 44);
}

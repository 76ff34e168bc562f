//! fp8 (float8_e4m3fn / float8_e5m2) against torch's own conversions, and a merge into an fp8
//! Flux checkpoint against torch's rounding of the peer's delta (fixtures/generate_fp8.py).

mod common;

use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};

fn fp8_fixture(name: &str) -> std::path::PathBuf {
    common::fixtures().join("fp8").join(name)
}

#[test]
fn encoding_matches_torch_byte_for_byte() {
    let f = TensorFile::open(&fp8_fixture("conversions.safetensors")).unwrap();
    let values = f.read_f32("values").unwrap().data;
    assert!(values.len() > 10_000);
    for (key, dtype) in [("e4m3", Dtype::F8E4M3), ("e5m2", Dtype::F8E5M2)] {
        assert_eq!(f.get(key).unwrap().dtype, dtype);
        let torch = f.raw_bytes(key).unwrap();
        let ours = dtype.encode_f32(&values).unwrap();
        let differ = ours
            .iter()
            .zip(torch.iter())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{dtype}: {differ} of {} values differ",
            values.len()
        );
        // Decoding torch's codes and encoding again is the identity.
        let decoded = f.read_f32(key).unwrap().data;
        assert_eq!(
            dtype.encode_f32(&decoded).unwrap(),
            torch.as_ref(),
            "{dtype}"
        );
    }
}

#[test]
fn merging_into_an_fp8_checkpoint_rounds_once_like_torch() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = fp8_fixture("flux_bfl_fp8.safetensors");
    let lora = LoraWeight::weighted(common::fixtures().join("loras/flux_kohya.safetensors"), 0.8);
    let out = dir.path().join("merged.safetensors");
    let opts = MergeOptions {
        window_bytes: 64 << 10,
        ..Default::default()
    };
    let report = merge_into_checkpoint(&base_path, &[lora], &out, &opts).unwrap();
    let (base, merged) = (
        TensorFile::open(&base_path).unwrap(),
        TensorFile::open(&out).unwrap(),
    );
    let expected = TensorFile::open(&fp8_fixture("flux_bfl_fp8_kohya_w0.8.safetensors")).unwrap();
    assert_eq!(report.tensors_changed, expected.tensors().len());
    let mut fp8_elements = 0;
    for info in base.tensors() {
        let name = &info.name;
        let m = merged.get(name).unwrap();
        assert_eq!((m.dtype, &m.shape), (info.dtype, &info.shape), "{name}");
        let got = merged.raw_bytes(name).unwrap();
        match expected.get(name) {
            Some(e) => {
                assert_eq!(e.dtype, Dtype::F8E4M3, "{name}");
                assert_eq!(got, expected.raw_bytes(name).unwrap(), "{name}");
                assert_ne!(got, base.raw_bytes(name).unwrap(), "{name} changed");
                fp8_elements += info.numel();
            }
            None => assert_eq!(got, base.raw_bytes(name).unwrap(), "{name} untouched"),
        }
    }
    assert!(fp8_elements > 10_000);
}

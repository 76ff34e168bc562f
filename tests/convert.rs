//! `convert` keeps ΔW identical: a converted LoRA baked into the checkpoint gives the same weights
//! as the original, through kohya → peft → kohya round trips; pickles become byte-identical
//! safetensors.

mod common;

use common::{fixtures, loratool};
use loratool::adapter::Adapter;
use loratool::ops::convert::{convert_adapter, convert_container, ConvertOptions, TargetFormat};
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};
use std::collections::BTreeSet;
use std::path::Path;

fn bake(base: &Path, lora: &Path, out: &Path) -> TensorFile {
    let opts = MergeOptions {
        dtype: Some(Dtype::F32),
        strict: true,
        force: true,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    merge_into_checkpoint(
        base,
        &[LoraWeight::weighted(lora.to_path_buf(), 0.8)],
        out,
        &opts,
    )
    .unwrap_or_else(|e| panic!("baking {}: {e}", lora.display()));
    TensorFile::open(out).unwrap()
}

fn assert_same_weights(a: &TensorFile, b: &TensorFile, what: &str) {
    for t in a.tensors() {
        let err = a
            .read_f32(&t.name)
            .unwrap()
            .relative_error(&b.read_f32(&t.name).unwrap());
        assert!(err <= 1e-5, "{what}: {} differs ({err:.2e})", t.name);
    }
}

#[test]
fn round_trips_keep_every_delta() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f32 = ConvertOptions {
        dtype: Some(Dtype::F32),
        force: true,
    };
    for (lora, model) in [
        ("sd1_kohya_lora", "sd1_ldm"),
        ("sd1_peft", "sd1_ldm"),
        ("sd1_peft_rslora", "sd1_ldm"),
        ("sd1_diffusers_old", "sd1_ldm"),
        ("sdxl_kohya_lora", "sdxl_ldm"),
        ("sdxl_peft", "sdxl_ldm"),
    ] {
        let src = fixtures().join(format!("loras/{lora}.safetensors"));
        let base = fixtures().join(format!("models/{model}.safetensors"));
        let reference = bake(&base, &src, &d.join("ref.safetensors"));
        let peft = d.join(format!("{lora}.peft.safetensors"));
        convert_adapter(&src, &peft, TargetFormat::Peft, &f32).unwrap();
        assert_eq!(Adapter::open(&peft).unwrap().format.name(), "peft");
        assert_same_weights(
            &reference,
            &bake(&base, &peft, &d.join("p.safetensors")),
            &format!("{lora} → peft"),
        );
        let kohya = d.join(format!("{lora}.kohya.safetensors"));
        convert_adapter(&peft, &kohya, TargetFormat::Kohya, &f32).unwrap();
        assert_same_weights(
            &reference,
            &bake(&base, &kohya, &d.join("k.safetensors")),
            &format!("{lora} → peft → kohya"),
        );
        let original = Adapter::open(&src).unwrap();
        if original.format.name() == "kohya" {
            let names = |a: &Adapter| {
                a.modules
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<BTreeSet<_>>()
            };
            assert_eq!(
                names(&original),
                names(&Adapter::open(&kohya).unwrap()),
                "{lora}: kohya names survive"
            );
        }
    }
}

#[test]
fn lycoris_kinds_convert_to_kohya_and_are_refused_by_peft() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("loras/sd1_loha.safetensors");
    let base = fixtures().join("models/sd1_ldm.safetensors");
    let out = dir.path().join("loha.safetensors");
    convert_adapter(&src, &out, TargetFormat::Kohya, &ConvertOptions::default()).unwrap();
    assert_same_weights(
        &bake(&base, &src, &dir.path().join("a.safetensors")),
        &bake(&base, &out, &dir.path().join("b.safetensors")),
        "loha → kohya",
    );
    let err = convert_adapter(
        &src,
        &dir.path().join("x.safetensors"),
        TargetFormat::Peft,
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the peft format only holds plain LoRA modules"),
        "{err}"
    );
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn pickles_become_identical_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let reference =
        TensorFile::open(&fixtures().join("legacy/sd1_kohya_lora_ckpt.reference.safetensors"))
            .unwrap();
    for src in [
        "legacy/sd1_kohya_lora.ckpt",
        "legacy/sd1_kohya_lora_oldformat.pt",
    ] {
        let out = dir.path().join("out.safetensors");
        let n = convert_container(
            &fixtures().join(src),
            &out,
            &ConvertOptions {
                dtype: None,
                force: true,
            },
        )
        .unwrap();
        assert_eq!(n, reference.tensors().len());
        let got = TensorFile::open(&out).unwrap();
        for t in reference.tensors() {
            assert_eq!(got.get(&t.name).unwrap(), t, "{src}: {}", t.name);
            assert_eq!(
                got.raw_bytes(&t.name).unwrap(),
                reference.raw_bytes(&t.name).unwrap(),
                "{src}: {}",
                t.name
            );
        }
    }
    // Through the command line, and refusing the malicious pickle with nothing written.
    let out = dir.path().join("cli.safetensors");
    let status = loratool()
        .args([
            "convert",
            &fixtures()
                .join("legacy/sd1_kohya_lora.ckpt")
                .display()
                .to_string(),
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let bad = dir.path().join("bad.safetensors");
    let o = loratool()
        .args([
            "convert",
            &fixtures()
                .join("legacy/malicious.ckpt")
                .display()
                .to_string(),
            "-o",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("os.system"));
    assert!(!bad.exists());
}

/// A cast is re-encoded in chunks written where they belong: a tensor of several chunks (420,000
/// elements, chunks of 262,144) and untouched non-float and float tensors come out as one encoding
/// of the whole would give them; the input is left as it was.
#[test]
fn casting_a_file_gives_each_tensor_rounded_once() {
    use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (
        dir.path().join("in.safetensors"),
        dir.path().join("out.safetensors"),
    );
    let values: Vec<f32> = (0..420_000u64)
        .map(|i| ((i * 7919) % 10_007) as f32 * 1.37e-3 - 6.8)
        .collect();
    let tensor = |name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| {
        (
            TensorSpec {
                name: name.into(),
                dtype,
                shape,
            },
            bytes,
        )
    };
    let tensors = vec![
        tensor(
            "big",
            Dtype::F32,
            vec![600, 700],
            Dtype::F32.encode_f32(&values).unwrap(),
        ),
        tensor(
            "ids",
            Dtype::I64,
            vec![3],
            [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        tensor(
            "small",
            Dtype::BF16,
            vec![4],
            Dtype::BF16.encode_f32(&[0.5, -1.0, 3.25, 1e-3]).unwrap(),
        ),
    ];
    write_all(
        &input,
        &Default::default(),
        &tensors,
        &WriteOptions::default(),
    )
    .unwrap();
    let before = std::fs::read(&input).unwrap();
    let opts = ConvertOptions {
        dtype: Some(Dtype::F16),
        force: false,
    };
    assert_eq!(convert_container(&input, &out, &opts).unwrap(), 3);
    let f = TensorFile::open(&out).unwrap();
    let st = f.as_safetensors().unwrap();
    assert_eq!(
        st.tensor_bytes(0),
        Dtype::F16.encode_f32(&values).unwrap().as_slice()
    );
    assert_eq!(
        (f.tensors()[1].dtype, st.tensor_bytes(1)),
        (Dtype::I64, tensors[1].1.as_slice())
    );
    let small = Dtype::BF16.decode_f32(&tensors[2].1).unwrap();
    assert_eq!(
        st.tensor_bytes(2),
        Dtype::F16.encode_f32(&small).unwrap().as_slice()
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

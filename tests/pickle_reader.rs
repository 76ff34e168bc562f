//! The safe PyTorch pickle reader, through the public `TensorFile` API.
//! Test files come from tests/data/pickle/make_pickles.py (real torch.save outputs plus
//! hand-written hostile and broken files).

use loratool::tensors::{Container, Dtype, TensorFile};
use loratool::Error;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pickle")
        .join(name)
}

fn open(name: &str) -> TensorFile {
    TensorFile::open(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn open_err(name: &str) -> String {
    match TensorFile::open(&data(name)) {
        Ok(_) => panic!("{name} should be refused"),
        Err(e) => {
            assert!(
                matches!(e, Error::BadFile { .. }),
                "{name}: expected BadFile, got {e:?}"
            );
            let msg = e.to_string();
            assert!(msg.starts_with(&data(name).display().to_string()), "{msg}");
            assert!(!msg.contains('\n'), "one-line message: {msg}");
            msg
        }
    }
}

fn names(f: &TensorFile) -> Vec<&str> {
    f.tensors().iter().map(|t| t.name.as_str()).collect()
}

fn values(f: &TensorFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = f.read_f32(name).unwrap();
    (t.shape, t.data)
}

#[test]
fn zip_state_dict_dtypes_views_and_scalars() {
    let f = open("state_dict.pt");
    assert_eq!(f.container(), Container::Pickle);
    assert_eq!(
        names(&f),
        ["f32", "f16", "bf16", "alpha", "base", "base_t", "rows_1_2", "col_1", "param", "i64"]
    );
    let dtype = |n: &str| f.get(n).unwrap().dtype;
    assert_eq!(dtype("f32"), Dtype::F32);
    assert_eq!(dtype("f16"), Dtype::F16);
    assert_eq!(dtype("bf16"), Dtype::BF16);
    assert_eq!(dtype("i64"), Dtype::I64);

    assert_eq!(
        values(&f, "f32"),
        (vec![2, 3], vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    );
    assert_eq!(values(&f, "f16"), (vec![3], vec![0.5, -1.25, 3.0]));
    assert_eq!(values(&f, "bf16"), (vec![2, 2], vec![1.5, -2.0, 0.25, 8.0]));
    assert_eq!(f.get("alpha").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f.read_scalar("alpha").unwrap(), 4.0);
    assert_eq!(values(&f, "param"), (vec![2], vec![7.0, 8.0]));
    assert_eq!(values(&f, "i64"), (vec![2], vec![-3.0, 5.0]));

    // Four views of one storage.
    let base: Vec<f32> = (0..12).map(|v| v as f32).collect();
    assert_eq!(values(&f, "base"), (vec![3, 4], base.clone()));
    assert_eq!(
        values(&f, "base_t"),
        (
            vec![4, 3],
            vec![0.0, 4.0, 8.0, 1.0, 5.0, 9.0, 2.0, 6.0, 10.0, 3.0, 7.0, 11.0]
        )
    );
    assert_eq!(values(&f, "rows_1_2"), (vec![2, 4], base[4..].to_vec()));
    assert_eq!(values(&f, "col_1"), (vec![3], vec![1.0, 5.0, 9.0]));

    // Contiguous views of stored entries are borrowed from the mapped file; strided ones copied.
    assert!(matches!(f.raw_bytes("rows_1_2").unwrap(), Cow::Borrowed(b) if b.len() == 32));
    assert!(matches!(f.raw_bytes("base_t").unwrap(), Cow::Owned(b) if b.len() == 48));
}

#[test]
fn a1111_checkpoint_uses_state_dict_names_as_is() {
    let f = open("a1111.ckpt");
    assert_eq!(names(&f), ["model.w", "model.b"]);
    assert_eq!(values(&f, "model.w"), (vec![2], vec![1.0, 2.0]));
    assert_eq!(f.read_scalar("model.b").unwrap(), 0.5);
}

#[test]
fn nested_dicts_are_flattened_in_order_and_non_tensors_skipped() {
    let f = open("nested.pt");
    assert_eq!(names(&f), ["model.layer.w", "model.b"]);
    assert_eq!(values(&f, "model.layer.w"), (vec![2], vec![1.0, -1.0]));
}

#[test]
fn legacy_non_zip_format() {
    let f = open("legacy.pt");
    assert_eq!(names(&f), ["w", "alpha"]);
    assert_eq!(
        values(&f, "w"),
        (
            vec![4, 3],
            vec![0.0, 4.0, 8.0, 1.0, 5.0, 9.0, 2.0, 6.0, 10.0, 3.0, 7.0, 11.0]
        )
    );
    assert_eq!(f.get("alpha").unwrap().dtype, Dtype::F16);
    assert_eq!(f.read_scalar("alpha").unwrap(), 2.0);
}

#[test]
fn deflated_storage_and_any_prefix() {
    let f = open("deflated.pt");
    assert_eq!(values(&f, "w"), (vec![4], vec![1.0, 2.0, 3.0, 4.0]));
}

#[test]
fn os_system_is_refused() {
    let msg = open_err("malicious_os_system.pt");
    let path = data("malicious_os_system.pt").display().to_string();
    assert_eq!(
        msg,
        format!("{path}: refusing to load pickle: it references 'os.system', which is not on loratool's allow-list")
    );
    assert!(
        msg.contains(
            "refusing to load pickle: it references 'os.system', which is not on loratool's allow-list"
        ),
        "{msg}"
    );
}

#[test]
fn builtins_eval_is_refused() {
    let msg = open_err("malicious_eval.pkl");
    assert!(
        msg.contains("refusing to load pickle: it references 'builtins.eval'"),
        "{msg}"
    );
}

#[test]
fn truncated_zip_is_refused() {
    let msg = open_err("truncated.pt");
    assert!(msg.contains("not a readable zip archive"), "{msg}");
}

#[test]
fn zip_without_data_pkl_is_refused() {
    let msg = open_err("no_data_pkl.pt");
    assert!(msg.contains("zip archive has no data.pkl entry"), "{msg}");
}

#[test]
fn extent_past_storage_is_refused() {
    let msg = open_err("extent_past_storage.pt");
    assert!(
        msg.contains("tensor 'w': extent runs past its storage"),
        "{msg}"
    );
}

#[test]
fn storage_size_mismatch_is_refused() {
    let msg = open_err("storage_short.pt");
    assert!(
        msg.contains("storage '0' holds 12 bytes, but the pickle declares 4 elements (16 bytes)"),
        "{msg}"
    );
}

#[test]
fn missing_storage_is_refused() {
    let msg = open_err("storage_missing.pt");
    assert!(
        msg.contains("storage '0' is missing from the archive (no entry 'archive/data/0')"),
        "{msg}"
    );
}

#[test]
fn big_endian_is_refused() {
    let msg = open_err("big_endian.pt");
    assert!(msg.contains("big-endian tensor data"), "{msg}");
}

#[test]
fn random_bytes_after_proto_are_refused() {
    let msg = open_err("random.bin");
    assert!(msg.contains("pickle"), "{msg}");
}

#[test]
fn every_prefix_of_a_valid_file_fails_cleanly() {
    // Truncation anywhere must give an error, never a panic (zip and legacy layouts).
    let dir = tempfile::tempdir().unwrap();
    for name in ["state_dict.pt", "legacy.pt"] {
        let bytes = std::fs::read(data(name)).unwrap();
        let step = (bytes.len() / 97).max(1);
        for cut in (2..bytes.len()).step_by(step) {
            let p = dir.path().join("cut.pt");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(TensorFile::open(&p).is_err(), "{name} cut at {cut} opened");
        }
    }
}

#[test]
fn flipped_bytes_never_panic() {
    // Single-byte corruption: errors are fine, panics are not, and whatever opens must still
    // read every tensor without panicking. Every byte of the legacy file with three patterns;
    // every third byte of the zip with one (the test writes one file per case).
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, usize, &[u8]); 2] = [
        ("legacy.pt", 1, &[0x01, 0x80, 0xff]),
        ("state_dict.pt", 3, &[0x80]),
    ];
    for (name, step, patterns) in cases {
        let bytes = std::fs::read(data(name)).unwrap();
        for at in (0..bytes.len()).step_by(step) {
            for x in patterns {
                let mut b = bytes.clone();
                b[at] ^= x;
                let p = dir.path().join("flip.pt");
                std::fs::write(&p, &b).unwrap();
                if let Ok(f) = TensorFile::open(&p) {
                    for t in f.tensors().to_vec() {
                        let _ = f.raw_bytes(&t.name);
                    }
                }
            }
        }
    }
}

/// The shared fixtures (fixtures/legacy, made with real torch by a teammate), when present:
/// the zip and legacy outputs of one kohya LoRA must match its safetensors reference exactly.
#[test]
fn shared_legacy_fixtures_match_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/legacy");
    let reference = root.join("sd1_kohya_lora_ckpt.reference.safetensors");
    if !reference.exists() {
        return;
    }
    let r = TensorFile::open(&reference).unwrap();
    for name in ["sd1_kohya_lora.ckpt", "sd1_kohya_lora_oldformat.pt"] {
        let f = TensorFile::open(&root.join(name)).unwrap();
        assert_eq!(f.tensors().len(), r.tensors().len(), "{name}");
        for t in r.tensors() {
            let got = f
                .get(&t.name)
                .unwrap_or_else(|| panic!("{name}: {}", t.name));
            assert_eq!(
                (got.dtype, &got.shape),
                (t.dtype, &t.shape),
                "{name}: {}",
                t.name
            );
            assert_eq!(
                f.raw_bytes(&t.name).unwrap(),
                r.raw_bytes(&t.name).unwrap(),
                "{name}: {}",
                t.name
            );
        }
    }
    let e = TensorFile::open(&root.join("malicious.ckpt"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("'posix.system'") || e.to_string().contains("'os.system'"));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/legacy")
        .join(name)
}

/// Every tensor of `reference` is in `f` with the same dtype, shape and bytes.
fn assert_holds(f: &TensorFile, reference: &TensorFile, label: &str) {
    for t in reference.tensors() {
        let got = f
            .get(&t.name)
            .unwrap_or_else(|| panic!("{label}: {}", t.name));
        assert_eq!((got.dtype, &got.shape), (t.dtype, &t.shape), "{label}");
        assert_eq!(
            f.raw_bytes(&t.name).unwrap(),
            reference.raw_bytes(&t.name).unwrap(),
            "{label}: {}",
            t.name
        );
    }
}

/// fixtures/legacy/sd1_ldm_lightning.ckpt (fixtures/generate_legacy_ckpt.py) is wrapped like
/// sd-v1-4.ckpt: pytorch_lightning ModelCheckpoint state keyed by the class, an instance,
/// numpy scalars, a dtype, an ndarray and a set. Its state dict is read like any other.
#[test]
fn lightning_checkpoint_with_numpy_and_callback_state_reads() {
    let f = TensorFile::open(&fixture("sd1_ldm_lightning.ckpt")).unwrap();
    let full = TensorFile::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/sd1_ldm.safetensors"),
    )
    .unwrap();
    assert_eq!(f.container(), Container::Pickle);
    assert_eq!(f.tensors().len(), 119);
    for t in f.tensors() {
        let r = full.get(&t.name).unwrap_or_else(|| panic!("{}", t.name));
        assert_eq!((t.dtype, &t.shape), (r.dtype, &r.shape), "{}", t.name);
        assert_eq!(
            f.raw_bytes(&t.name).unwrap(),
            full.raw_bytes(&t.name).unwrap()
        );
    }
    // Names come from the state dict alone, never from the callbacks.
    assert!(f.tensors().iter().all(|t| !t.name.contains("callbacks")));
}

#[test]
fn lightning_callbacks_outside_the_a1111_list_are_refused() {
    let path = fixture("lightning_early_stopping.ckpt");
    let e = TensorFile::open(&path).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "{}: refusing to load pickle: it references 'pytorch_lightning.callbacks.early_stopping.EarlyStopping', which is not on loratool's allow-list",
            path.display()
        )
    );
}

/// Protocol 0 and 1 pickles have no PROTO opcode; they are sniffed and read like the others.
/// Protocol 0 persistent ids are text, which torch.load cannot read; loratool parses them.
#[test]
fn protocol_0_and_1_pickles_read() {
    let reference =
        TensorFile::open(&fixture("sd1_kohya_lora_subset.reference.safetensors")).unwrap();
    for name in [
        "sd1_kohya_lora_p0.ckpt",
        "sd1_kohya_lora_p0_oldformat.pt",
        "sd1_kohya_lora_p1_oldformat.pt",
    ] {
        let f = TensorFile::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(f.container(), Container::Pickle, "{name}");
        assert_eq!(f.tensors().len(), reference.tensors().len(), "{name}");
        assert_holds(&f, &reference, name);
    }
}

#[test]
fn protocol_0_pickles_are_named_as_pickles_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("sd1_kohya_lora_p0_oldformat.pt")).unwrap();
    // Cut inside the main pickle: the error is the pickle reader's, not "not a safetensors file".
    let p = dir.path().join("cut.ckpt");
    std::fs::write(&p, &bytes[..200]).unwrap();
    let e = TensorFile::open(&p).err().unwrap().to_string();
    assert!(e.starts_with(&p.display().to_string()), "{e}");
    assert!(e.contains("pickle") && !e.contains("safetensors"), "{e}");
    // Every prefix fails and no single-byte change panics (the text opcodes' parsers).
    for cut in (2..bytes.len()).step_by(3) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(TensorFile::open(&p).is_err(), "cut at {cut} opened");
    }
    for at in 0..bytes.len() {
        for x in [0x20u8] {
            let mut b = bytes.clone();
            b[at] ^= x;
            std::fs::write(&p, &b).unwrap();
            if let Ok(f) = TensorFile::open(&p) {
                for t in f.tensors().to_vec() {
                    let _ = f.raw_bytes(&t.name);
                }
            }
        }
    }
    // A protocol-0 pickle naming os.system is refused, naming the global.
    let p = dir.path().join("evil.ckpt");
    std::fs::write(&p, b"cos\nsystem\n(S'echo hi'\ntR.").unwrap();
    let e = TensorFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("refusing to load pickle: it references 'os.system'"),
        "{e}"
    );
    // Hostile classes inside a text persistent id go through the same allow-list.
    let p = dir.path().join("pid.ckpt");
    let mut b = std::fs::read(fixture("sd1_kohya_lora_p0_oldformat.pt")).unwrap();
    let at = b
        .windows(17)
        .position(|w| w == b"torch.HalfStorage")
        .unwrap();
    b.splice(at..at + 17, b"posix.systemXXXXX".iter().copied());
    std::fs::write(&p, &b).unwrap();
    let e = TensorFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("refusing to load pickle"), "{e}");
}

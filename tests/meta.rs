//! `meta` changes the metadata and nothing else: every tensor entry of the header (name, dtype,
//! shape, data offsets, order) and every byte of the data section are the input's, so AutoV3 is
//! unchanged; the output is written atomically, in place too.

mod common;

use common::{fixtures, loratool};
use loratool::ops::meta::{edit_metadata, is_training_detail, MetaEdit, MetaOutput};
use loratool::tensors::hash::hash_file;
use loratool::tensors::SafetensorsFile;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Output;

/// The header's top-level entries in file order (serde_json keeps the order), and where the data
/// section starts.
fn header(path: &Path) -> (Map<String, Value>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "{}: header padded to 8 bytes", path.display());
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

fn tensor_entries(path: &Path) -> Vec<(String, Value)> {
    header(path)
        .0
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .collect()
}

fn data_section(path: &Path) -> Vec<u8> {
    let start = header(path).1;
    std::fs::read(path).unwrap()[start..].to_vec()
}

fn hashes(path: &Path) -> loratool::tensors::hash::FileHashes {
    let f = SafetensorsFile::open(path).unwrap();
    hash_file(path, Some(f.data_start())).unwrap()
}

fn lora_fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join("loras"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// The names in a folder (temps included: hidden ones too).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn meta_cli(args: &[&str]) -> Output {
    loratool().arg("meta").args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn edits_change_the_metadata_and_no_tensor_byte() {
    let dir = tempfile::tempdir().unwrap();
    let edit = MetaEdit {
        set: vec![
            ("modelspec.title".into(), "renamed = with equals".into()),
            ("loratool.note".into(), "ünïcode\nand a line break".into()),
        ],
        unset: vec!["ss_output_name".into(), "format".into()],
        strip_training: true,
    };
    for src in lora_fixtures() {
        let out = dir.path().join("out.safetensors");
        let report = edit_metadata(
            &src,
            &edit,
            &MetaOutput::File {
                path: out.clone(),
                force: true,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let what = src.display();
        assert_eq!(tensor_entries(&out), tensor_entries(&src), "{what}");
        assert_eq!(data_section(&out), data_section(&src), "{what}");
        let (before, after) = (hashes(&src), hashes(&out));
        assert_eq!(after.autov3, before.autov3, "{what}");
        assert_eq!(after.addnet, before.addnet, "{what}");
        assert_ne!(after.sha256, before.sha256, "{what}");

        let written = SafetensorsFile::open(&out).unwrap();
        let meta = written.metadata();
        assert_eq!(meta, &report.metadata, "{what}");
        assert_eq!(meta["modelspec.title"], "renamed = with equals");
        assert_eq!(meta["loratool.note"], "ünïcode\nand a line break");
        assert!(!meta.contains_key("ss_output_name") && !meta.contains_key("format"));
        assert!(!meta.keys().any(|k| is_training_detail(k)), "{what}");
        let original = SafetensorsFile::open(&src).unwrap();
        for key in [
            "ss_network_dim",
            "ss_network_alpha",
            "ss_base_model_version",
        ] {
            assert_eq!(meta.get(key), original.metadata().get(key), "{what}: {key}");
        }
        if original.metadata().contains_key("ss_tag_frequency") {
            assert!(!meta.contains_key("ss_tag_frequency"));
            assert!(!meta.contains_key("ss_dataset_dirs"));
            assert!(!meta.contains_key("ss_training_comment"));
        }
        if let Some(v) = original.metadata().get("lora_adapter_metadata") {
            assert_eq!(meta.get("lora_adapter_metadata"), Some(v), "{what}");
        }
        assert_eq!(
            names(dir.path()),
            ["out.safetensors"],
            "{what}: no temp left"
        );
    }
}

/// A header whose entries are not in data order, with `__metadata__` in the middle, keeps its
/// order; removing every key drops `__metadata__`.
#[test]
fn header_order_is_kept_and_empty_metadata_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.safetensors");
    let mut text = String::from(
        r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"__metadata__":{"z":"1","a":"2"},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
    );
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    std::fs::write(&src, &bytes).unwrap();

    let out = dir.path().join("out.safetensors");
    let set = MetaEdit {
        set: vec![("m".into(), "3".into()), ("a".into(), "4".into())],
        ..Default::default()
    };
    let to = |path: &Path| MetaOutput::File {
        path: path.to_path_buf(),
        force: true,
    };
    edit_metadata(&src, &set, &to(&out)).unwrap();
    let (h, _) = header(&out);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        ["b", "__metadata__", "a"],
        "entry order"
    );
    let meta: Vec<&String> = h["__metadata__"].as_object().unwrap().keys().collect();
    assert_eq!(meta, ["z", "a", "m"], "kept keys in place, new ones after");
    assert_eq!(h["__metadata__"]["a"], "4");
    assert_eq!(data_section(&out), [1, 2, 3, 4, 5, 6, 7, 8]);

    let unset = MetaEdit {
        unset: vec!["z".into(), "a".into()],
        ..Default::default()
    };
    let empty = dir.path().join("empty.safetensors");
    edit_metadata(&src, &unset, &to(&empty)).unwrap();
    assert_eq!(header(&empty).0.keys().collect::<Vec<_>>(), ["b", "a"]);
    assert_eq!(tensor_entries(&empty), tensor_entries(&src));
}

#[test]
fn in_place_keeps_the_path_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("loras/sdxl_kohya_lora.safetensors");
    let file = dir.path().join("lora.safetensors");
    std::fs::copy(&src, &file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let link = dir.path().join("link.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink("lora.safetensors", &link).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&src, &link).unwrap();
    let o = meta_cli(&[
        link.to_str().unwrap(),
        "--in-place",
        "--strip-training",
        "--set",
        "modelspec.title=curated",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("+ modelspec.title: curated")
            || stdout.contains("~ modelspec.title: curated"),
        "{stdout}"
    );
    assert!(stdout.contains("- ss_tag_frequency"), "{stdout}");
    assert!(stdout.contains("in place"), "{stdout}");
    // The link is still a link; the file it names was replaced; nothing else is in the folder.
    #[cfg(unix)]
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(names(dir.path()), ["link.safetensors", "lora.safetensors"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o640,
            "the replaced file keeps its permissions"
        );
    }
    let edited = SafetensorsFile::open(&file).unwrap();
    assert_eq!(edited.metadata()["modelspec.title"], "curated");
    assert!(!edited.metadata().contains_key("ss_tag_frequency"));
    assert_eq!(tensor_entries(&file), tensor_entries(&src));
    assert_eq!(hashes(&file).autov3, hashes(&src).autov3);

    // Nothing left to change: the file is not rewritten.
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let o = meta_cli(&[file.to_str().unwrap(), "--in-place", "--strip-training"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to change"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn outputs_are_refused_as_for_every_writer() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("loras/sd1_kohya_lora.safetensors");
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"theirs").unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            src.to_str().unwrap(),
            "--set",
            "a=b",
            "-o",
            out.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        meta_cli(&v)
    };
    let o = args(&[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already exists (use --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"theirs");
    let o = args(&["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(SafetensorsFile::open(&out).unwrap().metadata()["a"], "b");

    // The input itself only with --in-place.
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&src, &copy).unwrap();
    let o = meta_cli(&[
        copy.to_str().unwrap(),
        "--set",
        "a=b",
        "-o",
        copy.to_str().unwrap(),
        "--force",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--in-place"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());

    // An edit needs somewhere to go.
    let o = meta_cli(&[src.to_str().unwrap(), "--unset", "ss_seed"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("need -o OUT or --in-place"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn metadata_is_printed_as_lines_or_json() {
    let src = fixtures().join("loras/sd1_kohya_lora.safetensors");
    let meta = SafetensorsFile::open(&src).unwrap().metadata().clone();
    let o = meta_cli(&[src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), meta.len(), "one line per key");
    assert!(text.contains(&format!("ss_network_dim: {}\n", meta["ss_network_dim"])));

    let o = meta_cli(&[src.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let printed: std::collections::BTreeMap<String, String> =
        serde_json::from_value(v["metadata"].clone()).unwrap();
    assert_eq!(printed, meta);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = meta_cli(&[
        src.to_str().unwrap(),
        "--unset",
        "ss_seed",
        "--unset",
        "no_such_key",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no metadata key 'no_such_key'"));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["changes"][0]["key"], "ss_seed");
    assert_eq!(v["changes"][0]["after"], Value::Null);
    assert!(v["metadata"].get("ss_seed").is_none());
    assert_eq!(v["output"], out.to_str().unwrap());
}

#[test]
fn pickles_and_reserved_keys_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    for pickle in ["legacy/sd1_kohya_lora.ckpt", "legacy/malicious.ckpt"] {
        let src = fixtures().join(pickle);
        for args in [
            vec![src.to_str().unwrap()],
            vec![
                src.to_str().unwrap(),
                "--set",
                "a=b",
                "-o",
                out.to_str().unwrap(),
            ],
        ] {
            let o = meta_cli(&args);
            assert!(!o.status.success());
            let e = stderr(&o);
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(
                e.contains("PyTorch pickle") && e.contains("safetensors"),
                "{e}"
            );
        }
    }
    let src = fixtures().join("loras/sd1_kohya_lora.safetensors");
    for bad in [
        ["--set", "__metadata__={}"],
        ["--unset", "__metadata__"],
        ["--set", "no-equals-sign"],
    ] {
        let mut args = vec![src.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(&bad);
        let o = meta_cli(&args);
        assert!(!o.status.success(), "{bad:?}");
        let e = stderr(&o);
        assert!(
            e.contains("reserved") || e.contains("is not KEY=VALUE"),
            "{e}"
        );
    }
    assert!(names(dir.path()).is_empty(), "nothing written");
}

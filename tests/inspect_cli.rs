//! The `inspect` command end to end: output, JSON, norms, hashes, and bad input.

mod common;

use common::{fixtures, loratool, run_json};
use loratool::tensors::TensorFile;
use std::path::{Path, PathBuf};

#[test]
fn json_reports_kohya_metadata_sidecar_and_tags() {
    let f = fixtures().join("loras/sd1_kohya_lora.safetensors");
    let (code, json, _) = run_json(&[], &[f]);
    assert_eq!(code, 0);
    let r = &json[0];
    assert_eq!(r["kind"], "lora");
    assert_eq!(r["format"], "kohya");
    assert_eq!(r["network"], "lora");
    assert_eq!(r["base_model"], "sd1");
    assert_eq!(r["base_model_metadata"], "sd1");
    assert_eq!(r["rank"], 4);
    assert_eq!(r["alpha"], 2.0);
    assert_eq!(
        r["trigger_words"],
        serde_json::json!(["mychar", "red hair"])
    );
    assert_eq!(r["top_tags"][0]["tag"], "mychar");
    assert_eq!(r["top_tags"][0]["count"], 40);
    assert_eq!(r["sidecar"]["preferred weight"], 0.8);
    assert_eq!(r["metadata"]["ss_network_module"], "networks.lora");
    assert_eq!(
        r["training"]["output_name"],
        r["metadata"]["ss_output_name"]
    );
    let m = &r["modules"][0];
    assert!(m["name"].as_str().unwrap().starts_with("lora_"));
    assert_eq!(m["scale"], 0.5);
    assert!(m["norm"].is_null(), "no norms unless asked");
    assert!(r["hashes"].is_null());
}

#[test]
fn norms_match_the_peer_deltas() {
    // ‖ΔW‖ from factors must equal the Frobenius norm of the peer-computed dense delta.
    for (lora, reference) in [
        ("sd1_kohya_lora", "sd1_kohya_lora"),
        ("sd1_loha", "sd1_loha"),
        ("sd1_lokr_lowrank", "sd1_lokr_lowrank"),
        ("sd1_lokr_tucker", "sd1_lokr_tucker"),
        ("sd1_locon_tucker", "sd1_locon_tucker"),
        ("sd1_peft_rslora", "sd1_peft_rslora"),
    ] {
        let f = fixtures().join(format!("loras/{lora}.safetensors"));
        let refs =
            TensorFile::open(&fixtures().join(format!("reference/{reference}.delta.safetensors")))
                .unwrap();
        let (code, json, _) = run_json(&["--norms"], &[f]);
        assert_eq!(code, 0);
        for m in json[0]["modules"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap();
            let want = refs.read_f32(name).unwrap().frobenius_norm();
            let got = m["norm"].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1e-12),
                "{lora} {name}: norm {got} vs {want}"
            );
        }
    }
}

#[test]
fn hashes_match_an_independent_computation() {
    let f = fixtures().join("loras/sd1_peft.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    use sha2::{Digest, Sha256};
    let hex = |d: &[u8]| -> String { d.iter().map(|b| format!("{b:02x}")).collect() };
    let full = hex(&Sha256::digest(&bytes));
    let data = hex(&Sha256::digest(&bytes[8 + n..]));
    let (code, json, _) = run_json(&["--hash"], &[f]);
    assert_eq!(code, 0);
    let h = &json[0]["hashes"];
    assert_eq!(h["sha256"], full);
    assert_eq!(h["autov2"], full[..10].to_uppercase());
    assert_eq!(h["addnet"], data);
    assert_eq!(h["autov3"], data[..12].to_uppercase());
}

#[test]
fn table_output_names_the_essentials() {
    let out = loratool()
        .args(["inspect", "--modules"])
        .arg(fixtures().join("loras/sdxl_kohya_lora.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "kohya",
        "sdxl (metadata: sdxl, keys: sdxl)",
        "986 (text_encoder 72, text_encoder_2 192, unet 722)",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// Writes `bytes` to a file in `dir` and returns its path.
fn bad_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn bad_input_gets_one_line_errors_and_the_rest_is_still_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixtures().join("loras/sd1_loha.safetensors");
    let truncated = {
        let mut b = std::fs::read(&good).unwrap();
        b.truncate(b.len() - 100);
        b
    };
    let mut random = vec![0u8; 4096];
    let mut x = 0x2545F4914F6CDD1Du64;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let cases: Vec<(PathBuf, &str)> = vec![
        (bad_file(d, "empty.safetensors", b""), "file is empty"),
        (
            bad_file(d, "random.safetensors", &random),
            "not a safetensors file",
        ),
        (
            bad_file(d, "truncated.safetensors", &truncated),
            "truncated",
        ),
        (
            bad_file(d, "past_end.safetensors", &{
                let mut b = 1_000_000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            }),
            "header length 1000000 runs past the end of the file",
        ),
        (
            bad_file(
                d,
                "array.safetensors",
                &safetensors_with_header("[1, 2, 3]", b""),
            ),
            "header is not a JSON object",
        ),
        (
            bad_file(
                d,
                "overlap.safetensors",
                &safetensors_with_header(
                    r#"{"a.lora_down.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a.lora_up.weight":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    &[0; 12],
                ),
            ),
            "overlap",
        ),
        (
            bad_file(
                d,
                "offsets.safetensors",
                &safetensors_with_header(
                    r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &[0; 8],
                ),
            ),
            "run past the end of the data section",
        ),
        (
            bad_file(
                d,
                "dtype.safetensors",
                &safetensors_with_header(
                    r#"{"w":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
            ),
            "unknown dtype 'Q4_K'",
        ),
        (fixtures().join("legacy/malicious.ckpt"), "os.system"),
        (d.join("missing.safetensors"), "No such file"),
    ];
    let mut files: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    files.push(good.clone());
    let out = loratool().arg("inspect").args(&files).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), cases.len(), "one line per bad file:\n{stderr}");
    for ((path, want), line) in cases.iter().zip(&lines) {
        assert!(
            line.contains(&path.display().to_string()),
            "{line:?} should name {path:?}"
        );
        assert!(line.contains(want), "{line:?} should say {want:?}");
    }
    // The good file is still reported, after the bad ones; errors are not repeated on stdout.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("loha"), "{stdout}");
    assert!(!stdout.contains("error"), "{stdout}");
    for (path, _) in &cases {
        assert!(!stdout.contains(&path.display().to_string()), "{stdout}");
    }

    let (code, json, _) = run_json(&[], &files);
    assert_eq!(code, 1);
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), files.len());
    assert!(arr[0]["error"].as_str().unwrap().contains("file is empty"));
    assert_eq!(arr.last().unwrap()["network"], "loha");
}

#[test]
fn flux_loras_from_the_merge_fixtures() {
    // fixtures/merge/manifest.json documents these two (made by fixtures/generate_merge.py).
    let files = [
        fixtures().join("loras/flux_kohya.safetensors"),
        fixtures().join("loras/flux_peft.safetensors"),
    ];
    let (code, json, _) = run_json(&[], &files);
    assert_eq!(code, 0);
    let (k, p) = (&json[0], &json[1]);
    assert_eq!(
        (k["format"].as_str(), k["base_model"].as_str()),
        (Some("kohya"), Some("flux"))
    );
    assert_eq!(k["module_count"], 26);
    assert_eq!(k["modules_by_component"]["transformer"], 26);
    assert_eq!(
        (k["rank"].as_u64(), k["alpha"].as_f64()),
        (Some(4), Some(2.0))
    );
    assert_eq!(
        (p["format"].as_str(), p["base_model"].as_str()),
        (Some("peft"), Some("flux"))
    );
    assert_eq!(p["module_count"], 24);
    assert_eq!(p["alpha"], 8.0);
}

#[test]
fn a_failing_file_is_reported_once_on_stderr() {
    let bad = fixtures().join("legacy/malicious.ckpt");
    let out = loratool().arg("inspect").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&bad.display().to_string()) && stderr.contains("os.system"));
}

/// A tensor source that counts how often each tensor is read.
struct CountingReads<'a> {
    file: &'a TensorFile,
    reads: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl loratool::tensors::TensorSource for CountingReads<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn read_f32(&self, name: &str) -> loratool::Result<loratool::tensors::Tensor> {
        *self
            .reads
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default() += 1;
        self.file.read_f32(name)
    }
}

/// `--norms` reads each tensor of each module exactly once (the NaN/Inf check and the norm share
/// the read), for every adapter kind of the fixtures, and the norm is the one from the file.
#[test]
fn norms_read_each_module_tensor_once() {
    use loratool::adapter::{delta, Adapter};
    use loratool::ops::inspect::module_norm;
    let mut kinds = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(fixtures().join("loras")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let adapter = Adapter::open(&path).unwrap();
        for m in &adapter.modules {
            let counting = CountingReads {
                file: &adapter.file,
                reads: Default::default(),
            };
            let checked = module_norm(m, &counting).unwrap();
            let reads = counting.reads.into_inner().unwrap();
            let expected: std::collections::BTreeMap<String, usize> =
                m.tensors.values().map(|k| (k.clone(), 1)).collect();
            assert_eq!(reads, expected, "{}: {}", path.display(), m.name);
            let direct = delta::delta_norm(m, &adapter.file).unwrap();
            assert_eq!(checked.norm, direct, "{}: {}", path.display(), m.name);
            assert!(!checked.non_finite, "{}: {}", path.display(), m.name);
            kinds.insert(m.kind.name());
        }
    }
    assert!(kinds.len() >= 7, "{kinds:?}");
}

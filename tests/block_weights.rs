//! Block-weighted LoRAs (`lbw=`, the LoRA Block Weight convention): each UNet block's tensors get
//! exactly their block's share of the delta, in merges into checkpoints and in LoRA+LoRA merges.

mod common;

use loratool::family::block_weight::BlockWeightSpec;
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::merge_loras::{merge_loras, LoraMergeMethod, LoraMergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};
use std::path::{Path, PathBuf};

fn fx(rel: &str) -> PathBuf {
    common::fixtures().join(rel)
}

fn bake(base: &Path, lora: LoraWeight, out: &Path) -> TensorFile {
    let opts = MergeOptions {
        dtype: Some(Dtype::F32),
        strict: true,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    merge_into_checkpoint(base, &[lora], out, &opts).unwrap();
    TensorFile::open(out).unwrap()
}

fn lbw(path: PathBuf, spec: &str) -> LoraWeight {
    LoraWeight {
        block_weights: Some(BlockWeightSpec::parse(spec).unwrap()),
        ..LoraWeight::new(path)
    }
}

/// Which block an LDM checkpoint tensor is in, by the extension's table (docs/BLOCK_WEIGHTS.md).
fn block(name: &str) -> Option<String> {
    if name.starts_with("cond_stage_model.") || name.starts_with("conditioner.") {
        return Some("BASE".into());
    }
    let unet = name.strip_prefix("model.diffusion_model.")?;
    let index = |rest: &str| rest.split('.').next().unwrap().parse::<usize>().unwrap();
    if let Some(rest) = unet.strip_prefix("input_blocks.") {
        Some(format!("IN{:02}", index(rest)))
    } else if unet.starts_with("middle_block.") {
        Some("M00".into())
    } else {
        unet.strip_prefix("output_blocks.")
            .map(|rest| format!("OUT{:02}", index(rest)))
    }
}

/// For every tensor: the block-weighted merge changes it by `share(block)` × what the full merge
/// changes it by. Returns how many changed tensors were checked per share.
fn assert_shares(
    base: &TensorFile,
    full: &TensorFile,
    weighted: &TensorFile,
    share: impl Fn(Option<&str>) -> f32,
) -> (usize, usize) {
    let (mut zero, mut nonzero) = (0, 0);
    for t in base.tensors() {
        let b = base.read_f32(&t.name).unwrap();
        let f = full.read_f32(&t.name).unwrap();
        let w = weighted.read_f32(&t.name).unwrap();
        if f.data == b.data {
            assert_eq!(w.data, b.data, "{}: untouched by the LoRA", t.name);
            continue;
        }
        let s = share(block(&t.name).as_deref());
        if s == 0.0 {
            zero += 1;
            assert_eq!(w.data, b.data, "{}: its block has weight 0", t.name);
        } else {
            nonzero += 1;
            let (mut err, mut norm) = (0f64, 0f64);
            for ((b, f), w) in b.data.iter().zip(&f.data).zip(&w.data) {
                let want = (s * (f - b)) as f64;
                err += ((w - b) as f64 - want).powi(2);
                norm += want * want;
            }
            assert!(
                err.sqrt() <= 1e-5 * norm.sqrt().max(1e-12),
                "{}: share {s}, relative error {:.2e}",
                t.name,
                err.sqrt() / norm.sqrt()
            );
        }
    }
    (zero, nonzero)
}

#[test]
fn sd1_blocks_get_their_share() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = fx("models/sd1_ldm.safetensors");
    let lora = fx("loras/sd1_kohya_lora.safetensors");
    let base = TensorFile::open(&base_path).unwrap();
    let full = bake(
        &base_path,
        LoraWeight::new(&lora),
        &dir.path().join("full.safetensors"),
    );

    // OUTALL: the text encoder (BASE) and the output blocks at 1, everything else at 0.
    let out_only = bake(
        &base_path,
        lbw(lora.clone(), "OUTALL"),
        &dir.path().join("outall.safetensors"),
    );
    let (zero, nonzero) = assert_shares(&base, &full, &out_only, |b| match b {
        Some(b) if b == "BASE" || b.starts_with("OUT") => 1.0,
        _ => 0.0,
    });
    assert!(zero > 0 && nonzero > 0, "{zero} zeroed, {nonzero} kept");

    // A 17-weight list: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03…OUT11.
    let list = "0.25,1,1,0.5,0.5,1,1,0,1,1,1,-1,1,1,1,1,2";
    let weighted = bake(
        &base_path,
        lbw(lora.clone(), list),
        &dir.path().join("list.safetensors"),
    );
    let (_, nonzero) = assert_shares(&base, &full, &weighted, |b| match b {
        Some("BASE") => 0.25,
        Some("IN04" | "IN05") => 0.5,
        Some("M00") => 0.0,
        Some("OUT06") => -1.0,
        Some("OUT11") => 2.0,
        Some(_) => 1.0,
        None => 1.0,
    });
    assert!(nonzero > 10);

    // The same weights through a LoRA+LoRA merge, then baked, give the same checkpoint.
    let merged_lora = dir.path().join("merged_lora.safetensors");
    merge_loras(
        &[lbw(lora.clone(), list)],
        &merged_lora,
        &LoraMergeOptions {
            method: LoraMergeMethod::Concat,
            dtype: Some(Dtype::F32),
            force: false,
            progress: Default::default(),
        },
    )
    .unwrap();
    let via_lora = bake(
        &base_path,
        LoraWeight::new(&merged_lora),
        &dir.path().join("via_lora.safetensors"),
    );
    assert_shares(&base, &weighted, &via_lora, |_| 1.0);
}

#[test]
fn sdxl_blocks_get_their_share() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = fx("models/sdxl_ldm.safetensors");
    let lora = fx("loras/sdxl_kohya_lora.safetensors");
    let base = TensorFile::open(&base_path).unwrap();
    let full = bake(
        &base_path,
        LoraWeight::new(&lora),
        &dir.path().join("full.safetensors"),
    );
    // 12 weights: BASE, IN04, IN05, IN07, IN08, MID, OUT00…OUT05.
    let weighted = bake(
        &base_path,
        lbw(lora, "0,1,0,0.5,0,0,0,0,1,0,0,0"),
        &dir.path().join("w.safetensors"),
    );
    let (zero, nonzero) = assert_shares(&base, &full, &weighted, |b| match b {
        Some("IN04" | "OUT02") => 1.0,
        Some("IN07") => 0.5,
        _ => 0.0,
    });
    assert!(zero > 0 && nonzero > 0, "{zero} zeroed, {nonzero} kept");
}

#[test]
fn a_list_of_the_wrong_length_is_refused_naming_the_lora() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let result = common::loratool()
        .args(["merge", "--base"])
        .arg(fx("models/sd1_ldm.safetensors"))
        .arg("--lora")
        .arg(format!(
            "{}:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0",
            fx("loras/sd1_kohya_lora.safetensors").display()
        ))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("sd1_kohya_lora.safetensors: lbw=") && stderr.contains("12"),
        "{stderr}"
    );
    assert!(!out.exists());
}

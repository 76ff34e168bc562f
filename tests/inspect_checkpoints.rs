//! `inspect` on files that are not LoRAs: checkpoints (single files, pipeline folders, component
//! files under any name), VAEs, text encoders, embeddings and unknown tensor files.

mod common;

use common::{fixtures, loratool, run_json};
use loratool::tensors::hash::hash_file;
use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
use loratool::tensors::{Dtype, TensorFile};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn one(path: &Path) -> Value {
    let (code, json, stderr) = run_json(&[], &[path.to_path_buf()]);
    assert_eq!(code, 0, "{stderr}");
    json[0].clone()
}

/// Parameters, tensor count and per-dtype tensor counts and bytes, computed from the headers.
fn census(files: &[PathBuf]) -> (u64, usize, BTreeMap<String, (u64, u64)>) {
    let mut params = 0u64;
    let mut count = 0usize;
    let mut dtypes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for f in files {
        let file = TensorFile::open(f).unwrap();
        for t in file.tensors() {
            params += t.numel() as u64;
            count += 1;
            let d = dtypes.entry(t.dtype.name().to_string()).or_default();
            d.0 += 1;
            d.1 += (t.numel() * t.dtype.size().unwrap()) as u64;
        }
    }
    (params, count, dtypes)
}

/// The report's totals equal the headers' and its parts add up to them.
fn assert_counts(r: &Value, files: &[PathBuf]) {
    let (params, count, dtypes) = census(files);
    assert_eq!(r["parameters"].as_u64(), Some(params), "{}", r["path"]);
    assert_eq!(r["tensor_count"].as_u64(), Some(count as u64));
    let parts: u64 = r["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["parameters"].as_u64().unwrap())
        .sum::<u64>()
        + r["ema"]["parameters"].as_u64().unwrap_or(0);
    assert_eq!(parts, params, "parts add up to the total");
    let got: BTreeMap<String, (u64, u64)> = r["dtypes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v["tensors"].as_u64().unwrap(), v["bytes"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, dtypes);
}

fn components(r: &Value) -> Vec<(String, Option<String>)> {
    r["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["encoder"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn parts(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
    list.iter()
        .map(|(n, e)| (n.to_string(), e.map(str::to_string)))
        .collect()
}

/// Writes a safetensors file of zero-filled tensors.
fn write(path: &Path, tensors: &[(&str, Dtype, &[usize])], meta: &[(&str, &str)]) {
    let tensors: Vec<(TensorSpec, Vec<u8>)> = tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let n: usize = shape.iter().product();
            (
                TensorSpec {
                    name: name.to_string(),
                    dtype: *dtype,
                    shape: shape.to_vec(),
                },
                vec![0u8; n * dtype.size().unwrap()],
            )
        })
        .collect();
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    write_all(path, &meta, &tensors, &WriteOptions::default()).unwrap();
}

#[test]
fn ldm_single_files_name_family_parts_and_counts() {
    let sd1 = fixtures().join("models/sd1_ldm.safetensors");
    let r = one(&sd1);
    assert_eq!(r["kind"], "checkpoint");
    assert_eq!(r["container"], "safetensors");
    assert_eq!(r["layout"], "single_file");
    assert_eq!(
        (r["family"].as_str(), r["base_model"].as_str()),
        (Some("sd1"), Some("sd1"))
    );
    assert_eq!(
        components(&r),
        parts(&[
            ("unet", None),
            ("text_encoder", Some("clip_l")),
            ("vae", None)
        ])
    );
    assert_eq!(r["has_vae"], true);
    assert!(r["ema"].is_null());
    assert!(r["prediction"].is_null());
    assert_eq!(r["dtypes"]["I64"]["tensors"], 1, "CLIP's position_ids");
    assert_eq!(r["dtype"], "F16", "dtype is over float tensors");
    assert_eq!(r["file_size"], std::fs::metadata(&sd1).unwrap().len());
    assert_counts(&r, &[sd1]);

    let sdxl = fixtures().join("models/sdxl_ldm.safetensors");
    let r = one(&sdxl);
    assert_eq!(
        (r["kind"].as_str(), r["family"].as_str()),
        (Some("checkpoint"), Some("sdxl"))
    );
    assert_eq!(
        components(&r),
        parts(&[
            ("unet", None),
            ("text_encoder", Some("clip_l")),
            ("text_encoder_2", Some("openclip_bigg")),
            ("vae", None),
        ])
    );
    assert_counts(&r, &[sdxl]);
}

#[test]
fn flux_files_hold_only_the_transformer_and_fp8_shows_a_dtype_mix() {
    let flux = fixtures().join("models/flux_bfl.safetensors");
    let r = one(&flux);
    assert_eq!(
        (r["kind"].as_str(), r["family"].as_str()),
        (Some("checkpoint"), Some("flux"))
    );
    assert_eq!(components(&r), parts(&[("transformer", None)]));
    assert_eq!(r["has_vae"], false);
    assert_counts(&r, &[flux]);

    let fp8 = fixtures().join("fp8/flux_bfl_fp8.safetensors");
    let r = one(&fp8);
    assert_eq!(r["family"], "flux");
    assert_eq!(r["dtype"], "mixed");
    let (_, _, dtypes) = census(std::slice::from_ref(&fp8));
    assert_eq!(
        dtypes.keys().map(String::as_str).collect::<Vec<_>>(),
        ["F16", "F8_E4M3"]
    );
    assert!(dtypes["F8_E4M3"].0 > 0 && dtypes["F16"].0 > 0);
    assert_counts(&r, &[fp8]);
}

#[test]
fn single_file_hashes_are_hash_files() {
    let sd1 = fixtures().join("models/sd1_ldm.safetensors");
    let (code, json, _) = run_json(&["--hash"], std::slice::from_ref(&sd1));
    assert_eq!(code, 0);
    let data_start = TensorFile::open(&sd1)
        .unwrap()
        .as_safetensors()
        .map(|s| s.data_start());
    let want = serde_json::to_value(hash_file(&sd1, data_start).unwrap()).unwrap();
    assert_eq!(json[0]["hashes"], want);
    // A1111's "Model hash" is AutoV2: the first 10 hex of the file's sha256.
    let sha = json[0]["hashes"]["sha256"].as_str().unwrap();
    assert_eq!(json[0]["hashes"]["autov2"], sha[..10].to_uppercase());
}

#[test]
fn a_pipeline_folder_lists_its_components_and_hashes_each_file() {
    let root = fixtures().join("models/sd1_diffusers");
    let (code, json, stderr) = run_json(&["--hash"], std::slice::from_ref(&root));
    assert_eq!(code, 0, "{stderr}");
    let r = &json[0];
    assert_eq!(r["kind"], "checkpoint");
    assert_eq!(r["container"], "folder");
    assert_eq!(r["layout"], "diffusers_pipeline");
    assert_eq!(r["family"], "sd1");
    assert_eq!(
        components(r),
        parts(&[
            ("unet", None),
            ("text_encoder", Some("clip_l")),
            ("vae", None)
        ])
    );
    assert_eq!(r["has_vae"], true);
    assert!(r["hashes"].is_null(), "a folder has no one-file hash");
    let weight_files = [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ];
    let files = r["files"].as_array().unwrap();
    assert_eq!(files.len(), weight_files.len());
    let mut size = 0;
    for (f, rel) in files.iter().zip(weight_files) {
        let path = root.join(rel);
        assert_eq!(f["path"], rel);
        let data_start = TensorFile::open(&path)
            .unwrap()
            .as_safetensors()
            .map(|s| s.data_start());
        let want = serde_json::to_value(hash_file(&path, data_start).unwrap()).unwrap();
        assert_eq!(f["hashes"], want, "{rel}");
        size += std::fs::metadata(&path).unwrap().len();
    }
    assert_eq!(r["file_size"], size);
    let paths: Vec<PathBuf> = weight_files.iter().map(|f| root.join(f)).collect();
    assert_counts(r, &paths);
}

#[test]
fn component_files_under_any_name_are_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/sd1_diffusers");
    let copy = |from: &str, to: &str| {
        let p = dir.path().join(to);
        std::fs::copy(src.join(from), &p).unwrap();
        p
    };
    let unet = copy("unet/diffusion_pytorch_model.safetensors", "x.safetensors");
    let te = copy("text_encoder/model.safetensors", "vae.safetensors");
    let vae = copy(
        "vae/diffusion_pytorch_model.safetensors",
        "unet.safetensors",
    );
    let (code, json, stderr) = run_json(&[], &[unet.clone(), te.clone(), vae.clone()]);
    assert_eq!(code, 0, "{stderr}");
    let (u, t, v) = (&json[0], &json[1], &json[2]);
    assert_eq!(
        (
            u["kind"].as_str(),
            u["layout"].as_str(),
            u["family"].as_str()
        ),
        (Some("checkpoint"), Some("diffusers_unet"), Some("sd1"))
    );
    assert_eq!(components(u), parts(&[("unet", None)]));
    assert_eq!(u["has_vae"], false);
    assert_eq!(
        (t["kind"].as_str(), t["layout"].as_str()),
        (Some("text_encoder"), Some("diffusers_text_encoder"))
    );
    assert_eq!(components(t), parts(&[("text_encoder", Some("clip_l"))]));
    assert_eq!(
        (v["kind"].as_str(), v["layout"].as_str()),
        (Some("vae"), Some("diffusers_vae"))
    );
    assert_counts(u, &[unet]);
    assert_counts(t, std::slice::from_ref(&te));
    assert_counts(v, std::slice::from_ref(&vae));

    // Table mode: one line each for what the file is.
    let out = loratool()
        .args(["inspect"])
        .arg(&te)
        .arg(&vae)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("vae.safetensors: a text encoder (CLIP-L"),
        "{text}"
    );
    assert!(
        lines[1].contains("unet.safetensors: a VAE (diffusers_vae)"),
        "{text}"
    );
}

#[test]
fn the_sdxl_refiner_is_told_from_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    write(
        &f,
        &[
            (
                "model.diffusion_model.label_emb.0.0.weight",
                Dtype::F16,
                &[4, 2560],
            ),
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                Dtype::F16,
                &[8, 1280],
            ),
            (
                "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
                Dtype::F16,
                &[12, 4],
            ),
            (
                "conditioner.embedders.0.model.ln_final.weight",
                Dtype::F16,
                &[1280],
            ),
            (
                "first_stage_model.decoder.conv_in.weight",
                Dtype::F16,
                &[4, 4, 3, 3],
            ),
        ],
        &[],
    );
    let r = one(&f);
    assert_eq!(r["kind"], "checkpoint");
    assert_eq!(r["family"], "sdxl-refiner");
    assert_eq!(r["base_model"], "sdxl", "LoRAs of a refiner are SDXL LoRAs");
    assert_eq!(
        components(&r),
        parts(&[
            ("unet", None),
            ("text_encoder_2", Some("openclip_bigg")),
            ("vae", None)
        ])
    );
    assert_counts(&r, &[f]);
}

#[test]
fn sd2_v_prediction_only_from_what_the_file_says() {
    let dir = tempfile::tempdir().unwrap();
    let sd2_keys: &[(&str, Dtype, &[usize])] = &[
        (
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            Dtype::F16,
            &[8, 8],
        ),
        (
            "cond_stage_model.model.ln_final.weight",
            Dtype::F16,
            &[1024],
        ),
    ];
    /// Name, metadata, whether the `v_pred` marker is there, family and prediction source.
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        bool,
        &'a str,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        ("plain", &[], false, "sd2", None),
        (
            "modelspec",
            &[("modelspec.prediction_type", "v")],
            false,
            "sd2-v",
            Some("modelspec.prediction_type"),
        ),
        (
            "comfy_meta",
            &[("modelspec.predict_key", "v")],
            false,
            "sd2-v",
            Some("modelspec.predict_key"),
        ),
        (
            "kohya",
            &[("ss_v_parameterization", "True")],
            false,
            "sd2-v",
            Some("ss_v_parameterization"),
        ),
        (
            "arch",
            &[("modelspec.architecture", "stable-diffusion-v2-768-v")],
            false,
            "sd2-v",
            Some("modelspec.architecture"),
        ),
        ("marker", &[], true, "sd2-v", Some("tensor v_pred")),
        (
            "epsilon",
            &[("modelspec.prediction_type", "epsilon")],
            false,
            "sd2",
            Some("modelspec.prediction_type"),
        ),
    ];
    for (name, meta, marker, family, source) in cases {
        let f = dir.path().join(format!("{name}.safetensors"));
        let mut keys = sd2_keys.to_vec();
        if *marker {
            keys.push(("v_pred", Dtype::F32, &[0]));
        }
        write(&f, &keys, meta);
        let r = one(&f);
        assert_eq!(r["family"], *family, "{name}");
        assert_eq!(r["base_model"], "sd2", "{name}");
        assert_eq!(r["prediction_source"].as_str(), *source, "{name}");
        if *marker {
            assert_eq!(
                components(&r).last().unwrap().0,
                "other",
                "the marker is no part"
            );
        }
        assert_eq!(
            components(&r)[..2],
            parts(&[("unet", None), ("text_encoder", Some("openclip_h"))])[..],
            "{name}"
        );
    }
}

#[test]
fn ema_weights_are_counted_apart_and_metadata_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ema.safetensors");
    write(
        &f,
        &[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                Dtype::F32,
                &[8, 4, 3, 3],
            ),
            (
                "model.diffusion_model.out.2.weight",
                Dtype::F32,
                &[4, 8, 3, 3],
            ),
            ("model_ema.decay", Dtype::F32, &[]),
            ("model_ema.num_updates", Dtype::I32, &[]),
            (
                "model_ema.diffusion_modelinput_blocks00weight",
                Dtype::F32,
                &[8, 4, 3, 3],
            ),
            (
                "model_ema.diffusion_modelout2weight",
                Dtype::F32,
                &[4, 8, 3, 3],
            ),
            ("alphas_cumprod", Dtype::F32, &[1000]),
        ],
        &[
            ("modelspec.title", "My Model"),
            ("modelspec.architecture", "stable-diffusion-v1"),
            ("ss_sd_model_name", "v1-5-pruned.safetensors"),
            ("ss_steps", "1200"),
        ],
    );
    let r = one(&f);
    assert_eq!(r["kind"], "checkpoint");
    assert_eq!(r["family"], "sd1", "metadata decides where the keys do not");
    assert_eq!(r["ema"]["tensor_count"], 4);
    assert_eq!(r["ema"]["parameters"], 2 + 2 * 288);
    assert_eq!(components(&r), parts(&[("unet", None), ("other", None)]));
    assert_eq!(r["modelspec"]["title"], "My Model");
    assert_eq!(r["training"]["base_model_name"], "v1-5-pruned.safetensors");
    assert_eq!(r["training"]["steps"], "1200");
    assert_eq!(r["metadata"]["ss_steps"], "1200");
    assert_eq!(r["dtypes"]["I32"]["tensors"], 1);
    assert_counts(&r, std::slice::from_ref(&f));

    let out = loratool().arg("inspect").arg(&f).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "present: 4 tensors",
        "modelspec.title",
        "My Model",
        "F32 6",
        "not included",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn vaes_embeddings_text_encoders_and_unknown_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vae = d.join("a.safetensors");
    write(
        &vae,
        &[
            (
                "encoder.down.0.block.0.conv1.weight",
                Dtype::F16,
                &[4, 4, 3, 3],
            ),
            (
                "decoder.up.0.block.0.conv1.weight",
                Dtype::F16,
                &[4, 4, 3, 3],
            ),
            ("quant_conv.weight", Dtype::F16, &[8, 8, 1, 1]),
        ],
        &[],
    );
    let emb = d.join("b.safetensors");
    write(&emb, &[("emb_params", Dtype::F32, &[3, 768])], &[]);
    let emb_xl = d.join("c.safetensors");
    write(
        &emb_xl,
        &[
            ("clip_l", Dtype::F16, &[2, 768]),
            ("clip_g", Dtype::F16, &[2, 1280]),
        ],
        &[],
    );
    let te = d.join("d.safetensors");
    write(
        &te,
        &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                Dtype::F16,
                &[768],
            ),
            (
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                Dtype::F16,
                &[4, 768],
            ),
        ],
        &[],
    );
    let unknown = d.join("e.safetensors");
    write(&unknown, &[("something.else", Dtype::F32, &[4])], &[]);
    let files = vec![
        vae.clone(),
        emb.clone(),
        emb_xl.clone(),
        te.clone(),
        unknown.clone(),
    ];
    let (code, json, stderr) = run_json(&["--hash"], &files);
    assert_eq!(code, 0, "{stderr}");
    let kinds: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["vae", "embedding", "embedding", "text_encoder", "unknown"]
    );
    assert_eq!(json[0]["layout"], "ldm_vae");
    assert_eq!(components(&json[0]), parts(&[("vae", None)]));
    assert_eq!(
        (
            json[1]["family"].as_str(),
            json[1]["embedding_vectors"].as_u64()
        ),
        (Some("sd1"), Some(3))
    );
    assert_eq!(
        (
            json[2]["family"].as_str(),
            json[2]["embedding_vectors"].as_u64()
        ),
        (Some("sdxl"), Some(2))
    );
    assert_eq!(
        components(&json[3]),
        parts(&[("text_encoder", Some("clip_l"))])
    );
    assert!(json[4]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("none of its 1 tensors"));
    for (r, f) in json.as_array().unwrap().iter().zip(&files) {
        let data_start = TensorFile::open(f)
            .unwrap()
            .as_safetensors()
            .map(|s| s.data_start());
        let want = serde_json::to_value(hash_file(f, data_start).unwrap()).unwrap();
        assert_eq!(r["hashes"], want);
        assert_counts(r, std::slice::from_ref(f));
    }

    let out = loratool().arg("inspect").args(&files).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "a.safetensors: a VAE (ldm_vae)",
        "b.safetensors: a textual-inversion embedding (sd1, 3 vectors)",
        "c.safetensors: a textual-inversion embedding (sdxl, 2 vectors)",
        "d.safetensors: a text encoder (CLIP-L, single_file)",
        "e.safetensors: not a LoRA or a model file loratool knows (1 tensors)",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn a_folder_that_is_no_pipeline_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("loras/sd1_kohya_lora.safetensors");
    let ckpt = fixtures().join("models/sd1_ldm.safetensors");
    let files = vec![lora, dir.path().to_path_buf(), ckpt];
    let (code, json, stderr) = run_json(&[], &files);
    assert_eq!(code, 1);
    assert_eq!(json[0]["kind"], "lora");
    assert!(json[1]["error"]
        .as_str()
        .unwrap()
        .contains("not a diffusers pipeline folder"));
    assert_eq!(json[2]["kind"], "checkpoint");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&dir.path().display().to_string()));
}

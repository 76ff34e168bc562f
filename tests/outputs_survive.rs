//! Outputs survive signals and races: real `loratool merge` processes, stopped with real signals
//! while writing, killed outright, or racing each other for one output path.
#![cfg(unix)]

mod common;

use common::{fixtures, loratool};
use loratool::tensors::writer::{build_header, TensorSpec};
use loratool::tensors::{Dtype, SafetensorsFile};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// No process has this pid: it is above every pid_max Linux allows.
const DEAD_PID: u32 = i32::MAX as u32;

fn fx(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

fn lora() -> PathBuf {
    fx("loras/sd1_kohya_lora.safetensors")
}

/// The SD1 fixture checkpoint followed by `padding` bytes of f16 zeros (sparse on disk, so made
/// at once), which a merge copies: big enough that it is still writing when signalled.
fn padded_base(path: &Path, padding: usize) {
    let sd1 = SafetensorsFile::open(&fx("models/sd1_ldm.safetensors")).unwrap();
    let mut specs: Vec<TensorSpec> = sd1
        .tensors()
        .iter()
        .map(|t| TensorSpec::cast_from(t, None))
        .collect();
    const PART: usize = 16 << 20;
    for i in 0..padding / PART {
        specs.push(TensorSpec {
            name: format!("padding.{i:03}"),
            dtype: Dtype::F16,
            shape: vec![PART / 2],
        });
    }
    let header = build_header(sd1.metadata(), &specs);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for i in 0..sd1.tensors().len() {
        bytes.extend_from_slice(sd1.tensor_bytes(i));
    }
    let data: usize = specs.iter().map(TensorSpec::byte_len).sum();
    std::fs::write(path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len((8 + header.len() + data) as u64).unwrap();
}

/// One 320 MB base and one 320 MB pipeline (the SD1 fixture pipeline with a sparse file to copy)
/// shared by the tests of this file; `keep` holds their folder.
struct Inputs {
    base: PathBuf,
    pipeline: PathBuf,
    _keep: tempfile::TempDir,
}

fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let keep = tempfile::tempdir().unwrap();
        let base = keep.path().join("big.safetensors");
        padded_base(&base, 320 << 20);
        let pipeline = keep.path().join("pipeline");
        copy_dir(&fx("models/sd1_diffusers"), &pipeline);
        let pad = std::fs::File::create(pipeline.join("vae/padding.bin")).unwrap();
        pad.set_len(320 << 20).unwrap();
        Inputs {
            base,
            pipeline,
            _keep: keep,
        }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(
                tree(&p)
                    .into_iter()
                    .map(|q| Path::new(&e.file_name()).join(q)),
            );
        } else {
            out.push(PathBuf::from(e.file_name()));
        }
    }
    out.sort();
    out
}

fn merge(base: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = loratool();
    c.arg("merge")
        .arg("--base")
        .arg(base)
        .arg("--lora")
        .arg(lora())
        .arg("-o")
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// True once `pid` has a file open in `dir` (an unnamed output shows as `dir/#123 (deleted)`).
fn writes_into(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.parent() == Some(dir) && t != dir))
}

/// Waits until `child` is writing its output in `dir`: a named temp there, or a file it holds
/// open there. Fails if it ends first.
fn wait_until_writing(child: &mut Child, dir: &Path) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the merge ended ({status}) before it was seen writing");
        }
        if names(dir).iter().any(|n| n.contains(".loratool-")) || writes_into(child.id(), dir) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr
}

#[test]
fn sigint_sigterm_and_sighup_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    for (sig, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let mut child = merge(&inputs().base, &out, &[]).spawn().unwrap();
        wait_until_writing(&mut child, dir.path());
        signal(&child, sig);
        let result = child.wait_with_output().unwrap();
        assert_eq!(result.status.code(), Some(128 + sig), "{name}");
        let line = one_line(&result);
        assert!(
            line.starts_with(&format!("loratool: interrupted ({name})")),
            "{line}"
        );
        assert!(
            names(dir.path()).is_empty(),
            "{name}: left {:?}",
            names(dir.path())
        );
    }
}

/// A folder output stopped by a signal: its staging folder is removed, and the folder it was
/// replacing (--force) is still there, whole.
#[test]
fn an_interrupted_folder_merge_leaves_the_old_folder_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe");
    let done = merge(&fx("models/sd1_diffusers"), &out, &[])
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let before = tree(&out);
    let unet = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();

    let mut child = merge(&inputs().pipeline, &out, &["--force"])
        .spawn()
        .unwrap();
    wait_until_writing(&mut child, dir.path());
    signal(&child, libc::SIGTERM);
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), Some(143));
    let line = one_line(&result);
    assert!(
        line.contains("interrupted (SIGTERM); removed the unfinished output .pipe.loratool-"),
        "{line}"
    );
    assert_eq!(names(dir.path()), ["pipe"]);
    assert_eq!(tree(&out), before);
    assert_eq!(
        std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        unet
    );
}

#[test]
fn sigkill_leaves_no_named_temp_and_the_next_run_removes_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let mut child = merge(&inputs().base, &out, &[]).spawn().unwrap();
    wait_until_writing(&mut child, dir.path());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    if cfg!(target_os = "linux") {
        // The output was unnamed (O_TMPFILE): nothing to leave.
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    // What a SIGKILL leaves where there are no unnamed files, and a staging folder.
    let stale_file = format!(".out.safetensors.loratool-{DEAD_PID}-0.tmp");
    let stale_dir = format!(".pipe.loratool-{DEAD_PID}-1.tmp");
    std::fs::write(dir.path().join(&stale_file), vec![0u8; 4096]).unwrap();
    std::fs::create_dir_all(dir.path().join(&stale_dir).join("unet")).unwrap();
    std::fs::write(dir.path().join(&stale_dir).join("unet/w.safetensors"), b"x").unwrap();
    // A live process's temp (this test's pid) and names not of loratool's pattern stay.
    let live = format!(".other.loratool-{}-0.tmp", std::process::id());
    for keep in [live.as_str(), ".out.safetensors.tmp", "notes.txt"] {
        std::fs::write(dir.path().join(keep), b"keep").unwrap();
    }
    let result = merge(&fx("models/sd1_ldm.safetensors"), &out, &[])
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let mut want = vec![
        live,
        ".out.safetensors.tmp".to_string(),
        "notes.txt".to_string(),
        "out.safetensors".to_string(),
    ];
    want.sort();
    assert_eq!(names(dir.path()), want);
}

/// Four merges to one output at once, all past the "exists" check before any finishes: without
/// --force exactly one wins and the others refuse at the end; with --force all succeed. Either
/// way the output is one merge's bytes.
#[test]
fn racing_merges_to_one_output() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.safetensors");
    let single = merge(&inputs().base, &reference, &[]).output().unwrap();
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let want = std::fs::read(&reference).unwrap();
    let race = dir.path().join("race");
    std::fs::create_dir(&race).unwrap();
    let out = race.join("out.safetensors");

    for force in [false, true] {
        let flags: &[&str] = if force { &["--force"] } else { &[] };
        let mut children: Vec<Child> = (0..4)
            .map(|_| merge(&inputs().base, &out, flags).spawn().unwrap())
            .collect();
        let all_started = if cfg!(target_os = "linux") {
            for c in &mut children {
                wait_until_writing(c, &race);
            }
            true
        } else {
            false
        };
        let results: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let won = results.iter().filter(|r| r.status.success()).count();
        if force {
            assert_eq!(won, 4, "with --force all succeed");
        } else {
            assert_eq!(won, 1, "exactly one wins");
            for r in results.iter().filter(|r| !r.status.success()) {
                let line = one_line(r);
                assert!(line.contains("already exists"), "{line}");
                if all_started {
                    assert!(
                        line.contains("appeared while this output was being written"),
                        "{line}"
                    );
                }
            }
        }
        assert_eq!(names(&race), ["out.safetensors"], "no temps left");
        assert!(std::fs::read(&out).unwrap() == want, "one merge's bytes");
    }
}

#[test]
fn a_folder_replaced_with_force_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let base = fx("models/sd1_diffusers");
    let out = dir.path().join("pipe");
    let fresh = dir.path().join("fresh");
    let ok = |o: Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(merge(&base, &out, &[]).output().unwrap());
    std::fs::write(out.join("left-over.txt"), b"from the old folder").unwrap();

    let refused = merge(&base, &out, &[]).output().unwrap();
    assert!(!refused.status.success());
    assert!(one_line(&refused).contains("already exists (use --force"));

    let lora2 = format!("{}:0.5", lora().display());
    let mut c = loratool();
    c.args(["merge", "--base"])
        .arg(&base)
        .args(["--lora", &lora2, "-o"]);
    ok(c.arg(&out).arg("--force").output().unwrap());
    let mut c = loratool();
    c.args(["merge", "--base"])
        .arg(&base)
        .args(["--lora", &lora2, "-o"]);
    ok(c.arg(&fresh).output().unwrap());

    assert_eq!(
        tree(&out),
        tree(&base),
        "the old folder's extra file is gone"
    );
    for f in tree(&out) {
        assert!(
            std::fs::read(out.join(&f)).unwrap() == std::fs::read(fresh.join(&f)).unwrap(),
            "{f:?}"
        );
    }
    assert_eq!(
        names(dir.path()),
        ["fresh", "pipe"],
        "no staging or old folder left"
    );
}

#[test]
fn an_existing_folder_is_named_as_such_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let result = merge(&fx("models/sd1_ldm.safetensors"), dir.path(), &[])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let line = one_line(&result);
    assert!(
        line.contains("is a folder") && !line.contains("--force"),
        "{line}"
    );
}

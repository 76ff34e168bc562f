//! `loratool fetch` against a local Civitai + Hugging Face server (tests/hub_support): the bytes on
//! disk, the requests the server saw (headers included), resume, retries, refusals, sidecars, the
//! index record, and that no token appears in any output or file.

mod hub_support;

use hub_support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOKEN: &str = "civ-SECRET-token-123";
const HF_TOKEN: &str = "hf_SECRET_token_456";

fn lora_bytes() -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/loras/sd1_kohya_lora.safetensors"),
    )
    .unwrap()
}

fn png() -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(b"\0\0\0\rIHDR-preview-bytes");
    b
}

struct Env {
    hub: FakeHub,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            hub: FakeHub::start(),
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn dir(&self) -> PathBuf {
        let d = self.tmp.path().join("loras");
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn db(&self) -> PathBuf {
        self.tmp.path().join("index.db")
    }
    /// The binary with the endpoints pointed at the test server, its own index and HOME (no real
    /// token file can be read), fast retries.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loratool"));
        c.args(args)
            .env("LORATOOL_CIVITAI_ENDPOINT", self.hub.api_base())
            .env("HF_ENDPOINT", self.hub.api_base())
            .env("LORATOOL_DB", self.db())
            .env("HOME", self.tmp.path())
            .env("XDG_CACHE_HOME", self.tmp.path().join("cache"))
            .env("LORATOOL_RETRY_BASE_MS", "5")
            .env_remove("CIVITAI_API_TOKEN")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HOME")
            .env_remove("HF_TOKEN_PATH");
        c
    }
    fn fetch(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut all = vec!["fetch"];
        all.extend_from_slice(args);
        let into = self.dir();
        let mut c = self.cmd(&all);
        if !args.contains(&"--into") {
            c.arg("--into").arg(&into);
        }
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    }
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    text(o)
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", text(o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn watercolor(require_auth: bool) -> CivitaiModel {
    CivitaiModel {
        versions: vec![CivitaiVersion {
            trained_words: vec!["wtrclr style".into(), "soft".into()],
            require_auth,
            files: vec![CivitaiFile {
                name: "watercolor_v1.safetensors".into(),
                bytes: lora_bytes(),
                primary: true,
                fp: Some("fp16".into()),
                size: Some("pruned".into()),
                ..Default::default()
            }],
            images: vec![CivitaiImage {
                bytes: png(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every file under `dir`, recursively, must not contain `needle`.
fn assert_nowhere(dir: &Path, needle: &str) {
    for e in walk(dir) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{} contains the token",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn civitai_download_with_token_verifies_writes_sidecars_and_indexes() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(true));
    env.hub.set_civitai_token(Some(TOKEN));
    let out = env.fetch(&["civitai:100001"], &[("CIVITAI_API_TOKEN", TOKEN)]);
    let printed = ok(&out);
    let dir = env.dir();
    let model = dir.join("watercolor_v1.safetensors");
    assert_eq!(std::fs::read(&model).unwrap(), lora_bytes());
    assert_eq!(
        env.files(),
        [
            "watercolor_v1.civitai.info",
            "watercolor_v1.json",
            "watercolor_v1.preview.png",
            "watercolor_v1.safetensors"
        ]
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("watercolor_v1.civitai.info")).unwrap())
            .unwrap();
    assert_eq!(info["id"], 200002);
    assert_eq!(info["modelId"], 100001);
    assert_eq!(
        std::fs::read(dir.join("watercolor_v1.preview.png")).unwrap(),
        png()
    );
    let user: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("watercolor_v1.json")).unwrap()).unwrap();
    assert_eq!(user["activation text"], "wtrclr style, soft");
    assert_eq!(user["sd version"], "SDXL");

    // The token went to the API host only, as a header; the storage host never saw it.
    let seen = env.hub.requests();
    let download = seen
        .iter()
        .find(|r| r.path().starts_with("/api/download/models/200002"))
        .expect("download requested");
    assert_eq!(
        download.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(!download.target.contains(TOKEN));
    let storage: Vec<_> = seen
        .iter()
        .filter(|r| r.server == Server::Storage)
        .collect();
    assert!(!storage.is_empty());
    for r in &storage {
        assert_eq!(r.header("authorization"), None, "{}", r.target);
        assert!(!r.target.contains(TOKEN));
    }
    assert!(!printed.contains(TOKEN));
    assert_nowhere(env.tmp.path(), TOKEN);

    // Indexed with its Civitai ids.
    let conn = rusqlite::Connection::open(env.db()).unwrap();
    let (m, v, f): (i64, i64, i64) = conn
        .query_row(
            "SELECT civitai_model_id, civitai_version_id, civitai_file_id FROM sources s
             JOIN files f ON f.id = s.file_id WHERE f.file_name = 'watercolor_v1.safetensors'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((m, v, f), (100001, 200002, 300003));
    let show = env
        .cmd(&["library", "show", "watercolor_v1", "--json"])
        .output()
        .unwrap();
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["sources"][0]["civitai_version_id"], 200002, "{show:#}");
    assert_eq!(show["trigger_words"][0], "wtrclr style", "{show:#}");

    // A second fetch finds the verified file in place and downloads nothing.
    env.hub.clear_requests();
    let again = ok(&env.fetch(
        &["civitai:100001@200002", "--json"],
        &[("CIVITAI_API_TOKEN", TOKEN)],
    ));
    assert!(again.contains("\"already_present\": true"), "{again}");
    assert!(env
        .hub
        .requests()
        .iter()
        .all(|r| r.server == Server::Api && !r.path().starts_with("/api/download")));
}

#[test]
fn a_login_is_asked_for_when_no_token_is_given_and_nothing_is_written() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(true));
    env.hub.set_civitai_token(Some(TOKEN));
    let err = failed(&env.fetch(&["civitai:100001"], &[]));
    assert!(
        err.contains("civitai:100001: Civitai needs a login for this download")
            && err.contains("CIVITAI_API_TOKEN"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(env.files().is_empty(), "{:?}", env.files());

    let err = failed(&env.fetch(&["civitai:100001", "--token", "wrong"], &[]));
    assert!(err.contains("Civitai refused the token"), "{err}");
}

#[test]
fn a_dropped_connection_resumes_with_range_and_if_range() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    let half = lora_bytes().len() / 2;
    env.hub
        .inject(Route::Storage, Fault::DropMidBody { after_bytes: half });
    ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.safetensors")).unwrap(),
        lora_bytes()
    );
    assert_eq!(env.files(), ["watercolor_v1.safetensors"]);
    let storage: Vec<_> = env
        .hub
        .requests()
        .into_iter()
        .filter(|r| r.server == Server::Storage)
        .collect();
    assert_eq!(storage.len(), 2);
    assert_eq!(storage[0].header("range"), None);
    assert_eq!(
        storage[1].header("range"),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(storage[1].header("if-range").is_some());
    // Each attempt asked Civitai again (a signed URL may have expired meanwhile).
    let downloads = env
        .hub
        .requests()
        .iter()
        .filter(|r| r.path().starts_with("/api/download/"))
        .count();
    assert_eq!(downloads, 2);
}

#[test]
fn an_interrupted_run_leaves_a_part_file_that_the_next_run_resumes() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    let bytes = lora_bytes();
    env.hub.inject(
        Route::Storage,
        Fault::DropMidBody {
            after_bytes: 50_000,
        },
    );
    for _ in 0..6 {
        env.hub.inject(
            Route::Storage,
            Fault::Status {
                status: 503,
                headers: vec![],
                body: "unavailable".into(),
            },
        );
    }
    let err = failed(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert!(err.contains("server error 503"), "{err}");
    let part = env.dir().join("watercolor_v1.safetensors.part");
    assert_eq!(std::fs::read(&part).unwrap(), bytes[..50_000]);
    assert!(!env.dir().join("watercolor_v1.safetensors").exists());

    env.hub.clear_requests();
    let out = ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert!(out.contains("resumed at"), "{out}");
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.safetensors")).unwrap(),
        bytes
    );
    assert_eq!(env.files(), ["watercolor_v1.safetensors"]);
    let first_storage = env
        .hub
        .requests()
        .into_iter()
        .find(|r| r.server == Server::Storage)
        .unwrap();
    assert_eq!(first_storage.header("range"), Some("bytes=50000-"));
}

#[test]
fn rate_limits_and_server_errors_are_retried() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.inject(
        Route::CivitaiDownload,
        Fault::Status {
            status: 429,
            headers: vec![("Retry-After".into(), "1".into())],
            body: r#"{"error":"slow down"}"#.into(),
        },
    );
    env.hub.inject(
        Route::Storage,
        Fault::Status {
            status: 500,
            headers: vec![],
            body: "oops".into(),
        },
    );
    let start = std::time::Instant::now();
    ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.safetensors")).unwrap(),
        lora_bytes()
    );
    let downloads = env
        .hub
        .requests()
        .iter()
        .filter(|r| r.path().starts_with("/api/download/"))
        .count();
    assert_eq!(downloads, 3, "429, then 500 from storage, then success");

    // A 429 whose Retry-After is too long to wait for is reported at once.
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.inject(
        Route::CivitaiDownload,
        Fault::Status {
            status: 429,
            headers: vec![("Retry-After".into(), "3600".into())],
            body: r#"{"error":"We've noticed an unusual amount of downloading"}"#.into(),
        },
    );
    let err = failed(&env.fetch(&["civitai:100001"], &[]));
    assert!(
        err.contains("rate limited (429)") && err.contains("3600 s"),
        "{err}"
    );
    assert!(env.files().is_empty());
}

#[test]
fn wrong_bytes_are_a_hash_mismatch_and_nothing_is_kept() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.inject(Route::Storage, Fault::WrongBytes);
    env.hub.inject(Route::Storage, Fault::WrongBytes);
    let err = failed(&env.fetch(&["civitai:100001"], &[]));
    assert!(err.contains("hash mismatch"), "{err}");
    assert!(env.files().is_empty(), "{:?}", env.files());

    // Wrong once: the retry from scratch succeeds.
    env.hub.inject(Route::Storage, Fault::WrongBytes);
    ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.safetensors")).unwrap(),
        lora_bytes()
    );
}

#[test]
fn an_html_page_is_never_saved_as_a_model() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.inject(Route::Storage, Fault::HtmlPage);
    let err = failed(&env.fetch(&["civitai:100001"], &[]));
    assert!(
        err.contains("not a model file") && err.contains("HTML"),
        "{err}"
    );
    assert!(env.files().is_empty(), "{:?}", env.files());
}

#[test]
fn hostile_file_names_stay_inside_the_destination() {
    let env = Env::new();
    let mut m = watercolor(false);
    m.versions[0].files[0].name = "../../evil.safetensors".into();
    env.hub.add_civitai_model(m);
    ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert_eq!(env.files(), ["evil.safetensors"]);
    assert!(!env.tmp.path().join("evil.safetensors").exists());
    assert!(!env
        .tmp
        .path()
        .parent()
        .unwrap()
        .join("evil.safetensors")
        .exists());
}

#[test]
fn an_expired_signed_url_gets_a_fresh_redirect() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.inject(Route::Storage, Fault::ExpiredSignature);
    ok(&env.fetch(&["civitai:100001", "--no-sidecars"], &[]));
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.safetensors")).unwrap(),
        lora_bytes()
    );
    let locations: Vec<String> = env
        .hub
        .requests()
        .into_iter()
        .filter(|r| r.server == Server::Storage)
        .map(|r| r.target)
        .collect();
    assert_eq!(locations.len(), 2);
    assert_ne!(locations[0], locations[1], "the second URL is a fresh one");
}

#[test]
fn archived_and_early_access_versions_have_their_own_messages() {
    let env = Env::new();
    let mut m = watercolor(false);
    m.archived = true;
    env.hub.add_civitai_model(m);
    let err = failed(&env.fetch(&["civitai:100001@200002"], &[]));
    assert!(err.contains("archived on Civitai"), "{err}");

    let env = Env::new();
    let mut m = watercolor(false);
    m.versions[0].early_access_deadline = Some("2026-12-24T00:00:00.000Z".into());
    env.hub.add_civitai_model(m);
    let err = failed(&env.fetch(&["civitai:100001"], &[]));
    assert!(
        err.contains("access denied") && err.contains("Early Access until 2026-12-24"),
        "{err}"
    );
    let err = failed(&env.fetch(&["civitai:999"], &[]));
    assert!(err.contains("not found: Civitai model 999"), "{err}");
    assert!(env.files().is_empty());
}

#[test]
fn file_choice_flags_pick_among_a_versions_files() {
    let env = Env::new();
    let mut m = watercolor(false);
    let mut pickle = m.versions[0].files[0].clone();
    pickle.id = 300004;
    pickle.name = "watercolor_v1.pt".into();
    pickle.format = "PickleTensor".into();
    pickle.fp = Some("fp32".into());
    pickle.primary = false;
    pickle.bytes = b"PK\x03\x04 pretend pickle archive bytes, long enough".repeat(40);
    m.versions[0].files.push(pickle.clone());
    env.hub.add_civitai_model(m);
    ok(&env.fetch(
        &[
            "civitai:100001",
            "--format",
            "PickleTensor",
            "--no-sidecars",
        ],
        &[],
    ));
    assert_eq!(env.files(), ["watercolor_v1.pt"]);
    assert_eq!(
        std::fs::read(env.dir().join("watercolor_v1.pt")).unwrap(),
        pickle.bytes
    );
    let err = failed(&env.fetch(&["civitai:100001", "--fp", "bf16"], &[]));
    assert!(
        err.contains("none of its files")
            && err.contains("watercolor_v1.pt (Model, PickleTensor, fp32"),
        "{err}"
    );
}

fn hf_repo(gated: bool, files: Vec<HfFile>) -> HfRepo {
    HfRepo {
        id: "alice/styles".into(),
        sha: "0123456789abcdef0123456789abcdef01234567".into(),
        gated,
        private: false,
        files,
    }
}

#[test]
fn hugging_face_lfs_file_is_verified_against_x_linked_etag() {
    let env = Env::new();
    env.hub.add_hf_repo(hf_repo(
        false,
        vec![
            HfFile {
                path: "loras/water.safetensors".into(),
                bytes: lora_bytes(),
                lfs: true,
            },
            HfFile {
                path: "README.md".into(),
                bytes: b"# styles".to_vec(),
                lfs: false,
            },
        ],
    ));
    let out = ok(&env.fetch(&["hf:alice/styles", "--json"], &[("HF_TOKEN", HF_TOKEN)]));
    assert_eq!(
        std::fs::read(env.dir().join("water.safetensors")).unwrap(),
        lora_bytes()
    );
    let report: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &env.fetch(
            &["hf:alice/styles/loras/water.safetensors@main", "--json"],
            &[],
        )
        .stdout,
    ))
    .unwrap();
    assert_eq!(report[0]["file"]["already_present"], true, "{out}");
    // The CDN never saw the token; the Hub did.
    for r in env.hub.requests() {
        if r.server == Server::Storage {
            assert_eq!(r.header("authorization"), None, "{}", r.target);
        }
    }
    assert!(env
        .hub
        .requests()
        .iter()
        .any(|r| r.path().contains("/resolve/")
            && r.header("authorization") == Some(format!("Bearer {HF_TOKEN}").as_str())));
    assert_nowhere(env.tmp.path(), HF_TOKEN);
    let conn = rusqlite::Connection::open(env.db()).unwrap();
    let (repo, rev, path): (String, String, String) = conn
        .query_row(
            "SELECT hf_repo, hf_revision, hf_path FROM sources WHERE source = 'huggingface'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (repo.as_str(), rev.as_str(), path.as_str()),
        (
            "alice/styles",
            "0123456789abcdef0123456789abcdef01234567",
            "loras/water.safetensors"
        )
    );
}

#[test]
fn hugging_face_gated_repos_ask_for_a_token_and_several_loras_are_listed() {
    let env = Env::new();
    env.hub.add_hf_repo(hf_repo(
        true,
        vec![HfFile {
            path: "water.safetensors".into(),
            bytes: lora_bytes(),
            lfs: true,
        }],
    ));
    env.hub.set_hf_token(Some(HF_TOKEN));
    let err = failed(&env.fetch(&["hf:alice/styles/water.safetensors"], &[]));
    assert!(
        err.contains("Hugging Face needs a login")
            && err.contains("gated")
            && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(env.files().is_empty());
    // The token file huggingface-cli writes is found under HF_HOME.
    let hf_home = env.tmp.path().join("hfhome");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), format!("{HF_TOKEN}\n")).unwrap();
    ok(&env.fetch(
        &["hf:alice/styles/water.safetensors"],
        &[("HF_HOME", hf_home.to_str().unwrap())],
    ));
    assert_eq!(
        std::fs::read(env.dir().join("water.safetensors")).unwrap(),
        lora_bytes()
    );

    let env = Env::new();
    let file = |p: &str| HfFile {
        path: p.into(),
        bytes: lora_bytes(),
        lfs: true,
    };
    env.hub.add_hf_repo(hf_repo(
        false,
        vec![file("a.safetensors"), file("sub/b.safetensors")],
    ));
    let err = failed(&env.fetch(&["hf:alice/styles"], &[]));
    assert!(
        err.contains("has 2 .safetensors files")
            && err.contains("a.safetensors, sub/b.safetensors"),
        "{err}"
    );
    let err = failed(&env.fetch(&["hf:alice/styles/missing.safetensors"], &[]));
    assert!(
        err.contains("not found") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn several_sources_download_in_parallel() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    env.hub.add_hf_repo(hf_repo(
        false,
        vec![HfFile {
            path: "water.safetensors".into(),
            bytes: lora_bytes(),
            lfs: true,
        }],
    ));
    let civitai_url = format!("{}/models/100001?modelVersionId=200002", env.hub.api_base());
    ok(&env.fetch(
        &[
            &civitai_url,
            "hf:alice/styles/water.safetensors",
            "--jobs",
            "2",
            "--no-sidecars",
        ],
        &[],
    ));
    assert_eq!(
        env.files(),
        ["water.safetensors", "watercolor_v1.safetensors"]
    );
}

#[test]
fn identify_writes_sidecars_for_known_files_and_never_touches_the_model() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    let dir = env.dir();
    let known = dir.join("renamed_by_user.safetensors");
    std::fs::write(&known, lora_bytes()).unwrap();
    let unknown = dir.join("unknown.safetensors");
    let mut other = lora_bytes();
    let last = other.len() - 1;
    other[last] ^= 1;
    std::fs::write(&unknown, &other).unwrap();
    // A header edit (metadata) changes the sha256, not AutoV3.
    let edited = dir.join("edited.safetensors");
    let meta = Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["meta"])
        .arg(&known)
        .args(["--set", "my_note=hello", "-o"])
        .arg(&edited)
        .output()
        .unwrap();
    assert!(meta.status.success(), "{}", text(&meta));
    let before = std::fs::metadata(&known).unwrap().modified().unwrap();

    let missing = dir.join("not_there.safetensors");
    let run = env
        .cmd(&["fetch", "--identify"])
        .arg(&known)
        .arg(&unknown)
        .arg(&missing)
        .arg(&edited)
        .output()
        .unwrap();
    // The missing file is reported (exit 1); the others are still identified.
    let err = failed(&run);
    assert!(err.contains("not_there.safetensors: No such file"), "{err}");
    let out = text(&run);
    assert!(
        out.contains("Watercolor Style / v1.0 (matched by sha256)"),
        "{out}"
    );
    assert!(out.contains("(matched by autov3)"), "{out}");
    assert!(
        out.contains("unknown.safetensors: not found on Civitai"),
        "{out}"
    );
    assert_eq!(std::fs::read(&known).unwrap(), lora_bytes());
    assert_eq!(
        std::fs::metadata(&known).unwrap().modified().unwrap(),
        before
    );
    let names = env.files();
    for n in [
        "renamed_by_user.civitai.info",
        "renamed_by_user.preview.png",
        "renamed_by_user.json",
        "edited.civitai.info",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
    }
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("unknown.") || n == "unknown.safetensors"),
        "{names:?}"
    );
    // The batch lookup was one POST with the sha256s; the edited file needed an AutoV3 lookup.
    let seen = env.hub.requests();
    let posts: Vec<_> = seen
        .iter()
        .filter(|r| r.method == "POST" && r.path() == "/api/v1/model-versions/by-hash")
        .collect();
    assert_eq!(posts.len(), 1);
    let body: Vec<String> = serde_json::from_slice(&posts[0].body).unwrap();
    assert_eq!(body.len(), 3);
    assert!(seen
        .iter()
        .any(|r| r.path().starts_with("/api/v1/model-versions/by-hash/")
            && r.path().len() == "/api/v1/model-versions/by-hash/".len() + 12));
}

#[test]
fn outdated_reports_newer_versions_with_one_request_per_model() {
    let env = Env::new();
    let mut m = watercolor(false);
    let mut v2 = m.versions[0].clone();
    v2.id = 200003;
    v2.name = "v2.0".into();
    v2.published_at = "2026-06-01T10:00:00.000Z".into();
    v2.files[0].id = 300005;
    v2.files[0].name = "watercolor_v2.safetensors".into();
    let mut b = lora_bytes();
    let n = b.len() - 2;
    b[n] ^= 1;
    v2.files[0].bytes = b;
    m.versions.insert(0, v2);
    env.hub.add_civitai_model(m);
    ok(&env.fetch(&["civitai:100001@200002", "--no-sidecars"], &[]));
    env.hub.clear_requests();
    let out = ok(&env
        .cmd(&["library", "outdated", "--json"])
        .output()
        .unwrap());
    let list: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &env.cmd(&["library", "outdated", "--json"])
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    assert_eq!(list[0]["newest_version_id"], 200003, "{out}");
    assert_eq!(list[0]["command"], "loratool fetch civitai:100001@200003");
    let model_requests = env
        .hub
        .requests()
        .iter()
        .filter(|r| r.path() == "/api/v1/models/100001")
        .count();
    assert_eq!(model_requests, 1, "the second run used the cached answer");
}

#[test]
fn bad_sources_and_missing_destinations_are_one_line_errors() {
    let env = Env::new();
    let out = env
        .cmd(&["fetch", "https://example.com/x.safetensors"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("only Civitai and Hugging Face URLs"), "{err}");
    let out = env.cmd(&["fetch", "civitai:1"]).output().unwrap();
    let err = failed(&out);
    assert!(err.contains("no destination: pass --into DIR"), "{err}");
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn library_identify_looks_up_only_files_without_civitai_information() {
    let env = Env::new();
    env.hub.add_civitai_model(watercolor(false));
    let dir = env.dir();
    std::fs::write(dir.join("mine.safetensors"), lora_bytes()).unwrap();
    let add = env
        .cmd(&["library", "add", "--quiet"])
        .arg(&dir)
        .output()
        .unwrap();
    ok(&add);
    let out = ok(&env
        .cmd(&["library", "identify", "--json"])
        .output()
        .unwrap());
    let found: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &env.cmd(&["library", "identify", "--all", "--json"])
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    assert!(out.contains("\"matched_by\": \"sha256\""), "{out}");
    assert_eq!(found[0]["origin"]["version_id"], 200002, "{found:#}");
    assert!(dir.join("mine.civitai.info").exists());
    // Identified now: a plain `identify` has nothing left to do.
    let again = ok(&env.cmd(&["library", "identify"]).output().unwrap());
    assert!(again.contains("nothing to identify"), "{again}");
    let show = env
        .cmd(&["library", "show", "mine", "--json"])
        .output()
        .unwrap();
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["sources"][0]["civitai_model_id"], 100001, "{show:#}");
}
